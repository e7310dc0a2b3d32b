"""Using ByteLM from outside the package: pure init/apply for plain JAX, and the Linen adapter."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

import bytescale.interop as interop
from bytescale import vocab
from tests.conftest import assert_close, tiny_bytelm_config


def test_pure_init_apply_train_step(rng):
  config = tiny_bytelm_config()
  params = interop.init(jax.random.key(0), config)
  assert isinstance(params, dict)
  ids = jnp.asarray(rng.integers(0, 256, size=(2, 10)), jnp.int32)
  logits = jax.jit(lambda p, x: interop.apply(p, x, config))(params, ids)
  assert logits.shape == (2, 10, vocab.VOCAB_SIZE)

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
