"""Patchers: bytes (and entropies) -> ``Patches``, a pytree of static-shape arrays.

Every patcher decides, per byte, whether it OPENS a patch ("start"). The rules, for byte ``t`` at position
``p`` within its document (``p = 0`` at the document's first byte):

* always: ``p == 0`` (row start and every document start) opens a patch;
* ``bos_patch``: ``p == 1`` opens a patch too, so a document's first byte (its BOS) is a patch of its own, as
  in the BLT reference and Hugging Face's ``BltForCausalLM`` (their patchers open patches at positions 0 and 1);
* ``strided(P)``: ``p % P == 0``;
* ``space`` (SpaceByte): byte ``t-1`` ENDS a patch, where byte ``u`` ends a patch iff it is special (an id
  >= 256: BOS, EOS, ...) or it is spacelike (not an ASCII letter or digit, not a UTF-8 continuation byte
  ``0b10xxxxxx``) and byte ``u-1`` is not spacelike (or ``u`` is its document's first byte);
* ``entropy``, global rule: ``H[t-1] > threshold``, where ``H[t]`` is the entropy of the entropy model's
  prediction made AT byte ``t`` (the distribution of byte ``t+1``);
* ``entropy``, monotonic rule: ``H[t-1] - H[t-2] > monotonic_threshold``, defined only for ``p >= 2`` (the
  difference never reaches back before the document, so no patch is forced at the document's second byte);
* both thresholds given: both conditions must hold (as in the BLT reference's combined mode);
* ``max_patch_length L``: a patch reaching ``L`` bytes is split, i.e. byte ``t`` also opens a patch when
  ``(t - s) % L == 0`` with ``s`` the last byte at or before ``t`` opened by the rules above.

Whether byte ``t`` opens a patch depends only on bytes and entropies BEFORE ``t`` (and on segment ids up to
``t``): this is what keeps BLT causal, and it is why the generation variant (``include_next=True``) can report
whether the next, not yet seen byte opens a patch.

Padding (segment id 0) opens nothing and belongs to no patch: its patch id is -1.

Overflow policy. Patches are numbered ``0, 1, ...`` along the row and padded to a static ``max_patches``. When
a row has more patches than that, the bytes of every patch ``>= max_patches - 1`` are merged into patch
``max_patches - 1``: no byte leaves the loss, the model stays causal (the decoder of a merged byte still reads
the global state of an earlier patch), only the merged bytes lose patch resolution. ``overflow_bytes_B``
counts, per row, the bytes that sit in a merged patch but would have opened or joined a later one: 0 unless
``max_patches`` was too small. Report it (``bytescale.models.blt.patch_metrics``) and raise ``max_patches``
when it is not 0.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import struct

from bytescale import vocab
from bytescale.configs import check
from bytescale.ops.mask import segment_positions

PATCHERS = ("strided", "space", "entropy")
# PatchingConfig.patch_buckets: with the presets' max_patches_ratio 0.5, slot counts 1/8, 1/4, 3/8 and 1/2 of the row.
DEFAULT_PATCH_BUCKETS = (0.125, 0.25, 0.375, 0.5)
# The BLT reference's default global threshold (natural-log entropy, nats).
BLT_THRESHOLD = 1.335442066192627


@struct.dataclass
class Patches:
  """Static-shape description of a row's patches (``M = max_patches``)."""

  patch_ids_BxT: jax.Array  # int32: the patch of each byte in [0, M); -1 on padding
  starts_BxT: jax.Array  # bool: the byte opens a patch (before any overflow merge)
  lengths_BxM: jax.Array  # int32: bytes per patch; 0 for unused slots
  valid_BxM: jax.Array  # bool: the slot holds a patch
  overflow_bytes_B: jax.Array  # int32: bytes merged into the last slot because the row had > M patches
  # bool: the byte after the row's last one (same document) would open a patch; None when not computed
  next_start_B: jax.Array | None = None

  @property
  def max_patches(self) -> int:
    return self.lengths_BxM.shape[1]

  @property
  def num_patches_B(self):
    return jnp.sum(self.valid_BxM, axis=1)

  def truncated(self, slots: int) -> Patches:
    """The same patches in the first ``slots`` slots. Exact only when no row has more than ``slots`` patches
    (``num_patches_B <= slots``: the dropped slots are empty); the caller checks, as this runs under ``jit``."""
    if not 1 <= slots <= self.max_patches:
      raise ValueError(f"slots must be in [1, {self.max_patches}], got {slots}")
    return self.replace(lengths_BxM=self.lengths_BxM[:, :slots], valid_BxM=self.valid_BxM[:, :slots])


