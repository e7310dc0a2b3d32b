"""LongRoPE rescale-factor search and progressive extension (the command lines are ``bytescale rope-search`` and
``bytescale rope-extend``, in ``bytescale.commands``).

LongRoPE (Ding et al. 2024, arXiv 2402.13753) extends a RoPE model from length ``L`` to ``s L`` by dividing each
rotary pair's frequency by its own factor ``lambda_i`` (non-decreasing in ``i``: low frequencies are interpolated
more) and leaving the first ``n_hat`` positions unscaled. The factors are found by an evolutionary search whose
fitness is the model's loss at the target length, with no training. The defaults are the paper's:

* search space (Table 4): ``lambda_i`` on a 0.01 grid in ``[1.0, 1.25 s]``; ``n_hat`` in {0, 1, 2, 4, 8, 12, 16,
  20, 24, 28, 32, 64, 128, 256}, searched (we drop the values ``>= L``, which would leave a whole original-length
  input unscaled);
* search settings (section 4.1, "Search", for targets within 256k): population ``P = 64``, ``N1 = 16``
  mutations and ``N2 = 16`` crossovers per iteration from the top 32, mutation probability ``p = 0.3``,
  ``T = 40`` iterations (the paper halves P, N1 and N2 beyond 512k; we do not);
* initial population (section 3.2): PI, NTK-aware and YaRN written as factors, the rest mutations of them;
* monotonically non-decreasing constraint on every candidate (section 3.2); candidates already scored are never
  scored again.

How we read what the paper leaves open: a mutation resamples each dimension (and ``n_hat``) with probability
``p`` (at least one), uniformly on the grid between its neighbours, which keeps the order; a crossover takes each
dimension from one of two parents, retried until non-decreasing (the paper names "crossover with mono constraint"
without its rule). Fitness is bits per byte on held-out windows of the target length (the paper: perplexity of 5
PG19 samples).

Progressive extension (section 3.3): search factors for ``L1``, fine-tune at ``L1`` with them, search for ``L2``
on the fine-tuned model, fine-tune, ... (the paper: search 128k and 256k, fine-tune 400 steps at 128k then 600
with the 256k factors, search again for 2048k), then re-search short factors at two short lengths (the paper:
4k and 8k, with a smaller largest factor, picked here as the authors' code picks it: ``research_short_sets``) so
short inputs recover. The result is one ``longrope`` config whose ``factor_sets`` hold every set with the length it
serves; the model picks the set by the current length (``rope.longrope_sets``). ``progressive_extension`` is that
pipeline.

``evolve`` is the search on any fitness function (tests use a synthetic one); ``model_fitness`` scores candidates
with one jitted forward in which the factors are traced inputs (``rope.traced_longrope_factors``), so the whole
population shares one compilation; ``search_longrope`` ties them to a model; ``rope-search`` is the command line.
The result is written as a Hugging Face style ``rope_scaling`` file that ``rope.apply_rope_scaling`` loads.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
from typing import Callable

import numpy as np

from bytescale.ops import rope
from bytescale.ops.rope import RopeConfig

GRID_STEPS_PER_UNIT = 100  # factors live on a 0.01 grid (paper, Table 4); the search works in integer hundredths
PAPER_N_HAT_CHOICES = (0, 1, 2, 4, 8, 12, 16, 20, 24, 28, 32, 64, 128, 256)  # paper, Table 4
PAPER_MAX_FACTOR_RATIO = 1.25  # paper, Table 4: lambda_i <= 1.25 s ("larger interpolation than PI")


@dataclasses.dataclass(frozen=True)
class SearchConfig:
  """Knobs of the evolutionary search; the defaults are the LongRoPE paper's (see the module docstring)."""

  population: int = 64  # P (section 4.1)
  iterations: int = 40  # T (section 4.1)
  mutations: int = 16  # N1 (section 4.1)
  crossovers: int = 16  # N2 (section 4.1); parents: the top P - N1 - N2 = 32, as in the paper
  mutation_rate: float = 0.3  # p (section 4.1): chance that each dimension (and n_hat) is resampled, at least one
  min_factor: float = 1.0  # Table 4: 1.0 = direct extrapolation
  max_factor: float | None = None  # None: 1.25 s (Table 4), s = the extension ratio of the searched length
  search_n_hat: bool = True  # Table 4 searches n_hat
  n_hat_choices: tuple[int, ...] | None = None  # None: Table 4's set, without values >= L
  seed: int = 0

  def __post_init__(self):
    for name in ("population", "iterations"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"SearchConfig.{name}: must be a positive int, got {value!r}")
    for name in ("mutations", "crossovers"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"SearchConfig.{name}: must be an int >= 0, got {value!r}")
    parents = self.population - self.mutations - self.crossovers
    if parents < 1 or (self.crossovers and parents < 2):
      raise ValueError(
          f"SearchConfig.population: {self.population} leaves {parents} parents after {self.mutations} mutations "
          f"and {self.crossovers} crossovers; it must leave at least {2 if self.crossovers else 1}"
      )
    if not 0 < self.mutation_rate <= 1:
      raise ValueError(f"SearchConfig.mutation_rate: must be in (0, 1], got {self.mutation_rate}")
    if not math.isfinite(self.min_factor) or self.min_factor <= 0:
      raise ValueError(f"SearchConfig.min_factor: must be finite and > 0, got {self.min_factor}")
    if self.max_factor is not None and not (math.isfinite(self.max_factor) and self.max_factor >= self.min_factor):
      raise ValueError(f"SearchConfig.max_factor: must be finite and >= min_factor ({self.min_factor}), "
                       f"got {self.max_factor}")
    if self.n_hat_choices is not None and not all(
        isinstance(c, (int, np.integer)) and not isinstance(c, bool) and c >= 0 for c in self.n_hat_choices):
      raise ValueError(f"SearchConfig.n_hat_choices: must be ints >= 0 (or None for the paper's set), "
                       f"got {self.n_hat_choices!r}")

  @property
  def parents(self) -> int:
    return self.population - self.mutations - self.crossovers

  def max_factor_for(self, ratio: float) -> float:
    """The largest factor a search at extension ratio ``ratio`` may use: ``max_factor``, else 1.25 ``ratio``."""
    return self.max_factor if self.max_factor is not None else PAPER_MAX_FACTOR_RATIO * max(1.0, ratio)

  def n_hat_choices_for(self, original_length: int) -> tuple[int, ...]:
    """The ``n_hat`` values searched for a stack of original length ``L``: ``n_hat_choices``, else the paper's set
    below ``L``; ``(0,)`` when ``n_hat`` is not searched."""
    if not self.search_n_hat:
      return (0,)
    if self.n_hat_choices is not None:
      return tuple(sorted(set(int(c) for c in self.n_hat_choices) | {0}))
    return tuple(c for c in PAPER_N_HAT_CHOICES if c < original_length) or (0,)


