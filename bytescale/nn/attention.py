"""Multi-head attention with grouped KV heads, RoPE and an optional KV cache.

RoPE and the cache. For most rope types a position rotates the same way at every sequence length. ``dynamic`` and
``longrope`` (``RopeConfig.length_dependent``) rotate every position according to the current length: a full
forward over n tokens uses the rotation of length n everywhere (``rope.rotation_regime`` names the rotation).
When it changes (LongRoPE once, as the length passes ``original_max_position_embeddings``, and back after a
rollback; dynamic NTK at every token beyond it) re-rotating cached keys is not enough: from the second layer on,
keys and values are computed from attention outputs of the layer below, which depend on the rotation too. So
``decode_recomputing_stale_rows`` recomputes every cached layer from the stack's stored inputs whenever a row's
regime changed, and decodes incrementally otherwise. Decoding then equals the full forward at every length, row
by row. The price: one pass over the whole cache at the LongRoPE switch; for dynamic NTK beyond ``L`` at every
step (exactness for dynamic NTK means no reuse across lengths). A chunk of N tokens appended at once is computed
as a full forward over the row at its final length would compute it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from bytescale.configs import TransformerConfig
from bytescale.nn.layers import dense, param, scaled_normal
from bytescale.ops import attention as attention_ops
from bytescale.ops import rope
from bytescale.ops.mask import AttentionMask
from bytescale.ops.rows import write_rows


class Attention(nnx.Module):
  """Projections ``wq`` ``DxHxK``, ``wk``/``wv`` ``DxGxK`` and ``wo`` ``HxKxD``; causal self-attention over a packed
  row (``__call__``) or over a KV cache (``decode``). Callers that arrange the keys themselves (MegaByte's local
  model) use the two halves: ``project`` (rotated q, k, v) and ``attend`` (attention under a mask, output
  projection)."""

  def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
    c = config
    self.config = c
    self.dtype = jnp.dtype(c.dtype)
    init = scaled_normal(c.d_model)
    self.wq = param(rngs, init, (c.d_model, c.num_heads, c.head_dim), ("embed", "heads", "head_dim"))
    self.wk = param(rngs, init, (c.d_model, c.num_kv_heads, c.head_dim), ("embed", "kv_heads", "head_dim"))
    self.wv = param(rngs, init, (c.d_model, c.num_kv_heads, c.head_dim), ("embed", "kv_heads", "head_dim"))
    self.wo = param(rngs, scaled_normal(c.num_heads * c.head_dim), (c.num_heads, c.head_dim, c.d_model),
                    ("heads", "head_dim", "embed"))

  def _qkv(self, x_BxTxD):
    """Unrotated queries, keys and values."""
    x = x_BxTxD.astype(self.dtype)
    q = dense(x, self.wq[...].astype(self.dtype))
    k = dense(x, self.wk[...].astype(self.dtype))
    v = dense(x, self.wv[...].astype(self.dtype))
    return q, k, v

  def _rotate_rows(self, x_BxTxHxK, positions_BxT, seq_len_B):
    """RoPE at each row's own current length (length-dependent rope types rotate according to it)."""
    config = self.config.rope
    if not config.length_dependent:
      return rope.rotate(x_BxTxHxK, positions_BxT, config, seq_len=jnp.max(seq_len_B))
    rotate_row = lambda x, positions, seq_len: rope.rotate(x[None], positions[None], config, seq_len=seq_len)[0]
    return jax.vmap(rotate_row)(x_BxTxHxK, positions_BxT, seq_len_B)

  def project(self, x_BxTxD, positions_BxT, *, seq_len=None):
    """``(q BxTxHxK, k BxTxGxK, v BxTxGxK)`` of ``x`` in the compute dtype, q and k rotated at ``positions``.

    ``seq_len`` is the current total length for length-dependent rope (``None``: ``max(positions) + 1``).
    """
    q, k, v = self._qkv(x_BxTxD)
    q = rope.rotate(q, positions_BxT, self.config.rope, seq_len=seq_len)
    k = rope.rotate(k, positions_BxT, self.config.rope, seq_len=seq_len)
    return q, k, v

  def attend(self, q_BxTxHxK, k_BxSxGxK, v_BxSxGxK, mask: AttentionMask):
    """Attention under ``mask`` (``config.attention_impl``), then the output projection: ``BxTxD``."""
    out_BxTxHxK = attention_ops.attention(q_BxTxHxK, k_BxSxGxK, v_BxSxGxK, mask, impl=self.config.attention_impl)
    return self.output(out_BxTxHxK)

  def output(self, out_BxTxHxK):
    """The output projection ``wo`` of attention outputs: ``BxTxD``."""
    return dense(out_BxTxHxK, self.wo[...].astype(self.dtype), contract=2)

  def __call__(self, x_BxTxD, positions_BxT, segment_ids_BxT):
    """Causal self-attention over a whole sequence. ``positions_BxT=None`` means a packed row: each run of equal
    non-zero segment ids is a document and positions count from 0 along it (``segment_positions``); the mask
    then says so (``AttentionMask.packed_row``), which lets the XLA path skip the blocks it hides."""
    if positions_BxT is None:
      mask = AttentionMask.packed_row(segment_ids_BxT, window=self.config.window)
      positions_BxT = mask.q_positions_BxT
    else:
      mask = AttentionMask.self_attention(positions_BxT, segment_ids_BxT, causal=True, window=self.config.window)
    q, k, v = self.project(x_BxTxD, positions_BxT, seq_len=x_BxTxD.shape[1])
    return self.attend(q, k, v, mask)

  def decode_qkv(self, x_BxNxD, lengths_B, seq_len_B=None):
    """``(q BxNxHxK, k BxNxGxK, v BxNxGxK)`` of N tokens appended at each row's ``lengths`` (positions
    ``lengths .. lengths + N - 1``), q and k rotated there; ``seq_len_B`` as in :meth:`decode`. For callers that
    keep the keys or compute the queries apart (the multi-token heads' drafting)."""
    n = x_BxNxD.shape[1]
    positions_BxN = lengths_B[:, None] + jnp.arange(n, dtype=jnp.int32)
    seq_len_B = lengths_B + n if seq_len_B is None else seq_len_B
    q, k, v = self._qkv(x_BxNxD)
    return self._rotate_rows(q, positions_BxN, seq_len_B), self._rotate_rows(k, positions_BxN, seq_len_B), v

  def decode(self, x_BxNxD, k_cache_BxGxSxK, v_cache_BxGxKxS, lengths_B, seq_len_B=None):
    """Appends N tokens per row at each row's ``lengths`` and attends over the cache; returns ``(out_BxNxD,
    k_cache, v_cache)``.

    Generation is one document per row starting at position 0, so cache slot s holds position s. ``seq_len_B``
    is each row's current length for length-dependent rope (default ``lengths + N``); a recompute of the whole
    cache passes the rows' real lengths (see the module docstring).

    The cache layouts, keys ``BxGxSxK`` and values ``BxGxKxS`` (slots after the KV heads, values transposed), are
    the ones both attention matmuls read as they are on XLA's CPU backend: the attention gets ``BxSxGxK`` views
    (transposes XLA folds into the matmuls), so every ``attention_impl`` applies, while caches stored ``BxSxGxK``
    were copied into that order at every layer of every step (one layer at batch 8, 768 slots: 1.1 -> 0.55 ms,
    ``benchmarks/decode_step.py``). The Pallas and cuDNN kernels take the views as copies.
    """
    n = x_BxNxD.shape[1]
    positions_BxN = lengths_B[:, None] + jnp.arange(n, dtype=jnp.int32)
    q, k_BxNxGxK, v_BxNxGxK = self.decode_qkv(x_BxNxD, lengths_B, seq_len_B)
    k_cache = write_rows(k_cache_BxGxSxK, k_BxNxGxK.transpose(0, 2, 1, 3), lengths_B, axis=2)
    v_cache = write_rows(v_cache_BxGxKxS, v_BxNxGxK.transpose(0, 2, 3, 1), lengths_B, axis=3)
    # One updated buffer for the attention and the caller: without the barrier XLA's CPU backend fuses the write
    # into each reader separately at one new token per row, copying the cache several times (2x slower at batch 1).
    k_cache, v_cache = jax.lax.optimization_barrier((k_cache, v_cache))
    mask = AttentionMask.kv_cache(positions_BxN, k_cache.shape[2], lengths_B + n, window=self.config.window)
    keys_BxSxGxK = k_cache.transpose(0, 2, 1, 3).astype(self.dtype)
    values_BxSxGxK = v_cache.transpose(0, 3, 1, 2).astype(self.dtype)
    return self.attend(q, keys_BxSxGxK, values_BxSxGxK, mask), k_cache, v_cache


