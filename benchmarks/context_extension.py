"""Context extension of a small ByteLM: bits per byte at L, 4L and 8L for every rope method, before and after a
short fine-tune. Writes ``benchmarks/RESULTS_rope.md``.

    python benchmarks/context_extension.py --quick        # a few minutes on a 2-core CPU
    python benchmarks/context_extension.py                # larger model, longer training and search

1. Train a ByteLM at context L with ``bytescale.train.loop.train`` (default rope).
2. For each extension factor s (8 with --quick, 4 and 8 otherwise) and each method -- none (as trained), PI,
   NTK, dynamic NTK, YaRN, and LongRoPE with factors searched at length sL (``bytescale.rope_search``) --
   rebuild the model with that stack rope (same parameters) and score held-out windows at L, 4L and 8L.
3. Fine-tune each a few steps at length sL with the same data and score again.

The search scores windows from the first half of the held-out tail, the table the second half, so LongRoPE is not
scored on the text it was searched on. Every method is scored on the same windows (the same number of tokens at
every length), one after the other in one run. Bits per byte here count every predicted id (no BOS/EOS in the
windows: the corpus is one document).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time

import jax
from flax import nnx

from bytescale import configs, rope_search
from common import DEFAULT_CORPUS, write_section  # noqa: E402
from bytescale.configs import ByteLMConfig, TransformerConfig
from bytescale.data.pipeline import ByteCorpus, DataConfig, frame_documents, split_stream
from bytescale.data.sources import load_documents
from bytescale.ops import rope
from bytescale.train.loop import train

METHODS = ("none", "pi", "ntk", "dynamic", "yarn", "longrope")
SECTION = "Bits per byte at L, 4L, 8L, before and after a short fine-tune (`benchmarks/context_extension.py`)"
def settings_for(quick: bool) -> dict:
  if quick:
    return dict(length=64, d_model=64, layers=2, heads=4, head_dim=16, train_steps=600, batch=16, lr=3e-3,
                eval_tokens=4096, ft_steps=40, ft_batch=4, ft_lr=1e-3,
                population=16, iterations=8, mutations=4, crossovers=4, search_windows=8, factors=(8,))
  return dict(length=128, d_model=128, layers=4, heads=4, head_dim=32, train_steps=3000, batch=16, lr=3e-3,
              eval_tokens=16384, ft_steps=200, ft_batch=4, ft_lr=1e-3,
              population=32, iterations=20, mutations=8, crossovers=8, search_windows=16, factors=(4, 8))


def log(message):
  print(message, file=sys.stderr, flush=True)


def fine_tune(model_config, init_from: str, seq_len: int, corpus: ByteCorpus, out_dir: str, *, steps: int, batch: int,
              lr: float, seed: int = 0):
  """A few AdamW steps at ``seq_len`` of ``model_config`` (e.g. another rope), warm-started from the parameters of
  the run in ``init_from`` (fresh optimizer state, step 0, fresh data order). ``out_dir`` must be new."""
  tc = configs.TrainConfig(steps=steps, batch_size=batch, seq_len=seq_len, learning_rate=lr,
                           warmup_steps=max(1, steps // 10), seed=seed, checkpoint_every=0, eval_batches=1,
                           init_from=init_from)
  data_config = DataConfig(source=corpus.name, seq_len=seq_len, batch_size=batch, seed=seed)
  return train(model_config, tc, data_config, out_dir, corpus=corpus, progress=False).model


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true", help="small model, short runs: a few minutes on a CPU")
  parser.add_argument("--data", default=DEFAULT_CORPUS if os.path.exists(DEFAULT_CORPUS) else "stdlib",
                      help=f"corpus (default {DEFAULT_CORPUS}, else stdlib)")
  parser.add_argument("--max-data-bytes", type=int, default=2_000_000)
  parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS_rope.md"))
  parser.add_argument("--work", default=None, help="run directory (default: a temporary one)")
  args = parser.parse_args()
  args.load_at_start = " ".join(open("/proc/loadavg").read().split()[:3])
  s = settings_for(args.quick)
  started = time.perf_counter()
  work = args.work or tempfile.mkdtemp(prefix="bytescale_rope_")
  length = s["length"]
  eval_lengths = (length, 4 * length, 8 * length)

  documents = load_documents(args.data, max_bytes=args.max_data_bytes)
  data_config = DataConfig(source=args.data, seq_len=length, batch_size=s["batch"], max_bytes=args.max_data_bytes)
  corpus = ByteCorpus.from_documents(documents, data_config, name=args.data)
  _, held_out = split_stream(frame_documents(documents), data_config.val_fraction)
  search_part, table_part = held_out[: len(held_out) // 2], held_out[len(held_out) // 2:]
  windows = {n: rope_search.held_out_windows(table_part, n, max(1, s["eval_tokens"] // n)) for n in eval_lengths}

  # 1. The base model, trained at L.
  model_config = ByteLMConfig(stack=TransformerConfig(
      d_model=s["d_model"], num_layers=s["layers"], num_heads=s["heads"], num_kv_heads=s["heads"],
      head_dim=s["head_dim"], mlp_hidden=configs.swiglu_hidden(s["d_model"])), max_seq_len=length)
  train_config = configs.TrainConfig(steps=s["train_steps"], batch_size=s["batch"], seq_len=length,
                                     learning_rate=s["lr"], checkpoint_every=0, log_every=50)
  tick = time.perf_counter()
  base_dir = os.path.join(work, "base")
  result = train(model_config, train_config, data_config, base_dir, corpus=corpus, progress=False)
  log(f"trained at L={length}: {json.dumps(result.summary)} ({time.perf_counter() - tick:.0f}s)")
  base_model = result.model
  base_rope = base_model.config.stack.rope
  rotary_dim = rope.rotary_dim_for(base_rope, s["head_dim"])

  rows, searches = [], {}
  for factor in s["factors"]:
    target = factor * length
    method_configs = rope_search.extension_configs(base_rope, length, float(factor))
    tick = time.perf_counter()
    search_windows = rope_search.held_out_windows(search_part, target, s["search_windows"])
    found = rope_search.search_longrope(
        base_model, search_windows, target_length=target, original_length=length, factor=float(factor),
        search=rope_search.SearchConfig(population=s["population"], iterations=s["iterations"],
                                        mutations=s["mutations"], crossovers=s["crossovers"], search_n_hat=True),
        batch_size=4, progress=False)
    method_configs["longrope"] = found.rope_config
    searches[factor] = (found, time.perf_counter() - tick)
    log(f"s={factor}: LongRoPE search {found.result.evaluations} candidates, best {found.result.fitness:.4f} "
        f"(seeds {found.result.seed_fitness}) in {time.perf_counter() - tick:.0f}s")
    for method in METHODS:  # each contender scored on the same windows, one after the other
      method_config = rope.replace_rope(base_model.config, method_configs[method])
      model = rope_search.rebuild_with_config(base_model, method_config)
      score = rope_search.bits_per_byte_fn(model)
      before = {n: score(windows[n]) for n in eval_lengths}
      # A fresh run directory per fine-tune: one that already held checkpoints would resume instead.
      ft_dir = tempfile.mkdtemp(prefix=f"ft_s{factor}_{method}_", dir=work)
      tuned = fine_tune(method_config, base_dir, target, corpus, ft_dir, steps=s["ft_steps"], batch=s["ft_batch"],
                        lr=s["ft_lr"])
      after = {n: score(windows[n], nnx.state(tuned)) for n in eval_lengths}  # same graph: no recompile
      rows.append((factor, method, before, after))
      log(f"s={factor} {method:9s} " + " ".join(f"{before[n]:.3f}/{after[n]:.3f}" for n in eval_lengths))

  write_results(args, s, rows, searches, eval_lengths, windows, rotary_dim, time.perf_counter() - started)


def cpu_model() -> str:
  return next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")


def write_results(args, s, rows, searches, eval_lengths, windows, rotary_dim, seconds):
  length = s["length"]
  names = ["L", "4L", "8L"]
  lines = [
      f"- command: `python benchmarks/context_extension.py{' --quick' if args.quick else ''}`"
      f" (data `{os.path.basename(args.data)}`, first {args.max_data_bytes:,} bytes)",
      f"- machine: {cpu_model()}, {os.cpu_count()} cores ({platform.platform()}), load average at start "
      f"{args.load_at_start}; jax {jax.__version__}; {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}; "
      f"total {seconds / 60:.1f} min",
      f"- model: ByteLM d_model {s['d_model']}, {s['layers']} layers, {s['heads']} heads of {s['head_dim']} "
      f"(rotary dim {rotary_dim}, rope_theta 10000), trained {s['train_steps']} steps x {s['batch']} rows at "
      f"L = {length} bytes with `bytescale.train.loop.train`",
      f"- scored: held-out windows (second half of the last 10% of the corpus), "
      f"{', '.join(f'{len(windows[n])} x {n}' for n in eval_lengths)} bytes; each window one sequence from "
      f"position 0",
      f"- fine-tune: {s['ft_steps']} AdamW steps x {s['ft_batch']} rows of sL bytes, peak lr {s['ft_lr']}, "
      f"from the trained parameters (`train(..., init_from=<base run>)`)",
      f"- LongRoPE: evolutionary search at length sL (population {s['population']}, {s['iterations']} iterations, "
      f"{s['mutations']} mutations + {s['crossovers']} crossovers each, factors in [1, 1.25 s], n_hat searched "
      f"over the paper's set below L) on "
      f"{s['search_windows']} windows from the first half of the held-out tail (not the scored windows)",
      "- dynamic is plain dynamic NTK (factor 1: scale max(1, n/L)); none keeps the trained rotation",
      "",
      "| s | method | no FT: L | 4L | 8L | fine-tuned at sL: L | 4L | 8L |",
      "|---|--------|---------:|---:|---:|--------------------:|---:|---:|",
  ]
  for factor, method, before, after in rows:
    best = lambda n, which: min(r[which][n] for r in rows if r[0] == factor)  # noqa: E731
    cell = lambda value, n, which: f"**{value:.3f}**" if value == best(n, which) else f"{value:.3f}"  # noqa: E731
    lines.append(f"| {factor} | {method} | " + " | ".join(cell(before[n], n, 2) for n in eval_lengths) + " | "
                 + " | ".join(cell(after[n], n, 3) for n in eval_lengths) + " |")
  columns = f"{', '.join(names)} = {', '.join(map(str, eval_lengths))} bytes"
  lines += ["", f"Bold: best of its column for that s. Columns {columns}.", "", "LongRoPE searches:", ""]
  for factor, (found, took) in searches.items():
    r = found.result
    lines.append(f"- s = {factor}: best {r.fitness:.4f} bpb on the search windows after {r.evaluations} candidates "
                 f"({took:.0f}s); seeds {', '.join(f'{k} {v:.4f}' for k, v in r.seed_fitness.items())}; "
                 f"n_hat {r.n_hat}; long_factor {list(r.factors)}")
  if not os.path.exists(args.out):
    with open(args.out, "w") as handle:
      handle.write("# Rotary context extension\n")
  # A section of its own: benchmarks/rope_progressive.py writes another one into the same file.
  write_section(args.out, SECTION, "\n".join(lines))
  print("\n".join(lines))


if __name__ == "__main__":
  main()