@dataclasses.dataclass(frozen=True)
class PatchingConfig:
  """How a BLT cuts bytes into patches (see the module docstring for the rules)."""

  patcher: str = "entropy"  # strided | space | entropy
  stride: int = 4  # strided: bytes per patch
  threshold: float | None = BLT_THRESHOLD  # entropy, global rule (None = off)
  monotonic_threshold: float | None = None  # entropy, monotonic rule (None = off); both set = both must hold
  max_patch_length: int | None = None  # split longer patches (None = no limit)
  max_patches_ratio: float = 1.0  # max_patches = ceil(ratio * row length); 1.0 never overflows
  entropy_context: int | None = None  # bytes per entropy-model window (None = the entropy model's max_seq_len)
  entropy_overlap: int | None = None  # bytes each window overlaps the previous one (None = half the context)
  bos_patch: bool = False  # a document's first byte (BOS) is a patch of its own (the BLT reference's rule)
  # Training speed, not the model: slot counts (fractions of the row length, like ``max_patches_ratio``) a train or
  # eval step may run the global model at. Patches are computed before the step at the full ``max_patches``, and
  # the step gets the smallest bucket that holds every row's patches (only empty slots are dropped: exact); one
  # compilation per bucket used. () = off: patches are computed inside the step at the full size.
  patch_buckets: tuple[float, ...] = DEFAULT_PATCH_BUCKETS

  def __post_init__(self):
    name = "PatchingConfig"
    fix = f"give increasing fractions of the row length in (0, 1], e.g. {list(DEFAULT_PATCH_BUCKETS)}, or [] for off"
    check(isinstance(self.patch_buckets, (tuple, list)), name, "patch_buckets",
          f"must be a list, got {self.patch_buckets!r}; {fix}")
    check(all(isinstance(r, (int, float)) and not isinstance(r, bool) and 0 < r <= 1 for r in self.patch_buckets),
          name, "patch_buckets", f"got {list(self.patch_buckets)}; {fix}")
    object.__setattr__(self, "patch_buckets", tuple(float(r) for r in self.patch_buckets))
    check(all(a < b for a, b in zip(self.patch_buckets, self.patch_buckets[1:])), name, "patch_buckets",
          f"must increase, got {list(self.patch_buckets)}; {fix}")
    check(isinstance(self.bos_patch, bool), name, "bos_patch", f"must be true or false, got {self.bos_patch!r}")
    check(self.patcher in PATCHERS, name, "patcher", f"must be one of {PATCHERS}, got {self.patcher!r}")
    check(isinstance(self.stride, int) and self.stride > 0, name, "stride",
          f"must be a positive integer, got {self.stride!r}")
    if self.patcher == "entropy":
      check(
          self.threshold is not None or self.monotonic_threshold is not None, name, "threshold",
          "entropy patching needs threshold and/or monotonic_threshold; set threshold (e.g. 1.335)",
      )
    check(
        self.max_patch_length is None or self.max_patch_length > 0, name, "max_patch_length",
        f"must be None or a positive integer, got {self.max_patch_length!r}",
    )
    check(
        0 < self.max_patches_ratio <= 1, name, "max_patches_ratio",
        f"must be in (0, 1] (fraction of the row length), got {self.max_patches_ratio}",
    )
    check(
        self.entropy_context is None or self.entropy_context > 1, name, "entropy_context",
        f"must be None or > 1, got {self.entropy_context!r}",
    )
    check(
        self.entropy_overlap is None or self.entropy_overlap >= 0, name, "entropy_overlap",
        f"must be None or >= 0, got {self.entropy_overlap!r}",
    )

  @property
  def needs_entropies(self) -> bool:
    return self.patcher == "entropy"

  def max_patches(self, seq_len: int) -> int:
    return max(1, min(seq_len, math.ceil(self.max_patches_ratio * seq_len)))

  def bucket_slots(self, seq_len: int) -> tuple[int, ...]:
    """The slot counts ``patch_buckets`` allows for rows of ``seq_len`` bytes, ascending; the last is always the
    full ``max_patches(seq_len)`` (buckets at or above it are that size)."""
    full = self.max_patches(seq_len)
    return tuple(sorted({min(full, max(1, math.ceil(r * seq_len))) for r in self.patch_buckets} | {full}))


