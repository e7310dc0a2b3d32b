"""``bytescale rope-extend``: LongRoPE's progressive extension of a checkpoint (search -> fine-tune -> search at the
next length -> ... -> short-factor re-search), written as ONE rope_scaling file holding the factor sets and the
lengths they serve (``bytescale.rope_search.progressive_extension`` is the pipeline itself)."""

from __future__ import annotations

import json
import os
import time

from bytescale import configs
from bytescale.commands.rope_search import add_held_out_data_arguments, add_search_arguments, search_config
from bytescale.data.pipeline import ByteCorpus, DataConfig
from bytescale.data.sources import load_documents
from bytescale.rope_search import ExtensionStage, progressive_extension


def add_command(subparsers):
  p = subparsers.add_parser(
      "rope-extend", help="progressive LongRoPE extension: search, fine-tune, search longer, ..., re-search short",
      description="LongRoPE's progressive extension (arXiv 2402.13753, section 3.3): for each --lengths entry, search "
      "a factor set at that length on the current model, then fine-tune at it (a new run warm-started from the "
      "previous one, as `bytescale train --init-from`); finally re-search short factor sets at --short-lengths so "
      "short inputs recover. Writes one rope_scaling JSON holding the factor sets the final weights are served with "
      "(short sets, then the last fine-tuned stage's and later ones) and the lengths each serves, plus the record of "
      "every stage's set; load it onto the final run's model with rope.apply_rope_scaling.",
  )
  p.add_argument("--ckpt", required=True, help="run directory of the model to extend (or its checkpoints/ folder)")
  p.add_argument("--data", required=True, help="file, directory, glob, 'stdlib' or tfds:NAME:FEATURE: fine-tunes "
                 "train on its train split; searches score windows of its held-out tail (--val-fraction)")
  p.add_argument("--lengths", required=True, help="comma-separated stage lengths in bytes, increasing, all above L "
                 "(e.g. 256,1024,4096)")
  p.add_argument("--steps", default="200", help="fine-tune steps per stage: one value for all, or one per stage; 0 = "
                 "search only (default 200)")
  p.add_argument("--batch-size", default="4", help="fine-tune rows per step: one value, or one per stage (default 4)")
  p.add_argument("--short-lengths", default=None, help="comma-separated lengths of the short re-search, below the "
                 "first stage (default L,2L; the paper: 4k and 8k for L = 4k)")
  p.add_argument("--lr", type=float, default=1e-3, help="fine-tune peak learning rate (default 1e-3)")
  p.add_argument("--warmup-steps", type=int, default=None, help="fine-tune warmup steps (default: a tenth of the "
                 "shortest stage's steps)")
  p.add_argument("--stack", default=None, help="rope path of the stack to extend (needed when the model has several)")
  p.add_argument("--original-length", type=int, default=None, help="L (default: the rope's "
                 "original_max_position_embeddings, else the training seq_len)")
  add_search_arguments(p)
  p.add_argument("--windows", type=int, default=8, help="held-out windows of the last stage's length scored per "
                 "candidate; shorter searches score as many bytes (default 8)")
  p.add_argument("--eval-batch-size", type=int, default=4, help="windows per scoring forward pass (default 4)")
  add_held_out_data_arguments(p)
  p.add_argument("--out", required=True, help="new directory: stage_<length>/ fine-tune runs and rope_scaling.json")
  p.add_argument("--no-progress", action="store_true", help="no progress bars")
  return "rope-extend", cmd_rope_extend


def int_list(text: str, flag: str) -> list[int]:
  try:
    values = [int(v) for v in text.split(",") if v.strip()]
  except ValueError:
    raise ValueError(f"{flag}: expected comma-separated integers, got {text!r}") from None
  if not values:
    raise ValueError(f"{flag}: expected at least one integer, got {text!r}")
  return values


def per_stage(text: str, flag: str, stages: int) -> list[int]:
  values = int_list(text, flag)
  if len(values) == 1:
    return values * stages
  if len(values) != stages:
    raise ValueError(f"{flag}: give one value or one per stage ({stages}), got {len(values)}")
  return values


def cmd_rope_extend(args):
  started = time.perf_counter()
  lengths = int_list(args.lengths, "--lengths")
  steps = per_stage(args.steps, "--steps", len(lengths))
  batches = per_stage(args.batch_size, "--batch-size", len(lengths))
  stages = [ExtensionStage(n, s, b) for n, s, b in zip(lengths, steps, batches)]
  short = int_list(args.short_lengths, "--short-lengths") if args.short_lengths else None
  if os.path.exists(os.path.join(args.out, "rope_scaling.json")):
    raise ValueError(f"--out: {args.out} already holds a rope-extend result; use a new directory")
  search = search_config(args)
  # The fine-tunes' optimiser settings (steps, batch, length and init_from come from each stage).
  warmup = args.warmup_steps
  if warmup is None:
    warmup = max(1, min([s.steps for s in stages if s.steps] or [10]) // 10)
  train_config = configs.TrainConfig(learning_rate=args.lr, warmup_steps=warmup, seed=args.seed, checkpoint_every=0,
                                     eval_batches=2)
  documents = load_documents(args.data, max_bytes=args.max_data_bytes, data_dir=args.tfds_data_dir)
  corpus = ByteCorpus.from_documents(documents, DataConfig(source=args.data, seq_len=max(lengths),
                                                           val_fraction=args.val_fraction), name=args.data)
  result = progressive_extension(
      args.ckpt, corpus, stages=stages, short_lengths=short, out_dir=args.out, train_config=train_config,
      original_length=args.original_length, rope_path=args.stack, search=search, windows=args.windows,
      batch_size=args.eval_batch_size, progress=not args.no_progress)
  out = os.path.join(args.out, "rope_scaling.json")
  os.makedirs(args.out, exist_ok=True)
  content = result.rope_scaling()
  with open(out, "w") as handle:
    json.dump(content, handle, indent=1)
  print(json.dumps({
      "out": out, "final_run": result.final_run, "rope_path": result.rope_path,
      "original_length": result.original_length, "serves": content["bytescale_progressive"]["serves"],
      "stages": [{k: v for k, v in r.summary().items() if k != "seed_bpb"} for r in result.stages],
      "short": [{k: v for k, v in r.summary().items() if k != "seed_bpb"} for r in result.short],
      "seconds": round(time.perf_counter() - started, 1),
  }))
