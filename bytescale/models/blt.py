"""BLT, the Byte Latent Transformer (Pagnoni et al. 2024): dynamic patches over bytes.

    bytes -> byte embedding + hash n-gram embeddings -> local encoder (byte layers, sliding-window causal,
    document-masked) -> per patch: k queries = projected max-pool of the patch's byte states, cross-attending
    to the bytes of their own patch -> global latent transformer over patches (causal, document-aware)
    -> local decoder: every byte cross-attends to the global output of the PREVIOUS patch of its document (the
    first patch of a document reads learned BOS slots), then byte layers, final norm, logits over bytes.

The one-patch lag keeps the model causal: a byte's logits depend on its own patch only through the byte-level
layers, and whether a byte opens a patch depends only on earlier bytes (``bytescale.patching``).

Patches come from ``config.patching``: strided and space patching need nothing; entropy patching runs a frozen
entropy model (a ``ByteLM`` checkpoint given by ``entropy_model=DIR``) inside the forward pass. Its weights
are ``Frozen`` variables, not ``nnx.Param``: the train state never updates them but checkpoints them with the
run. ``model(bytes, segment_ids, patches=p)`` uses precomputed patches instead (e.g. from the data pipeline).

Generation (``init_cache`` / ``decode`` / ``rollback``) keeps full-length byte buffers (ids, entropies,
encoder states), byte-level KV caches for the entropy model, encoder and decoder, a KV cache over patches for
the global model and the decoder's cross-attention keys/values per patch. A decode call recomputes the
patches of the whole buffer (cheap, and causal, so earlier patches never change) and runs the global model
only on the patches that closed in this call, under ``lax.cond`` so that a call where no row closed a patch
skips it. Everything a byte contributed is indexed by position, so ``rollback`` is a pure length update.
"""

from __future__ import annotations

import dataclasses

import einops
import jax
import jax.numpy as jnp
from flax import nnx, struct

from bytescale import entropy, flops, patching, vocab
from bytescale.configs import ByteLMConfig, ConfigError, TransformerConfig, check, swiglu_hidden
from bytescale.models import bytelm
from bytescale.models.base import ModelOutput, check_inputs
from bytescale.models.bytelm import ByteLM
from bytescale.nn import Embedding, KVCache, RMSNorm, TransformerStack
from bytescale.nn.layers import param, scaled_normal, unembed
from bytescale.ops import attention as attention_ops
from bytescale.ops import hashing, rope
from bytescale.ops.mask import AttentionMask
from bytescale.ops.losses import masked_cross_entropy
from bytescale.ops.rows import take_rows, write_rows
from bytescale.patching import Patches, PatchingConfig

from bytescale.ops.pooling import segment_pool


# --- Frozen variables and the entropy model ---------------------------------------------------------------

class Frozen(nnx.Variable):
  """A non-trainable model variable: kept out of ``nnx.Param`` so optimizers never touch it."""


def freeze(module: nnx.Module) -> nnx.Module:
  """Turns every ``nnx.Param`` of ``module`` into ``Frozen`` in place (metadata kept); returns ``module``."""
  for _, node in list(nnx.iter_modules(module)):
    for name, value in list(vars(node).items()):
      if isinstance(value, nnx.Param):
        setattr(node, name, Frozen(value[...], **value.get_metadata()))
  return module


def float32_config(config: ByteLMConfig) -> ByteLMConfig:
  return dataclasses.replace(config, stack=dataclasses.replace(config.stack, dtype="float32"))


