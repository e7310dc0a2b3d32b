"""Using bytescale models from plain JAX or Linen code.

* ``init(rng, config) -> params`` and ``apply(params, bytes_BxT, config, segment_ids_BxT=None) -> logits``:
  params are a plain nested dict of arrays (``nnx.to_pure_dict`` of every model variable), usable with any
  optimizer or checkpointer.
* ``to_linen(config)``: a ``flax.linen`` module (via ``nnx.bridge.to_linen``) whose ``init``/``apply`` return
  and take Linen variables; ``apply`` returns the model's ``ModelOutput``.
"""

from __future__ import annotations

import jax
from flax import nnx

from bytescale.models import registry


def _build(config, *, rngs: nnx.Rngs):
  return registry.build_model(config, rngs=rngs)


def init(rng: jax.Array, config) -> dict:
  """Fresh parameters of the model described by ``config``, as a nested dict of arrays."""
  model = _build(config, rngs=nnx.Rngs(params=rng))
  return nnx.to_pure_dict(nnx.state(model))


def _abstract_model(config):
  return nnx.eval_shape(lambda: _build(config, rngs=nnx.Rngs(0)))


def bind(params: dict, config):
  """An NNX model of ``config`` carrying ``params`` (a dict from ``init`` or a training run)."""
  graphdef, state = nnx.split(_abstract_model(config))
  nnx.replace_by_pure_dict(state, params)
  return nnx.merge(graphdef, state)


def apply(params: dict, bytes_BxT, config, segment_ids_BxT=None):
  """Next-byte logits ``BxTxV`` (float32). Pure: jit it, grad it, vmap it."""
  return bind(params, config)(bytes_BxT, segment_ids_BxT).logits_BxTxV


def to_linen(config):
  """A Linen module wrapping the model; ``module.init(rng, bytes)`` / ``module.apply(variables, bytes)``."""
  return nnx.bridge.to_linen(_build, config)
