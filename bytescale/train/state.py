"""Train state as plain pytrees: the model's graph definition is static, parameters and optimizer state flow
through ``jax.jit`` (far less per-step overhead than ``nnx.jit``)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from bytescale.configs import TrainConfig


@struct.dataclass
class TrainState:
  """``params`` are trained; ``frozen`` holds every other model variable (e.g. a frozen entropy model)."""

  step: jax.Array
  params: nnx.State
  opt_state: optax.OptState
  frozen: nnx.State

  def model(self, graphdef):
    return nnx.merge(graphdef, self.params, self.frozen)


def learning_rate_schedule(config: TrainConfig):
  """Linear warmup to ``learning_rate`` then cosine decay to ``min_lr_ratio * learning_rate``."""
  warmup = min(config.warmup_steps, max(config.steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=config.learning_rate, warmup_steps=warmup,
      decay_steps=max(config.steps, warmup + 1), end_value=config.learning_rate * config.min_lr_ratio,
  )


def make_optimizer(config: TrainConfig) -> optax.GradientTransformation:
  """AdamW with global-norm clipping; no weight decay on vectors (norm scales)."""
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)  # noqa: E731
  return optax.chain(
      optax.clip_by_global_norm(config.grad_clip),
      optax.adamw(
          learning_rate_schedule(config), b1=config.b1, b2=config.b2,
          weight_decay=config.weight_decay, mask=decay_mask,
      ),
  )


def init_train_state(model: nnx.Module, optimizer: optax.GradientTransformation):
  """Splits ``model`` into its static graph and a ``TrainState``."""
  graphdef, params, frozen = nnx.split(model, nnx.Param, ...)
  params = jax.tree.map(jnp.asarray, params)
  return graphdef, TrainState(
      step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params), frozen=frozen
  )