# --- Config -----------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class BLTConfig:
  """Widths: ``encoder.d_model`` (h_E), ``global_stack.d_model`` (h_G), ``decoder.d_model`` (h_D)."""

  encoder: TransformerConfig = dataclasses.field(default_factory=lambda: TransformerConfig(num_layers=1, window=64))
  global_stack: TransformerConfig = dataclasses.field(default_factory=TransformerConfig)
  decoder: TransformerConfig = dataclasses.field(default_factory=TransformerConfig)
  patching: PatchingConfig = dataclasses.field(default_factory=PatchingConfig)
  hash_ngrams: tuple[int, ...] = hashing.DEFAULT_NGRAMS  # () = no hash embeddings
  hash_buckets: int = 4096  # per n (the released models use 500,002)
  queries_per_patch: int = 2  # k: encoder queries per patch and decoder key/value slots per patch
  max_seq_len: int = 256
  # The entropy model (entropy patching): the run directory it was trained in, and its config. The training layer
  # (``bytescale.train.checkpoint.resolve_entropy_model``) reads the config from the directory and keeps it here,
  # so a saved BLT rebuilds even when the directory is gone (the weights are in the BLT's own checkpoint).
  entropy_model: str | None = None
  entropy_model_config: ByteLMConfig | None = None

  def __post_init__(self):
    name = "BLTConfig"
    object.__setattr__(self, "hash_ngrams", tuple(int(n) for n in self.hash_ngrams))
    check(all(1 <= n <= 16 for n in self.hash_ngrams), name, "hash_ngrams",
          f"sizes must be in [1, 16], got {self.hash_ngrams}")
    check(len(set(self.hash_ngrams)) == len(self.hash_ngrams), name, "hash_ngrams", "sizes must be distinct")
    check(0 < self.hash_buckets < 2**31, name, "hash_buckets", f"must be in [1, 2**31), got {self.hash_buckets}")
    check(self.queries_per_patch >= 1, name, "queries_per_patch", f"must be >= 1, got {self.queries_per_patch}")
    check(self.max_seq_len > 0, name, "max_seq_len", f"must be > 0, got {self.max_seq_len}")
    check(self.entropy_model is None or (isinstance(self.entropy_model, str) and self.entropy_model.strip() != ""),
          name, "entropy_model", f"must be None or the run directory of a bytelm entropy model, got "
          f"{self.entropy_model!r}")
    check(self.entropy_model_config is None or isinstance(self.entropy_model_config, ByteLMConfig), name,
          "entropy_model_config", f"must be None or a ByteLMConfig, got {type(self.entropy_model_config).__name__}")


# --- Layers -----------------------------------------------------------------------------------------------

class CrossAttention(nnx.Module):
  """Pre-norm multi-head cross-attention (no RoPE: patch queries have no byte position); callers add it."""

  def __init__(self, d_model: int, num_heads: int, head_dim: int, *, norm_eps: float, dtype, impl: str,
               rngs: nnx.Rngs):
    self.dtype = jnp.dtype(dtype)
    self.impl = impl
    self.q_norm = RMSNorm(d_model, eps=norm_eps, rngs=rngs)
    self.kv_norm = RMSNorm(d_model, eps=norm_eps, rngs=rngs)
    shape, names = (d_model, num_heads, head_dim), ("embed", "heads", "head_dim")
    self.wq = param(rngs, scaled_normal(d_model), shape, names)
    self.wk = param(rngs, scaled_normal(d_model), shape, names)
    self.wv = param(rngs, scaled_normal(d_model), shape, names)
    self.wo = param(rngs, scaled_normal(num_heads * head_dim), (num_heads, head_dim, d_model),
                          ("heads", "head_dim", "embed"))

  def queries(self, x_BxTxD):
    x = self.q_norm(x_BxTxD).astype(self.dtype)
    return jnp.einsum("...d,dhk->...hk", x, self.wq[...].astype(self.dtype))

  def keys_values(self, x_BxSxD):
    x = self.kv_norm(x_BxSxD).astype(self.dtype)
    k = jnp.einsum("...d,dhk->...hk", x, self.wk[...].astype(self.dtype))
    v = jnp.einsum("...d,dhk->...hk", x, self.wv[...].astype(self.dtype))
    return k, v

  def output(self, out_BxTxHxK):
    return jnp.einsum("...hk,hkd->...d", out_BxTxHxK, self.wo[...].astype(self.dtype))

  def attend(self, q_BxTxHxK, k_BxSxHxK, v_BxSxHxK, mask: AttentionMask | None = None):
    """Attention through the one dispatch (``impl``); no mask: every query sees every key."""
    if mask is None:
      zeros = lambda n: jnp.zeros((q_BxTxHxK.shape[0], n), jnp.int32)  # noqa: E731
      mask = AttentionMask(zeros(q_BxTxHxK.shape[1]), zeros(k_BxSxHxK.shape[1]), causal=False)
    return attention_ops.attention(q_BxTxHxK, k_BxSxHxK, v_BxSxHxK, mask, impl=self.impl)


# --- Cache ------------------------------------------------------------------------------------------------