# --- Genome operations (integer hundredths) ---------------------------------------------------------------------


def to_grid(factors, min_units: int, max_units: int) -> np.ndarray:
  """Factors -> non-decreasing int64 hundredths in ``[min_units, max_units]`` (rounded, clipped, running max)."""
  units = np.clip(np.round(np.asarray(factors, np.float64) * GRID_STEPS_PER_UNIT), min_units, max_units)
  return np.maximum.accumulate(units.astype(np.int64))


def mutate(units, rng: np.random.Generator, min_units: int, max_units: int, rate: float) -> np.ndarray:
  """Resamples each dimension with probability ``rate`` (at least one), uniformly on the grid between its
  neighbours: the new left neighbour and the old right one, ``min_units``/``max_units`` at the ends. Left to
  right, so the result stays non-decreasing."""
  child = np.array(units, np.int64)
  chosen = rng.random(child.size) < rate
  if not chosen.any():
    chosen[rng.integers(child.size)] = True
  for i in np.flatnonzero(chosen):
    low = child[i - 1] if i > 0 else min_units
    high = child[i + 1] if i + 1 < child.size else max_units
    child[i] = rng.integers(low, high + 1)
  return child


def crossover(first, second, rng: np.random.Generator, attempts: int = 16) -> np.ndarray:
  """Each dimension from one of two non-decreasing parents, redrawn until the child is non-decreasing; if no
  draw is, a single cut ``first[:k] + second[k:]`` at a random valid ``k`` (``k = 0`` always is)."""
  first, second = np.asarray(first, np.int64), np.asarray(second, np.int64)
  for _ in range(attempts):
    child = np.where(rng.random(first.size) < 0.5, first, second)
    if np.all(np.diff(child) >= 0):
      return child
  cuts = [k for k in range(first.size + 1) if k in (0, first.size) or first[k - 1] <= second[k]]
  k = cuts[rng.integers(len(cuts))]
  return np.concatenate([first[:k], second[k:]])


def extension_configs(base: RopeConfig, original_length: int, factor: float) -> dict[str, RopeConfig]:
  """The training-free extensions of a stack trained with ``base`` at length ``original_length`` by ``factor``:
  ``none`` (as trained), ``pi`` (linear), ``ntk``, ``dynamic`` (plain dynamic NTK, scale ``max(1, n/L)``),
  ``yarn``; each keeps ``base``'s ``rope_theta`` and ``partial_rotary_factor``."""
  common = dict(rope_theta=base.rope_theta, partial_rotary_factor=base.partial_rotary_factor)
  return {
      "none": base,
      "pi": RopeConfig(rope_type="linear", factor=factor, **common),
      "ntk": RopeConfig(rope_type="ntk", factor=factor, **common),
      "dynamic": RopeConfig(rope_type="dynamic", factor=1.0, original_max_position_embeddings=original_length,
                            **common),
      "yarn": RopeConfig(rope_type="yarn", factor=factor, original_max_position_embeddings=original_length, **common),
  }


def seed_factors(base: RopeConfig, rotary_dim: int, original_length: int, factor: float) -> dict[str, np.ndarray]:
  """PI, NTK-aware and YaRN at extension ``factor``, written as LongRoPE rescale factors ``w_i / w'_i``."""
  methods = extension_configs(base, original_length, factor)
  return {name: rope.rescale_factors(methods[name], rotary_dim) for name in ("pi", "ntk", "yarn")}


@dataclasses.dataclass(frozen=True)
class SearchResult:
  factors: tuple[float, ...]
  n_hat: int
  fitness: float
  seed_fitness: dict[str, float]  # each seed as given (quantised to the grid)
  history: tuple[float, ...]  # best fitness after the initial population and after each iteration
  evaluations: int


