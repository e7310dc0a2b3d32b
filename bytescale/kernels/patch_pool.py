"""Pallas patch pooling: pool ``BxTxD`` token features into ``BxNxD`` per patch id (sum or max; mean = sum/count).

Made for what patchers produce: patch ids that are non-decreasing along T, so every patch is a contiguous run
and a block of patches covers a contiguous token span. Correctness does not depend on it (the kernel masks by
id), only speed: the token span visited for a block of patches is ``[first token, last token]`` of those
patches, which for arbitrary ids can be the whole row.

Ids outside ``[0, num_segments)`` are ignored; empty patches give 0. Max routes the gradient to the FIRST
position (lowest t) holding the maximum, per feature; ties are not split. Inputs are assumed finite.

Kernels (grid axes: batch, block, feature block):

* forward, grid ``(B, nN, nD)``: one block of ``block_n`` patches; loops over the token blocks of its span.
  sum: one-hot ``block_t x block_n`` matmul; max: per patch row a masked max plus the first arg-max index.
* backward, grid ``(B, nT, nD)``: one block of tokens; loops over the patch blocks its tokens belong to.
  sum: one-hot matmul gathers the patch gradient; max: the gradient goes where ``t == argmax``.

Span tables (``Bx2xnBlocks`` int32) are computed in jnp before the ``pallas_call`` (SMEM on TPU).
``backend=`` picks another backend's specs, so a CPU host can lower the kernels for TPU/GPU (see
``bytescale.kernels``).
Like every ``pallas_call``: inside ``shard_map`` use ``check_vma=False``, and call it on explicitly sharded
arrays only through such a ``shard_map``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Literal

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from bytescale.kernels import resolve_backend
from bytescale.kernels.common import compiler_params, next_pow2, resolve_interpret, round_up, table_spec

PoolOp = Literal["max", "mean", "sum"]
_BIG = 2**30

# (block_t, block_n, block_d) per backend; GPU/TPU values are untuned starting points.
_DEFAULT_BLOCKS = {"gpu": (32, 8, 128), "tpu": (128, 8, 128), "cpu": (64, 8, 512)}


@dataclasses.dataclass(frozen=True)
class _Config:
  op: str  # "sum" or "max" (mean is sum / count outside the kernel)
  block_t: int
  block_n: int
  block_d: int
  backend: str
  interpret: bool


def _backend() -> str:
  return resolve_backend()  # the local backend


def _check_block(name: str, block: int | None, backend: str, full: int):
  """Explicit block sizes must suit the backend's lowering (else Mosaic/Triton fail with a less clear error)."""
  if block is None:
    return
  if block <= 0:
    raise ValueError(f"{name} must be positive, got {block}")
  if backend == "gpu" and block & (block - 1):
    raise ValueError(f"{name}: Triton needs power-of-two blocks, got {block}")
  # TPU: the minor block dim (features) a multiple of 128 lanes unless one block spans it; the others (tokens,
  # patches: second-minor) a multiple of 8 sublanes.
  multiple = 128 if name == "block_d" else 8
  if backend == "tpu" and block % multiple and not (name == "block_d" and block >= full):
    raise ValueError(f"{name} must be a multiple of {multiple} on TPU (Mosaic tiles are 8 x 128), got {block}")


def _compiler_params(cfg):
  return compiler_params(cfg.backend, cfg.interpret, num_warps=4, dimension_semantics=("parallel",) * 3)


def _dot(a, b, contract_a, contract_b):
  precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None  # exact one-hot sums in f32
  return lax.dot_general(
      a, b, (((contract_a,), (contract_b,)), ((), ())), precision=precision, preferred_element_type=jnp.float32
  )


# ---------------------------------------------------------------------------------------------------------
# Kernels. ids_ref blocks are columns (block_t x 1); invalid ids are -1 and never match a patch.


def _fwd_sum_kernel(span_ref, ids_ref, x_ref, y_ref, *, cfg):
  n = pl.program_id(1)
  lo, hi = span_ref[0, n], span_ref[1, n]
  patch_1xN = n * cfg.block_n + lax.broadcasted_iota(jnp.int32, (1, cfg.block_n), 1)

  def body(tb, acc_NxD):
    x_TxD = x_ref[tb]
    onehot_TxN = (ids_ref[tb] == patch_1xN).astype(x_TxD.dtype)
    return acc_NxD + _dot(onehot_TxN, x_TxD, 0, 0)

  y_ref[...] = lax.fori_loop(lo, hi, body, jnp.zeros(y_ref.shape, jnp.float32))


