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

import numbers

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


# --- The reference (BLT / Hugging Face) hash, bit-exact in 32-bit arithmetic ----------------------------------
#
# transformers' ``byte_group_hash_function``: on REFERENCE ids (BOE 0, BOS 1, EOS 2, BPE 3, byte b -> b + 4; see
# ``vocab.reference_id_table``), the n-gram ending at ``t`` is the window ``w = x[t-n+1..t]`` (oldest first,
# ``x[j] = 0`` before the row start) and
#
#     hash = sum_{i=0}^{n-1} w[i] * prime**i      in int64 with wrap-around (prime**i wraps too)
#     bucket = hash % buckets                       floor modulo of the signed value: in [0, buckets)
#
# Function ``f`` uses ``REFERENCE_PRIMES[f % len]``. jax's default mode has no 64-bit integers, so a 64-bit
# value is a pair of uint32 ``(hi, lo)``; wrap-around modulo 2**64 is the same for signed and unsigned, so only
# the final modulo looks at the sign. Integer ops only: identical on every backend.

REFERENCE_PRIMES = (1000000007, 5915587277, 1500450271, 3267000013, 5754853343, 4093082899, 9576890767,
                    3628273133, 2860486313, 5463458053, 3367900313)
REFERENCE_BUCKETS = 500_002
_LOW16 = 0xFFFF


def _split64(value: int) -> tuple[int, int]:
  """``value mod 2**64`` as python ints ``(hi, lo)``, each < 2**32."""
  value %= 2**64
  return value >> 32, value & MASK32


def _mul32_wide(a, b):
  """Full product of two uint32 arrays as ``(hi, lo)`` uint32: four 16x16-bit partial products, none wraps."""
  a0, a1 = a & _LOW16, a >> 16
  b0, b1 = b & _LOW16, b >> 16
  p00, p01, p10, p11 = a0 * b0, a0 * b1, a1 * b0, a1 * b1  # each <= (2**16 - 1)**2 < 2**32
  mid = (p00 >> 16) + (p01 & _LOW16) + (p10 & _LOW16)  # < 3 * 2**16: bits 16.. of the product
  lo = (mid << 16) | (p00 & _LOW16)  # the shift drops mid's carry bits, which go to hi
  hi = p11 + (p01 >> 16) + (p10 >> 16) + (mid >> 16)  # < 2**32 because the product is < 2**64
  return hi, lo


def _mul64_consts(hi, lo, constants: tuple[int, ...]):
  """``(hi, lo) * constant mod 2**64`` for each constant along a new last axis. Of the cross terms only their low
  32 bits reach the result."""
  c_hi, c_lo = (jnp.asarray(words, jnp.uint32) for words in zip(*map(_split64, constants)))
  prod_hi, prod_lo = _mul32_wide(lo, c_lo)
  return prod_hi + lo * c_hi + hi * c_lo, prod_lo


def _add64(a_hi, a_lo, b_hi, b_lo):
  """``a + b mod 2**64``: the low words' carry is the wrapped sum being smaller than an addend."""
  lo = a_lo + b_lo
  return a_hi + b_hi + (lo < a_lo).astype(jnp.uint32), lo


def _floor_mod_signed64(hi, lo, buckets: int):
  """Python/torch floor modulo ``s % buckets`` of the signed 64-bit ``s`` stored as ``(hi, lo)``, in uint32.

  Unsigned first, Horner over the bits: ``r = ((r << k) | next k bits) % m``. With ``L = m.bit_length()`` and
  ``k = 32 - L``, ``r <= m - 1 <= 2**L - 2``, so ``(r << k) | chunk <= (2**L - 1) * 2**k - 1 < 2**32``: nothing
  wraps (``m < 2**31`` gives ``k >= 1``). The first step takes all of ``hi`` (``r`` starts at 0), then ``lo`` in
  ``ceil(32 / k)`` chunks: 2 steps for ``m = 500_002``, 32 for ``m = 2**31 - 1``.
  A set top bit means ``s = u - 2**64``, so ``s mod m = (u mod m - 2**64 mod m) mod m``; adding ``m - (2**64 mod
  m)`` instead of subtracting keeps it non-negative and below ``2 * m < 2**32``.
  """
  m = jnp.uint32(buckets)
  step = 32 - buckets.bit_length()
  r = hi % m
  consumed = 0
  while consumed < 32:
    k = min(step, 32 - consumed)
    consumed += k
    chunk = (lo >> (32 - consumed)) & jnp.uint32((1 << k) - 1)
    r = ((r << k) | chunk) % m
  negative = (hi >> 31) == 1
  return jnp.where(negative, (r + jnp.uint32(buckets - 2**64 % buckets)) % m, r)


