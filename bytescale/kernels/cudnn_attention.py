"""cuDNN flash attention through ``jax.nn.dot_product_attention(implementation="cudnn")``.

Same call ``(q, k, v, mask)`` and semantics as ``attention_reference`` for the masks cuDNN can express, and a
clear error for the rest -- a mask is never silently dropped:

* ``causal`` -> ``is_causal`` (cuDNN's causal mask is on indices, top-left aligned);
* causal ``window`` -> ``local_window_size=(window - 1, 0)``; a non-causal window needs a right window, which
  cuDNN does not support -> ``NotImplementedError``;
* segment ids -> ``query_seq_lengths`` / ``key_value_seq_lengths``, valid only when, per row, the non-zero
  segment ids are one id filling a prefix (padding at the end); packed documents -> not expressible;
* positions: with ``causal`` or ``window`` the mask is defined on positions, cuDNN's on indices, so positions
  must be ``index + c`` (same ``c`` for queries and keys, per row) on the valid entries.

The data-dependent conditions (segment layout, positions) are checked eagerly when the arrays are concrete
(``NotImplementedError``); under ``jit`` they cannot raise, so the output is set to NaN where they fail.
float16/bfloat16 only. On a backend without cuDNN (CPU, TPU) every call raises ``NotImplementedError``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from bytescale.ops.mask import AttentionMask, check_shapes


def cudnn_available() -> bool:
  return jax.default_backend() == "gpu" and any("NVIDIA" in d.device_kind for d in jax.devices())


def _is_concrete(*arrays) -> bool:
  return not any(isinstance(a, jax.core.Tracer) for a in arrays if a is not None)


def _prefix_layout(seg_BxN, other_id_Bx1=None):
  """(ok_B, length_B, id_Bx1): ok iff the non-zero ids are one value filling a prefix."""
  n = seg_BxN.shape[1]
  length = jnp.sum(seg_BxN != 0, axis=1).astype(jnp.int32)
  seg_id = seg_BxN[:, :1] if other_id_Bx1 is None else other_id_Bx1
  expected = jnp.where(jnp.arange(n) < length[:, None], seg_id, 0)
  return jnp.all(seg_BxN == expected, axis=1), length, seg_id


def cudnn_mask_plan(mask: AttentionMask):
  """How the mask maps onto cuDNN's arguments (backend independent, so it is testable on CPU).

  Returns ``dict(ok_B, q_len_B, kv_len_B, q_valid_BxT)``; ``ok_B`` is False for rows cuDNN would get wrong.
  Raises ``NotImplementedError`` for what is never expressible, and for failing rows when arrays are concrete.
  """
  causal, window = mask.causal, mask.window
  q_positions_BxT, kv_positions_BxS = mask.q_positions_BxT, mask.kv_positions_BxS
  q_segment_ids_BxT, kv_segment_ids_BxS = mask.q_segment_ids_BxT, mask.kv_segment_ids_BxS
  if window is not None and not causal:
    raise NotImplementedError("cuDNN cannot express a non-causal (two-sided) window; use impl='pallas'")
  if window is not None and window < 1:
    raise NotImplementedError(f"cuDNN needs window >= 1, got {window}")
  b, t = q_positions_BxT.shape
  s = kv_positions_BxS.shape[1]
  checks = []
  q_len = kv_len = None
  q_valid_BxT = jnp.ones((b, t), bool)
  kv_valid_BxS = jnp.ones((b, s), bool)
  if q_segment_ids_BxT is not None or kv_segment_ids_BxS is not None:
    # Segment ids -> sequence lengths, if the layout is "one id, then padding".
    kv_seg = jnp.ones((b, s), jnp.int32) if kv_segment_ids_BxS is None else kv_segment_ids_BxS
    q_seg = jnp.ones((b, t), jnp.int32) if q_segment_ids_BxT is None else q_segment_ids_BxT
    kv_ok, kv_len, seg_id = _prefix_layout(kv_seg)
    # Queries must use the keys' id (a different id sees no key: a zero row cuDNN cannot express), unless
    # there are no valid keys at all, in which case every row is zero whatever the query ids.
    q_ok, q_len, _ = _prefix_layout(q_seg, seg_id)
    checks.append(kv_ok & (q_ok | (kv_len == 0)))
    q_valid_BxT = q_seg != 0
    kv_valid_BxS = kv_seg != 0
  if causal or window is not None:
    # Positions must be index + c on valid entries, with one c per row shared by queries and keys.
    q_off = q_positions_BxT - jnp.arange(t)
    kv_off = kv_positions_BxS - jnp.arange(s)
    first_kv = jnp.argmax(kv_valid_BxS, axis=1)
    first_q = jnp.argmax(q_valid_BxT, axis=1)
    c = jnp.where(
        jnp.any(kv_valid_BxS, axis=1),
        jnp.take_along_axis(kv_off, first_kv[:, None], axis=1)[:, 0],
        jnp.take_along_axis(q_off, first_q[:, None], axis=1)[:, 0],
    )[:, None]
    checks.append(
        jnp.all(jnp.where(q_valid_BxT, q_off == c, True), axis=1)
        & jnp.all(jnp.where(kv_valid_BxS, kv_off == c, True), axis=1)
    )
  ok_B = jnp.all(jnp.stack(checks), axis=0) if checks else jnp.ones((b,), bool)
  if _is_concrete(ok_B) and not bool(jnp.all(ok_B)):
    raise NotImplementedError(
        "cuDNN cannot express this mask: segment ids must be one id per row followed by padding (segment 0), "
        "and with causal/window the positions must equal index + c. Use impl='pallas' or impl='xla'."
    )
  return dict(ok_B=ok_B, q_len_B=q_len, kv_len_B=kv_len, q_valid_BxT=q_valid_BxT)


def cudnn_attention(
    q_BxTxHxK,
    k_BxSxGxK,
    v_BxSxGxK,
    mask: AttentionMask,
    *,
    scale: float | None = None,
    block_q: int | None = None,
    block_k: int | None = None,
    interpret: bool | None = None,
):
  """Attention via cuDNN (see module docstring for what maps and what raises).

  ``block_q``/``block_k``/``interpret`` exist for signature parity with ``flash_attention`` and are ignored.
  """
  del block_q, block_k, interpret
  if not cudnn_available():
    raise NotImplementedError(
        f"cudnn_attention needs an NVIDIA GPU with cuDNN; the default backend is {jax.default_backend()!r}. "
        "Use impl='xla' or impl='pallas' instead."
    )
  check_shapes(q_BxTxHxK, k_BxSxGxK, v_BxSxGxK, mask)
  if q_BxTxHxK.dtype not in (jnp.bfloat16, jnp.float16):
    raise NotImplementedError(f"cuDNN flash attention supports float16/bfloat16, got {q_BxTxHxK.dtype}")
  plan = cudnn_mask_plan(mask)
  ok_B, q_len, kv_len, q_valid_BxT = plan["ok_B"], plan["q_len_B"], plan["kv_len_B"], plan["q_valid_BxT"]
  out = jax.nn.dot_product_attention(
      q_BxTxHxK,
      k_BxSxGxK,
      v_BxSxGxK,
      scale=scale,
      is_causal=mask.causal,
      query_seq_lengths=q_len,
      key_value_seq_lengths=kv_len,
      local_window_size=None if mask.window is None else (mask.window - 1, 0),
      implementation="cudnn",
  )
  if kv_len is not None:
    out = jnp.where((kv_len > 0)[:, None, None, None] & q_valid_BxT[:, :, None, None], out, 0)
  # Under jit the data checks cannot raise: poison rows whose mask cuDNN would have got wrong.
  return jnp.where(ok_B[:, None, None, None], out, jnp.nan).astype(q_BxTxHxK.dtype)
