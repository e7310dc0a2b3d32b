"""Rolling n-gram hashes (32-bit, document-aware) and BLT's hash n-gram embeddings, against plain Python."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bytescale.models import registry
from bytescale import vocab
from bytescale.models.blt import BLT
from bytescale.ops import hashing
from bytescale.patching import PatchingConfig
from tests.conftest import assert_close


def random_packed_row(rng, t):
  """Ids (bytes and specials) and segment ids of a few packed documents, maybe followed by padding."""
  ids = rng.integers(0, vocab.VOCAB_SIZE, size=t)
  lengths = rng.integers(1, 9, size=t)
  segs = np.repeat(np.arange(1, t + 1), lengths)[:t]
  pad = rng.integers(0, 4)
  if pad:
    segs[-pad:] = 0
  return ids, segs


def python_buckets(ids, segs, ngrams, buckets):
  """Per position and n: the bucket of the n-gram ending there, bytes before the document as OUTSIDE."""
  t = len(ids)
  out = np.zeros((t, len(ngrams)), np.int64)
  for pos in range(t):
    doc_start = pos  # padding (segment 0) belongs to no document: every earlier byte is OUTSIDE
    while segs[pos] != 0 and doc_start > 0 and segs[doc_start - 1] == segs[pos]:
      doc_start -= 1
    for k, n in enumerate(ngrams):
      gram = [int(ids[j]) if j >= doc_start else hashing.OUTSIDE for j in range(pos - n + 1, pos + 1)]
      out[pos, k] = hashing.ngram_hash_python(gram) % buckets
  return out


def test_buckets_match_plain_python(rng):
  ngrams, buckets = (1, 3, 4, 5, 6, 7, 8), 500_002
  rows = [random_packed_row(rng, 40) for _ in range(3)]
  ids = jnp.asarray(np.stack([r[0] for r in rows]), jnp.int32)
  segs = jnp.asarray(np.stack([r[1] for r in rows]), jnp.int32)
  got = np.asarray(jax.jit(lambda i, s: hashing.ngram_buckets(i, s, ngrams, buckets))(ids, segs))
  assert got.dtype == np.int32
  for row, (i, s) in enumerate(rows):
    np.testing.assert_array_equal(got[row], python_buckets(i, s, ngrams, buckets))


def test_hashes_use_32_bit_types_only():
  assert not jax.config.jax_enable_x64
  jaxpr = jax.make_jaxpr(lambda i: hashing.ngram_hashes(i))(jnp.zeros((1, 12), jnp.int32))
  dtypes = {str(v.aval.dtype) for eqn in jaxpr.eqns for v in eqn.outvars}
  assert not any("64" in d for d in dtypes), dtypes


def test_python_hash_wraps_like_uint32():
  # Large ids and long n-grams overflow 32 bits many times; the plain-Python value stays in range.
  value = hashing.ngram_hash_python([259] * 16)
  assert 0 <= value < 2**32
  got = hashing.ngram_hashes(jnp.full((1, 16), 259, jnp.int32), None, (16,))
  assert int(got[0, -1, 0]) == value


def test_documents_hash_the_same_alone_or_packed(rng):
  a, b = rng.integers(0, 256, size=9), rng.integers(0, 256, size=13)
  packed = jnp.asarray(np.concatenate([a, b])[None], jnp.int32)
  segs = jnp.asarray([[1] * 9 + [2] * 13])
  got = hashing.ngram_buckets(packed, segs, (3, 8), 4096)
  np.testing.assert_array_equal(got[:, 9:], hashing.ngram_buckets(jnp.asarray(b[None]), None, (3, 8), 4096))


def test_distinct_ngrams_rarely_collide(rng):
  grams = {tuple(rng.integers(0, 256, size=3)) for _ in range(2000)}
  ids = jnp.asarray(np.array(sorted(grams)), jnp.int32)  # each row ends with one distinct 3-gram
  buckets = np.asarray(hashing.ngram_buckets(ids, None, (3,), 65_536))[:, -1, 0]
  n = len(grams)
  expected_collisions = n - 65_536 * (1 - (1 - 1 / 65_536) ** n)
  assert n - len(set(buckets.tolist())) <= 3 * expected_collisions + 5


def test_hash_embeddings_match_plain_python(rng):
  """BLT's encoder input = (byte embedding + sum over n of table_n[bucket]) / sqrt(1 + #n), per position."""
  config = registry.get_preset("blt", "tiny")
  config = dataclasses.replace(config, patching=PatchingConfig("space"), hash_ngrams=(2, 3, 5), hash_buckets=97)
  model = BLT(config, rngs=nnx.Rngs(0))
  ids, segs = random_packed_row(rng, 30)
  got = np.asarray(model.embed_bytes(jnp.asarray(ids[None], jnp.int32), jnp.asarray(segs[None], jnp.int32)))[0]
  byte_table = np.asarray(model.byte_embed.table[...], np.float64)
  hash_table = np.asarray(model.hash_table[...], np.float64)
  buckets = python_buckets(ids, segs, config.hash_ngrams, config.hash_buckets)
  expected = np.zeros_like(got, np.float64)
  for pos in range(len(ids)):
    vector = byte_table[ids[pos]].copy()
    for k in range(len(config.hash_ngrams)):
      vector += hash_table[k * config.hash_buckets + buckets[pos, k]]
    expected[pos] = vector / np.sqrt(1 + len(config.hash_ngrams))
  assert_close(got, expected, atol=1e-5)
  assert model.hash_table.get_metadata()["out_sharding"] == ("hash_buckets", "embed")