def _fwd_max_kernel(span_ref, ids_ref, x_ref, y_ref, arg_ref, *, cfg):
  n = pl.program_id(1)
  lo, hi = span_ref[0, n], span_ref[1, n]
  bt, bd = x_ref.shape[-2:]

  def body(tb, carry):
    x_TxD = x_ref[tb].astype(jnp.float32)
    ids_Tx1 = ids_ref[tb]
    t_Tx1 = tb * bt + lax.broadcasted_iota(jnp.int32, (bt, 1), 0)
    out = []
    for r in range(cfg.block_n):  # one masked reduction per patch row of this block
      m_1xD, a_1xD = carry[r]
      member_Tx1 = ids_Tx1 == n * cfg.block_n + r
      block_max = jnp.max(jnp.where(member_Tx1, x_TxD, -jnp.inf), axis=0, keepdims=True)
      block_arg = jnp.min(jnp.where(member_Tx1 & (x_TxD == block_max), t_Tx1, _BIG), axis=0, keepdims=True)
      # Token blocks come in increasing t, so ">" (or an equal max at a smaller t) keeps the first arg-max.
      better = (block_max > m_1xD) | ((block_max == m_1xD) & (block_arg < a_1xD))
      out.append((jnp.where(better, block_max, m_1xD), jnp.where(better, block_arg, a_1xD)))
    return tuple(out)

  init = tuple(
      (jnp.full((1, bd), -jnp.inf, jnp.float32), jnp.full((1, bd), _BIG, jnp.int32)) for _ in range(cfg.block_n)
  )
  rows = lax.fori_loop(lo, hi, body, init)
  for r, (m_1xD, a_1xD) in enumerate(rows):
    y_ref[r : r + 1, :] = m_1xD.astype(y_ref.dtype)
    arg_ref[r : r + 1, :] = a_1xD


def _bwd_sum_kernel(span_ref, ids_ref, g_ref, dx_ref, *, cfg):
  tb = pl.program_id(1)
  lo, hi = span_ref[0, tb], span_ref[1, tb]
  ids_Tx1 = ids_ref[...]

  def body(nb, dx_TxD):
    g_NxD = g_ref[nb]
    patch_1xN = nb * cfg.block_n + lax.broadcasted_iota(jnp.int32, (1, cfg.block_n), 1)
    return dx_TxD + _dot((ids_Tx1 == patch_1xN).astype(g_NxD.dtype), g_NxD, 1, 0)

  dx_ref[...] = lax.fori_loop(lo, hi, body, jnp.zeros(dx_ref.shape, jnp.float32)).astype(dx_ref.dtype)


def _bwd_max_kernel(span_ref, ids_ref, g_ref, arg_ref, dx_ref, *, cfg):
  tb = pl.program_id(1)
  lo, hi = span_ref[0, tb], span_ref[1, tb]
  ids_Tx1 = ids_ref[...]
  bt = ids_Tx1.shape[0]
  t_Tx1 = tb * bt + lax.broadcasted_iota(jnp.int32, (bt, 1), 0)

  def body(nb, dx_TxD):
    for r in range(cfg.block_n):
      chosen_TxD = (ids_Tx1 == nb * cfg.block_n + r) & (t_Tx1 == arg_ref[nb, pl.ds(r, 1), :])
      dx_TxD = dx_TxD + jnp.where(chosen_TxD, g_ref[nb, pl.ds(r, 1), :].astype(jnp.float32), 0.0)
    return dx_TxD

  dx_ref[...] = lax.fori_loop(lo, hi, body, jnp.zeros(dx_ref.shape, jnp.float32)).astype(dx_ref.dtype)


# ---------------------------------------------------------------------------------------------------------
# Plumbing.


