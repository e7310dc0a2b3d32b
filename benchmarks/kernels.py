"""Kernel benchmarks: flash attention and patch pooling against their XLA counterparts.

  python benchmarks/kernels.py            # accelerator: seq 1k..32k, bf16, head dim 128
  python benchmarks/kernels.py --quick    # CPU smoke run (a couple of minutes)

Attention: forward and forward+backward time of

* ``pallas``    -- ``bytescale.kernels.flash_attention`` (block skipping; compiled on GPU/TPU),
* ``cudnn``     -- ``bytescale.kernels.cudnn_attention`` (GPU only),
* ``jax.nn``    -- ``jax.nn.dot_product_attention(implementation="xla")``,
* ``reference`` -- ``bytescale.ops.attention.attention_reference`` (materialises BxHxTxS scores),

for causal and sliding-window masks. FLOPs count only visible (query, key) pairs -- forward
``4·B·H·K·pairs``, forward+backward ``3.5×`` that (FlashAttention-2 convention: backward = 5 matmuls vs 2) --
so TFLOP/s are "useful" TFLOP/s, comparable across implementations that do or do not skip masked blocks.
``%peak`` divides by a bf16 matmul measured in the same run. On CPU, Pallas runs only in interpret mode
(an emulator, not a kernel), so it is not timed there; the table says so.

Patch pooling: ``segment_pool`` pallas vs xla (segment ops), forward and forward+backward, ragged patches.

Every row records device, date and jax version; the table is appended to ``benchmarks/RESULTS_kernels.md``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from bytescale.kernels import cudnn_attention, flash_attention  # noqa: E402
from bytescale.ops.attention import attention_reference  # noqa: E402
from bytescale.ops.mask import AttentionMask  # noqa: E402
from bytescale.ops.pooling import segment_pool  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS_kernels.md")


def device_name() -> str:
  d = jax.devices()[0]
  if d.platform == "cpu":
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
  return f"{d.platform} {d.device_kind}"


def time_fn(fn, *args, iters: int, repeats: int = 3) -> float:
  """Median seconds per call after one compile+warm-up call."""
  jax.block_until_ready(fn(*args))
  samples = []
  for _ in range(repeats):
    start = time.perf_counter()
    for _ in range(iters):
      out = fn(*args)
    jax.block_until_ready(out)
    samples.append((time.perf_counter() - start) / iters)
  return statistics.median(samples)


def matmul_peak(n: int, iters: int) -> float:
  """Measured bf16 matmul TFLOP/s (n x n x n), the denominator of %peak."""
  a = jnp.asarray(np.random.default_rng(0).normal(size=(n, n)), jnp.bfloat16)
  f = jax.jit(lambda a: a @ a)
  return 2 * n**3 / time_fn(f, a, iters=iters) / 1e12


def _fwd_and_grads(f, cotangent, *primals):
  """Output and input gradients: returning both keeps XLA from dropping a forward the backward does not need."""
  out, vjp = jax.vjp(f, *primals)
  return out, vjp(cotangent)


def visible_pairs(t: int, window: int | None) -> int:
  rows = np.arange(t) + 1  # causal: query i sees i + 1 keys
  if window is not None:
    rows = np.minimum(rows, window)
  return int(rows.sum())


def attention_impls(backend: str, window: int | None):
  """name -> f(q, k, v, pos) with bytescale semantics (causal, optional window)."""

  def pallas(q, k, v, pos):
    return flash_attention.flash_attention(q, k, v, AttentionMask.self_attention(pos, window=window))

  def cudnn(q, k, v, pos):
    return cudnn_attention.cudnn_attention(q, k, v, AttentionMask.self_attention(pos, window=window))

  def jax_nn(q, k, v, pos):
    del pos
    local = None if window is None else (window - 1, 0)
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, local_window_size=local, implementation="xla")

  def reference(q, k, v, pos):
    return attention_reference(q, k, v, AttentionMask.self_attention(pos, window=window))

  impls = {"pallas": pallas, "jax.nn xla": jax_nn, "reference": reference}
  if backend == "gpu" and cudnn_attention.cudnn_available():
    impls = {"pallas": pallas, "cudnn": cudnn, "jax.nn xla": jax_nn, "reference": reference}
  return impls


def bench_attention(args, backend, peak, rows, stamp):
  h, g, d = args.heads, args.kv_heads, args.head_dim
  dtype = jnp.dtype(args.dtype)
  rng = np.random.default_rng(0)
  for t in args.seqs:
    b = max(1, args.batch_tokens // t)
    q = jnp.asarray(rng.normal(size=(b, t, h, d)), dtype)
    k = jnp.asarray(rng.normal(size=(b, t, g, d)), dtype)
    v = jnp.asarray(rng.normal(size=(b, t, g, d)), dtype)
    do = jnp.asarray(rng.normal(size=(b, t, h, d)), dtype)
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    for window in (None, args.window):
      mask = "causal" if window is None else f"causal, window {window}"
      fwd_flops = 4 * b * h * d * visible_pairs(t, window)
      for name, impl in attention_impls(backend, window).items():
        row = dict(kernel="attention", impl=name, mask=mask, dtype=args.dtype, shape=f"{b}x{t}x{h}/{g}x{d}")
        dense_bytes = 4 * b * h * t * t  # float32 scores the dense implementations materialise
        if name == "pallas" and backend == "cpu":
          rows.append({**row, "note": "not timed: Pallas on CPU is interpret mode", **stamp})
          continue
        if name in ("reference", "jax.nn xla") and dense_bytes > args.max_dense_gb * 2**30:
          rows.append({**row, "note": f"skipped: {dense_bytes / 2**30:.0f} GiB of scores", **stamp})
          continue
        fwd = jax.jit(impl)
        fwd_bwd = jax.jit(lambda q, k, v, pos, do, impl=impl: _fwd_and_grads(lambda *a: impl(*a, pos), do, q, k, v))
        try:
          t_fwd = time_fn(fwd, q, k, v, pos, iters=args.iters)
          t_bwd = time_fn(fwd_bwd, q, k, v, pos, do, iters=args.iters)
        except Exception as e:  # noqa: BLE001 -- OOM / unsupported shape: record it, keep going
          rows.append({**row, "note": f"failed: {type(e).__name__}: {str(e).splitlines()[0][:80]}", **stamp})
          continue
        tf_fwd = fwd_flops / t_fwd / 1e12
        tf_bwd = 3.5 * fwd_flops / t_bwd / 1e12
        rows.append({
            **row,
            "fwd ms": f"{t_fwd * 1e3:.2f}", "fwd TFLOP/s": f"{tf_fwd:.2f}", "fwd %peak": f"{100 * tf_fwd / peak:.0f}",
            "fwd+bwd ms": f"{t_bwd * 1e3:.2f}", "fwd+bwd TFLOP/s": f"{tf_bwd:.2f}",
            "fwd+bwd %peak": f"{100 * tf_bwd / peak:.0f}", **stamp,
        })
        print(rows[-1], flush=True)


def bench_pooling(args, backend, rows, stamp):
  rng = np.random.default_rng(1)
  t, d = args.pool_tokens, args.pool_dim
  b = max(1, args.batch_tokens // t)
  dtype = jnp.dtype(args.dtype)
  x = jnp.asarray(rng.normal(size=(b, t, d)), dtype)
  lengths = rng.integers(1, 9, size=(b, t))  # ragged patches of 1..8 bytes, ids non-decreasing
  ids = jnp.asarray(np.stack([np.repeat(np.arange(t), lengths[i])[:t] for i in range(b)]), jnp.int32)
  n = int(ids.max()) + 1
  g = jnp.asarray(rng.normal(size=(b, n, d)), dtype)
  for op in ("sum", "mean", "max"):
    for impl in ("pallas", "xla"):
      row = dict(kernel=f"segment_pool {op}", impl=impl, mask="ragged patches 1-8", dtype=args.dtype,
                 shape=f"{b}x{t}x{d} -> {n}")
      if impl == "pallas" and backend == "cpu":
        rows.append({**row, "note": "not timed: Pallas on CPU is interpret mode", **stamp})
        continue
      pool = lambda x, ids, op=op, impl=impl: segment_pool(x, ids, n, op, impl=impl)
      fwd = jax.jit(pool)
      fwd_bwd = jax.jit(lambda x, ids, g, pool=pool: _fwd_and_grads(lambda x: pool(x, ids), g, x))
      t_fwd = time_fn(fwd, x, ids, iters=args.iters)
      t_bwd = time_fn(fwd_bwd, x, ids, g, iters=args.iters)
      gbytes = x.size * x.dtype.itemsize / 1e9  # the unavoidable read of x
      rows.append({**row, "fwd ms": f"{t_fwd * 1e3:.3f}", "fwd+bwd ms": f"{t_bwd * 1e3:.3f}",
                   "note": f"x read at {gbytes / t_fwd:.0f} GB/s (fwd)", **stamp})
      print(rows[-1], flush=True)


COLUMNS = [
    "kernel", "impl", "mask", "dtype", "shape", "fwd ms", "fwd TFLOP/s", "fwd %peak", "fwd+bwd ms",
    "fwd+bwd TFLOP/s", "fwd+bwd %peak", "note", "device", "date", "jax",
]


def to_markdown(rows, header: str) -> str:
  lines = [header, "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
  for r in rows:
    lines.append("| " + " | ".join(str(r.get(c, "")) for c in COLUMNS) + " |")
  return "\n".join(lines) + "\n"


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--quick", action="store_true", help="CPU-sized run: short sequences, few iterations")
  p.add_argument("--seqs", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384, 32768])
  p.add_argument("--batch-tokens", type=int, default=32768, help="batch = max(1, batch_tokens // seq)")
  p.add_argument("--heads", type=int, default=16)
  p.add_argument("--kv-heads", type=int, default=16)
  p.add_argument("--head-dim", type=int, default=128)
  p.add_argument("--window", type=int, default=1024)
  p.add_argument("--dtype", default="bfloat16")
  p.add_argument("--iters", type=int, default=10)
  p.add_argument("--matmul-n", type=int, default=8192)
  p.add_argument("--max-dense-gb", type=float, default=16.0, help="skip dense impls whose scores exceed this")
  p.add_argument("--pool-tokens", type=int, default=8192)
  p.add_argument("--pool-dim", type=int, default=1024)
  p.add_argument("--out", default=RESULTS)
  p.add_argument("--no-append", action="store_true", help="print the table only")
  args = p.parse_args(argv)
  if args.quick:  # CPU-sized defaults; flags given explicitly still win
    quick = dict(seqs=[256, 1024, 2048], batch_tokens=2048, heads=4, kv_heads=2, window=128, iters=3,
                 matmul_n=1024, pool_tokens=2048, pool_dim=256, max_dense_gb=1.0)
    for key, value in quick.items():
      if getattr(args, key) == p.get_default(key):
        setattr(args, key, value)

  backend = "gpu" if jax.default_backend() in ("gpu", "cuda", "rocm") else jax.default_backend()
  stamp = dict(
      device=device_name(),
      date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
      jax=jax.__version__,
  )
  peak = matmul_peak(args.matmul_n, iters=args.iters)
  print(f"bf16 matmul {args.matmul_n}^3: {peak:.2f} TFLOP/s on {stamp['device']}", flush=True)
  rows = [dict(kernel="matmul (peak)", impl="jnp.dot", dtype="bfloat16", shape=f"{args.matmul_n}^3",
               note=f"{peak:.2f} TFLOP/s", **stamp)]
  bench_attention(args, backend, peak, rows, stamp)
  bench_pooling(args, backend, rows, stamp)

  flags = " ".join(sys.argv[1:] if argv is None else argv) or "(defaults)"
  header = f"## {stamp['date']} -- {stamp['device']} -- jax {stamp['jax']} -- `benchmarks/kernels.py {flags}`"
  if backend == "cpu":
    header += "\n\nCPU: Pallas kernels run only in interpret mode here, so they are not timed; XLA numbers only."
  table = to_markdown(rows, header)
  print(table)
  if not args.no_append:
    new = not os.path.exists(args.out)
    with open(args.out, "a") as f:
      if new:
        f.write("# Kernel benchmarks\n\nAppended by `benchmarks/kernels.py`; newest last.\n\n")
      f.write(table + "\n")


if __name__ == "__main__":
  main()
