"""LongRoPE factor search: genome operators, the search on a synthetic problem, model fitness, the CLI."""

import json
import math

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bytescale import rope_search
from bytescale.models import ByteLM
from bytescale.ops import rope
from bytescale.ops.rope import RopeConfig
from bytescale.rope_search import SearchConfig
from tests.conftest import tiny_bytelm_config
from tests.test_rope import yarn_reference


def random_monotone_units(rng, size, low, high):
  return np.sort(rng.integers(low, high + 1, size=size))


def test_mutation_stays_on_the_grid_between_its_neighbours():
  rng = np.random.default_rng(0)
  low, high, size = 100, 900, 12
  changed_anywhere = np.zeros(size, bool)
  for _ in range(400):
    parent = random_monotone_units(rng, size, low, high)
    child = rope_search.mutate(parent, rng, low, high, rate=0.3)
    assert child.dtype == np.int64 and child.shape == parent.shape  # integer hundredths: on the 0.01 grid
    for i in range(size):
      left = child[i - 1] if i else low  # the (possibly new) left neighbour ...
      right = parent[i + 1] if i + 1 < size else high  # ... and the old right one
      if child[i] != parent[i]:
        assert left <= child[i] <= right, (i, parent, child)
    assert np.all(np.diff(child) >= 0) and child.min() >= low and child.max() <= high
    changed_anywhere |= child != parent
  assert changed_anywhere.all()  # every dimension, the ends included, gets resampled


def test_mutation_can_reach_both_bounds_at_the_ends():
  rng = np.random.default_rng(1)
  parent = np.array([150, 150, 150])
  children = np.array([rope_search.mutate(parent, rng, 100, 200, rate=1.0) for _ in range(300)])
  assert children[:, 0].min() == 100 and children[:, -1].max() == 200


def test_crossover_preserves_monotonicity_and_takes_each_dimension_from_a_parent():
  rng = np.random.default_rng(2)
  for _ in range(300):
    a = random_monotone_units(rng, 10, 100, 1600)
    b = random_monotone_units(rng, 10, 100, 1600)
    child = rope_search.crossover(a, b, rng)
    assert np.all(np.diff(child) >= 0)
    assert np.all((child == a) | (child == b))


