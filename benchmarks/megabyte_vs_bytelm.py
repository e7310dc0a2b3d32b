"""MegaByte against the byte-level transformer with the same global width and depth: training throughput and
bits per byte after equal wall time, at sequence lengths 1k, 4k and 8k, side by side in one run.

  python benchmarks/megabyte_vs_bytelm.py --quick     # a few minutes on a 2-core CPU
  python benchmarks/megabyte_vs_bytelm.py             # longer budgets per model

For each length both models are built, compiled and warmed up, then trained in alternating time slices (MegaByte
one slice, ByteLM one slice, ...) until each has trained for the same budget of seconds (compilation and
evaluation excluded). Batches hold the same number of bytes at every length (``--bytes-per-step``). Then both
are scored on the same held-out bytes of the corpus. ByteLM: ``d_model`` D, L layers. MegaByte: global stack
with the same D and L over patches of P bytes (``D_G = D / P``), plus a local stack (``--local-d``,
``--local-layers``). The table goes to ``benchmarks/RESULTS_megabyte.md``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from bytescale.configs import ByteLMConfig, TrainConfig, TransformerConfig  # noqa: E402
from common import DEFAULT_CORPUS  # noqa: E402
from bytescale.data.pipeline import ByteCorpus, DataConfig, train_iterator  # noqa: E402
from bytescale.models import build_model  # noqa: E402
from bytescale.models.megabyte import MegaByteConfig  # noqa: E402
from bytescale.train.evaluate import evaluate_bpb  # noqa: E402
from bytescale.train.state import init_train_state, make_optimizer  # noqa: E402
from bytescale.train.step import make_eval_step, make_train_step  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS_megabyte.md")
BATCH_KEYS = ("inputs", "targets", "segment_ids", "loss_mask")


def machine_line() -> str:
  return (f"{platform.platform()}, {platform.machine()}, {os.cpu_count()} CPUs, jax {jax.__version__} "
          f"({jax.default_backend()}), {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, "
          f"1-minute load average {os.getloadavg()[0]:.1f} when written")


def stack(d: int, layers: int, heads: int) -> TransformerConfig:
  return TransformerConfig(d_model=d, num_layers=layers, num_heads=heads, num_kv_heads=heads, head_dim=d // heads,
                           mlp_hidden=-(-(8 * d // 3) // 32) * 32)


def model_configs(args, seq_len: int):
  global_stack = stack(args.d, args.layers, args.heads)
  bytelm = ByteLMConfig(stack=global_stack, max_seq_len=seq_len)
  megabyte = MegaByteConfig(global_stack=global_stack, local_stack=stack(args.local_d, args.local_layers, args.heads),
                            patch_size=args.patch, max_seq_len=seq_len)
  return {"megabyte": megabyte, "bytelm": bytelm}


class Contender:
  """One model with its jitted train step, its data iterator and its running totals."""

  def __init__(self, name, config, corpus, data_config, train_config):
    self.name = name
    model = build_model(config, seed=train_config.seed)
    optimizer = make_optimizer(train_config)
    self.graphdef, self.state = init_train_state(model, optimizer)
    self.num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(self.state.params))
    self.step = jax.jit(make_train_step(self.graphdef, optimizer), donate_argnums=0)
    self.batches = train_iterator(corpus, data_config)
    self.bytes_per_step = data_config.batch_size * data_config.seq_len
    self.seconds, self.steps, self.loss = 0.0, 0, float("nan")

  def next_batch(self):
    return {k: v for k, v in next(self.batches).items() if k in BATCH_KEYS}

  def warm_up(self):
    start = time.perf_counter()
    self.state, metrics = self.step(self.state, self.next_batch())
    jax.block_until_ready(metrics)
    return time.perf_counter() - start

  def train_for(self, seconds: float):
    """Trains whole steps until ``seconds`` of step time have passed (at least one step)."""
    spent = 0.0
    while spent < seconds:
      batch = self.next_batch()
      start = time.perf_counter()
      self.state, metrics = self.step(self.state, batch)
      self.loss = float(metrics["loss"])  # blocks: the step is done
      spent += time.perf_counter() - start
      self.steps += 1
    self.seconds += spent


def run_length(args, seq_len: int, corpus_cache: dict) -> list[dict]:
  batch = max(1, args.bytes_per_step // seq_len)
  data_config = DataConfig(source=args.data, seq_len=seq_len, batch_size=batch, seed=0, max_bytes=args.max_bytes)
  key = (args.data, args.max_bytes)
  if key not in corpus_cache:
    corpus_cache[key] = ByteCorpus.load(data_config)
  corpus = corpus_cache[key]
  train_config = TrainConfig(steps=10**6, batch_size=batch, seq_len=seq_len, learning_rate=args.lr, warmup_steps=10,
                             min_lr_ratio=1.0, seed=0)
  contenders = [Contender(name, config, corpus, data_config, train_config)
                for name, config in model_configs(args, seq_len).items()]
  for c in contenders:
    compile_seconds = c.warm_up()
    print(f"  T={seq_len} {c.name}: {c.num_params:,} params, compile+first step {compile_seconds:.1f}s",
          file=sys.stderr, flush=True)
  # Alternate slices until both have trained the budget; then the one behind catches up with the other's total,
  # so both end within one step of equal training time even when one step is longer than the budget.
  r = 0
  while min(c.seconds for c in contenders) < args.budget:
    for c in (contenders if r % 2 == 0 else contenders[::-1]):
      if c.seconds < args.budget:
        c.train_for(min(args.slice, args.budget - c.seconds))
    r += 1
  target = max(c.seconds for c in contenders)
  for c in contenders:
    if c.seconds < target:
      c.train_for(target - c.seconds)
  rows = []
  eval_tokens = corpus.validation_tokens[: args.eval_bytes + 1]
  for c in contenders:
    eval_fn = jax.jit(make_eval_step(c.graphdef))
    bpb, count = evaluate_bpb(c.graphdef, c.state.params, eval_tokens, frozen=c.state.frozen, seq_len=seq_len,
                              batch_size=batch, eval_fn=eval_fn)
    rate = c.steps * c.bytes_per_step / c.seconds
    rows.append({"model": c.name, "seq_len": seq_len, "batch": batch, "params": c.num_params, "steps": c.steps,
                 "seconds": c.seconds, "bytes_per_s": rate, "train_loss": c.loss, "val_bpb": bpb, "val_bytes": count})
    print(f"  T={seq_len} {c.name}: {c.steps} steps in {c.seconds:.1f}s = {rate:,.0f} bytes/s, "
          f"val bpb {bpb:.3f} over {count} bytes", file=sys.stderr, flush=True)
  return rows


def table(rows: list[dict]) -> str:
  lines = ["| seq len | model | params | batch | steps | train s | bytes/s | MegaByte/ByteLM bytes/s | val bpb |",
           "|---|---|---|---|---|---|---|---|---|"]
  by_length = {}
  for row in rows:
    by_length.setdefault(row["seq_len"], {})[row["model"]] = row
  for seq_len, pair in by_length.items():
    ratio = pair["megabyte"]["bytes_per_s"] / pair["bytelm"]["bytes_per_s"]
    for name in ("megabyte", "bytelm"):
      row = pair[name]
      shown_ratio = f"{ratio:.2f}x" if name == "megabyte" else ""
      lines.append(f"| {seq_len} | {name} | {row['params']:,} | {row['batch']} | {row['steps']} | "
                   f"{row['seconds']:.1f} | {row['bytes_per_s']:,.0f} | {shown_ratio} | {row['val_bpb']:.3f} |")
  return "\n".join(lines)


def write_results(args, rows, command: str):
  header = ("# MegaByte benchmarks\n\nWritten by `benchmarks/megabyte_vs_bytelm.py` and "
            "`benchmarks/megabyte_vs_pytorch.py`; each replaces its own section.\n")
  text = open(RESULTS).read() if os.path.exists(RESULTS) else header
  title = "## MegaByte vs ByteLM: training throughput and bits per byte after equal wall time"
  body = (
      f"{title}\n\n`{command}` -- {machine_line()}\n\n"
      f"Data: `{args.data}` ({f'first {args.max_bytes}' if args.max_bytes else 'all'} bytes; validation = the "
      f"corpus' last 10%, its first {args.eval_bytes} bytes scored). ByteLM: D={args.d}, L={args.layers}, "
      f"{args.heads} heads. MegaByte: the same global stack over patches of P={args.patch} "
      f"(D_G={args.d // args.patch}), local D={args.local_d}, L={args.local_layers}; its parameter count grows "
      f"with the length through the byte position table (max_seq_len = seq len). Both use bytescale's attention "
      f"op with impl=auto (XLA here, which materialises the T x T scores: ByteLM's cost is dominated by it). "
      f"About {args.bytes_per_step} bytes per step; per length, both models trained in "
      f"alternating slices of about {args.slice:.0f} s until each had at least {args.budget:.0f} s of step time, "
      f"then the one behind caught up with the other's total (so 'train s' agree to within one step; compilation "
      f"excluded); "
      f"AdamW lr {args.lr}, 10 warm-up steps, float32.\n\n{table(rows)}\n"
  )
  start = text.find(title)
  if start == -1:
    text = text.rstrip() + "\n\n" + body
  else:
    end = text.find("\n## ", start + len(title))
    text = text[:start] + body + (text[end:] if end != -1 else "")
  with open(RESULTS, "w") as f:
    f.write(text.rstrip() + "\n")


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true", help="short budgets (a few minutes in all)")
  parser.add_argument("--data", default=DEFAULT_CORPUS,
                      help="corpus file (default: shared/data/tinyshakespeare.txt beside the checkout)")
  parser.add_argument("--max-bytes", type=int, default=None, help="read at most this many corpus bytes")
  parser.add_argument("--seq-lens", default="1024,4096,8192")
  parser.add_argument("--bytes-per-step", type=int, default=8192)
  parser.add_argument("--budget", type=float, default=None, help="seconds of training per model and length")
  parser.add_argument("--slice", type=float, default=None, help="seconds per alternating slice")
  parser.add_argument("--eval-bytes", type=int, default=None, help="validation bytes scored")
  parser.add_argument("--d", type=int, default=128)
  parser.add_argument("--layers", type=int, default=4)
  parser.add_argument("--heads", type=int, default=2)
  parser.add_argument("--patch", type=int, default=8)
  parser.add_argument("--local-d", type=int, default=64)
  parser.add_argument("--local-layers", type=int, default=2)
  parser.add_argument("--lr", type=float, default=2e-3)
  parser.add_argument("--no-write", action="store_true", help="print the table only")
  args = parser.parse_args()
  args.budget = args.budget or (15.0 if args.quick else 90.0)
  args.slice = args.slice or (5.0 if args.quick else 15.0)
  args.eval_bytes = args.eval_bytes or (8192 if args.quick else 65536)
  rows = []
  cache: dict = {}
  for seq_len in (int(s) for s in args.seq_lens.split(",")):
    rows += run_length(args, seq_len, cache)
  print(table(rows))
  if not args.no_write:
    write_results(args, rows, "python benchmarks/" + " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:]))


if __name__ == "__main__":
  main()
