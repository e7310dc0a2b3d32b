"""Using ByteLM from outside the package: pure init/apply for plain JAX, and the Linen adapter."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import bytescale.interop as interop
from bytescale import vocab
from bytescale.models import ByteLM
from tests.conftest import assert_close, tiny_bytelm_config


def nnx_model_with(params, config):
  """A ByteLM carrying ``params`` (a pure dict), assembled here with NNX alone (not ``interop.bind``)."""
  model = ByteLM(config, rngs=nnx.Rngs(0))
  state = nnx.state(model)
  nnx.replace_by_pure_dict(state, params)
  nnx.update(model, state)
  return model


def test_pure_init_apply_train_step(rng):
  config = tiny_bytelm_config()
  params = interop.init(jax.random.key(0), config)
  assert isinstance(params, dict)
  # Exactly the arrays of the NNX model initialised with the same key; another key gives other arrays.
  model = ByteLM(config, rngs=nnx.Rngs(params=jax.random.key(0)))
  chex.assert_trees_all_equal(params, nnx.to_pure_dict(nnx.state(model)))
  other = interop.init(jax.random.key(1), config)
  chex.assert_trees_all_equal_shapes(other, params)
  assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(other), jax.tree.leaves(params)))
  ids = jnp.asarray(rng.integers(0, 256, size=(2, 10)), jnp.int32)
  logits = jax.jit(lambda p, x: interop.apply(p, x, config))(params, ids)
  assert logits.shape == (2, 10, vocab.VOCAB_SIZE)
  chex.assert_trees_all_close(logits, model(ids).logits_BxTxV, atol=1e-5)

  # A plain-JAX training step on the dict: loss goes down.
  def loss_fn(p):
    lg = interop.apply(p, ids[:, :-1], config)
    return optax.softmax_cross_entropy_with_integer_labels(lg, ids[:, 1:]).mean()

  optimizer = optax.adam(1e-2)
  opt_state = optimizer.init(params)

  @jax.jit
  def step(params, opt_state):
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = optimizer.update(grads, opt_state)
    return optax.apply_updates(params, updates), opt_state, loss

  params, opt_state, first = step(params, opt_state)
  for _ in range(20):
    params, opt_state, loss = step(params, opt_state)
  assert float(loss) < float(first)


def test_apply_equals_the_nnx_model(rng):
  from flax import nnx

  from bytescale.models import ByteLM

  config = tiny_bytelm_config()
  model = ByteLM(config, rngs=nnx.Rngs(4))
  params = nnx.to_pure_dict(nnx.state(model))
  ids = jnp.asarray(rng.integers(0, 256, size=(1, 7)), jnp.int32)
  assert_close(interop.apply(params, ids, config), model(ids).logits_BxTxV, atol=1e-6)


def test_linen_adapter_inside_a_linen_module(rng):
  import flax.linen as nn

  config = tiny_bytelm_config()

  class Classifier(nn.Module):
    """A Linen model of someone else's codebase using ByteLM as a submodule."""

    @nn.compact
    def __call__(self, ids):
      out = interop.to_linen(config)(ids)
      return nn.Dense(3)(out.hidden_BxTxD.mean(axis=1))

  ids = jnp.asarray(rng.integers(0, 256, size=(2, 6)), jnp.int32)
  variables = Classifier().init(jax.random.key(0), ids)
  scores = Classifier().apply(variables, ids)
  assert scores.shape == (2, 3) and np.isfinite(np.asarray(scores)).all()
  # The adapter's parameters have the NNX model's structure and shapes; with them, the NNX model gives the
  # adapter's logits, and its states (mean over bytes, then the Dense layer, by hand) the classifier's scores.
  params = nn.unbox(variables)["params"]
  (name,) = [key for key in params if key != "Dense_0"]
  lm_params, dense = params[name], params["Dense_0"]
  chex.assert_trees_all_equal_shapes(lm_params, interop.init(jax.random.key(0), config))
  model = nnx_model_with(lm_params, config)
  out = model(ids)
  adapter_logits = interop.to_linen(config).apply({"params": lm_params}, ids).logits_BxTxV
  chex.assert_trees_all_close(adapter_logits, out.logits_BxTxV, atol=1e-5)
  expected = out.hidden_BxTxD.mean(axis=1) @ dense["kernel"] + dense["bias"]
  chex.assert_trees_all_close(scores, expected, atol=1e-5)
