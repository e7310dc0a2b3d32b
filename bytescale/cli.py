"""``bytescale train | eval | generate``: the command-line contract other work and benchmarks script against.

Progress goes to stderr; each command ends with ONE JSON line on stdout (``generate`` prints the text unless
``--json``). Bad input exits with status 2 and one line on stderr, no traceback (``BYTESCALE_DEBUG=1`` re-raises).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

from bytescale import configs


def _add_train(sub):
  p = sub.add_parser("train", help="train (or resume) a model",
                     description="Train a model; rerunning with the same --out resumes.")
  p.add_argument("--model", default="bytelm", help="model family (bytelm, ...); default bytelm")
  p.add_argument("--preset", default="tiny", help="named size preset of the model; default tiny")
  p.add_argument("--data", default="stdlib", help="a file, directory, glob, 'stdlib' (the default corpus: this "
                 "Python's standard library .py files) or tfds:NAME[/CONFIG]:FEATURE")
  p.add_argument("--tfds-data-dir", default=None, help="data_dir for tfds: sources")
  p.add_argument("--max-data-bytes", type=int, default=None, help="read at most this many corpus bytes")
  p.add_argument("--steps", type=int, default=None, help="training steps (default: the train config's, 200)")
  p.add_argument("--seconds", type=float, default=None, help="stop after this many seconds of training (then save)")
  p.add_argument("--batch-size", type=int, default=None, help="rows per batch (default 8)")
  p.add_argument("--seq-len", type=int, default=None, help="bytes per row (default 256)")
  p.add_argument("--lr", type=float, default=None, help="peak learning rate (default 3e-3)")
  p.add_argument("--out", default="runs/default", help="run directory: checkpoints, metrics.jsonl; reused to resume")
  p.add_argument("--seed", type=int, default=0, help="seed for parameters and data order")
  p.add_argument("--init-from", default=None, metavar="DIR",
                 help="warm start: begin a new run from the parameters of the run (or checkpoint) in DIR, with a "
                 "fresh optimizer and step 0; the model may differ only in shape-preserving fields (e.g. --set "
                 "rope_type=yarn ...); ignored when --out already holds checkpoints (then it resumes)")
  p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                 help="override a model-config field (dotted path or unique name, e.g. num_layers=4 or "
                 "stack.window=64); train-config fields work too (e.g. warmup_steps=10)")
  p.add_argument("--sample-bytes", type=int, default=0, help="after training, sample this many bytes and report them")
  p.add_argument("--prompt", default="", help="prompt for the sample after training")
  p.add_argument("--no-progress", action="store_true", help="no progress bar")
  g = p.add_argument_group("parallelism", "device mesh and multi-host (see docs/sharding.md)")
  g.add_argument("--mesh", default=None, metavar="AXIS=SIZE,...",
                 help="device mesh over axes data, fsdp, tensor, e.g. data=2,fsdp=2,tensor=2 (sizes multiply to the "
                 "device count; one may be -1 = the rest); default data=-1: data parallel over every device")
  g.add_argument("--mesh-axis-types", choices=("auto", "explicit"), default="auto",
                 help="jax.sharding.AxisType of the mesh axes: auto (compiler propagates shardings) or explicit "
                 "(shardings are part of the array types); default auto")
  g.add_argument("--mesh-rule", action="append", default=[], metavar="LOGICAL=AXES",
                 help="override one entry of parallel.LOGICAL_AXIS_RULES, e.g. kv_heads=none or batch=data+fsdp")
  g.add_argument("--distributed", action="store_true",
                 help="call jax.distributed.initialize() with cluster auto-detection (TPU pods, SLURM, Open MPI, "
                 "JAX_COORDINATOR_ADDRESS)")
  g.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                 help="multi-process: address of process 0 (with --num-processes and --process-id)")
  g.add_argument("--num-processes", type=int, default=None, help="multi-process: total number of processes")
  g.add_argument("--process-id", type=int, default=None, help="multi-process: index of this process, from 0")


def _add_eval(sub):
  p = sub.add_parser("eval", help="bits per byte of a checkpoint on a file or corpus, or evaluation suites (--suite)")
  p.add_argument("--ckpt", required=True, help="run directory (or its checkpoints/ folder)")
  p.add_argument("--data", default=None,
                 help="file, directory, glob, 'stdlib' or tfds:NAME:FEATURE (every byte is scored); required without "
                 "--suite; with --suite the text the noise and chars suites draw from (default: the held-out "
                 "validation split of the run's own training data)")
  p.add_argument("--tfds-data-dir", default=None, help="data_dir for tfds: sources")
  p.add_argument("--max-bytes", type=int, default=None, help="score at most this many bytes")
  p.add_argument("--seq-len", type=int, default=None, help="row length (default: the training seq_len)")
  p.add_argument("--batch-size", type=int, default=8, help="rows per evaluation batch (default 8)")
  p.add_argument("--strided", choices=("none", "paper", "average"), default=None,
                 help="MegaByte only: strided inference for this evaluation (two passes, the second offset by half a "
                 "patch; docs/megabyte.md): paper = each byte from the pass in which it sits in the first half of "
                 "its patch (the paper's rule), average = mean probability of both passes, none = one pass; default: "
                 "the checkpoint's setting")
  g = p.add_argument_group("evaluation suites", "noise, chars, passkey, induction (docs/evals.md)")
  g.add_argument("--suite", default=None, metavar="NAME[,NAME...]",
                 help="run these evaluation suites instead of bits per byte: noise, chars, passkey, induction, or all")
  g.add_argument("--seed", type=int, default=0, help="seed of the suites' task generators (default 0)")
  g.add_argument("--examples", type=int, default=None,
                 help="examples per task (default: each suite's: noise 32 windows, chars 24 per kind, passkey 4 per "
                 "length and depth, induction 32 per alphabet and length)")
  g.add_argument("--passkey-lengths", default=None, metavar="N,N,...",
                 help="passkey prompt lengths in bytes (default: half, once and twice --seq-len)")
  g.add_argument("--json", action="store_true", help="print only the JSON line (no table on stderr)")
  g.add_argument("--no-progress", action="store_true", help="no progress bar")


def _add_generate(sub):
  p = sub.add_parser("generate", help="sample bytes from a checkpoint")
  p.add_argument("--ckpt", required=True, help="run directory (or its checkpoints/ folder)")
  p.add_argument("--prompt", default="", help="text the sample continues")
  p.add_argument("--max-bytes", type=int, default=256, help="bytes to generate")
  p.add_argument("--temperature", type=float, default=None, help="0 = greedy (default 1.0; 0 with --speculative)")
  p.add_argument("--top-k", type=int, default=None, help="sample among the k likeliest bytes only")
  p.add_argument("--top-p", type=float, default=None, help="sample from the smallest set of likeliest bytes "
                 "whose probabilities sum to at least p")
  p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
  p.add_argument("--json", action="store_true", help="print one JSON line instead of the raw text")
  p.add_argument("--speculative", action="store_true",
                 help="greedy self-speculative decoding with the checkpoint's multi-token heads (trained with --set "
                 "mtp_heads=N): same bytes as greedy decoding; reports bytes accepted per forward and bytes/s")
  p.add_argument("--compare-greedy", action="store_true",
                 help="with --speculative: also run plain greedy decoding, check the bytes agree, report the speedup")




def build_parser():
  parser = argparse.ArgumentParser(prog="bytescale", description=__doc__.split("\n")[0])
  sub = parser.add_subparsers(dest="command", required=True)
  _add_train(sub)
  _add_eval(sub)
  _add_generate(sub)
  # The other subcommands (bytescale/commands/): each module defines add_command(subparsers) -> (name, handler).
  from bytescale.commands import convert, entropy_threshold, flops, rope_extend, rope_search

  for module in (flops, rope_search, rope_extend, entropy_threshold, convert):
    name, handler = module.add_command(sub)
    COMMANDS[name] = handler
  return parser


def _apply_overrides(model_config, train_config, assignments):
  """``--set`` assignments, each to the model config or else the train config, applied together per config (fields
  valid only together, e.g. ``rope_type=yarn`` and its ``factor``, may come in any order); ``mtp_*`` ones
  (``mtp_heads=N``, ``mtp_variant``, ...) then put multi-token heads on the model (``bytescale.models.mtp``)."""
  from bytescale.models import mtp

  assignments, multi_token = mtp.split_overrides(assignments)
  model_assignments, train_assignments = [], []
  for key, value in assignments:
    try:
      configs.resolve_path(model_config, key)
      model_assignments.append((key, value))
    except configs.ConfigError as model_error:
      if "is not a field" not in str(model_error):
        raise
      try:
        configs.resolve_path(train_config, key)
      except configs.ConfigError:
        raise model_error from None
      train_assignments.append((key, value))
  if model_assignments:
    model_config = configs.replace_paths(model_config, model_assignments)
  if train_assignments:
    train_config = configs.replace_paths(train_config, train_assignments)
  if multi_token:
    model_config = mtp.apply_overrides(model_config, multi_token)
  return model_config, train_config


def cmd_train(args):
  from bytescale import parallel
  from bytescale.data.pipeline import DataConfig
  from bytescale.models import registry
  from bytescale.train.loop import train

  mesh_config = parallel.MeshConfig.parse(args.mesh or "data=-1", axis_types=args.mesh_axis_types, rules=args.mesh_rule)
  # Before anything touches devices: every process then sees the global device list.
  parallel.initialize_distributed(coordinator=args.coordinator, num_processes=args.num_processes,
                                  process_id=args.process_id, auto=args.distributed)
  model_config = registry.get_preset(args.model, args.preset)
  train_config = configs.TrainConfig(seed=args.seed)
  updates = {"steps": args.steps, "batch_size": args.batch_size, "seq_len": args.seq_len,
             "learning_rate": args.lr, "max_seconds": args.seconds, "init_from": args.init_from}
  train_config = dataclasses.replace(train_config, **{k: v for k, v in updates.items() if v is not None})
  model_config, train_config = _apply_overrides(model_config, train_config, args.set)
  data_config = DataConfig(
      source=args.data, seq_len=train_config.seq_len, batch_size=train_config.batch_size, seed=args.seed,
      max_bytes=args.max_data_bytes, tfds_data_dir=args.tfds_data_dir,
  )
  result = train(model_config, train_config, data_config, args.out, preset=args.preset, progress=not args.no_progress,
                 mesh_config=mesh_config)
  summary = dict(result.summary)
  if args.sample_bytes:
    from flax import nnx

    from bytescale.generate import SamplingConfig, generate

    # Sampling code is written for whole parameters: replicate them over the mesh first.
    model = nnx.merge(result.graphdef, *parallel.replicate((result.state.params, result.state.frozen), result.mesh))
    sample = generate(model, [args.prompt.encode()], args.sample_bytes, sampling=SamplingConfig(temperature=0.8),
                      seed=args.seed)[0]
    summary["sample"] = sample.decode("utf-8", errors="replace")
    print(f"--- sample ---\n{args.prompt}{summary['sample']}\n--------------", file=sys.stderr)
  print(json.dumps(summary))


def cmd_eval(args):
  from bytescale.data.pipeline import frame_documents
  from bytescale.data.sources import load_documents
  from bytescale.train.checkpoint import load_model
  from bytescale.train.evaluate import evaluate_bpb
  from flax import nnx

  from bytescale.models.megabyte import MegaByte

  if args.data is None and not args.suite:
    raise configs.ConfigError("--data: give the text to score (bits per byte), or --suite NAME to run evaluation "
                              "suites")
  if args.suite:
    from bytescale.evals.suites import parse_suites

    parse_suites(args.suite)  # a misspelt name fails before the checkpoint loads
  model, meta = load_model(args.ckpt)
  report = {}
  if args.strided is not None and not isinstance(model, MegaByte):
    raise configs.ConfigError(f"--strided: strided inference is MegaByte's; {args.ckpt} holds a {meta['model']!r} "
                              "model (drop --strided)")
  if isinstance(model, MegaByte):
    if args.strided is not None:
      model = model.with_strided_inference(args.strided)
    report["strided_inference"] = model.config.strided_inference
  if args.suite:
    return _eval_suites(args, model, meta, report)
  seq_len = args.seq_len or meta["train_config"]["seq_len"]
  documents = load_documents(args.data, max_bytes=args.max_bytes, data_dir=args.tfds_data_dir)
  tokens = frame_documents(documents)
  graphdef, params, frozen = nnx.split(model, nnx.Param, ...)
  bpb, count = evaluate_bpb(graphdef, params, tokens, frozen=frozen, seq_len=seq_len, batch_size=args.batch_size)
  print(json.dumps({"bpb": round(bpb, 5), "bytes": count, "checkpoint_step": meta["step"], "model": meta["model"],
                    **report}))


def _eval_suites(args, model, meta, report):
  """``eval --suite``: ``bytescale.evals`` suites; a table on stderr (unless --json), one JSON line on stdout."""
  from bytescale.data.sources import load_documents
  from bytescale.evals import suites

  names = suites.parse_suites(args.suite)
  if args.seed < 0:
    raise configs.ConfigError(f"--seed must be >= 0, got {args.seed}")
  if args.examples is not None and args.examples < 1:
    raise configs.ConfigError(f"--examples must be >= 1, got {args.examples}")
  overrides = {"seed": args.seed, "examples": args.examples}
  if args.passkey_lengths:
    try:
      overrides["passkey_lengths"] = tuple(int(n) for n in args.passkey_lengths.split(","))
    except ValueError:
      raise configs.ConfigError(f"--passkey-lengths: expected comma-separated byte counts like 256,512, got "
                                f"{args.passkey_lengths!r}") from None
  settings = suites.SuiteSettings.for_seq_len(args.seq_len or meta["train_config"]["seq_len"], **overrides)
  text, source = b"", None
  if set(names) & set(suites.TEXT_SUITES):
    if args.data is not None:
      text = b"\n".join(load_documents(args.data, max_bytes=args.max_bytes, data_dir=args.tfds_data_dir))
      source = args.data
    elif "data_config" in meta:
      text = suites.held_out_text(meta["data_config"])[:args.max_bytes]
      source = f"validation split of {meta['data_config']['source']}"
    else:
      raise configs.ConfigError(f"--data: {args.ckpt} does not record its training data; pass the text to use")
  result = suites.run_suites(model, names, text, settings, batch_size=args.batch_size, progress=not args.no_progress)
  if not args.json:
    for name, suite in result["suites"].items():
      for score, value in suite["scores"].items():
        print(f"{name:10s} {score:28s} {value:9.4f}", file=sys.stderr)
  print(json.dumps({"model": meta["model"], "checkpoint_step": meta["step"], "data": source, **report, **result}))


def cmd_generate(args):
  from bytescale.generate import SamplingConfig, generate
  from bytescale.train.checkpoint import load_model

  if args.speculative:
    if args.temperature not in (None, 0) or args.top_k is not None or args.top_p is not None:
      raise configs.ConfigError("--speculative decodes greedily: drop --temperature/--top-k/--top-p (or use "
                                "--temperature 0)")
  elif args.compare_greedy:
    raise configs.ConfigError("--compare-greedy compares with speculative decoding: add --speculative")
  model, meta = load_model(args.ckpt)
  report = {}
  if args.speculative:
    from bytescale.speculative import greedy_tokens, speculative_generate

    result = speculative_generate(model, [args.prompt.encode()], args.max_bytes)
    text = result.texts[0]
    report = {"speculative": True, "bytes_per_forward": round(result.bytes_per_forward, 3),
              "forwards": int(result.forwards[0]), "bytes_per_s": round(result.bytes_per_second, 1),
              "compile_s": round(result.compile_seconds, 2)}
    if args.compare_greedy:
      tokens, seconds = greedy_tokens(model, [args.prompt.encode()], args.max_bytes)
      report.update(greedy_bytes_per_s=round(tokens.size / seconds, 1),
                    speedup=round(seconds / result.seconds, 3),
                    identical_to_greedy=bool((tokens == result.tokens).all()))
    print(f"speculative: {report['bytes_per_forward']} bytes accepted per forward, {report['bytes_per_s']:,} bytes/s"
          + (f" (greedy {report['greedy_bytes_per_s']:,} bytes/s, speedup {report['speedup']}x, identical: "
             f"{report['identical_to_greedy']})" if args.compare_greedy else ""), file=sys.stderr)
  else:
    temperature = 1.0 if args.temperature is None else args.temperature
    sampling = SamplingConfig(temperature=temperature, top_k=args.top_k, top_p=args.top_p)
    text = generate(model, [args.prompt.encode()], args.max_bytes, sampling=sampling, seed=args.seed)[0]
  if args.json:
    print(json.dumps({"prompt": args.prompt, "text": text.decode("utf-8", errors="replace"), "bytes": len(text),
                      "model": meta["model"], "checkpoint_step": meta["step"], **report}))
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
