"""``MegaByte`` (Yu et al. 2023): a global model over fixed patches of P bytes and a local model inside each patch.

Architecture (paper section 2.2):

* patch embedder: byte ``i`` becomes ``E_global[y_i] (+ pos[i])`` of width ``D_G``; the P vectors of a patch are
  concatenated into one ``P * D_G`` vector (the global model's width, no projection);
* global model: a causal ``TransformerStack`` over patches fed with the one-patch shift (a trainable pad patch
  first, the last patch dropped), then RMSNorm;
* global-to-local: each global output is split into P slices of ``D_G``, projected to ``D_L`` by one shared
  matrix (or one per in-patch position with ``per_position_projection``);
* local model: a causal decoder over the P positions of every patch in parallel; position p's input is its
  projected slice plus ``E_local`` of the previous byte (a trainable pad at p = 0), plus ``pos_local[p]`` with
  ``local_pos_embed``; with ``cross_patch_r = r`` every local layer also attends to the keys and values of the
  last r positions of the previous patch (rotary positions keep relative distances exact);
* logits from the local model (final RMSNorm and an output matrix, or the local embedding when tied).

Indexing (details in :mod:`bytescale.ops.patches`): output ``t`` is MegaByte's local position ``t + 1`` (the
prediction of byte ``t + 1`` from bytes ``<= t``); rows of any length are padded to whole patches inside the model
and the outputs sliced back.

Packed documents, and a patch that straddles two of them: local position j belongs to the document of byte
j - 1; a patch's *owner* is the document of its first local position; global position m's input keeps only the
owner's bytes of input patch m - 1 (pad-patch slices elsewhere) and global attention links positions with the
same owner; positions of another document (one that started inside the patch) get no global context; local
attention stays within a document. So an output depends on every byte of its own document up to itself and on
nothing else.

``strided_inference`` (paper section 2.3, "Strided Inference"): a second pass over the row shifted right by
``o = P // 2`` (leading padding) puts every byte in a patch grid offset by half a patch. ``"paper"``: each byte's
prediction comes from the pass in which it sits earlier in its patch (the paper's "first p/2 positions in each
patch"), i.e. byte ``j`` from the aligned pass when ``j % P < P - o``, else from the shifted one; ``hidden`` is
that pass's state, so ``unembed(hidden)`` gives the logits. ``"average"``: the logits are the average of the two
passes' probabilities at every position (not the paper's rule); ``hidden`` is the aligned pass's. Both add no
parameters: turn one on (``dataclasses.replace``) for a model trained without it. A saved config holding the old
boolean reads as ``"average"`` (``True``, what it meant) or ``"none"``.

Generation: ``decode`` appends N >= 1 bytes per row (ragged lengths); the global model advances only when a
row completes a patch (``lax.cond``; its K/V cache grows by one position per patch), the local model once per
byte. The local K/V of every position is kept (reads are limited to the current patch plus r bytes), and so
are the global K/V and the projected global contexts of every patch, so ``rollback`` only changes lengths, also
across patch boundaries. ``init_cache`` already runs global position 0 (the pad patch) and local position 0,
which need no byte.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx, struct

from bytescale import flops, vocab
from bytescale.configs import TransformerConfig, check, swiglu_hidden
from bytescale.models.base import ModelOutput
from bytescale.nn import Embedding, RMSNorm, TransformerStack
from bytescale.nn.layers import dense, param, scaled_normal, unembed
from bytescale.nn.transformer import KVCache, layer_state, scan_blocks, stacked_blocks
from bytescale.ops import patches as patch_ops
from bytescale.ops.mask import AttentionMask, segment_positions
from bytescale.ops.rows import write_rows


def _stack(d, layers, heads, head_dim=None, kv_heads=None, **kwargs) -> TransformerConfig:
  head_dim = head_dim or d // heads
  return TransformerConfig(d_model=d, num_layers=layers, num_heads=heads, num_kv_heads=kv_heads or heads,
                           head_dim=head_dim, mlp_hidden=swiglu_hidden(d), **kwargs)


STRIDED_INFERENCE_MODES = ("none", "paper", "average")


@dataclasses.dataclass(frozen=True)
class MegaByteConfig:
  """Two stacks and the patching. ``global_stack.d_model`` is ``patch_size * D_G`` (``D_G`` = per-byte width)."""

  global_stack: TransformerConfig = dataclasses.field(default_factory=lambda: _stack(64, 2, 4))
  local_stack: TransformerConfig = dataclasses.field(default_factory=lambda: _stack(32, 2, 4))
  patch_size: int = 4
  max_seq_len: int = 1024  # size of the byte position table (positions beyond it reuse its last row)
  global_pos_embed: bool = True  # paper: pos[i] added to each byte in the patch embedder
  local_pos_embed: bool = False  # SpaceByte's reimplementation: pos_local[p] added to local inputs
  cross_patch_r: int = 0  # local layers also attend to the last r positions of the previous patch (0 = off)
  strided_inference: str = "none"  # "paper" | "average": a second pass offset by patch_size // 2 (module docstring)
  per_position_projection: bool = False  # one D_G x D_L matrix per in-patch position instead of one shared
  tie_embeddings: bool = False  # logits from the local byte embedding (the paper ties)

  def __post_init__(self):
    name = "MegaByteConfig"
    for field in ("global_stack", "local_stack"):
      check(isinstance(getattr(self, field), TransformerConfig), name, field, "must be a TransformerConfig")
    if isinstance(self.strided_inference, bool):  # configs saved before the modes existed hold a bool
      object.__setattr__(self, "strided_inference", "average" if self.strided_inference else "none")
    p = self.patch_size
    check(isinstance(p, int) and not isinstance(p, bool) and p >= 1, name, "patch_size",
          f"must be a positive integer, got {p!r}")
    d_global = self.global_stack.d_model
    check(d_global % p == 0, name, "global_stack.d_model",
          f"must be patch_size * D_G (a multiple of patch_size={p}), got {d_global}; e.g. {p * max(1, d_global // p)}")
    check(isinstance(self.max_seq_len, int) and self.max_seq_len > 0, name, "max_seq_len",
          f"must be a positive integer, got {self.max_seq_len!r}")
    check(self.strided_inference in STRIDED_INFERENCE_MODES, name, "strided_inference",
          f"must be 'none', 'paper' (each byte from the pass in which it sits earlier in its patch) or 'average' "
          f"(the mean probability of both passes), got {self.strided_inference!r}")
    for field in ("global_pos_embed", "local_pos_embed", "per_position_projection", "tie_embeddings"):
      check(isinstance(getattr(self, field), bool), name, field, f"must be true or false, got {getattr(self, field)!r}")
    r = self.cross_patch_r
    check(isinstance(r, int) and not isinstance(r, bool) and 0 <= r <= p, name, "cross_patch_r",
          f"must be an integer in [0, patch_size={p}] (0 = off), got {r!r}")
    check(self.strided_inference == "none" or p >= 3, name, "strided_inference",
          f"needs patch_size >= 3 (the second pass is offset by patch_size // 2), got patch_size={p}")
    check(not self.local_stack.rope.length_dependent, name, "local_stack.rope.rope_type",
          f"must not depend on the sequence length (the local model sees one patch), got "
          f"{self.local_stack.rope.rope_type!r}")

  @property
  def d_global_embed(self) -> int:
    """``D_G``: width of one byte inside a patch (``global_stack.d_model / patch_size``)."""
    return self.global_stack.d_model // self.patch_size

  @property
  def stream_offsets(self) -> tuple[int, ...]:
    """Leading padding of each pass: (0,) or, with strided inference, (0, patch_size // 2)."""
    return (0,) if self.strided_inference == "none" else (0, self.patch_size // 2)


def from_shifted_pass(byte_index, patch_size: int):
  """Strided inference, paper mode: True where the prediction of byte ``byte_index`` is read from the pass shifted
  by ``o = P // 2``, i.e. where the byte sits later in its aligned patch (``j % P >= P - o``) than in its shifted
  one (``(j + o) % P``). Each byte thus comes from the first ``P - o`` positions of an aligned patch or the first
  ``o`` of a shifted one: the paper's "first p/2 positions in each patch" (for even P exactly half each)."""
  return byte_index % patch_size >= patch_size - patch_size // 2


# --- The local model: causal attention inside patches (plus r positions of the previous patch) ----------------

class LocalStack(nnx.Module):
  """``num_layers`` ``nn.transformer.Block``s stacked on a ``layers`` axis and run like ``TransformerStack``
  (``scan_blocks``: scan, remat), whose attention sees a window of keys arranged here: the patch (plus r
  positions of the previous patch) in the forward pass, the cache slots of that window in ``decode``."""

  def __init__(self, config: TransformerConfig, *, patch_size: int, cross_patch_r: int, rngs: nnx.Rngs):
    self.config = config
    self.patch_size = patch_size
    self.cross_patch_r = cross_patch_r
    self.blocks = stacked_blocks(config, rngs)

  def __call__(self, x_BxMxPxD, positions_BxMxP, segments_BxMxP):
    """All patches in parallel; segment 0 marks positions that belong to no document."""
    b, m, p, d = x_BxMxPxD.shape
    r = self.cross_patch_r

    def with_previous(a_BxMxPx___, fill):
      """Prepends the last r positions of the previous patch (``fill`` before patch 0)."""
      if not r:
        return a_BxMxPx___
      previous = patch_ops.shift_patches(a_BxMxPx___, jnp.full_like(a_BxMxPx___[:, :1], fill))
      return jnp.concatenate([previous[:, :, p - r:], a_BxMxPx___], axis=2)

    # One attention row per patch: its P queries and its r + P keys.
    mask = AttentionMask(
        positions_BxMxP.reshape(b * m, p), with_previous(positions_BxMxP, 0).reshape(b * m, r + p),
        segments_BxMxP.reshape(b * m, p), with_previous(segments_BxMxP, 0).reshape(b * m, r + p),
        causal=True, window=self.config.window,
    )
    positions_BxT = positions_BxMxP.reshape(b, m * p)

    def attend(attention, h_BxTxD):
      q, key, value = attention.project(h_BxTxD, positions_BxT)  # absolute positions: RoPE is relative
      by_patch = lambda a: a.reshape(b, m, p, *a.shape[2:])  # noqa: E731
      key = with_previous(by_patch(key), 0).reshape(b * m, r + p, *key.shape[2:])
      value = with_previous(by_patch(value), 0).reshape(b * m, r + p, *value.shape[2:])
      out = attention.attend(q.reshape(b * m, p, *q.shape[2:]), key, value, mask)
      return out.reshape(b, m * p, -1), None

    layer = lambda block, x_BxTxD: block.apply_with(x_BxTxD, attend)[0]  # noqa: E731
    return scan_blocks(self.blocks, self.config, layer, x_BxMxPxD.reshape(b, m * p, d)).reshape(b, m, p, d)

  def init_cache(self, batch: int, slots: int):
    c = self.config
    shape = (c.num_layers, batch, slots, c.num_kv_heads, c.head_dim)
    return jnp.zeros(shape, c.dtype), jnp.zeros(shape, c.dtype)

  def decode(self, x_BxNxD, positions_BxN, k_LxBxSxGxK, v_LxBxSxGxK, first_valid: int):
    """N new local positions per row: writes their K/V at slots = positions, attends over each one's window.

    The window of position j is slots ``[P * (j // P) - r, j]``; slots below ``first_valid`` hold no byte.
    """
    b, n, _ = x_BxNxD.shape
    p, r = self.patch_size, self.cross_patch_r
    slots = k_LxBxSxGxK.shape[2]
    rows_Bx1 = jnp.arange(b)[:, None]
    window_BxNxW = (positions_BxN // p * p - r)[..., None] + jnp.arange(r + p, dtype=jnp.int32)
    window_valid_BxNxW = ((window_BxNxW >= first_valid) & (window_BxNxW < slots)).astype(jnp.int32)
    window_slots_BxNxW = jnp.clip(window_BxNxW, 0, slots - 1)
    # One attention row per new position: one query, its window of r + P slots.
    mask = AttentionMask(
        positions_BxN.reshape(b * n, 1), window_BxNxW.reshape(b * n, r + p), jnp.ones((b * n, 1), jnp.int32),
        window_valid_BxNxW.reshape(b * n, r + p), causal=True, window=self.config.window,
    )
    graphdef, state = nnx.split(self.blocks)

    def layer(index: int, x, k_all, v_all):
      def attend(attention, h_BxNxD):
        q, key, value = attention.project(h_BxNxD, positions_BxN)
        k_new = k_all.at[index, rows_Bx1, positions_BxN].set(key.astype(k_all.dtype), mode="drop")
        v_new = v_all.at[index, rows_Bx1, positions_BxN].set(value.astype(v_all.dtype), mode="drop")
        keys = k_new[index, rows_Bx1[..., None], window_slots_BxNxW].astype(attention.dtype)
        values = v_new[index, rows_Bx1[..., None], window_slots_BxNxW].astype(attention.dtype)
        out = attention.attend(
            q.reshape(b * n, 1, *q.shape[2:]), keys.reshape(b * n, r + p, *keys.shape[3:]),
            values.reshape(b * n, r + p, *values.shape[3:]), mask,
        )
        return out.reshape(b, n, -1), (k_new, v_new)

      return nnx.merge(graphdef, layer_state(state, index)).apply_with(x, attend)

    # A python loop over the layers, as TransformerStack.decode: each layer's weights sliced at an index XLA cannot
    # see (layer_state), so that a generation loop hoists the slices out of its body (a scan over the stacked
    # weights copied every layer's weights at every step); the caches are updated in place.
    x, k_all, v_all = x_BxNxD, k_LxBxSxGxK, v_LxBxSxGxK
    for index in range(self.config.num_layers):
      x, (k_all, v_all) = layer(index, x, k_all, v_all)
    return x, k_all, v_all


# --- Cache --------------------------------------------------------------------------------------------------

@struct.dataclass
class MegaByteCache:
  """Decoding state of one pass (stream offset ``offset``): everything is kept, so rollback is a length update.

  ``bytes_BxS``: stream ids (slot = stream index); ``global_kv``: the global stack's K/V per global position
  (its ``lengths_B`` is unused: the number of valid positions is ``(offset + lengths) // P + 1``);
  ``context_BxSxD``: projected global context per local position; ``local_k/v``: local K/V per local position.
  """

  bytes_BxS: jax.Array
  global_kv: KVCache
  context_BxSxD: jax.Array
  local_k_LxBxSxGxK: jax.Array
  local_v_LxBxSxGxK: jax.Array
  lengths_B: jax.Array
  offset: int = struct.field(pytree_node=False, default=0)

  def rollback(self, n_B):
    return self.replace(lengths_B=jnp.maximum(self.lengths_B - n_B, 0))


@struct.dataclass
class StridedCache:
  """The caches of the aligned pass and of the pass offset by ``patch_size // 2`` (strided inference)."""

  passes: tuple

  @property
  def lengths_B(self):
    return self.passes[0].lengths_B

  def rollback(self, n_B):
    return StridedCache(tuple(c.rollback(n_B) for c in self.passes))


# --- The model ----------------------------------------------------------------------------------------------

class MegaByte(nnx.Module):
  """Patch embedder -> global stack over shifted patches -> projection -> local stack per patch -> logits."""

  def __init__(self, config: MegaByteConfig, *, rngs: nnx.Rngs):
    c = config
    self.config = c
    p, d_g, d_l = c.patch_size, c.d_global_embed, c.local_stack.d_model
    self.global_embed = Embedding(vocab.VOCAB_SIZE, d_g, rngs=rngs)
    if c.global_pos_embed:
      self.global_pos = param(rngs, jax.nn.initializers.normal(0.02), (c.max_seq_len, d_g), ("sequence", "embed"))
    self.pad_patch = param(rngs, jax.nn.initializers.normal(1.0), (p, d_g), (None, "embed"))
    self.global_stack = TransformerStack(c.global_stack, rngs=rngs)
    self.global_norm = RMSNorm(c.global_stack.d_model, eps=c.global_stack.norm_eps, rngs=rngs)
    if c.per_position_projection:
      self.w_gl = param(rngs, scaled_normal(d_g), (p, d_g, d_l), (None, None, "embed"))
    else:
      self.w_gl = param(rngs, scaled_normal(d_g), (d_g, d_l), (None, "embed"))
    self.local_embed = Embedding(vocab.VOCAB_SIZE, d_l, rngs=rngs)
    self.local_pad = param(rngs, jax.nn.initializers.normal(1.0), (d_l,), ("embed",))
    if c.local_pos_embed:
      self.local_pos = param(rngs, jax.nn.initializers.normal(0.02), (p, d_l), (None, "embed"))
    self.local_stack = LocalStack(c.local_stack, patch_size=p, cross_patch_r=c.cross_patch_r, rngs=rngs)
    self.final_norm = RMSNorm(d_l, eps=c.local_stack.norm_eps, rngs=rngs)
    if not c.tie_embeddings:
      self.unembedding = param(rngs, scaled_normal(d_l), (d_l, vocab.VOCAB_SIZE), ("embed", "vocab"))

  @property
  def global_dtype(self):
    return jnp.dtype(self.config.global_stack.dtype)

  @property
  def local_dtype(self):
    return jnp.dtype(self.config.local_stack.dtype)

  # -- pieces shared by the forward pass and decoding --

  def _byte_vectors(self, ids, positions):
    """Patch-embedder rows ``E_global[id] (+ pos[position])``, positions clipped to the table."""
    x = self.global_embed(ids)
    if self.config.global_pos_embed:
      index = jnp.clip(positions, 0, self.config.max_seq_len - 1)
      x = x + jnp.take(self.global_pos[...], index, axis=0)
    return x

  def _global_inputs(self, shifted_BxMxPxD, keep_BxMxP):
    """Kept byte vectors, pad-patch slices elsewhere, concatenated to ``P * D_G``."""
    x = jnp.where(keep_BxMxP[..., None], shifted_BxMxPxD, self.pad_patch[...])
    return x.reshape(*x.shape[:2], -1).astype(self.global_dtype)

  def _contexts(self, global_out_BxMxD):
    """Normed global outputs split into P slices and projected to the local width: ``BxMxPxD_L``."""
    c = self.config
    g = self.global_norm(global_out_BxMxD).astype(self.local_dtype)
    g = g.reshape(*g.shape[:2], c.patch_size, c.d_global_embed)
    if c.per_position_projection:
      return jnp.einsum("bmpg,pgl->bmpl", g, self.w_gl[...].astype(g.dtype))
    return dense(g, self.w_gl[...].astype(g.dtype))

  def _local_inputs(self, context_BxUxD, previous_ids_BxU, in_patch_BxU):
    """Context + embedding of the previous byte (the pad at in-patch position 0) (+ local position)."""
    previous = jnp.where((in_patch_BxU == 0)[..., None], self.local_pad[...], self.local_embed(previous_ids_BxU))
    x = context_BxUxD + previous.astype(self.local_dtype)
    if self.config.local_pos_embed:
      x = x + jnp.take(self.local_pos[...], in_patch_BxU, axis=0).astype(self.local_dtype)
    return x

  def unembed(self, hidden_BxTxD):
    """Final norm and output projection; logits in float32."""
    if self.config.tie_embeddings:
      return unembed(self.final_norm, hidden_BxTxD, embedding=self.local_embed)
    return unembed(self.final_norm, hidden_BxTxD, kernel_DxV=self.unembedding)

  # -- forward --

  def _stream_hidden(self, ids_BxT, segments_BxT):
    """Local hidden states of outputs 0..T-1 for one pass over the stream (see ``bytescale.ops.patches``)."""
    c = self.config
    b, t = ids_BxT.shape
    p = c.patch_size
    j = patch_ops.num_local_positions(t, p)
    m = j // p
    ids = patch_ops.pad_axis1(ids_BxT, j, vocab.PAD)
    segments = patch_ops.pad_axis1(segments_BxT, j, 0)
    local_segments = patch_ops.local_segments(segments).reshape(b, m, p)
    owners_BxM = patch_ops.patch_owners(local_segments)

    byte_vectors = self._byte_vectors(ids, segment_positions(segments)).reshape(b, m, p, -1)
    pad_patch = jnp.broadcast_to(self.pad_patch[...], (b, 1, p, c.d_global_embed))
    shifted = patch_ops.shift_patches(byte_vectors, pad_patch.astype(byte_vectors.dtype))
    keep = patch_ops.global_input_keep(segments.reshape(b, m, p), owners_BxM)
    global_out = self.global_stack(self._global_inputs(shifted, keep), None, owners_BxM)
    context = self._contexts(global_out)
    context = context * patch_ops.has_global_context(local_segments, owners_BxM)[..., None].astype(context.dtype)

    previous_ids = jnp.pad(ids[:, :-1], ((0, 0), (1, 0)), constant_values=vocab.PAD)
    in_patch = jnp.broadcast_to(jnp.arange(j, dtype=jnp.int32) % p, (b, j))
    x = self._local_inputs(context.reshape(b, j, -1), previous_ids, in_patch)
    positions = jnp.broadcast_to(jnp.arange(j, dtype=jnp.int32), (b, j)).reshape(b, m, p)
    hidden = self.local_stack(x.reshape(b, m, p, -1), positions, local_segments)
    return hidden.reshape(b, j, -1)[:, 1:t + 1]

  def __call__(self, bytes_BxT, segment_ids_BxT=None, *, patches=None) -> ModelOutput:
    del patches  # MegaByte's patches are fixed; accepted so every model shares one signature.
    if segment_ids_BxT is None:
      segment_ids_BxT = jnp.ones_like(bytes_BxT)
    segment_ids_BxT = segment_ids_BxT.astype(jnp.int32)
    hidden = self._stream_hidden(bytes_BxT, segment_ids_BxT)
    mode = self.config.strided_inference
    if mode == "none":
      return ModelOutput(self.unembed(hidden), hidden)
    o, t = self.config.stream_offsets[1], bytes_BxT.shape[1]
    shifted_ids = jnp.pad(bytes_BxT, ((0, 0), (o, 0)), constant_values=vocab.PAD)
    shifted_segments = jnp.pad(segment_ids_BxT, ((0, 0), (o, 0)))
    shifted_hidden = self._stream_hidden(shifted_ids, shifted_segments)[:, o:o + t]
    return self._combine_passes(hidden, shifted_hidden, jnp.arange(1, t + 1, dtype=jnp.int32)[None])

  def _combine_passes(self, hidden_BxTxD, shifted_hidden_BxTxD, predicted_BxT):
    """Strided inference: the two passes' states for the predictions of bytes ``predicted_BxT``, combined."""
    if self.config.strided_inference == "paper":
      # Selecting states before the unembedding: one output projection per byte, as without strided inference.
      shifted = from_shifted_pass(predicted_BxT, self.config.patch_size)[..., None]
      hidden = jnp.where(shifted, shifted_hidden_BxTxD, hidden_BxTxD)
      return ModelOutput(self.unembed(hidden), hidden)
    logits = _average_probabilities(self.unembed(hidden_BxTxD), self.unembed(shifted_hidden_BxTxD))
    return ModelOutput(logits, hidden_BxTxD)

  def with_strided_inference(self, mode: str) -> MegaByte:
    """This model's parameters under another ``strided_inference`` mode (a mode adds no parameters), e.g. to
    evaluate with the paper's rule a model trained without it."""
    config = dataclasses.replace(self.config, strided_inference=mode)
    other = nnx.eval_shape(lambda: MegaByte(config, rngs=nnx.Rngs(0)))
    nnx.update(other, nnx.state(self))
    return other

  # -- generation --

  def init_cache(self, batch: int, max_len: int):
    """Caches for ``max_len`` bytes per row; the positions that need no byte are computed here."""
    if max_len < 1:
      raise ValueError(f"max_len must be >= 1, got {max_len}")
    caches = tuple(self._init_pass_cache(batch, max_len, o) for o in self.config.stream_offsets)
    return caches[0] if len(caches) == 1 else StridedCache(caches)

  def _init_pass_cache(self, batch, max_len, offset):
    c = self.config
    p = c.patch_size
    global_slots = (offset + max_len) // p + 2  # room for the static number of positions a decode call writes
    slots = global_slots * p
    global_kv = self.global_stack.init_cache(batch, global_slots)
    pad_patch = jnp.broadcast_to(self.pad_patch[...], (batch, 1, p, c.d_global_embed))
    out, global_kv = self.global_stack.decode(self._global_inputs(pad_patch, jnp.zeros((batch, 1, p), bool)),
                                              global_kv)
    context = jnp.zeros((batch, slots, c.local_stack.d_model), self.local_dtype)
    context = context.at[:, :p].set(self._contexts(out).reshape(batch, p, -1))
    local_k, local_v = self.local_stack.init_cache(batch, slots)
    if offset == 0:  # local position 0 (the prediction of byte 0 from nothing) is a key for patch 0
      zeros = jnp.zeros((batch, 1), jnp.int32)
      x = self._local_inputs(context[:, :1], jnp.full((batch, 1), vocab.PAD, jnp.int32), zeros)
      _, local_k, local_v = self.local_stack.decode(x, zeros, local_k, local_v, first_valid=0)
    return MegaByteCache(
        bytes_BxS=jnp.full((batch, slots), vocab.PAD, jnp.int32), global_kv=global_kv, context_BxSxD=context,
        local_k_LxBxSxGxK=local_k, local_v_LxBxSxGxK=local_v, lengths_B=jnp.zeros((batch,), jnp.int32),
        offset=offset,
    )

  def decode(self, cache, bytes_BxN):
    """Appends N bytes per row at each row's length; returns the N outputs and the updated cache."""
    if isinstance(cache, StridedCache):
      predicted_BxN = cache.lengths_B[:, None] + 1 + jnp.arange(bytes_BxN.shape[1], dtype=jnp.int32)
      (hidden, aligned), (shifted_hidden, shifted) = (self._decode_pass(pc, bytes_BxN) for pc in cache.passes)
      return self._combine_passes(hidden, shifted_hidden, predicted_BxN), StridedCache((aligned, shifted))
    hidden, cache = self._decode_pass(cache, bytes_BxN)
    return ModelOutput(self.unembed(hidden), hidden), cache

  def _decode_pass(self, cache: MegaByteCache, ids_BxN):
    """One pass's local states for N appended bytes (not yet unembedded) and its updated cache."""
    c = self.config
    p, o = c.patch_size, cache.offset
    b, n = ids_BxN.shape
    ids_BxN = ids_BxN.astype(jnp.int32)
    lengths = cache.lengths_B
    rows_Bx1 = jnp.arange(b)[:, None]
    new = jnp.arange(n, dtype=jnp.int32)
    stream_BxN = o + lengths[:, None] + new
    byte_buffer = cache.bytes_BxS.at[rows_Bx1, stream_BxN].set(ids_BxN, mode="drop")

    # Global positions whose input patch is completed by these bytes (at most ceil(N / P) per row).
    first_new_B = (o + lengths) // p + 1
    end_B = (o + lengths + n) // p + 1
    count = -(-n // p)

    global_layers = self.global_stack.layer_states()  # sliced outside the cond (see TransformerStack.layer_states)

    def run_global(state):
      global_kv, context = state
      positions_BxM = first_new_B[:, None] + jnp.arange(count, dtype=jnp.int32)
      source_BxMxP = (positions_BxM[..., None] - 1) * p + jnp.arange(p, dtype=jnp.int32)
      flat_source = jnp.clip(source_BxMxP, 0, byte_buffer.shape[1] - 1).reshape(b, count * p)
      source_ids = jnp.take_along_axis(byte_buffer, flat_source, axis=1)
      vectors = self._byte_vectors(source_ids, flat_source - o).reshape(b, count, p, -1)
      x = self._global_inputs(vectors, source_BxMxP >= o)
      out, updated = self.global_stack.decode(x, global_kv.replace(lengths_B=first_new_B), layers=global_layers)
      new_context = self._contexts(out).reshape(b, count * p, -1).astype(context.dtype)
      return updated.replace(lengths_B=end_B), write_rows(context, new_context, first_new_B * p)

    global_kv, context = jax.lax.cond(
        jnp.any(end_B > first_new_B), run_global, lambda state: state, (cache.global_kv, cache.context_BxSxD)
    )

    local_positions_BxN = stream_BxN + 1
    x = self._local_inputs(context[rows_Bx1, local_positions_BxN], ids_BxN, local_positions_BxN % p)
    hidden, local_k, local_v = self.local_stack.decode(
        x, local_positions_BxN, cache.local_k_LxBxSxGxK, cache.local_v_LxBxSxGxK, first_valid=_first_local_slot(o)
    )
    cache = cache.replace(bytes_BxS=byte_buffer, global_kv=global_kv, context_BxSxD=context,
                          local_k_LxBxSxGxK=local_k, local_v_LxBxSxGxK=local_v, lengths_B=lengths + n)
    return hidden, cache

  @staticmethod
  def rollback(cache, n_B):
    """Forgets the last ``n_B`` bytes of each row (any number, across patch boundaries): lengths only."""
    return cache.rollback(n_B)


def _first_local_slot(offset: int) -> int:
  """Local slots below this hold no position of the document: with leading padding, positions up to ``offset``
  belong to the padding; without, position 0 belongs to the document (see ``bytescale.ops.patches``)."""
  return offset + 1 if offset else 0


def _average_probabilities(logits_a, logits_b):
  """``log((softmax(a) + softmax(b)) / 2)``: a valid logit vector for the averaged distribution."""
  both = jnp.stack([jax.nn.log_softmax(logits_a, axis=-1), jax.nn.log_softmax(logits_b, axis=-1)])
  return jax.nn.logsumexp(both, axis=0) - jnp.log(2.0)


def _megabyte(global_d, global_layers, global_heads, local_d, local_layers, local_heads, patch_size, seq,
              head_dim=None, **options):
  return MegaByteConfig(
      global_stack=_stack(global_d, global_layers, global_heads, head_dim),
      local_stack=_stack(local_d, local_layers, local_heads, head_dim),
      patch_size=patch_size, max_seq_len=seq, **options,
  )


PRESETS = {
    "tiny": _megabyte(64, 2, 4, 32, 2, 4, 4, 1024),
    # About 25M parameters; the same shape as the PyTorch-port comparison (dims (512, 256), depths (6, 4)).
    "small": _megabyte(512, 6, 8, 256, 6, 4, 8, 2048, head_dim=64),
    # The paper's text configuration: global D=2048 L=14 (D_G=256), local D=1024 L=18, P=8, context 8192.
    "paper": _megabyte(2048, 14, 16, 1024, 18, 16, 8, 8192, tie_embeddings=True),
}


# --- FLOPs --------------------------------------------------------------------------------------------------

def _local_keys(patch_size: int, cross_patch_r: int, window: int | None, *, convention: str, attention: str):
  """Keys per query of MegaByte's local model: in-patch position i sees ``r + i + 1`` keys (causal), out of the
  ``r + P`` a dense score matrix holds."""
  span = patch_size + cross_patch_r
  if convention == "spacebyte":
    return float(span if window is None else min(window, span))
  if attention == "dense":
    return float(span)
  seen = [cross_patch_r + i + 1 for i in range(patch_size)]
  return sum(s if window is None else min(s, window) for s in seen) / patch_size


def flops_per_byte(config: MegaByteConfig, seq_len: int, *, convention="exact", attention="causal") -> flops.FlopCount:
  """Global model once per patch, projection and local model once per local position, unembedding per byte.

  Exact: ``seq_len`` bytes fill ``U = ceil((seq_len + 1) / P) * P`` local positions (the pad patch shifts the
  global input by one, rows are padded to whole patches) and ``U / P`` global positions, so a row of a whole
  number of patches pays for one more patch. SpaceByte: ``T / P`` patches, the paper's formula. The local model
  attends within its patch (plus ``cross_patch_r`` positions of the previous one). With ``strided_inference``
  the forward pass runs a second pass over the row shifted by ``P // 2``; it is counted in the same components.
  The unembedding runs once per byte, except with ``"average"``, which unembeds both passes.
  """
  flops.check_convention(convention, attention)
  p = config.patch_size
  local = config.local_stack
  d_local = local.d_model
  local_keys = _local_keys(p, config.cross_patch_r, local.window, convention=convention, attention=attention)
  unembeddings = 2 if config.strided_inference == "average" else 1
  count = flops.FlopCount({"unembed": 2.0 * d_local * vocab.VOCAB_SIZE * unembeddings})
  for offset in config.stream_offsets:
    stream = seq_len + offset
    positions = patch_ops.num_local_positions(stream, p) if convention == "exact" else stream
    patches = positions / p
    count += flops.stack_flops(config.global_stack, patches, convention=convention, attention=attention,
                         prefix="global_").scaled(patches / seq_len)
    count += flops.stack_flops(local, p, convention=convention, attention=attention, prefix="local_",
                         keys=local_keys).scaled(positions / seq_len)
    count += flops.FlopCount({"global_to_local": 2.0 * config.d_global_embed * d_local * positions / seq_len})
  return count
