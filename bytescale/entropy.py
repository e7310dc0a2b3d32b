"""Next-byte entropies from a frozen byte LM, for BLT's entropy patching, and threshold calibration.

The entropy model is an ordinary ``ByteLM`` checkpoint (``bytescale train --model bytelm --preset entropy-tiny
--out DIR``). Entropies are natural-log entropies of its next-byte distribution, always computed in float32
(the BLT reference's bf16/fp16 entropies let boundaries near the threshold flip between training and
inference).

Long rows. A row longer than the model's context is covered by overlapping windows of ``context`` bytes that
advance by ``context - overlap``; every byte takes its entropy from the window in which it has at least
``overlap`` bytes of left context (or its whole document so far), so there is no hard context reset (the
reference resets every 8192 bytes). Attention never crosses documents: the model sees the segment ids.

    bytescale entropy-threshold --entropy-model DIR --data FILE --target-patch-size 4

prints the global threshold giving an average patch size of 4 on a sample of FILE.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from bytescale import patching
from bytescale.patching import PatchingConfig


def entropy_from_logits(logits_BxTxV):
  """Natural-log entropy of ``softmax(logits)`` over the last axis, in float32."""
  logp = jax.nn.log_softmax(logits_BxTxV.astype(jnp.float32), axis=-1)
  return -jnp.sum(jnp.exp(logp) * logp, axis=-1)


def window_layout(seq_len: int, context: int, overlap: int | None = None):
  """``(starts, owned_from)`` of the windows covering ``seq_len`` bytes (static Python ints).

  Window ``i`` covers ``[starts[i], starts[i] + context)`` and provides the entropies of
  ``[owned_from[i], owned_from[i+1])`` (the last one up to ``seq_len``).
  """
  if context < 2:
    raise ValueError(f"context must be >= 2, got {context}")
  if seq_len <= context:
    return (0,), (0,)
  overlap = context // 2 if overlap is None else overlap
  if not 0 <= overlap < context:
    raise ValueError(f"overlap must be in [0, context), got {overlap} for context {context}")
  stride = context - overlap
  count = 1 + math.ceil((seq_len - context) / stride)
  starts = tuple(i * stride for i in range(count))
  owned = (0,) + tuple(s + overlap for s in starts[1:])
  return starts, owned


def compute_entropies(model, ids_BxT, segment_ids_BxT=None, *, context: int | None = None,
                      overlap: int | None = None):
  """Float32 entropies ``BxT``: ``H[t]`` is the entropy of the model's prediction at ``t`` (of byte ``t+1``).

  ``model`` is a byte LM speaking the model protocol (``model(ids, segment_ids).logits_BxTxV``); ``context``
  defaults to its ``config.max_seq_len``. Padding (segment 0) gets entropy 0.
  """
  if segment_ids_BxT is None:
    segment_ids_BxT = jnp.ones(ids_BxT.shape, jnp.int32)
  b, t = ids_BxT.shape
  context = context or model.config.max_seq_len
  starts, owned = window_layout(t, context, overlap)
  if len(starts) == 1:
    h = entropy_from_logits(model(ids_BxT, segment_ids_BxT).logits_BxTxV)
    return jnp.where(segment_ids_BxT != 0, h, 0.0)
  n = len(starts)
  padded = starts[-1] + context
  ids = jnp.pad(ids_BxT, ((0, 0), (0, padded - t)))
  segs = jnp.pad(segment_ids_BxT, ((0, 0), (0, padded - t)))  # padding: segment 0, attends to nothing
  index_NxC = np.asarray(starts)[:, None] + np.arange(context)[None, :]
  windows_ids = ids[:, index_NxC].reshape(b * n, context)
  windows_segs = segs[:, index_NxC].reshape(b * n, context)
  h_BxNxC = entropy_from_logits(model(windows_ids, windows_segs).logits_BxTxV).reshape(b, n, context)
  # Byte j comes from the last window that owns it: window w = #(owned_from <= j) - 1.
  j = np.arange(t)
  window = np.searchsorted(np.asarray(owned), j, side="right") - 1
  offset = j - np.asarray(starts)[window]
  h = h_BxNxC[:, window, offset]
  return jnp.where(segment_ids_BxT != 0, h, 0.0)


# --- Threshold calibration --------------------------------------------------------------------------------

def average_patch_size(config: PatchingConfig, entropies_BxT, segment_ids_BxT, ids_BxT=None) -> float:
  """Bytes per patch over the real bytes of the sample under ``config`` (no overflow: max_patches = T)."""
  ids = jnp.zeros(entropies_BxT.shape, jnp.int32) if ids_BxT is None else ids_BxT
  p = patching.patch(config, ids, segment_ids_BxT, entropies_BxT=entropies_BxT, max_patches=entropies_BxT.shape[1])
  return float(jnp.sum(segment_ids_BxT != 0) / jnp.maximum(jnp.sum(p.valid_BxM), 1))


def threshold_for_patch_size(
    entropies_BxT, segment_ids_BxT, target_patch_size: float, config: PatchingConfig | None = None,
    *, field: str = "threshold", iterations: int = 40,
) -> tuple[float, float]:
  """The value of ``config.<field>`` (``threshold`` or ``monotonic_threshold``) whose average patch size on the
  sample is closest to ``target_patch_size``; returns ``(value, achieved average patch size)``.

  Patches only get larger as a threshold rises, so this bisects on the threshold (other fields of ``config``,
  e.g. ``max_patch_length`` or the other threshold, stay as they are).
  """
  if target_patch_size < 1:
    raise ValueError(f"target_patch_size must be >= 1, got {target_patch_size}")
  if field not in ("threshold", "monotonic_threshold"):
    raise ValueError(f"field must be 'threshold' or 'monotonic_threshold', got {field!r}")
  config = config or PatchingConfig("entropy")
  entropies_BxT = jnp.asarray(entropies_BxT, jnp.float32)
  segment_ids_BxT = jnp.asarray(segment_ids_BxT, jnp.int32)
  counter = jax.jit(lambda h, s, value: _num_patches(config, field, value, h, s))
  num_bytes = float(jnp.sum(segment_ids_BxT != 0))
  spread = float(jnp.max(jnp.abs(entropies_BxT))) * 2 + 1.0
  lo, hi = -spread, spread  # lo: most patches (smallest size); hi: fewest
  best = (math.inf, 0.0, 0.0)
  for _ in range(iterations):
    mid = 0.5 * (lo + hi)
    size = num_bytes / max(float(counter(entropies_BxT, segment_ids_BxT, mid)), 1.0)
    best = min(best, (abs(size - target_patch_size), mid, size))
    if size < target_patch_size:
      lo = mid
    else:
      hi = mid
  return best[1], best[2]


def _num_patches(config, field, value, entropies_BxT, segment_ids_BxT):
  # The threshold is traced (one compilation for the whole bisection); the rules only compare against it.
  config = dataclasses.replace(config, **{field: value})
  ids = jnp.zeros(entropies_BxT.shape, jnp.int32)
  starts = patching.rule_starts(config, ids, segment_ids_BxT, entropies_BxT)
  return jnp.sum(patching.split_long_patches(starts, segment_ids_BxT != 0, config.max_patch_length))


def sample_entropies(model, tokens: np.ndarray, *, seq_len: int = 512, max_rows: int = 64, batch_size: int = 8,
                     context=None, overlap=None):
  """Entropies of the first ``max_rows`` rows of a framed token stream; returns ``(entropies, segment_ids)``."""
  from bytescale.data.pipeline import eval_batches

  fn = jax.jit(lambda ids, seg: compute_entropies(model, ids, seg, context=context, overlap=overlap))
  hs, segs = [], []
  for i, batch in enumerate(eval_batches(tokens, seq_len=seq_len, batch_size=batch_size)):
    if i * batch_size >= max_rows:
      break
    hs.append(np.asarray(fn(batch["inputs"], batch["segment_ids"])))
    segs.append(batch["segment_ids"])
  return np.concatenate(hs), np.concatenate(segs)
