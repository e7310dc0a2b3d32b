"""``bytescale train | eval | generate``: the command-line contract other work and benchmarks script against.

Progress goes to stderr; each command ends with ONE JSON line on stdout (``generate`` prints the text unless
``--json``). Bad input exits with status 2 and one line on stderr, no traceback (``BYTESCALE_DEBUG=1`` re-raises).
"""

from __future__ import annotations

import argparse
import importlib
import dataclasses
import json
import os
import sys

from bytescale import configs


def _add_train(sub):
  p = sub.add_parser("train", help="train (or resume) a model", description="Train a model; rerunning with the same --out resumes.")
  p.add_argument("--model", default="bytelm", help="model family (bytelm, ...); default bytelm")
  p.add_argument("--preset", default="tiny", help="named size preset of the model; default tiny")
  p.add_argument("--data", default="stdlib", help="a file, directory, glob, 'stdlib' (the default corpus: this Python's "
                 "standard library .py files) or tfds:NAME[/CONFIG]:FEATURE")
  p.add_argument("--tfds-data-dir", default=None, help="data_dir for tfds: sources")
  p.add_argument("--max-data-bytes", type=int, default=None, help="read at most this many corpus bytes")
  p.add_argument("--steps", type=int, default=None, help="training steps (default: the train config's, 200)")
  p.add_argument("--seconds", type=float, default=None, help="stop after this many seconds of training (then save)")
  p.add_argument("--batch-size", type=int, default=None, help="rows per batch (default 8)")
  p.add_argument("--seq-len", type=int, default=None, help="bytes per row (default 256)")
  p.add_argument("--lr", type=float, default=None, help="peak learning rate (default 3e-3)")
  p.add_argument("--out", default="runs/default", help="run directory: checkpoints, metrics.jsonl; reused to resume")
  p.add_argument("--seed", type=int, default=0, help="seed for parameters and data order")
  p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                 help="override a model-config field (dotted path or unique name, e.g. num_layers=4 or "
                 "stack.window=64); train-config fields work too (e.g. warmup_steps=10)")
  p.add_argument("--sample-bytes", type=int, default=0, help="after training, sample this many bytes and report them")
  p.add_argument("--prompt", default="", help="prompt for the sample after training")
  p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _add_eval(sub):
  p = sub.add_parser("eval", help="bits per byte of a checkpoint on a file or corpus")
  p.add_argument("--ckpt", required=True, help="run directory (or its checkpoints/ folder)")
  p.add_argument("--data", required=True, help="file, directory, glob, 'stdlib' or tfds:NAME:FEATURE (every byte is scored)")
  p.add_argument("--tfds-data-dir", default=None)
  p.add_argument("--max-bytes", type=int, default=None, help="score at most this many bytes")
  p.add_argument("--seq-len", type=int, default=None, help="row length (default: the training seq_len)")
  p.add_argument("--batch-size", type=int, default=8)


def _add_generate(sub):
  p = sub.add_parser("generate", help="sample bytes from a checkpoint")
  p.add_argument("--ckpt", required=True, help="run directory (or its checkpoints/ folder)")
  p.add_argument("--prompt", default="", help="text the sample continues")
  p.add_argument("--max-bytes", type=int, default=256, help="bytes to generate")
  p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
  p.add_argument("--top-k", type=int, default=None)
  p.add_argument("--top-p", type=float, default=None)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--json", action="store_true", help="print one JSON line instead of the raw text")


# Modules that add their own subcommands: each defines ``add_command(subparsers) -> (name, handler)``.
PLUGIN_COMMANDS = ("bytescale.rope_search", "bytescale.flops")


def build_parser():
  parser = argparse.ArgumentParser(prog="bytescale", description=__doc__.split("\n")[0])
  sub = parser.add_subparsers(dest="command", required=True)
  _add_train(sub)
  _add_eval(sub)
  _add_generate(sub)
  for module_name in PLUGIN_COMMANDS:
    try:
      module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
      if error.name != module_name:
        raise
      continue
    name, handler = module.add_command(sub)
    COMMANDS[name] = handler
  return parser