@struct.dataclass
class BLTCache:
  """Decoding state for ``S = max_len`` bytes; every buffer is indexed by byte (or patch) position."""

  lengths_B: jax.Array  # bytes seen per row; the only field ``rollback`` changes
  bytes_BxS: jax.Array
  entropies_BxS: jax.Array  # float32, H[t] of the entropy model (zeros without entropy patching)
  encoder_states_BxSxD: jax.Array  # local encoder output per byte (pooled when its patch closes)
  slot_keys_BxMxQxHxK: jax.Array  # decoder cross-attention keys of slot p (the global output of patch p-1)
  slot_values_BxMxQxHxK: jax.Array
  encoder_cache: KVCache
  global_cache: KVCache  # one slot per patch; only the closed patches' slots are meaningful
  decoder_cache: KVCache
  entropy_cache: KVCache | None

  @property
  def max_len(self) -> int:
    return self.bytes_BxS.shape[1]

  def rollback(self, n_B):
    return self.replace(lengths_B=jnp.maximum(self.lengths_B - n_B, 0))


# --- Model ------------------------------------------------------------------------------------------------

class BLT(nnx.Module):
  def __init__(self, config: BLTConfig, *, rngs: nnx.Rngs, entropy_lm=None):
    c = config
    self.config = c
    d_e, d_g, d_d, q = c.encoder.d_model, c.global_stack.d_model, c.decoder.d_model, c.queries_per_patch
    self.byte_embed = Embedding(vocab.VOCAB_SIZE, d_e, rngs=rngs)
    if c.hash_ngrams:
      # One table for all n (rows n_index * buckets + bucket): a single gather, sharded along the buckets.
      self.hash_table = param(rngs, jax.nn.initializers.normal(1.0), (len(c.hash_ngrams) * c.hash_buckets, d_e),
                              ("hash_buckets", "embed"))
    else:
      self.hash_table = None
    self.encoder = TransformerStack(c.encoder, rngs=rngs)
    # "embed" never names two axes of one parameter (a mesh axis can shard only one): wide sides are "mlp".
    self.query_init = param(rngs, scaled_normal(d_e), (d_e, q, d_e), ("embed", "cross_queries", "mlp"))
    self.encoder_cross = self._cross_attention(c.encoder, rngs)
    self.global_in = param(rngs, scaled_normal(q * d_e), (q, d_e, d_g), ("cross_queries", "mlp", "embed"))
    self.global_stack = TransformerStack(c.global_stack, rngs=rngs)
    self.global_out = param(rngs, scaled_normal(d_g), (d_g, q, d_d), ("embed", "cross_queries", "mlp"))
    self.bos_slots = param(rngs, jax.nn.initializers.normal(1.0), (q, d_d), ("cross_queries", "embed"))
    self.byte_to_decoder = param(rngs, scaled_normal(d_e), (d_e, d_d), ("mlp", "embed"))
    self.decoder_cross = self._cross_attention(c.decoder, rngs)
    self.decoder = TransformerStack(c.decoder, rngs=rngs)
    self.final_norm = RMSNorm(d_d, eps=c.decoder.norm_eps, rngs=rngs)
    self.unembedding = param(rngs, scaled_normal(d_d), (d_d, vocab.VOCAB_SIZE), ("embed", "vocab"))
    self.entropy_lm = self._entropy_model(entropy_lm, rngs) if c.patching.needs_entropies else None

  @staticmethod
  def _cross_attention(stack: TransformerConfig, rngs):
    return CrossAttention(stack.d_model, stack.num_heads, stack.head_dim, norm_eps=stack.norm_eps, dtype=stack.dtype,
                          impl=stack.attention_impl, rngs=rngs)

  def _entropy_model(self, entropy_lm, rngs):
    """The frozen float32 entropy model: ``entropy_lm`` (trained weights, e.g. from
    ``bytescale.train.checkpoint.load_entropy_model``), or, without it, one of ``config.entropy_model_config``'s
    shape whose weights a checkpoint restore fills in (``bytescale.train.checkpoint.load_model``). Training from
    scratch must pass ``entropy_lm``: ``bytescale.train.loop.train`` does."""
    c = self.config
    if entropy_lm is not None:
      lm = nnx.clone(entropy_lm)
      if lm.config.stack.dtype != "float32":
        lm32 = ByteLM(float32_config(lm.config), rngs=nnx.Rngs(0))
        nnx.update(lm32, nnx.state(lm))
        lm = lm32
      return freeze(lm)
    if c.entropy_model_config is not None:
      return freeze(ByteLM(float32_config(c.entropy_model_config), rngs=rngs))
    raise ConfigError(
        "BLTConfig.entropy_model: entropy patching needs a trained entropy model: train one with `bytescale train "
        "--model bytelm --preset entropy-tiny --out DIR` and pass --set entropy_model=DIR (in Python: "
        "bytescale.train.checkpoint.resolve_entropy_model(config) and build with entropy_lm="
        "load_entropy_model(DIR)), or choose --set patcher=space (or strided)")

  @property
  def compute_dtype(self):
    return jnp.dtype(self.config.encoder.dtype)

  # --- Patching ---

  def entropies(self, bytes_BxT, segment_ids_BxT=None):
    """Float32 next-byte entropies of the frozen entropy model (no gradient flows into it)."""
    if self.entropy_lm is None:
      raise ConfigError("BLT: this model does not use entropy patching (config.patching.patcher != 'entropy')")
    pc = self.config.patching
    h = entropy.compute_entropies(self.entropy_lm, bytes_BxT, segment_ids_BxT, context=pc.entropy_context,
                                  overlap=pc.entropy_overlap)
    return jax.lax.stop_gradient(h)

  def patch(self, bytes_BxT, segment_ids_BxT=None, *, max_patches: int | None = None) -> Patches:
    """The patches this model uses for ``bytes_BxT`` when none are given (``config.patching``)."""
    pc = self.config.patching
    h = self.entropies(bytes_BxT, segment_ids_BxT) if pc.needs_entropies else None
    return patching.patch(pc, bytes_BxT, segment_ids_BxT, entropies_BxT=h, max_patches=max_patches)

  # --- Pieces shared by the forward pass and decoding ---

  def embed_bytes(self, bytes_BxT, segment_ids_BxT):
    """Byte embedding plus the hash n-gram embeddings, scaled to keep unit variance."""
    x = self.byte_embed(bytes_BxT)
    c = self.config
    if self.hash_table is not None:
      buckets_BxTxN = hashing.ngram_buckets(bytes_BxT, segment_ids_BxT, c.hash_ngrams, c.hash_buckets)
      rows = buckets_BxTxN + jnp.arange(len(c.hash_ngrams), dtype=jnp.int32) * c.hash_buckets
      x = x + jnp.sum(jnp.take(self.hash_table[...], rows, axis=0), axis=2)
    return (x * (1.0 + len(c.hash_ngrams)) ** -0.5).astype(self.compute_dtype)

  def encode_patches(self, encoder_states_BxTxD, patch_ids_BxT, valid_BxM):
    """Global-model inputs ``BxMxD`` of the patches ``0..M-1`` (bytes with other ids are ignored)."""
    k = valid_BxM.shape[1]
    dtype = encoder_states_BxTxD.dtype
    pooled_BxMxE = segment_pool(encoder_states_BxTxD, patch_ids_BxT, k, op="max")
    queries_BxMxQxE = jnp.einsum("bke,eqd->bkqd", pooled_BxMxE, self.query_init[...].astype(dtype))
    # Cross-attention of each patch's queries to its own bytes (the XLA path is O(T), not (M * Q) x T).
    cross = self.encoder_cross
    keys, values = cross.keys_values(encoder_states_BxTxD)
    q_BxNxHxK = einops.rearrange(cross.queries(queries_BxMxQxE), "b m q h k -> b (m q) h k")
    mask = AttentionMask.segment_local(patch_ids_BxT, valid_BxM, self.config.queries_per_patch)
    out_BxMxQxHxK = einops.rearrange(cross.attend(q_BxNxHxK, keys, values, mask), "b (m q) h k -> b m q h k",
                                     q=self.config.queries_per_patch)
    states = queries_BxMxQxE + cross.output(out_BxMxQxHxK).astype(dtype)
    return jnp.einsum("bkqe,qeg->bkg", states, self.global_in[...].astype(dtype))

  def slot_keys_values(self, global_out_BxMxD):
    """Decoder cross-attention keys/values ``BxKxQxHxK`` made from each patch's global output."""
    dtype = global_out_BxMxD.dtype
    slots = jnp.einsum("bkg,gqd->bkqd", global_out_BxMxD, self.global_out[...].astype(dtype))
    return self.decoder_cross.keys_values(slots)

  def bos_keys_values(self):
    return self.decoder_cross.keys_values(self.bos_slots[...].astype(jnp.dtype(self.config.decoder.dtype)))

  def decoder_inputs(self, encoder_states_BxTxE, slot_keys_BxTxQxHxK, slot_values_BxTxQxHxK):
    """Each byte's decoder input: its encoder state, plus cross-attention to the k slots it reads."""
    b = encoder_states_BxTxE.shape[0]
    w = self.byte_to_decoder[...].astype(encoder_states_BxTxE.dtype)
    x = jnp.einsum("bte,ed->btd", encoder_states_BxTxE, w)
    x = x.astype(jnp.dtype(self.config.decoder.dtype))
    q_BxTxHxK = self.decoder_cross.queries(x)
    # One query per byte against its own Q slots: fold bytes into the batch.
    out_NxHxK = self.decoder_cross.attend(
        einops.rearrange(q_BxTxHxK, "b t h k -> (b t) 1 h k"),
        einops.rearrange(slot_keys_BxTxQxHxK, "b t q h k -> (b t) q h k"),
        einops.rearrange(slot_values_BxTxQxHxK, "b t q h k -> (b t) q h k"),
    )
    out_BxTxHxK = einops.rearrange(out_NxHxK, "(b t) 1 h k -> b t h k", b=b)
    return x + self.decoder_cross.output(out_BxTxHxK).astype(x.dtype)

  def unembed(self, hidden_BxTxD):
    """Final norm and output projection; logits in float32."""
    return unembed(self.final_norm, hidden_BxTxD, kernel_DxV=self.unembedding)

  # --- Forward ---

  def __call__(self, bytes_BxT, segment_ids_BxT=None, *, patches: Patches | None = None) -> ModelOutput:
    return self.forward(bytes_BxT, segment_ids_BxT, patches=patches)[0]

  def forward(self, bytes_BxT, segment_ids_BxT=None, *, patches: Patches | None = None):
    """``(ModelOutput, Patches)``: the logits and the patches they were computed with."""
    check_inputs(bytes_BxT, segment_ids_BxT)
    if segment_ids_BxT is None:
      segment_ids_BxT = jnp.ones(bytes_BxT.shape, jnp.int32)
    if patches is None:
      patches = self.patch(bytes_BxT, segment_ids_BxT)
    x = self.embed_bytes(bytes_BxT, segment_ids_BxT)
    encoder_states = self.encoder(x, None, segment_ids_BxT)  # packed rows: positions from the segment ids

    # Global model over patches; a patch belongs to the document of its first byte.
    patch_in = self.encode_patches(encoder_states, patches.patch_ids_BxT, patches.valid_BxM)
    first_byte = jnp.minimum(patching.patch_start_index(patches), bytes_BxT.shape[1] - 1)
    patch_docs_BxM = jnp.where(patches.valid_BxM, jnp.take_along_axis(segment_ids_BxT, first_byte, axis=1), 0)
    patch_in = patch_in.astype(jnp.dtype(self.config.global_stack.dtype))
    global_out = self.global_stack(patch_in, None, patch_docs_BxM)

    # Slot p holds patch p-1's global output, or the BOS slots when p opens its document.
    keys, values = self.slot_keys_values(global_out)
    bos_k, bos_v = self.bos_keys_values()
    opens_doc = jnp.concatenate([jnp.ones_like(patch_docs_BxM[:, :1], bool),
                                 patch_docs_BxM[:, 1:] != patch_docs_BxM[:, :-1]], axis=1)[..., None, None, None]
    lag = lambda kv: jnp.concatenate([jnp.zeros_like(kv[:, :1]), kv[:, :-1]], axis=1)  # noqa: E731
    keys = jnp.where(opens_doc, bos_k.astype(keys.dtype), lag(keys))
    values = jnp.where(opens_doc, bos_v.astype(values.dtype), lag(values))
    slot_BxT = jnp.maximum(patches.patch_ids_BxT, 0)
    x = self.decoder_inputs(encoder_states, take_rows(keys, slot_BxT), take_rows(values, slot_BxT))
    hidden = self.decoder(x, None, segment_ids_BxT)
    return ModelOutput(self.unembed(hidden), hidden), patches

  def loss(self, batch):
    """The training loss ``bytescale.train.step.next_byte_loss`` picks up: next-byte cross-entropy, plus the
    average patch size and the overflow counters (bytes merged because a row had too many patches) as metrics."""
    return blt_loss(self, batch)

  # --- Generation ---

  def init_cache(self, batch: int, max_len: int) -> BLTCache:
    c = self.config
    h, d = c.decoder.num_heads, c.decoder.head_dim
    slots = (batch, max_len + 1, c.queries_per_patch, h, d)
    dtype = jnp.dtype(c.decoder.dtype)
    return BLTCache(
        lengths_B=jnp.zeros((batch,), jnp.int32),
        bytes_BxS=jnp.zeros((batch, max_len), jnp.int32),
        entropies_BxS=jnp.zeros((batch, max_len), jnp.float32),
        encoder_states_BxSxD=jnp.zeros((batch, max_len, c.encoder.d_model), self.compute_dtype),
        slot_keys_BxMxQxHxK=jnp.zeros(slots, dtype),
        slot_values_BxMxQxHxK=jnp.zeros(slots, dtype),
        encoder_cache=self.encoder.init_cache(batch, max_len),
        global_cache=self.global_stack.init_cache(batch, max_len),
        decoder_cache=self.decoder.init_cache(batch, max_len),
        entropy_cache=self.entropy_lm.init_cache(batch, max_len) if self.entropy_lm is not None else None,
    )

  def decode(self, cache: BLTCache, bytes_BxN):
    """Appends ``N >= 1`` bytes per row (one document per row, starting at position 0)."""
    c = self.config
    b, n = bytes_BxN.shape
    s = cache.max_len
    start_B = cache.lengths_B
    total_B = start_B + n
    bytes_buf = write_rows(cache.bytes_BxS, bytes_BxN.astype(jnp.int32), start_B)
    entropies_buf, entropy_cache = cache.entropies_BxS, cache.entropy_cache
    if self.entropy_lm is not None:
      out, entropy_cache = self.entropy_lm.decode(entropy_cache.replace(lengths_B=start_B), bytes_BxN)
      new_h = jax.lax.stop_gradient(entropy.entropy_from_logits(out.logits_BxTxV))
      entropies_buf = write_rows(entropies_buf, new_h, start_B)

    # Patches of the whole buffer: causal, so the patches of earlier bytes are the ones they had.
    slot_index = jnp.arange(s, dtype=jnp.int32)
    buffer_segments = (slot_index[None] < total_B[:, None]).astype(jnp.int32)
    patches = patching.patch(c.patching, bytes_buf, buffer_segments,
                             entropies_BxT=entropies_buf if self.entropy_lm is not None else None, max_patches=s)
    patch_ids = patches.patch_ids_BxT

    # Local encoder on the new bytes (n-gram hashes need up to max(n) - 1 earlier bytes).
    context = max(c.hash_ngrams, default=1) - 1
    window = start_B[:, None] - context + jnp.arange(context + n, dtype=jnp.int32)
    window_ids = take_rows(bytes_buf, jnp.maximum(window, 0))
    x = self.embed_bytes(window_ids, (window >= 0).astype(jnp.int32))[:, context:]
    new_states, encoder_cache = self.encoder.decode(x, cache.encoder_cache.replace(lengths_B=start_B))
    states_buf = write_rows(cache.encoder_states_BxSxD, new_states.astype(cache.encoder_states_BxSxD.dtype), start_B)

    # Patches closed by this call: patch p is closed once a later byte opened patch p+1.
    closed_before = jnp.where(start_B > 0, take_rows(patch_ids, jnp.maximum(start_B - 1, 0)[:, None])[:, 0], 0)
    closed_after = take_rows(patch_ids, (total_B - 1)[:, None])[:, 0]
    closing_B = closed_after - closed_before

    def run_global(operands):
      global_cache, slot_keys, slot_values = operands
      j = jnp.arange(n, dtype=jnp.int32)
      relative = patch_ids - closed_before[:, None]
      member = (patch_ids >= 0) & (relative >= 0) & (relative < closing_B[:, None])
      patch_in = self.encode_patches(states_buf, jnp.where(member, relative, -1), j[None] < closing_B[:, None])
      patch_in = patch_in.astype(jnp.dtype(c.global_stack.dtype))
      # Rows append their closed patches at their own patch count; slots past it are rewritten later.
      global_out, global_cache = self.global_stack.decode(patch_in, global_cache.replace(lengths_B=closed_before))
      keys, values = self.slot_keys_values(global_out)
      slot_keys = write_rows(slot_keys, keys.astype(slot_keys.dtype), closed_before + 1)
      slot_values = write_rows(slot_values, values.astype(slot_values.dtype), closed_before + 1)
      return global_cache, slot_keys, slot_values

    operands = (cache.global_cache, cache.slot_keys_BxMxQxHxK, cache.slot_values_BxMxQxHxK)
    global_cache, slot_keys, slot_values = jax.lax.cond(jnp.any(closing_B > 0), run_global, lambda ops: ops, operands)

    # Local decoder on the new bytes, each reading the slot of its patch.
    new_slots = take_rows(patch_ids, start_B[:, None] + jnp.arange(n, dtype=jnp.int32))
    bos_k, bos_v = self.bos_keys_values()
    first = (new_slots == 0)[..., None, None, None]
    keys = jnp.where(first, bos_k.astype(slot_keys.dtype), take_rows(slot_keys, new_slots))
    values = jnp.where(first, bos_v.astype(slot_values.dtype), take_rows(slot_values, new_slots))
    x = self.decoder_inputs(new_states, keys, values)
    hidden, decoder_cache = self.decoder.decode(x, cache.decoder_cache.replace(lengths_B=start_B))
    new_cache = BLTCache(
        lengths_B=total_B, bytes_BxS=bytes_buf, entropies_BxS=entropies_buf, encoder_states_BxSxD=states_buf,
        slot_keys_BxMxQxHxK=slot_keys, slot_values_BxMxQxHxK=slot_values, encoder_cache=encoder_cache,
        global_cache=global_cache, decoder_cache=decoder_cache, entropy_cache=entropy_cache,
    )
    return ModelOutput(self.unembed(hidden), hidden), new_cache

  @staticmethod
  def rollback(cache: BLTCache, n_B):
    """Forgets the last ``n_B`` bytes of each row: a length update (patch state is re-derived from the buffers)."""
    return cache.rollback(n_B)

  def flops_per_byte(self, seq_len: int, average_patch_size: float | None = None, **kwargs):
    return flops_per_byte(self.config, seq_len, average_patch_size, **kwargs)