def test_seeds_are_pi_ntk_and_yarn_written_as_factors():
  d, s, length = 32, 8.0, 256
  seeds = rope_search.seed_factors(RopeConfig(), d, length, s)
  i = np.arange(d // 2)
  np.testing.assert_allclose(seeds["pi"], np.full(d // 2, s), rtol=1e-13)
  np.testing.assert_allclose(seeds["ntk"], s ** (2 * i / (d - 2)), rtol=1e-12)
  base = 10000.0 ** (-2.0 * i / d)
  np.testing.assert_allclose(seeds["yarn"], base / yarn_reference(d, 10000.0, s, length)[0], rtol=1e-12)
  for values in seeds.values():
    assert np.all(np.diff(values) >= -1e-12)


def test_search_improves_a_synthetic_fitness_and_finds_n_hat():
  """Fitness: squared log-distance to a hidden non-decreasing factor vector, plus a penalty off n_hat = 8."""
  target = np.array([1.0, 1.0, 1.3, 2.1, 3.4, 5.0, 6.2, 6.9, 7.4, 7.7, 7.9, 8.0])
  calls = []

  def fitness(factors, n_hat):
    calls.append((tuple(factors), n_hat))
    return float(np.mean(np.log(factors / target) ** 2)) + 0.05 * abs(math.log2(n_hat + 1) - math.log2(9))

  seeds = {"pi": np.full(12, 8.0), "ntk": 8.0 ** (np.arange(12) / 11)}
  config = SearchConfig(population=24, iterations=25, mutations=8, crossovers=8, search_n_hat=True, seed=3)
  result = rope_search.evolve(fitness, seeds, config, max_factor=16.0, n_hat_choices=(0, 1, 2, 4, 8, 16),
                              progress=False)
  best_seed = min(result.seed_fitness.values())
  assert result.fitness < 0.2 * best_seed, (result.fitness, best_seed)
  assert result.n_hat == 8
  factors = np.array(result.factors)
  assert np.all(np.diff(factors) >= 0) and factors.min() >= 1.0 and factors.max() <= 16.0
  np.testing.assert_allclose(factors * 100, np.round(factors * 100), atol=1e-9)
  assert all(b <= a for a, b in zip(result.history, result.history[1:]))  # elitism: the best never gets worse
  assert len(calls) == len(set(calls)) == result.evaluations  # nothing is scored twice
  assert result.fitness == pytest.approx(fitness(factors, result.n_hat))


def test_search_config_is_validated():
  with pytest.raises(ValueError, match="population"):
    SearchConfig(population=8, mutations=4, crossovers=4)
  with pytest.raises(ValueError, match="mutation_rate"):
    SearchConfig(mutation_rate=0.0)
  with pytest.raises(ValueError, match="max_factor"):
    SearchConfig(max_factor=0.5)


def test_model_fitness_with_traced_factors_equals_a_model_built_with_them():
  model = ByteLM(tiny_bytelm_config(), rngs=nnx.Rngs(0))
  windows = np.random.default_rng(4).integers(0, 256, size=(5, 49)).astype(np.int32)
  base = rope_search.longrope_base(RopeConfig(), original_length=16, factor=3.0, rotary_dim=8)
  fitness = rope_search.model_fitness(model, base, "stack", windows, batch_size=2)
  for factors, n_hat in (((1.0, 1.5, 2.5, 3.0), 0), ((1.0, 1.0, 4.0, 6.0), 3)):
    config = rope.replace_rope(model.config, RopeConfig(
        rope_type="longrope", factor=3.0, original_max_position_embeddings=16, short_factor=(1.0,) * 4,
        long_factor=factors, n_hat=n_hat))
    reference = rope_search.bits_per_byte_fn(rope_search.rebuild_with_config(model, config), batch_size=5)(windows)
    assert fitness(np.array(factors), n_hat) == pytest.approx(reference, abs=1e-4)
  plain = rope_search.bits_per_byte_fn(model, batch_size=5)(windows)
  assert abs(fitness(np.array((1.0, 1.0, 4.0, 6.0)), 0) - plain) > 1e-3  # the factors do matter


def test_rope_search_command_writes_a_loadable_monotone_config(tmp_path, capsys):
  from bytescale import cli, configs
  from bytescale.data.pipeline import DataConfig, frame_documents, split_stream
  from bytescale.train.checkpoint import load_model
  from bytescale.train.loop import train

  text = (b"To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer. " * 60)
  data = tmp_path / "text.txt"
  data.write_bytes(text)
  run = str(tmp_path / "run")
  train(tiny_bytelm_config(), configs.TrainConfig(steps=2, batch_size=2, seq_len=16, log_every=1),
        DataConfig(source=str(data), seq_len=16, batch_size=2), run, progress=False)
  out = str(tmp_path / "factors.json")
  status = cli.main(["rope-search", "--ckpt", run, "--data", str(data), "--target-length", "64",
                     "--population", "6", "--iterations", "2", "--mutations", "2", "--crossovers", "2",
                     "--windows", "3", "--batch-size", "3", "--search-n-hat", "--out", out, "--no-progress"])
  assert status == 0
  summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert summary["searched"] == "long_factor" and summary["factor"] == 4.0 and summary["original_length"] == 16
  assert summary["evaluations"] <= 6 + 2 * 4 and set(summary["seed_bpb"]) == {"pi", "ntk", "yarn"}
  assert summary["bpb"] <= min(summary["seed_bpb"].values())
  model, _ = load_model(run)
  extended = rope.apply_rope_scaling(model.config, out)
  found = extended.stack.rope
  assert found.rope_type == "longrope" and found.original_max_position_embeddings == 16 and found.factor == 4.0
  assert len(found.long_factor) == 4 and np.all(np.diff(found.long_factor) >= 0)
  assert found.short_factor == (1.0,) * 4
  # The score the search reports is the bits per byte of the model built from the written file.
  _, held_out = split_stream(frame_documents([text]), 0.1)
  windows = rope_search.held_out_windows(held_out, 64, 3)
  rebuilt = rope_search.rebuild_with_config(model, extended)
  assert rope_search.bits_per_byte_fn(rebuilt, batch_size=3)(windows) == pytest.approx(summary["bpb"], abs=1e-4)
  assert jnp.isfinite(summary["bpb"])
