"""Scaled dot-product attention under an ``AttentionMask``, as a pure function, and the one ``impl`` dispatch.

The mask semantics are those of :mod:`bytescale.ops.mask`. Every implementation takes ``(q, k, v, mask)``:
``attention_reference`` here (plain jnp, ``impl="xla"``), ``bytescale.kernels.flash_attention.flash_attention``
(Pallas, ``impl="pallas"``) and ``bytescale.kernels.cudnn_attention.cudnn_attention`` (``impl="cudnn"``);
``attention`` picks one. The kernels are imported lazily (Pallas is optional at import time) and never import
this module.

Shapes: q ``BxTxHxK``, k/v ``BxSxGxK`` with ``H % G == 0`` (grouped KV heads).
"""

from __future__ import annotations

from typing import Literal

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
    return attention_reference(q_BxTxHxK, k_BxSxGxK, v_BxSxGxK, mask, scale=scale)
  if impl == "pallas":
    from bytescale.kernels import flash_attention  # imported lazily: Pallas is optional at import time

    return flash_attention.flash_attention(q_BxTxHxK, k_BxSxGxK, v_BxSxGxK, mask, scale=scale)
  if impl == "cudnn":
    from bytescale.kernels import cudnn_attention

    return cudnn_attention.cudnn_attention(q_BxTxHxK, k_BxSxGxK, v_BxSxGxK, mask, scale=scale)
  raise AssertionError(impl)
