"""Segment pooling: ``BxTxD`` token features -> ``BxNxD`` per segment (patch) id.

* ids in ``[0, num_segments)`` select the output row; ids ``< 0`` or ``>= num_segments`` are ignored;
* empty segments give 0 (for every op);
* ``max`` routes the gradient to the FIRST position (lowest t) holding the maximum, per feature: ties are not
  split. ``mean`` = sum / count. Accumulation in float32 (or wider); the result has ``x``'s dtype.
* inputs are assumed finite.

``impl``: ``"xla"`` (jax segment ops, any ids), ``"pallas"`` (``bytescale.kernels.patch_pool``: correct for
any ids, fast when ids are non-decreasing along T as patchers produce), ``"auto"`` (xla on CPU; on GPU/TPU
xla until the kernel is benchmarked there, see ``_AUTO_PALLAS_BACKENDS``). ``segment_pool_reference`` is an
independent dense one-hot formulation, for tests.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

PoolOp = Literal["max", "mean", "sum"]
PoolImpl = Literal["auto", "xla", "pallas"]
POOL_OPS = ("max", "mean", "sum")
POOL_IMPLS = ("auto", "xla", "pallas")
# Backends where "auto" picks the Pallas kernel. Empty until it is benchmarked there (benchmarks/kernels.py):
# on CPU Pallas only interprets, and the GPU/TPU lowering is checked but not yet timed.
_AUTO_PALLAS_BACKENDS: tuple[str, ...] = ()


def _check(x_BxTxD, segment_ids_BxT, op):
  if op not in POOL_OPS:
    raise ValueError(f"op must be one of {POOL_OPS}, got {op!r}")
  if x_BxTxD.ndim != 3 or segment_ids_BxT.shape != x_BxTxD.shape[:2]:
    raise ValueError(f"expected x BxTxD and segment ids BxT, got {x_BxTxD.shape} and {segment_ids_BxT.shape}")


def segment_pool(x_BxTxD, segment_ids_BxT, num_segments: int, op: PoolOp = "mean", impl: PoolImpl = "auto"):
  """Pool ``x_BxTxD`` per segment id into ``BxNxD`` (see module docstring for the rules)."""
  _check(x_BxTxD, segment_ids_BxT, op)
  if impl not in POOL_IMPLS:
    raise ValueError(f"impl must be one of {POOL_IMPLS}, got {impl!r}")
  if impl == "auto":
    impl = "pallas" if jax.default_backend() in _AUTO_PALLAS_BACKENDS else "xla"
  if impl == "pallas":
    from bytescale.kernels import patch_pool  # lazily: Pallas is optional at import time

    return patch_pool.patch_pool(x_BxTxD, segment_ids_BxT, num_segments, op)
  return _segment_pool_xla(x_BxTxD, segment_ids_BxT, num_segments, op)


def _segment_pool_xla(x_BxTxD, segment_ids_BxT, num_segments, op):
  b, t, d = x_BxTxD.shape
  n = num_segments
  acc_dtype = jnp.promote_types(x_BxTxD.dtype, jnp.float32)
  x = x_BxTxD.astype(acc_dtype)
  valid = (segment_ids_BxT >= 0) & (segment_ids_BxT < n)
  # One flat segment space: batch b owns ids [b*(n+1), b*(n+1)+n]; the last one collects ignored tokens.
  flat_BxT = jnp.where(valid, segment_ids_BxT, n) + jnp.arange(b)[:, None] * (n + 1)
  flat = flat_BxT.reshape(-1)
  total = b * (n + 1)
  x_flat = x.reshape(b * t, d)

  def per_segment(values, reduce=jax.ops.segment_sum):
    return reduce(values, flat, total).reshape(b, n + 1, -1)[:, :n]

  counts = per_segment(jnp.ones((b * t, 1), acc_dtype))
  if op == "max":
    seg_max = jax.ops.segment_max(jax.lax.stop_gradient(x_flat), flat, total)  # (B*(N+1))xD
    is_max = x_flat == seg_max[flat]
    t_idx = jnp.broadcast_to(jnp.arange(b * t, dtype=jnp.int32)[:, None], is_max.shape)
    first = jax.ops.segment_min(jnp.where(is_max, t_idx, b * t), flat, total)
    chosen = is_max & (t_idx == first[flat])  # first arg-max per (segment, feature)
    # Summing the one chosen value per segment makes the gradient flow to exactly that position.
    out = per_segment(jnp.where(chosen, x_flat, 0.0))
  else:
    out = per_segment(x_flat)
    if op == "mean":
      out = out / jnp.maximum(counts, 1.0)
  return jnp.where(counts > 0, out, 0.0).astype(x_BxTxD.dtype)


def segment_pool_reference(x_BxTxD, segment_ids_BxT, num_segments: int, op: PoolOp = "mean"):
  """Dense one-hot formulation (materialises ``BxTxN`` and, for max, ``BxTxNxD``): for tests only."""
  _check(x_BxTxD, segment_ids_BxT, op)
  n = num_segments
  acc_dtype = jnp.promote_types(x_BxTxD.dtype, jnp.float32)
  x = x_BxTxD.astype(acc_dtype)
  onehot_BxTxN = segment_ids_BxT[:, :, None] == jnp.arange(n)  # out-of-range ids match nothing
  counts_BxNx1 = jnp.sum(onehot_BxTxN, axis=1).astype(acc_dtype)[:, :, None]
  if op == "max":
    member_BxTxNx1 = onehot_BxTxN[..., None]
    masked = jnp.where(member_BxTxNx1, x[:, :, None, :], -jnp.inf)
    first_BxNxD = jnp.argmax(jax.lax.stop_gradient(masked), axis=1)  # argmax returns the first occurrence
    t_Tx1x1 = jnp.arange(x.shape[1])[:, None, None]
    chosen = member_BxTxNx1 & (t_Tx1x1 == first_BxNxD[:, None])
    out = jnp.sum(jnp.where(chosen, x[:, :, None, :], 0.0), axis=1)
  else:
    out = jnp.einsum("btn,btd->bnd", onehot_BxTxN.astype(acc_dtype), x, precision=jax.lax.Precision.HIGHEST)
    if op == "mean":
      out = out / jnp.maximum(counts_BxNx1, 1.0)
  return jnp.where(counts_BxNx1 > 0, out, 0.0).astype(x_BxTxD.dtype)
