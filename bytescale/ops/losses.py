"""Losses on logits, masked by ``loss_mask`` (never by a byte value)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

LN2 = math.log(2.0)


def masked_cross_entropy(logits_BxTxV, targets_BxT, loss_mask_BxT):
  """Returns ``(sum of NLL in nats over masked targets, number of masked targets)``, both float32."""
  logits = logits_BxTxV.astype(jnp.float32)
  log_z = jax.nn.logsumexp(logits, axis=-1)
  target_logit = jnp.take_along_axis(logits, targets_BxT[..., None], axis=-1)[..., 0]
  mask = loss_mask_BxT.astype(jnp.float32)
  return jnp.sum((log_z - target_logit) * mask), jnp.sum(mask)


def bits_per_byte(nll_sum, count):
  """Mean NLL per predicted id in bits. EOS targets count as one predicted symbol each (see README)."""
  return nll_sum / jnp.maximum(count, 1.0) / LN2
