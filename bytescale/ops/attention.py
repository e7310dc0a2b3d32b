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

from typing import Literal

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


PACKED_BLOCK = 128  # longest key/query block of the blocked XLA path (shorter for short windows)


def packed_block_size(seq_len: int, window: int | None) -> int:
  """Block length of :func:`blocked_packed_attention` for rows of ``seq_len`` tokens: at most ``PACKED_BLOCK``,
  the window rounded up to a multiple of 8 when that is shorter (then a query block reads two key blocks)."""
  block = PACKED_BLOCK if window is None else min(PACKED_BLOCK, max(8, -(-window // 8) * 8))
  return min(block, max(8, -(-seq_len // 8) * 8))


def blocked_packed_attention(q_BxTxHxK, k_BxTxGxK, v_BxTxGxK, mask: AttentionMask, *, scale: float | None = None,
                             block: int | None = None):
  """Causal (optionally windowed) self-attention over packed rows without the ``TxT`` score matrix: plain jnp,
  an online softmax over the diagonals of ``C x C`` blocks, skipping the blocks the mask hides by construction.

  Needs ``mask.packed`` (``AttentionMask.packed_row``): a visible key then lies at most ``window - 1`` indices
  before its query and never after it, so query block ``i`` reads only key blocks ``i - d`` for
  ``d <= (window + C - 2) // C`` (every ``d <= i`` without a window): causal attention does about half the work of
  the dense path, a window of ``W`` about ``T * (W + C)`` instead of ``T * T``. Inside the blocks the mask is
  applied exactly, so the result equals :func:`attention_reference` (to float rounding; fully masked rows give
  zeros).
  """
  check_shapes(q_BxTxHxK, k_BxTxGxK, v_BxTxGxK, mask)
  if not mask.packed or q_BxTxHxK.shape[1] != k_BxTxGxK.shape[1]:
    raise ValueError("blocked_packed_attention needs a packed self-attention mask (AttentionMask.packed_row)")
  b, t, h, kd = q_BxTxHxK.shape
  g = k_BxTxGxK.shape[2]
  r = h // g
  c = block or packed_block_size(t, mask.window)
  n = -(-t // c)
  scale = kd**-0.5 if scale is None else scale
  acc_dtype = jnp.promote_types(q_BxTxHxK.dtype, jnp.float32)

  def blocks(x, fill=0):  # BxTx... -> BxNxCx... (padding: segment 0, seen by nothing)
    x = jnp.pad(x, [(0, 0), (0, n * c - t)] + [(0, 0)] * (x.ndim - 2), constant_values=fill)
    return x.reshape(b, n, c, *x.shape[2:])

  q_BxNxCxGxRxK = blocks(q_BxTxHxK).reshape(b, n, c, g, r, kd)
  k_BxNxCxGxK, v_BxNxCxGxK = blocks(k_BxTxGxK), blocks(v_BxTxGxK)
  pos_BxNxC, seg_BxNxC = blocks(mask.q_positions_BxT), blocks(mask.q_segments_or_ones())
  max_d = n - 1 if mask.window is None else min(n - 1, (mask.window + c - 2) // c)

  m_BxNxGxRxC = jnp.full((b, n, g, r, c), -jnp.inf, acc_dtype)  # running max, sum and weighted values per query
  l_BxNxGxRxC = jnp.zeros((b, n, g, r, c), acc_dtype)
  acc_BxNxGxRxCxK = jnp.zeros((b, n, g, r, c, kd), acc_dtype)
  for d in range(max_d + 1):  # query blocks d.. against key blocks ..n-1-d
    q_pos, k_pos = pos_BxNxC[:, d:, :, None], pos_BxNxC[:, :n - d, None, :]
    q_seg, k_seg = seg_BxNxC[:, d:, :, None], seg_BxNxC[:, :n - d, None, :]
    visible = (q_seg == k_seg) & (k_seg != 0) & (k_pos <= q_pos)
    if mask.window is not None:
      visible &= q_pos - k_pos < mask.window
    visible = visible[:, :, None, None]  # BxMx1x1xCxC over the M = n - d block pairs
    scores = jnp.einsum("bmagrk,bmsgk->bmgras", q_BxNxCxGxRxK[:, d:], k_BxNxCxGxK[:, :n - d],
                        preferred_element_type=acc_dtype) * scale
    scores = jnp.where(visible, scores, -jnp.inf)
    m_old = m_BxNxGxRxC[:, d:]
    # The max only keeps exp() in range: it cancels in the softmax, so no gradient is taken through it.
    m_new = jax.lax.stop_gradient(jnp.maximum(m_old, jnp.max(scores, axis=-1)))
    m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
    weights = jnp.where(visible, jnp.exp(scores - m_safe[..., None]), 0.0)
    rescale = jnp.where(jnp.isfinite(m_old), jnp.exp(m_old - m_safe), 0.0)
    l_BxNxGxRxC = l_BxNxGxRxC.at[:, d:].set(l_BxNxGxRxC[:, d:] * rescale + jnp.sum(weights, axis=-1))
    weighted = jnp.einsum("bmgras,bmsgk->bmgrak", weights.astype(v_BxTxGxK.dtype), v_BxNxCxGxK[:, :n - d],
                          preferred_element_type=acc_dtype)
    acc_BxNxGxRxCxK = acc_BxNxGxRxCxK.at[:, d:].set(acc_BxNxGxRxCxK[:, d:] * rescale[..., None] + weighted)
    m_BxNxGxRxC = m_BxNxGxRxC.at[:, d:].set(m_new)
  out = acc_BxNxGxRxCxK / jnp.where(l_BxNxGxRxC == 0, 1.0, l_BxNxGxRxC)[..., None]
  out_BxTxHxK = out.transpose(0, 1, 4, 2, 3, 5).reshape(b, n * c, h, kd)[:, :t]
  return out_BxTxHxK.astype(q_BxTxHxK.dtype)


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
