"""Subcommands beyond train/eval/generate (those are in ``bytescale.cli``): each module defines
``add_command(subparsers) -> (name, handler)``; ``bytescale.cli.COMMAND_MODULES`` lists them."""
