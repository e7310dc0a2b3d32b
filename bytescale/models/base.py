"""The protocol every bytescale model speaks, and the registry the CLI and training loop use.

Every model offers:

* ``__call__(bytes_BxT, segment_ids_BxT=None, *, patches=None) -> ModelOutput``: next-byte logits and the
  byte-level hidden states they are read from (multi-token heads reuse them);
* ``unembed(hidden_BxTxD) -> logits_BxTxV``: the output projection, shared with multi-token heads;
* ``init_cache(batch, max_len)`` and ``decode(cache, bytes_BxN) -> (ModelOutput, cache)``: N >= 1 bytes per
  row appended at once (speculative verification feeds several);
* ``rollback(cache, n_B) -> cache``: forget the last ``n_B`` bytes of each row (rejected draft bytes).

``bytes_BxT`` are token ids (see ``bytescale.vocab``); ``segment_ids_BxT`` number the documents packed in a
row (0 = padding); tokens never attend across documents.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax


class ModelOutput(NamedTuple):
  logits_BxTxV: jax.Array
  hidden_BxTxD: jax.Array


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  name: str
  config_type: type
  model_type: type
  description: str


MODELS: dict[str, ModelSpec] = {}


def register_model(name: str, config_type: type, model_type: type, presets: dict[str, Any], description: str):
  from bytescale import configs

  MODELS[name] = ModelSpec(name, config_type, model_type, description)
  configs.register_config_type(config_type)
  configs.register_presets(name, presets)


def model_name_for(config) -> str:
  for spec in MODELS.values():
    if isinstance(config, spec.config_type):
      return spec.name
  raise ValueError(f"no registered model uses {type(config).__name__}")


def build_model(config, *, seed: int = 0):
  """Instantiates the registered model class for ``config``."""
  from flax import nnx

  return MODELS[model_name_for(config)].model_type(config, rngs=nnx.Rngs(seed))
