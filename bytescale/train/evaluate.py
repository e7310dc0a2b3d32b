"""Bits per byte over a whole token stream (masked padding excluded)."""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx

from bytescale.data.pipeline import eval_batches
from bytescale.ops.losses import LN2
from bytescale.train.buckets import PatchBuckets, bucket_slots_for
from bytescale.train.step import make_eval_step


def evaluate_bpb(graphdef, params, tokens: np.ndarray, *, frozen=None, seq_len: int, batch_size: int,
                 max_batches=None, eval_fn=None):
  """Returns ``(bits_per_byte, number_of_predicted_ids)`` over ``tokens`` (or its first ``max_batches``).

  ``graphdef``/``params``/``frozen`` come from ``nnx.split(model, nnx.Param, ...)``. Without ``eval_fn`` a BLT is
  scored with bucketed patch slots (``bytescale.train.buckets``), as training does.
  """
  frozen = {} if frozen is None else frozen
  eval_fn = eval_fn or _default_eval_fn(graphdef, params, frozen, seq_len)
  nll_total, count_total = 0.0, 0.0
  for i, batch in enumerate(eval_batches(tokens, seq_len=seq_len, batch_size=batch_size)):
    if max_batches is not None and i >= max_batches:
      break
    nll, count = eval_fn(params, frozen, {k: batch[k] for k in ("inputs", "targets", "segment_ids", "loss_mask")})
    nll_total += float(nll)
    count_total += float(count)
  return nll_total / max(count_total, 1.0) / LN2, int(count_total)


def _default_eval_fn(graphdef, params, frozen, seq_len: int):
  eval_step = jax.jit(make_eval_step(graphdef))
  slots = bucket_slots_for(getattr(nnx.merge(graphdef, params, frozen), "config", None), seq_len)
  if slots is None:
    return eval_step
  buckets = PatchBuckets.plain(graphdef, slots)
  return lambda params, frozen, batch: eval_step(params, frozen, buckets(params, frozen, batch)[0])
