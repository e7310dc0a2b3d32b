"""Rolling n-gram hashes in 32-bit arithmetic, for BLT's hash n-gram embeddings.

The n-gram ending at byte ``t`` (``n`` ids ``x[t-n+1..t]``) hashes to

    h_n(t) = fmix32( sum_{i=0}^{n-1} (x[t-i] + 1) * PRIME**i  mod 2**32 )
    bucket_n(t) = h_n(t) mod buckets

All arithmetic is ``uint32`` with wrap-around (no 64-bit types, so it runs in jax's default 32-bit mode and
gives the same buckets on every backend). The sum is rolled outwards from the newest byte, so all n in
``ngrams`` come from one pass over ``max(ngrams)`` shifts: ``h_{n+1} = h_n + (x[t-n] + 1) * PRIME**n``.
``fmix32`` is MurmurHash3's finaliser: it spreads the polynomial's low-entropy high bits over the whole word
before the ``mod``. Ids are shifted by one so that byte 0 contributes to the hash.

Document-aware: a byte before the start of ``t``'s document (a different segment, or before the row) is
replaced by ``OUTSIDE`` (one past every vocabulary id), so a document hashes the same alone or packed.
"""

from __future__ import annotations

import jax.numpy as jnp

from bytescale import vocab
from bytescale.ops.mask import segment_positions

PRIME = 0x01000193  # FNV-1's 32-bit prime: odd, so multiplication by it is invertible modulo 2**32
OUTSIDE = vocab.VOCAB_SIZE  # stands in for bytes before the document start
MASK32 = 0xFFFFFFFF
DEFAULT_NGRAMS = (3, 4, 5, 6, 7, 8)


def fmix32(h):
  """MurmurHash3's 32-bit finaliser on ``uint32`` arrays."""
  h = h ^ (h >> 16)
  h = h * jnp.uint32(0x85EBCA6B)
  h = h ^ (h >> 13)
  h = h * jnp.uint32(0xC2B2AE35)
  return h ^ (h >> 16)


def ngram_hashes(ids_BxT, segment_ids_BxT=None, ngrams=DEFAULT_NGRAMS):
  """``uint32`` hashes ``BxTxN`` of the n-grams ending at every position, one column per ``n`` in ``ngrams``."""
  ngrams = tuple(ngrams)
  if not ngrams or min(ngrams) < 1:
    raise ValueError(f"ngrams must be a non-empty tuple of sizes >= 1, got {ngrams}")
  if segment_ids_BxT is None:
    segment_ids_BxT = jnp.ones_like(ids_BxT)
  positions_BxT = segment_positions(segment_ids_BxT)
  ids = ids_BxT.astype(jnp.int32)
  h = jnp.zeros(ids.shape, jnp.uint32)
  power = 1
  out = {}
  for i in range(max(ngrams)):
    # x[t-i], or OUTSIDE when t-i precedes t's document (position within the document < i).
    shifted = jnp.pad(ids, ((0, 0), (i, 0)))[:, : ids.shape[1]]
    shifted = jnp.where(positions_BxT >= i, shifted, OUTSIDE)
    h = h + (shifted + 1).astype(jnp.uint32) * jnp.uint32(power)
    power = (power * PRIME) & MASK32
    if i + 1 in ngrams:
      out[i + 1] = fmix32(h)
  return jnp.stack([out[n] for n in ngrams], axis=-1)


def ngram_buckets(ids_BxT, segment_ids_BxT=None, ngrams=DEFAULT_NGRAMS, buckets: int = 500_002):
  """Bucket ids ``BxTxN`` (int32, in ``[0, buckets)``) of the n-grams ending at every position."""
  if not 0 < buckets < 2**31:
    raise ValueError(f"buckets must be in [1, 2**31), got {buckets}")
  return (ngram_hashes(ids_BxT, segment_ids_BxT, ngrams) % jnp.uint32(buckets)).astype(jnp.int32)


def ngram_hash_python(ngram: list[int]) -> int:
  """Plain-Python hash of one n-gram (oldest id first; use ``OUTSIDE`` for bytes before the document).

  Python integers masked to 32 bits: the reference the jnp version is tested against.
  """
  h = 0
  for i, token in enumerate(reversed(ngram)):
    h = (h + (token + 1) * pow(PRIME, i, 2**32)) & MASK32
  h ^= h >> 16
  h = (h * 0x85EBCA6B) & MASK32
  h ^= h >> 13
  h = (h * 0xC2B2AE35) & MASK32
  return h ^ (h >> 16)
