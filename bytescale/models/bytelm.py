"""``ByteLM``: the plain byte-level decoder-only transformer baseline."""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from bytescale import flops, parallel, vocab
from bytescale.configs import ByteLMConfig, TransformerConfig, swiglu_hidden
from bytescale.models.base import ModelOutput, check_inputs
from bytescale.nn import Embedding, RMSNorm, TransformerStack
from bytescale.nn.layers import param, scaled_normal, unembed
from bytescale.ops.rope import RopeConfig


class ByteLM(nnx.Module):
  """Embedding -> transformer stack -> final norm -> logits over ``vocab.VOCAB_SIZE`` ids."""

  def __init__(self, config: ByteLMConfig, *, rngs: nnx.Rngs):
    self.config = config
    d = config.stack.d_model
    self.embed = Embedding(vocab.VOCAB_SIZE, d, rngs=rngs)
    self.stack = TransformerStack(config.stack, rngs=rngs)
    self.final_norm = RMSNorm(d, eps=config.stack.norm_eps, rngs=rngs)
    if not config.tie_embeddings:
      self.unembedding = param(rngs, scaled_normal(d), (d, vocab.VOCAB_SIZE), ("embed", "vocab"))

  @property
  def compute_dtype(self):
    return jnp.dtype(self.config.stack.dtype)

  def unembed(self, hidden_BxTxD):
    """Final norm and output projection; logits in float32."""
    if self.config.tie_embeddings:
      return unembed(self.final_norm, hidden_BxTxD, embedding=self.embed)
    return unembed(self.final_norm, hidden_BxTxD, kernel_DxV=self.unembedding)

  def __call__(self, bytes_BxT, segment_ids_BxT=None, *, patches=None) -> ModelOutput:
    del patches  # ByteLM has no patches; accepted so every model shares one signature.
    check_inputs(bytes_BxT, segment_ids_BxT)
    if segment_ids_BxT is None:
      segment_ids_BxT = jnp.ones_like(bytes_BxT)
    x = parallel.constrain(self.embed(bytes_BxT).astype(self.compute_dtype), ("batch", "sequence", "embed"))
    hidden = self.stack(x, None, segment_ids_BxT)  # packed rows: positions from the segment ids
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


def flops_per_byte(config: ByteLMConfig, seq_len: int, *, convention="exact", attention="causal") -> flops.FlopCount:
  """The stack over ``seq_len`` bytes and the unembedding (``bytescale.flops`` for the conventions)."""
  count = flops.stack_flops(config.stack, seq_len, convention=convention, attention=attention)
  return count + flops.FlopCount({"unembed": 2.0 * config.stack.d_model * vocab.VOCAB_SIZE})


# --- Presets ----------------------------------------------------------------------------------------------

def _bytelm(d, layers, heads, kv_heads, seq, window=None, rope_theta=10000.0, mlp=None):
  return ByteLMConfig(
      stack=TransformerConfig(
          d_model=d, num_layers=layers, num_heads=heads, num_kv_heads=kv_heads, head_dim=d // heads,
          mlp_hidden=mlp or swiglu_hidden(d), window=window, rope=RopeConfig(rope_theta=rope_theta),
      ),
      max_seq_len=seq,
  )


PRESETS = {
    "tiny": _bytelm(64, 2, 4, 2, 128),
    "small": _bytelm(256, 6, 8, 4, 512),
    "entropy-tiny": _bytelm(64, 2, 4, 4, 256, window=64),
    # BLT's entropy model: 14 layers, d 768, sliding window 512, context 8192.
    "entropy-100m": _bytelm(768, 14, 12, 12, 8192, window=512, rope_theta=500000.0),
    # MegaByte paper's byte-level baseline (about 320M parameters, context 8192).
    "paper-320m": _bytelm(1024, 24, 16, 16, 8192),
}