def decode_recomputing_stale_rows(run_layers, x_BxNxD, cache, rope_config):
  """Cached decoding for length-dependent rope that equals the full forward at every length.

  ``run_layers(x_BxNxD, k_LxBxGxSxK, v_LxBxGxKxS, lengths_B, seq_len_B) -> (x, k, v)`` runs the stack's layers
  in decode mode. ``cache`` is a ``KVCache`` with ``inputs_BxSxD`` (the stack input of every slot) and
  ``regime_B`` (the rotation regime its keys and values were computed under). If any row that holds tokens
  changes regime, every slot of every row is recomputed from the stored inputs at the rows' new lengths (slots
  past a row's length hold stale inputs: causal masking keeps them out of real positions, and they are written
  again before they are read); otherwise the step is an ordinary incremental one.
  """
  n = x_BxNxD.shape[1]
  lengths_B = cache.lengths_B
  seq_len_B = lengths_B + n
  inputs_BxSxD = write_rows(cache.inputs_BxSxD, x_BxNxD, lengths_B)
  regime_B = rope.rotation_regime(rope_config, seq_len_B)
  stale = jnp.any((regime_B != cache.regime_B) & (lengths_B > 0))

  def incremental():
    return run_layers(x_BxNxD, cache.k_LxBxGxSxK, cache.v_LxBxGxKxS, lengths_B, seq_len_B)

  def recompute():
    everything = inputs_BxSxD.astype(x_BxNxD.dtype)
    x_BxSxD, k, v = run_layers(everything, cache.k_LxBxGxSxK, cache.v_LxBxGxKxS, jnp.zeros_like(lengths_B), seq_len_B)
    new_slots_BxN = lengths_B[:, None] + jnp.arange(n, dtype=jnp.int32)
    return jnp.take_along_axis(x_BxSxD, new_slots_BxN[..., None], axis=1), k, v

  x, k, v = jax.lax.cond(stale, recompute, incremental)
  return x, cache.replace(k_LxBxGxSxK=k, v_LxBxGxKxS=v, lengths_B=seq_len_B, inputs_BxSxD=inputs_BxSxD,
                          regime_B=regime_B)