# --- Rules ------------------------------------------------------------------------------------------------

def _shift_right(x_BxT, k: int, fill):
  """``x[t-k]`` at ``t`` (``fill`` for ``t < k``)."""
  if k == 0:
    return x_BxT
  pad = jnp.full(x_BxT.shape[:1] + (k,), fill, x_BxT.dtype)
  return jnp.concatenate([pad, x_BxT[:, : x_BxT.shape[1] - k]], axis=1)


def is_spacelike(ids):
  """Not an ASCII letter or digit and not a UTF-8 continuation byte; special ids (>= 256) are spacelike."""
  ids = ids.astype(jnp.int32)
  digit = (ids >= ord("0")) & (ids <= ord("9"))
  upper = (ids >= ord("A")) & (ids <= ord("Z"))
  lower = (ids >= ord("a")) & (ids <= ord("z"))
  continuation = (ids >= 0x80) & (ids < 0xC0)
  return ~(digit | upper | lower | continuation)


def rule_starts(config: PatchingConfig, ids_BxT, segment_ids_BxT, entropies_BxT=None):
  """Bytes opened by the config's rule and by document starts (before ``max_patch_length`` splitting)."""
  real_BxT = segment_ids_BxT != 0
  pos_BxT = segment_positions(segment_ids_BxT)
  doc_start = pos_BxT == 0
  if config.patcher == "strided":
    rule = pos_BxT % config.stride == 0
  elif config.patcher == "space":
    spacelike = is_spacelike(ids_BxT)
    ends = (ids_BxT >= vocab.NUM_BYTES) | (spacelike & ~((pos_BxT >= 1) & _shift_right(spacelike, 1, False)))
    rule = (pos_BxT >= 1) & _shift_right(ends, 1, False)
  else:
    if entropies_BxT is None:
      raise ValueError("entropy patching needs entropies_BxT (see bytescale.entropy.compute_entropies)")
    h = entropies_BxT.astype(jnp.float32)
    h_prev = _shift_right(h, 1, 0.0)  # H[t-1]
    rule = jnp.ones_like(real_BxT)
    if config.threshold is not None:
      rule &= (pos_BxT >= 1) & (h_prev > config.threshold)
    if config.monotonic_threshold is not None:
      rule &= (pos_BxT >= 2) & (h_prev - _shift_right(h, 2, 0.0) > config.monotonic_threshold)
  if config.bos_patch:
    doc_start |= pos_BxT == 1
  return (doc_start | rule) & real_BxT


def split_long_patches(starts_BxT, real_BxT, max_patch_length: int | None):
  """Adds a start every ``max_patch_length`` bytes after each start."""
  if max_patch_length is None:
    return starts_BxT
  index = jnp.arange(starts_BxT.shape[1], dtype=jnp.int32)
  last_start = jax.lax.cummax(jnp.where(starts_BxT, index, -1), axis=1)
  offset = index - last_start
  return starts_BxT | (real_BxT & (last_start >= 0) & (offset % max_patch_length == 0))


def patches_from_starts(starts_BxT, segment_ids_BxT, max_patches: int) -> Patches:
  """Numbers the patches along each row and applies the overflow policy (see the module docstring)."""
  real_BxT = segment_ids_BxT != 0
  raw_ids = jnp.cumsum(starts_BxT.astype(jnp.int32), axis=1) - 1
  raw_ids = jnp.where(real_BxT, raw_ids, -1)
  patch_ids = jnp.minimum(raw_ids, max_patches - 1)
  overflow = jnp.sum(real_BxT & (raw_ids >= max_patches), axis=1).astype(jnp.int32)
  onehot_lengths = jax.vmap(lambda ids: jnp.bincount(jnp.where(ids >= 0, ids, max_patches), length=max_patches + 1))
  lengths = onehot_lengths(patch_ids)[:, :max_patches].astype(jnp.int32)
  return Patches(
      patch_ids_BxT=patch_ids.astype(jnp.int32), starts_BxT=starts_BxT, lengths_BxM=lengths,
      valid_BxM=lengths > 0, overflow_bytes_B=overflow,
  )


