"""``bytescale rope-search``: LongRoPE rescale factors for a longer context, searched on a checkpoint
(``bytescale.rope_search`` is the search itself)."""

from __future__ import annotations

import json
import os
import time

from bytescale.data.pipeline import frame_documents, split_stream
from bytescale.data.sources import load_documents
from bytescale.ops import rope
from bytescale.rope_search import SearchConfig, held_out_windows, search_longrope
from bytescale.train.checkpoint import load_model


def add_command(subparsers):
  p = subparsers.add_parser(
      "rope-search", help="search LongRoPE rescale factors for a longer context (no training)",
      description="Evolutionary search of LongRoPE per-dimension rescale factors of a checkpoint, fitness = bits "
      "per byte on held-out windows of the target length; writes a loadable rope_scaling JSON file.",
  )
  p.add_argument("--ckpt", required=True, help="run directory (or its checkpoints/ folder)")
  p.add_argument("--data", required=True, help="file, directory, glob, 'stdlib' or tfds:NAME:FEATURE; windows come "
                 "from its held-out tail (--val-fraction), each window scored as one document")
  p.add_argument("--target-length", type=int, required=True, help="context length to extend to, in bytes")
  p.add_argument("--stack", default=None, help="rope path of the stack to extend (e.g. stack.rope, global_stack); "
                 "needed when the model has several")
  p.add_argument("--original-length", type=int, default=None, help="L in the stack's positions (default: the "
                 "rope's original_max_position_embeddings, else the training seq_len; give patches for a stack "
                 "over patches)")
  p.add_argument("--factor", type=float, default=None, help="extension factor s (default target-length / "
                 "training seq_len)")
  p.add_argument("--population", type=int, default=64, help="candidates kept per iteration (default 64)")
  p.add_argument("--iterations", type=int, default=40, help="search iterations (default 40)")
  p.add_argument("--mutations", type=int, default=16, help="mutated children per iteration (default 16)")
  p.add_argument("--crossovers", type=int, default=16, help="crossover children per iteration (default 16)")
  p.add_argument("--mutation-rate", type=float, default=0.3,
                 help="chance that each dimension is resampled in a mutation (default 0.3)")
  p.add_argument("--max-factor", type=float, default=None, help="largest factor allowed (default 2 * factor)")
  p.add_argument("--search-n-hat", action="store_true", help="also search n_hat, the leading unscaled positions")
  p.add_argument("--attention-factor", type=float, default=None, help="cos/sin scale (default LongRoPE's "
                 "sqrt(1 + ln s / ln L))")
  p.add_argument("--windows", type=int, default=8, help="held-out windows scored per candidate")
  p.add_argument("--batch-size", type=int, default=4, help="windows per forward pass (default 4)")
  p.add_argument("--val-fraction", type=float, default=0.1, help="held-out share at the end of the data")
  p.add_argument("--max-data-bytes", type=int, default=None, help="read at most this many corpus bytes")
  p.add_argument("--tfds-data-dir", default=None, help="data_dir for tfds: sources")
  p.add_argument("--seed", type=int, default=0, help="search seed (default 0)")
  p.add_argument("--out", default=None, help="output JSON (default <ckpt>/rope_search/longrope_<target>.json)")
  p.add_argument("--no-progress", action="store_true", help="no progress bar")
  return "rope-search", cmd_rope_search


def cmd_rope_search(args):
  started = time.perf_counter()
  if args.target_length < 2:
    raise ValueError(f"--target-length: must be >= 2, got {args.target_length}")
  model, meta = load_model(args.ckpt)
  train_seq_len = meta["train_config"]["seq_len"]
  rope_path = args.stack
  if rope_path is None:
    paths = rope.rope_paths(model.config)
    if len(paths) != 1:
      raise ValueError(f"--stack: the model has several rope stacks {paths}; pick one")
    rope_path = paths[0]
  current = rope.get_rope(model.config, rope_path)
  original_length = args.original_length or current.original_max_position_embeddings or train_seq_len
  factor = args.factor if args.factor is not None else max(1.0, args.target_length / train_seq_len)
  documents = load_documents(args.data, max_bytes=args.max_data_bytes, data_dir=args.tfds_data_dir)
  _, held_out = split_stream(frame_documents(documents), args.val_fraction)
  windows = held_out_windows(held_out, args.target_length, args.windows)
  search = SearchConfig(population=args.population, iterations=args.iterations, mutations=args.mutations,
                        crossovers=args.crossovers, mutation_rate=args.mutation_rate, max_factor=args.max_factor,
                        search_n_hat=args.search_n_hat, seed=args.seed)
  found = search_longrope(model, windows, target_length=args.target_length, original_length=original_length,
                          rope_path=rope_path, factor=factor, search=search, batch_size=args.batch_size,
                          attention_factor=args.attention_factor, progress=not args.no_progress)
  out = args.out or os.path.join(os.path.abspath(args.ckpt), "rope_search", f"longrope_{args.target_length}.json")
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  with open(out, "w") as handle:
    json.dump(found.rope_scaling(), handle, indent=1)
  result = found.result
  print(json.dumps({
      "out": out, "rope_path": found.rope_path, "searched": found.searched, "target_length": args.target_length,
      "original_length": original_length, "factor": factor, "bpb": round(result.fitness, 5),
      "seed_bpb": {k: round(v, 5) for k, v in result.seed_fitness.items()}, "n_hat": result.n_hat,
      "evaluations": result.evaluations, "windows": len(windows), "checkpoint_step": meta["step"],
      "seconds": round(time.perf_counter() - started, 1),
  }))
