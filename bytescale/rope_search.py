"""LongRoPE rescale-factor search (the command line is ``bytescale rope-search``, in ``bytescale.commands``).

LongRoPE (Ding et al. 2024) extends a RoPE model from length ``L`` to ``s L`` by dividing each rotary pair's
frequency by its own factor ``lambda_i`` (non-decreasing in ``i``: low frequencies are interpolated more) and
leaving the first ``n_hat`` positions unscaled. The factors are found by an evolutionary search whose fitness is
the model's loss at the target length, with no training:

* genome: ``lambda`` on a 0.01 grid in ``[min_factor, max_factor]``, non-decreasing, plus ``n_hat`` when searched;
* initial population: position interpolation (``s`` everywhere), NTK-aware (``s^(2i/(d-2))``) and YaRN
  (``1/(1 - ramp_i + ramp_i/s)``) written as factors, then mutations of them;
* each iteration keeps the best ``population - mutations - crossovers`` candidates (elitism) and adds
  ``mutations`` children that resample dimensions between their neighbours (which keeps the order) and
  ``crossovers`` children that take each dimension from one of two parents (retried until non-decreasing);
  candidates already scored are never scored again;
* fitness: bits per byte of the model on held-out windows of the target length.

``evolve`` is the search on any fitness function (tests use a synthetic one); ``model_fitness`` scores candidates
with one jitted forward in which the factors are traced inputs (``rope.traced_longrope_factors``), so the whole
population shares one compilation; ``search_longrope`` ties them to a model; ``rope-search`` is the command line.
The result is written as a Hugging Face style ``rope_scaling`` file that ``rope.apply_rope_scaling`` loads.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from typing import Callable

import numpy as np

from bytescale.ops import rope
from bytescale.ops.rope import RopeConfig

GRID_STEPS_PER_UNIT = 100  # factors live on a 0.01 grid; the search works in integer hundredths


@dataclasses.dataclass(frozen=True)
class SearchConfig:
  """Knobs of the evolutionary search (the LongRoPE paper's defaults)."""

  population: int = 64
  iterations: int = 40
  mutations: int = 16
  crossovers: int = 16
  mutation_rate: float = 0.3  # chance that each dimension (and n_hat) is resampled; at least one always is
  min_factor: float = 1.0
  max_factor: float | None = None  # None: 2 * the extension factor (Phi-3.5's searched factors reach ~2s)
  search_n_hat: bool = False
  n_hat_choices: tuple[int, ...] | None = None  # None: 0 and the powers of two below L
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

  @property
  def parents(self) -> int:
    return self.population - self.mutations - self.crossovers


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
  min_units = int(round(config.min_factor * GRID_STEPS_PER_UNIT))
  max_units = int(round((config.max_factor or max_factor) * GRID_STEPS_PER_UNIT))
  if max_units < min_units:
    raise ValueError(f"max_factor {max_units / GRID_STEPS_PER_UNIT} is below min_factor {config.min_factor}")
  choices = tuple(sorted(set(int(c) for c in n_hat_choices) | {0})) if config.search_n_hat else (0,)
  scores: dict[tuple, float] = {}
  total = config.population + config.iterations * (config.mutations + config.crossovers)
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
  population = list(dict.fromkeys(seed_keys.values()))[: config.population]
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

  ``original_length`` is ``L`` in that stack's positions; ``factor`` defaults to ``target_length / L``. The
  long factors are searched when ``target_length > L``, else the short ones.
  """
  paths = rope.rope_paths(model.config)
  if rope_path is None:
    if len(paths) != 1:
      raise ValueError(f"the model has several rope stacks {paths}; pick one with --stack")
    rope_path = paths[0]
  current = rope.get_rope(model.config, rope_path)
  stack_config = _stack_of(model.config, rope_path)
  rotary_dim = rope.rotary_dim_for(current, stack_config.head_dim)
  factor = factor if factor is not None else max(1.0, target_length / original_length)
  base = longrope_base(current, original_length=original_length, factor=factor, rotary_dim=rotary_dim,
                       attention_factor=attention_factor)
  searched = "long_factor" if target_length > original_length else "short_factor"
  fitness = model_fitness(model, base, rope_path, windows_WxT1, searched=searched, batch_size=batch_size)
  seeds = seed_factors(current, rotary_dim, original_length, factor)
  if current.rope_type == "longrope":
    seeds["current"] = np.asarray(getattr(current, searched))
  choices = search.n_hat_choices or tuple([0] + [2**k for k in range(int(math.log2(max(original_length, 1))) + 1)
                                               if 2**k < original_length])
  result = evolve(fitness, seeds, search, max_factor=2 * factor, n_hat_choices=choices, progress=progress)
  best = dataclasses.replace(base, n_hat=result.n_hat, **{searched: result.factors})
  return LongRopeSearch(result, best, rope.checked_rope_path(model.config, rope_path), searched, target_length)


def _stack_of(model_config, rope_path: str):
  node = model_config
  for name in rope.checked_rope_path(model_config, rope_path).split(".")[:-1]:
    node = getattr(node, name)
  return node
