"""MegaByte: the paper's definition, causality and the patch shift, documents, padding, cached decoding, options,
overfitting, every byte value trained, the CLI end to end, and config validation."""

import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from bytescale.models import registry
from bytescale import configs, vocab
from bytescale.configs import ConfigError, TransformerConfig
from bytescale.generate import SamplingConfig, generate, prefill
from bytescale.models import MegaByte
from bytescale.models.megabyte import PRESETS, MegaByteConfig
from bytescale.ops import rope
from bytescale.ops.losses import masked_cross_entropy
from bytescale.ops.patches import num_local_positions
from tests.conftest import assert_close


def tiny_megabyte_config(patch_size=4, **options) -> MegaByteConfig:
  d_g = 8
  return MegaByteConfig(
      global_stack=TransformerConfig(d_model=patch_size * d_g, num_layers=2, num_heads=2, num_kv_heads=2,
                                     head_dim=8, mlp_hidden=48),
      local_stack=TransformerConfig(d_model=24, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=6,
                                    mlp_hidden=48),
      patch_size=patch_size, max_seq_len=64, **options,
  )


@jax.jit
def _forward(graphdef, state, ids, seg):
  return nnx.merge(graphdef, state)(ids, seg).logits_BxTxV


def jitted_forward(model):
  """The model's logits as a jitted function of (ids, segment ids); compiled once per architecture and shape."""
  graphdef, state = nnx.split(model)
  return lambda ids, seg=None: _forward(graphdef, state, ids, np.ones_like(ids) if seg is None else seg)


def random_ids(rng, b, t):
  # numpy, as are the edits below: eagerly, each jnp op would be compiled for its own shape.
  return rng.integers(0, 256, size=(b, t)).astype(np.int32)


def replaced(ids, index, values):
  """A copy of the numpy array ``ids`` with ``ids[index] = values``."""
  out = np.array(ids)
  out[index] = values
  return out


# Each option on, at patch sizes 3, 4 and 5 (so the decode tests cover lengths that are and are not multiples).
OPTIONS = {
    "default": dict(patch_size=4),
    "cross_patch": dict(patch_size=3, cross_patch_r=2),
    "strided_average": dict(patch_size=5, strided_inference="average"),
    "strided_paper": dict(patch_size=4, strided_inference="paper"),
    "per_position_and_local_pos": dict(patch_size=4, per_position_projection=True, local_pos_embed=True),
}


class Jitted:
  """A model with its forward, ``init_cache``, ``decode`` and ``generate.prefill`` jitted (compiled once per shape)."""

  def __init__(self, model):
    self.model = model
    graphdef, self.state = nnx.split(model)
    merge = lambda state: nnx.merge(graphdef, state)  # noqa: E731
    self._forward = jitted_forward(model)
    self._init = jax.jit(lambda state, batch, max_len: merge(state).init_cache(batch, max_len), static_argnums=(1, 2))
    self._decode = jax.jit(lambda state, cache, ids: _logits_and_cache(*merge(state).decode(cache, ids)))
    self._prefill = jax.jit(lambda state, ids, lengths, max_len: prefill(merge(state), ids, lengths, max_len)[:2],
                            static_argnums=3)

  def __call__(self, ids, seg):
    return self._forward(ids, seg)

  def init_cache(self, batch, max_len):
    return self._init(self.state, batch, max_len)

  def decode(self, cache, ids):
    return self._decode(self.state, cache, ids)

  def prefill(self, ids, lengths, max_len):
    return self._prefill(self.state, ids, lengths, max_len)


def _logits_and_cache(out, cache):
  return out.logits_BxTxV, cache


@pytest.fixture(scope="module", params=list(OPTIONS))
def option_model(request):
  model = MegaByte(tiny_megabyte_config(**OPTIONS[request.param]), rngs=nnx.Rngs(1))
  return request.param, model, Jitted(model)


