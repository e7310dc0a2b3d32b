"""``bytescale rope-search``: LongRoPE rescale factors for a longer context, searched on a checkpoint
(``bytescale.rope_search`` is the search itself)."""

from __future__ import annotations

import argparse
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
  p.add_argument("--factor", type=float, default=None, help="extension factor s of the attention scale (default: "
                 "target-length / training seq_len; a short search on a LongRoPE stack keeps its factor, so the long "
                 "regime keeps its scale; for a LongRoPE stack, target-length / L)")
  add_search_arguments(p)
  p.add_argument("--attention-factor", type=float, default=None, help="cos/sin scale (default LongRoPE's "
                 "sqrt(1 + ln s / ln L))")
  p.add_argument("--windows", type=int, default=8, help="held-out windows scored per candidate")
  p.add_argument("--batch-size", type=int, default=4, help="windows per forward pass (default 4)")
  add_held_out_data_arguments(p)
  p.add_argument("--out", default=None, help="output JSON (default <ckpt>/rope_search/longrope_<target>.json)")
  p.add_argument("--no-progress", action="store_true", help="no progress bar")
  return "rope-search", cmd_rope_search


def add_held_out_data_arguments(p):
  """The data flags of the rope commands: the corpus' held-out tail scores the candidates."""
  p.add_argument("--val-fraction", type=float, default=0.1, help="held-out share at the end of the data")
  p.add_argument("--max-data-bytes", type=int, default=None, help="read at most this many corpus bytes")
  p.add_argument("--tfds-data-dir", default=None, help="data_dir for tfds: sources")


def add_search_arguments(p):
  """The evolutionary search's flags (``SearchConfig``), with the LongRoPE paper's defaults."""
  defaults = SearchConfig()
  p.add_argument("--population", type=int, default=defaults.population,
                 help=f"candidates kept per iteration, P (default {defaults.population}, the paper's)")
  p.add_argument("--iterations", type=int, default=defaults.iterations,
                 help=f"search iterations, T (default {defaults.iterations})")
  p.add_argument("--mutations", type=int, default=defaults.mutations,
                 help=f"mutated children per iteration, N1 (default {defaults.mutations})")
  p.add_argument("--crossovers", type=int, default=defaults.crossovers,
                 help=f"crossover children per iteration, N2 (default {defaults.crossovers}); parents: the best "
                 "population - mutations - crossovers")
  p.add_argument("--mutation-rate", type=float, default=defaults.mutation_rate,
                 help=f"chance that each dimension is resampled in a mutation, p (default {defaults.mutation_rate})")
  p.add_argument("--max-factor", type=float, default=None,
                 help="largest factor allowed (default 1.25 s, the paper's bound; s of the searched length)")
  p.add_argument("--search-n-hat", action=argparse.BooleanOptionalAction, default=defaults.search_n_hat,
                 help="search n_hat, the leading unscaled positions, over the paper's {0, 1, 2, 4, 8, 12, ..., 32, 64, "
                 "128, 256} below L (default on; --no-search-n-hat keeps n_hat 0)")
  p.add_argument("--seed", type=int, default=0, help="search seed (default 0)")


def search_config(args) -> SearchConfig:
  return SearchConfig(population=args.population, iterations=args.iterations, mutations=args.mutations,
                      crossovers=args.crossovers, mutation_rate=args.mutation_rate, max_factor=args.max_factor,
                      search_n_hat=args.search_n_hat, seed=args.seed)


def cmd_rope_search(args):
  started = time.perf_counter()
  if args.target_length < 2:
    raise ValueError(f"--target-length: must be >= 2, got {args.target_length}")
  search = search_config(args)  # bad search flags fail before anything is loaded
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
  factor = args.factor
  if factor is None and current.rope_type != "longrope":  # bytes / bytes, also for a stack over patches
    factor = max(1.0, args.target_length / train_seq_len)
  documents = load_documents(args.data, max_bytes=args.max_data_bytes, data_dir=args.tfds_data_dir)
  _, held_out = split_stream(frame_documents(documents), args.val_fraction)
  windows = held_out_windows(held_out, args.target_length, args.windows)
  found = search_longrope(model, windows, target_length=args.target_length, original_length=original_length,
                          rope_path=rope_path, factor=factor, search=search, batch_size=args.batch_size,
                          attention_factor=args.attention_factor, progress=not args.no_progress)
  factor = found.rope_config.factor
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
