"""The one table of models: name -> config type, model type, presets, FLOP counter.

Everything that picks a model by name or by config (the CLI, the training loop, checkpoints, interop, FLOP
counting) reads this table; nothing registers itself on import. A new model adds one row here, its config
type to ``CONFIG_TYPES`` (so saved configs load) and, if it has byte-level states for multi-token heads, its
byte stack to ``mtp.BYTE_STACK_PATHS``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

from flax import nnx

from bytescale import configs, flops
from bytescale.models import blt, bytelm, megabyte, mtp
from bytescale.ops.rope import RopeConfig
from bytescale.patching import PatchingConfig


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  name: str
  config_type: type
  model_type: type
  presets: Mapping[str, Any]
  # flops(config, seq_len, *, convention, attention) -> flops.FlopCount
  flops: Callable[..., flops.FlopCount]
  description: str


def _mtp_flops(config: mtp.MultiTokenConfig, seq_len: int, *, convention="exact", attention="causal"):
  trunk = flops_per_byte(config.effective_trunk, seq_len, convention=convention, attention=attention)
  return mtp.flops_per_byte(config, seq_len, trunk, convention=convention, attention=attention)


MODELS: dict[str, ModelSpec] = {
    "bytelm": ModelSpec("bytelm", configs.ByteLMConfig, bytelm.ByteLM, bytelm.PRESETS, bytelm.flops_per_byte,
                        "plain byte-level decoder-only transformer (the baseline)"),
    "megabyte": ModelSpec("megabyte", megabyte.MegaByteConfig, megabyte.MegaByte, megabyte.PRESETS,
                          megabyte.flops_per_byte,
                          "MegaByte: global transformer over fixed patches of P bytes, local transformer inside each "
                          "patch"),
    "blt": ModelSpec("blt", blt.BLTConfig, blt.BLT, blt.PRESETS, blt.flops_per_byte,
                     "Byte Latent Transformer: entropy/space/strided patches, hash n-gram embeddings, local enc/dec"),
    "mtp": ModelSpec("mtp", mtp.MultiTokenConfig, mtp.MultiTokenLM, {}, _mtp_flops,
                     "multi-token prediction heads on any trunk model (built with --set mtp_heads=N)"),
}

# Every config class a saved run's JSON may name (``configs.to_dict`` writes ``"__type__"``).
CONFIG_TYPES: dict[str, type] = {cls.__name__: cls for cls in (
    configs.TransformerConfig, configs.ByteLMConfig, configs.TrainConfig, RopeConfig, PatchingConfig,
    megabyte.MegaByteConfig, blt.BLTConfig, mtp.MultiTokenConfig)}


def spec_for(config) -> ModelSpec:
  for spec in MODELS.values():
    if type(config) is spec.config_type:
      return spec
  raise ValueError(f"no model in bytescale.models.registry.MODELS uses {type(config).__name__}")


def model_name_for(config) -> str:
  return spec_for(config).name


def get_preset(model: str, preset: str):
  """The named preset config of a model (``--model``/``--preset``), with the choices named when unknown."""
  if model not in MODELS:
    raise configs.ConfigError(f"--model: unknown model {model!r}; choose one of {sorted(MODELS)}")
  presets = MODELS[model].presets
  if preset not in presets:
    hint = " (multi-token heads wrap another model: --set mtp_heads=N)" if not presets else ""
    raise configs.ConfigError(
        f"--preset: model {model!r} has no preset {preset!r}; choose one of {sorted(presets)}{hint}")
  return presets[preset]


def config_from_dict(data: dict):
  """A config saved with ``configs.to_dict`` (any model's), rebuilt and validated."""
  return configs.from_dict(data, CONFIG_TYPES)


def build_model(config, *, seed: int = 0, rngs: nnx.Rngs | None = None, entropy_lm=None):
  """The model for ``config`` (any registered config). ``entropy_lm``: BLT's trained entropy model (a ByteLM,
  e.g. from ``bytescale.train.checkpoint.load_entropy_model``), passed on to a BLT trunk of multi-token heads."""
  rngs = rngs if rngs is not None else nnx.Rngs(seed)
  if isinstance(config, mtp.MultiTokenConfig):
    trunk = build_model(config.effective_trunk, rngs=rngs, entropy_lm=entropy_lm)
    return mtp.MultiTokenLM(config, trunk=trunk, rngs=rngs)
  if isinstance(config, blt.BLTConfig):
    return blt.BLT(config, rngs=rngs, entropy_lm=entropy_lm)
  return spec_for(config).model_type(config, rngs=rngs)


def flops_per_byte(config, seq_len: int, *, convention: str = "exact", attention: str = "causal") -> flops.FlopCount:
  """FLOPs per byte of any registered model config (see ``bytescale.flops`` for the conventions)."""
  return spec_for(config).flops(config, seq_len, convention=convention, attention=attention)
