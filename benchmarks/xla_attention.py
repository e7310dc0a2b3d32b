"""The XLA attention path with and without block skipping, side by side in one process.

  python benchmarks/xla_attention.py [--quick] [--rounds 3]

``dense``: ``attention_reference`` (materialises the ``TxT`` scores, masks them). ``blocked``:
``blocked_packed_attention`` (packed rows, only the ``C x C`` blocks the causal / window mask leaves, see
``bytescale/ops/attention.py``: for causal rows FlashAttention's loops over block pairs, for windows shorter than
the row a scan over query blocks with one softmax per band of key blocks). Both run the same masks on the same
arrays, float32, forward and forward+backward, at the attention shapes of the models' ``small`` presets; then whole
training steps of ByteLM and BLT ``small`` with each path (the dense one forced by a one-block
``packed_block_size``). Rounds alternate between the two paths so that both see the same machine; the table gives
medians and the ratio. Results go to ``benchmarks/RESULTS_kernels.md`` (section "XLA attention: blocked vs dense").
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from common import machine, write_section  # noqa: E402

from bytescale.ops import attention as attention_ops  # noqa: E402
from bytescale.ops.mask import AttentionMask  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS_kernels.md")

# (name, batch, seq, query heads, kv heads, head dim, window): the attention layers of the small presets.
SHAPES = (
    ("bytelm small (causal)", 8, 1024, 8, 4, 32, None),
    ("blt small encoder/decoder (window 128)", 8, 1024, 4, 4, 32, 128),
    ("blt tiny encoder (window 64)", 8, 1024, 4, 4, 8, 64),
    ("bytelm small at 4k (causal)", 2, 4096, 8, 4, 32, None),
)


def packed_segments(rng, batch, seq):
  """Rows of two or three documents, the layout the data pipeline packs."""
  rows = []
  for _ in range(batch):
    cuts = np.sort(rng.choice(np.arange(seq // 8, seq), size=rng.integers(1, 3), replace=False))
    rows.append(np.searchsorted(cuts, np.arange(seq), side="right").astype(np.int32) + 1)
  return jnp.asarray(np.stack(rows))


def timed(fn, *args, repeats):
  jax.block_until_ready(fn(*args))
  samples = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    samples.append(time.perf_counter() - start)
  return statistics.median(samples)


def attention_rows(args):
  rows = []
  for name, b, t, h, g, k, window in SHAPES[: 2 if args.quick else None]:
    rng = np.random.default_rng(0)
    q, kk, v = (jnp.asarray(rng.normal(size=(b, t, n, k)), jnp.float32) for n in (h, g, g))
    segments = packed_segments(rng, b, t)
    # The segment ids are an argument, as in training (a mask closed over is a constant XLA folds at compile time).
    mask_of = lambda segments: AttentionMask.packed_row(segments, window=window)  # noqa: E731
    paths = {"dense": attention_ops.attention_reference, "blocked": attention_ops.blocked_packed_attention}
    fns = {}
    for path, fn in paths.items():
      fns[(path, "fwd")] = jax.jit(lambda q, k, v, s, fn=fn: fn(q, k, v, mask_of(s)))
      fns[(path, "fwd+bwd")] = jax.jit(jax.grad(lambda q, k, v, s, fn=fn: jnp.sum(fn(q, k, v, mask_of(s)) ** 2),
                                                argnums=(0, 1, 2)))
    times = {key: [] for key in fns}
    for _ in range(args.rounds):  # alternate the paths, round by round
      for key, fn in fns.items():
        times[key].append(timed(fn, q, kk, v, segments, repeats=args.repeats))
    for kind in ("fwd", "fwd+bwd"):
      dense, blocked = (statistics.median(times[(p, kind)]) * 1e3 for p in ("dense", "blocked"))
      rows.append(f"| {name} | {b}x{t}x{h}/{g}x{k} | {kind} | {dense:,.1f} | {blocked:,.1f} | "
                  f"{dense / blocked:.2f}x |")
      print(rows[-1], file=sys.stderr, flush=True)
  return rows


def train_step_rows(args):
  """Whole training steps of the small presets, dense vs blocked attention (the only difference)."""
  from bytescale import configs
  from bytescale.models import registry
  from bytescale.train.state import init_train_state, make_optimizer
  from bytescale.train.step import make_train_step, next_byte_loss

  rows = []
  seq, batch = 1024, 8
  rng = np.random.default_rng(0)
  segments = packed_segments(rng, batch, seq)
  ids = jnp.asarray(rng.integers(0, 256, size=(batch, seq)), jnp.int32)
  batch_arrays = {"inputs": ids, "targets": jnp.roll(ids, -1, axis=1), "segment_ids": segments,
                  "loss_mask": jnp.ones((batch, seq), jnp.float32)}
  original = attention_ops.packed_block_size
  for model_name in ("bytelm",) if args.quick else ("bytelm", "blt"):
    config = registry.get_preset(model_name, "small")
    if model_name == "blt":
      config = configs.replace_path(config, "patcher", "space")
    tc = configs.TrainConfig(batch_size=batch, seq_len=seq)
    steps = {}
    for path in ("dense", "blocked"):
      # The dense path: blocks as long as the row, so the dispatch keeps the reference.
      attention_ops.packed_block_size = original if path == "blocked" else (lambda t, w: t)
      optimizer = make_optimizer(tc)
      graphdef, state = init_train_state(registry.build_model(config), optimizer)
      step = jax.jit(make_train_step(graphdef, optimizer, next_byte_loss))
      jax.block_until_ready(step(state, batch_arrays))  # compile under this path
      steps[path] = (step, state)
    attention_ops.packed_block_size = original
    times = {path: [] for path in steps}
    for _ in range(args.rounds):
      for path, (step, state) in steps.items():
        times[path].append(timed(lambda: step(state, batch_arrays)[1]["loss"], repeats=args.repeats))
    dense, blocked = (statistics.median(times[p]) for p in ("dense", "blocked"))
    rows.append(f"| {model_name} small train step | {batch}x{seq} | fwd+bwd+adamw | {dense * 1e3:,.0f} | "
                f"{blocked * 1e3:,.0f} | {dense / blocked:.2f}x |")
    print(rows[-1], file=sys.stderr, flush=True)
  return rows


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true", help="two attention shapes and the ByteLM step only")
  parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per comparison (default 3)")
  parser.add_argument("--repeats", type=int, default=3, help="timed calls per round (median; default 3)")
  parser.add_argument("--out", default=RESULTS)
  args = parser.parse_args(argv)
  header = f"Machine: {machine()}.\nCommand: `python benchmarks/xla_attention.py{' --quick' if args.quick else ''}`"
  rows = attention_rows(args) + train_step_rows(args)
  body = "\n".join([
      header + f"; {args.rounds} alternating rounds of {args.repeats} timed calls, medians; float32.", "",
      "| what | shape (BxTxH/GxK) | pass | dense ms | blocked ms | dense / blocked |",
      "|---|---|---|---|---|---|", *rows])
  write_section(args.out, "XLA attention: blocked vs dense", body)
  print(body)


if __name__ == "__main__":
  main()