def patch(
    config: PatchingConfig,
    ids_BxT,
    segment_ids_BxT=None,
    *,
    entropies_BxT=None,
    max_patches: int | None = None,
    include_next: bool = False,
) -> Patches:
  """Patches of a batch of rows; pure jnp, jit-compatible, static shapes.

  ``max_patches`` defaults to ``config.max_patches(T)``. With ``include_next`` the result covers ``T + 1``
  bytes: the last one is the next, not yet seen byte of the last document (its start flag is known from the
  bytes and entropies before it), for generation.
  """
  if segment_ids_BxT is None:
    segment_ids_BxT = jnp.ones(ids_BxT.shape, jnp.int32)
  if include_next:
    ids_BxT = jnp.concatenate([ids_BxT, jnp.zeros_like(ids_BxT[:, :1])], axis=1)
    next_segment = jnp.where(segment_ids_BxT[:, -1:] != 0, segment_ids_BxT[:, -1:], 1)
    segment_ids_BxT = jnp.concatenate([segment_ids_BxT, next_segment], axis=1)
    if entropies_BxT is not None:
      entropies_BxT = jnp.concatenate([entropies_BxT, jnp.zeros_like(entropies_BxT[:, :1])], axis=1)
  t = ids_BxT.shape[1]
  max_patches = config.max_patches(t) if max_patches is None else max_patches
  if max_patches < 1:
    raise ValueError(f"max_patches must be >= 1, got {max_patches}")
  # One position past the row, continuing its last document: its start flag (known from what precedes it) is
  # ``next_start_B``; the patches themselves cover the row only.
  next_segment = jnp.where(segment_ids_BxT[:, -1:] != 0, segment_ids_BxT[:, -1:], 1)
  extend = lambda x, fill: jnp.concatenate([x, jnp.full_like(x[:, :1], fill)], axis=1)  # noqa: E731
  starts = rule_starts(config, extend(ids_BxT, 0), jnp.concatenate([segment_ids_BxT, next_segment], axis=1),
                       None if entropies_BxT is None else extend(entropies_BxT, 0.0))
  starts = split_long_patches(starts, extend(segment_ids_BxT != 0, True), config.max_patch_length)
  patches = patches_from_starts(starts[:, :t], segment_ids_BxT, max_patches)
  return patches.replace(next_start_B=starts[:, t])


def next_byte_opens_patch(config: PatchingConfig, ids_BxT, segment_ids_BxT=None, *, entropies_BxT=None):
  """Whether the byte after the last one (same document) opens a patch: ``B`` bools."""
  patches = patch(config, ids_BxT, segment_ids_BxT, entropies_BxT=entropies_BxT,
                  max_patches=ids_BxT.shape[1] + 1, include_next=True)
  return patches.starts_BxT[:, -1]


def strided(ids_BxT, segment_ids_BxT=None, *, stride: int, max_patches=None, max_patch_length=None) -> Patches:
  return patch(PatchingConfig("strided", stride=stride, max_patch_length=max_patch_length), ids_BxT,
               segment_ids_BxT, max_patches=max_patches)


def space(ids_BxT, segment_ids_BxT=None, *, max_patches=None, max_patch_length=None) -> Patches:
  return patch(PatchingConfig("space", max_patch_length=max_patch_length), ids_BxT, segment_ids_BxT,
               max_patches=max_patches)


def entropy(
    entropies_BxT, segment_ids_BxT=None, *, threshold=BLT_THRESHOLD, monotonic_threshold=None,
    max_patches=None, max_patch_length=None, include_next=False,
) -> Patches:
  """Entropy patching from precomputed entropies (the bytes themselves are not needed)."""
  config = PatchingConfig("entropy", threshold=threshold, monotonic_threshold=monotonic_threshold,
                          max_patch_length=max_patch_length)
  ids = jnp.zeros(entropies_BxT.shape, jnp.int32)
  return patch(config, ids, segment_ids_BxT, entropies_BxT=entropies_BxT, max_patches=max_patches,
               include_next=include_next)


def patch_start_index(patches: Patches):
  """Index of each patch's first byte ``BxM`` (T for unused slots)."""
  t = patches.patch_ids_BxT.shape[1]
  k = patches.max_patches
  index = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), patches.patch_ids_BxT.shape)
  first = jax.vmap(lambda ids, idx: jax.ops.segment_min(idx, jnp.where(ids >= 0, ids, k), k + 1))(
      patches.patch_ids_BxT, index)
  return jnp.minimum(first[:, :k], t)
