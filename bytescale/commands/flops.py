"""``bytescale flops``: analytic FLOPs per byte of a model preset, by component (``bytescale.flops``)."""

from __future__ import annotations

import dataclasses
import json

from bytescale import configs, flops
from bytescale.models import mtp, registry
from bytescale.models.blt import BLTConfig
from bytescale.models.blt import flops_per_byte as blt_flops


def add_command(subparsers):
  p = subparsers.add_parser("flops", help="analytic FLOPs per byte of a model preset, by component")
  p.add_argument("--model", default="bytelm", help="model family (bytelm, megabyte, blt); default bytelm")
  p.add_argument("--preset", default="tiny", help="named size preset of the model; default tiny")
  p.add_argument("--seq-len", type=int, default=None, help="bytes per sequence (default: the preset's max_seq_len)")
  p.add_argument("--patch-size", type=float, default=None,
                 help="MegaByte: the patch size; BLT: the average patch size to count for (default: the stride for "
                      "strided patching, else 4.5)")
  p.add_argument("--convention", choices=flops.CONVENTIONS, default="exact",
                 help="exact: every matmul the model runs; spacebyte: the papers' convention (default exact)")
  p.add_argument("--attention", choices=flops.ATTENTION_COUNTS, default="causal",
                 help="causal: the keys a query sees; dense: every score the XLA path computes (default causal)")
  p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                 help="model config override; mtp_heads=N (and other mtp_* fields) add multi-token heads")
  p.add_argument("--entropy-model-preset", default=None, metavar="PRESET",
                 help="BLT with entropy patching: also count this bytelm preset as its (frozen) entropy model, "
                      "e.g. entropy-100m (the paper's); reported as entropy_model.* components")
  p.add_argument("--json", action="store_true", help="one JSON line instead of a table")
  return "flops", _run


def configured_count(model: str, preset: str, *, seq_len: int | None = None, patch_size: float | None = None,
                     overrides=(), convention: str = "exact", attention: str = "causal",
                     entropy_model_preset: str | None = None) -> tuple[int, flops.FlopCount]:
  """What ``bytescale flops`` prints: ``(seq_len, count)`` for a preset with ``--set``-style overrides."""
  config = registry.get_preset(model, preset)
  assignments, multi_token = mtp.split_overrides(overrides)
  if assignments:
    config = configs.replace_paths(config, assignments)
  average_patch_size = None
  if patch_size is not None:
    if isinstance(config, BLTConfig):
      if patch_size < 1:
        raise configs.ConfigError(f"--patch-size must be at least 1 byte, got {patch_size}")
      average_patch_size = float(patch_size)
    elif float(patch_size).is_integer():
      config = configs.replace_path(config, "patch_size", str(int(patch_size)))
    else:
      raise configs.ConfigError(f"--patch-size {patch_size}: {type(config).__name__} needs a whole number of bytes")
  if multi_token:
    if average_patch_size is not None:
      raise configs.ConfigError("--patch-size with mtp_* overrides on BLT is not supported; count BLT with heads at "
                                "its default average patch size, or drop the heads")
    config = mtp.apply_overrides(config, multi_token)
  seq_len = seq_len or getattr(config, "max_seq_len", None) or getattr(
      getattr(config, "trunk", None), "max_seq_len", 1024)
  if entropy_model_preset is not None:
    if not isinstance(config, BLTConfig) or not config.patching.needs_entropies:
      raise configs.ConfigError("--entropy-model-preset applies to BLT with entropy patching only")
    config = dataclasses.replace(config, entropy_model_config=registry.get_preset("bytelm", entropy_model_preset))
  if isinstance(config, BLTConfig):  # BLT alone takes a (fractional) average patch size
    count = blt_flops(config, seq_len, average_patch_size, convention=convention, attention=attention,
                      include_entropy_model=entropy_model_preset is not None)
  else:
    count = registry.flops_per_byte(config, seq_len, convention=convention, attention=attention)
  return seq_len, count


def _run(args):
  seq_len, count = configured_count(args.model, args.preset, seq_len=args.seq_len, patch_size=args.patch_size,
                                    overrides=args.set, convention=args.convention, attention=args.attention,
                                    entropy_model_preset=args.entropy_model_preset)
  if args.json:
    print(json.dumps({"model": args.model, "preset": args.preset, "seq_len": seq_len, "patch_size": args.patch_size,
                      "overrides": args.set, "convention": args.convention, "attention": args.attention,
                      **count.as_dict()}))
    return
  print(f"{args.model}/{args.preset}  seq_len={seq_len}  convention={args.convention}  attention={args.attention}")
  for name, value in sorted(count.components.items()):
    print(f"  {name:<28} {value:>16,.0f}")
  print(f"  {'forward per byte':<28} {count.forward:>16,.0f}\n  {'training per byte':<28} {count.training:>16,.0f}")
  if count.training_with_recompute != count.training:
    print(f"  {'  with remat recompute':<28} {count.training_with_recompute:>16,.0f}")