def _validate_reference_args(ngrams, buckets, functions):
  """Static arguments as python ints (numpy integers accepted), or a ValueError naming the bad one."""
  ngrams = tuple(ngrams)
  if not ngrams or not all(isinstance(n, numbers.Integral) and n >= 1 for n in ngrams):
    raise ValueError(f"ngrams must be a non-empty tuple of integer sizes >= 1, got {ngrams}")
  if not isinstance(buckets, numbers.Integral) or not 1 <= buckets < 2**31:
    raise ValueError(f"buckets must be an integer in [1, 2**31), got {buckets!r}")
  if not isinstance(functions, numbers.Integral) or functions < 1:
    raise ValueError(f"functions (the number of hash functions) must be an integer >= 1, got {functions!r}")
  return tuple(int(n) for n in ngrams), int(buckets), int(functions)


def _buckets_for_primes(ref_ids_BxT, segment_ids_BxT, ngrams, buckets: int, primes: tuple[int, ...]):
  """Reference buckets ``BxTxFxN`` (uint32): one ``F`` entry per prime, one ``N`` entry per ``n`` in ``ngrams``.

  Horner from the newest id outwards: with ``h_n(t) = sum_{j<n} x[t-j] * prime**(n-1-j)`` (the window sum),
  ``h_{n+1}(t) = h_n(t) * prime + x[t-n]``, so every n comes from one pass of ``max(ngrams)`` steps; all primes
  ride along in the ``F`` axis and all sizes share one modulo, so the traced program does not grow with either.
  """
  if ref_ids_BxT.ndim != 2:
    raise ValueError(f"ref_ids_BxT must be 2-d (batch, time), got shape {ref_ids_BxT.shape}")
  if segment_ids_BxT is None:
    segment_ids_BxT = jnp.ones(ref_ids_BxT.shape, jnp.int32)
  positions_BxT = segment_positions(segment_ids_BxT)
  ids = ref_ids_BxT.astype(jnp.int32)
  hi = lo = jnp.zeros((*ids.shape, len(primes)), jnp.uint32)
  sums = {}
  for i in range(max(ngrams)):
    # x[t-i], or 0 (the reference's padding) when t-i precedes t's document or the row.
    shifted = jnp.pad(ids, ((0, 0), (i, 0)))[:, : ids.shape[1]]
    shifted = jnp.where(positions_BxT >= i, shifted, 0)[..., None]
    # int64 sign extension of the id, so even a negative id matches torch.
    x_hi = jnp.where(shifted < 0, jnp.uint32(MASK32), jnp.uint32(0))
    hi, lo = _mul64_consts(hi, lo, primes)
    hi, lo = _add64(hi, lo, x_hi, shifted.astype(jnp.uint32))
    if i + 1 in ngrams:
      sums[i + 1] = hi, lo
  hi_BxTxFxN = jnp.stack([sums[n][0] for n in ngrams], axis=-1)
  lo_BxTxFxN = jnp.stack([sums[n][1] for n in ngrams], axis=-1)
  return _floor_mod_signed64(hi_BxTxFxN, lo_BxTxFxN, buckets)


def _buckets_for_prime(ref_ids_BxT, segment_ids_BxT, ngrams, buckets: int, prime: int):
  """Reference buckets ``BxTxN`` (uint32) for one ``prime`` (any integer; tests use small hand-checkable ones)."""
  return _buckets_for_primes(ref_ids_BxT, segment_ids_BxT, tuple(ngrams), buckets, (prime,))[:, :, 0, :]


def reference_ngram_buckets(ref_ids_BxT, segment_ids_BxT=None, ngrams=DEFAULT_NGRAMS,
                            buckets: int = REFERENCE_BUCKETS, functions: int = 1):
  """The reference's hash buckets, int32 ``BxTx(functions * len(ngrams))`` in ``[0, buckets)``.

  ``ref_ids_BxT`` are reference ids (map ours with ``vocab.reference_id_table()``). Column ``f * len(ngrams) + g``
  is function ``f`` (prime ``REFERENCE_PRIMES[f % 11]``) on n-gram size ``ngrams[g]``, the reference's order; the
  caller adds ``column * buckets`` to index one concatenated table. ``segment_ids_BxT`` (None: one document per
  row) makes it document-aware: positions before ``t``'s document count as the zero padding of the row start, so
  a one-document row equals the reference and packed documents do not see each other.
  """
  ngrams, buckets, functions = _validate_reference_args(ngrams, buckets, functions)
  primes = tuple(REFERENCE_PRIMES[f % len(REFERENCE_PRIMES)] for f in range(functions))
  buckets_BxTxFxN = _buckets_for_primes(ref_ids_BxT, segment_ids_BxT, ngrams, buckets, primes)
  return buckets_BxTxFxN.reshape(*buckets_BxTxFxN.shape[:2], -1).astype(jnp.int32)  # function-major columns


def reference_ngram_bucket_python(window_oldest_first: list[int], prime: int, buckets: int) -> int:
  """Plain-Python reference bucket of one window (oldest id first, 0 for padding): the jnp version's oracle.

  Exact sum in unbounded ints, wrapped to signed 64-bit as torch's int64 arithmetic does, then floor modulo.
  """
  h = sum(token * prime**i for i, token in enumerate(window_oldest_first))
  h = ((h + 2**63) % 2**64) - 2**63
  return h % buckets

