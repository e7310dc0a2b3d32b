"""Rotary position embeddings (RoPE) and their context-extension family.

Convention: half-split pairs. Within the rotary part (the first ``rotary_dim`` features of a head, the rest pass
through), feature ``i`` pairs with feature ``i + rotary_dim/2`` and is rotated by the angle ``m * w_i`` of the
token's position ``m``. This is the layout of Hugging Face's Llama-style ``rotate_half``. Checkpoints that pair
adjacent features ``(2i, 2i+1)`` instead (Meta's reference BLT code, HF's BLT port, which uses Cohere's
interleaved ``rotate_half``) would need their q/k projection features permuted. No checkpoint loader exists yet.

Methods (``RopeConfig.rope_type``; keys follow Hugging Face's ``rope_scaling`` so published blocks load as they
are, see ``RopeConfig.from_hf``). ``d`` is the rotary dim, ``b`` the base ``rope_theta``, ``s`` the ``factor``,
``L`` ``original_max_position_embeddings``, ``w_i = b^(-2i/d)``:

* ``default``:  ``w_i``.
* ``linear``:   position interpolation, ``w_i / s``.
* ``ntk``:      NTK-aware, base ``b * s^(d/(d-2))``.
* ``dynamic``:  NTK-aware with a length-dependent scale. We follow Hugging Face's formula (so HF configs behave as
  in HF): base ``b * (s*n/L - (s-1))^(d/(d-2))`` with ``n = max(seq_len, L)``. With ``factor=1`` this is exactly
  the plain dynamic-NTK formula of the notes, scale ``max(1, seq_len/L)``; use that to get the plain variant.
  Note: HF takes ``L`` from the model's ``max_position_embeddings``; ``from_hf`` does the same.
* ``yarn``:     YaRN as implemented in code (not the paper's ramp): pair indices ``i_lo = floor(d ln(L/(2 pi
  beta_fast)) / (2 ln b))``, ``i_hi = ceil(... beta_slow ...)`` clamped to ``[0, d-1]`` (``truncate=False`` skips
  floor/ceil, as gpt-oss does), ``ramp = clamp((i - i_lo)/(i_hi - i_lo), 0, 1)``,
  ``w' = (1 - ramp) w + ramp w/s``; cos and sin are multiplied by ``attention_factor`` if given, else
  ``mscale(s, mscale)/mscale(s, mscale_all_dim)`` if both are set, else ``0.1 ln s + 1``.
* ``llama3``:   Llama 3.1: keep ``w`` where the wavelength ``2 pi/w < L/high_freq_factor``, ``w/s`` where it is
  ``> L/low_freq_factor``, blend in between with ``sigma = (L/wavelength - low)/(high - low)``.
* ``longrope``: per-dimension rescale factors ``lambda_i``: ``w_i / lambda_i`` from ``short_factor`` while the
  current length ``<= L`` and from ``long_factor`` beyond; the first ``n_hat`` positions use the unscaled ``w_i``;
  cos and sin are multiplied by ``attention_factor`` if given, else ``sqrt(1 + ln s / ln L)`` (1 when s <= 1), in
  both regimes, as HF and Phi-3 do. The factors come from an evolutionary search that is not part of this module:
  a search module produces ``short_factor``/``long_factor`` tuples, can score candidates with
  ``longrope_inverse_frequencies``, and builds configs with ``dataclasses.replace``.
  Progressive extension (LongRoPE's 4k/8k short sets plus the sets of each extension stage) needs more than two
  sets: ``factor_sets`` (a bytescale key, instead of ``short_factor``/``long_factor``) is a tuple of
  ``FactorSet(max_length, factors, attention_factor, n_hat)`` with increasing ``max_length``; the current length
  ``n`` picks the first set with ``n <= max_length`` (the last set serves every longer length too), and that set
  alone gives the rotation: its factors, its ``n_hat``, its ``attention_factor`` (default ``sqrt(1 + ln s /
  ln L)`` with ``s = max_length / L``). The short/long pair is the two-set case ``longrope_sets`` returns for it.

Precision. A float32 product ``m * w`` at ``m ~ 1e6`` is off by up to ~0.1 rad (the rounding of ``w`` times ``m``
plus the rounding of the product), differently for every position, which breaks the relative-position property
at long contexts. We never form that product. The phase is kept in turns (``u = w / 2 pi``) and the position is
split into 11-bit digits ``m = m0 + m1 2^11 + m2 2^22``. For each digit level the host precomputes, in float64,
``v_j = frac(2^(11 j) u)`` and splits it into a 13-bit part ``hi`` and a float32 remainder ``lo``. On the device,
``digit * hi`` is an integer below 2^24 over 2^13, so it and its ``frac`` are exact in float32; the ``digit * lo``
terms are small. The summed phase is wrapped to ``[-1/2, 1/2)`` turns before being turned into an angle, so the
angle error stays below ~1e-6 rad for any int32 position (the tests assert the bound at 2^21 and up).
Frequencies that are only known on the device are handled by the same exact scheme: ``apply_rope`` with a traced
``inv_freq`` is exact for those float32 frequencies (the division by 2 pi is done in split precision); dynamic
NTK under ``jit`` with a traced ``seq_len`` keeps the static ``w_i`` exact and rounds only its length-dependent
correction. That leaves no error for the highest frequency and elsewhere a relative frequency error of about
``1e-7 * ln(scale)``, the same for queries and keys: 3e-5 rad at position 9000 (one more token of length moves
the angles by 5e-2 rad there), but 4e-2 rad at 2^21, where one token moves them by 2e-2 rad. For float64
frequencies at such lengths pass ``seq_len`` as a python int (e.g. bucketed by the caller).

Length dependence and KV caches. ``dynamic`` and ``longrope`` rotate every position differently once the current
length changes regime, so keys already in a cache can go stale. ``rotation_regime(config, seq_len)`` returns an
int32 id with the guarantee: equal regimes => identical rotation of every position. The KV cache
(``bytescale.nn.attention``) keeps the regime its keys and values were computed under and the stack input of
every slot, and recomputes every layer when a row's regime changes: re-rotating cached keys would fix the first
layer only, since deeper keys and values come from attention outputs that used the old rotation.
``rerotate(keys, positions, config, from_seq_len=..., to_seq_len=...)`` (used by no cache, tested on its own)
maps keys rotated for one length onto the rotation a full forward at the other length would use (angle and, for
``factor_sets`` whose sets differ in ``attention_factor``, scale). For ``longrope`` the regime is the index of
the factor set serving the length, so it changes once per set boundary a sequence crosses (the short/long pair:
once, when the length first exceeds ``L``); for ``dynamic`` it changes at every length beyond ``L``, so the cache
recomputes at every step there.
Every other method has a single regime (0).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import json
import math
import os
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

ROPE_TYPES = ("default", "linear", "ntk", "dynamic", "yarn", "llama3", "longrope")

# Keys each rope_type reads, besides the ones every type accepts. `from_hf` rejects anything else, so a key that
# would silently do nothing (a typo, or a knob of another method) is reported instead.
_COMMON_HF_KEYS = frozenset({"rope_type", "type", "rope_theta", "partial_rotary_factor"})
_HF_KEYS_BY_TYPE = {
    "default": frozenset(),
    "linear": frozenset({"factor"}),
    "ntk": frozenset({"factor"}),
    "dynamic": frozenset({"factor", "original_max_position_embeddings"}),
    "yarn": frozenset({
        "factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale", "mscale_all_dim",
        "attention_factor", "truncate",
    }),
    "llama3": frozenset({"factor", "original_max_position_embeddings", "low_freq_factor", "high_freq_factor"}),
    "longrope": frozenset({"factor", "original_max_position_embeddings", "short_factor", "long_factor",
                           "attention_factor", "n_hat", "factor_sets"}),
}
_NEEDS_ORIGINAL_LENGTH = ("dynamic", "yarn", "llama3", "longrope")
# Optional fields only some methods read; setting one for another method is an error rather than a no-op.
_OPTIONAL_FIELD_USERS = {
    "mscale": ("yarn",),
    "mscale_all_dim": ("yarn",),
    "attention_factor": ("yarn", "longrope"),
    "short_factor": ("longrope",),
    "long_factor": ("longrope",),
    "factor_sets": ("longrope",),
}
_FACTOR_SET_KEYS = ("max_length", "factors", "attention_factor", "n_hat")


class FactorSet(NamedTuple):
  """One LongRoPE factor set: the rotation of every current length up to ``max_length`` (beyond the previous
  set's). ``max_length`` is None only for the long set of a short/long config (see ``longrope_sets``)."""

  max_length: int | None
  factors: tuple[float, ...]  # lambda_i, one per rotary pair
  attention_factor: float  # multiplies cos and sin
  n_hat: int  # leading positions left unscaled


def longrope_attention_factor(scale: float, original_length: int) -> float:
  """LongRoPE's cos/sin scale ``sqrt(1 + ln s / ln L)`` for an extension ``s`` of length ``L`` (1 when s <= 1)."""
  return 1.0 if scale <= 1 else math.sqrt(1 + math.log(scale) / math.log(original_length))


def _fail(field: str, message: str):
  raise ValueError(f"RopeConfig.{field}: {message}")


def _check_real(field: str, value, *, minimum=None, exclusive=False, optional=False):
  if value is None and optional:
    return None
  if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
    _fail(field, f"must be a number, got {value!r}")
  value = float(value)
  if not math.isfinite(value):
    _fail(field, f"must be finite, got {value}")
  if minimum is not None and (value <= minimum if exclusive else value < minimum):
    _fail(field, f"must be {'>' if exclusive else '>='} {minimum}, got {value}")
  return value


@dataclasses.dataclass(frozen=True)
class RopeConfig:
  """Rotary embedding and context-extension settings, with Hugging Face's key names (see module docstring)."""

  rope_type: str = "default"
  rope_theta: float = 10000.0
  factor: float = 1.0
  original_max_position_embeddings: int | None = None  # L: the pre-extension context length
  beta_fast: float = 32.0  # yarn: pairs turning more than beta_fast times over L keep w ...
  beta_slow: float = 1.0  # ... pairs turning fewer than beta_slow times use w/s
  mscale: float | None = None
  mscale_all_dim: float | None = None
  attention_factor: float | None = None  # yarn/longrope: multiplies cos and sin; None -> the method's default
  short_factor: tuple[float, ...] | None = None  # longrope: per-pair rescale factors, length rotary_dim/2
  long_factor: tuple[float, ...] | None = None
  low_freq_factor: float = 1.0  # llama3
  high_freq_factor: float = 4.0
  n_hat: int = 0  # longrope: leading positions left unscaled
  # longrope: several sets chosen by the current length (progressive extension), instead of short/long factors;
  # each a FactorSet, or a dict / sequence (max_length, factors[, attention_factor[, n_hat]]) normalised to one.
  factor_sets: tuple[FactorSet, ...] | None = None
  truncate: bool = True  # yarn: floor/ceil the ramp ends (HF default); gpt-oss sets False
  partial_rotary_factor: float = 1.0  # fraction of each head's features that rotate

  def __post_init__(self):
    if self.rope_type not in ROPE_TYPES:
      _fail("rope_type", f"unknown {self.rope_type!r}; use one of {ROPE_TYPES}")
    normalise = lambda name, value: object.__setattr__(self, name, value)  # frozen: store checked values
    theta = _check_real("rope_theta", self.rope_theta, minimum=1.0, exclusive=True)
    normalise("rope_theta", theta)
    factor = _check_real("factor", self.factor)
    if factor < 1.0:
      _fail("factor", f"must be >= 1 (1 = no extension), got {factor}; a factor below 1 would shrink the context")
    normalise("factor", factor)
    length = self.original_max_position_embeddings
    if length is not None:
      if isinstance(length, bool) or not isinstance(length, (int, np.integer)) or length < 1:
        _fail("original_max_position_embeddings", f"must be a positive int, got {length!r}")
      normalise("original_max_position_embeddings", int(length))
    elif self.rope_type in _NEEDS_ORIGINAL_LENGTH:
      _fail("original_max_position_embeddings",
            f"rope_type {self.rope_type!r} needs the pre-extension context length; set it (e.g. 4096)")
    normalise("beta_fast", _check_real("beta_fast", self.beta_fast, minimum=0.0, exclusive=True))
    normalise("beta_slow", _check_real("beta_slow", self.beta_slow, minimum=0.0, exclusive=True))
    if self.beta_fast < self.beta_slow:
      _fail("beta_fast", f"must be >= beta_slow ({self.beta_slow}), got {self.beta_fast}")
    normalise("mscale", _check_real("mscale", self.mscale, optional=True))
    normalise("mscale_all_dim", _check_real("mscale_all_dim", self.mscale_all_dim, optional=True))
    normalise("attention_factor",
              _check_real("attention_factor", self.attention_factor, minimum=0.0, exclusive=True, optional=True))
    normalise("low_freq_factor", _check_real("low_freq_factor", self.low_freq_factor, minimum=0.0, exclusive=True))
    normalise("high_freq_factor", _check_real("high_freq_factor", self.high_freq_factor))
    if self.high_freq_factor <= self.low_freq_factor:
      _fail("high_freq_factor", f"must be > low_freq_factor ({self.low_freq_factor}), got {self.high_freq_factor}")
    for name in ("short_factor", "long_factor"):
      normalise(name, self._checked_factor_array(name))
    if isinstance(self.n_hat, bool) or not isinstance(self.n_hat, (int, np.integer)) or self.n_hat < 0:
      _fail("n_hat", f"must be an int >= 0, got {self.n_hat!r}")
    normalise("n_hat", int(self.n_hat))
    if self.factor_sets is not None:
      if self.rope_type != "longrope":
        _fail("factor_sets", f"is only used by rope_type 'longrope', not {self.rope_type!r}; leave it None")
      normalise("factor_sets", self._checked_factor_sets())
    elif self.rope_type == "longrope":
      for name in ("short_factor", "long_factor"):
        if getattr(self, name) is None:
          _fail(name, "rope_type 'longrope' needs both short_factor and long_factor (one factor per rotary pair), "
                "or factor_sets")
      if len(self.short_factor) != len(self.long_factor):
        _fail("long_factor", f"has {len(self.long_factor)} entries but short_factor has {len(self.short_factor)}")
    if self.n_hat and self.rope_type != "longrope":
      _fail("n_hat", f"is only used by rope_type 'longrope', not {self.rope_type!r}; leave it 0")
    if not isinstance(self.truncate, (bool, np.bool_)):
      _fail("truncate", f"must be a bool, got {self.truncate!r}")
    normalise("truncate", bool(self.truncate))
    fraction = _check_real("partial_rotary_factor", self.partial_rotary_factor, minimum=0.0, exclusive=True)
    if fraction > 1.0:
      _fail("partial_rotary_factor", f"must be in (0, 1], got {fraction}")
    normalise("partial_rotary_factor", fraction)
    for name, users in _OPTIONAL_FIELD_USERS.items():
      if getattr(self, name) is not None and self.rope_type not in users:
        _fail(name, f"is only used by rope_type {' / '.join(users)}, not {self.rope_type!r}; leave it None")

  def _checked_factor_array(self, name):
    values = getattr(self, name)
    if values is None:
      return None
    if isinstance(values, (str, bytes)) or not hasattr(values, "__len__"):
      _fail(name, f"must be a sequence of numbers, got {values!r}")
    checked = tuple(_check_real(f"{name}[{i}]", v, minimum=0.0, exclusive=True) for i, v in enumerate(values))
    if not checked:
      _fail(name, "must not be empty")
    return checked

  def _checked_factor_sets(self) -> tuple[FactorSet, ...]:
    """``factor_sets`` as FactorSets (defaults filled in), checked; the fields it replaces must be left unset."""
    for name, unset, value in (("short_factor", None, self.short_factor), ("long_factor", None, self.long_factor),
                               ("attention_factor", None, self.attention_factor), ("n_hat", 0, self.n_hat),
                               ("factor", 1.0, self.factor)):
      if value != unset:
        _fail(name, f"is not read when factor_sets is given (each set has its own factors, attention_factor and "
              f"n_hat); leave it {unset}")
    length = self.original_max_position_embeddings
    if length < 2:
      _fail("original_max_position_embeddings", f"must be >= 2 with factor_sets (ln L scales), got {length}")
    sets = self.factor_sets
    if isinstance(sets, (str, bytes, dict)) or not hasattr(sets, "__len__") or not len(sets):
      _fail("factor_sets", f"must be a non-empty sequence of factor sets, got {sets!r}")
    checked = []
    for k, entry in enumerate(sets):
      where = f"factor_sets[{k}]"
      if isinstance(entry, dict):
        unknown = sorted(set(entry) - set(_FACTOR_SET_KEYS))
        if unknown or "max_length" not in entry or "factors" not in entry:
          _fail(where, f"needs keys max_length and factors (optional attention_factor, n_hat), got {sorted(entry)}")
        values = [entry.get(key) for key in _FACTOR_SET_KEYS]
      elif not isinstance(entry, (str, bytes)) and hasattr(entry, "__len__") and 2 <= len(entry) <= 4:
        values = list(entry) + [None] * (4 - len(entry))
      else:
        _fail(where, f"must be a dict or a sequence (max_length, factors[, attention_factor[, n_hat]]), got {entry!r}")
      max_length, factors, attention, n_hat = values
      if isinstance(max_length, bool) or not isinstance(max_length, (int, np.integer)) or max_length < 1:
        _fail(f"{where}.max_length", f"must be a positive int, got {max_length!r}")
      if isinstance(factors, (str, bytes)) or not hasattr(factors, "__len__") or not len(factors):
        _fail(f"{where}.factors", f"must be a non-empty sequence of numbers, got {factors!r}")
      factors = tuple(_check_real(f"{where}.factors[{i}]", v, minimum=0.0, exclusive=True)
                      for i, v in enumerate(factors))
      n_hat = 0 if n_hat is None else n_hat
      if isinstance(n_hat, bool) or not isinstance(n_hat, (int, np.integer)) or n_hat < 0:
        _fail(f"{where}.n_hat", f"must be an int >= 0, got {n_hat!r}")
      if attention is None:
        attention = longrope_attention_factor(max_length / length, length)
      attention = _check_real(f"{where}.attention_factor", attention, minimum=0.0, exclusive=True)
      checked.append(FactorSet(int(max_length), factors, attention, int(n_hat)))
    for k in range(1, len(checked)):
      if checked[k].max_length <= checked[k - 1].max_length:
        _fail(f"factor_sets[{k}].max_length", f"must be > the previous set's ({checked[k - 1].max_length}), got "
              f"{checked[k].max_length}: sets are listed by increasing length")
      if len(checked[k].factors) != len(checked[0].factors):
        _fail(f"factor_sets[{k}].factors", f"has {len(checked[k].factors)} entries but factor_sets[0] has "
              f"{len(checked[0].factors)}")
    return tuple(checked)

  @property
  def length_dependent(self) -> bool:
    """Whether the rotation of a position depends on the current total length (see ``rotation_regime``)."""
    return self.rope_type in ("dynamic", "longrope")

  @classmethod
  def from_hf(
      cls,
      rope_scaling: dict | None,
      rope_theta: float = 10000.0,
      max_position_embeddings: int | None = None,
      *,
      original_max_position_embeddings: int | None = None,
      partial_rotary_factor: float | None = None,
  ) -> RopeConfig:
    """Builds a config from a published model's ``rope_scaling`` (or ``rope_parameters``) block, as it is.

    ``rope_theta``, ``max_position_embeddings``, ``original_max_position_embeddings`` (Phi-3 keeps it at the top
    level) and ``partial_rotary_factor`` are the model config's top-level fields. The legacy ``type`` key is an
    alias of ``rope_type``. Keys the method does not read raise ``ValueError``. Where HF derives a value from the
    top-level lengths, so do we: YaRN's and LongRoPE's ``L`` default to ``max_position_embeddings``, LongRoPE's
    ``factor`` defaults to ``max_position_embeddings / L`` (not with ``factor_sets``, bytescale's key for more
    than two sets, whose sets carry their own scales), and dynamic NTK uses ``max_position_embeddings`` as ``L``,
    as HF does.
    """
    block = dict(rope_scaling or {})
    if "type" in block and "rope_type" in block and block["type"] != block["rope_type"]:
      raise ValueError(f"rope_scaling: 'type' ({block['type']!r}) and 'rope_type' ({block['rope_type']!r}) disagree")
    rope_type = block.pop("rope_type", block.pop("type", "default"))
    block.pop("type", None)
    if rope_type not in ROPE_TYPES:
      raise ValueError(f"rope_scaling.rope_type: unknown {rope_type!r}; use one of {ROPE_TYPES}")
    allowed = _COMMON_HF_KEYS | _HF_KEYS_BY_TYPE[rope_type]
    unknown = sorted(set(block) - allowed)
    if unknown:
      raise ValueError(
          f"rope_scaling: key(s) {unknown} are not read by rope_type {rope_type!r}; "
          f"it accepts {sorted(allowed - {'type'})}. Remove them or fix their names."
      )
    theta = block.pop("rope_theta", None)
    fields: dict[str, Any] = {"rope_type": rope_type, "rope_theta": rope_theta if theta is None else theta}
    fraction = block.pop("partial_rotary_factor", partial_rotary_factor)
    if fraction is not None:
      fields["partial_rotary_factor"] = fraction
    for key in ("short_factor", "long_factor"):
      if key in block:
        values = block.pop(key)
        fields[key] = tuple(values) if isinstance(values, (list, tuple)) else values
    block_length = block.pop("original_max_position_embeddings", None)
    if rope_type == "dynamic":
      fields["original_max_position_embeddings"] = max_position_embeddings or block_length
    elif rope_type in ("yarn", "longrope"):
      fields["original_max_position_embeddings"] = (
          block_length or original_max_position_embeddings or max_position_embeddings
      )
    elif rope_type == "llama3":
      fields["original_max_position_embeddings"] = block_length  # required in the block, as in HF
    if "factor_sets" in block:  # the sets carry their own lengths and scales: no factor to derive
      block["factor_sets"] = tuple(block["factor_sets"]) if isinstance(block["factor_sets"], list) else (
          block["factor_sets"])
    elif rope_type in ("yarn", "longrope") and block.get("factor") is None:
      length = fields["original_max_position_embeddings"]
      if max_position_embeddings and length and max_position_embeddings != length:
        block["factor"] = max_position_embeddings / length
      else:
        block.pop("factor", None)
    fields.update({k: v for k, v in block.items() if v is not None})
    return cls(**fields)


# --- Inverse frequencies and attention scale (float64, host) ------------------------------------------------


def default_inverse_frequencies(rotary_dim: int, theta: float) -> np.ndarray:
  """``w_i = theta^(-2i/d)`` for ``i < d/2``, in float64 on the host."""
  if rotary_dim % 2 or rotary_dim < 2:
    raise ValueError(f"rotary_dim must be a positive even number, got {rotary_dim}")
  return theta ** (-np.arange(0, rotary_dim, 2, dtype=np.float64) / rotary_dim)


def ntk_inverse_frequencies(rotary_dim: int, theta: float, scale: float) -> np.ndarray:
  """NTK-aware scaling: the base becomes ``theta * scale^(d/(d-2))``."""
  if rotary_dim <= 2:
    raise ValueError(f"NTK scaling needs rotary_dim > 2, got {rotary_dim}")
  return default_inverse_frequencies(rotary_dim, theta * scale ** (rotary_dim / (rotary_dim - 2)))


def dynamic_ntk_scale(config: RopeConfig, seq_len: int | None) -> float:
  """HF's dynamic-NTK scale ``s*n/L - (s-1)`` with ``n = max(seq_len, L)`` (= ``max(1, n/L)`` when s = 1)."""
  length = config.original_max_position_embeddings
  n = length if seq_len is None else max(int(seq_len), length)
  return config.factor * n / length - (config.factor - 1.0)


def yarn_ramp(config: RopeConfig, rotary_dim: int) -> np.ndarray:
  """Per-pair interpolation weight of YaRN as in HF's code: 0 keeps ``w``, 1 uses ``w/s``."""

  def correction_pair_index(rotations):  # pair index whose wavelength fits `rotations` times into L
    return (rotary_dim * math.log(config.original_max_position_embeddings / (rotations * 2 * math.pi))
            / (2 * math.log(config.rope_theta)))

  low, high = correction_pair_index(config.beta_fast), correction_pair_index(config.beta_slow)
  if config.truncate:
    low, high = math.floor(low), math.ceil(high)
  low, high = max(low, 0), min(high, rotary_dim - 1)
  if low == high:
    high += 0.001  # HF's guard against a zero-width ramp
  return np.clip((np.arange(rotary_dim // 2, dtype=np.float64) - low) / (high - low), 0.0, 1.0)


def llama3_inverse_frequencies(config: RopeConfig, rotary_dim: int) -> np.ndarray:
  base = default_inverse_frequencies(rotary_dim, config.rope_theta)
  length, s = config.original_max_position_embeddings, config.factor
  wavelength = 2 * np.pi / base
  smooth = (length / wavelength - config.low_freq_factor) / (config.high_freq_factor - config.low_freq_factor)
  blended = (1 - smooth) * base / s + smooth * base
  scaled = np.where(wavelength > length / config.low_freq_factor, base / s, blended)
  return np.where(wavelength < length / config.high_freq_factor, base, scaled)


def longrope_inverse_frequencies(rotary_dim: int, theta: float, rescale_factors) -> np.ndarray:
  """``w_i / lambda_i``; the entry point for a LongRoPE factor search to score candidate factors."""
  factors = np.asarray(rescale_factors, np.float64)
  if factors.shape != (rotary_dim // 2,):
    raise ValueError(
        f"LongRoPE rescale factors must have rotary_dim/2 = {rotary_dim // 2} entries (one per rotary pair), "
        f"got {factors.shape[0] if factors.ndim == 1 else factors.shape}"
    )
  return default_inverse_frequencies(rotary_dim, theta) / factors


def longrope_is_long(config: RopeConfig, seq_len) -> bool:
  """LongRoPE uses ``long_factor`` once the current length exceeds ``L`` (HF and Phi-3 use ``>``)."""
  return int(seq_len) > config.original_max_position_embeddings


def longrope_sets(config: RopeConfig) -> tuple[FactorSet, ...]:
  """The factor sets of a ``longrope`` config, by increasing length: its ``factor_sets``, or for a short/long config
  ``(L, short_factor)`` and ``(None, long_factor)``, both with the config's ``n_hat`` and attention scale."""
  if config.rope_type != "longrope":
    raise ValueError(f"longrope_sets needs a 'longrope' config, got rope_type {config.rope_type!r}")
  if config.factor_sets is not None:
    return config.factor_sets
  scale = attention_scale(config)
  return (FactorSet(config.original_max_position_embeddings, config.short_factor, scale, config.n_hat),
          FactorSet(None, config.long_factor, scale, config.n_hat))


def longrope_set_index(config: RopeConfig, seq_len):
  """Index of the factor set serving current length ``seq_len``: the first whose ``max_length >= seq_len``, else
  the last. A python int for an int ``seq_len``; an int32 array (one per entry) for a traced or array one."""
  bounds = [s.max_length for s in longrope_sets(config)[:-1]]
  static = _static_int(seq_len) if np.ndim(seq_len) == 0 else None
  if static is not None:
    return sum(static > bound for bound in bounds)
  seq_len = jnp.asarray(seq_len, jnp.int32)
  if not bounds:
    return jnp.zeros(seq_len.shape, jnp.int32)
  return jnp.sum(seq_len[..., None] > jnp.asarray(bounds, jnp.int32), axis=-1).astype(jnp.int32)


def inverse_frequencies(config: RopeConfig, rotary_dim: int, seq_len: int | None = None) -> np.ndarray:
  """Float64 inverse frequencies ``F = rotary_dim/2`` of ``config`` at current length ``seq_len`` (host int).

  ``seq_len=None`` means the original length ``L``: no dynamic scaling, LongRoPE's short factors.
  """
  theta, kind = config.rope_theta, config.rope_type
  if kind == "default":
    return default_inverse_frequencies(rotary_dim, theta)
  if kind == "linear":
    return default_inverse_frequencies(rotary_dim, theta) / config.factor
  if kind == "ntk":
    return ntk_inverse_frequencies(rotary_dim, theta, config.factor)
  if kind == "dynamic":
    return ntk_inverse_frequencies(rotary_dim, theta, dynamic_ntk_scale(config, seq_len))
  if kind == "yarn":
    base = default_inverse_frequencies(rotary_dim, theta)
    ramp = yarn_ramp(config, rotary_dim)
    return (1 - ramp) * base + ramp * base / config.factor
  if kind == "llama3":
    return llama3_inverse_frequencies(config, rotary_dim)
  if kind == "longrope":
    sets = longrope_sets(config)
    chosen = sets[longrope_set_index(config, config.original_max_position_embeddings if seq_len is None else seq_len)]
    return longrope_inverse_frequencies(rotary_dim, theta, chosen.factors)
  raise AssertionError(kind)


def attention_scale(config: RopeConfig, seq_len: int | None = None) -> float:
  """The factor multiplying cos and sin at current length ``seq_len`` (None: ``L``). Only LongRoPE's
  ``factor_sets`` make it depend on the length (each set has its own); for every other config it is constant."""
  if config.rope_type == "longrope" and config.factor_sets is not None:
    length = config.original_max_position_embeddings if seq_len is None else seq_len
    return config.factor_sets[longrope_set_index(config, int(length))].attention_factor
  s = config.factor
  if config.rope_type == "yarn":
    if config.attention_factor is not None:
      return config.attention_factor

    def yarn_mscale(scale, mscale=1.0):
      return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0

    if config.mscale and config.mscale_all_dim:  # HF: both must be set (and non-zero) to matter
      return yarn_mscale(s, config.mscale) / yarn_mscale(s, config.mscale_all_dim)
    return yarn_mscale(s)
  if config.rope_type == "longrope":
    if config.attention_factor is not None:
      return config.attention_factor
    return longrope_attention_factor(s, config.original_max_position_embeddings)
  return 1.0


def rotary_dim_for(config: RopeConfig, head_dim: int) -> int:
  """Number of rotating features per head: ``int(head_dim * partial_rotary_factor)``, which must be even."""
  rotary_dim = int(head_dim * config.partial_rotary_factor)
  if rotary_dim < 2 or rotary_dim % 2:
    raise ValueError(
        f"RopeConfig.partial_rotary_factor: {config.partial_rotary_factor} of head dim {head_dim} gives "
        f"{rotary_dim} rotary features; it must be a positive even number"
    )
  _check_rotary_dim(config, rotary_dim, f"head dim {head_dim} x partial_rotary_factor {config.partial_rotary_factor}")
  return rotary_dim


def _check_rotary_dim(config: RopeConfig, rotary_dim: int, origin: str):
  """Checks what can only be checked once the rotary dim is known (factor array lengths)."""
  if rotary_dim < 2 or rotary_dim % 2:
    raise ValueError(f"rotary_dim must be a positive even number, got {rotary_dim}")
  if config.rope_type == "longrope":
    named = ([(f"factor_sets[{k}].factors", s.factors) for k, s in enumerate(config.factor_sets)]
             if config.factor_sets is not None else
             [("short_factor", config.short_factor), ("long_factor", config.long_factor)])
    for name, factors in named:
      if len(factors) != rotary_dim // 2:
        raise ValueError(
            f"RopeConfig.{name}: has {len(factors)} entries but rotary dim {rotary_dim} ({origin}) "
            f"needs {rotary_dim // 2}, one per rotary pair"
        )
  if config.rope_type in ("ntk", "dynamic") and rotary_dim <= 2:
    raise ValueError(f"RopeConfig.rope_type: {config.rope_type!r} needs a rotary dim > 2, got {rotary_dim}")


def rope_tables(config: RopeConfig, rotary_dim: int, seq_len: int | None = None) -> tuple[np.ndarray, float]:
  """``(inv_freq_F, attention_scale)`` of ``config`` at current length ``seq_len``, float64 on the host."""
  _check_rotary_dim(config, rotary_dim, "as given")
  return inverse_frequencies(config, rotary_dim, seq_len), attention_scale(config, seq_len)


# --- Exact phases -------------------------------------------------------------------------------------------
# Phases are in turns (1 turn = 2 pi rad). Positions split into _DIGITS digits of _DIGIT_BITS bits; each digit
# level j carries frac(2^(bits j) * turns_per_position) as hi (a multiple of 2^-_HI_BITS) plus a float32 lo.
# digit * hi is an integer < 2^(_DIGIT_BITS + _HI_BITS) = 2^24 over 2^_HI_BITS: exact in float32.

_DIGIT_BITS = 11
_DIGITS = 3  # 33 bits: every non-negative int32
_HI_BITS = 13


def _host_phase_tables(inv_freq_F) -> tuple[np.ndarray, np.ndarray]:
  """``(hi, lo)``, each ``DxF`` float32, from float64 inverse frequencies."""
  turns = np.asarray(inv_freq_F, np.float64) / (2 * np.pi)
  level_scale = 2.0 ** (_DIGIT_BITS * np.arange(_DIGITS, dtype=np.float64))[:, None]
  per_digit = np.mod(level_scale * turns, 1.0)  # exact in float64: power-of-two scale, then frac
  hi = np.round(per_digit * 2.0**_HI_BITS) / 2.0**_HI_BITS
  return hi.astype(np.float32), (per_digit - hi).astype(np.float32)


def _device_phase_tables(turn_terms_F):
  """Same tables on the device from turns-per-position given as a sum of float32 terms (exact for that sum).

  Scaling a float32 by a power of two and taking its centred fractional part ``x - round(x)`` are exact, so each
  term contributes an exact 13-bit part and a small remainder; only the remainders' sum is rounded.
  """
  level_scale = jnp.asarray(2.0 ** (_DIGIT_BITS * np.arange(_DIGITS)), jnp.float32)[:, None]
  hi_sum, lo_sum = 0.0, 0.0
  for term in turn_terms_F:
    scaled = level_scale * jnp.asarray(term, jnp.float32)[None, :]
    per_digit = scaled - jnp.round(scaled)
    hi = jnp.round(per_digit * 2.0**_HI_BITS) / 2.0**_HI_BITS
    hi_sum, lo_sum = hi_sum + hi, lo_sum + (per_digit - hi)
  return hi_sum - jnp.round(hi_sum), lo_sum


@functools.lru_cache(maxsize=256)
def _cached_phase_tables(config: RopeConfig, rotary_dim: int, seq_len: int | None, unscaled: bool = False):
  inv_freq = (default_inverse_frequencies(rotary_dim, config.rope_theta) if unscaled
              else inverse_frequencies(config, rotary_dim, seq_len))
  return _host_phase_tables(inv_freq)


def _phase_turns(positions_BxT, hi_DxF, lo_DxF):
  """Phase ``m * u mod 1`` in ``[-1/2, 1/2]`` turns, ``BxTxF`` float32, for int32 positions."""
  positions = jnp.asarray(positions_BxT).astype(jnp.int32)
  magnitude = jnp.abs(positions)
  whole = 0.0  # sum of exact multiples of 2^-13
  fine = 0.0
  for level in range(_DIGITS):
    digit = ((magnitude >> (_DIGIT_BITS * level)) & ((1 << _DIGIT_BITS) - 1)).astype(jnp.float32)[..., None]
    coarse = digit * hi_DxF[level]  # an integer below 2^24 over 2^13: exact, and so is its fractional part
    whole = whole + (coarse - jnp.floor(coarse))
    fine = fine + digit * lo_DxF[level]
  turns = (whole - jnp.floor(whole)) + fine
  turns = turns - jnp.round(turns)
  return jnp.where(positions[..., None] < 0, -turns, turns)


def _static_int(value):
  """``value`` as a python int when it is known at trace time, else None."""
  try:
    return int(value)
  except jax.errors.ConcretizationTypeError:
    return None


def _select_tables(use_first, first, second):
  return tuple(jnp.where(use_first, a, b) for a, b in zip(first, second))


def _dynamic_device_tables(config: RopeConfig, rotary_dim: int, seq_len):
  """Dynamic-NTK tables for a traced length (see "Precision" in the module docstring).

  ``w'_i = w_i * g^(-2i/(d-2))`` with ``g`` the dynamic scale. The static ``w_i`` enters as an exact float32
  pair and only the correction ``w_i * expm1(-2i/(d-2) ln g)`` is rounded, so the highest frequency is exact and
  the others carry the float32 error of ``ln g``.
  """
  length = config.original_max_position_embeddings
  extra = jnp.maximum(jnp.asarray(seq_len, jnp.float32) - length, 0.0)  # exact integer
  log_scale = jnp.log1p(config.factor * extra / length)  # g = s n/L - (s-1) = 1 + s (n - L)/L
  exponents = jnp.asarray(np.arange(0, rotary_dim, 2) / (rotary_dim - 2), jnp.float32)
  turns = default_inverse_frequencies(rotary_dim, config.rope_theta) / (2 * np.pi)
  turns_hi = turns.astype(np.float32)
  turns_lo = (turns - turns_hi).astype(np.float32)
  correction = turns_hi * jnp.expm1(-exponents * log_scale)
  return _device_phase_tables([turns_hi, turns_lo, correction])


# --- Traced LongRoPE factors (for factor searches) ------------------------------------------------------------
# A RopeConfig is static (it lives in the model's graph definition), so a search that scores many candidate factor
# arrays would recompile the model for each. Inside `traced_longrope_factors(config, ...)` every rotation with a
# config equal to `config` reads the given arrays instead, which may be jit inputs: one compile scores them all.


@dataclasses.dataclass(frozen=True)
class _LongRopeOverride:
  config: RopeConfig
  short_factor: Any
  long_factor: Any
  n_hat: Any


_LONGROPE_OVERRIDES: contextvars.ContextVar[tuple[_LongRopeOverride, ...]] = contextvars.ContextVar(
    "bytescale_longrope_overrides", default=())


@contextlib.contextmanager
def traced_longrope_factors(config: RopeConfig, *, short_factor=None, long_factor=None, n_hat=None):
  """Within the block, rotations by ``config`` (a ``longrope`` config) use these factors and ``n_hat``.

  Each may be a (traced) array: ``short_factor``/``long_factor`` of shape ``rotary_dim/2``, ``n_hat`` an int
  scalar; ``None`` keeps the config's own. Use it inside the jitted function, around the model call, so the
  override is seen while tracing. The frequencies ``w_i / lambda_i`` are then float32 numbers (a relative error
  of ~6e-8, the same for queries and keys, so relative positions stay exact); the phases stay exact for them.
  """
  if config.rope_type != "longrope":
    raise ValueError(f"traced_longrope_factors needs a 'longrope' config, got rope_type {config.rope_type!r}")
  if config.factor_sets is not None:
    raise ValueError("traced_longrope_factors needs a short/long config, not factor_sets: a search scores one length, "
                     "which one set serves; search that set as the short or long factor of a two-set config")
  override = _LongRopeOverride(config, short_factor, long_factor, n_hat)
  token = _LONGROPE_OVERRIDES.set(_LONGROPE_OVERRIDES.get() + (override,))
  try:
    yield
  finally:
    _LONGROPE_OVERRIDES.reset(token)


def _active_longrope_override(config: RopeConfig):
  for override in reversed(_LONGROPE_OVERRIDES.get()):
    if override.config == config:
      return override
  return None


@functools.lru_cache(maxsize=256)
def _cached_set_tables(config: RopeConfig, rotary_dim: int, index: int):
  factors = longrope_sets(config)[index].factors
  return _host_phase_tables(longrope_inverse_frequencies(rotary_dim, config.rope_theta, factors))


def _overridden_longrope_tables(config: RopeConfig, rotary_dim: int, override: _LongRopeOverride, long: bool):
  factors = override.long_factor if long else override.short_factor
  if factors is None:
    return _cached_set_tables(config, rotary_dim, int(long))
  factors = jnp.asarray(factors, jnp.float32)
  if factors.shape != (rotary_dim // 2,):
    raise ValueError(f"traced_longrope_factors: {'long' if long else 'short'}_factor has shape {factors.shape}, "
                     f"rotary dim {rotary_dim} needs ({rotary_dim // 2},)")
  base = jnp.asarray(default_inverse_frequencies(rotary_dim, config.rope_theta), jnp.float32)
  return _device_phase_tables(_exact_turn_terms(base / factors))


def rotation_turns(positions_BxT, config: RopeConfig, rotary_dim: int, *, seq_len=None):
  """Rotation phase of every position and rotary pair, ``BxTxF`` float32 turns in ``[-1/2, 1/2]``."""
  positions = jnp.asarray(positions_BxT).astype(jnp.int32)
  kind = config.rope_type
  if not config.length_dependent:
    return _phase_turns(positions, *_cached_phase_tables(config, rotary_dim, None))
  if seq_len is None:
    seq_len = jnp.max(positions) + 1
  static_len = _static_int(seq_len)
  length = config.original_max_position_embeddings
  if kind == "dynamic":
    if static_len is not None:
      tables = _cached_phase_tables(config, rotary_dim, max(static_len, length))
    else:
      tables = _select_tables(jnp.asarray(seq_len) > length, _dynamic_device_tables(config, rotary_dim, seq_len),
                              _cached_phase_tables(config, rotary_dim, None))
    return _phase_turns(positions, *tables)
  # longrope: one table per factor set, indexed by the set serving the length, so a traced length works.
  sets = longrope_sets(config)
  override = _active_longrope_override(config)
  if override is None:
    set_tables = lambda index: _cached_set_tables(config, rotary_dim, index)
    n_hats = [s.n_hat for s in sets]
  else:
    set_tables = lambda index: _overridden_longrope_tables(config, rotary_dim, override, index == 1)
    n_hats = [config.n_hat if override.n_hat is None else override.n_hat] * len(sets)
  index = longrope_set_index(config, seq_len if static_len is None else static_len)
  if static_len is not None:
    tables, n_hat = set_tables(index), n_hats[index]
  else:
    every = [set_tables(k) for k in range(len(sets))]
    tables = tuple(jnp.stack([jnp.asarray(t[part]) for t in every])[index] for part in range(2))
    n_hat = n_hats[0] if all(isinstance(n, int) and n == n_hats[0] for n in n_hats) else (
        jnp.stack([jnp.asarray(n, jnp.int32) for n in n_hats])[index])
  turns = _phase_turns(positions, *tables)
  if not (isinstance(n_hat, int) and n_hat == 0):  # a traced n_hat always takes the select
    unscaled = _phase_turns(positions, *_cached_phase_tables(config, rotary_dim, None, unscaled=True))
    turns = jnp.where(positions[..., None] < n_hat, unscaled, turns)
  return turns


def _attention_scale_at(config: RopeConfig, seq_len):
  """``attention_scale`` at a length that may be traced (then a float32 scalar when the sets' scales differ)."""
  if config.rope_type != "longrope" or config.factor_sets is None:
    return attention_scale(config)
  scales = [s.attention_factor for s in config.factor_sets]
  if len(set(scales)) == 1:
    return scales[0]
  static_len = _static_int(seq_len)
  if static_len is not None:
    return scales[longrope_set_index(config, static_len)]
  return jnp.asarray(scales, jnp.float32)[longrope_set_index(config, seq_len)]


def rotation_regime(config: RopeConfig, seq_len):
  """int32 id such that equal ids at two lengths => identical rotation of every position (see KV caches above).

  0 for length-independent methods; LongRoPE: the index of the factor set serving the length (short/long: 0 or
  1); dynamic NTK: 0 up to ``L``, then the length itself. Works with a traced ``seq_len``.
  """
  if config.rope_type == "longrope":
    return jnp.asarray(longrope_set_index(config, jnp.asarray(seq_len, jnp.int32)), jnp.int32)
  seq_len = jnp.asarray(seq_len, jnp.int32)
  length = config.original_max_position_embeddings
  if config.rope_type == "dynamic":
    return jnp.where(seq_len > length, seq_len, 0).astype(jnp.int32)
  return jnp.zeros((), jnp.int32)


# --- Rotation -----------------------------------------------------------------------------------------------


def _rotate_by_turns(x_BxTxHxK, turns_BxTxF, scale):
  angles = (2 * np.pi) * turns_BxTxF  # |turns| <= 1/2, so the angle is within [-pi, pi]
  cos = (jnp.cos(angles) * scale)[:, :, None, :]
  sin = (jnp.sin(angles) * scale)[:, :, None, :]
  rotary = 2 * turns_BxTxF.shape[-1]
  x_rot, x_pass = x_BxTxHxK[..., :rotary], x_BxTxHxK[..., rotary:]
  x1, x2 = jnp.split(x_rot.astype(jnp.float32), 2, axis=-1)
  rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x_BxTxHxK.dtype)
  return jnp.concatenate([rotated, x_pass], axis=-1) if x_pass.shape[-1] else rotated


def _phase_tables_for(inv_freq_F):
  """Host tables when the frequencies are known at trace time (float64 if given so), else device tables."""
  try:
    host = np.asarray(inv_freq_F, np.float64)
  except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
    return _device_phase_tables(_exact_turn_terms(jnp.asarray(inv_freq_F, jnp.float32)))
  return _host_phase_tables(host)


def _exact_turn_terms(inv_freq_F):
  """``inv_freq / 2 pi`` as float32 terms whose sum is exact to ~2^-48: a plain float32 division would round.

  The frequency and 1/(2 pi) are split into 12-significant-bit parts, so the leading products are exact.
  """
  bits = jax.lax.bitcast_convert_type(inv_freq_F, jnp.uint32)
  freq_hi = jax.lax.bitcast_convert_type(bits & jnp.uint32(0xFFFFF000), jnp.float32)  # top 12 significant bits
  freq_lo = inv_freq_F - freq_hi  # exact: at most 12 significant bits
  inverse_turn = 1 / (2 * np.pi)
  inverse_turn_hi = np.round(inverse_turn * 2.0**14) / 2.0**14  # 12 significant bits each
  inverse_turn_mid = np.round((inverse_turn - inverse_turn_hi) * 2.0**26) / 2.0**26
  inverse_turn_lo = inverse_turn - inverse_turn_hi - inverse_turn_mid
  terms = [part * np.float32(c) for c in (inverse_turn_hi, inverse_turn_mid) for part in (freq_hi, freq_lo)]
  return terms + [inv_freq_F * np.float32(inverse_turn_lo)]


def rope_angles(positions_BxT, inv_freq_F):
  """Angles ``m * w_i`` reduced to ``[-pi, pi]``, float32 ``BxTxF``, computed without float32 ``m*w`` error."""
  return (2 * np.pi) * _phase_turns(positions_BxT, *_phase_tables_for(inv_freq_F))


def apply_rope(x_BxTxHxK, positions_BxT, inv_freq_F, attention_scale: float = 1.0):
  """Rotates the first ``2*F`` features of every head by the angles of ``positions`` (half-split pairs)."""
  turns = _phase_turns(positions_BxT, *_phase_tables_for(inv_freq_F))
  return _rotate_by_turns(x_BxTxHxK, turns, attention_scale)


def rotate(x_BxTxHxK, positions_BxT, config: RopeConfig, *, seq_len=None):
  """Applies the rotary embedding described by ``config`` to every head of ``x`` (same shape and dtype).

  ``seq_len`` is the current total length (python int or traced int32 scalar), used by ``dynamic`` and
  ``longrope``; ``None`` means ``max(positions) + 1``.
  """
  rotary_dim = rotary_dim_for(config, x_BxTxHxK.shape[-1])
  if config.length_dependent and seq_len is None:
    seq_len = jnp.max(jnp.asarray(positions_BxT)) + 1
  turns = rotation_turns(positions_BxT, config, rotary_dim, seq_len=seq_len)
  return _rotate_by_turns(x_BxTxHxK, turns, _attention_scale_at(config, seq_len))


def rerotate(x_rotated_BxTxHxK, positions_BxT, config: RopeConfig, *, from_seq_len, to_seq_len):
  """Maps keys rotated with ``seq_len=from_seq_len`` onto the rotation ``rotate`` uses at ``to_seq_len``.

  For a cache whose ``rotation_regime`` changed (see the module docstring): the angle changes, and the scale too
  where LongRoPE factor sets of different ``attention_factor`` serve the two lengths; both lengths may be traced.
  """
  rotary_dim = rotary_dim_for(config, x_rotated_BxTxHxK.shape[-1])
  old = rotation_turns(positions_BxT, config, rotary_dim, seq_len=from_seq_len)
  new = rotation_turns(positions_BxT, config, rotary_dim, seq_len=to_seq_len)
  delta = new - old
  ratio = _attention_scale_at(config, to_seq_len) / _attention_scale_at(config, from_seq_len)
  return _rotate_by_turns(x_rotated_BxTxHxK, delta - jnp.round(delta), ratio)


# --- Per-pair rescale factors and model configs -------------------------------------------------------------


def rescale_factors(config: RopeConfig, rotary_dim: int, seq_len: int | None = None) -> np.ndarray:
  """LongRoPE's view of any method: ``lambda_i = w_i / w'_i`` (float64), e.g. to seed a factor search.

  Position interpolation gives ``s`` everywhere, NTK ``s^(2i/(d-2))``, YaRN ``1/(1 - ramp + ramp/s)``.
  """
  _check_rotary_dim(config, rotary_dim, "as given")
  return default_inverse_frequencies(rotary_dim, config.rope_theta) / inverse_frequencies(config, rotary_dim, seq_len)


# Every stack of a model config (a nested frozen dataclass) carries its own RopeConfig, e.g. `stack.rope` for
# ByteLM; a multiscale model's global stack rotates patch positions and its local stacks byte positions.


def rope_paths(model_config) -> list[str]:
  """Dotted paths of every ``RopeConfig`` inside ``model_config`` (``['stack.rope']`` for ByteLM)."""
  found = []

  def walk(node, prefix):
    for field in dataclasses.fields(node):
      value = getattr(node, field.name)
      if isinstance(value, RopeConfig):
        found.append(prefix + field.name)
      elif dataclasses.is_dataclass(value):
        walk(value, prefix + field.name + ".")

  walk(model_config, "")
  return found


def checked_rope_path(model_config, path: str) -> str:
  available = rope_paths(model_config)
  if path in available:
    return path
  matches = [p for p in available if p == path + ".rope" or p.endswith("." + path) or p.endswith("." + path + ".rope")]
  if len(matches) != 1:
    raise ValueError(f"rope path {path!r} {'is ambiguous' if matches else 'names no RopeConfig'} in "
                     f"{type(model_config).__name__}; its rope paths are {available}")
  return matches[0]


def get_rope(model_config, path: str) -> RopeConfig:
  """The ``RopeConfig`` at ``path`` (a rope path, or the stack holding it: ``stack`` means ``stack.rope``)."""
  node = model_config
  for name in checked_rope_path(model_config, path).split("."):
    node = getattr(node, name)
  return node


def replace_rope(model_config, rope_config: RopeConfig, paths=None):
  """``model_config`` with the RopeConfig at each of ``paths`` (default: every one) replaced by ``rope_config``."""
  if not isinstance(rope_config, RopeConfig):
    raise TypeError(f"replace_rope needs a RopeConfig, got {type(rope_config).__name__}")

  def replaced(node, names):
    if not names:
      return rope_config
    return dataclasses.replace(node, **{names[0]: replaced(getattr(node, names[0]), names[1:])})

  for path in rope_paths(model_config) if paths is None else paths:
    model_config = replaced(model_config, checked_rope_path(model_config, path).split("."))
  return model_config


def read_rope_scaling(source) -> dict:
  """A dict from ``source``: a dict as it is, a JSON string starting with ``{``, or the path of a JSON file."""
  if isinstance(source, dict):
    return dict(source)
  if isinstance(source, (str, os.PathLike)) and str(source).lstrip().startswith("{"):
    data = json.loads(str(source))
  else:
    with open(source) as handle:
      data = json.load(handle)
  if not isinstance(data, dict):
    raise ValueError(f"rope scaling source {source!r}: expected a JSON object, got {type(data).__name__}")
  return data


def rope_config_from_scaling(source, base: RopeConfig | None = None) -> RopeConfig:
  """A RopeConfig from a ``rope_scaling`` block, or from a whole HF-style model config that holds one.

  A dict (or JSON file) with a ``rope_scaling`` (or ``rope_parameters``) key is read as a model config: its
  top-level ``rope_theta``, ``max_position_embeddings``, ``original_max_position_embeddings`` and
  ``partial_rotary_factor`` are used as ``RopeConfig.from_hf`` does; other top-level keys are ignored. Anything
  else is the block itself, whose keys must all be known. ``rope_theta`` and ``partial_rotary_factor`` default to
  ``base``'s (the values the model was trained with).
  """
  data = read_rope_scaling(source)
  base = base or RopeConfig()
  wrapper_key = next((k for k in ("rope_scaling", "rope_parameters") if k in data), None)
  block, top = (data[wrapper_key] or {}, data) if wrapper_key else (data, {})
  return RopeConfig.from_hf(
      block,
      rope_theta=top.get("rope_theta", base.rope_theta),
      max_position_embeddings=top.get("max_position_embeddings"),
      original_max_position_embeddings=top.get("original_max_position_embeddings"),
      partial_rotary_factor=top.get("partial_rotary_factor", base.partial_rotary_factor),
  )


def apply_rope_scaling(model_config, source, paths=None):
  """``model_config`` with a ``rope_scaling`` block (dict, JSON string or file) loaded into its stacks.

  ``paths`` picks the stacks (rope paths such as ``stack.rope``, or ``stack``); by default the ones the file
  names under ``bytescale_rope_paths`` (written by ``bytescale rope-search``), else every stack. Each stack keeps
  its own ``rope_theta`` and ``partial_rotary_factor`` unless the source sets them.
  """
  data = read_rope_scaling(source)
  if paths is None:
    paths = data.get("bytescale_rope_paths") or rope_paths(model_config)
  for path in paths:
    model_config = replace_rope(model_config, rope_config_from_scaling(data, get_rope(model_config, path)), [path])
  return model_config