def evolve(
    fitness: Callable[[np.ndarray, int], float],
    seeds: dict[str, np.ndarray],
    config: SearchConfig,
    *,
    max_factor: float,
    n_hat_choices: tuple[int, ...] = (0,),
    progress: bool = True,
) -> SearchResult:
  """Minimises ``fitness(factors_F, n_hat)`` over non-decreasing grid factors (see the module docstring).

  ``seeds`` map names to starting factor arrays (all of one length); ``n_hat`` starts at 0 and is searched over
  ``n_hat_choices`` when ``config.search_n_hat``.
  """
  from tqdm.auto import tqdm

  if not seeds:
    raise ValueError("evolve needs at least one seed factor array")
  rng = np.random.default_rng(config.seed)
  # The grid points inside [min_factor, max_factor] (1e-9: a bound on the grid is in, despite float rounding).
  min_units = math.ceil(config.min_factor * GRID_STEPS_PER_UNIT - 1e-9)
  max_units = math.floor((config.max_factor or max_factor) * GRID_STEPS_PER_UNIT + 1e-9)
  if max_units < min_units:
    raise ValueError(f"max_factor {max_units / GRID_STEPS_PER_UNIT} is below min_factor {config.min_factor}")
  choices = tuple(sorted(set(int(c) for c in n_hat_choices) | {0})) if config.search_n_hat else (0,)
  scores: dict[tuple, float] = {}
  total = max(config.population, len(seeds)) + config.iterations * (config.mutations + config.crossovers)
  bar = tqdm(total=total, disable=not progress, file=sys.stderr, dynamic_ncols=True, desc="rope-search")

  def key(units, n_hat):
    return tuple(int(u) for u in units), int(n_hat)

  def score(candidate):
    if candidate not in scores:
      units, n_hat = candidate
      value = float(fitness(np.asarray(units, np.float64) / GRID_STEPS_PER_UNIT, n_hat))
      scores[candidate] = value if math.isfinite(value) else math.inf
      bar.update(1)
      bar.set_postfix(best=f"{min(scores.values()):.4f}")
    return scores[candidate]

  def mutated(candidate):
    units, n_hat = candidate
    if config.search_n_hat and rng.random() < config.mutation_rate:
      n_hat = choices[rng.integers(len(choices))]
    return key(mutate(units, rng, min_units, max_units, config.mutation_rate), n_hat)

  def novel(make, taken, attempts=32):
    """A candidate from ``make`` not scored or taken yet (the last draw if none is, after ``attempts``)."""
    for _ in range(attempts):
      candidate = make()
      if candidate not in scores and candidate not in taken:
        return candidate
    return candidate

  seed_keys = {name: key(to_grid(values, min_units, max_units), 0) for name, values in seeds.items()}
  population = list(dict.fromkeys(seed_keys.values()))  # every seed is scored, even beyond the population size
  distinct_seeds = len(population)
  while len(population) < config.population:
    population.append(novel(lambda: mutated(population[rng.integers(distinct_seeds)]), set(population)))
  ranked = sorted(population, key=score)
  history = [score(ranked[0])]
  for _ in range(config.iterations):
    parents = ranked[: config.parents]
    children: list[tuple] = []
    for _ in range(config.mutations):
      children.append(novel(lambda: mutated(parents[rng.integers(len(parents))]), set(children)))
    for _ in range(config.crossovers):
      def crossed():
        a, b = rng.choice(len(parents), size=2, replace=False)
        (units_a, n_hat_a), (units_b, n_hat_b) = parents[a], parents[b]
        return key(crossover(units_a, units_b, rng), n_hat_a if rng.random() < 0.5 else n_hat_b)
      children.append(novel(crossed, set(children)))
    ranked = sorted(dict.fromkeys(parents + children), key=score)
    history.append(score(ranked[0]))
  bar.close()
  best_units, best_n_hat = ranked[0]
  return SearchResult(
      factors=tuple(u / GRID_STEPS_PER_UNIT for u in best_units), n_hat=best_n_hat, fitness=scores[ranked[0]],
      seed_fitness={name: scores[k] for name, k in seed_keys.items()}, history=tuple(history),
      evaluations=len(scores),
  )


# --- Fitness of a model ---------------------------------------------------------------------------------------


def rebuild_with_config(model, model_config):
  """``model``'s trained variables in a model built from ``model_config`` (e.g. another rope config; RoPE has
  no parameters, so every variable carries over)."""
  from flax import nnx

  from bytescale.models.registry import build_model

  abstract = nnx.eval_shape(lambda: build_model(model_config))
  graphdef, _ = nnx.split(abstract)
  return nnx.merge(graphdef, nnx.state(model))


def held_out_windows(tokens: np.ndarray, length: int, count: int) -> np.ndarray:
  """``count`` windows of ``length + 1`` tokens (inputs and shifted targets) spread evenly over ``tokens``."""
  tokens = np.asarray(tokens)
  if len(tokens) < length + 1:
    from bytescale.data.sources import DataError

    raise DataError(f"held-out data has {len(tokens)} tokens, fewer than one window of {length + 1}; use a smaller "
                    f"--target-length or more data")
  starts = np.linspace(0, len(tokens) - length - 1, count).round().astype(np.int64)
  return np.stack([tokens[s:s + length + 1] for s in starts]).astype(np.int32)


