"""The reference (BLT / Hugging Face) hash n-gram buckets in 32-bit jnp, against Python's unbounded integers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bytescale.ops import hashing

BUCKET_COUNTS = (1, 2, 500_002, 2**31 - 1)
MAX_REFERENCE_ID = 259


def wrapped_signed_sum(window, prime):
  """The int64 sum torch computes, from unbounded ints: used to show the inputs do wrap to negative values."""
  h = sum(token * prime**i for i, token in enumerate(window))
  return ((h + 2**63) % 2**64) - 2**63


def windows(row, t, n):
  """The reference window of size n ending at t, oldest first, zeros before the row start."""
  return [int(row[j]) if j >= 0 else 0 for j in range(t - n + 1, t + 1)]


def oracle(ids_BxT, ngrams, buckets, functions):
  """Brute force over rows, positions, functions and sizes, column f * len(ngrams) + g."""
  b, t = ids_BxT.shape
  out = np.zeros((b, t, functions * len(ngrams)), np.int64)
  for row in range(b):
    for pos in range(t):
      for f in range(functions):
        prime = hashing.REFERENCE_PRIMES[f % len(hashing.REFERENCE_PRIMES)]
        for g, n in enumerate(ngrams):
          window = windows(ids_BxT[row], pos, n)
          out[row, pos, f * len(ngrams) + g] = hashing.reference_ngram_bucket_python(window, prime, buckets)
  return out


@pytest.fixture
def reference_ids():
  """Random reference ids, one row of all-max ids and one of high ids: sums that wrap past 2**63."""
  rng = np.random.default_rng(14)
  ids = rng.integers(0, MAX_REFERENCE_ID + 1, size=(4, 20))
  ids[1] = MAX_REFERENCE_ID
  ids[2] = rng.integers(200, MAX_REFERENCE_ID + 1, size=20)
  ids[3, :4] = rng.integers(0, 4, size=4)  # the special ids BOE, BOS, EOS, BPE
  return ids


def test_python_reference_follows_int64_wraparound_and_floor_modulo():
  # prime 2**63: the window [0, 1] sums to 2**63, which int64 wraps to -2**63; -2**63 = -(2**63) and 2**63 = 2
  # (mod 3) since 2 = -1 (mod 3), so floor modulo gives 1 where the unsigned value would give 2.
  assert hashing.reference_ngram_bucket_python([0, 1], 2**63, 3) == 1
  assert hashing.reference_ngram_bucket_python([0, 5], 2**64 - 1, 7) == 2  # prime = -1 in int64: -5 mod 7
  assert hashing.reference_ngram_bucket_python([1, 2, 3], 31, 10**6) == 1 + 2 * 31 + 3 * 961


def test_matches_python_reference_for_every_prime(reference_ids):
  ngrams = (1, 2, 3, 5, 8)
  functions = len(hashing.REFERENCE_PRIMES) + 1  # one past the table: cycles back to the first prime
  sums = [wrapped_signed_sum(windows(row, pos, n), prime)
          for row in reference_ids for pos in range(reference_ids.shape[1])
          for n in ngrams for prime in hashing.REFERENCE_PRIMES]
  assert min(sums) < 0, "the inputs must include int64 sums that wrap to negative values"
  ids = jnp.asarray(reference_ids, jnp.int32)
  for buckets in BUCKET_COUNTS:
    fn = jax.jit(lambda i, b=buckets: hashing.reference_ngram_buckets(i, ngrams=ngrams, buckets=b,
                                                                        functions=functions))
    got = np.asarray(fn(ids))
    assert got.dtype == np.int32 and got.shape == (*reference_ids.shape, functions * len(ngrams))
    np.testing.assert_array_equal(got, oracle(reference_ids, ngrams, buckets, functions), err_msg=f"{buckets=}")


def test_default_arguments_match_python_reference(reference_ids):
  got = np.asarray(jax.jit(hashing.reference_ngram_buckets)(jnp.asarray(reference_ids, jnp.int32)))
  np.testing.assert_array_equal(got, oracle(reference_ids, hashing.DEFAULT_NGRAMS, 500_002, 1))


def test_hand_computed_small_cases():
  def buckets_for(ids, ngrams, buckets, prime):
    fn = jax.jit(lambda i: hashing._buckets_for_prime(i, None, ngrams, buckets, prime))
    return np.asarray(fn(jnp.asarray([ids], jnp.int32)))[0]

  # Oldest first with weight prime**0: [1, 2, 3] -> 1 + 2*31 + 3*31**2; the row start pads with zeros.
  got = buckets_for([1, 2, 3], (2, 3), 2**31 - 1, 31)
  np.testing.assert_array_equal(got[:, 0], [0 + 1 * 31, 1 + 2 * 31, 2 + 3 * 31])
  np.testing.assert_array_equal(got[:, 1], [1 * 961, 1 * 31 + 2 * 961, 1 + 2 * 31 + 3 * 961])
  # The signed wrap-around cases worked out in the Python-reference test above.
  assert buckets_for([0, 1], (2,), 3, 2**63)[1, 0] == 1
  assert buckets_for([0, 5], (2,), 7, 2**64 - 1)[1, 0] == 2


def test_zero_padding_at_the_row_start(reference_ids):
  # Leading BOE (reference id 0) ids are exactly the padding: the shifted row hashes the same.
  pad = 9
  ids = jnp.asarray(reference_ids, jnp.int32)
  padded = jnp.pad(ids, ((0, 0), (pad, 0)))
  fn = jax.jit(lambda i: hashing.reference_ngram_buckets(i, functions=2))
  np.testing.assert_array_equal(np.asarray(fn(padded))[:, pad:], np.asarray(fn(ids)))


def test_packed_documents_hash_as_if_alone(reference_ids):
  first, second = reference_ids[0, :7], reference_ids[2, :13]
  packed = jnp.asarray([np.concatenate([first, second])], jnp.int32)
  segments = jnp.asarray([[1] * len(first) + [2] * len(second)], jnp.int32)
  fn = jax.jit(lambda i, s: hashing.reference_ngram_buckets(i, s, ngrams=(1, 3, 8), functions=2))
  got = np.asarray(fn(packed, segments))[0]
  alone = [np.asarray(fn(jnp.asarray([doc], jnp.int32), jnp.ones((1, len(doc)), jnp.int32)))[0]
           for doc in (first, second)]
  np.testing.assert_array_equal(got, np.concatenate(alone))
  # One document per row is what segment_ids=None means, and it differs from the packed row once n-grams span.
  unsegmented = np.asarray(jax.jit(lambda i: hashing.reference_ngram_buckets(i, ngrams=(1, 3, 8), functions=2))(
      packed))[0]
  np.testing.assert_array_equal(unsegmented[: len(first)], alone[0])
  assert (unsegmented[len(first):] != alone[1]).any()


def test_uses_32_bit_types_only():
  assert not jax.config.jax_enable_x64
  jaxpr = jax.make_jaxpr(lambda i: hashing.reference_ngram_buckets(i, functions=2))(jnp.zeros((1, 12), jnp.int32))
  dtypes = {str(v.aval.dtype) for eqn in jaxpr.eqns for v in eqn.outvars}
  assert not any("64" in d for d in dtypes), dtypes


@pytest.mark.parametrize("kwargs, field", [
    ({"buckets": 0}, "buckets"),
    ({"buckets": 2**31}, "buckets"),
    ({"buckets": 10.5}, "buckets"),
    ({"functions": 0}, "functions"),
    ({"ngrams": ()}, "ngrams"),
    ({"ngrams": (3, 0)}, "ngrams"),
    ({"ngrams": (2.5,)}, "ngrams"),
])
def test_bad_arguments_are_named(kwargs, field):
  with pytest.raises(ValueError, match=field):
    hashing.reference_ngram_buckets(jnp.zeros((1, 4), jnp.int32), **kwargs)


def test_ids_must_be_batch_by_time():
  with pytest.raises(ValueError, match="ref_ids_BxT"):
    hashing.reference_ngram_buckets(jnp.zeros((4,), jnp.int32))
