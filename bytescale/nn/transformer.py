"""Pre-norm decoder block and a stack of blocks scanned over layers, with a KV cache for decoding."""

from __future__ import annotations


import jax
import jax.numpy as jnp
from flax import nnx, struct

from bytescale.configs import TransformerConfig
from bytescale.nn.attention import Attention
from bytescale.nn.layers import RMSNorm, SwiGLU

REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


class Block(nnx.Module):
  def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
    self.attention_norm = RMSNorm(config.d_model, eps=config.norm_eps, rngs=rngs)
    self.attention = Attention(config, rngs=rngs)
    self.mlp_norm = RMSNorm(config.d_model, eps=config.norm_eps, rngs=rngs)
    self.mlp = SwiGLU(config.d_model, config.mlp_hidden, dtype=jnp.dtype(config.dtype), rngs=rngs)

  def __call__(self, x_BxTxD, positions_BxT, segment_ids_BxT):
    x = x_BxTxD + self.attention(self.attention_norm(x_BxTxD), positions_BxT, segment_ids_BxT).astype(x_BxTxD.dtype)
    return x + self.mlp(self.mlp_norm(x)).astype(x.dtype)

  def decode(self, x_BxNxD, k_cache, v_cache, lengths_B):
    attended, k_cache, v_cache = self.attention.decode(self.attention_norm(x_BxNxD), k_cache, v_cache, lengths_B)
    x = x_BxNxD + attended.astype(x_BxNxD.dtype)
    return x + self.mlp(self.mlp_norm(x)).astype(x.dtype), k_cache, v_cache


@struct.dataclass
class KVCache:
  """Keys and values of every layer, ``LxBxSxGxK``, and the number of filled slots per row."""

  k_LxBxSxGxK: jax.Array
  v_LxBxSxGxK: jax.Array
  lengths_B: jax.Array

  @property
  def max_len(self) -> int:
    return self.k_LxBxSxGxK.shape[2]

  def rollback(self, n_B):
    """Forgets the last ``n_B`` tokens of each row (slots beyond ``lengths`` are masked, not cleared)."""
    return self.replace(lengths_B=jnp.maximum(self.lengths_B - n_B, 0))

  def reset(self):
    return self.replace(lengths_B=jnp.zeros_like(self.lengths_B))


class TransformerStack(nnx.Module):
  """``num_layers`` blocks with parameters stacked on a leading ``layers`` axis.

  With ``scan_layers`` the forward pass is one ``lax.scan`` over the stacked parameters (compile time
  independent of depth); ``remat`` picks what the backward pass recomputes.
  """

  def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
    self.config = config

    @nnx.split_rngs(splits=config.num_layers)
    @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make_blocks(rngs):
      return Block(config, rngs=rngs)

    self.blocks = make_blocks(rngs)

  def _layer_fn(self, fn):
    policy = self.config.remat
    if policy == "none":
      return fn
    return jax.checkpoint(fn, policy=REMAT_POLICIES[policy], prevent_cse=not self.config.scan_layers)

  def __call__(self, x_BxTxD, positions_BxT, segment_ids_BxT):
    graphdef, state = nnx.split(self.blocks)

    def layer(x, layer_state):
      return nnx.merge(graphdef, layer_state)(x, positions_BxT, segment_ids_BxT), None

    layer = self._layer_fn(layer)
    if self.config.scan_layers:
      x, _ = jax.lax.scan(layer, x_BxTxD, state)
      return x
    for i in range(self.config.num_layers):
      x_BxTxD, _ = layer(x_BxTxD, jax.tree.map(lambda a, i=i: a[i], state))
    return x_BxTxD

  def init_cache(self, batch: int, max_len: int, dtype=None) -> KVCache:
    c = self.config
    shape = (c.num_layers, batch, max_len, c.num_kv_heads, c.head_dim)
    dtype = jnp.dtype(dtype or c.dtype)
    return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((batch,), jnp.int32))

  def decode(self, x_BxNxD, cache: KVCache):
    """Runs N new tokens per row through every layer, appending them to ``cache``."""
    graphdef, state = nnx.split(self.blocks)

    def layer(x, inputs):
      layer_state, k_cache, v_cache = inputs
      x, k_cache, v_cache = nnx.merge(graphdef, layer_state).decode(x, k_cache, v_cache, cache.lengths_B)
      return x, (k_cache, v_cache)

    x, (k, v) = jax.lax.scan(layer, x_BxNxD, (state, cache.k_LxBxSxGxK, cache.v_LxBxSxGxK))
    return x, KVCache(k, v, cache.lengths_B + x_BxNxD.shape[1])


