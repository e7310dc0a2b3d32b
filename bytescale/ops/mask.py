"""The attention mask as one value, ``AttentionMask``, and the shape check every attention implementation shares.

Masks are described, not materialised by the caller: every query and key carries a position and a segment id.
A key is visible to a query iff

  * both segment ids are equal and non-zero (segment 0 marks padding or an empty cache slot),
  * ``causal``: ``kv_position <= q_position``,
  * ``window``: ``q_position - kv_position < window`` (causal) or ``|q_position - kv_position| < window``.

This one description covers packed documents (segment = document), padding, KV caches (unfilled slots get
segment 0), sliding windows and patch-local cross-attention (segment = patch id, ``causal=False``), and it is
what lets a fused kernel skip whole blocks. Rows with no visible key return zeros, never NaN.

Shapes: q ``BxTxHxK``, k/v ``BxSxGxK`` with ``H % G == 0`` (grouped KV heads), positions and segment ids
``BxT`` / ``BxS`` int32.

A leaf module (jax only): the kernels import it, and ``bytescale.ops.attention`` (which dispatches to
the kernels) does too, so the kernels never import ``ops.attention``.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=("q_positions_BxT", "kv_positions_BxS", "q_segment_ids_BxT", "kv_segment_ids_BxS"),
    meta_fields=("causal", "window", "packed", "queries_per_segment"),
)
@dataclasses.dataclass(frozen=True)
class AttentionMask:
  """Which keys each query sees (module docstring). A pytree: the arrays are leaves, ``causal``/``window`` static.

  Segment ids may be None: all ones (every entry valid, one segment).

  ``packed`` (set only by :meth:`packed_row`) promises what block-skipping needs from the XLA path: queries and
  keys are the same tokens, a document is a contiguous run of equal non-zero ids, and positions count from 0
  along each run. Then a visible key never comes after its query and lies less than ``window`` indices before
  it, whatever the values, so whole blocks can be skipped without reading them.

  ``queries_per_segment`` (set only by :meth:`segment_local`) promises the layout of patch-local cross-attention:
  no positions, no causality, queries grouped ``Q`` per segment in segment order, each key in at most one
  segment; the XLA path then scores each key against the ``Q`` queries of its own segment only.
  """

  q_positions_BxT: jax.Array
  kv_positions_BxS: jax.Array
  q_segment_ids_BxT: jax.Array | None = None
  kv_segment_ids_BxS: jax.Array | None = None
  causal: bool = dataclasses.field(default=True, kw_only=True)
  window: int | None = dataclasses.field(default=None, kw_only=True)
  packed: bool = dataclasses.field(default=False, kw_only=True)
  queries_per_segment: int | None = dataclasses.field(default=None, kw_only=True)

  def __post_init__(self):
    # Static fields are part of the pytree structure (and of jit cache keys): plain python values only.
    object.__setattr__(self, "causal", bool(self.causal))
    object.__setattr__(self, "packed", bool(self.packed))
    if self.window is not None:
      object.__setattr__(self, "window", int(self.window))

  @classmethod
  def self_attention(cls, positions_BxT, segment_ids_BxT=None, *, causal: bool = True, window: int | None = None):
    """Queries and keys are the same tokens (a packed row: positions within documents, segment = document)."""
    return cls(positions_BxT, positions_BxT, segment_ids_BxT, segment_ids_BxT, causal=causal, window=window)

  @classmethod
  def packed_row(cls, segment_ids_BxT, *, window: int | None = None):
    """Causal self-attention over packed rows, built from the segment ids alone (so the ``packed`` promise holds
    by construction): each maximal run of equal non-zero ids is one document, positions are
    ``segment_positions``; ids 0 are padding."""
    starts = jnp.concatenate([jnp.ones_like(segment_ids_BxT[:, :1], bool),
                              segment_ids_BxT[:, 1:] != segment_ids_BxT[:, :-1]], axis=1)
    runs_BxT = jnp.where(segment_ids_BxT != 0, jnp.cumsum(starts, axis=1, dtype=jnp.int32), 0)
    positions_BxT = segment_positions(segment_ids_BxT)
    return cls(positions_BxT, positions_BxT, runs_BxT, runs_BxT, causal=True, window=window, packed=True)

  @classmethod
  def segment_local(cls, kv_segments_BxS, valid_BxM, queries_per_segment: int):
    """Cross-attention of ``M x Q`` queries (query ``m * Q + j`` belongs to segment ``m``; segment ``m`` takes part
    where ``valid_BxM``) to keys that each belong to segment ``kv_segments_BxS`` (ids outside ``[0, M)``: none).
    Every query sees exactly the keys of its own segment (BLT's encoder: a patch's queries and its bytes)."""
    b, m = valid_BxM.shape
    q_segments_BxN = jnp.repeat(jnp.where(valid_BxM, jnp.arange(1, m + 1, dtype=jnp.int32), 0), queries_per_segment,
                                axis=1)
    kv_segments_BxS = jnp.where((kv_segments_BxS >= 0) & (kv_segments_BxS < m), kv_segments_BxS + 1, 0)
    zeros = lambda n: jnp.zeros((b, n), jnp.int32)  # noqa: E731
    return cls(zeros(m * queries_per_segment), zeros(kv_segments_BxS.shape[1]), q_segments_BxN,
               kv_segments_BxS.astype(jnp.int32), causal=False, queries_per_segment=queries_per_segment)

  @classmethod
  def kv_cache(cls, q_positions_BxN, num_slots: int, filled_B, *, window: int | None = None):
    """Causal queries at ``q_positions`` over a cache of ``num_slots`` slots, slot s holding position s; the
    slots at or beyond ``filled_B`` (each row's length, the new queries included) are empty (segment 0)."""
    b = q_positions_BxN.shape[0]
    slots_BxS = jnp.broadcast_to(jnp.arange(num_slots, dtype=jnp.int32), (b, num_slots))
    kv_segments_BxS = (slots_BxS < filled_B[:, None]).astype(jnp.int32)
    return cls(q_positions_BxN, slots_BxS, jnp.ones_like(q_positions_BxN), kv_segments_BxS, causal=True,
               window=window)

  def q_segments_or_ones(self):
    """``q_segment_ids_BxT``, or ones when None."""
    return _segments_or_ones(self.q_segment_ids_BxT, self.q_positions_BxT)

  def kv_segments_or_ones(self):
    """``kv_segment_ids_BxS``, or ones when None."""
    return _segments_or_ones(self.kv_segment_ids_BxS, self.kv_positions_BxS)

  def dense(self):
    """Boolean visibility mask ``BxTxS`` (True = the query may attend to the key)."""
    qp = self.q_positions_BxT[:, :, None]
    kp = self.kv_positions_BxS[:, None, :]
    mask = jnp.ones(jnp.broadcast_shapes(qp.shape, kp.shape), dtype=bool)
    if self.causal:
      mask &= kp <= qp
    if self.window is not None:
      distance = qp - kp
      mask &= (distance < self.window) if self.causal else (jnp.abs(distance) < self.window)
    if self.q_segment_ids_BxT is not None or self.kv_segment_ids_BxS is not None:
      qs = self.q_segments_or_ones()[:, :, None]
      ks = self.kv_segments_or_ones()[:, None, :]
      mask &= (qs == ks) & (ks != 0)
    return mask


def _segments_or_ones(segment_ids, positions):
  return jnp.ones_like(positions) if segment_ids is None else segment_ids


def check_shapes(q, k, v, mask: AttentionMask):
  """Raises ``ValueError`` unless q is ``BxTxHxK``, k and v ``BxSxGxK`` with ``H % G == 0``, and the mask's
  arrays are ``BxT`` (queries) and ``BxS`` (keys)."""
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise ValueError(f"attention expects q BxTxHxK, k/v BxSxGxK; got {q.shape}, {k.shape}, {v.shape}")
  if k.shape != v.shape:
    raise ValueError(f"k and v shapes differ: {k.shape} vs {v.shape}")
  if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
    raise ValueError(f"q {q.shape} and k {k.shape} disagree on batch or head dim")
  if q.shape[2] % k.shape[2]:
    raise ValueError(f"query heads ({q.shape[2]}) must be a multiple of kv heads ({k.shape[2]})")
  want_q, want_kv = tuple(q.shape[:2]), tuple(k.shape[:2])
  for name, array, want in (
      ("q_positions_BxT", mask.q_positions_BxT, want_q),
      ("kv_positions_BxS", mask.kv_positions_BxS, want_kv),
      ("q_segment_ids_BxT", mask.q_segment_ids_BxT, want_q),
      ("kv_segment_ids_BxS", mask.kv_segment_ids_BxS, want_kv),
  ):
    if array is not None and tuple(jnp.shape(array)) != want:
      raise ValueError(f"mask {name} has shape {tuple(jnp.shape(array))}, expected {want} from q {q.shape}, "
                       f"k {k.shape}")


def segment_positions(segment_ids_BxT):
  """Position of each token within its segment (0 at each segment start); padding (segment 0) gets 0.

  A segment is a maximal run of equal ids, so a document split across two rows restarts at 0 in the second.
  """
  t = segment_ids_BxT.shape[-1]
  index = jnp.arange(t, dtype=jnp.int32)
  starts = jnp.concatenate(
      [jnp.ones_like(segment_ids_BxT[..., :1], bool), segment_ids_BxT[..., 1:] != segment_ids_BxT[..., :-1]],
      axis=-1,
  )
  start_index = jax.lax.cummax(jnp.where(starts, index, 0), axis=segment_ids_BxT.ndim - 1)
  return jnp.where(segment_ids_BxT != 0, index - start_index, 0).astype(jnp.int32)
