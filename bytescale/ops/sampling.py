"""Which ids generation may produce, and the greedy choice among them (shared by generation, speculative
decoding and the multi-token heads' drafts)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from bytescale import vocab

NEVER_SAMPLED = (vocab.BOS, vocab.PAD, vocab.RESERVED)
_ALLOWED_V = np.isin(np.arange(vocab.VOCAB_SIZE), NEVER_SAMPLED, invert=True)


def allowed_logits(logits_BxV):
  """Logits with ids that can never be generated (BOS, PAD, reserved) removed."""
  return logits_BxV.astype(jnp.float32).at[:, NEVER_SAMPLED].set(-jnp.inf)


def greedy_ids(logits_xV):
  """Argmax over the ids generation may produce: exactly the ids of ``allowed_logits`` + argmax (a ``where`` is
  cheaper than its scatter inside a decoding loop)."""
  return jnp.argmax(jnp.where(_ALLOWED_V, logits_xV.astype(jnp.float32), -jnp.inf), axis=-1).astype(jnp.int32)
