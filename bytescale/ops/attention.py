"""Scaled dot-product attention with structured masks, as a pure function.

Masks are described, not materialised by the caller: every query and key carries a position and a segment id.
A key is visible to a query iff

  * both segment ids are equal and non-zero (segment 0 marks padding or an empty cache slot),
  * ``causal``: ``kv_position <= q_position``,
  * ``window``: ``q_position - kv_position < window`` (causal) or ``|q_position - kv_position| < window``.

This one description covers packed documents (segment = document), padding, KV caches (unfilled slots get
segment 0), sliding windows and patch-local cross-attention (segment = patch id, ``causal=False``), and it is
what lets a fused kernel skip whole blocks. Rows with no visible key return zeros, never NaN.

Shapes: q ``BxTxHxK``, k/v ``BxSxGxK`` with ``H % G == 0`` (grouped KV heads), positions and segment ids
``BxT`` / ``BxS`` int32.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

AttentionImpl = Literal["auto", "xla", "pallas", "cudnn"]
ATTENTION_IMPLS = ("auto", "xla", "pallas", "cudnn")


def attention_mask(
    q_positions_BxT,
    kv_positions_BxS,
    q_segment_ids_BxT=None,
    kv_segment_ids_BxS=None,
    *,
    causal: bool = True,
    window: int | None = None,
):
  """Boolean visibility mask ``BxTxS`` (True = the query may attend to the key)."""
  qp = q_positions_BxT[:, :, None]
  kp = kv_positions_BxS[:, None, :]
  mask = jnp.ones(jnp.broadcast_shapes(qp.shape, kp.shape), dtype=bool)
  if causal:
    mask &= kp <= qp
  if window is not None:
    distance = qp - kp
    mask &= (distance < window) if causal else (jnp.abs(distance) < window)
  if q_segment_ids_BxT is not None or kv_segment_ids_BxS is not None:
    qs = _segments_or_ones(q_segment_ids_BxT, q_positions_BxT)[:, :, None]
    ks = _segments_or_ones(kv_segment_ids_BxS, kv_positions_BxS)[:, None, :]
    mask &= (qs == ks) & (ks != 0)
  return mask


def _segments_or_ones(segment_ids, positions):
  return jnp.ones_like(positions) if segment_ids is None else segment_ids


def attention_reference(
    q_BxTxHxK,
    k_BxSxGxK,
    v_BxSxGxK,
    *,
    q_positions_BxT,
    kv_positions_BxS,
    q_segment_ids_BxT=None,
    kv_segment_ids_BxS=None,
    causal: bool = True,
    window: int | None = None,
    scale: float | None = None,
):
  """Plain-jnp attention: materialises the ``BxHxTxS`` scores. Softmax in float32 (or float64 if given)."""
  _check_shapes(q_BxTxHxK, k_BxSxGxK, v_BxSxGxK)
  b, t, h, d = q_BxTxHxK.shape
  g = k_BxSxGxK.shape[2]
  scale = d**-0.5 if scale is None else scale
  acc_dtype = jnp.promote_types(q_BxTxHxK.dtype, jnp.float32)
  q_BxTxGxRxK = q_BxTxHxK.reshape(b, t, g, h // g, d)
  scores_BxGxRxTxS = jnp.einsum(
      "btgrk,bsgk->bgrts", q_BxTxGxRxK, k_BxSxGxK, preferred_element_type=acc_dtype
  ) * scale
  mask_BxTxS = attention_mask(
      q_positions_BxT, kv_positions_BxS, q_segment_ids_BxT, kv_segment_ids_BxS, causal=causal, window=window
  )
  mask_Bx1x1xTxS = mask_BxTxS[:, None, None]
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


def _check_shapes(q, k, v):
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise ValueError(f"attention expects q BxTxHxK, k/v BxSxGxK; got {q.shape}, {k.shape}, {v.shape}")
  if k.shape != v.shape:
    raise ValueError(f"k and v shapes differ: {k.shape} vs {v.shape}")
  if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
    raise ValueError(f"q {q.shape} and k {k.shape} disagree on batch or head dim")
  if q.shape[2] % k.shape[2]:
    raise ValueError(f"query heads ({q.shape[2]}) must be a multiple of kv heads ({k.shape[2]})")


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
    *,
    q_positions_BxT,
    kv_positions_BxS,
    q_segment_ids_BxT=None,
    kv_segment_ids_BxS=None,
    causal: bool = True,
    window: int | None = None,
    scale: float | None = None,
    impl: AttentionImpl = "auto",
):
  """Attention with the implementation picked by ``impl`` (see module docstring for the mask semantics)."""
  impl = resolve_impl(impl)
  kwargs = dict(
      q_positions_BxT=q_positions_BxT,
      kv_positions_BxS=kv_positions_BxS,
      q_segment_ids_BxT=q_segment_ids_BxT,
      kv_segment_ids_BxS=kv_segment_ids_BxS,
      causal=causal,
      window=window,
      scale=scale,
  )
  if impl == "xla":
    return attention_reference(q_BxTxHxK, k_BxSxGxK, v_BxSxGxK, **kwargs)
  if impl == "pallas":
    from bytescale.kernels import flash_attention  # imported lazily: Pallas is optional at import time

    return flash_attention.flash_attention(q_BxTxHxK, k_BxSxGxK, v_BxSxGxK, **kwargs)
  if impl == "cudnn":
    from bytescale.kernels import cudnn_attention

    return cudnn_attention.cudnn_attention(q_BxTxHxK, k_BxSxGxK, v_BxSxGxK, **kwargs)
  raise AssertionError(impl)


def segment_positions(segment_ids_BxT):
  """Position of each token within its segment (0 at each segment start); padding (segment 0) gets 0.

  A segment is a maximal run of equal ids, so a document split across two rows restarts at 0 in the second.
  """
  t = segment_ids_BxT.shape[-1]
  index = jnp.arange(t, dtype=jnp.int32)
  starts = jnp.concatenate(
      [jnp.ones_like(segment_ids_BxT[..., :1], bool), segment_ids_BxT[..., 1:] != segment_ids_BxT[..., :-1]],
      axis=-1,
  )
  start_index = jax.lax.cummax(jnp.where(starts, index, 0), axis=segment_ids_BxT.ndim - 1)
  return jnp.where(segment_ids_BxT != 0, index - start_index, 0).astype(jnp.int32)