def _spans(ids_BxT, num_blocks_n, cfg):
  """Forward: per patch block, the token-block span; backward: per token block, the patch-block span."""
  b, t = ids_BxT.shape
  bt, bn = cfg.block_t, cfg.block_n
  valid = ids_BxT >= 0
  patch_block = jnp.where(valid, ids_BxT // bn, num_blocks_n)  # invalid -> a dump block, dropped below
  t_idx = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  flat = (patch_block + jnp.arange(b)[:, None] * (num_blocks_n + 1)).reshape(-1)
  first = jax.ops.segment_min(t_idx.reshape(-1), flat, b * (num_blocks_n + 1)).reshape(b, -1)[:, :num_blocks_n]
  last = jax.ops.segment_max(t_idx.reshape(-1), flat, b * (num_blocks_n + 1)).reshape(b, -1)[:, :num_blocks_n]
  empty = last < first  # segment_min/max of nothing: +max / -max
  fwd_lo = jnp.where(empty, 0, first // bt)
  fwd_hi = jnp.where(empty, 0, last // bt + 1)
  pb = patch_block.reshape(b, t // bt, bt)
  v = valid.reshape(b, t // bt, bt)
  bwd_lo = jnp.min(jnp.where(v, pb, _BIG), axis=-1)
  bwd_hi = jnp.max(jnp.where(v, pb + 1, 0), axis=-1)
  bwd_lo = jnp.minimum(bwd_lo, bwd_hi)
  fwd = jnp.stack([fwd_lo, fwd_hi], axis=1).astype(jnp.int32)
  bwd = jnp.stack([bwd_lo, bwd_hi], axis=1).astype(jnp.int32)
  return fwd, bwd


def _counts(ids_BxT, num_segments):
  """``BxN`` tokens per segment (ids already sanitised: -1 = ignored)."""
  b = ids_BxT.shape[0]
  flat = jnp.where(ids_BxT >= 0, ids_BxT, num_segments) + jnp.arange(b)[:, None] * (num_segments + 1)
  ones = jnp.ones(ids_BxT.size, jnp.int32)
  return jax.ops.segment_sum(ones, flat.reshape(-1), b * (num_segments + 1)).reshape(b, -1)[:, :num_segments]


def _forward(cfg, x, ids, fwd_span):
  b, t_pad, d_pad = x.shape
  bt, bn, bd = cfg.block_t, cfg.block_n, cfg.block_d
  n_t, n_n, n_d = t_pad // bt, fwd_span.shape[-1], d_pad // bd
  in_specs = [
      table_spec((None, 2, n_n), lambda b_, n, d: (b_, 0, 0), cfg.backend),
      pl.BlockSpec((None, n_t, bt, 1), lambda b_, n, d: (b_, 0, 0, 0)),
      pl.BlockSpec((None, n_t, bt, bd), lambda b_, n, d: (b_, 0, 0, d)),
  ]
  y_spec = pl.BlockSpec((None, bn, bd), lambda b_, n, d: (b_, n, d))
  y_shape = (b, n_n * bn, d_pad)
  if cfg.op == "sum":
    kernel, out_specs = _fwd_sum_kernel, [y_spec]
    out_shape = [jax.ShapeDtypeStruct(y_shape, jnp.float32)]
  else:
    kernel, out_specs = _fwd_max_kernel, [y_spec, y_spec]
    out_shape = [jax.ShapeDtypeStruct(y_shape, x.dtype), jax.ShapeDtypeStruct(y_shape, jnp.int32)]
  return pl.pallas_call(
      functools.partial(kernel, cfg=cfg),
      grid=(b, n_n, n_d),
      in_specs=in_specs,
      out_specs=out_specs,
      out_shape=out_shape,
      interpret=cfg.interpret,
      compiler_params=_compiler_params(cfg),
      name=f"bytescale_patch_pool_{cfg.op}_fwd",
  )(fwd_span, ids.reshape(b, n_t, bt, 1), x.reshape(b, n_t, bt, d_pad))


def _backward(cfg, ids, bwd_span, g, arg, x_dtype):
  b, t_pad = ids.shape
  bt, bn, bd = cfg.block_t, cfg.block_n, cfg.block_d
  n_t, n_n, d_pad = t_pad // bt, g.shape[1] // bn, g.shape[2]
  g_spec = pl.BlockSpec((None, n_n, bn, bd), lambda b_, t, d: (b_, 0, 0, d))
  in_specs = [
      table_spec((None, 2, n_t), lambda b_, t, d: (b_, 0, 0), cfg.backend),
      pl.BlockSpec((None, None, bt, 1), lambda b_, t, d: (b_, t, 0, 0)),
      g_spec,
  ]
  args = [bwd_span, ids.reshape(b, n_t, bt, 1), g.reshape(b, n_n, bn, d_pad)]
  if cfg.op == "sum":
    kernel = _bwd_sum_kernel
  else:
    kernel = _bwd_max_kernel
    in_specs.append(g_spec)
    args.append(arg.reshape(b, n_n, bn, d_pad))
  (dx,) = pl.pallas_call(
      functools.partial(kernel, cfg=cfg),
      grid=(b, n_t, d_pad // bd),
      in_specs=in_specs,
      out_specs=[pl.BlockSpec((None, None, bt, bd), lambda b_, t, d: (b_, t, 0, d))],
      out_shape=[jax.ShapeDtypeStruct((b, n_t, bt, d_pad), x_dtype)],
      interpret=cfg.interpret,
      compiler_params=_compiler_params(cfg),
      name=f"bytescale_patch_pool_{cfg.op}_bwd",
  )(*args)
  return dx.reshape(b, t_pad, d_pad)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _pool_core(cfg, x, ids, fwd_span, bwd_span):
  return _forward(cfg, x, ids, fwd_span)[0]


def _pool_core_fwd(cfg, x, ids, fwd_span, bwd_span):
  outs = _forward(cfg, x, ids, fwd_span)
  arg = outs[1] if cfg.op == "max" else None
  return outs[0], (ids, bwd_span, arg, jnp.zeros((), x.dtype))


def _pool_core_bwd(cfg, res, g):
  ids, bwd_span, arg, x_dtype_token = res
  return _backward(cfg, ids, bwd_span, g, arg, x_dtype_token.dtype), None, None, None


_pool_core.defvjp(_pool_core_fwd, _pool_core_bwd)


def patch_pool(
    x_BxTxD,
    segment_ids_BxT,
    num_segments: int,
    op: PoolOp = "mean",
    *,
    block_t: int | None = None,
    block_n: int | None = None,
    block_d: int | None = None,
    interpret: bool | None = None,
    backend: str | None = None,
):
  """Pool ``x_BxTxD`` per segment id into ``BxNxD`` with Pallas kernels (see module docstring).

  ``backend`` (``"cpu"``, ``"gpu"``/``"cuda"``/``"rocm"``, ``"tpu"``; None = local) selects the specs, compiler
  params and default blocks. A non-local one is for lowering (``jax.jit(...).trace(...).lower(...)``) or for
  running that backend's configuration in interpret mode (``interpret=True``). Explicit blocks are checked
  against the backend: powers of two on GPU; on TPU multiples of 8 (``block_d``: of 128, or >= the feature dim).
  """
  if op not in ("max", "mean", "sum"):
    raise ValueError(f"op must be 'max', 'mean' or 'sum', got {op!r}")
  if x_BxTxD.ndim != 3 or segment_ids_BxT.shape != x_BxTxD.shape[:2]:
    raise ValueError(f"expected x BxTxD and ids BxT, got {x_BxTxD.shape} and {segment_ids_BxT.shape}")
  backend = _backend() if backend is None else resolve_backend(backend)
  interpret = resolve_interpret(interpret, backend)
  _, t, d = x_BxTxD.shape
  for name, block in (("block_t", block_t), ("block_n", block_n), ("block_d", block_d)):
    _check_block(name, block, backend, full=d)
  dt, dn, dd = _DEFAULT_BLOCKS[backend]
  min_t = 8 if backend != "gpu" else 16
  cfg = _Config(
      op="max" if op == "max" else "sum",
      block_t=block_t or max(min_t, min(dt, next_pow2(t))),
      block_n=block_n or max(8, min(dn, next_pow2(num_segments))),
      block_d=block_d or (min(dd, next_pow2(d)) if backend != "tpu" else (d if d <= dd else dd)),
      backend=backend,
      interpret=interpret,
  )
  return _patch_pool_jit(cfg, x_BxTxD, segment_ids_BxT, int(num_segments), op)


@functools.partial(jax.jit, static_argnums=(0, 3, 4))
def _patch_pool_jit(cfg, x, ids, num_segments, op):
  b, t, d = x.shape
  bt, bn, bd = cfg.block_t, cfg.block_n, cfg.block_d
  t_pad, n_pad, d_pad = round_up(t, bt), round_up(num_segments, bn), round_up(d, bd)
  valid = (ids >= 0) & (ids < num_segments)
  ids = jnp.where(valid, ids, -1).astype(jnp.int32)  # one "ignored" id the kernels never match
  ids_pad = jnp.pad(ids, ((0, 0), (0, t_pad - t)), constant_values=-1)
  x_pad = jnp.pad(x, ((0, 0), (0, t_pad - t), (0, d_pad - d)))
  fwd_span, bwd_span = _spans(ids_pad, n_pad // bn, cfg)
  y = _pool_core(cfg, x_pad, ids_pad, fwd_span, bwd_span)[:, :num_segments, :d]
  counts = _counts(ids, num_segments)[:, :, None]
  if op == "mean":
    y = y / jnp.maximum(counts, 1).astype(y.dtype)
  elif op == "max":
    y = jnp.where(counts > 0, y, 0)  # empty patches: 0, not -inf (and no gradient)
  return y.astype(x.dtype)


__all__ = ["patch_pool"]
