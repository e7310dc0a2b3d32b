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
only on the patches that closed in this call, under ``lax.switch`` so that a call where no row closed a patch
skips it (and one whose closing patches all started among the last ``DECODE_PATCH_WINDOW`` bytes encodes them
from those bytes only, not the whole buffer). Everything a byte contributed is indexed by position, so
``rollback`` is a pure length update.
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
from bytescale.nn.transformer import layer_state, scan_blocks
from bytescale.nn.layers import dense, param, scaled_normal, unembed
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

HASH_FUNCTIONS = ("bytescale", "reference")
HASH_EMBEDDING_SUMS = ("scaled", "plain")
CROSS_RESIDUALS = ("single", "double")
DECODER_CONTEXTS = ("previous_patch", "completed_patch")


@dataclasses.dataclass(frozen=True)
class BLTConfig:
  """Widths: ``encoder.d_model`` (h_E), ``global_stack.d_model`` (h_G), ``decoder.d_model`` (h_D).

  The fields after ``entropy_model_config`` choose between bytescale's own BLT (the defaults) and the architecture
  of the BLT reference code / Hugging Face's ``BltForCausalLM`` (``reference_options()``); docs/blt.md lists
  every difference with the reason for our default.
  """

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
  # "bytescale": FNV-like 32-bit hash + fmix32 of our ids (``ops.hashing.ngram_buckets``); "reference": the
  # reference's polynomial rolling hash of the reference ids, ``hash_functions`` primes (``reference_ngram_buckets``).
  hash_function: str = "bytescale"
  hash_functions: int = 1
  # Byte + hash embeddings: "scaled" by (1 + #tables) ** -0.5 (unit variance) or "plain" sum (the reference).
  hash_embedding_sum: str = "scaled"
  # Cross-attention in every encoder / decoder layer (the reference's cross_attn_all_layers), else once: after
  # the encoder's last layer, before the decoder's first.
  encoder_cross_every_layer: bool = False
  decoder_cross_every_layer: bool = False
  # "double": the reference's cross-attention returns ``x + attention`` and its caller adds ``x`` again.
  cross_residual: str = "single"
  # Which patch a byte's decoder reads: "previous_patch", the global output of the patch before its own (the
  # first patch of a document reads learned BOS slots); "completed_patch", the last patch complete once the byte
  # is seen (its own when it closes it), the reference's rule, which needs ``patching.bos_patch``.
  decoder_context: str = "previous_patch"
  # Learned projections where the reference uses the identity: encoder queries -> global width (the reference
  # projects only when k * h_E != h_G) and encoder states -> decoder width (the reference needs h_E == h_D).
  project_global_input: bool = True
  project_decoder_input: bool = True

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
    check(self.hash_function in HASH_FUNCTIONS, name, "hash_function",
          f"must be one of {HASH_FUNCTIONS}, got {self.hash_function!r}")
    check(isinstance(self.hash_functions, int) and self.hash_functions >= 1, name, "hash_functions",
          f"must be an integer >= 1, got {self.hash_functions!r}")
    check(self.hash_functions == 1 or self.hash_function == "reference", name, "hash_functions",
          f"several hash functions ({self.hash_functions}) need hash_function='reference'")
    check(self.hash_embedding_sum in HASH_EMBEDDING_SUMS, name, "hash_embedding_sum",
          f"must be one of {HASH_EMBEDDING_SUMS}, got {self.hash_embedding_sum!r}")
    for flag in ("encoder_cross_every_layer", "decoder_cross_every_layer", "project_global_input",
                 "project_decoder_input"):
      check(isinstance(getattr(self, flag), bool), name, flag, f"must be true or false, got {getattr(self, flag)!r}")
    check(self.cross_residual in CROSS_RESIDUALS, name, "cross_residual",
          f"must be one of {CROSS_RESIDUALS}, got {self.cross_residual!r}")
    check(self.decoder_context in DECODER_CONTEXTS, name, "decoder_context",
          f"must be one of {DECODER_CONTEXTS}, got {self.decoder_context!r}")
    check(self.decoder_context != "completed_patch" or self.patching.bos_patch, name, "decoder_context",
          "'completed_patch' needs patching.bos_patch=True (else a document's first byte would read the previous "
          "document's patch); set patching.bos_patch or use 'previous_patch'")
    q, d_e = self.queries_per_patch, self.encoder.d_model
    check(self.project_global_input or q * d_e == self.global_stack.d_model, name, "project_global_input",
          f"false needs queries_per_patch * encoder.d_model ({q} * {d_e}) == global_stack.d_model "
          f"({self.global_stack.d_model}); set it true")
    check(self.project_decoder_input or d_e == self.decoder.d_model, name, "project_decoder_input",
          f"false needs encoder.d_model ({d_e}) == decoder.d_model ({self.decoder.d_model}); set it true")
    check(not (self.decoder_cross_every_layer and self.decoder.rope.length_dependent), name,
          "decoder_cross_every_layer", "is not supported with a length-dependent decoder rope "
          f"({self.decoder.rope.rope_type}); use cross-attention before the first layer only")

  @property
  def num_hash_tables(self) -> int:
    return self.hash_functions * len(self.hash_ngrams)


