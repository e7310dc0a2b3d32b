"""Multi-head attention with grouped KV heads, RoPE and an optional KV cache."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from bytescale.configs import TransformerConfig
from bytescale.nn.layers import param, scaled_normal
from bytescale.ops import attention as attention_ops
from bytescale.ops import rope


class Attention(nnx.Module):
  def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
    c = config
    self.config = c
    self.dtype = jnp.dtype(c.dtype)
    self.wq_DxHxK = param(rngs, scaled_normal(c.d_model), (c.d_model, c.num_heads, c.head_dim), ("embed", "heads", "head_dim"))
    self.wk_DxGxK = param(rngs, scaled_normal(c.d_model), (c.d_model, c.num_kv_heads, c.head_dim), ("embed", "kv_heads", "head_dim"))
    self.wv_DxGxK = param(rngs, scaled_normal(c.d_model), (c.d_model, c.num_kv_heads, c.head_dim), ("embed", "kv_heads", "head_dim"))
    self.wo_HxKxD = param(
        rngs, scaled_normal(c.num_heads * c.head_dim), (c.num_heads, c.head_dim, c.d_model), ("heads", "head_dim", "embed")
    )

  def _project(self, x_BxTxD, positions_BxT, seq_len):
    x = x_BxTxD.astype(self.dtype)
    q = jnp.einsum("btd,dhk->bthk", x, self.wq_DxHxK[...].astype(self.dtype))
    k = jnp.einsum("btd,dgk->btgk", x, self.wk_DxGxK[...].astype(self.dtype))
    v = jnp.einsum("btd,dgk->btgk", x, self.wv_DxGxK[...].astype(self.dtype))
    q = rope.rotate(q, positions_BxT, self.config.rope, seq_len=seq_len)
    k = rope.rotate(k, positions_BxT, self.config.rope, seq_len=seq_len)
    return q, k, v

  def _output(self, out_BxTxHxK):
    return jnp.einsum("bthk,hkd->btd", out_BxTxHxK, self.wo_HxKxD[...].astype(self.dtype))

  def __call__(self, x_BxTxD, positions_BxT, segment_ids_BxT):
    """Self-attention over a whole (packed) sequence."""
    q, k, v = self._project(x_BxTxD, positions_BxT, x_BxTxD.shape[1])
    out = attention_ops.attention(
        q, k, v,
        q_positions_BxT=positions_BxT, kv_positions_BxS=positions_BxT,
        q_segment_ids_BxT=segment_ids_BxT, kv_segment_ids_BxS=segment_ids_BxT,
        causal=True, window=self.config.window, impl=self.config.attention_impl,
    )
    return self._output(out)

  def decode(self, x_BxNxD, k_cache_BxSxGxK, v_cache_BxSxGxK, lengths_B):
    """Appends N tokens per row at each row's ``lengths`` and attends over the cache.

    Generation is one document per row starting at position 0, so cache slot s holds position s.
    """
    n = x_BxNxD.shape[1]
    max_len = k_cache_BxSxGxK.shape[1]
    positions_BxN = lengths_B[:, None] + jnp.arange(n, dtype=jnp.int32)
    q, k, v = self._project(x_BxNxD, positions_BxN, lengths_B.max() + n)
    write = jax.vmap(lambda cache, new, start: jax.lax.dynamic_update_slice_in_dim(cache, new, start, axis=0))
    k_cache = write(k_cache_BxSxGxK, k.astype(k_cache_BxSxGxK.dtype), lengths_B)
    v_cache = write(v_cache_BxSxGxK, v.astype(v_cache_BxSxGxK.dtype), lengths_B)
    slots_BxS = jnp.broadcast_to(jnp.arange(max_len, dtype=jnp.int32), (x_BxNxD.shape[0], max_len))
    kv_segments_BxS = (slots_BxS < (lengths_B[:, None] + n)).astype(jnp.int32)
    out = attention_ops.attention(
        q, k_cache.astype(self.dtype), v_cache.astype(self.dtype),
        q_positions_BxT=positions_BxN, kv_positions_BxS=slots_BxS,
        q_segment_ids_BxT=jnp.ones_like(positions_BxN), kv_segment_ids_BxS=kv_segments_BxS,
        causal=True, window=self.config.window, impl=self.config.attention_impl,
    )
    return self._output(out), k_cache, v_cache