def bits_per_byte_fn(model, *, batch_size: int = 4):
  """``score(windows_WxT1) -> bits per byte`` of ``model`` (static config), every window one document."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from bytescale.ops.losses import LN2, masked_cross_entropy

  graphdef, state = nnx.split(model)

  @jax.jit
  def nll(state, windows, weights):
    logits = nnx.merge(graphdef, state)(windows[:, :-1]).logits_BxTxV
    return masked_cross_entropy(logits, windows[:, 1:], jnp.broadcast_to(weights[:, None], windows[:, 1:].shape))

  def score(windows, other_state=None):
    """``other_state``: the variables of another model with the same graph (e.g. ``model`` fine-tuned)."""
    total, count = 0.0, 0.0
    for batch, weights in _padded_batches(np.asarray(windows), batch_size):
      value, n = nll(state if other_state is None else other_state, jnp.asarray(batch), jnp.asarray(weights))
      total, count = total + float(value), count + float(n)
    return total / count / LN2

  return score


def _padded_batches(windows, batch_size):
  """Batches of exactly ``batch_size`` rows (one compilation): the last is filled with weight-0 copies."""
  for start in range(0, len(windows), batch_size):
    batch = windows[start:start + batch_size]
    weights = np.ones(batch_size, np.float32)
    if len(batch) < batch_size:
      weights[len(batch):] = 0
      batch = np.concatenate([batch, np.repeat(batch[:1], batch_size - len(batch), axis=0)])
    yield batch, weights


def model_fitness(model, base_rope: RopeConfig, rope_path: str, windows_WxT1, *, searched: str = "long_factor",
                  batch_size: int = 4):
  """``fitness(factors_F, n_hat) -> bits per byte`` of ``model`` with ``base_rope`` at ``rope_path`` and the
  candidate as its ``searched`` factor set. One compilation for every candidate: the factors are traced."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from bytescale.ops.losses import LN2, masked_cross_entropy

  if searched not in ("long_factor", "short_factor"):
    raise ValueError(f"searched must be 'long_factor' or 'short_factor', got {searched!r}")
  searched_model = rebuild_with_config(model, rope.replace_rope(model.config, base_rope, [rope_path]))
  graphdef, state = nnx.split(searched_model)

  @jax.jit
  def nll(state, factors, n_hat, windows, weights):
    with rope.traced_longrope_factors(base_rope, n_hat=n_hat, **{searched: factors}):
      logits = nnx.merge(graphdef, state)(windows[:, :-1]).logits_BxTxV
    return masked_cross_entropy(logits, windows[:, 1:], jnp.broadcast_to(weights[:, None], windows[:, 1:].shape))

  batches = [(jnp.asarray(b), jnp.asarray(w)) for b, w in _padded_batches(np.asarray(windows_WxT1), batch_size)]

  def fitness(factors, n_hat):
    factors = jnp.asarray(factors, jnp.float32)
    total, count = 0.0, 0.0
    for batch, weights in batches:
      value, n = nll(state, factors, jnp.int32(n_hat), batch, weights)
      total, count = total + float(value), count + float(n)
    return total / count / LN2

  return fitness


