"""Multi-token prediction heads on any bytescale model, and their memory-efficient loss.

``MultiTokenLM`` wraps a trunk model (any registered model config: ByteLM, MegaByte, BLT, ...) and adds
``mtp_heads`` = n heads on the trunk's byte-level states (``ModelOutput.hidden_BxTxD``: ByteLM's stack output,
the local decoder's states of a patch model). Each head is ONE transformer block followed by the trunk's own
final norm and unembedding (``trunk.unembed``), and head i (1-based) predicts byte t+i from the states at t:

* ``parallel`` (Gloeckle et al. 2024): every head reads the trunk output ``h_t``.
* ``sequential`` (DeepSeek-V3's MTP modules): head 1 reads ``h_t``; head k > 1 reads
  ``proj([RMSNorm(h^{k-1}_t); RMSNorm(embed(x_{t+k-1}))])``, the previous head's output and the embedding of
  the byte just before its target (the trunk's byte embedding is shared when it is as wide as the states).

Head 1 is the next-byte model: ``MultiTokenLM.__call__``/``decode`` return its logits, so generation, eval and
checkpoints treat the wrapper like any model. ``mtp_parameter_matched`` takes n layers off the trunk's byte-level
stack, so trunk + heads have the depth of the original model (the paper's "remove n-1 trunk layers", counting
the next-token baseline's last layer as its single head).

Loss (:func:`multi_token_loss`): ``sum_i w_i * mean CE_i``; head i's target at t is ``targets[t + i - 1]``,
kept only where that target is real (``loss_mask``) and its input is in the same document as t (segment ids):
no head ever predicts across documents. With ``memory_efficient`` (default) the trunk runs once and the heads
run in a ``lax.scan`` whose body is rematerialised, so the backward pass recomputes one head at a time and only
one head's ``BxTxV`` logits exist at once; the trunk-output cotangent is accumulated across heads by the scan.

Drafting (for :mod:`bytescale.speculative`): ``init_cache(..., drafting=True)`` also keeps KV caches for heads
2..n and what drafting reads, and :meth:`MultiTokenLM.draft` proposes the next n-1 bytes. Head 1's cache is
written only by ``decode``, from the same inputs plain decoding sees, so verification is exact. Parallel heads
cost a verification step little: ``decode`` only projects their keys and values at the new positions (all
heads at once), and ``draft`` runs the heads' attention, MLP and unembedding at the one position drafted from.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx, struct

from bytescale import vocab
from bytescale import flops
from bytescale.configs import ByteLMConfig, ConfigError, TransformerConfig, check, parse_value, replace_path
from bytescale.models.base import ModelOutput
from bytescale.nn.layers import Embedding, RMSNorm, dense, param, scaled_normal
from bytescale.nn.transformer import Block, layer_state
from bytescale.ops import attention as attention_ops
from bytescale.ops.mask import AttentionMask
from bytescale.ops.losses import bits_per_byte, masked_cross_entropy
from bytescale.ops.rows import read_rows, write_rows
from bytescale.ops.sampling import greedy_ids

VARIANTS = ("parallel", "sequential")
DEEPSEEK_MTP_WEIGHT = 0.3  # DeepSeek-V3's lambda (0.3, later 0.1), shared evenly by the extra heads

# Where each trunk config keeps the TransformerConfig of its byte-level states: the heads copy its shape (one
# layer each) and ``mtp_parameter_matched`` removes layers from it. Keyed by class name so that models need not
# be imported here; a config may instead define a ``byte_stack_path`` attribute.
BYTE_STACK_PATHS: dict[str, str] = {"ByteLMConfig": "stack", "MegaByteConfig": "local_stack", "BLTConfig": "decoder"}
# Trunk attributes tried, in order, for a byte embedding the sequential heads can share (an ``Embedding`` as wide
# as the byte-level states); a trunk without one gets its own table in the wrapper.
BYTE_EMBEDDINGS = ("embed", "local_embed", "byte_embed")


def byte_stack_path(trunk_config) -> str:
  path = getattr(trunk_config, "byte_stack_path", None) or BYTE_STACK_PATHS.get(type(trunk_config).__name__)
  if path is None:
    raise ConfigError(
        f"MultiTokenConfig.trunk: {type(trunk_config).__name__} does not say which TransformerConfig holds its "
        "byte-level states; add it to bytescale.models.mtp.BYTE_STACK_PATHS or give the config a byte_stack_path")
  return path


def _get_path(config, path: str):
  for name in path.split("."):
    config = getattr(config, name)
  return config


@dataclasses.dataclass(frozen=True)
class MultiTokenConfig:
  """A trunk model config plus n multi-token heads. Field names start with ``mtp_`` so that ``--set`` never
  confuses them with the trunk's fields (``num_heads`` is the attention heads' count)."""

  trunk: Any = dataclasses.field(default_factory=ByteLMConfig)
  mtp_heads: int = 4
  mtp_variant: str = "parallel"
  mtp_loss_weights: tuple[float, ...] | None = None  # None: all 1.0 (parallel) or DeepSeek's (sequential)
  mtp_parameter_matched: bool = False
  mtp_memory_efficient: bool = True  # training loss: one head's logits at a time (same values and gradients)

  def __post_init__(self):
    name = "MultiTokenConfig"
    check(dataclasses.is_dataclass(self.trunk) and not isinstance(self.trunk, MultiTokenConfig), name, "trunk",
          f"must be a registered model config (not another MultiTokenConfig), got {type(self.trunk).__name__}")
    n = self.mtp_heads
    check(isinstance(n, int) and not isinstance(n, bool) and n >= 1, name, "mtp_heads",
          f"must be an integer >= 1 (1 = next byte only), got {n!r}")
    check(self.mtp_variant in VARIANTS, name, "mtp_variant", f"must be one of {VARIANTS}, got {self.mtp_variant!r}")
    if self.mtp_loss_weights is not None:
      weights = tuple(float(w) for w in self.mtp_loss_weights)
      object.__setattr__(self, "mtp_loss_weights", weights)  # frozen: store the normalised tuple
      check(len(weights) == n, name, "mtp_loss_weights",
            f"needs one weight per head ({n}), got {len(weights)}; e.g. --set 'mtp_loss_weights={[1.0] * n}'")
      check(all(w >= 0 for w in weights) and weights[0] > 0, name, "mtp_loss_weights",
            f"must be >= 0 with a positive first (next-byte) weight, got {list(weights)}")
    stack = _get_path(self.trunk, byte_stack_path(self.trunk))
    if self.mtp_parameter_matched:
      check(stack.num_layers > n, name, "mtp_parameter_matched",
            f"removes {n} layers from the trunk's {stack.num_layers}-layer byte stack, leaving none; use fewer "
            "heads, a deeper trunk, or mtp_parameter_matched=false")

  @property
  def loss_weights(self) -> tuple[float, ...]:
    if self.mtp_loss_weights is not None:
      return self.mtp_loss_weights
    n = self.mtp_heads
    if self.mtp_variant == "sequential" and n > 1:
      return (1.0,) + (DEEPSEEK_MTP_WEIGHT / (n - 1),) * (n - 1)
    return (1.0,) * n

  @property
  def effective_trunk(self):
    """The trunk actually built: with ``mtp_parameter_matched``, n layers fewer in its byte-level stack."""
    if not self.mtp_parameter_matched:
      return self.trunk
    path = byte_stack_path(self.trunk)
    return replace_path(self.trunk, f"{path}.num_layers", _get_path(self.trunk, path).num_layers - self.mtp_heads)

  @property
  def head_stack(self) -> TransformerConfig:
    """Each head is one block shaped like the trunk's byte-level layers. On a patch model whose byte layers
    have no window (MegaByte's local model attends within its patch) a head attends to the last
    ``patch_size`` bytes, so heads stay linear in the sequence length like the local model."""
    stack = dataclasses.replace(_get_path(self.trunk, byte_stack_path(self.trunk)), num_layers=1)
    patch_size = getattr(self.trunk, "patch_size", None)
    if stack.window is None and isinstance(patch_size, int):
      stack = dataclasses.replace(stack, window=patch_size)
    return stack

  @property
  def max_seq_len(self):
    return getattr(self.trunk, "max_seq_len", None)


def wrap(model_config, **fields) -> MultiTokenConfig:
  """``model_config`` with multi-token heads (an existing ``MultiTokenConfig`` is updated instead)."""
  if isinstance(model_config, MultiTokenConfig):
    return dataclasses.replace(model_config, **fields)
  return MultiTokenConfig(trunk=model_config, **fields)


MTP_FIELDS = tuple(f.name for f in dataclasses.fields(MultiTokenConfig) if f.name.startswith("mtp_"))


def split_overrides(assignments) -> tuple[list[tuple[str, str]], dict[str, str]]:
  """``--set FIELD=VALUE`` strings -> ``([(field, value), ...] for the model or train config, {mtp_field: value})``;
  the ``mtp_*`` ones go to :func:`apply_overrides`, after the others are set."""
  others, multi_token = [], {}
  for assignment in assignments:
    if "=" not in assignment:
      raise ConfigError(f"--set {assignment}: expected FIELD=VALUE")
    key, value = assignment.split("=", 1)
    if key.startswith("mtp_"):
      multi_token[key] = value
    else:
      others.append((key, value))
  return others, multi_token


def apply_overrides(model_config, raw: dict[str, str]):
  """``--set mtp_heads=8 --set mtp_variant=sequential ...``: parses the ``mtp_*`` strings and wraps (or updates)
  ``model_config`` with all of them at once, so their order does not matter."""
  import typing

  hints = typing.get_type_hints(MultiTokenConfig)
  fields = {}
  for name, value in raw.items():
    if name not in MTP_FIELDS:
      raise ConfigError(f"--set {name}: not a multi-token field; use one of {', '.join(MTP_FIELDS)}")
    fields[name] = parse_value(value, hints[name], f"MultiTokenConfig.{name}")
  return wrap(model_config, **fields)


# --- Modules ------------------------------------------------------------------------------------------------

class Combine(nnx.Module):
  """DeepSeek-V3's MTP input: ``[RMSNorm(h); RMSNorm(e)] @ W`` with ``W`` of shape ``2D x D``."""

  def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
    d = config.d_model
    self.dtype = jnp.dtype(config.dtype)
    self.hidden_norm = RMSNorm(d, eps=config.norm_eps, rngs=rngs)
    self.embed_norm = RMSNorm(d, eps=config.norm_eps, rngs=rngs)
    self.proj = param(rngs, scaled_normal(2 * d), (2 * d, d), ("embed", "embed"))

  def __call__(self, hidden_BxTxD, embedded_BxTxD):
    x = jnp.concatenate([self.hidden_norm(hidden_BxTxD), self.embed_norm(embedded_BxTxD)], axis=-1)
    return dense(x.astype(self.dtype), self.proj[...].astype(self.dtype))


def _stacked(make, count: int, rngs: nnx.Rngs):
  """``count`` modules with parameters stacked on a leading ``layers`` axis (as in ``TransformerStack``)."""

  @nnx.split_rngs(splits=count)
  @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
  def build(rngs):
    return make(rngs)

  return build(rngs)


def _index(state, i):
  return jax.tree.map(lambda a: a[i], state)


@struct.dataclass
class MultiTokenCache:
  """The trunk's cache, head 1's keys/values and, when ``drafting``, those of heads 2..n (``J = n - 1``).

  Drafting state, indexed by position like the KV caches (slots at or beyond ``lengths_B`` are free):
  parallel heads keep their keys and values in one buffer each, ``heads_k_BxJxGxSxK`` and ``heads_v_BxJxGxKxS``
  (a head's keys are KV-head groups of one attention over all heads; slots after the groups, values transposed:
  the layouts XLA's CPU matmuls read without copying the buffers at every step), and ``draft_source_BxSxD``, the
  trunk's output, which every parallel head reads; sequential heads keep separate caches (``extra_k``/``extra_v``)
  and what their recomputation reads: ``draft_source_BxSxD`` (head 1's output) and ``tokens_BxS`` (the ids).
  """

  trunk: Any
  k_BxGxSxK: jax.Array  # head 1's, in the layouts of ``KVCache`` (see ``Attention.decode``)
  v_BxGxKxS: jax.Array
  lengths_B: jax.Array
  extra_k: tuple | None = None  # sequential: J arrays BxGxSxK (v: BxGxKxS), separate buffers, updated in place
  extra_v: tuple | None = None
  heads_k_BxJxGxSxK: jax.Array | None = None  # parallel
  heads_v_BxJxGxKxS: jax.Array | None = None
  draft_source_BxSxD: jax.Array | None = None
  tokens_BxS: jax.Array | None = None
  drafting: bool = struct.field(pytree_node=False, default=False)


_greedy = greedy_ids


class MultiTokenLM(nnx.Module):
  """A trunk model with n multi-token heads; speaks the model protocol through head 1 (the next byte)."""

  def __init__(self, config: MultiTokenConfig, *, trunk: nnx.Module, rngs: nnx.Rngs):
    """``trunk``: the model built from ``config.effective_trunk`` (``bytescale.models.registry.build_model``
    builds both)."""
    self.config = config
    self.trunk = trunk
    head_config = config.head_stack
    self.heads = _stacked(lambda r: Block(head_config, rngs=r), config.mtp_heads, rngs)
    sequential = config.mtp_variant == "sequential" and config.mtp_heads > 1
    self.combine = nnx.data(_stacked(lambda r: Combine(head_config, rngs=r), config.mtp_heads - 1, rngs)
                            if sequential else None)
    self.shared_embedding = next(
        (name for name in BYTE_EMBEDDINGS if isinstance(getattr(self.trunk, name, None), Embedding)
         and getattr(self.trunk, name).table.shape[1] == head_config.d_model), None)
    self.byte_embed = nnx.data(Embedding(vocab.VOCAB_SIZE, head_config.d_model, rngs=rngs)
                               if sequential and self.shared_embedding is None else None)

  @property
  def num_heads(self) -> int:
    return self.config.mtp_heads

  @property
  def sequential(self) -> bool:
    return self.config.mtp_variant == "sequential"

  @property
  def draft_window(self) -> int:
    """Positions of the sequential heads 2..n recomputed per draft: head k at t reads byte t+k-1, which may be
    a draft for the last 2n-2 positions (a verification step accepts at most n bytes, so older entries were
    last rewritten from confirmed bytes)."""
    return max(2 * self.num_heads - 2, 1)

  def _embed(self, ids):
    """Byte embedding for the sequential heads: the trunk's own table when one is as wide as its states."""
    embed = self.byte_embed if self.shared_embedding is None else getattr(self.trunk, self.shared_embedding)
    return embed(ids).astype(jnp.dtype(self.config.head_stack.dtype))

  def unembed(self, hidden_BxTxD):
    return self.trunk.unembed(hidden_BxTxD)

  # --- Full sequences -------------------------------------------------------------------------------------

  def __call__(self, bytes_BxT, segment_ids_BxT=None, *, patches=None) -> ModelOutput:
    """Head 1's next-byte logits and the states they are read from."""
    if segment_ids_BxT is None:
      segment_ids_BxT = jnp.ones_like(bytes_BxT)
    hidden = self.trunk(bytes_BxT, segment_ids_BxT, patches=patches).hidden_BxTxD
    graphdef, state = nnx.split(self.heads)
    first = nnx.merge(graphdef, _index(state, 0))(hidden, None, segment_ids_BxT)
    return ModelOutput(self.unembed(first), first)

  def all_head_logits(self, bytes_BxT, segment_ids_BxT=None, *, patches=None):
    """Logits of every head, ``NxBxTxV`` (head i at t predicts byte t+i+1), with teacher forcing for the
    sequential heads' byte inputs (bytes beyond the row read as PAD). For tests and inspection."""
    if segment_ids_BxT is None:
      segment_ids_BxT = jnp.ones_like(bytes_BxT)
    hidden = self.trunk(bytes_BxT, segment_ids_BxT, patches=patches).hidden_BxTxD
    graphdef, state = nnx.split(self.heads)
    logits, previous = [], hidden
    for i in range(self.num_heads):
      x = hidden
      if self.sequential and i > 0:
        ahead = _shift_left(bytes_BxT, i, vocab.PAD)
        x = self._combine(i - 1)(previous, self._embed(ahead))
      previous = nnx.merge(graphdef, _index(state, i))(x, None, segment_ids_BxT)
      logits.append(self.unembed(previous))
    return jnp.stack(logits)

  def _combine(self, i):
    graphdef, state = nnx.split(self.combine)
    return nnx.merge(graphdef, _index(state, i))

  def loss(self, batch):
    return multi_token_loss(self, batch)

  # --- Cached decoding ------------------------------------------------------------------------------------

  def init_cache(self, batch: int, max_len: int, *, drafting: bool = False) -> MultiTokenCache:
    """Without ``drafting``: trunk + head 1 only (plain generation pays nothing for heads 2..n)."""
    hc = self.config.head_stack
    groups = (batch, hc.num_kv_heads)
    cache = MultiTokenCache(self.trunk.init_cache(batch, max_len), jnp.zeros((*groups, max_len, hc.head_dim), hc.dtype),
                            jnp.zeros((*groups, hc.head_dim, max_len), hc.dtype), jnp.zeros((batch,), jnp.int32),
                            drafting=drafting)
    if not drafting or self.num_heads == 1:
      return cache
    if not self.sequential:
      heads = (batch, self.num_heads - 1, hc.num_kv_heads)
      return cache.replace(heads_k_BxJxGxSxK=jnp.zeros((*heads, max_len, hc.head_dim), hc.dtype),
                           heads_v_BxJxGxKxS=jnp.zeros((*heads, hc.head_dim, max_len), hc.dtype),
                           draft_source_BxSxD=jnp.zeros((batch, max_len, hc.d_model), hc.dtype))
    # A sequential draft rewrites a window of draft_window slots from position max(m - window, 0).
    extra_slots = max(max_len, self.draft_window)
    slack = self.draft_window + self.num_heads  # draft windows read a little past the last position
    return cache.replace(extra_k=tuple(jnp.zeros((*groups, extra_slots, hc.head_dim), hc.dtype)
                                       for _ in range(self.num_heads - 1)),
                         extra_v=tuple(jnp.zeros((*groups, hc.head_dim, extra_slots), hc.dtype)
                                       for _ in range(self.num_heads - 1)),
                         draft_source_BxSxD=jnp.zeros((batch, max_len + slack, hc.d_model), hc.dtype),
                         tokens_BxS=jnp.full((batch, max_len + slack), vocab.PAD, jnp.int32))

  def rollback(self, cache: MultiTokenCache, n_B) -> MultiTokenCache:
    """Forgets the last ``n_B`` bytes of each row (slots beyond the lengths are masked, not cleared)."""
    return cache.replace(trunk=self.trunk.rollback(cache.trunk, n_B),
                         lengths_B=jnp.maximum(cache.lengths_B - n_B, 0))

  def decode(self, cache: MultiTokenCache, bytes_BxN):
    """Appends N bytes per row; returns head 1's logits. A drafting cache also advances heads 2..n: parallel
    heads store their keys and values and the trunk's states at the new positions (their attention and MLP run
    in ``draft``, at one position); sequential heads run over the block, reading its bytes (positions whose
    byte lies beyond it are rewritten by ``draft``)."""
    start_B = cache.lengths_B
    trunk_out, trunk_cache = self.trunk.decode(cache.trunk, bytes_BxN)
    hidden = trunk_out.hidden_BxTxD
    graphdef, state = nnx.split(self.heads)
    first, k, v = nnx.merge(graphdef, layer_state(state, 0)).decode(hidden, cache.k_BxGxSxK, cache.v_BxGxKxS,
                                                                    start_B)
    new = cache.replace(trunk=trunk_cache, k_BxGxSxK=k, v_BxGxKxS=v, lengths_B=start_B + bytes_BxN.shape[1])
    if cache.drafting and self.num_heads > 1 and not self.sequential:
      def keys_values(head_state):
        block = nnx.merge(graphdef, head_state)
        _, k, v = block.attention.decode_qkv(block.attention_norm(hidden), start_B)
        return k, v

      # Every head's, head 1's dropped: slicing the stacked parameters would copy them at every step.
      k_JxBxNxGxK, v_JxBxNxGxK = (x[1:] for x in jax.vmap(keys_values)(state))
      new = new.replace(
          heads_k_BxJxGxSxK=write_rows(cache.heads_k_BxJxGxSxK, k_JxBxNxGxK.transpose(1, 0, 3, 2, 4), start_B, axis=3),
          heads_v_BxJxGxKxS=write_rows(cache.heads_v_BxJxGxKxS, v_JxBxNxGxK.transpose(1, 0, 3, 4, 2), start_B, axis=4),
          draft_source_BxSxD=write_rows(cache.draft_source_BxSxD, hidden, start_B))
    elif cache.drafting and self.num_heads > 1:
      block_ids_BxU = jnp.pad(bytes_BxN, ((0, 0), (0, self.num_heads)), constant_values=vocab.PAD)
      _, k_extra, v_extra = self._extra_heads_decode(state, hidden, first, block_ids_BxU, cache.extra_k,
                                                     cache.extra_v, start_B, None)
      new = new.replace(extra_k=k_extra, extra_v=v_extra,
                        draft_source_BxSxD=write_rows(cache.draft_source_BxSxD, first, start_B),
                        tokens_BxS=write_rows(cache.tokens_BxS, bytes_BxN, start_B))
    return ModelOutput(self.unembed(first), first), new

  def _parallel_draft(self, cache: MultiTokenCache):
    """Heads 2..n at the last cached position only, all heads at once: queries there, one attention over their
    cached keys (head j's keys are KV-head groups of its own), MLP, one unembedding. ``drafts_BxJ``."""
    # Every head runs (head 1's output dropped): slicing the stacked parameters would copy them at every step.
    graphdef, state = nnx.split(self.heads)
    m_B = cache.lengths_B
    last_B = jnp.maximum(m_B - 1, 0)
    source_Bx1xD = read_rows(cache.draft_source_BxSxD, last_B, 1)

    def queries(head_state):
      block = nnx.merge(graphdef, head_state)
      return block.attention.decode_qkv(block.attention_norm(source_Bx1xD), last_B, m_B)[0]

    q_JxBx1xHxK = jax.vmap(queries)(state)[1:]
    j, b, _, h, k = q_JxBx1xHxK.shape
    _, _, g, s, _ = cache.heads_k_BxJxGxSxK.shape
    config = self.config.head_stack
    # The attention's views of the buffers (BxSxGxK with J x G groups) undo their layouts: no copies.
    keys_BxSxGxK = cache.heads_k_BxJxGxSxK.reshape(b, j * g, s, k).transpose(0, 2, 1, 3).astype(config.dtype)
    values_BxSxGxK = cache.heads_v_BxJxGxKxS.reshape(b, j * g, k, s).transpose(0, 3, 1, 2).astype(config.dtype)
    mask = AttentionMask.kv_cache(last_B[:, None], s, m_B, window=config.window)
    out_Bx1xHxK = attention_ops.attention(  # H here counts J x H query heads over J x G key/value heads
        q_JxBx1xHxK.transpose(1, 2, 0, 3, 4).reshape(b, 1, j * h, k), keys_BxSxGxK, values_BxSxGxK, mask,
        impl=config.attention_impl)
    out_JxBx1xHxK = out_Bx1xHxK.reshape(b, 1, j, h, k).transpose(2, 0, 1, 3, 4)

    def rest_of_block(head_state, attended_Bx1xHxK):
      block = nnx.merge(graphdef, head_state)
      x = source_Bx1xD + block.attention.output(attended_Bx1xHxK).astype(source_Bx1xD.dtype)
      return x + block.mlp(block.mlp_norm(x)).astype(x.dtype)

    out_JxBx1xD = jax.vmap(rest_of_block)(state, jnp.pad(out_JxBx1xHxK, ((1, 0),) + ((0, 0),) * 4))[1:]
    drafts_JxB = _greedy(self.unembed(out_JxBx1xD.reshape(j * b, 1, -1))[:, 0]).reshape(j, b)
    return drafts_JxB.T

  def _extra_heads_decode(self, heads_state, source_BxWxD, first_BxWxD, ids_BxU, k_caches, v_caches, start_B,
                          last_B):
    """Runs heads 2..n over a window of W positions starting at ``start_B``; ``ids_BxU`` holds the ids from the
    window's first position on (U >= W + n). Returns ``(outputs, k_caches, v_caches)``: with ``last_B``
    (sequential drafting: the window index of the last confirmed position) ``outputs`` are the heads' greedy
    bytes there, ``JxB``, each written into the ids the next head reads; otherwise the heads' output states
    ``JxBxWxD``.

    An unrolled loop over per-head caches: a scan or vmap over stacked caches would copy every head's cache at
    each step (decoding on a CPU is dominated by such copies and per-op costs)."""
    graphdef, _ = nnx.split(self.heads)
    width = source_BxWxD.shape[1]
    rows = jnp.arange(ids_BxU.shape[0])
    outputs, new_k, new_v, previous, ids = [], [], [], first_BxWxD, ids_BxU
    for j in range(1, self.num_heads):
      x = source_BxWxD
      if self.sequential:  # head j+1 at position t reads byte t + j
        x = self._combine(j - 1)(previous, self._embed(ids[:, j:j + width]))
      out, k, v = nnx.merge(graphdef, layer_state(heads_state, j)).decode(x, k_caches[j - 1], v_caches[j - 1],
                                                                          start_B)
      new_k.append(k)
      new_v.append(v)
      if last_B is not None:
        byte_B = _greedy(self.unembed(out[rows, last_B][:, None])[:, 0])
        ids = ids.at[rows, last_B + j + 1].set(byte_B)  # the byte this head predicts, for the next head
        outputs.append(byte_B)
      else:
        outputs.append(out)
      previous = out
    return jnp.stack(outputs), tuple(new_k), tuple(new_v)

  def draft(self, cache: MultiTokenCache, next_B):
    """Proposes the n-1 bytes after ``next_B`` (the greedy byte following the cached positions).

    Parallel heads: their greedy bytes at the last cached position, computed there from the keys and values
    ``decode`` stored (see ``_parallel_draft``). Sequential heads:
    heads 2..n are recomputed over the last ``draft_window`` positions (their caches rewritten there; head 1
    and the trunk untouched), head k reading the byte drafted by head k-1. Returns ``(drafts_BxJ, cache)``.
    """
    if not cache.drafting:
      raise ValueError("draft needs a cache from init_cache(..., drafting=True)")
    batch = next_B.shape[0]
    rows = jnp.arange(batch)
    m_B = cache.lengths_B
    if self.num_heads == 1:
      return jnp.zeros((batch, 0), jnp.int32), cache
    if not self.sequential:
      return self._parallel_draft(cache), cache
    width = self.draft_window
    start_B = jnp.maximum(m_B - width, 0)
    last_B = m_B - 1 - start_B
    source = read_rows(cache.draft_source_BxSxD, start_B, width)
    ids = read_rows(cache.tokens_BxS, start_B, width + self.num_heads)
    ids = ids.at[rows, m_B - start_B].set(next_B)
    _, state = nnx.split(self.heads)
    drafts_JxB, k, v = self._extra_heads_decode(state, source, source, ids, cache.extra_k, cache.extra_v,
                                                start_B, last_B)
    return drafts_JxB.T, cache.replace(extra_k=k, extra_v=v)


def _shift_left(x_BxT, shift: int, fill):
  """``x[:, t + shift]``, with ``fill`` past the end."""
  if shift == 0:
    return x_BxT
  return jnp.pad(x_BxT[:, shift:], ((0, 0), (0, shift)), constant_values=fill)


# --- Loss ---------------------------------------------------------------------------------------------------

def head_targets(targets_BxT, loss_mask_BxT, segment_ids_BxT, num_heads: int):
  """Targets and masks of every head, ``NxBxT``: head i (0-based) at t predicts ``targets[t + i]``, counted
  where that target is real and its input lies in the same (non-padding) document as the input at t."""
  targets, masks = [], []
  for i in range(num_heads):
    same_document = (_shift_left(segment_ids_BxT, i, 0) == segment_ids_BxT) & (segment_ids_BxT != 0)
    targets.append(_shift_left(targets_BxT, i, vocab.PAD))
    masks.append(_shift_left(loss_mask_BxT, i, 0).astype(jnp.float32) * same_document)
  return jnp.stack(targets), jnp.stack(masks)


def multi_token_loss(model: MultiTokenLM, batch, *, memory_efficient: bool | None = None):
  """``(loss, aux)`` like ``train.step.next_byte_loss``: ``aux`` holds head 1's ``nll_sum``/``count`` (so bits
  per byte and evaluation stay next-byte figures) and ``bpb_head{i}`` for every head."""
  config = model.config
  if memory_efficient is None:
    memory_efficient = config.mtp_memory_efficient
  segment_ids = batch["segment_ids"]
  hidden = model.trunk(batch["inputs"], segment_ids).hidden_BxTxD
  targets_NxBxT, masks_NxBxT = head_targets(batch["targets"], batch["loss_mask"], segment_ids, model.num_heads)
  graphdef, state = nnx.split(model.heads)
  remat = jax.checkpoint if memory_efficient else (lambda f: f)

  def head_nll(head_state, x, targets, mask):
    out = nnx.merge(graphdef, head_state)(x, None, segment_ids)  # packed rows
    nll, count = masked_cross_entropy(model.unembed(out), targets, mask)
    return out, nll, count

  if not memory_efficient:  # every head's logits at once: the reference the scan must equal
    outs, previous = [], hidden
    for i in range(model.num_heads):
      x = hidden
      if model.sequential and i > 0:
        x = model._combine(i - 1)(previous, model._embed(targets_NxBxT[i - 1]))
      previous, nll, count = head_nll(_index(state, i), x, targets_NxBxT[i], masks_NxBxT[i])
      outs.append((nll, count))
    nll_N, count_N = (jnp.stack(v) for v in zip(*outs))
  elif not model.sequential:
    def body(_, xs):
      head_state, targets, mask = xs
      _, nll, count = remat(head_nll)(head_state, hidden, targets, mask)
      return None, (nll, count)

    _, (nll_N, count_N) = jax.lax.scan(body, None, (state, targets_NxBxT, masks_NxBxT))
  else:
    first, nll_1, count_1 = remat(head_nll)(_index(state, 0), hidden, targets_NxBxT[0], masks_NxBxT[0])
    nll_N, count_N = nll_1[None], count_1[None]
    if model.num_heads > 1:
      combine_graphdef, combine_state = nnx.split(model.combine)

      def sequential_head(previous, head_state, combine, ahead, targets, mask):
        # Head k at t reads byte t+k-1, which is head k-1's target at t (teacher forcing).
        x = nnx.merge(combine_graphdef, combine)(previous, model._embed(ahead))
        return head_nll(head_state, x, targets, mask)

      def body(previous, xs):
        out, nll, count = remat(sequential_head)(previous, *xs)
        return out, (nll, count)

      rest = jax.tree.map(lambda a: a[1:], state)
      _, (nll_r, count_r) = jax.lax.scan(
          body, first, (rest, combine_state, targets_NxBxT[:-1], targets_NxBxT[1:], masks_NxBxT[1:]))
      nll_N, count_N = jnp.concatenate([nll_N, nll_r]), jnp.concatenate([count_N, count_r])

  weights = jnp.asarray(config.loss_weights, jnp.float32)
  loss = jnp.sum(weights * nll_N / jnp.maximum(count_N, 1.0))
  aux = {"nll_sum": nll_N[0], "count": count_N[0]}
  for i in range(model.num_heads):
    aux[f"bpb_head{i + 1}"] = bits_per_byte(nll_N[i], count_N[i])
  return loss, aux


# --- FLOPs --------------------------------------------------------------------------------------------------

def flops_per_byte(config: MultiTokenConfig, seq_len: int, trunk: flops.FlopCount, *, convention="exact",
                   attention="causal") -> flops.FlopCount:
  """Training forward: ``trunk`` (the trunk's count, ``config.effective_trunk``), then every head's block,
  unembedding (and sequential projections). The trunk's ``unembed`` is head 1's (the trunk's own logits are never
  computed)."""
  n = config.mtp_heads
  head = config.head_stack
  # The heads are plain blocks: the trunk stack's remat policy does not apply to them.
  count = trunk + flops.stack_flops(dataclasses.replace(head, num_layers=n, remat="none"), seq_len,
                                    convention=convention, attention=attention, prefix="mtp_heads.")
  extra = {"mtp_heads.unembed": (n - 1) * 2.0 * head.d_model * vocab.VOCAB_SIZE}
  if config.mtp_variant == "sequential":
    extra["mtp_heads.combine"] = (n - 1) * 2.0 * 2 * head.d_model * head.d_model
  count += flops.FlopCount(extra)
  if config.mtp_memory_efficient:
    # The memory-efficient loss recomputes every head (block, combine, unembedding) in the backward pass.
    count = count.with_recomputed(name for name in count.components
                                  if name.startswith("mtp_heads.") or name == "unembed")
  return count