def reference_options(config: BLTConfig) -> BLTConfig:
  """``config`` with every option set the way the BLT reference / ``BltForCausalLM`` computes (docs/blt.md)."""
  q, d_e = config.queries_per_patch, config.encoder.d_model
  return dataclasses.replace(
      config, patching=dataclasses.replace(config.patching, bos_patch=True), hash_function="reference",
      hash_embedding_sum="plain", decoder_cross_every_layer=True, cross_residual="double",
      decoder_context="completed_patch", project_global_input=q * d_e != config.global_stack.d_model,
      project_decoder_input=False)


# --- Layers -----------------------------------------------------------------------------------------------

class CrossAttention(nnx.Module):
  """Pre-norm multi-head cross-attention with grouped key/value heads; no RoPE (patch queries have no byte
  position). ``residual`` adds the query input once ("single") or twice ("double", the reference's)."""

  def __init__(self, d_model: int, num_heads: int, num_kv_heads: int, head_dim: int, *, norm_eps: float, dtype,
               impl: str, residual: str = "single", rngs: nnx.Rngs):
    self.dtype = jnp.dtype(dtype)
    self.impl = impl
    self.residual = residual
    self.q_norm = RMSNorm(d_model, eps=norm_eps, rngs=rngs)
    self.kv_norm = RMSNorm(d_model, eps=norm_eps, rngs=rngs)
    self.wq = param(rngs, scaled_normal(d_model), (d_model, num_heads, head_dim), ("embed", "heads", "head_dim"))
    kv_shape, kv_names = (d_model, num_kv_heads, head_dim), ("embed", "kv_heads", "head_dim")
    self.wk = param(rngs, scaled_normal(d_model), kv_shape, kv_names)
    self.wv = param(rngs, scaled_normal(d_model), kv_shape, kv_names)
    self.wo = param(rngs, scaled_normal(num_heads * head_dim), (num_heads, head_dim, d_model),
                    ("heads", "head_dim", "embed"))

  def queries(self, x_BxTxD):
    x = self.q_norm(x_BxTxD).astype(self.dtype)
    return dense(x, self.wq[...].astype(self.dtype))

  def keys_values(self, x_BxSxD):
    x = self.kv_norm(x_BxSxD).astype(self.dtype)
    k = dense(x, self.wk[...].astype(self.dtype))
    v = dense(x, self.wv[...].astype(self.dtype))
    return k, v

  def output(self, out_BxTxHxK):
    return dense(out_BxTxHxK, self.wo[...].astype(self.dtype), contract=2)

  def add_residual(self, x, out_BxTxHxK):
    """``x`` (once or twice) plus the output projection of the attention result."""
    x = x + x if self.residual == "double" else x
    return x + self.output(out_BxTxHxK).astype(x.dtype)

  def attend(self, q_BxTxHxK, k_BxSxGxK, v_BxSxGxK, mask: AttentionMask | None = None):
    """Attention through the one dispatch (``impl``); no mask: every query sees every key."""
    if mask is None:
      zeros = lambda n: jnp.zeros((q_BxTxHxK.shape[0], n), jnp.int32)  # noqa: E731
      mask = AttentionMask(zeros(q_BxTxHxK.shape[1]), zeros(k_BxSxGxK.shape[1]), causal=False)
    return attention_ops.attention(q_BxTxHxK, k_BxSxGxK, v_BxSxGxK, mask, impl=self.impl)

  def attend_own_slots(self, x_BxTxD, slots_BxSxQxD, slot_index_BxT):
    """Each byte ``t`` cross-attends to the ``Q`` slot vectors ``slots[slot_index[t]]`` (the decoder's read of
    a patch); keys and values are computed once per slot, then gathered per byte."""
    b = x_BxTxD.shape[0]
    keys, values = self.keys_values(slots_BxSxQxD)
    q_BxTxHxK = self.queries(x_BxTxD)
    # One query per byte against its own Q slots: fold bytes into the batch.
    out_NxHxK = self.attend(
        einops.rearrange(q_BxTxHxK, "b t h k -> (b t) 1 h k"),
        einops.rearrange(take_rows(keys, slot_index_BxT), "b t q g k -> (b t) q g k"),
        einops.rearrange(take_rows(values, slot_index_BxT), "b t q g k -> (b t) q g k"),
    )
    return self.add_residual(x_BxTxD, einops.rearrange(out_NxHxK, "(b t) 1 h k -> b t h k", b=b))


