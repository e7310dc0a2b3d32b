"""Frozen, validated configuration dataclasses and named presets.

Every config validates itself on construction: a bad value raises ``ConfigError`` naming the field and what
would fix it. Configs nest (a model config holds ``TransformerConfig`` stacks); ``replace_path`` sets a field by
dotted path (``global_stack.num_layers``) or by a bare name when that name is unique in the tree, which is
what ``bytescale train --set field=value`` uses.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from typing import Any

from bytescale.ops.attention import ATTENTION_IMPLS
from bytescale.ops.rope import RopeConfig, rope_config_from_scaling

REMAT_POLICY_NAMES = ("none", "full", "dots", "dots_no_batch")  # what each does: nn.transformer.REMAT_POLICIES
DTYPES = ("float32", "bfloat16")


class ConfigError(ValueError):
  """A configuration value is invalid; the message names the field and the fix."""


def check(condition: bool, owner: str, field: str, message: str):
  if not condition:
    raise ConfigError(f"{owner}.{field}: {message}")


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
  """A stack of pre-norm decoder blocks (RMSNorm, attention with grouped KV heads and RoPE, SwiGLU)."""

  d_model: int = 64
  num_layers: int = 2
  num_heads: int = 4
  num_kv_heads: int = 4
  head_dim: int = 16
  mlp_hidden: int = 192
  window: int | None = None  # sliding-window attention span (None = full causal)
  rope: RopeConfig = dataclasses.field(default_factory=RopeConfig)
  norm_eps: float = 1e-5
  remat: str = "none"
  scan_layers: bool = True
  attention_impl: str = "auto"
  dtype: str = "float32"  # compute dtype; parameters are always float32

  def __post_init__(self):
    name = "TransformerConfig"
    for field in ("d_model", "num_layers", "num_heads", "num_kv_heads", "head_dim", "mlp_hidden"):
      value = getattr(self, field)
      check(isinstance(value, int) and value > 0, name, field, f"must be a positive integer, got {value!r}")
    check(
        self.num_heads % self.num_kv_heads == 0, name, "num_kv_heads",
        f"must divide num_heads ({self.num_heads}), got {self.num_kv_heads}",
    )
    check(self.head_dim % 2 == 0, name, "head_dim", f"must be even for RoPE, got {self.head_dim}")
    check(self.window is None or self.window > 0, name, "window", f"must be None or > 0, got {self.window}")
    check(self.norm_eps > 0, name, "norm_eps", f"must be > 0, got {self.norm_eps}")
    check(self.remat in REMAT_POLICY_NAMES, name, "remat", f"must be one of {REMAT_POLICY_NAMES}, got {self.remat!r}")
    check(self.dtype in DTYPES, name, "dtype", f"must be one of {DTYPES}, got {self.dtype!r}")
    check(
        self.attention_impl in ATTENTION_IMPLS, name, "attention_impl",
        f"must be one of {ATTENTION_IMPLS}, got {self.attention_impl!r}",
    )

  def num_params(self) -> int:
    per_layer = (
        2 * self.d_model  # norms
        + self.d_model * self.head_dim * (self.num_heads * 2 + self.num_kv_heads * 2)
        + 3 * self.d_model * self.mlp_hidden
    )
    return self.num_layers * per_layer


@dataclasses.dataclass(frozen=True)
class ByteLMConfig:
  """The plain byte-level decoder-only transformer (the baseline every multiscale model is measured against)."""

  stack: TransformerConfig = dataclasses.field(default_factory=TransformerConfig)
  max_seq_len: int = 256
  tie_embeddings: bool = False

  def __post_init__(self):
    check(self.max_seq_len > 0, "ByteLMConfig", "max_seq_len", f"must be > 0, got {self.max_seq_len}")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Optimisation and bookkeeping for ``bytescale train``."""

  steps: int = 200
  batch_size: int = 8
  seq_len: int = 256
  learning_rate: float = 3e-3
  warmup_steps: int = 20
  min_lr_ratio: float = 0.1
  weight_decay: float = 0.1
  b1: float = 0.9
  b2: float = 0.95
  grad_clip: float = 1.0
  seed: int = 0
  log_every: int = 10
  eval_every: int = 0  # 0 = evaluate only at the end
  eval_batches: int = 8
  checkpoint_every: int = 100
  keep_checkpoints: int = 3
  max_seconds: float | None = None
  # Warm start: a run (or checkpoint) directory whose trained parameters start a NEW run (fresh optimizer, step 0,
  # fresh data order); ignored when out_dir already holds checkpoints (then the run resumes).
  init_from: str | None = None

  def __post_init__(self):
    name = "TrainConfig"
    for field in ("steps", "batch_size", "seq_len", "log_every", "eval_batches", "keep_checkpoints"):
      value = getattr(self, field)
      check(isinstance(value, int) and value > 0, name, field, f"must be a positive integer, got {value!r}")
    check(self.learning_rate > 0, name, "learning_rate", f"must be > 0, got {self.learning_rate}")
    check(0 <= self.warmup_steps, name, "warmup_steps", f"must be >= 0, got {self.warmup_steps}")
    check(0 <= self.min_lr_ratio <= 1, name, "min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}")
    check(self.grad_clip > 0, name, "grad_clip", f"must be > 0, got {self.grad_clip}")
    check(0 < self.b1 < 1 and 0 < self.b2 < 1, name, "b1/b2", "must be in (0, 1)")
    check(self.eval_every >= 0, name, "eval_every", "must be >= 0 (0 = only at the end)")
    check(self.checkpoint_every >= 0, name, "checkpoint_every", "must be >= 0 (0 = only at the end)")
    check(self.max_seconds is None or self.max_seconds > 0, name, "max_seconds", "must be None or > 0")
    check(self.init_from is None or (isinstance(self.init_from, str) and self.init_from.strip() != ""), name,
          "init_from", f"must be None or a run directory written by bytescale train, got {self.init_from!r}")


