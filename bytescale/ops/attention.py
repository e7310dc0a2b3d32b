"""Scaled dot-product attention under an ``AttentionMask``, as a pure function, and the one ``impl`` dispatch.

The mask semantics are those of :mod:`bytescale.ops.mask`. Every implementation takes ``(q, k, v, mask)``:
``attention_reference`` here (plain jnp, ``impl="xla"``; packed rows longer than one block take
``blocked_packed_attention``, which skips the blocks the causal/window mask hides; segment-local masks take
``segment_local_attention``, linear in the keys),
``bytescale.kernels.flash_attention.flash_attention`` (Pallas, ``impl="pallas"``) and
``bytescale.kernels.cudnn_attention.cudnn_attention`` (``impl="cudnn"``); ``attention`` picks one. The kernels
are imported lazily (Pallas is optional at import time) and never import this module.

Shapes: q ``BxTxHxK``, k/v ``BxSxGxK`` with ``H % G == 0`` (grouped KV heads).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp

from bytescale.ops.mask import AttentionMask, check_shapes

AttentionImpl = Literal["auto", "xla", "pallas", "cudnn"]
ATTENTION_IMPLS = ("auto", "xla", "pallas", "cudnn")


def attention_reference(q_BxTxHxK, k_BxSxGxK, v_BxSxGxK, mask: AttentionMask, *, scale: float | None = None):
  """Plain-jnp attention: materialises the ``BxHxTxS`` scores. Softmax in float32 (or float64 if given)."""
  check_shapes(q_BxTxHxK, k_BxSxGxK, v_BxSxGxK, mask)
  b, t, h, d = q_BxTxHxK.shape
  g = k_BxSxGxK.shape[2]
  scale = d**-0.5 if scale is None else scale
  acc_dtype = jnp.promote_types(q_BxTxHxK.dtype, jnp.float32)
  q_BxTxGxRxK = q_BxTxHxK.reshape(b, t, g, h // g, d)
  scores_BxGxRxTxS = jnp.einsum(
      "btgrk,bsgk->bgrts", q_BxTxGxRxK, k_BxSxGxK, preferred_element_type=acc_dtype
  ) * scale
  mask_Bx1x1xTxS = mask.dense()[:, None, None]
  scores_BxGxRxTxS = jnp.where(mask_Bx1x1xTxS, scores_BxGxRxTxS, -jnp.inf)
  row_max = jnp.max(scores_BxGxRxTxS, axis=-1, keepdims=True)
  row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)  # fully masked rows: avoid inf - inf
  weights = jnp.where(mask_Bx1x1xTxS, jnp.exp(scores_BxGxRxTxS - row_max), 0.0)
  denom = jnp.sum(weights, axis=-1, keepdims=True)
  probs = weights / jnp.where(denom == 0, 1.0, denom)
  out_BxTxGxRxK = jnp.einsum(
      "bgrts,bsgk->btgrk", probs.astype(v_BxSxGxK.dtype), v_BxSxGxK, preferred_element_type=acc_dtype
  )
  return out_BxTxGxRxK.reshape(b, t, h, d).astype(q_BxTxHxK.dtype)


# Read when a function is traced: see unrolled_block_loops.
_UNROLL_BLOCK_LOOPS = contextvars.ContextVar("unroll_block_loops", default=False)


@contextlib.contextmanager
def unrolled_block_loops():
  """Functions traced inside unroll the XLA path's loops over blocks (``blocked_packed_attention``): same results,
  but XLA's cost analysis, which counts a loop body once whatever its trip count, then sees every block
  (``bytescale.flops.xla_flops`` traces in it)."""
  token = _UNROLL_BLOCK_LOOPS.set(True)
  try:
    yield
  finally:
    _UNROLL_BLOCK_LOOPS.reset(token)


PACKED_BLOCK = 128  # key/query block of the blocked XLA path (shorter for short windows)
# Causal rows longer than this take blocks of LONG_ROW_BLOCK: fewer, larger block pairs per loop iteration.
# fwd+bwd, ByteLM small's heads, 2-core Xeon: 2x1024 1.19x and 1x4096 1.29x faster than blocks of 128, the same at
# 8x1024; rows of 256-512 are faster with 128.
LONG_ROW, LONG_ROW_BLOCK = 512, 256


def packed_block_size(seq_len: int, window: int | None) -> int:
  """Block length of :func:`blocked_packed_attention` for rows of ``seq_len`` tokens: at most ``PACKED_BLOCK``
  (``LONG_ROW_BLOCK`` for causal rows longer than ``LONG_ROW``).

  With a window: a row no longer than the window rounded up to a multiple of 8 is one block (the dense path);
  a longer row takes blocks of about half the window (a multiple of 8), each query block then reading a band of
  ``(window + C - 2) // C + 1`` key blocks (3 when the window is a multiple of 16): about ``1.5 x window`` scores
  per query where blocks of the window's length computed ``2 x window``."""
  if window is None:
    return min(LONG_ROW_BLOCK if seq_len > LONG_ROW else PACKED_BLOCK, max(8, -(-seq_len // 8) * 8))
  whole = min(PACKED_BLOCK, max(8, -(-window // 8) * 8))
  if seq_len <= whole:
    return min(whole, max(8, -(-seq_len // 8) * 8))
  return min(PACKED_BLOCK, max(8, -(-window // 16) * 8))


def blocked_packed_attention(q_BxTxHxK, k_BxTxGxK, v_BxTxGxK, mask: AttentionMask, *, scale: float | None = None,
                             block: int | None = None, unroll: bool | None = None):
  """Causal (optionally windowed) self-attention over packed rows without the ``TxT`` score matrix: plain jnp,
  over ``C x C`` blocks, skipping the blocks the mask hides by construction.

  Needs ``mask.packed`` (``AttentionMask.packed_row``): a document is a contiguous run and positions count from 0
  along it, so the keys query ``i`` sees are one interval, ``max(i - position_i, i - window + 1) <= j <= i`` (none
  for padding). Query block ``i`` then reads only key blocks ``i - d`` for ``d <= D``, ``D = (window + C - 2) //
  C`` (every ``d <= i`` without a window): causal attention does about half the work of the dense path, a window
  of ``W`` about ``T * (W + C)`` instead of ``T * T``; and the mask inside a block is two integer comparisons per
  score. The result equals :func:`attention_reference` (to float rounding; fully masked rows give zeros).

  Two schedules visit the same block pairs (``flops.xla_keys`` counts them):

  * a window shorter than the row (``D < N - 1``): a loop (``lax.scan``) over query blocks, each taking one
    softmax over its band of ``D + 1`` key blocks (its first ``D`` blocks, whose bands are shorter, before the
    loop). Every intermediate is one block's, so it stays in cache, where the per-diagonal schedule's arrays
    span the whole row and go to memory between fusions (BLT ``small``'s local layers, window 128).
    ``unroll=True`` unrolls the loop (default: inside :func:`unrolled_block_loops`, else a loop);
  * otherwise (causal, or a window as long as the row) FlashAttention's loops: per query block (``lax.scan``) a
    loop over its key blocks (``lax.fori_loop`` from the first block any of its queries sees: blocks only other
    documents or padding see are skipped at run time), an online softmax one ``C x C`` block pair at a time, so
    every intermediate stays in cache; the backward pass loops over key blocks outside, query blocks inside.
    2-3x faster forward and backward than one batched op per diagonal of the block grid, whose row-long
    intermediates went to memory between fusions (ByteLM ``small``'s shapes). ``unroll=True`` (default inside
    :func:`unrolled_block_loops`) unrolls both loops over every pair the causal/window mask allows.

  The gradients are FlashAttention-2's: the forward pass keeps the output and each query's log-sum-exp, and the
  backward pass recomputes the probabilities block by block (autodiff through the loop kept every block's
  intermediates).
  """
  check_shapes(q_BxTxHxK, k_BxTxGxK, v_BxTxGxK, mask)
  if not mask.packed or q_BxTxHxK.shape[1] != k_BxTxGxK.shape[1]:
    raise ValueError("blocked_packed_attention needs a packed self-attention mask (AttentionMask.packed_row)")
  t, kd = q_BxTxHxK.shape[1], q_BxTxHxK.shape[3]
  block = block or packed_block_size(t, mask.window)
  scale = kd**-0.5 if scale is None else scale
  first_BxT = _first_visible_key(mask.q_positions_BxT, mask.q_segments_or_ones(), mask.window)
  n = -(-t // block)
  span = n - 1 if mask.window is None else min(n - 1, (mask.window + block - 2) // block)
  unroll = _UNROLL_BLOCK_LOOPS.get() if unroll is None else unroll
  if span < n - 1:
    return _banded_attention(_BandLayout(block, scale, span, unroll), q_BxTxHxK, k_BxTxGxK, v_BxTxGxK, first_BxT)
  return _blocked_attention(_BlockLayout(block, scale, unroll), q_BxTxHxK, k_BxTxGxK, v_BxTxGxK, first_BxT)


class _BlockLayout(NamedTuple):
  """The static part of the loop schedule: block length, score scale, whether the loops are unrolled. It runs only
  where every query may see every earlier key of its document (no window, or one as long as the row)."""
  block: int
  scale: float
  unroll: bool = False


def _first_visible_key(positions_BxT, segment_ids_BxT, window: int | None):
  """Per query of a packed row, the index of the first key it sees (its document's start, or the window's);
  past the row's end for padding, which sees nothing."""
  t = positions_BxT.shape[1]
  index_T = jnp.arange(t, dtype=jnp.int32)
  first_BxT = index_T - positions_BxT.astype(jnp.int32)
  if window is not None:
    first_BxT = jnp.maximum(first_BxT, index_T - window + 1)
  return jnp.where(segment_ids_BxT != 0, first_BxT, 2 * t)


def _block_major(x_BxTx, c: int):
  """``BxTx...`` -> ``NxBxCx...`` (the row padded to ``N * C``)."""
  b, t = x_BxTx.shape[:2]
  n = -(-t // c)
  x = jnp.pad(x_BxTx, [(0, 0), (0, n * c - t)] + [(0, 0)] * (x_BxTx.ndim - 2))
  return jnp.moveaxis(x.reshape(b, n, c, *x_BxTx.shape[2:]), 1, 0)


def _query_blocks(x_BxTxHxK, g: int, c: int):
  """Queries (or their gradients) ``BxTxHxK`` -> ``NxBxGxXxK``, ``X = R * C`` rows per kv head (``H = G * R``)."""
  b, _, h, kd = x_BxTxHxK.shape
  x = _block_major(x_BxTxHxK, c)
  n = x.shape[0]
  return x.reshape(n, b, c, g, h // g, kd).transpose(0, 1, 3, 4, 2, 5).reshape(n, b, g, h // g * c, kd)


def _from_query_blocks(x_NxBxGxXxK, t: int, c: int):
  n, b, g, x, kd = x_NxBxGxXxK.shape
  r = x // c
  return x_NxBxGxXxK.reshape(n, b, g, r, c, kd).transpose(1, 0, 4, 2, 3, 5).reshape(b, n * c, g * r, kd)[:, :t]


def _key_blocks(x_BxTxGxK, c: int):
  """Keys or values ``BxTxGxK`` -> ``NxBxGxCxK``."""
  return _block_major(x_BxTxGxK, c).transpose(0, 1, 3, 2, 4)


def _from_key_blocks(x_NxBxGxCxK, t: int):
  n, b, g, c, kd = x_NxBxGxCxK.shape
  return x_NxBxGxCxK.transpose(1, 0, 3, 2, 4).reshape(b, n * c, g, kd)[:, :t]


def _loop_blocks(first_BxT, c: int):
  """``first_BxT`` as ``NxBxC`` blocks, the row's padding to whole blocks marked as seeing no key."""
  t = first_BxT.shape[1]
  return _block_major(jnp.pad(first_BxT, [(0, 0), (0, -(-t // c) * c - t)], constant_values=2 * t), c)


def _key_block_ranges(first_NxBxC):
  """Per query block, the first key block any of its queries sees (``lo``); per key block, the last query block
  with a query that sees it (``hi``). Padding sees nothing, so a block of padding gets an empty range."""
  n, _, c = first_NxBxC.shape
  lo_N = jnp.minimum(jnp.min(first_NxBxC, axis=(1, 2)) // c, n)
  query_T = jnp.arange(n * c, dtype=jnp.int32)
  first_BxT = jnp.moveaxis(first_NxBxC, 0, 1).reshape(first_NxBxC.shape[1], n * c)
  last_key_N = (jnp.arange(n, dtype=jnp.int32) + 1) * c - 1
  # The last query whose first visible key is at or before the key block's end (-1: none).
  last_query_N = jnp.max(jnp.where(first_BxT[None] <= last_key_N[:, None, None], query_T, -1), axis=(1, 2))
  return lo_N, jnp.where(last_query_N >= 0, last_query_N // c, -1)


def _pairs(layout: _BlockLayout, n: int, outer: int, lo, hi, body, carry, *, keys_inner: bool):
  """``carry = body(inner, carry)`` for the inner blocks ``lo..hi`` that the mask can reach from block ``outer``
  (key blocks of a query block if ``keys_inner``, else query blocks of a key block).

  A loop with a traced trip count (blocks that only padding or other documents see are skipped); unrolled
  (``layout.unroll``, for XLA's cost analysis) it visits every causal pair, statically (``flops.xla_keys``)."""
  if not layout.unroll:
    return jax.lax.fori_loop(lo, hi + 1, body, carry)
  inner = range(0, outer + 1) if keys_inner else range(outer, n)  # ``lo``/``hi`` are traced here
  for i in inner:
    carry = body(jnp.int32(i), carry)
  return carry


_NO_SCORE = -1e30  # the running max before any visible key: finite, so no select guards the rescaling


def _blocked_forward(layout: _BlockLayout, q_BxTxHxK, k_BxTxGxK, v_BxTxGxK, first_BxT):
  """Output ``BxTxHxK`` and each query's log-sum-exp ``NxBxGxX`` (0 where it sees no key): per query block, an
  online softmax over its key blocks, one block pair at a time (every intermediate one block pair's, so it stays
  in cache)."""
  b, t, h, kd = q_BxTxHxK.shape
  g = k_BxTxGxK.shape[2]
  r, c = h // g, layout.block
  n = -(-t // c)
  acc_dtype = jnp.promote_types(q_BxTxHxK.dtype, jnp.float32)
  q_NxBxGxXxK = _query_blocks(q_BxTxHxK, g, c)
  k_NxBxGxCxK, v_NxBxGxCxK = _key_blocks(k_BxTxGxK, c), _key_blocks(v_BxTxGxK, c)
  first_NxBxC = _loop_blocks(first_BxT, c)
  lo_N, _ = _key_block_ranges(first_NxBxC)

  def query_block(i, q_BxGxXxK, first_BxC):
    def pair(j, carry):
      m_BxGxX, l_BxGxX, acc_BxGxXxK = carry
      k_BxGxCxK = jax.lax.dynamic_index_in_dim(k_NxBxGxCxK, j, keepdims=False)
      v_BxGxCxK = jax.lax.dynamic_index_in_dim(v_NxBxGxCxK, j, keepdims=False)
      scores = jnp.einsum("bgxk,bgsk->bgxs", q_BxGxXxK, k_BxGxCxK, preferred_element_type=acc_dtype) * layout.scale
      scores = jnp.where(_band_visible(first_BxC, j * c, i * c, c, c, r), scores, -jnp.inf)
      m_new = jnp.maximum(m_BxGxX, jnp.max(scores, axis=-1))
      weights = jnp.exp(scores - m_new[..., None])  # exactly 0 where masked
      rescale = jnp.exp(m_BxGxX - m_new)
      weighted = jnp.einsum("bgxs,bgsk->bgxk", weights.astype(v_BxGxCxK.dtype), v_BxGxCxK,
                            preferred_element_type=acc_dtype)
      return m_new, l_BxGxX * rescale + jnp.sum(weights, axis=-1), acc_BxGxXxK * rescale[..., None] + weighted

    m0 = jnp.full(q_BxGxXxK.shape[:-1], _NO_SCORE, acc_dtype)
    carry = (m0, jnp.zeros_like(m0), jnp.zeros(q_BxGxXxK.shape, acc_dtype))
    m_BxGxX, l_BxGxX, acc_BxGxXxK = _pairs(layout, n, i, lo_N[i], i, pair, carry, keys_inner=True)
    seen = l_BxGxX > 0
    out = acc_BxGxXxK / jnp.where(seen, l_BxGxX, 1.0)[..., None]
    return out, jnp.where(seen, m_BxGxX + jnp.log(jnp.where(seen, l_BxGxX, 1.0)), 0.0)

  if layout.unroll:
    outs = [query_block(i, q_NxBxGxXxK[i], first_NxBxC[i]) for i in range(n)]
    out_NxBxGxXxK, lse_NxBxGxX = (jnp.stack(x) for x in zip(*outs))
  else:
    _, (out_NxBxGxXxK, lse_NxBxGxX) = jax.lax.scan(
        lambda _, xs: (None, query_block(*xs)), None, (jnp.arange(n, dtype=jnp.int32), q_NxBxGxXxK, first_NxBxC))
  return _from_query_blocks(out_NxBxGxXxK, t, c).astype(q_BxTxHxK.dtype), lse_NxBxGxX


def _flash_gradient(forward, backward):
  """``forward(layout, q, k, v, first) -> (out, lse)`` as a function of ``(layout, q, k, v, first)`` returning
  ``out``, differentiated FlashAttention-2's way: the forward pass keeps ``(q, k, v, first, out, lse)`` and
  ``backward(layout, residuals, dout)`` recomputes the probabilities from them."""

  @functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
  def attention(layout, q_BxTxHxK, k_BxTxGxK, v_BxTxGxK, first_BxT):
    return forward(layout, q_BxTxHxK, k_BxTxGxK, v_BxTxGxK, first_BxT)[0]

  def attention_fwd(layout, q_BxTxHxK, k_BxTxGxK, v_BxTxGxK, first_BxT):
    out_BxTxHxK, lse_NxBxGxX = forward(layout, q_BxTxHxK, k_BxTxGxK, v_BxTxGxK, first_BxT)
    return out_BxTxHxK, (q_BxTxHxK, k_BxTxGxK, v_BxTxGxK, first_BxT, out_BxTxHxK, lse_NxBxGxX)

  attention.defvjp(attention_fwd, backward)
  return attention


def _blocked_attention_bwd(layout, residuals, dout_BxTxHxK):
  """FlashAttention-2's backward pass: per key block, a loop over the query blocks that see it, recomputing
  ``P = exp(S - lse)`` per block pair; dV = P^T dO, dS = P * (dO V^T - rowsum(dO * O)), dK = dS^T Q accumulate
  in the loop's carry and dQ = dS K is added into a row-long accumulator (updated in place)."""
  q_BxTxHxK, k_BxTxGxK, v_BxTxGxK, first_BxT, out_BxTxHxK, lse_NxBxGxX = residuals
  t, h, kd = q_BxTxHxK.shape[1:]
  g = k_BxTxGxK.shape[2]
  r, c = h // g, layout.block
  n = -(-t // c)
  acc_dtype = lse_NxBxGxX.dtype
  q_NxBxGxXxK, do_NxBxGxXxK = _query_blocks(q_BxTxHxK, g, c), _query_blocks(dout_BxTxHxK, g, c)
  k_NxBxGxCxK, v_NxBxGxCxK = _key_blocks(k_BxTxGxK, c), _key_blocks(v_BxTxGxK, c)
  first_NxBxC = _loop_blocks(first_BxT, c)
  _, hi_N = _key_block_ranges(first_NxBxC)
  # rowsum(dO * O): the softmax Jacobian's correction term, one per query.
  delta_BxTxHx1 = jnp.sum(dout_BxTxHxK.astype(acc_dtype) * out_BxTxHxK.astype(acc_dtype), axis=-1, keepdims=True)
  delta_NxBxGxX = _query_blocks(delta_BxTxHx1, g, c)[..., 0]
  at = lambda x, i: jax.lax.dynamic_index_in_dim(x, i, keepdims=False)  # noqa: E731

  def key_block(j, k_BxGxCxK, v_BxGxCxK, dq_NxBxGxXxK):
    def pair(i, carry):
      dq_NxBxGxXxK, dkt_BxGxKxC, dvt_BxGxKxC = carry
      q_BxGxXxK, do_BxGxXxK = at(q_NxBxGxXxK, i), at(do_NxBxGxXxK, i)
      scores = jnp.einsum("bgxk,bgsk->bgxs", q_BxGxXxK, k_BxGxCxK, preferred_element_type=acc_dtype) * layout.scale
      visible = _band_visible(at(first_NxBxC, i), j * c, i * c, c, c, r)
      probs = jnp.exp(jnp.where(visible, scores, -jnp.inf) - at(lse_NxBxGxX, i)[..., None])
      # dK and dV accumulate transposed (``BxGxKxC``): contracting over the queries with K leading the output
      # runs ~3x faster on XLA:CPU than with the ``CxK`` output (which it transposes per block).
      dvt_BxGxKxC += jnp.einsum("bgxk,bgxs->bgks", do_BxGxXxK, probs.astype(do_BxGxXxK.dtype),
                                preferred_element_type=acc_dtype)
      dprobs = jnp.einsum("bgxk,bgsk->bgxs", do_BxGxXxK, v_BxGxCxK, preferred_element_type=acc_dtype)
      dscores = (probs * (dprobs - at(delta_NxBxGxX, i)[..., None]) * layout.scale).astype(q_BxGxXxK.dtype)
      dq_BxGxXxK = jnp.einsum("bgxs,bgsk->bgxk", dscores, k_BxGxCxK, preferred_element_type=acc_dtype)
      dq_NxBxGxXxK = jax.lax.dynamic_update_index_in_dim(dq_NxBxGxXxK, at(dq_NxBxGxXxK, i) + dq_BxGxXxK, i, 0)
      dkt_BxGxKxC += jnp.einsum("bgxk,bgxs->bgks", q_BxGxXxK, dscores, preferred_element_type=acc_dtype)
      return dq_NxBxGxXxK, dkt_BxGxKxC, dvt_BxGxKxC

    zeros = jnp.zeros(k_BxGxCxK.shape[:2] + (kd, c), acc_dtype)
    return _pairs(layout, n, j, j, hi_N[j], pair, (dq_NxBxGxXxK, zeros, zeros), keys_inner=False)

  dq_NxBxGxXxK = jnp.zeros(q_NxBxGxXxK.shape, acc_dtype)
  if layout.unroll:
    dkts, dvts = [], []
    for j in range(n):
      dq_NxBxGxXxK, dkt, dvt = key_block(j, k_NxBxGxCxK[j], v_NxBxGxCxK[j], dq_NxBxGxXxK)
      dkts.append(dkt)
      dvts.append(dvt)
    dkt_NxBxGxKxC, dvt_NxBxGxKxC = jnp.stack(dkts), jnp.stack(dvts)
  else:
    def body(dq, xs):
      dq, dkt, dvt = key_block(*xs, dq)
      return dq, (dkt, dvt)

    dq_NxBxGxXxK, (dkt_NxBxGxKxC, dvt_NxBxGxKxC) = jax.lax.scan(
        body, dq_NxBxGxXxK, (jnp.arange(n, dtype=jnp.int32), k_NxBxGxCxK, v_NxBxGxCxK))
  return (_from_query_blocks(dq_NxBxGxXxK, t, c).astype(q_BxTxHxK.dtype),
          _from_key_blocks(jnp.swapaxes(dkt_NxBxGxKxC, -1, -2), t).astype(k_BxTxGxK.dtype),
          _from_key_blocks(jnp.swapaxes(dvt_NxBxGxKxC, -1, -2), t).astype(v_BxTxGxK.dtype), None)


_blocked_attention = _flash_gradient(_blocked_forward, _blocked_attention_bwd)


# --- Banded schedule: a loop over query blocks, one softmax over each block's band of key blocks -------------

class _BandLayout(NamedTuple):
  """The static part of the banded schedule: block length, score scale, key blocks before a query block's own
  that its band reads (``D``), whether the loop is unrolled."""
  block: int
  scale: float
  span: int
  unroll: bool


def _rows(x_BxTxGxK, c: int):
  """Keys or values (or their gradients) ``BxTxGxK`` -> ``BxGx(N*C)xK``, the row padded to whole blocks: a band of
  key blocks is then one contiguous slice."""
  t = x_BxTxGxK.shape[1]
  return jnp.pad(x_BxTxGxK, [(0, 0), (0, -(-t // c) * c - t), (0, 0), (0, 0)]).transpose(0, 2, 1, 3)


def _band_visible(first_BxC, band_start, query_start, c: int, s: int, r: int):
  """``Bx1xXxS``: which of the ``S`` keys from index ``band_start`` on each query of the block starting at
  ``query_start`` sees (``first <= key <= query``); ``X = R * C`` rows ordered as ``_query_blocks`` orders them."""
  # Rows tiled before the comparisons, not the boolean result after them (16% of the loop schedule's time).
  key_S = band_start + jnp.arange(s, dtype=jnp.int32)
  query_X = query_start + jnp.tile(jnp.arange(c, dtype=jnp.int32), r)
  first_BxX = jnp.tile(first_BxC, (1, r))
  return ((key_S >= first_BxX[..., None]) & (key_S <= query_X[:, None]))[:, None]


def _band_block_forward(scale, q_BxGxXxK, k_BxGxSxK, v_BxGxSxK, visible_Bx1xXxS):
  """One query block against its band: output ``BxGxXxK`` (accumulation dtype) and log-sum-exp ``BxGxX`` (0 where
  the query sees no key)."""
  acc_dtype = jnp.promote_types(q_BxGxXxK.dtype, jnp.float32)
  scores = jnp.einsum("bgxk,bgsk->bgxs", q_BxGxXxK, k_BxGxSxK, preferred_element_type=acc_dtype) * scale
  scores = jnp.where(visible_Bx1xXxS, scores, -jnp.inf)
  m_BxGxX = jnp.max(scores, axis=-1)
  m_safe = jnp.where(jnp.isfinite(m_BxGxX), m_BxGxX, 0.0)
  weights = jnp.exp(scores - m_safe[..., None])  # exactly 0 where masked
  l_BxGxX = jnp.sum(weights, axis=-1)
  out = jnp.einsum("bgxs,bgsk->bgxk", weights.astype(v_BxGxSxK.dtype), v_BxGxSxK, preferred_element_type=acc_dtype)
  seen = l_BxGxX > 0
  l_safe = jnp.where(seen, l_BxGxX, 1.0)
  return out / l_safe[..., None], jnp.where(seen, m_safe + jnp.log(l_safe), 0.0)


def _band_block_backward(scale, q_BxGxXxK, k_BxGxSxK, v_BxGxSxK, visible_Bx1xXxS, do_BxGxXxK, lse_BxGxX, delta_BxGxX):
  """Gradients ``(dq BxGxXxK, dk^T BxGxKxS, dv^T BxGxKxS)`` of one query block and its band (accumulation dtype;
  dK and dV transposed, see ``_blocked_attention_bwd``)."""
  acc_dtype = lse_BxGxX.dtype
  scores = jnp.einsum("bgxk,bgsk->bgxs", q_BxGxXxK, k_BxGxSxK, preferred_element_type=acc_dtype) * scale
  probs = jnp.exp(jnp.where(visible_Bx1xXxS, scores, -jnp.inf) - lse_BxGxX[..., None])
  dvt = jnp.einsum("bgxk,bgxs->bgks", do_BxGxXxK, probs.astype(do_BxGxXxK.dtype), preferred_element_type=acc_dtype)
  dprobs = jnp.einsum("bgxk,bgsk->bgxs", do_BxGxXxK, v_BxGxSxK, preferred_element_type=acc_dtype)
  dscores = (probs * (dprobs - delta_BxGxX[..., None]) * scale).astype(q_BxGxXxK.dtype)
  dq = jnp.einsum("bgxs,bgsk->bgxk", dscores, k_BxGxSxK, preferred_element_type=acc_dtype)
  dkt = jnp.einsum("bgxk,bgxs->bgks", q_BxGxXxK, dscores, preferred_element_type=acc_dtype)
  return dq, dkt, dvt


def _band_forward(layout: _BandLayout, q_BxTxHxK, k_BxTxGxK, v_BxTxGxK, first_BxT):
  """Output ``BxTxHxK`` and each query's log-sum-exp ``NxBxGxX``."""
  t, h = q_BxTxHxK.shape[1:3]
  g = k_BxTxGxK.shape[2]
  r, c, span = h // g, layout.block, layout.span
  s = (span + 1) * c
  q_NxBxGxXxK = _query_blocks(q_BxTxHxK, g, c)
  k_BxGxTxK, v_BxGxTxK = _rows(k_BxTxGxK, c), _rows(v_BxTxGxK, c)
  first_NxBxC = _block_major(first_BxT, c)
  n = q_NxBxGxXxK.shape[0]
  acc_dtype = jnp.promote_types(q_BxTxHxK.dtype, jnp.float32)

  outs, lses = [], []
  for i in range(span):  # the first blocks: a band from key 0, shorter than the others
    visible = _band_visible(first_NxBxC[i], 0, i * c, c, (i + 1) * c, r)
    out, lse = _band_block_forward(layout.scale, q_NxBxGxXxK[i], k_BxGxTxK[:, :, :(i + 1) * c],
                                   v_BxGxTxK[:, :, :(i + 1) * c], visible)
    outs.append(out[None].astype(acc_dtype))
    lses.append(lse[None])

  def body(_, xs):
    i, q_BxGxXxK, first_BxC = xs
    start = (i - span) * c
    visible = _band_visible(first_BxC, start, i * c, c, s, r)
    band = lambda x: jax.lax.dynamic_slice_in_dim(x, start, s, axis=2)  # noqa: E731
    return None, _band_block_forward(layout.scale, q_BxGxXxK, band(k_BxGxTxK), band(v_BxGxTxK), visible)

  xs = (jnp.arange(span, n, dtype=jnp.int32), q_NxBxGxXxK[span:], first_NxBxC[span:])
  _, (out, lse) = jax.lax.scan(body, None, xs, unroll=True if layout.unroll else 1)
  out_NxBxGxXxK = jnp.concatenate([*outs, out.astype(acc_dtype)])
  return _from_query_blocks(out_NxBxGxXxK, t, c).astype(q_BxTxHxK.dtype), jnp.concatenate([*lses, lse])


def _banded_attention_bwd(layout, residuals, dout_BxTxHxK):
  """The same loop backwards in effect: each query block's dq, and its band's dk/dv added into row-long
  accumulators (updated in place by the loop)."""
  q_BxTxHxK, k_BxTxGxK, v_BxTxGxK, first_BxT, out_BxTxHxK, lse_NxBxGxX = residuals
  t, h = q_BxTxHxK.shape[1:3]
  g = k_BxTxGxK.shape[2]
  r, c, span = h // g, layout.block, layout.span
  s = (span + 1) * c
  acc_dtype = lse_NxBxGxX.dtype
  q_NxBxGxXxK, do_NxBxGxXxK = _query_blocks(q_BxTxHxK, g, c), _query_blocks(dout_BxTxHxK, g, c)
  k_BxGxTxK, v_BxGxTxK = _rows(k_BxTxGxK, c), _rows(v_BxTxGxK, c)
  first_NxBxC = _block_major(first_BxT, c)
  n = q_NxBxGxXxK.shape[0]
  delta_BxTxHx1 = jnp.sum(dout_BxTxHxK.astype(acc_dtype) * out_BxTxHxK.astype(acc_dtype), axis=-1, keepdims=True)
  delta_NxBxGxX = _query_blocks(delta_BxTxHx1, g, c)[..., 0]

  # Transposed accumulators, as in _blocked_attention_bwd.
  dkt_BxGxKxT = jnp.zeros(k_BxGxTxK.shape[:2] + k_BxGxTxK.shape[:1:-1], acc_dtype)
  dvt_BxGxKxT = jnp.zeros(dkt_BxGxKxT.shape, acc_dtype)
  dqs = []
  for i in range(span):
    visible = _band_visible(first_NxBxC[i], 0, i * c, c, (i + 1) * c, r)
    dq, dkt, dvt = _band_block_backward(layout.scale, q_NxBxGxXxK[i], k_BxGxTxK[:, :, :(i + 1) * c],
                                      v_BxGxTxK[:, :, :(i + 1) * c], visible, do_NxBxGxXxK[i], lse_NxBxGxX[i],
                                      delta_NxBxGxX[i])
    dqs.append(dq[None])
    dkt_BxGxKxT = dkt_BxGxKxT.at[..., :(i + 1) * c].add(dkt)
    dvt_BxGxKxT = dvt_BxGxKxT.at[..., :(i + 1) * c].add(dvt)

  def body(carry, xs):
    dkt_acc, dvt_acc = carry
    i, q_BxGxXxK, first_BxC, do_BxGxXxK, lse_BxGxX, delta_BxGxX = xs
    start = (i - span) * c
    visible = _band_visible(first_BxC, start, i * c, c, s, r)
    band = lambda x: jax.lax.dynamic_slice_in_dim(x, start, s, axis=2)  # noqa: E731
    dq, dkt, dvt = _band_block_backward(layout.scale, q_BxGxXxK, band(k_BxGxTxK), band(v_BxGxTxK), visible,
                                        do_BxGxXxK, lse_BxGxX, delta_BxGxX)
    add = lambda acc, x: jax.lax.dynamic_update_slice_in_dim(  # noqa: E731
        acc, jax.lax.dynamic_slice_in_dim(acc, start, s, axis=3) + x, start, axis=3)
    return (add(dkt_acc, dkt), add(dvt_acc, dvt)), dq

  xs = (jnp.arange(span, n, dtype=jnp.int32), q_NxBxGxXxK[span:], first_NxBxC[span:], do_NxBxGxXxK[span:],
        lse_NxBxGxX[span:], delta_NxBxGxX[span:])
  (dkt_BxGxKxT, dvt_BxGxKxT), dq = jax.lax.scan(body, (dkt_BxGxKxT, dvt_BxGxKxT), xs,
                                                unroll=True if layout.unroll else 1)
  dq_NxBxGxXxK = jnp.concatenate([*dqs, dq])
  unrow = lambda x, like: x[..., :t].transpose(0, 3, 1, 2).astype(like.dtype)  # noqa: E731
  return (_from_query_blocks(dq_NxBxGxXxK, t, c).astype(q_BxTxHxK.dtype), unrow(dkt_BxGxKxT, k_BxTxGxK),
          unrow(dvt_BxGxKxT, v_BxTxGxK), None)


_banded_attention = _flash_gradient(_band_forward, _banded_attention_bwd)


def segment_local_attention(q_BxNxHxK, k_BxTxHxK, v_BxTxHxK, mask: AttentionMask, *, scale: float | None = None):
  """Attention under an ``AttentionMask.segment_local`` mask in ``O(T)``: each key scores against the ``Q``
  queries of its own segment only and the softmax is taken per segment with segment reductions, instead of the
  ``(M * Q) x T`` score matrix (``M`` segments). Equals :func:`attention_reference` under the same mask; segments
  that take no part or have no keys give zeros. Softmax in float32 (or wider).
  """
  check_shapes(q_BxNxHxK, k_BxTxHxK, v_BxTxHxK, mask)
  nq = mask.queries_per_segment
  if not nq or k_BxTxHxK.shape[2] != q_BxNxHxK.shape[2]:
    raise ValueError("segment_local_attention needs an AttentionMask.segment_local mask and as many kv heads as "
                     "query heads")
  b, n, h, k = q_BxNxHxK.shape
  m, t = n // nq, k_BxTxHxK.shape[1]
  scale = k**-0.5 if scale is None else scale
  q_BxMxQxHxK = q_BxNxHxK.reshape(b, m, nq, h, k)
  valid_BxM = mask.q_segment_ids_BxT[:, ::nq] != 0
  member_BxT = mask.kv_segment_ids_BxS != 0
  own_BxT = jnp.where(member_BxT, mask.kv_segment_ids_BxS - 1, 0)
  acc_dtype = jnp.promote_types(q_BxNxHxK.dtype, jnp.float32)
  own_q_BxTxQxHxK = jax.vmap(lambda q, i: jnp.take(q, i, axis=0))(q_BxMxQxHxK, own_BxT)
  scores_BxTxQxH = jnp.einsum("btqhk,bthk->btqh", own_q_BxTxQxHxK, k_BxTxHxK, preferred_element_type=acc_dtype) * scale
  # One flat segment space: row b owns segments [b*(M+1), b*(M+1)+M]; the last one collects non-members.
  flat_N = (jnp.where(member_BxT, own_BxT, m) + jnp.arange(b)[:, None] * (m + 1)).reshape(-1)
  scores_NxQxH = scores_BxTxQxH.reshape(b * t, nq, h)
  # The max only keeps exp() in range: its gradient cancels in the softmax, so none is taken through it.
  segment_max = jax.ops.segment_max(jax.lax.stop_gradient(scores_NxQxH), flat_N, b * (m + 1))
  weights_NxQxH = jnp.exp(scores_NxQxH - segment_max[flat_N])
  denominator = jax.ops.segment_sum(weights_NxQxH, flat_N, b * (m + 1))  # >= 1 wherever a member key is
  probs_NxQxH = (weights_NxQxH / denominator[flat_N]).astype(v_BxTxHxK.dtype)
  weighted_NxQxHxK = jnp.einsum("nqh,nhk->nqhk", probs_NxQxH, v_BxTxHxK.reshape(b * t, h, k),
                                preferred_element_type=acc_dtype)
  out = jax.ops.segment_sum(weighted_NxQxHxK, flat_N, b * (m + 1)).reshape(b, m + 1, nq, h, k)[:, :m]
  out = jnp.where(valid_BxM[:, :, None, None, None], out, 0.0)
  return out.reshape(b, n, h, k).astype(q_BxNxHxK.dtype)


def resolve_impl(impl: str) -> str:
  """``auto`` -> the fastest correct implementation on the default backend."""
  if impl not in ATTENTION_IMPLS:
    raise ValueError(f"attention impl must be one of {ATTENTION_IMPLS}, got {impl!r}")
  if impl != "auto":
    return impl
  return "xla"  # Pallas kernels opt in per backend once benchmarked (see bytescale/kernels).


def attention(
    q_BxTxHxK,
    k_BxSxGxK,
    v_BxSxGxK,
    mask: AttentionMask,
    *,
    scale: float | None = None,
    impl: AttentionImpl = "auto",
):
  """Attention with the implementation picked by ``impl`` (mask semantics: :mod:`bytescale.ops.mask`)."""
  impl = resolve_impl(impl)
  if impl == "xla":
    t = q_BxTxHxK.shape[1]
    if mask.packed and t == k_BxSxGxK.shape[1] and t > packed_block_size(t, mask.window):
      return blocked_packed_attention(q_BxTxHxK, k_BxSxGxK, v_BxSxGxK, mask, scale=scale)
    if mask.queries_per_segment and q_BxTxHxK.shape[2] == k_BxSxGxK.shape[2]:
      return segment_local_attention(q_BxTxHxK, k_BxSxGxK, v_BxSxGxK, mask, scale=scale)
    return attention_reference(q_BxTxHxK, k_BxSxGxK, v_BxSxGxK, mask, scale=scale)
  if impl == "pallas":
    from bytescale.kernels import flash_attention  # imported lazily: Pallas is optional at import time

    return flash_attention.flash_attention(q_BxTxHxK, k_BxSxGxK, v_BxSxGxK, mask, scale=scale)
  if impl == "cudnn":
    from bytescale.kernels import cudnn_attention

    return cudnn_attention.cudnn_attention(q_BxTxHxK, k_BxSxGxK, v_BxSxGxK, mask, scale=scale)
  raise AssertionError(impl)