def cross_attention(stack: TransformerConfig, residual: str, rngs: nnx.Rngs) -> CrossAttention:
  return CrossAttention(stack.d_model, stack.num_heads, stack.num_kv_heads, stack.head_dim, norm_eps=stack.norm_eps,
                        dtype=stack.dtype, impl=stack.attention_impl, residual=residual, rngs=rngs)


def stacked_cross_attention(stack: TransformerConfig, residual: str, rngs: nnx.Rngs) -> CrossAttention:
  """One ``CrossAttention`` per layer of ``stack``, parameters stacked on a leading ``layers`` axis."""

  @nnx.split_rngs(splits=stack.num_layers)
  @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
  def make(rngs):
    return cross_attention(stack, residual, rngs)

  return make(rngs)


def layer_of(stacked: nnx.Module, index: int) -> nnx.Module:
  """Layer ``index`` of a module stacked by ``nnx.vmap`` (a view for computing; updates do not flow back)."""
  graphdef, state = nnx.split(stacked)
  return nnx.merge(graphdef, jax.tree.map(lambda a: a[index], state))


# --- Cache ------------------------------------------------------------------------------------------------

# Bytes of the buffer a decode step's patch encoder reads when every closing patch starts among them (see decode).
DECODE_PATCH_WINDOW = 64