@pytest.fixture(scope="module")
def model():
  return MegaByte(tiny_megabyte_config(), rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def forward(model):
  return jitted_forward(model)


# --- The paper's definition, written out independently ---------------------------------------------------------

def _rms(x, scale, eps):
  return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def paper_reference_logits(model, ids_1xT):
  """MegaByte as the paper writes it, for one document and no options, with a per-patch loop for the local model.

  The paper predicts z_j from z_<j; with z = the row, output t (after byte t) is the paper's prediction j = t + 1.
  """
  c = model.config
  p, d_g = c.patch_size, c.d_global_embed
  t = ids_1xT.shape[1]
  j = num_local_positions(t, p)
  k = j // p
  z = jnp.pad(ids_1xT[0], (0, j - t), constant_values=vocab.PAD)
  table = model.global_embed.table[...]
  byte_vectors = table[z] + model.global_pos[...][np.arange(j)]
  patches = byte_vectors.reshape(k, p * d_g)
  global_in = jnp.concatenate([model.pad_patch[...].reshape(1, p * d_g), patches[:-1]])  # the one-patch shift
  global_out = model.global_stack(global_in[None], jnp.arange(k)[None], jnp.ones((1, k), jnp.int32))[0]
  normed = _rms(global_out, model.global_norm.scale[...], c.global_stack.norm_eps)
  context = normed.reshape(k, p, d_g) @ model.w_gl[...]
  local_table = model.local_embed.table[...]
  layers = nnx.state(model.local_stack.blocks, nnx.Param)
  lc = c.local_stack
  outputs = []
  for patch in range(k):
    previous = [model.local_pad[...]] + [local_table[z[patch * p + i - 1]] for i in range(1, p)]
    x = context[patch] + jnp.stack(previous)
    positions = jnp.arange(p)[None]  # in-patch positions: RoPE is relative, so this equals any offset
    for layer in range(lc.num_layers):
      w = jax.tree.map(lambda a, layer=layer: a[layer], layers)
      h = _rms(x, w["attention_norm"]["scale"][...], lc.norm_eps)
      q = jnp.einsum("pd,dhk->phk", h, w["attention"]["wq"][...])
      key = jnp.einsum("pd,dgk->pgk", h, w["attention"]["wk"][...])
      value = jnp.einsum("pd,dgk->pgk", h, w["attention"]["wv"][...])
      q = rope.rotate(q[None], positions, lc.rope)[0]
      key = rope.rotate(key[None], positions, lc.rope)[0]
      repeat = lc.num_heads // lc.num_kv_heads
      key, value = jnp.repeat(key, repeat, axis=1), jnp.repeat(value, repeat, axis=1)
      scores = jnp.einsum("qhk,shk->hqs", q, key) / np.sqrt(lc.head_dim)
      scores = jnp.where(np.tril(np.ones((p, p), bool)), scores, -jnp.inf)
      attended = jnp.einsum("hqs,shk->qhk", jax.nn.softmax(scores, axis=-1), value)
      x = x + jnp.einsum("qhk,hkd->qd", attended, w["attention"]["wo"][...])
      h = _rms(x, w["mlp_norm"]["scale"][...], lc.norm_eps)
      gate, up = h @ w["mlp"]["w_gate"][...], h @ w["mlp"]["w_up"][...]
      x = x + (jax.nn.silu(gate) * up) @ w["mlp"]["w_down"][...]
    outputs.append(x)
  hidden = jnp.concatenate(outputs)
  logits = _rms(hidden, model.final_norm.scale[...], lc.norm_eps) @ model.unembedding[...]
  return logits[1:t + 1]


def test_forward_equals_the_papers_definition(model, forward, rng):
  ids = random_ids(rng, 1, 11)  # 12 local positions: exactly three patches
  graphdef, state = nnx.split(model)
  reference = jax.jit(lambda state, ids: paper_reference_logits(nnx.merge(graphdef, state), ids))
  expected = reference(state, ids)
  assert_close(forward(ids, np.ones_like(ids)), expected[None], atol=1e-4)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_shapes_and_dtypes(dtype, rng):
  config = tiny_megabyte_config()
  config = dataclasses.replace(config, global_stack=dataclasses.replace(config.global_stack, dtype=dtype),
                               local_stack=dataclasses.replace(config.local_stack, dtype=dtype))
  model = MegaByte(config, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  out = jax.jit(lambda state, ids: nnx.merge(graphdef, state)(ids))(state, random_ids(rng, 2, 10))
  assert out.logits_BxTxV.shape == (2, 10, vocab.VOCAB_SIZE)
  assert out.logits_BxTxV.dtype == jnp.float32
  assert out.hidden_BxTxD.shape == (2, 10, 24) and out.hidden_BxTxD.dtype == jnp.dtype(dtype)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
  assert_close(model.unembed(out.hidden_BxTxD), out.logits_BxTxV, atol=1e-4)


# --- Causality, the shift, documents, padding ----------------------------------------------------------------

def test_causality_at_every_position(option_model, rng):
  """Changing bytes after t never changes logits <= t, inside and across patches; byte t+1 does change t+1."""
  _, _, forward = option_model
  ids = random_ids(rng, 1, WIDTH)
  seg = np.ones_like(ids)
  base = np.asarray(forward(ids, seg))
  for t in range(WIDTH - 1):
    changed = replaced(ids, np.s_[0, t + 1:], (ids[0, t + 1:] + 1 + t) % 256)
    out = np.asarray(forward(changed, seg))
    np.testing.assert_array_equal(out[0, :t + 1], base[0, :t + 1], err_msg=f"t={t}")
    assert not np.allclose(out[0, t + 1], base[0, t + 1]), t


def test_the_global_model_sees_only_earlier_patches(rng):
  """The one-patch shift: with the local byte embeddings zeroed, outputs see bytes only through the global model,
  so byte i reaches exactly the outputs of later patches (local position t + 1 in patch k with kP > i), never
  the outputs of its own patch, not even those after it."""
  model = MegaByte(tiny_megabyte_config(), rngs=nnx.Rngs(2))
  model.local_embed.table[...] = jnp.zeros_like(model.local_embed.table[...])
  model.local_pad[...] = jnp.zeros_like(model.local_pad[...])
  forward = jitted_forward(model)
  p, t = 4, WIDTH
  ids = random_ids(rng, 1, t)
  seg = np.ones_like(ids)
  base = np.asarray(forward(ids, seg))
  patch_of_output = (np.arange(t) + 1) // p
  for i in range(t):
    out = np.asarray(forward(replaced(ids, (0, i), (ids[0, i] + 101) % 256), seg))
    unchanged = patch_of_output * p <= i
    np.testing.assert_array_equal(out[0, unchanged], base[0, unchanged], err_msg=f"byte {i}")
    if (~unchanged).any():
      assert not np.allclose(out[0, ~unchanged], base[0, ~unchanged]), i
  # The first patch's outputs are the same whatever the bytes are: its global input is the pad patch.
  other = np.asarray(forward(random_ids(rng, 1, t), seg))
  np.testing.assert_array_equal(other[0, :p - 1], base[0, :p - 1])


# Every single-row forward in this file has this width (one compilation per model), unless a test is about lengths.
WIDTH = 23
# Documents of lengths 5, 2, 9, 4 (boundaries inside patches, on a boundary, a document shorter than a patch),
# then 3 padding positions.
PACKED_SEGMENTS = [1] * 5 + [2] * 2 + [3] * 9 + [4] * 4 + [0] * 3


def test_documents_never_see_each_other(option_model, rng):
  """A document's logits do not depend on any byte of another document (or of padding), and do depend on
  the earlier bytes of their own document."""
  _, _, forward = option_model
  seg = np.asarray([PACKED_SEGMENTS], np.int32)
  ids = random_ids(rng, 1, seg.shape[1])
  base = np.asarray(forward(ids, seg))
  assert np.isfinite(base).all()
  for doc in (1, 2, 3, 4):
    own = seg[0] == doc
    changed = np.where(own[None], ids, (ids + 37) % 256)
    out = np.asarray(forward(changed, seg))
    np.testing.assert_array_equal(out[0, own], base[0, own], err_msg=f"document {doc}")
  for doc in (1, 3, 4):  # documents longer than one byte: the first byte reaches the last output
    first, last = np.flatnonzero(seg[0] == doc)[[0, -1]]
    out = np.asarray(forward(replaced(ids, (0, first), (ids[0, first] + 1) % 256), seg))
    assert not np.allclose(out[0, last], base[0, last]), doc


def test_first_document_and_padding_equal_the_document_alone(forward, rng):
  """Trailing padding (segment 0) and documents after the first change nothing for the first one."""
  ids = random_ids(rng, 1, WIDTH)
  seg = np.asarray([PACKED_SEGMENTS], np.int32)
  packed = forward(ids, seg)
  alone = forward(ids[:, :5], np.ones((1, 5), np.int32))
  assert_close(packed[:, :5], alone, atol=1e-5)


def test_any_length_is_padded_internally(forward, rng):
  """The first n outputs of a row equal the outputs of its first n bytes (n + 1 a multiple of P or not)."""
  ids = random_ids(rng, 1, WIDTH)
  full = np.asarray(forward(ids, np.ones_like(ids)))
  for n in (1, 4, 5, 11):
    assert_close(forward(ids[:, :n], np.ones((1, n), np.int32)), full[:, :n], atol=1e-5, what=f"n={n}")


def test_no_mask_depends_on_byte_values(forward, rng):
  """PAD, BOS and NUL ids inside a document are ordinary inputs: each changes the logits after it."""
  ids = random_ids(rng, 1, WIDTH)
  base = np.asarray(forward(ids, np.ones_like(ids)))
  for value in (0, vocab.PAD, vocab.BOS):
    out = np.asarray(forward(replaced(ids, (0, 5), value), np.ones_like(ids)))
    assert not np.allclose(out[0, 5:], base[0, 5:]), value


# --- Cached decoding ---------------------------------------------------------------------------------------

def single_row_logits(forward, seq):
  """The full forward of one row, padded to WIDTH with arbitrary bytes (they cannot change earlier logits)."""
  padded = np.pad(np.asarray(seq, np.int32), (0, WIDTH - len(seq)))[None]
  return np.asarray(forward(padded, np.ones_like(padded)))[0, :len(seq)]


# Chunk sizes shared by the decode tests (4 and 1: one compilation each); the lengths reached, 4 5 6 10 14,
# include multiples of every patch size used (3, 4, 5), and every chunk of 4 crosses a patch boundary.
CHUNKS = [(0, 4), (4, 5), (5, 6), (6, 10), (10, 14)]


def test_cached_decode_equals_forward(option_model, rng):
  """Appending 4, 1, 1, 4 and 4 bytes to the cache gives the teacher-forced forward's logits."""
  name, _, jitted = option_model
  ids = random_ids(rng, 3, 14)
  full = np.stack([single_row_logits(jitted, row) for row in ids])
  cache = jitted.init_cache(3, 24)
  pieces = []
  for start, stop in CHUNKS:
    logits, cache = jitted.decode(cache, ids[:, start:stop])
    pieces.append(np.asarray(logits))
  assert_close(np.concatenate(pieces, axis=1), full, atol=2e-5, what=name)
  assert np.asarray(cache.lengths_B).tolist() == [14, 14, 14]


def test_ragged_prefill_then_decode_and_rollback_across_patches(option_model, rng):
  """Rows of different lengths prefilled together (bytescale.generate.prefill), then decoding, then a rollback
  over patch boundaries and decoding again: every output equals the full forward of that row."""
  name, model, jitted = option_model
  own_logits = functools.partial(single_row_logits, jitted)
  ids = random_ids(rng, 3, 13)
  lengths = [13, 6, 9]
  cache, logits = jitted.prefill(ids, jnp.asarray(lengths), 24)
  logits = np.asarray(logits)  # rows are read below: numpy indexing compiles nothing
  for row, length in enumerate(lengths):
    assert_close(logits[row], own_logits(ids[row, :length])[-1], atol=2e-5, what=f"{name} prefill row {row}")
  extra = random_ids(rng, 3, 4)
  out, cache = jitted.decode(cache, extra)
  out = np.asarray(out)
  rows = [np.concatenate([ids[r, :n], extra[r]]) for r, n in enumerate(lengths)]
  for row, seq in enumerate(rows):
    assert_close(out[row], own_logits(seq)[-4:], atol=2e-5, what=f"{name} decode row {row}")
  # Roll back 9, 6 and 2 bytes (crossing patch boundaries), then append one byte.
  back = jnp.asarray([9, 6, 2])
  cache = model.rollback(cache, back)
  assert np.asarray(cache.lengths_B).tolist() == [len(s) - int(n) for s, n in zip(rows, back)]
  again = random_ids(rng, 3, 1)
  out, cache = jitted.decode(cache, again)
  out = np.asarray(out)
  for row, seq in enumerate(rows):
    kept = np.concatenate([seq[:len(seq) - int(back[row])], again[row]])
    assert_close(out[row], own_logits(kept)[-1:], atol=2e-5, what=f"{name} after rollback row {row}")


def test_greedy_generation_equals_argmax_of_full_forwards(model, forward):
  """bytescale.generate (prefill, one-byte decodes in a jitted loop) against re-running the whole forward."""
  prompts = [b"Hello", b"ab"]
  generated = generate(model, prompts, 9, sampling=SamplingConfig(temperature=0.0), stop_at_eos=False)
  for prompt, text in zip(prompts, generated):
    seq = [vocab.BOS] + list(prompt)
    expected = []
    for _ in range(9):
      logits = jnp.asarray(single_row_logits(forward, seq)[-1])
      logits = logits.at[jnp.asarray([vocab.BOS, vocab.PAD, vocab.RESERVED])].set(-jnp.inf)
      token = int(jnp.argmax(logits))
      expected.append(token)
      seq.append(token)
    assert text == vocab.decode(expected)


# --- Options -------------------------------------------------------------------------------------------------

def test_cross_patch_attention_sees_exactly_r_positions_of_the_previous_patch(rng):
  """Without global context (projection zeroed) and with one local layer, outputs of local patch k see the
  previous patch only through cross-patch attention: its last r local positions, whose inputs are bytes
  kP-r-1 .. kP-2. (With more layers the reach grows by a patch per layer, as in Transformer-XL.)"""
  p, k = 4, 2
  ids = random_ids(rng, 1, WIDTH)
  seg = np.ones_like(ids)
  patch_outputs = slice(k * p - 1, k * p + p - 1)  # outputs whose local positions are kP .. kP+P-1
  for r in (0, 2):
    config = tiny_megabyte_config(p, cross_patch_r=r)
    config = dataclasses.replace(config, local_stack=dataclasses.replace(config.local_stack, num_layers=1))
    model = MegaByte(config, rngs=nnx.Rngs(4))
    model.w_gl[...] = jnp.zeros_like(model.w_gl[...])
    forward = jitted_forward(model)
    base = np.asarray(forward(ids, seg))[0, patch_outputs]
    for byte in range(k * p - 4, k * p - 1):  # bytes kP-4 .. kP-2: inputs of local positions kP-3 .. kP-1
      out = np.asarray(forward(replaced(ids, (0, byte), (ids[0, byte] + 3) % 256), seg))[0, patch_outputs]
      seen = byte >= k * p - r - 1
      assert seen != np.allclose(out, base), (r, byte)


def two_passes_by_hand(plain_forward, ids, seg, offset):
  """Float64 log-probabilities of the aligned pass and of the pass over the row shifted right by ``offset``
  (leading PAD ids in segment 0), both from a model with strided inference off; output t predicts byte t + 1."""
  t = ids.shape[1]
  aligned = plain_forward(ids, seg)
  shifted_ids = np.pad(ids, ((0, 0), (offset, 0)), constant_values=vocab.PAD)
  shifted = plain_forward(shifted_ids, np.pad(seg, ((0, 0), (offset, 0))))[:, offset:offset + t]
  log_softmax = lambda x: np.asarray(jax.nn.log_softmax(np.asarray(x, np.float64), axis=-1))  # noqa: E731
  return log_softmax(aligned), log_softmax(shifted)


def test_strided_inference_average_mode_averages_two_offset_passes(rng):
  """"average": log of the mean probability of the two passes at every position."""
  config = tiny_megabyte_config(5)
  plain = MegaByte(config, rngs=nnx.Rngs(5))
  strided = MegaByte(dataclasses.replace(config, strided_inference="average"), rngs=nnx.Rngs(5))
  ids = random_ids(rng, 1, WIDTH)
  aligned, shifted = two_passes_by_hand(jitted_forward(plain), ids, np.ones_like(ids), 2)
  probs = (np.exp(aligned) + np.exp(shifted)) / 2
  assert_close(jax.nn.softmax(jitted_forward(strided)(ids)), probs, atol=1e-6)
  assert not np.allclose(np.exp(aligned), probs, atol=1e-3)


@pytest.mark.parametrize("patch_size", [4, 5])
def test_strided_inference_paper_mode_equals_brute_force_two_passes(patch_size, rng):
  """"paper" (MegaByte section 2.3): two passes, the second over the row shifted right by P // 2; each byte's
  prediction is taken from the pass in which that byte sits at the earlier position within its patch, so only
  the first half of every patch is used (P = 4: two positions per patch from each pass; P = 5: the first three
  of an aligned patch, the first two of a shifted one). Checked on packed documents; ``hidden`` is the chosen
  pass's state (``unembed(hidden)`` gives the logits)."""
  config = tiny_megabyte_config(patch_size)
  plain = MegaByte(config, rngs=nnx.Rngs(5))
  paper = MegaByte(dataclasses.replace(config, strided_inference="paper"), rngs=nnx.Rngs(5))
  seg = np.asarray([PACKED_SEGMENTS], np.int32)
  ids = random_ids(rng, 1, WIDTH)
  offset = patch_size // 2
  aligned, shifted = two_passes_by_hand(jitted_forward(plain), ids, seg, offset)
  expected = np.empty_like(aligned)
  for t in range(WIDTH):
    byte = t + 1  # the byte output t predicts, at position `byte` of the row's (aligned) patch grid
    position_aligned, position_shifted = byte % patch_size, (byte + offset) % patch_size
    assert min(position_aligned, position_shifted) < -(-patch_size // 2)  # the first half of a patch
    expected[0, t] = aligned[0, t] if position_aligned < position_shifted else shifted[0, t]
  graphdef, state = nnx.split(paper)
  out = jax.jit(lambda state, ids, seg: nnx.merge(graphdef, state)(ids, seg))(state, ids, seg)
  assert_close(jax.nn.log_softmax(out.logits_BxTxV), expected, atol=2e-5)
  assert_close(paper.unembed(out.hidden_BxTxD), out.logits_BxTxV, atol=1e-5)
  chose_shifted = np.abs(expected - shifted).max(axis=-1)[0] < np.abs(expected - aligned).max(axis=-1)[0]
  assert 0 < chose_shifted.sum() < WIDTH  # both passes contribute and differ where they do


def test_per_position_projection_generalises_the_shared_one(rng):
  """With every per-position matrix set to the shared matrix, the logits equal the shared model's; with
  different matrices they differ."""
  shared = MegaByte(tiny_megabyte_config(), rngs=nnx.Rngs(6))
  per_position = MegaByte(tiny_megabyte_config(per_position_projection=True), rngs=nnx.Rngs(6))
  for name in ("global_embed", "global_stack", "global_norm", "local_embed", "local_stack", "final_norm"):
    nnx.update(getattr(per_position, name), nnx.state(getattr(shared, name)))
  for name in ("global_pos", "pad_patch", "local_pad", "unembedding"):
    getattr(per_position, name)[...] = getattr(shared, name)[...]
  ids = random_ids(rng, 2, 10)
  per_position.w_gl[...] = jnp.broadcast_to(shared.w_gl[...], per_position.w_gl.shape)
  expected = jitted_forward(shared)(ids)
  assert_close(jitted_forward(per_position)(ids), expected, atol=1e-5)
  per_position.w_gl[...] = per_position.w_gl[...].at[1].multiply(-1.0)
  assert not np.allclose(jitted_forward(per_position)(ids), expected, atol=1e-3)


def test_local_position_embedding_is_added_per_in_patch_position(rng):
  """Adding a vector to pos_local[p] changes exactly the outputs at in-patch position p and later ones."""
  model = MegaByte(tiny_megabyte_config(**OPTIONS["per_position_and_local_pos"]), rngs=nnx.Rngs(7))
  ids = random_ids(rng, 1, WIDTH)
  base = np.asarray(jitted_forward(model)(ids))
  model.local_pos[...] = model.local_pos[...].at[2].add(1.0)
  out = np.asarray(jitted_forward(model)(ids))
  in_patch = (np.arange(WIDTH) + 1) % 4
  np.testing.assert_array_equal(out[0, in_patch < 2], base[0, in_patch < 2])
  assert not np.allclose(out[0, in_patch == 2], base[0, in_patch == 2])


# --- Training -------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trainer():
  """Adam on a tiny model; ``step(params, opt_state, inputs, targets, mask) -> (params, opt_state, loss, grads)``."""
  graphdef, params = nnx.split(MegaByte(tiny_megabyte_config(), rngs=nnx.Rngs(0)), nnx.Param)
  optimizer = optax.adam(2e-2)

  @jax.jit
  def step(params, opt_state, inputs, targets, mask):
    def loss_fn(p):
      nll, count = masked_cross_entropy(nnx.merge(graphdef, p)(inputs).logits_BxTxV, targets, mask)
      return nll / count
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = optimizer.update(grads, opt_state)
    return optax.apply_updates(params, updates), opt_state, loss, grads

  return params, optimizer.init(params), step


def test_overfits_a_tiny_batch(trainer, rng):
  params, opt_state, step = trainer
  ids = random_ids(rng, 2, 17)
  inputs, targets = ids[:, :-1], ids[:, 1:]
  mask = np.ones_like(targets, np.float32)
  for _ in range(120):
    params, opt_state, loss, _ = step(params, opt_state, inputs, targets, mask)
  assert float(loss) < 0.05, float(loss)


def test_nul_bytes_are_trained(trainer, rng):
  """The loss at NUL targets alone is positive and has a gradient; only loss_mask removes a position."""
  params, opt_state, step = trainer
  ids = replaced(random_ids(rng, 2, 17), np.s_[:, 3:9], 0)
  inputs, targets = ids[:, :-1], ids[:, 1:]
  only_nul = (targets == 0).astype(np.float32)
  _, _, loss, grads = step(params, opt_state, inputs, targets, only_nul)
  assert float(loss) > 0
  assert sum(float(np.sum(np.square(g))) for g in jax.tree.leaves(grads)) > 0  # the gradient's squared norm
  _, count = masked_cross_entropy(jnp.zeros((2, 16, vocab.VOCAB_SIZE)), targets, only_nul)
  assert float(count) >= 12  # every NUL target counted


@pytest.mark.slow  # about 30 s of CPU: the whole train loop, orbax checkpoint and sampler compile
def test_cli_train_and_generate_end_to_end(tmp_path, capsys):
  from bytescale.cli import main

  data = tmp_path / "corpus.txt"
  data.write_bytes(b"To be, or not to be, that is the question.\x00\n" * 80)
  out = str(tmp_path / "run")
  argv = ["train", "--model", "megabyte", "--preset", "tiny", "--steps", "3", "--data", str(data), "--out", out,
          "--batch-size", "2", "--seq-len", "30", "--no-progress", "--set", "cross_patch_r=1",
          "--set", "global_stack.num_layers=1", "--set", "local_stack.num_layers=1"]
  assert main(argv) == 0
  summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert summary["model"] == "megabyte" and summary["steps"] == 3 and 0 < summary["val_bpb"] < 12
  assert main(["generate", "--ckpt", out, "--prompt", "To be", "--max-bytes", "6", "--json", "--temperature", "0"]) == 0
  result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert result["model"] == "megabyte" and result["bytes"] <= 6
  # bytescale eval --strided: the checkpoint's own setting (none) unless asked; each mode scores every byte.
  scores = {}
  for mode in (None, "none", "paper", "average"):
    assert main(["eval", "--ckpt", out, "--data", str(data), "--max-bytes", "600"]
                + ([] if mode is None else ["--strided", mode])) == 0
    scores[mode] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert scores[mode]["strided_inference"] == (mode or "none") and scores[mode]["bytes"] == 601
  assert scores[None]["bpb"] == scores["none"]["bpb"]
  assert len({scores[mode]["bpb"] for mode in ("none", "paper", "average")}) == 3


# --- Configs and presets -------------------------------------------------------------------------------------

@pytest.mark.parametrize("changes,field", [
    ({"patch_size": 0}, "patch_size"),
    ({"patch_size": 3}, "global_stack.d_model"),
    ({"cross_patch_r": 5}, "cross_patch_r"),
    ({"cross_patch_r": -1}, "cross_patch_r"),
    ({"max_seq_len": 0}, "max_seq_len"),
    ({"local_pos_embed": 1}, "local_pos_embed"),
])
def test_bad_configs_name_the_field(changes, field):
  with pytest.raises(ConfigError, match=f"MegaByteConfig.{field}"):
    dataclasses.replace(tiny_megabyte_config(), **changes)


def test_bad_option_combinations_name_the_field():
  with pytest.raises(ConfigError, match="MegaByteConfig.strided_inference.*patch_size >= 3"):
    tiny_megabyte_config(2, strided_inference="paper")
  config = tiny_megabyte_config()
  dynamic = dataclasses.replace(config.local_stack,
                                rope=rope.RopeConfig(rope_type="dynamic", factor=2.0,
                                                     original_max_position_embeddings=8))
  with pytest.raises(ConfigError, match="MegaByteConfig.local_stack.rope.rope_type"):
    dataclasses.replace(config, local_stack=dynamic)


def test_strided_inference_modes_and_configs_saved_with_a_bool():
  """The mode is one of none/paper/average (a clear error otherwise, also for `--set strided_inference=true`);
  a config saved when the field was a bool loads with the behaviour it had: true -> average, false -> none."""
  config = tiny_megabyte_config(5)
  for bad in ("bogus", "true", 1):
    with pytest.raises(ConfigError, match="MegaByteConfig.strided_inference: must be 'none', 'paper'"):
      dataclasses.replace(config, strided_inference=bad)
  with pytest.raises(ConfigError, match="MegaByteConfig.strided_inference"):
    configs.replace_path(config, "strided_inference", "true")
  assert configs.replace_path(config, "strided_inference", "paper").strided_inference == "paper"
  saved = json.loads(json.dumps(configs.to_dict(config)))
  for old_value, mode in ((True, "average"), (False, "none")):
    loaded = registry.config_from_dict({**saved, "strided_inference": old_value})
    assert loaded == dataclasses.replace(config, strided_inference=mode)


@pytest.mark.parametrize("mode", ["paper", "average"])
def test_strided_inference_flops_match_what_runs(mode):
  """XLA's cost analysis of the compiled forward against ``flops_per_byte`` (the harness of tests/test_flops.py):
  both modes run two passes; "paper" unembeds once per byte (one pass's state is chosen first), "average" twice
  (a count with one unembedding too many is about 3.5% too high here, beyond the check's 0.5% below 1)."""
  from tests.test_flops import abstract, assert_agrees, measured_forward, megabyte_config

  config = megabyte_config(4, strided_inference=mode)
  graphdef, state = abstract(lambda: MegaByte(config, rngs=nnx.Rngs(0)))
  assert_agrees(measured_forward(graphdef, state, 128), registry.flops_per_byte(config, 128, attention="dense").forward,
                mode)


def test_presets_and_serialisation():
  def count(config):
    abstract = nnx.eval_shape(lambda: MegaByte(config, rngs=nnx.Rngs(0)))
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))

  assert 20e6 < count(PRESETS["small"]) < 30e6
  paper = registry.get_preset("megabyte", "paper")
  assert (paper.global_stack.d_model, paper.global_stack.num_layers, paper.d_global_embed) == (2048, 14, 256)
  assert (paper.local_stack.d_model, paper.local_stack.num_layers, paper.patch_size, paper.max_seq_len) == (
      1024, 18, 8, 8192)
  for preset in ("tiny", "small", "paper"):
    config = registry.get_preset("megabyte", preset)
    assert registry.config_from_dict(json.loads(json.dumps(configs.to_dict(config)))) == config
  assert configs.replace_path(PRESETS["tiny"], "global_stack.num_layers", "3").global_stack.num_layers == 3