# --- Metrics and FLOPs ------------------------------------------------------------------------------------

def patch_metrics(patches: Patches, segment_ids_BxT) -> dict:
  """Average patch size and overflow counters of a batch (for logs)."""
  real = jnp.sum(segment_ids_BxT != 0)
  num = jnp.sum(patches.valid_BxM)
  return {
      "average_patch_size": real / jnp.maximum(num, 1),
      "overflow_bytes": jnp.sum(patches.overflow_bytes_B),
      "overflow_rows": jnp.sum(patches.overflow_bytes_B > 0),
  }


def blt_loss(model, batch):
  """``next_byte_loss`` plus patch metrics (average patch size, overflow bytes) for ``train(..., loss_fn=)``."""
  output, patches = model.forward(batch["inputs"], batch["segment_ids"])
  nll_sum, count = masked_cross_entropy(output.logits_BxTxV, batch["targets"], batch["loss_mask"])
  loss = nll_sum / jnp.maximum(count, 1.0)
  return loss, {"nll_sum": nll_sum, "count": count, **patch_metrics(patches, batch["segment_ids"])}


def flops_per_byte(config: BLTConfig, seq_len: int, average_patch_size: float | None = None, *,
                   convention: str = "exact", attention: str = "causal", include_entropy_model: bool = False):
  """Analytic forward FLOPs per byte by component (a ``bytescale.flops.FlopCount``, with training factors).

  Conventions as in ``bytescale.flops`` (BLT paper eq. 13-17 in spirit: embeddings and the entropy model are
  free). The global model runs once per patch: ``1 / average_patch_size`` times per byte over a context of
  ``seq_len / average_patch_size`` patches; encoder queries attend to the bytes of their own patch (in both
  conventions: ``ops.attention.segment_local_attention`` computes only those pairs). With ``attention="dense"``
  (what the plain XLA path computes) every one of the ``max_patches`` slots is counted. ``average_patch_size``
  defaults to the stride for strided patching and to 4.5 (the paper's) otherwise; pass the measured one.

  ``include_entropy_model`` adds the entropy model's forward passes (entropy patching only) as separate
  ``entropy_model.*`` components, frozen (training factor 1); the default total excludes them, as the paper does.
  """
  c = config
  if average_patch_size is None:
    average_patch_size = float(c.patching.stride) if c.patching.patcher == "strided" else 4.5
  p = float(average_patch_size)
  q = c.queries_per_patch
  e, g, d = c.encoder, c.global_stack, c.decoder
  dense = convention == "exact" and attention == "dense"
  slots = c.patching.max_patches(seq_len) if dense else max(1, round(seq_len / p))
  slots_per_byte = slots / seq_len if dense else 1.0 / p
  kw = dict(convention=convention, attention=attention)
  enc_width, dec_width = e.num_heads * e.head_dim, d.num_heads * d.head_dim
  per_slot_encoder = 2 * q * (e.d_model * e.d_model + 2 * e.d_model * enc_width + e.d_model * g.d_model)
  # Each byte is a key of the q queries of its own patch: scores and weighted values, per byte.
  encoder_cross_pairs = 2 * 2 * q * enc_width
  per_slot_decoder = 2 * q * (g.d_model * d.d_model + 2 * d.d_model * dec_width)
  count = flops.stack_flops(e, seq_len, prefix="encoder.", **kw)
  count += flops.stack_flops(g, slots, prefix="global.", **kw).scaled(slots_per_byte)
  count += flops.stack_flops(d, seq_len, prefix="decoder.", **kw)
  return count + flops.FlopCount({
      "encoder.cross_attention": (2 * 2 * e.d_model * enc_width + encoder_cross_pairs
                                  + per_slot_encoder * slots_per_byte),
      "decoder.cross_attention": (2 * (e.d_model * d.d_model + 2 * d.d_model * dec_width + 2 * q * dec_width)
                                  + per_slot_decoder * slots_per_byte),
      "unembed": 2.0 * d.d_model * vocab.VOCAB_SIZE,
  }) + (_entropy_model_flops(c, seq_len, **kw) if include_entropy_model else flops.FlopCount({}))


