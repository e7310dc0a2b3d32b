"""``ByteLM``: the plain byte-level decoder-only transformer baseline."""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from bytescale import parallel, vocab
from bytescale.configs import PRESETS, ByteLMConfig
from bytescale.models.base import ModelOutput, register_model
from bytescale.nn import Embedding, RMSNorm, TransformerStack
from bytescale.nn.layers import param, scaled_normal
from bytescale.ops.attention import segment_positions


class ByteLM(nnx.Module):
  """Embedding -> transformer stack -> final norm -> logits over ``vocab.VOCAB_SIZE`` ids."""

  def __init__(self, config: ByteLMConfig, *, rngs: nnx.Rngs):
    self.config = config
    d = config.stack.d_model
    self.embed = Embedding(vocab.VOCAB_SIZE, d, rngs=rngs)
    self.stack = TransformerStack(config.stack, rngs=rngs)
    self.final_norm = RMSNorm(d, eps=config.stack.norm_eps, rngs=rngs)
    if not config.tie_embeddings:
      self.unembed_DxV = param(rngs, scaled_normal(d), (d, vocab.VOCAB_SIZE), ("embed", "vocab"))

  @property
  def compute_dtype(self):
    return jnp.dtype(self.config.stack.dtype)

  def unembed(self, hidden_BxTxD):
    """Final norm and output projection; logits in float32."""
    h = self.final_norm(hidden_BxTxD)
    if self.config.tie_embeddings:
      return self.embed.attend(h.astype(jnp.float32))
    return jnp.einsum("btd,dv->btv", h, self.unembed_DxV[...].astype(h.dtype)).astype(jnp.float32)

  def __call__(self, bytes_BxT, segment_ids_BxT=None, *, patches=None) -> ModelOutput:
    del patches  # ByteLM has no patches; accepted so every model shares one signature.
    if segment_ids_BxT is None:
      segment_ids_BxT = jnp.ones_like(bytes_BxT)
    positions_BxT = segment_positions(segment_ids_BxT)
    x = parallel.constrain(self.embed(bytes_BxT).astype(self.compute_dtype), ("batch", "sequence", "embed"))
    hidden = self.stack(x, positions_BxT, segment_ids_BxT)
    return ModelOutput(self.unembed(hidden), hidden)

  def init_cache(self, batch: int, max_len: int):
    return self.stack.init_cache(batch, max_len)

  def decode(self, cache, bytes_BxN):
    x = self.embed(bytes_BxN).astype(self.compute_dtype)
    hidden, cache = self.stack.decode(x, cache)
    return ModelOutput(self.unembed(hidden), hidden), cache

  @staticmethod
  def rollback(cache, n_B):
    return cache.rollback(n_B)


register_model(
    "bytelm", ByteLMConfig, ByteLM, PRESETS["bytelm"],
    "plain byte-level decoder-only transformer (the baseline)",
)
