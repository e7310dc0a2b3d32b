"""Bits per byte over a whole token stream (masked padding excluded)."""

from __future__ import annotations

import jax
import numpy as np

from bytescale.data.pipeline import eval_batches
from bytescale.ops.losses import LN2
from bytescale.train.step import make_eval_step


def evaluate_bpb(graphdef, params, tokens: np.ndarray, *, frozen=None, seq_len: int, batch_size: int,
                 max_batches=None, eval_fn=None):
  """Returns ``(bits_per_byte, number_of_predicted_ids)`` over ``tokens`` (or its first ``max_batches``).

  ``graphdef``/``params``/``frozen`` come from ``nnx.split(model, nnx.Param, ...)``.
  """
  eval_fn = eval_fn or jax.jit(make_eval_step(graphdef))
  frozen = {} if frozen is None else frozen
  nll_total, count_total = 0.0, 0.0
  for i, batch in enumerate(eval_batches(tokens, seq_len=seq_len, batch_size=batch_size)):
    if max_batches is not None and i >= max_batches:
      break
    nll, count = eval_fn(params, frozen, {k: batch[k] for k in ("inputs", "targets", "segment_ids", "loss_mask")})
    nll_total += float(nll)
    count_total += float(count)
  return nll_total / max(count_total, 1.0) / LN2, int(count_total)
