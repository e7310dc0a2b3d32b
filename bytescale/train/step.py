"""Loss, train step and eval step as pure functions over the train state."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from bytescale.ops.losses import bits_per_byte, masked_cross_entropy
from bytescale.train.state import TrainState

LossFn = Callable[[nnx.Module, dict], tuple[jax.Array, dict]]


def next_byte_loss(model, batch):
  """Mean next-byte cross-entropy over ``loss_mask``; metrics hold the sums so eval can aggregate exactly.

  A model with its own training loss (``model.loss(batch)``, e.g. multi-token heads) is trained with it."""
  if callable(getattr(model, "loss", None)):
    return model.loss(batch)
  output = model(batch["inputs"], batch["segment_ids"])
  nll_sum, count = masked_cross_entropy(output.logits_BxTxV, batch["targets"], batch["loss_mask"])
  loss = nll_sum / jnp.maximum(count, 1.0)
  return loss, {"nll_sum": nll_sum, "count": count}


def make_train_step(graphdef, optimizer: optax.GradientTransformation, loss_fn: LossFn = next_byte_loss):
  def train_step(state: TrainState, batch):
    def compute_loss(params):
      return loss_fn(nnx.merge(graphdef, params, state.frozen), batch)

    (loss, aux), grads = jax.value_and_grad(compute_loss, has_aux=True)(state.params)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {
        "loss": loss,
        "bpb": bits_per_byte(aux["nll_sum"], aux["count"]),
        "grad_norm": optax.tree.norm(grads),
        **{k: v for k, v in aux.items() if k not in ("nll_sum", "count")},
    }
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return train_step


def make_eval_step(graphdef, loss_fn: LossFn = next_byte_loss):
  def eval_step(params, frozen, batch):
    _, aux = loss_fn(nnx.merge(graphdef, params, frozen), batch)
    return aux["nll_sum"], aux["count"]

  return eval_step
