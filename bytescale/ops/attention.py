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


PACKED_BLOCK = 128  # longest key/query block of the blocked XLA path (shorter for short windows)


def packed_block_size(seq_len: int, window: int | None) -> int:
  """Block length of :func:`blocked_packed_attention` for rows of ``seq_len`` tokens: at most ``PACKED_BLOCK``.

  With a window: a row no longer than the window rounded up to a multiple of 8 is one block (the dense path);
  a longer row takes blocks of about half the window (a multiple of 8), each query block then reading a band of
  ``(window + C - 2) // C + 1`` key blocks (3 when the window is a multiple of 16): about ``1.5 x window`` scores
  per query where blocks of the window's length computed ``2 x window``."""
  if window is None:
    return min(PACKED_BLOCK, max(8, -(-seq_len // 8) * 8))
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
  * otherwise an online softmax over the diagonals of the block grid, each diagonal one batched op over all its
    block pairs (block-major ``NxBxGx(R*C)xK`` layout: every diagonal is a contiguous slice and every matmul
    reads its operands without transposes).

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
  if span < n - 1:
    unroll = _UNROLL_BLOCK_LOOPS.get() if unroll is None else unroll
    return _banded_attention(_BandLayout(block, scale, span, unroll), q_BxTxHxK, k_BxTxGxK, v_BxTxGxK, first_BxT)
  return _blocked_attention(_BlockLayout(block, scale, mask.window), q_BxTxHxK, k_BxTxGxK, v_BxTxGxK, first_BxT)


class _BlockLayout(NamedTuple):
  """The static part of :func:`blocked_packed_attention`: block length, score scale, window."""
  block: int
  scale: float
  window: int | None


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


def _diagonals(layout: _BlockLayout, first_NxBxC, r: int):
  """Per block diagonal ``d`` (query blocks ``d..N-1`` against key blocks ``0..N-1-d``) the visibility
  ``MxBx1xXxC`` of its ``M = N - d`` block pairs, for every diagonal the mask can reach: key ``j`` of the pair
  is visible iff ``first <= j <= query index``."""
  n, b, c = first_NxBxC.shape
  max_d = n - 1 if layout.window is None else min(n - 1, (layout.window + c - 2) // c)
  key_C = jnp.arange(c, dtype=jnp.int32)
  causal_XxC = jnp.tile(key_C[None, :] <= key_C[:, None], (r, 1))
  for d in range(max_d + 1):
    # The first visible key as an offset into the key block (a - d) of query block a.
    first_MxBxC = first_NxBxC[d:] - (jnp.arange(n - d, dtype=jnp.int32) * c)[:, None, None]
    first_MxBx1xX = jnp.tile(first_MxBxC, (1, 1, r))[:, :, None, :]
    visible = key_C >= first_MxBx1xX[..., None]
    if d == 0:  # the only diagonal where a key can come after its query
      visible &= causal_XxC
    yield d, visible


def _blocked_forward(layout: _BlockLayout, q_BxTxHxK, k_BxTxGxK, v_BxTxGxK, first_BxT):
  """Output ``BxTxHxK`` and each query's log-sum-exp ``NxBxGxX`` (0 where it sees no key)."""
  b, t, h, kd = q_BxTxHxK.shape
  g = k_BxTxGxK.shape[2]
  r, c = h // g, layout.block
  n = -(-t // c)
  acc_dtype = jnp.promote_types(q_BxTxHxK.dtype, jnp.float32)
  q_NxBxGxXxK = _query_blocks(q_BxTxHxK, g, c)
  k_NxBxGxCxK, v_NxBxGxCxK = _key_blocks(k_BxTxGxK, c), _key_blocks(v_BxTxGxK, c)

  m_NxBxGxX = jnp.full((n, b, g, r * c), -jnp.inf, acc_dtype)  # running max, sum and weighted values per query
  l_NxBxGxX = jnp.zeros((n, b, g, r * c), acc_dtype)
  acc_NxBxGxXxK = jnp.zeros((n, b, g, r * c, kd), acc_dtype)
  for d, visible in _diagonals(layout, _block_major(first_BxT, c), r):
    scores = jnp.einsum("mbgxk,mbgsk->mbgxs", q_NxBxGxXxK[d:], k_NxBxGxCxK[:n - d],
                        preferred_element_type=acc_dtype) * layout.scale
    scores = jnp.where(visible, scores, -jnp.inf)
    m_old = m_NxBxGxX[d:]
    m_new = jnp.maximum(m_old, jnp.max(scores, axis=-1))
    m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
    weights = jnp.exp(scores - m_safe[..., None])  # exactly 0 where masked (one select fewer)
    rescale = jnp.where(jnp.isfinite(m_old), jnp.exp(m_old - m_safe), 0.0)
    l_NxBxGxX = l_NxBxGxX.at[d:].set(l_NxBxGxX[d:] * rescale + jnp.sum(weights, axis=-1))
    weighted = jnp.einsum("mbgxs,mbgsk->mbgxk", weights.astype(v_BxTxGxK.dtype), v_NxBxGxCxK[:n - d],
                          preferred_element_type=acc_dtype)
    acc_NxBxGxXxK = acc_NxBxGxXxK.at[d:].set(acc_NxBxGxXxK[d:] * rescale[..., None] + weighted)
    m_NxBxGxX = m_NxBxGxX.at[d:].set(m_new)
  seen = l_NxBxGxX > 0
  out = acc_NxBxGxXxK / jnp.where(seen, l_NxBxGxX, 1.0)[..., None]
  lse_NxBxGxX = jnp.where(seen, m_NxBxGxX + jnp.log(jnp.where(seen, l_NxBxGxX, 1.0)), 0.0)
  return _from_query_blocks(out, t, c).astype(q_BxTxHxK.dtype), lse_NxBxGxX


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
  """dV = P^T dO, dS = P * (dO V^T - rowsum(dO * O)), dQ = dS K, dK = dS^T Q, with P = exp(S - lse) recomputed
  per block pair."""
  q_BxTxHxK, k_BxTxGxK, v_BxTxGxK, first_BxT, out_BxTxHxK, lse_NxBxGxX = residuals
  t, h = q_BxTxHxK.shape[1:3]
  g = k_BxTxGxK.shape[2]
  r, c = h // g, layout.block
  n = -(-t // c)
  acc_dtype = lse_NxBxGxX.dtype
  q_NxBxGxXxK, do_NxBxGxXxK = _query_blocks(q_BxTxHxK, g, c), _query_blocks(dout_BxTxHxK, g, c)
  k_NxBxGxCxK, v_NxBxGxCxK = _key_blocks(k_BxTxGxK, c), _key_blocks(v_BxTxGxK, c)
  # rowsum(dO * O): the softmax Jacobian's correction term, one per query.
  delta_BxTxHx1 = jnp.sum(dout_BxTxHxK.astype(acc_dtype) * out_BxTxHxK.astype(acc_dtype), axis=-1, keepdims=True)
  delta_NxBxGxX = _query_blocks(delta_BxTxHx1, g, c)[..., 0]

  dq_NxBxGxXxK = jnp.zeros(q_NxBxGxXxK.shape, acc_dtype)
  dk_NxBxGxCxK = jnp.zeros(k_NxBxGxCxK.shape, acc_dtype)
  dv_NxBxGxCxK = jnp.zeros(v_NxBxGxCxK.shape, acc_dtype)
  for d, visible in _diagonals(layout, _block_major(first_BxT, c), r):
    q, do = q_NxBxGxXxK[d:], do_NxBxGxXxK[d:]
    k, v = k_NxBxGxCxK[:n - d], v_NxBxGxCxK[:n - d]
    scores = jnp.einsum("mbgxk,mbgsk->mbgxs", q, k, preferred_element_type=acc_dtype) * layout.scale
    probs = jnp.exp(jnp.where(visible, scores, -jnp.inf) - lse_NxBxGxX[d:, ..., None])
    dv_NxBxGxCxK = dv_NxBxGxCxK.at[:n - d].add(
        jnp.einsum("mbgxs,mbgxk->mbgsk", probs.astype(do.dtype), do, preferred_element_type=acc_dtype))
    dprobs = jnp.einsum("mbgxk,mbgsk->mbgxs", do, v, preferred_element_type=acc_dtype)
    dscores = (probs * (dprobs - delta_NxBxGxX[d:, ..., None]) * layout.scale).astype(q.dtype)
    dq_NxBxGxXxK = dq_NxBxGxXxK.at[d:].add(
        jnp.einsum("mbgxs,mbgsk->mbgxk", dscores, k, preferred_element_type=acc_dtype))
    dk_NxBxGxCxK = dk_NxBxGxCxK.at[:n - d].add(
        jnp.einsum("mbgxs,mbgxk->mbgsk", dscores, q, preferred_element_type=acc_dtype))
  return (_from_query_blocks(dq_NxBxGxXxK, t, c).astype(q_BxTxHxK.dtype),
          _from_key_blocks(dk_NxBxGxCxK, t).astype(k_BxTxGxK.dtype),
          _from_key_blocks(dv_NxBxGxCxK, t).astype(v_BxTxGxK.dtype), None)


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
  lo_BxC = first_BxC - band_start
  hi_C = (query_start - band_start) + jnp.arange(c, dtype=jnp.int32)
  key_S = jnp.arange(s, dtype=jnp.int32)
  visible_BxCxS = (key_S >= lo_BxC[..., None]) & (key_S <= hi_C[:, None])
  return jnp.tile(visible_BxCxS, (1, r, 1))[:, None]


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
  """Gradients ``(dq BxGxXxK, dk BxGxSxK, dv BxGxSxK)`` of one query block and its band (accumulation dtype)."""
  acc_dtype = lse_BxGxX.dtype
  scores = jnp.einsum("bgxk,bgsk->bgxs", q_BxGxXxK, k_BxGxSxK, preferred_element_type=acc_dtype) * scale
  probs = jnp.exp(jnp.where(visible_Bx1xXxS, scores, -jnp.inf) - lse_BxGxX[..., None])
  dv = jnp.einsum("bgxs,bgxk->bgsk", probs.astype(do_BxGxXxK.dtype), do_BxGxXxK, preferred_element_type=acc_dtype)
  dprobs = jnp.einsum("bgxk,bgsk->bgxs", do_BxGxXxK, v_BxGxSxK, preferred_element_type=acc_dtype)
  dscores = (probs * (dprobs - delta_BxGxX[..., None]) * scale).astype(q_BxGxXxK.dtype)
  dq = jnp.einsum("bgxs,bgsk->bgxk", dscores, k_BxGxSxK, preferred_element_type=acc_dtype)
  dk = jnp.einsum("bgxs,bgxk->bgsk", dscores, q_BxGxXxK, preferred_element_type=acc_dtype)
  return dq, dk, dv


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

  dk_BxGxTxK = jnp.zeros(k_BxGxTxK.shape, acc_dtype)
  dv_BxGxTxK = jnp.zeros(v_BxGxTxK.shape, acc_dtype)
  dqs = []
  for i in range(span):
    visible = _band_visible(first_NxBxC[i], 0, i * c, c, (i + 1) * c, r)
    dq, dk, dv = _band_block_backward(layout.scale, q_NxBxGxXxK[i], k_BxGxTxK[:, :, :(i + 1) * c],
                                      v_BxGxTxK[:, :, :(i + 1) * c], visible, do_NxBxGxXxK[i], lse_NxBxGxX[i],
                                      delta_NxBxGxX[i])
    dqs.append(dq[None])
    dk_BxGxTxK = dk_BxGxTxK.at[:, :, :(i + 1) * c].add(dk)
    dv_BxGxTxK = dv_BxGxTxK.at[:, :, :(i + 1) * c].add(dv)

  def body(carry, xs):
    dk_acc, dv_acc = carry
    i, q_BxGxXxK, first_BxC, do_BxGxXxK, lse_BxGxX, delta_BxGxX = xs
    start = (i - span) * c
    visible = _band_visible(first_BxC, start, i * c, c, s, r)
    band = lambda x: jax.lax.dynamic_slice_in_dim(x, start, s, axis=2)  # noqa: E731
    dq, dk, dv = _band_block_backward(layout.scale, q_BxGxXxK, band(k_BxGxTxK), band(v_BxGxTxK), visible,
                                      do_BxGxXxK, lse_BxGxX, delta_BxGxX)
    add = lambda acc, x: jax.lax.dynamic_update_slice_in_dim(acc, band(acc) + x, start, axis=2)  # noqa: E731
    return (add(dk_acc, dk), add(dv_acc, dv)), dq

  xs = (jnp.arange(span, n, dtype=jnp.int32), q_NxBxGxXxK[span:], first_NxBxC[span:], do_NxBxGxXxK[span:],
        lse_NxBxGxX[span:], delta_NxBxGxX[span:])
  (dk_BxGxTxK, dv_BxGxTxK), dq = jax.lax.scan(body, (dk_BxGxTxK, dv_BxGxTxK), xs, unroll=True if layout.unroll else 1)
  dq_NxBxGxXxK = jnp.concatenate([*dqs, dq])
  unrow = lambda x, like: x[:, :, :t].transpose(0, 2, 1, 3).astype(like.dtype)  # noqa: E731
  return (_from_query_blocks(dq_NxBxGxXxK, t, c).astype(q_BxTxHxK.dtype), unrow(dk_BxGxTxK, k_BxTxGxK),
          unrow(dv_BxGxTxK, v_BxTxGxK), None)


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
