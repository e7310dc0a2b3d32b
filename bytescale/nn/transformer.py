"""Pre-norm decoder block and a stack of blocks scanned over layers, with a KV cache for decoding.

``stacked_blocks`` and ``scan_blocks`` are the layer stacking and the layer loop (scan, remat) on their own, for
stacks whose attention is arranged by the caller (MegaByte's local model) through ``Block.apply_with``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx, struct

from bytescale import parallel
from bytescale.configs import TransformerConfig
from bytescale.nn.attention import Attention, decode_recomputing_stale_rows
from bytescale.nn.layers import RMSNorm, SwiGLU

# What each ``TransformerConfig.remat`` name (``configs.REMAT_POLICY_NAMES``) saves; "none" = no remat at all.
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

  def apply_with(self, x_BxTxD, attend):
    """The block around an attention the caller arranges: ``attend(self.attention, normed_BxTxD)`` returns
    ``(out_BxTxD, aux)``, the attention output after ``wo`` and anything to hand back (e.g. updated caches); the
    block adds the residuals and the MLP. Returns ``(x_BxTxD, aux)``."""
    attended, aux = attend(self.attention, self.attention_norm(x_BxTxD))
    x = x_BxTxD + attended.astype(x_BxTxD.dtype)
    return x + self.mlp(self.mlp_norm(x)).astype(x.dtype), aux

  def __call__(self, x_BxTxD, positions_BxT, segment_ids_BxT):
    return self.apply_with(x_BxTxD, lambda attention, h: (attention(h, positions_BxT, segment_ids_BxT), None))[0]

  def decode(self, x_BxNxD, k_cache, v_cache, lengths_B, seq_len_B=None):
    def attend(attention, h_BxNxD):
      attended, k, v = attention.decode(h_BxNxD, k_cache, v_cache, lengths_B, seq_len_B)
      return attended, (k, v)

    x, (k_cache, v_cache) = self.apply_with(x_BxNxD, attend)
    return x, k_cache, v_cache


def stacked_blocks(config: TransformerConfig, rngs: nnx.Rngs) -> Block:
  """``config.num_layers`` blocks as one ``Block`` whose parameters are stacked on a leading ``layers`` axis."""

  @nnx.split_rngs(splits=config.num_layers)
  @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
  def make_blocks(rngs):
    return Block(config, rngs=rngs)

  return make_blocks(rngs)


def scan_blocks(blocks: Block, config: TransformerConfig, layer, carry):
  """``carry = layer(block, carry)`` for every layer of the stacked ``blocks``, first to last.

  With ``config.scan_layers`` one ``lax.scan`` over the stacked parameters (compile time independent of depth),
  else a python loop; each layer is rematerialised as ``config.remat`` says. A single layer is never scanned: the
  scan would only add what a scan costs under ``grad``, its residuals stacked into buffers XLA fills with zeros
  before the loop writes them (BLT ``small``'s one-layer encoder).
  """
  graphdef, state = nnx.split(blocks)
  scanned = config.scan_layers and config.num_layers > 1

  def body(carry, layer_state):
    return layer(nnx.merge(graphdef, layer_state), carry), None

  if config.remat != "none":
    body = jax.checkpoint(body, policy=REMAT_POLICIES[config.remat], prevent_cse=not scanned)
  if scanned:
    return jax.lax.scan(body, carry, state)[0]
  for i in range(config.num_layers):
    carry, _ = body(carry, jax.tree.map(lambda a, i=i: a[i], state))
  return carry


def layer_state(state, index: int):
  """Layer ``index`` of stacked parameters ``state`` (from ``nnx.split`` of stacked blocks), for python loops over
  the layers in decoding.

  Sliced at an index XLA cannot see is constant: inside a generation loop XLA then hoists the slices of the
  loop-invariant weights out of the loop (one copy per call), while static slices were copied at every step, most
  of a decode step's time at batch 1 (a d=512 stack: 19 -> 4.4 ms per step). Same values either way.
  """
  opaque = jax.lax.optimization_barrier(jnp.int32(index))
  return jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, opaque, keepdims=False), state)


@struct.dataclass
class KVCache:
  """Keys ``LxBxGxSxK`` and values ``LxBxGxKxS`` of every layer, and the number of filled slots per row.

  Each is a tuple of ``L`` separate arrays (``k_LxBxGxSxK[layer]`` is ``BxGxSxK``), so that decoding updates every
  layer's buffers in place: a scan over stacked caches copied all of them at every step (slicing the scanned
  input, writing the stacked output), most of a step's time at batch 8. Slots come after the KV heads and values
  are transposed: the layouts both attention matmuls read as they are (see ``Attention.decode``).
  """

  k_LxBxGxSxK: tuple[jax.Array, ...]
  v_LxBxGxKxS: tuple[jax.Array, ...]
  lengths_B: jax.Array
  # Length-dependent rope only (dynamic, longrope), else None: the stack input of every slot and the rotation
  # regime the keys and values were computed under, so decode can recompute them when it changes (see attention).
  inputs_BxSxD: jax.Array | None = None
  regime_B: jax.Array | None = None

  @property
  def max_len(self) -> int:
    return self.k_LxBxGxSxK[0].shape[2]

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
    self.blocks = stacked_blocks(config, rngs)

  def __call__(self, x_BxTxD, positions_BxT, segment_ids_BxT):
    """Every layer over the row; ``positions_BxT=None``: packed rows (positions from the segment ids, see
    ``Attention.__call__``), the form every model uses."""
    def layer(block, x):
      x = block(x, positions_BxT, segment_ids_BxT)
      return parallel.constrain(x, ("batch", "sequence", "embed"))  # no-op without a mesh

    return scan_blocks(self.blocks, self.config, layer, x_BxTxD)

  def init_cache(self, batch: int, max_len: int, dtype=None) -> KVCache:
    c = self.config
    groups = (batch, c.num_kv_heads)
    dtype = jnp.dtype(dtype or c.dtype)
    layers = range(c.num_layers)
    cache = KVCache(tuple(jnp.zeros((*groups, max_len, c.head_dim), dtype) for _ in layers),
                    tuple(jnp.zeros((*groups, c.head_dim, max_len), dtype) for _ in layers),
                    jnp.zeros((batch,), jnp.int32))
    if c.rope.length_dependent:
      cache = cache.replace(inputs_BxSxD=jnp.zeros((batch, max_len, c.d_model), c.dtype),
                            regime_B=jnp.zeros((batch,), jnp.int32))
    return cache

  def layer_states(self) -> list:
    """Every layer's parameters sliced out of the stack (``layer_state``), for ``decode(..., layers=)``.

    Slice them outside a ``lax.cond`` whose branch decodes: a generation loop hoists the slices in its body out of
    the loop, but not those inside a cond's branch, which copied every layer's weights each time the branch ran
    (MegaByte's and BLT's global models, once per completed patch)."""
    _, state = nnx.split(self.blocks)
    return [layer_state(state, i) for i in range(self.config.num_layers)]

  def decode(self, x_BxNxD, cache: KVCache, layers: list | None = None):
    """Runs N new tokens per row through every layer, appending them to ``cache``; ``layers``: the stack's
    ``layer_states()`` when sliced elsewhere.

    A python loop over the layers (compile time grows with depth), each reading and updating its own cache
    buffers in place (see ``KVCache``)."""
    graphdef, _ = nnx.split(self.blocks)
    layers = self.layer_states() if layers is None else layers

    def run_layers(x, k_LxBxGxSxK, v_LxBxGxKxS, lengths_B, seq_len_B=None):
      keys, values = [], []
      for i in range(self.config.num_layers):
        block = nnx.merge(graphdef, layers[i])
        x, k_cache, v_cache = block.decode(x, k_LxBxGxSxK[i], v_LxBxGxKxS[i], lengths_B, seq_len_B)
        keys.append(k_cache)
        values.append(v_cache)
      return x, tuple(keys), tuple(values)

    if cache.inputs_BxSxD is not None:  # length-dependent rope: recompute when the rotation changes
      return decode_recomputing_stale_rows(run_layers, x_BxNxD, cache, self.config.rope)
    x, k, v = run_layers(x_BxNxD, cache.k_LxBxGxSxK, cache.v_LxBxGxKxS, cache.lengths_B)
    return x, cache.replace(k_LxBxGxSxK=k, v_LxBxGxKxS=v, lengths_B=cache.lengths_B + x_BxNxD.shape[1])


