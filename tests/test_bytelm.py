"""ByteLM: shapes, causality, document isolation, cached decoding, overfitting, every byte value trained.

Most model calls go through ``jax.jit`` (``jitted``): eagerly, every op of the model would be compiled on its own."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from bytescale import vocab
from bytescale.generate import prefill
from bytescale.models import ByteLM
from bytescale.ops.losses import masked_cross_entropy
from tests.conftest import assert_close, tiny_bytelm_config


@pytest.fixture(scope="module")
def model(tiny_config):
  return ByteLM(tiny_config, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def forward(model):
  graphdef, params = nnx.split(model)
  return jax.jit(lambda ids, seg: nnx.merge(graphdef, params)(ids, seg).logits_BxTxV)


def random_ids(rng, b, t):
  # numpy, as are the edits below: eagerly, each jnp op would be compiled for its own shape.
  return rng.integers(0, 256, size=(b, t)).astype(np.int32)


def jitted(model, method):
  """``method(model, *args)`` jitted with the model's state as an argument (``model`` itself is left unchanged)."""
  graphdef, state = nnx.split(model)
  call = jax.jit(lambda state, *args: method(nnx.merge(graphdef, state), *args))
  return lambda *args: call(state, *args)


def decode_logits(model, cache, ids):
  out, cache = model.decode(cache, ids)
  return out.logits_BxTxV, cache


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_shapes_and_dtypes(dtype, rng):
  model = ByteLM(tiny_bytelm_config(dtype=dtype), rngs=nnx.Rngs(0))
  out = nnx.jit(lambda model, ids: model(ids))(model, random_ids(rng, 2, 12))
  assert out.logits_BxTxV.shape == (2, 12, vocab.VOCAB_SIZE)
  assert out.logits_BxTxV.dtype == jnp.float32
  assert out.hidden_BxTxD.dtype == jnp.dtype(dtype)
  params = nnx.state(model, nnx.Param)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))


def test_causality(forward, rng):
  ids = random_ids(rng, 1, 24)
  seg = np.ones_like(ids)
  base = np.asarray(forward(ids, seg))
  for t in (0, 7, 15, 22):
    changed = ids.copy()
    changed[0, t + 1:] = (ids[0, t + 1:] + 1) % 256
    out = np.asarray(forward(changed, seg))
    np.testing.assert_array_equal(out[0, : t + 1], base[0, : t + 1])
    assert not np.allclose(out[0, t + 1:], base[0, t + 1:])


def test_documents_do_not_see_each_other(forward, rng):
  """A packed row gives each document exactly the logits it gets alone."""
  a, b = random_ids(rng, 1, 10), random_ids(rng, 1, 14)
  packed = np.concatenate([a, b], axis=1)
  seg = np.asarray([[1] * 10 + [2] * 14], np.int32)
  out = np.asarray(forward(packed, seg))
  assert_close(out[:, :10], forward(a, np.ones_like(a)), atol=1e-5)
  assert_close(out[:, 10:], forward(b, np.ones_like(b)), atol=1e-5)


@pytest.mark.parametrize("window", [None, 5])
def test_cached_decode_equals_forward(window, rng):
  model = ByteLM(tiny_bytelm_config(window=window), rngs=nnx.Rngs(3))
  ids = random_ids(rng, 2, 21)
  full = np.asarray(jitted(model, lambda m, ids: m(ids).logits_BxTxV)(ids))
  cache = model.init_cache(2, 32)
  decode = jitted(model, decode_logits)
  pieces = []
  for start, stop in [(0, 6), (6, 7), (7, 15), (15, 21)]:
    logits, cache = decode(cache, ids[:, start:stop])
    pieces.append(np.asarray(logits))
  assert_close(np.concatenate(pieces, axis=1), full, atol=2e-5)
  assert np.asarray(cache.lengths_B).tolist() == [21, 21]


def test_ragged_prefill_and_rollback(model, forward, rng):
  """Rows of different lengths in one batch: each row's next-byte logits equal its own full forward."""
  ids = random_ids(rng, 3, 12)
  lengths = jnp.array([12, 5, 9])
  cache, logits = jitted(model, lambda m, ids, lengths: prefill(m, ids, lengths, 16)[:2])(ids, lengths)
  logits = np.asarray(logits)
  for row, length in enumerate([12, 5, 9]):
    own = np.asarray(forward(ids[row: row + 1, :length], np.ones((1, length), np.int32)))
    assert_close(logits[row], own[0, -1], atol=2e-5)
  # Continue decoding one byte per row after the rollback: equal to the full forward on the extended row.
  nxt = np.array([[7], [8], [9]], np.int32)
  logits, _ = jitted(model, decode_logits)(cache, nxt)
  logits = np.asarray(logits)
  for row, length in enumerate([12, 5, 9]):
    extended = np.concatenate([ids[row: row + 1, :length], nxt[row: row + 1]], axis=1)
    assert_close(logits[row, 0], np.asarray(forward(extended, np.ones_like(extended)))[0, -1], atol=2e-5)