def _apply_overrides(model_config, train_config, assignments):
  for assignment in assignments:
    if "=" not in assignment:
      raise configs.ConfigError(f"--set {assignment}: expected FIELD=VALUE")
    key, value = assignment.split("=", 1)
    try:
      model_config = configs.replace_path(model_config, key, value)
    except configs.ConfigError as model_error:
      if "is not a field" not in str(model_error):
        raise
      try:
        train_config = configs.replace_path(train_config, key, value)
      except configs.ConfigError:
        raise model_error from None
  return model_config, train_config


def cmd_train(args):
  from bytescale.data.pipeline import DataConfig
  from bytescale.train.loop import train

  model_config = configs.get_preset(args.model, args.preset)
  train_config = configs.TrainConfig(seed=args.seed)
  updates = {"steps": args.steps, "batch_size": args.batch_size, "seq_len": args.seq_len,
             "learning_rate": args.lr, "max_seconds": args.seconds}
  train_config = dataclasses.replace(train_config, **{k: v for k, v in updates.items() if v is not None})
  model_config, train_config = _apply_overrides(model_config, train_config, args.set)
  data_config = DataConfig(
      source=args.data, seq_len=train_config.seq_len, batch_size=train_config.batch_size, seed=args.seed,
      max_bytes=args.max_data_bytes, tfds_data_dir=args.tfds_data_dir,
  )
  result = train(model_config, train_config, data_config, args.out, preset=args.preset, progress=not args.no_progress)
  summary = dict(result.summary)
  if args.sample_bytes:
    from bytescale.generate import SamplingConfig, generate

    sample = generate(result.model, [args.prompt.encode()], args.sample_bytes, sampling=SamplingConfig(temperature=0.8), seed=args.seed)[0]
    summary["sample"] = sample.decode("utf-8", errors="replace")
    print(f"--- sample ---\n{args.prompt}{summary['sample']}\n--------------", file=sys.stderr)
  print(json.dumps(summary))


def cmd_eval(args):
  from bytescale.data.pipeline import frame_documents
  from bytescale.data.sources import load_documents
  from bytescale.train.checkpoint import load_model
  from bytescale.train.evaluate import evaluate_bpb
  from flax import nnx

  model, meta = load_model(args.ckpt)
  seq_len = args.seq_len or meta["train_config"]["seq_len"]
  documents = load_documents(args.data, max_bytes=args.max_bytes, data_dir=args.tfds_data_dir)
  tokens = frame_documents(documents)
  graphdef, params, frozen = nnx.split(model, nnx.Param, ...)
  bpb, count = evaluate_bpb(graphdef, params, tokens, frozen=frozen, seq_len=seq_len, batch_size=args.batch_size)
  print(json.dumps({"bpb": round(bpb, 5), "bytes": count, "checkpoint_step": meta["step"], "model": meta["model"]}))


def cmd_generate(args):
  from bytescale.generate import SamplingConfig, generate
  from bytescale.train.checkpoint import load_model

  model, meta = load_model(args.ckpt)
  sampling = SamplingConfig(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
  text = generate(model, [args.prompt.encode()], args.max_bytes, sampling=sampling, seed=args.seed)[0]
  if args.json:
    print(json.dumps({"prompt": args.prompt, "text": text.decode("utf-8", errors="replace"), "bytes": len(text),
                      "model": meta["model"], "checkpoint_step": meta["step"]}))
  else:
    sys.stdout.write(args.prompt + text.decode("utf-8", errors="replace") + "\n")


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "generate": cmd_generate}


def main(argv=None):
  args = build_parser().parse_args(argv)
  from bytescale.data.sources import DataError

  try:
    COMMANDS[args.command](args)
  except (configs.ConfigError, DataError, FileNotFoundError, ValueError) as error:
    if os.environ.get("BYTESCALE_DEBUG"):
      raise
    message = str(error).splitlines()[0] if str(error) else type(error).__name__
    print(f"bytescale {args.command}: error: {message}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