@struct.dataclass
class BLTCache:
  """Decoding state for ``S = max_len`` bytes; every buffer is indexed by byte (or patch) position."""

  lengths_B: jax.Array  # bytes seen per row; the only field ``rollback`` changes
  bytes_BxS: jax.Array
  entropies_BxS: jax.Array  # float32, H[t] of the entropy model (zeros without entropy patching)
  encoder_states_BxSxD: jax.Array  # local encoder output per byte (pooled when its patch closes)
  slots_BxMxQxD: jax.Array  # decoder slot vectors: slot p holds the global output of patch p-1 (0: BOS slots)
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
      # One table for all (function, n) (rows table_index * buckets + bucket): a single gather, sharded along the
      # buckets.
      self.hash_table = param(rngs, jax.nn.initializers.normal(1.0), (c.num_hash_tables * c.hash_buckets, d_e),
                              ("hash_buckets", "embed"))
    else:
      self.hash_table = None
    self.encoder = TransformerStack(c.encoder, rngs=rngs)
    # "embed" never names two axes of one parameter (a mesh axis can shard only one): wide sides are "mlp".
    self.query_init = param(rngs, scaled_normal(d_e), (d_e, q, d_e), ("embed", "cross_queries", "mlp"))
    if c.encoder_cross_every_layer:
      self.encoder_cross = stacked_cross_attention(c.encoder, c.cross_residual, rngs)
    else:
      self.encoder_cross = cross_attention(c.encoder, c.cross_residual, rngs)
    if c.project_global_input:
      self.global_in = param(rngs, scaled_normal(q * d_e), (q, d_e, d_g), ("cross_queries", "mlp", "embed"))
    else:
      self.global_in = None
    self.global_stack = TransformerStack(c.global_stack, rngs=rngs)
    self.global_out = param(rngs, scaled_normal(d_g), (d_g, q, d_d), ("embed", "cross_queries", "mlp"))
    if c.decoder_context == "previous_patch":
      self.bos_slots = param(rngs, jax.nn.initializers.normal(1.0), (q, d_d), ("cross_queries", "embed"))
    else:
      self.bos_slots = None
    if c.project_decoder_input:
      self.byte_to_decoder = param(rngs, scaled_normal(d_e), (d_e, d_d), ("mlp", "embed"))
    else:
      self.byte_to_decoder = None
    if c.decoder_cross_every_layer:
      self.decoder_cross = stacked_cross_attention(c.decoder, c.cross_residual, rngs)
    else:
      self.decoder_cross = cross_attention(c.decoder, c.cross_residual, rngs)
    self.decoder = TransformerStack(c.decoder, rngs=rngs)
    self.final_norm = RMSNorm(d_d, eps=c.decoder.norm_eps, rngs=rngs)
    self.unembedding = param(rngs, scaled_normal(d_d), (d_d, vocab.VOCAB_SIZE), ("embed", "vocab"))
    self.entropy_lm = self._entropy_model(entropy_lm, rngs) if c.patching.needs_entropies else None

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
    """Byte embedding plus the hash n-gram embeddings (``config.hash_embedding_sum``: scaled or plain)."""
    x = self.byte_embed(bytes_BxT)
    c = self.config
    if self.hash_table is not None:
      if c.hash_function == "reference":
        reference_ids = jnp.take(jnp.asarray(vocab.reference_id_table(), jnp.int32), bytes_BxT, axis=0)
        buckets_BxTxN = hashing.reference_ngram_buckets(reference_ids, segment_ids_BxT, c.hash_ngrams, c.hash_buckets,
                                                        c.hash_functions)
      else:
        buckets_BxTxN = hashing.ngram_buckets(bytes_BxT, segment_ids_BxT, c.hash_ngrams, c.hash_buckets)
      rows = buckets_BxTxN + jnp.arange(c.num_hash_tables, dtype=jnp.int32) * c.hash_buckets
      x = x + jnp.sum(jnp.take(self.hash_table[...], rows, axis=0), axis=2)
    if c.hash_embedding_sum == "scaled":
      x = x * (1.0 + c.num_hash_tables) ** -0.5
    return x.astype(self.compute_dtype)

  def _encoder_cross(self) -> CrossAttention:
    """The encoder cross-attention that shapes the output. With one per layer, the reference re-pools the patch
    queries from every layer's byte states and discards the previous layer's result, so only the last one counts."""
    if self.config.encoder_cross_every_layer:
      return layer_of(self.encoder_cross, -1)
    return self.encoder_cross

  def encode_patches(self, encoder_states_BxTxD, patch_ids_BxT, valid_BxM):
    """Global-model inputs ``BxMxD`` of the patches ``0..M-1`` (bytes with other ids are ignored)."""
    k = valid_BxM.shape[1]
    dtype = encoder_states_BxTxD.dtype
    pooled_BxMxE = segment_pool(encoder_states_BxTxD, patch_ids_BxT, k, op="max")
    queries_BxMxQxE = dense(pooled_BxMxE, self.query_init[...].astype(dtype))
    # Cross-attention of each patch's queries to its own bytes (the XLA path is O(T), not (M * Q) x T).
    cross = self._encoder_cross()
    keys, values = cross.keys_values(encoder_states_BxTxD)
    q_BxNxHxK = einops.rearrange(cross.queries(queries_BxMxQxE), "b m q h k -> b (m q) h k")
    mask = AttentionMask.segment_local(patch_ids_BxT, valid_BxM, self.config.queries_per_patch)
    out_BxMxQxHxK = einops.rearrange(cross.attend(q_BxNxHxK, keys, values, mask), "b (m q) h k -> b m q h k",
                                     q=self.config.queries_per_patch)
    states_BxMxQxE = cross.add_residual(queries_BxMxQxE, out_BxMxQxHxK)
    if self.global_in is None:  # the identity: Q * h_E == h_G
      return einops.rearrange(states_BxMxQxE, "b m q e -> b m (q e)")
    return dense(states_BxMxQxE, self.global_in[...].astype(dtype), contract=2)

  def slot_vectors(self, global_out_BxMxG):
    """The ``Q`` decoder-width slot vectors ``BxMxQxD`` made from each patch's global output."""
    dtype = global_out_BxMxG.dtype
    return dense(global_out_BxMxG, self.global_out[...].astype(dtype))

  def decoder_inputs(self, encoder_states_BxTxE):
    """The decoder's input per byte: its encoder state, projected to the decoder width (or as it is)."""
    x = encoder_states_BxTxE
    if self.byte_to_decoder is not None:
      x = dense(x, self.byte_to_decoder[...].astype(x.dtype))
    return x.astype(jnp.dtype(self.config.decoder.dtype))

  def decoder_layers(self, x_BxTxD, segment_ids_BxT, slots_BxSxQxD, slot_index_BxT, cache: KVCache | None = None):
    """The decoder's byte layers and its cross-attention to each byte's slots (before the first layer, or before
    every layer). With ``cache`` the bytes are appended to it (decoding) and ``(hidden, cache)`` is returned."""
    c = self.config
    cross_step = lambda cross, x: cross.attend_own_slots(x, slots_BxSxQxD, slot_index_BxT)  # noqa: E731
    if not c.decoder_cross_every_layer:
      x = cross_step(self.decoder_cross, x_BxTxD)
      if cache is None:
        return self.decoder(x, None, segment_ids_BxT)
      return self.decoder.decode(x, cache)
    block_graph, block_state = nnx.split(self.decoder.blocks)
    cross_graph, cross_state = nnx.split(self.decoder_cross)
    if cache is None:
      def layer(pair, x):
        block, cross = pair
        return block(cross_step(cross, x), None, segment_ids_BxT)

      return scan_blocks((self.decoder.blocks, self.decoder_cross), c.decoder, layer, x_BxTxD)

    x, keys, values = x_BxTxD, [], []
    for i in range(c.decoder.num_layers):  # a python loop: each layer's cache buffers updated in place (KVCache)
      x = cross_step(nnx.merge(cross_graph, layer_state(cross_state, i)), x)
      x, k_cache, v_cache = nnx.merge(block_graph, layer_state(block_state, i)).decode(
          x, cache.k_LxBxGxSxK[i], cache.v_LxBxGxKxS[i], cache.lengths_B)
      keys.append(k_cache)
      values.append(v_cache)
    return x, cache.replace(k_LxBxGxSxK=tuple(keys), v_LxBxGxKxS=tuple(values),
                            lengths_B=cache.lengths_B + x_BxTxD.shape[1])

  def _last_byte_closes(self, next_start_B, shape):
    """Whether the row's last byte reads its own patch (``completed_patch``): when the byte that would come next
    opens a patch, except with ``max_patch_length``, where transformers' splitting of long patches drops the empty
    patch that marks that boundary, so its last byte always reads the previous patch."""
    if self.config.patching.max_patch_length is not None:
      return jnp.zeros(shape, bool)
    return next_start_B if next_start_B is not None else jnp.ones(shape, bool)

  def bos_slot_vectors(self):
    return self.bos_slots[...].astype(jnp.dtype(self.config.decoder.dtype))

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

    # Slot s holds the global output of patch s-1; slot_index says which slot each byte's decoder reads.
    slots = self.slot_vectors(global_out).astype(jnp.dtype(self.config.decoder.dtype))
    slots = jnp.concatenate([jnp.zeros_like(slots[:, :1]), slots], axis=1)
    patch_ids = patches.patch_ids_BxT
    if self.config.decoder_context == "completed_patch":
      # A byte that closes its patch (the next byte opens one or is in another document; after the row's last
      # byte, the byte that would come next opens one: ``Patches.next_start_B``) reads its own patch's output,
      # every other byte the previous patch's.
      after_row = jnp.where(self._last_byte_closes(patches.next_start_B, patch_ids.shape[:1]), -1,
                            patch_ids[:, -1])[:, None]
      next_ids = jnp.concatenate([patch_ids[:, 1:], after_row], axis=1)
      slot_index = jnp.maximum(patch_ids, 0) + (next_ids != patch_ids).astype(jnp.int32)
    else:
      # Previous patch; a patch that opens its document reads the BOS slots instead.
      opens_doc = jnp.concatenate([jnp.ones_like(patch_docs_BxM[:, :1], bool),
                                   patch_docs_BxM[:, 1:] != patch_docs_BxM[:, :-1]], axis=1)
      opens_doc = jnp.concatenate([opens_doc, jnp.zeros_like(opens_doc[:, :1])], axis=1)[..., None, None]
      slots = jnp.where(opens_doc, self.bos_slot_vectors().astype(slots.dtype), slots)
      slot_index = jnp.maximum(patch_ids, 0)
    x = self.decoder_inputs(encoder_states)
    hidden = self.decoder_layers(x, segment_ids_BxT, slots, slot_index)
    return ModelOutput(self.unembed(hidden), hidden), patches

  def loss(self, batch):
    """The training loss ``bytescale.train.step.next_byte_loss`` picks up: next-byte cross-entropy, plus the
    average patch size and the overflow counters (bytes merged because a row had too many patches) as metrics."""
    return blt_loss(self, batch)

  # --- Generation ---

  def init_cache(self, batch: int, max_len: int) -> BLTCache:
    c = self.config
    return BLTCache(
        lengths_B=jnp.zeros((batch,), jnp.int32),
        bytes_BxS=jnp.zeros((batch, max_len), jnp.int32),
        entropies_BxS=jnp.zeros((batch, max_len), jnp.float32),
        encoder_states_BxSxD=jnp.zeros((batch, max_len, c.encoder.d_model), self.compute_dtype),
        slots_BxMxQxD=jnp.zeros((batch, max_len + 1, c.queries_per_patch, c.decoder.d_model),
                                jnp.dtype(c.decoder.dtype)),
        encoder_cache=self.encoder.init_cache(batch, max_len),
        global_cache=self.global_stack.init_cache(batch, max_len),
        # One spare slot: "completed_patch" decoding runs the previous call's last byte again with the new ones.
        decoder_cache=self.decoder.init_cache(batch, max_len + 1),
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

    # Patches of the whole buffer: causal, so the patches of earlier bytes are the ones they had. With
    # "completed_patch" the buffer gets one more slot: the next, unseen byte, whose start flag is already known.
    completed = c.decoder_context == "completed_patch"
    extra = 1 if completed else 0
    pad = lambda a: jnp.concatenate([a, jnp.zeros_like(a[:, :extra])], axis=1)  # noqa: E731
    slot_index = jnp.arange(s + extra, dtype=jnp.int32)
    buffer_segments = (slot_index[None] < total_B[:, None] + extra).astype(jnp.int32)
    patches = patching.patch(c.patching, pad(bytes_buf), buffer_segments,
                             entropies_BxT=pad(entropies_buf) if self.entropy_lm is not None else None,
                             max_patches=s + extra)
    patch_ids = patches.patch_ids_BxT

    # Local encoder on the new bytes (n-gram hashes need up to max(n) - 1 earlier bytes).
    context = max(c.hash_ngrams, default=1) - 1
    window = start_B[:, None] - context + jnp.arange(context + n, dtype=jnp.int32)
    window_ids = take_rows(bytes_buf, jnp.maximum(window, 0))
    x = self.embed_bytes(window_ids, (window >= 0).astype(jnp.int32))[:, context:]
    new_states, encoder_cache = self.encoder.decode(x, cache.encoder_cache.replace(lengths_B=start_B))
    states_buf = write_rows(cache.encoder_states_BxSxD, new_states.astype(cache.encoder_states_BxSxD.dtype), start_B)

    # Patches closed by this call. "previous_patch": patch p is closed once a later byte opened p+1;
    # "completed_patch": once the byte after its last one is known to open a new patch.
    patch_at = lambda positions_B: take_rows(patch_ids, positions_B[:, None])[:, 0]  # noqa: E731
    if completed:
      closed_before, closed_after = patch_at(start_B), patch_at(total_B)
    else:
      closed_before = jnp.where(start_B > 0, patch_at(jnp.maximum(start_B - 1, 0)), 0)
      closed_after = patch_at(total_B - 1)
    closing_B = closed_after - closed_before

    global_layers = self.global_stack.layer_states()  # sliced outside the cond (see TransformerStack.layer_states)

    # The closing patches' bytes are the last few of each row: encode_patches reads only a window of the last
    # ``span`` bytes when every closing patch starts inside it (else the whole buffer), not every buffered byte's
    # keys and values (two BxSxE projections per global step: most of a batch-8 decode step).
    span = min(s, max(DECODE_PATCH_WINDOW, c.patching.max_patch_length or 0))
    window_start_B = jnp.maximum(total_B - span, 0)
    buffer_ids = patch_ids[:, :s]
    first_closing_B = jnp.sum((buffer_ids >= 0) & (buffer_ids < closed_before[:, None]), axis=1)
    fits = jnp.all((closing_B == 0) | (first_closing_B >= window_start_B))

    def run_global(operands, windowed: bool):
      global_cache, slots = operands
      j = jnp.arange(n, dtype=jnp.int32)
      states, ids = states_buf, buffer_ids
      if windowed:
        index_BxW = window_start_B[:, None] + jnp.arange(span, dtype=jnp.int32)
        states, ids = take_rows(states_buf, index_BxW), take_rows(buffer_ids, index_BxW)
      relative = ids - closed_before[:, None]
      member = (ids >= 0) & (relative >= 0) & (relative < closing_B[:, None])
      patch_in = self.encode_patches(states, jnp.where(member, relative, -1), j[None] < closing_B[:, None])
      patch_in = patch_in.astype(jnp.dtype(c.global_stack.dtype))
      # Rows append their closed patches at their own patch count; slots past it are rewritten later.
      global_out, global_cache = self.global_stack.decode(patch_in, global_cache.replace(lengths_B=closed_before),
                                                          layers=global_layers)
      slots = write_rows(slots, self.slot_vectors(global_out).astype(slots.dtype), closed_before + 1)
      return global_cache, slots

    operands = (cache.global_cache, cache.slots_BxMxQxD)
    branch = jnp.where(jnp.any(closing_B > 0), jnp.where(fits, 1, 2), 0)
    global_cache, slots = jax.lax.switch(
        branch, [lambda ops: ops, lambda ops: run_global(ops, True), lambda ops: run_global(ops, False)], operands)

    # Local decoder on the new bytes, each reading its slot (slot p: the global output of patch p-1). With
    # "completed_patch" the last byte reads as the forward pass's last byte would (``_last_byte_closes``), which a
    # later byte can overturn; so the decoder runs the previous call's last byte again (its cached keys and values
    # are replaced, its logits dropped), and every call's logits equal the forward pass over the bytes so far.
    redo_B = (start_B > 0).astype(jnp.int32) if completed else jnp.zeros_like(start_B)
    first_B = start_B - redo_B
    positions = first_B[:, None] + jnp.arange(n + extra, dtype=jnp.int32)
    read_ids = take_rows(patch_ids, positions)
    if completed:  # a byte that closes its patch reads the patch's own output
      is_last = positions == (total_B - 1)[:, None]
      following = take_rows(patch_ids, jnp.minimum(positions + 1, s))
      closes = jnp.where(is_last, self._last_byte_closes(following != read_ids, is_last.shape), following != read_ids)
      slot_vectors = take_rows(slots, jnp.maximum(read_ids, 0) + closes.astype(jnp.int32))
      decoder_states = take_rows(states_buf, jnp.minimum(positions, s - 1))
    else:
      slot_vectors = jnp.where((read_ids == 0)[..., None, None], self.bos_slot_vectors().astype(slots.dtype),
                               take_rows(slots, read_ids))
      decoder_states = new_states
    x = self.decoder_inputs(decoder_states)
    own_slot = jnp.broadcast_to(jnp.arange(x.shape[1], dtype=jnp.int32), x.shape[:2])
    hidden, decoder_cache = self.decoder_layers(x, None, slot_vectors, own_slot,
                                                cache=cache.decoder_cache.replace(lengths_B=first_B))
    if completed:
      hidden = take_rows(hidden, redo_B[:, None] + jnp.arange(n, dtype=jnp.int32))
      decoder_cache = decoder_cache.replace(lengths_B=total_B)
    new_cache = BLTCache(
        lengths_B=total_B, bytes_BxS=bytes_buf, entropies_BxS=entropies_buf, encoder_states_BxSxD=states_buf,
        slots_BxMxQxD=slots, encoder_cache=encoder_cache, global_cache=global_cache, decoder_cache=decoder_cache,
        entropy_cache=entropy_cache,
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
  """``next_byte_loss`` plus patch metrics (average patch size, overflow bytes) for ``train(..., loss_fn=)``.

  ``batch["patches"]``, when given (``bytescale.train.buckets``: computed before the step, cut to a bucket), are
  used instead of patching inside the step."""
  output, patches = model.forward(batch["inputs"], batch["segment_ids"], patches=batch.get("patches"))
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
  enc_kv, dec_kv = e.num_kv_heads * e.head_dim, d.num_kv_heads * d.head_dim
  global_in = e.d_model * g.d_model if c.project_global_input else 0
  per_slot_encoder = 2 * q * (e.d_model * e.d_model + 2 * e.d_model * enc_width + global_in)
  # Each byte is a key of the q queries of its own patch: keys/values, then scores and weighted values, per byte.
  encoder_cross_pairs = 2 * 2 * e.d_model * enc_kv + 2 * 2 * q * enc_width
  # Per decoder cross-attention: the byte's query and output projections and its q slots; keys/values per slot.
  decoder_cross_layers = d.num_layers if c.decoder_cross_every_layer else 1
  per_byte_decoder = 2 * 2 * d.d_model * dec_width + 2 * 2 * q * dec_width
  per_slot_decoder = 2 * q * 2 * d.d_model * dec_kv
  byte_to_decoder = 2 * e.d_model * d.d_model if c.project_decoder_input else 0
  count = flops.stack_flops(e, seq_len, prefix="encoder.", **kw)
  count += flops.stack_flops(g, slots, prefix="global.", **kw).scaled(slots_per_byte)
  count += flops.stack_flops(d, seq_len, prefix="decoder.", **kw)
  return count + flops.FlopCount({
      # Only the last encoder cross-attention runs (with one per layer the others do not reach the output).
      "encoder.cross_attention": encoder_cross_pairs + per_slot_encoder * slots_per_byte,
      "decoder.cross_attention": (byte_to_decoder + 2 * q * g.d_model * d.d_model * slots_per_byte
                                  + decoder_cross_layers * (per_byte_decoder + per_slot_decoder * slots_per_byte)),
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

def _stack(d, layers, heads, window=None, rope_theta=10000.0, kv_heads=None, head_dim=None, scan_layers=True):
  return TransformerConfig(
      d_model=d, num_layers=layers, num_heads=heads, num_kv_heads=kv_heads or heads, head_dim=head_dim or d // heads,
      mlp_hidden=swiglu_hidden(d), window=window, rope=rope.RopeConfig(rope_theta=rope_theta), scan_layers=scan_layers,
  )


def _blt(d_e, l_e, d_g, l_g, d_d, l_d, *, heads_e, heads_g, heads_d, window, buckets, seq,
         ngrams=hashing.DEFAULT_NGRAMS, ratio=1.0, theta=10000.0, head_dim_g=None, scan_layers=True):
  return BLTConfig(
      encoder=_stack(d_e, l_e, heads_e, window=window, rope_theta=theta, scan_layers=scan_layers),
      global_stack=_stack(d_g, l_g, heads_g, rope_theta=theta, head_dim=head_dim_g, scan_layers=scan_layers),
      decoder=_stack(d_d, l_d, heads_d, window=window, rope_theta=theta, scan_layers=scan_layers),
      patching=PatchingConfig("entropy", max_patches_ratio=ratio),
      hash_ngrams=ngrams, hash_buckets=buckets, queries_per_patch=2, max_seq_len=seq,
  )


PRESETS = {
    # CPU seconds: a smoke-test size.
    "tiny": _blt(32, 1, 64, 2, 32, 2, heads_e=4, heads_g=4, heads_d=4, window=64, buckets=512, seq=256,
                 ngrams=(3, 4, 5), ratio=0.5),
    # CPU minutes. Layers in python loops: at depths 1, 4 and 2 compile time is no reason to scan, and a scanned
    # stack's training step stacks every layer's residuals into buffers XLA zero-fills first (same results).
    "small": _blt(128, 1, 256, 4, 128, 2, heads_e=4, heads_g=8, heads_d=4, window=128, buckets=8192, seq=512,
                  ratio=0.5, scan_layers=False),
    # The paper's shapes (l_E, h_E, l_G, h_G, l_D): 400M (1, 768, 24, 1280, 7); 1B (1, 1024, 25, 2048, 9).
    "400m": _blt(768, 1, 1280, 24, 768, 7, heads_e=12, heads_g=20, heads_d=12, window=512, buckets=500_002,
                 seq=8192, ratio=0.5, theta=500000.0),
    "1b": _blt(1024, 1, 2048, 25, 1024, 9, heads_e=16, heads_g=16, heads_d=16, window=512, buckets=500_002,
               seq=8192, ratio=0.5, theta=500000.0),
}


def _released(d_local, l_e, l_d, heads_local, mlp_local, d_global, l_g, heads_global, mlp_global) -> BLTConfig:
  theta = 500000.0
  local = lambda layers: TransformerConfig(  # noqa: E731
      d_model=d_local, num_layers=layers, num_heads=heads_local, num_kv_heads=heads_local,
      head_dim=d_local // heads_local, mlp_hidden=mlp_local, window=512, rope=rope.RopeConfig(rope_theta=theta))
  entropy_model = ByteLMConfig(stack=TransformerConfig(
      d_model=768, num_layers=14, num_heads=12, num_kv_heads=12, head_dim=64, mlp_hidden=2048, window=512,
      rope=rope.RopeConfig(rope_theta=10000.0)), max_seq_len=8192)
  config = BLTConfig(
      encoder=local(l_e), decoder=local(l_d),
      global_stack=TransformerConfig(d_model=d_global, num_layers=l_g, num_heads=heads_global,
                                     num_kv_heads=heads_global, head_dim=d_global // heads_global,
                                     mlp_hidden=mlp_global, rope=rope.RopeConfig(rope_theta=theta)),
      patching=PatchingConfig("entropy"), hash_ngrams=hashing.DEFAULT_NGRAMS, hash_buckets=500_002,
      queries_per_patch=2, max_seq_len=4096, entropy_model_config=entropy_model)
  return reference_options(config)


# The released models (facebook/blt-1b, blt-7b) in transformers' layout: reference options, MLP widths rounded up
# to multiples of 256, a 14-layer d-768 entropy model. blt-7b takes the paper's 8B shapes (docs/blt.md).
PRESETS["blt-1b"] = _released(1024, 1, 9, 16, 2816, 2048, 25, 16, 5632)
PRESETS["blt-7b"] = _released(1280, 1, 6, 20, 3584, 4096, 32, 32, 11008)