def swiglu_hidden(d: int, multiple: int = 32) -> int:
  """About 8d/3 (parameter-matched to a 4d GELU MLP), rounded up to a multiple for efficient matmuls."""
  return -(-(8 * d // 3) // multiple) * multiple


# --- Dotted-path updates and (de)serialisation -------------------------------------------------------------

def _field_paths(config, prefix=()):
  for field in dataclasses.fields(config):
    value = getattr(config, field.name)
    path = prefix + (field.name,)
    yield path
    if dataclasses.is_dataclass(value):
      yield from _field_paths(value, path)


def resolve_path(config, key: str) -> tuple[str, ...]:
  """The full field path of ``key``: a dotted path, or a bare name (or dotted suffix) unique in the tree."""
  path = tuple(key.split("."))
  paths = list(_field_paths(config))
  if path in paths:
    return path
  matches = [p for p in paths if p[-len(path):] == path]
  if len(matches) != 1:
    options = ", ".join(".".join(p) for p in paths if not dataclasses.is_dataclass(_get(config, p)))
    reason = "is ambiguous" if matches else "is not a field"
    raise ConfigError(f"--set {key}: {reason} of {type(config).__name__}; fields: {options}")
  return matches[0]


def replace_path(config, key: str, raw_value: str | Any):
  """Returns ``config`` with the field at ``key`` set; ``raw_value`` strings are parsed to the field's type."""
  return replace_paths(config, [(key, raw_value)])


def replace_paths(config, assignments):
  """Sets several fields at once: each nested config is rebuilt (and validated) once with all its new values,
  so fields that are only valid together (``rope_type=yarn`` with its ``factor``) can be set in any order."""
  updates: dict[tuple[str, ...], Any] = {}
  for key, raw_value in assignments:
    updates[resolve_path(config, key)] = raw_value
  return _apply_updates(config, (), updates)


def _apply_updates(config, prefix, updates):
  direct, nested = {}, set()
  for path, raw_value in updates.items():
    if path[: len(prefix)] != prefix:
      continue
    if len(path) == len(prefix) + 1:
      direct[path[-1]] = raw_value
    else:
      nested.add(path[len(prefix)])
  changes = {name: _apply_updates(getattr(config, name), prefix + (name,), updates) for name in nested}
  hints = typing.get_type_hints(type(config))
  for name, raw_value in direct.items():
    where = f"{type(config).__name__}.{name}"
    current = getattr(config, name)
    if isinstance(raw_value, str) and isinstance(current, RopeConfig):
      changes[name] = rope_config_from_scaling(raw_value, base=current)
    elif isinstance(raw_value, str):
      changes[name] = parse_value(raw_value, hints[name], where)
    else:
      changes[name] = raw_value
    if name in nested:
      raise ConfigError(f"--set {'.'.join(prefix + (name,))}: set either the whole config or its fields, not both")
  try:
    return dataclasses.replace(config, **changes)
  except (ValueError, TypeError) as error:
    if isinstance(error, ConfigError):
      raise
    message = str(error).splitlines()[0]
    owner = type(config).__name__
    raise ConfigError(message if message.startswith(owner) else f"{owner}: {message}") from None


def _get(config, path):
  for name in path:
    config = getattr(config, name)
  return config


def parse_value(raw: str, annotation, where: str):
  if raw.lower() in ("none", "null") and type(None) in typing.get_args(annotation):
    return None
  candidates = [a for a in (typing.get_args(annotation) or (annotation,)) if a is not type(None)]
  for kind in candidates:
    try:
      if kind is bool:
        if raw.lower() in ("true", "1", "yes"):
          return True
        if raw.lower() in ("false", "0", "no"):
          return False
        raise ValueError
      if kind in (int, float, str):
        return kind(raw)
      return json.loads(raw)
    except (ValueError, TypeError):
      continue
  raise ConfigError(f"{where}: cannot parse {raw!r} as {annotation}")


def to_dict(config) -> dict:
  return {"__type__": type(config).__name__, **{
      f.name: to_dict(getattr(config, f.name)) if dataclasses.is_dataclass(getattr(config, f.name))
      else _jsonable(getattr(config, f.name))
      for f in dataclasses.fields(config)
  }}


def _jsonable(value):
  return list(value) if isinstance(value, tuple) else value


# The config types defined here; ``bytescale.models.registry.CONFIG_TYPES`` adds every model's.
BASE_CONFIG_TYPES: dict[str, type] = {cls.__name__: cls for cls in (TransformerConfig, ByteLMConfig, TrainConfig,
                                                                     RopeConfig)}


def from_dict(data: dict, types: dict[str, type] | None = None):
  """Rebuilds a config written by :func:`to_dict`; ``types`` maps the ``"__type__"`` names to classes (default:
  the ones defined here; ``bytescale.models.registry.config_from_dict`` passes every model's)."""
  types = BASE_CONFIG_TYPES if types is None else types
  data = dict(data)
  name = data.pop("__type__")
  if name not in types:
    raise ConfigError(f"{name}: not a known config type; known: {sorted(types)}")
  kwargs = {}
  for key, value in data.items():
    if isinstance(value, dict) and "__type__" in value:
      value = from_dict(value, types)
    elif isinstance(value, list):
      value = tuple(value)
    kwargs[key] = value
  return types[name](**kwargs)