def longrope_base(current: RopeConfig, *, original_length: int, factor: float, rotary_dim: int,
                  attention_factor: float | None = None) -> RopeConfig:
  """The LongRoPE config a search starts from: the stack's own factors if it is LongRoPE already, else ones
  (the original rotation) for both sets, with the stack's ``rope_theta`` and ``partial_rotary_factor``."""
  ones = (1.0,) * (rotary_dim // 2)
  already = current.rope_type == "longrope"
  return RopeConfig(
      rope_type="longrope", rope_theta=current.rope_theta, factor=factor,
      original_max_position_embeddings=original_length,
      short_factor=current.short_factor if already else ones, long_factor=current.long_factor if already else ones,
      attention_factor=attention_factor if attention_factor is not None else (
          current.attention_factor if already else None),
      n_hat=current.n_hat if already else 0, partial_rotary_factor=current.partial_rotary_factor,
  )


@dataclasses.dataclass(frozen=True)
class LongRopeSearch:
  result: SearchResult
  rope_config: RopeConfig  # the best candidate as a config
  rope_path: str
  searched: str  # "long_factor" or "short_factor"
  target_length: int

  def rope_scaling(self) -> dict:
    """The HF-style file content ``rope.apply_rope_scaling`` loads (``rope_scaling`` block plus model fields)."""
    c = self.rope_config
    block = {"rope_type": "longrope", "factor": c.factor,
             "original_max_position_embeddings": c.original_max_position_embeddings,
             "short_factor": list(c.short_factor), "long_factor": list(c.long_factor)}
    if c.attention_factor is not None:
      block["attention_factor"] = c.attention_factor
    if c.n_hat:
      block["n_hat"] = c.n_hat
    return {
        "rope_scaling": block, "rope_theta": c.rope_theta, "partial_rotary_factor": c.partial_rotary_factor,
        "max_position_embeddings": self.target_length, "bytescale_rope_paths": [self.rope_path],
        "bytescale_search": {"searched": self.searched, "bpb": self.result.fitness,
                             "seed_bpb": self.result.seed_fitness, "evaluations": self.result.evaluations},
    }


def search_longrope(model, windows_WxT1, *, target_length: int, original_length: int, rope_path: str | None = None,
                    factor: float | None = None, search: SearchConfig = SearchConfig(), batch_size: int = 4,
                    attention_factor: float | None = None, progress: bool = True) -> LongRopeSearch:
  """Searches LongRoPE factors of one stack of ``model`` for ``target_length`` (see the module docstring).

  ``original_length`` is ``L`` in that stack's positions. The long factors are searched when ``target_length >
  L``, else the short ones. ``factor`` (the ``s`` of the attention scale ``sqrt(1 + ln s / ln L)``, which both
  regimes share) defaults to ``target_length / L`` for a long search; a short search keeps the stack's own
  ``factor`` and ``attention_factor`` when it is LongRoPE already, so the long regime keeps its scale. The largest
  factor is ``1.25 r`` (Table 4) for the searched length's ratio ``r``: ``factor`` for a long search,
  ``max(1, target_length / L)`` for a short one; ``n_hat`` is searched over the paper's set below ``L``.
  """
  paths = rope.rope_paths(model.config)
  if rope_path is None:
    if len(paths) != 1:
      raise ValueError(f"the model has several rope stacks {paths}; pick one with --stack")
    rope_path = paths[0]
  current = rope.get_rope(model.config, rope_path)
  if current.rope_type == "longrope" and current.factor_sets is not None:
    raise ValueError(f"{rope_path} holds LongRoPE factor_sets (a progressive extension); search one length with "
                     f"search_factor_set, or extend it with progressive_extension")
  stack_config = _stack_of(model.config, rope_path)
  rotary_dim = rope.rotary_dim_for(current, stack_config.head_dim)
  searched = "long_factor" if target_length > original_length else "short_factor"
  already = current.rope_type == "longrope"
  if factor is None:
    factor = current.factor if (already and searched == "short_factor") else max(1.0, target_length / original_length)
  base = longrope_base(current, original_length=original_length, factor=factor, rotary_dim=rotary_dim,
                       attention_factor=attention_factor)
  ratio = factor if searched == "long_factor" else max(1.0, target_length / original_length)
  seeds = seed_factors(current, rotary_dim, original_length, ratio)
  if already:
    seeds["current"] = np.asarray(getattr(current, searched))
  result = _search_one(model, base, rope_path, windows_WxT1, searched=searched, seeds=seeds, search=search,
                       max_factor=search.max_factor_for(ratio), n_hat_choices=search.n_hat_choices_for(original_length),
                       batch_size=batch_size, progress=progress)
  best = dataclasses.replace(base, n_hat=result.n_hat, **{searched: result.factors})
  return LongRopeSearch(result, best, rope.checked_rope_path(model.config, rope_path), searched, target_length)


def _search_one(model, base: RopeConfig, rope_path: str, windows_WxT1, *, searched: str, seeds, search: SearchConfig,
                max_factor: float, n_hat_choices, batch_size: int, progress: bool) -> SearchResult:
  fitness = model_fitness(model, base, rope_path, windows_WxT1, searched=searched, batch_size=batch_size)
  return evolve(fitness, seeds, search, max_factor=max_factor, n_hat_choices=n_hat_choices, progress=progress)


def search_factor_set(model, windows_WxT1, *, length: int, original_length: int, rope_path: str,
                      ratio: float | None = None, attention_factor: float | None = None, seeds: dict | None = None,
                      search: SearchConfig = SearchConfig(), batch_size: int = 4,
                      progress: bool = True) -> tuple[rope.FactorSet, SearchResult]:
  """One LongRoPE factor set for current length ``length`` (a stage of a progressive extension).

  ``ratio`` is the extension ratio ``s`` the set is searched for, default ``max(1, length / L)``; it sets the
  largest factor ``1.25 s`` (Table 4), the PI, NTK and YaRN seeds, and the set's ``attention_factor``
  ``sqrt(1 + ln s / ln L)`` unless given (as the authors' code scales each stage by its own length). ``seeds``
  add starting points. Candidates are scored as the short (``length <= L``) or long factor of a two-set config with
  that scale, which rotates every length-``length`` window as the set alone.
  """
  current = rope.get_rope(model.config, rope_path)
  rotary_dim = rope.rotary_dim_for(current, _stack_of(model.config, rope_path).head_dim)
  ratio = max(1.0, length / original_length) if ratio is None else ratio
  if not (math.isfinite(ratio) and ratio >= 1):
    raise ValueError(f"search_factor_set: ratio must be >= 1, got {ratio}")
  scale = attention_factor if attention_factor is not None else rope.longrope_attention_factor(ratio, original_length)
  ones = (1.0,) * (rotary_dim // 2)
  base = RopeConfig(rope_type="longrope", rope_theta=current.rope_theta, factor=ratio,
                    original_max_position_embeddings=original_length, short_factor=ones, long_factor=ones,
                    attention_factor=scale, partial_rotary_factor=current.partial_rotary_factor)
  searched = "long_factor" if length > original_length else "short_factor"
  all_seeds = {**seed_factors(current, rotary_dim, original_length, ratio), **(seeds or {})}
  result = _search_one(model, base, rope_path, windows_WxT1, searched=searched, seeds=all_seeds, search=search,
                       max_factor=search.max_factor_for(ratio), n_hat_choices=search.n_hat_choices_for(original_length),
                       batch_size=batch_size, progress=progress)
  return rope.FactorSet(length, result.factors, scale, result.n_hat), result


# --- Progressive extension ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ExtensionStage:
  """A stage of a progressive extension: search a factor set for ``length``, then fine-tune ``steps`` steps at that
  length with ``batch_size`` rows (``steps=0``: search only, as the paper's last stage to 2048k)."""

  length: int
  steps: int = 0
  batch_size: int = 1

  def __post_init__(self):
    for name, minimum in (("length", 2), ("steps", 0), ("batch_size", 1)):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"ExtensionStage.{name}: must be an int >= {minimum}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class StageRecord:
  """What one search (and fine-tune) of a progressive extension did, scored on its search windows."""

  length: int
  factor_set: rope.FactorSet
  search: SearchResult
  bpb_before: float  # the model entering the stage, as configured then, at ``length``
  bpb_searched: float  # the same weights with the new set (the search's best fitness)
  bpb_tuned: float | None  # after fine-tuning at ``length`` (None: no fine-tune)
  steps: int
  run_dir: str | None  # the fine-tune run (None: search only)
  seconds: float
  ratio: float  # the extension ratio the set was searched for (its bound 1.25 ratio and, by default, its scale)

  def summary(self) -> dict:
    return {"length": self.length, "ratio": self.ratio, "bpb_before": round(self.bpb_before, 5),
            "bpb_searched": round(self.bpb_searched, 5),
            "bpb_tuned": None if self.bpb_tuned is None else round(self.bpb_tuned, 5), "steps": self.steps,
            "n_hat": self.factor_set.n_hat, "attention_factor": self.factor_set.attention_factor,
            "factors": list(self.factor_set.factors),
            "seed_bpb": {k: round(v, 5) for k, v in self.search.seed_fitness.items()},
            "evaluations": self.search.evaluations, "run": self.run_dir, "seconds": round(self.seconds, 1)}


@dataclasses.dataclass(frozen=True)
class ProgressiveExtension:
  rope_config: RopeConfig  # longrope with factor_sets: the short sets, then the stage sets valid for the final weights
  rope_path: str
  original_length: int
  stages: tuple[StageRecord, ...]
  short: tuple[StageRecord, ...]
  model: object  # the final weights under ``rope_config``
  final_run: str  # the run whose checkpoint holds those weights (its own config lacks the short sets)

  def served_lengths(self) -> list[tuple[int, int | None]]:
    """``(shortest, longest)`` current length each set serves, in order (the last: None, every longer one)."""
    sets = self.rope_config.factor_sets
    return [(1 if k == 0 else sets[k - 1].max_length + 1, None if k == len(sets) - 1 else s.max_length)
            for k, s in enumerate(sets)]

  def rope_scaling(self) -> dict:
    """The file ``rope.apply_rope_scaling`` loads: one ``longrope`` block holding every set (``factor_sets``)."""
    c = self.rope_config
    block = {"rope_type": "longrope", "original_max_position_embeddings": c.original_max_position_embeddings,
             "factor_sets": [{"max_length": s.max_length, "factors": list(s.factors),
                              "attention_factor": s.attention_factor, "n_hat": s.n_hat} for s in c.factor_sets]}
    return {
        "rope_scaling": block, "rope_theta": c.rope_theta, "partial_rotary_factor": c.partial_rotary_factor,
        "max_position_embeddings": self.stages[-1].length, "bytescale_rope_paths": [self.rope_path],
        "bytescale_progressive": {
            "final_run": self.final_run,
            "serves": [[low, high] for low, high in self.served_lengths()],
            "stages": [{**r.summary(), "served": r.factor_set in c.factor_sets} for r in self.stages],
            "short": [r.summary() for r in self.short]},
    }


def rescaled_factors(factors, from_ratio: float, to_ratio: float) -> np.ndarray:
  """Factors searched for extension ``from_ratio`` moved to ``to_ratio``: ``1 + (lambda - 1)(t - 1)/(s - 1)`` (the
  authors' code, microsoft/LongRoPE ``evolution/search.py`` ``rescale``); unchanged when ``s = 1``."""
  factors = np.asarray(factors, np.float64)
  if from_ratio <= 1:
    return factors
  return 1.0 + (factors - 1.0) * (to_ratio - 1.0) / (from_ratio - 1.0)


def short_ratio_candidates(final_ratio: float) -> list[float]:
  """``s, s/2, s/4, ...`` down to 1 (the scales the authors' ``select_init_factors`` tries)."""
  ratios, ratio = [], float(final_ratio)
  while ratio >= 1:
    ratios.append(ratio)
    ratio /= 2
  return ratios or [1.0]


def research_short_sets(model, sets, *, short_lengths, original_length: int, rope_path: str, tokens,
                        window_bytes: int, search: SearchConfig = SearchConfig(), batch_size: int = 4,
                        progress: bool = True, log=None) -> tuple[list[rope.FactorSet], list]:
  """LongRoPE's short-context recovery: a re-searched factor set for each of ``short_lengths`` on ``model`` (whose
  stack rotates with ``sets``; the sets are not changed), each scored on ``window_bytes // length`` windows of
  ``tokens``. Returns ``(short sets, StageRecords)``.

  The paper re-searches with a smaller largest factor; the authors' code picks that smaller scale by trying the
  final factors rescaled (``rescaled_factors``) to ``s, s/2, s/4, ..., 1`` of the last set's ratio ``s`` and keeping
  the best on the windows; the search then runs at that ratio ``t``: factors in ``[1, 1.25 t]``, attention factor
  ``sqrt(1 + ln t / ln L)``, seeds PI, NTK, YaRN at ``t``, the rescaled final factors, the original rotation (ones)
  and the set serving the length now (clipped to the bound).
  """
  log = log or (lambda message: None)
  trained = rope.get_rope(model.config, rope_path)
  current = RopeConfig(rope_type="longrope", rope_theta=trained.rope_theta,
                       original_max_position_embeddings=original_length, factor_sets=tuple(sets),
                       partial_rotary_factor=trained.partial_rotary_factor)
  model = rebuild_with_config(model, rope.replace_rope(model.config, current, [rope_path]))
  final = current.factor_sets[-1]
  final_ratio = max(1.0, final.max_length / original_length)
  short_sets, records = [], []
  for length in short_lengths:
    tick = time.perf_counter()
    length_windows = held_out_windows(tokens, length, max(1, window_bytes // length))
    bpb_before = bits_per_byte_fn(model, batch_size=batch_size)(length_windows)
    scores = {}
    for ratio in short_ratio_candidates(final_ratio):
      factors = rescaled_factors(final.factors, final_ratio, ratio)
      scale = rope.longrope_attention_factor(ratio, original_length)
      candidate = dataclasses.replace(current, factor_sets=((length, tuple(factors), scale, 0),))
      scored = rebuild_with_config(model, rope.replace_rope(model.config, candidate, [rope_path]))
      scores[ratio] = (bits_per_byte_fn(scored, batch_size=batch_size)(length_windows), factors)
    ratio = min(scores, key=lambda r: scores[r][0])
    serving = current.factor_sets[rope.longrope_set_index(current, length)]
    seeds = {"original": np.ones(len(final.factors)), "current": np.asarray(serving.factors),
             "rescaled": scores[ratio][1]}
    found, result = search_factor_set(model, length_windows, length=length, original_length=original_length,
                                      rope_path=rope_path, ratio=ratio, seeds=seeds, search=search,
                                      batch_size=batch_size, progress=progress)
    short_sets.append(found)
    records.append(StageRecord(length, found, result, bpb_before, result.fitness, None, 0, None,
                               time.perf_counter() - tick, ratio))
    log(f"rope-extend: short {length}: bpb {bpb_before:.4f} -> re-searched {result.fitness:.4f} at ratio "
        f"{ratio:g} (rescaled final set: " + ", ".join(f"{r:g} {v[0]:.4f}" for r, v in scores.items())
        + f"), n_hat {found.n_hat} ({time.perf_counter() - tick:.0f}s)")
  return short_sets, records


def progressive_extension(init_run: str, corpus, *, stages, short_lengths=None, out_dir: str, train_config,
                          original_length: int | None = None, rope_path: str | None = None,
                          search: SearchConfig = SearchConfig(), search_tokens=None, windows: int = 8,
                          batch_size: int = 4, progress: bool = True, log=None,
                          observe=None) -> ProgressiveExtension:
  """LongRoPE's progressive extension of the run in ``init_run`` (see the module docstring), on a ``ByteCorpus``.

  For each ``ExtensionStage`` (increasing lengths, all above ``L``): search a factor set for its length on the
  current model (seeds: PI, NTK, YaRN and, after the first stage, the previous set as it is and stretched by the
  length ratio), then fine-tune at that length through ``bytescale.train.loop.train`` with ``init_from`` the
  previous run and a fresh run directory ``out_dir/stage_<length>`` (``train_config`` gives the optimiser
  settings; steps, batch, length and ``init_from`` come from the stage). Finally re-search a set at each of
  ``short_lengths`` (default ``(L, 2L)``, all below the first stage) on the final weights
  (``research_short_sets``). The result serves the short sets, then the set the final weights were last fine-tuned
  with and those searched on them after (the paper's final model: its short sets and the set searched for 2048k on
  the fine-tuned weights); sets searched before a later fine-tune no longer fit the weights and are only recorded
  (``stages``, and ``bytescale_progressive`` in the file). Every search scores the bytes of ``windows`` windows of
  the last stage's length (``windows * last length // length`` windows of its own length) from ``search_tokens``
  (default: the corpus' validation split). ``L`` defaults to the stack rope's
  ``original_max_position_embeddings``, else the run's training ``seq_len``. ``observe(event, length, model)``,
  if given, sees the model after each step: ``"searched"`` (new set, weights as they entered the stage),
  ``"fine-tuned"``, and ``"short"`` (after the short re-search, with every set).
  """
  from bytescale.data.pipeline import DataConfig
  from bytescale.train.checkpoint import load_model
  from bytescale.train.loop import train

  log = log or (lambda message: print(message, file=sys.stderr, flush=True))
  model, meta = load_model(init_run)
  paths = rope.rope_paths(model.config)
  if rope_path is None:
    if len(paths) != 1:
      raise ValueError(f"--stack: the model has several rope stacks {paths}; pick one")
    rope_path = paths[0]
  rope_path = rope.checked_rope_path(model.config, rope_path)
  trained = rope.get_rope(model.config, rope_path)
  length = original_length or trained.original_max_position_embeddings or meta["train_config"]["seq_len"]
  stages = tuple(stages)
  if not stages:
    raise ValueError("progressive_extension needs at least one stage")
  for k, stage in enumerate(stages):
    if stage.length <= (stages[k - 1].length if k else length):
      raise ValueError(f"--lengths: stage lengths must increase and exceed L = {length}, got "
                       f"{[s.length for s in stages]}")
  short_lengths = tuple(short_lengths) if short_lengths is not None else (length, 2 * length)
  if any(b <= a for a, b in zip(short_lengths, short_lengths[1:])) or (short_lengths and (
      short_lengths[0] < 2 or short_lengths[-1] >= stages[0].length)):
    raise ValueError(f"--short-lengths: must increase, from >= 2 to below the first stage length "
                     f"{stages[0].length}, got {list(short_lengths)}")
  tokens = corpus.validation_tokens if search_tokens is None else search_tokens
  window_bytes = windows * stages[-1].length  # every search scores as many bytes, whatever its length

  def stack_rope(sets):
    return RopeConfig(rope_type="longrope", rope_theta=trained.rope_theta, original_max_position_embeddings=length,
                      factor_sets=tuple(sets), partial_rotary_factor=trained.partial_rotary_factor)

  # ``served``: the sets valid for the current weights, i.e. the one they were last fine-tuned with and any searched
  # on them since; a fine-tune makes the sets before it stale (they were searched on the weights before it).
  records, searched, served, run = [], [], [], init_run
  for stage in stages:
    tick = time.perf_counter()
    stage_windows = held_out_windows(tokens, stage.length, max(1, window_bytes // stage.length))
    bpb_before = bits_per_byte_fn(model, batch_size=batch_size)(stage_windows)
    seeds = {}
    if searched:
      seeds = {"previous": np.asarray(searched[-1].factors),
               "previous_pi": np.asarray(searched[-1].factors) * stage.length / searched[-1].max_length}
    found, result = search_factor_set(model, stage_windows, length=stage.length, original_length=length,
                                      rope_path=rope_path, seeds=seeds, search=search, batch_size=batch_size,
                                      progress=progress)
    searched.append(found)
    served.append(found)
    stage_config = rope.replace_rope(model.config, stack_rope(served), [rope_path])
    if observe:
      observe("searched", stage.length, rebuild_with_config(model, stage_config))
    bpb_tuned, stage_dir = None, None
    if stage.steps:
      stage_dir = os.path.join(out_dir, f"stage_{stage.length}")
      if os.path.exists(os.path.join(stage_dir, "checkpoints")):
        raise ValueError(f"--out: {stage_dir} already holds a run (a fine-tune there would resume it); use a new "
                         f"--out directory")
      tc = dataclasses.replace(train_config, steps=stage.steps, batch_size=stage.batch_size, seq_len=stage.length,
                               init_from=run)
      data = DataConfig(source=corpus.name, seq_len=stage.length, batch_size=stage.batch_size, seed=tc.seed)
      model, run = train(stage_config, tc, data, stage_dir, corpus=corpus, progress=progress).model, stage_dir
      served = [found]
      model = rebuild_with_config(model, rope.replace_rope(model.config, stack_rope(served), [rope_path]))
      bpb_tuned = bits_per_byte_fn(model, batch_size=batch_size)(stage_windows)
      if observe:
        observe("fine-tuned", stage.length, model)
    else:
      model = rebuild_with_config(model, stage_config)
    records.append(StageRecord(stage.length, found, result, bpb_before, result.fitness, bpb_tuned, stage.steps,
                               stage_dir, time.perf_counter() - tick, stage.length / length))
    log(f"rope-extend: {stage.length}: bpb {bpb_before:.4f} -> searched {result.fitness:.4f}"
        + (f" -> fine-tuned {bpb_tuned:.4f} ({stage.steps} steps)" if bpb_tuned is not None else "")
        + f", n_hat {found.n_hat} ({time.perf_counter() - tick:.0f}s)")

  short_sets, short_records = research_short_sets(
      model, served, short_lengths=short_lengths, original_length=length, rope_path=rope_path, tokens=tokens,
      window_bytes=window_bytes, search=search, batch_size=batch_size, progress=progress, log=log)
  final = stack_rope(short_sets + served)
  final_model = rebuild_with_config(model, rope.replace_rope(model.config, final, [rope_path]))
  if observe:
    observe("short", short_lengths[-1] if short_lengths else length, final_model)
  return ProgressiveExtension(final, rope_path, length, tuple(records), tuple(short_records), final_model, run)


def _stack_of(model_config, rope_path: str):
  node = model_config
  for name in rope.checked_rope_path(model_config, rope_path).split(".")[:-1]:
    node = getattr(node, name)
  return node
