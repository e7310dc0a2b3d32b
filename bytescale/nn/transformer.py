"""Pre-norm decoder block and a stack of blocks scanned over layers, with a KV cache for decoding."""

from __future__ import annotations


import jax
import jax.numpy as jnp
from flax import nnx, struct

from bytescale import parallel
from bytescale.configs import TransformerConfig
from bytescale.nn.attention import Attention, decode_recomputing_stale_rows
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

  def decode(self, x_BxNxD, k_cache, v_cache, lengths_B, seq_len_B=None):
    attended, k_cache, v_cache = self.attention.decode(self.attention_norm(x_BxNxD), k_cache, v_cache, lengths_B,
                                                       seq_len_B)
    x = x_BxNxD + attended.astype(x_BxNxD.dtype)
    return x + self.mlp(self.mlp_norm(x)).astype(x.dtype), k_cache, v_cache


@struct.dataclass
class KVCache:
  """Keys and values of every layer, ``LxBxSxGxK``, and the number of filled slots per row."""

  k_LxBxSxGxK: jax.Array
  v_LxBxSxGxK: jax.Array
  lengths_B: jax.Array
  # Length-dependent rope only (dynamic, longrope), else None: the stack input of every slot and the rotation
  # regime the keys and values were computed under, so decode can recompute them when it changes (see attention).
  inputs_BxSxD: jax.Array | None = None
  regime_B: jax.Array | None = None

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
      x = nnx.merge(graphdef, layer_state)(x, positions_BxT, segment_ids_BxT)
      return parallel.constrain(x, ("batch", "sequence", "embed")), None  # no-op without a mesh

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
    cache = KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((batch,), jnp.int32))
    if c.rope.length_dependent:
      cache = cache.replace(inputs_BxSxD=jnp.zeros((batch, max_len, c.d_model), c.dtype),
                            regime_B=jnp.zeros((batch,), jnp.int32))
    return cache

  def decode(self, x_BxNxD, cache: KVCache):
    """Runs N new tokens per row through every layer, appending them to ``cache``."""
    graphdef, state = nnx.split(self.blocks)

    def run_layers(x_BxNxD, k_LxBxSxGxK, v_LxBxSxGxK, lengths_B, seq_len_B=None):
      def layer(x, inputs):
        layer_state, k_cache, v_cache = inputs
        x, k_cache, v_cache = nnx.merge(graphdef, layer_state).decode(x, k_cache, v_cache, lengths_B, seq_len_B)
        return x, (k_cache, v_cache)

      x, (k, v) = jax.lax.scan(layer, x_BxNxD, (state, k_LxBxSxGxK, v_LxBxSxGxK))
      return x, k, v

    if cache.inputs_BxSxD is not None:  # length-dependent rope: recompute when the rotation changes
      return decode_recomputing_stale_rows(run_layers, x_BxNxD, cache, self.config.rope)
    x, k, v = run_layers(x_BxNxD, cache.k_LxBxSxGxK, cache.v_LxBxSxGxK, cache.lengths_B)
    return x, cache.replace(k_LxBxSxGxK=k, v_LxBxSxGxK=v, lengths_B=cache.lengths_B + x_BxNxD.shape[1])