def entropy_model_flops(entropy_config: ByteLMConfig, seq_len: int, *, context: int | None = None,
                        overlap: int | None = None, convention="exact", attention="causal",
                        prefix="entropy_model.") -> flops.FlopCount:
  """FLOPs per byte of a frozen entropy model (BLT's patcher) scoring ``seq_len`` bytes, forward only.

  A row longer than ``context`` (default: the model's ``max_seq_len``) is scored in overlapping windows of
  ``context`` bytes (``bytescale.entropy.window_layout``): each window is a full forward pass.
  """
  context = context or entropy_config.max_seq_len
  starts, _ = entropy.window_layout(seq_len, context, overlap)
  window = seq_len if len(starts) == 1 else context
  count = bytelm.flops_per_byte(entropy_config, window, convention=convention, attention=attention)
  return count.scaled(len(starts) * window / seq_len, prefix).as_frozen()


def _entropy_model_flops(config: BLTConfig, seq_len: int, **kw):
  if not config.patching.needs_entropies:
    return flops.FlopCount({})
  if config.entropy_model_config is None:
    raise ConfigError("BLTConfig.entropy_model_config: unknown, so the entropy model's FLOPs cannot be counted; "
                      "set entropy_model=DIR (or entropy_model_config) or count without include_entropy_model")
  pc = config.patching
  return entropy_model_flops(config.entropy_model_config, seq_len, context=pc.entropy_context,
                                   overlap=pc.entropy_overlap, **kw)