def test_generate_reuses_its_compiled_sampler_and_reads_the_new_weights(tiny_config):
  """A second model of the same structure hits the sampler cache, yet its greedy bytes are its own: the argmax of
  re-running its full forward (weights are arguments of the cached program, never baked-in constants)."""
  from bytescale import generate as gen

  sampling = gen.SamplingConfig(temperature=0.0)
  gen.generate(ByteLM(tiny_config, rngs=nnx.Rngs(1)), [b"ab"], 6, sampling=sampling, stop_at_eos=False)
  other = ByteLM(tiny_config, rngs=nnx.Rngs(2))
  hits = gen._cached_sampler.cache_info().hits
  (text,) = gen.generate(other, [b"ab"], 6, sampling=sampling, stop_at_eos=False)
  assert gen._cached_sampler.cache_info().hits == hits + 1
  seq = [vocab.BOS, ord("a"), ord("b")]
  for _ in range(6):
    logits = other(jnp.asarray([seq], jnp.int32)).logits_BxTxV[0, -1]
    seq.append(int(jnp.argmax(logits.at[jnp.asarray([vocab.BOS, vocab.PAD, vocab.RESERVED])].set(-jnp.inf))))
  assert text == vocab.decode(seq[3:])


def test_scan_and_unrolled_layers_agree(rng):
  scanned = ByteLM(tiny_bytelm_config(), rngs=nnx.Rngs(5))
  unrolled = ByteLM(tiny_bytelm_config(scan_layers=False), rngs=nnx.Rngs(5))
  ids = random_ids(rng, 2, 9)
  logits = lambda m, ids: m(ids).logits_BxTxV  # noqa: E731
  assert_close(jitted(unrolled, logits)(ids), jitted(scanned, logits)(ids), atol=1e-5)


@pytest.mark.parametrize("remat", ["full", "dots"])
def test_remat_gives_identical_gradients(remat, rng):
  ids = random_ids(rng, 2, 9)

  def grads(config):
    model = ByteLM(config, rngs=nnx.Rngs(7))
    graphdef, params = nnx.split(model, nnx.Param)
    loss = lambda p: jnp.mean(nnx.merge(graphdef, p)(ids).logits_BxTxV ** 2)
    return jax.jit(jax.grad(loss))(params)

  base, remat_grads = grads(tiny_bytelm_config()), grads(tiny_bytelm_config(remat=remat))
  for a, b in zip(jax.tree.leaves(base), jax.tree.leaves(remat_grads)):
    assert_close(b, a, atol=1e-6)


def test_overfits_a_tiny_batch(rng):
  config = tiny_bytelm_config()
  model = ByteLM(config, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model, nnx.Param)
  ids = random_ids(rng, 2, 16)
  inputs, targets = ids[:, :-1], ids[:, 1:]
  mask = jnp.ones_like(targets, jnp.float32)
  optimizer = optax.adam(1e-2)
  opt_state = optimizer.init(params)

  @jax.jit
  def step(params, opt_state):
    def loss_fn(p):
      nll, count = masked_cross_entropy(nnx.merge(graphdef, p)(inputs).logits_BxTxV, targets, mask)
      return nll / count
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = optimizer.update(grads, opt_state)
    return optax.apply_updates(params, updates), opt_state, loss

  for _ in range(300):
    params, opt_state, loss = step(params, opt_state)
  assert float(loss) < 0.05, float(loss)


def test_nul_bytes_are_trained(model):
  """The loss at a NUL target is counted and has a gradient; only loss_mask removes a position."""
  graphdef, params = nnx.split(model, nnx.Param)
  inputs = jnp.array([[vocab.BOS, 65, 0, 0, 66]])
  targets = jnp.array([[65, 0, 0, 66, vocab.EOS]])

  def loss_at(mask):
    def f(p):
      nll, _ = masked_cross_entropy(nnx.merge(graphdef, p)(inputs).logits_BxTxV, targets, mask)
      return nll
    return f

  only_nul = jnp.array([[0, 1, 1, 0, 0]], jnp.float32)
  value, grads = jax.jit(jax.value_and_grad(loss_at(only_nul)))(params)
  assert float(value) > 0
  assert sum(float(np.sum(np.square(g))) for g in jax.tree.leaves(grads)) > 0  # the gradient's squared norm
  _, count = masked_cross_entropy(jnp.zeros((1, 5, vocab.VOCAB_SIZE)), targets, jnp.ones((1, 5)))
  assert float(count) == 5


def test_config_dtypes_are_validated():
  from bytescale.configs import ConfigError

  with pytest.raises(ConfigError, match="TransformerConfig.dtype"):
    tiny_bytelm_config(dtype="float16")
  with pytest.raises(ConfigError, match="num_kv_heads.*divide"):
    dataclasses.replace(tiny_bytelm_config().stack, num_kv_heads=3)