# --- Presets ----------------------------------------------------------------------------------------------

def _stack(d, layers, heads, window=None, rope_theta=10000.0, kv_heads=None, head_dim=None):
  return TransformerConfig(
      d_model=d, num_layers=layers, num_heads=heads, num_kv_heads=kv_heads or heads, head_dim=head_dim or d // heads,
      mlp_hidden=swiglu_hidden(d), window=window, rope=rope.RopeConfig(rope_theta=rope_theta),
  )


def _blt(d_e, l_e, d_g, l_g, d_d, l_d, *, heads_e, heads_g, heads_d, window, buckets, seq,
         ngrams=hashing.DEFAULT_NGRAMS, ratio=1.0, theta=10000.0, head_dim_g=None):
  return BLTConfig(
      encoder=_stack(d_e, l_e, heads_e, window=window, rope_theta=theta),
      global_stack=_stack(d_g, l_g, heads_g, rope_theta=theta, head_dim=head_dim_g),
      decoder=_stack(d_d, l_d, heads_d, window=window, rope_theta=theta),
      patching=PatchingConfig("entropy", max_patches_ratio=ratio),
      hash_ngrams=ngrams, hash_buckets=buckets, queries_per_patch=2, max_seq_len=seq,
  )


PRESETS = {
    # CPU seconds: a smoke-test size.
    "tiny": _blt(32, 1, 64, 2, 32, 2, heads_e=4, heads_g=4, heads_d=4, window=64, buckets=512, seq=256,
                 ngrams=(3, 4, 5), ratio=0.5),
    # CPU minutes.
    "small": _blt(128, 1, 256, 4, 128, 2, heads_e=4, heads_g=8, heads_d=4, window=128, buckets=8192, seq=512,
                  ratio=0.5),
    # The paper's shapes (l_E, h_E, l_G, h_G, l_D): 400M (1, 768, 24, 1280, 7); 1B (1, 1024, 25, 2048, 9).
    "400m": _blt(768, 1, 1280, 24, 768, 7, heads_e=12, heads_g=20, heads_d=12, window=512, buckets=500_002,
                 seq=8192, ratio=0.5, theta=500000.0),
    "1b": _blt(1024, 1, 2048, 25, 1024, 9, heads_e=16, heads_g=16, heads_d=16, window=512, buckets=500_002,
               seq=8192, ratio=0.5, theta=500000.0),
}
