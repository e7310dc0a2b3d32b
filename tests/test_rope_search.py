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


def test_search_defaults_are_the_papers():
  """LongRoPE (arXiv 2402.13753): section 4.1 "P=64, N1=N2=16, p=0.3, T=40, and select top-32"; Table 4:
  lambda_i in (1.0, 1.25 s, step 0.01), n_hat in {0, 1, 2, 4, 8, 12, 16, 20, 24, 28, 32, 64, 128, 256}."""
  config = SearchConfig()
  assert (config.population, config.mutations, config.crossovers, config.mutation_rate, config.iterations) == (
      64, 16, 16, 0.3, 40)
  assert config.parents == 32
  assert config.min_factor == 1.0 and rope_search.GRID_STEPS_PER_UNIT == 100
  assert config.max_factor_for(8.0) == pytest.approx(10.0) and config.max_factor_for(32.0) == pytest.approx(40.0)
  assert config.max_factor_for(0.5) == pytest.approx(1.25)  # a short length: ratio 1
  assert config.search_n_hat
  paper = (0, 1, 2, 4, 8, 12, 16, 20, 24, 28, 32, 64, 128, 256)
  assert config.n_hat_choices_for(4096) == paper
  assert config.n_hat_choices_for(64) == (0, 1, 2, 4, 8, 12, 16, 20, 24, 28, 32)  # values >= L dropped
  assert config.n_hat_choices_for(16) == (0, 1, 2, 4, 8, 12)
  assert SearchConfig(search_n_hat=False).n_hat_choices_for(4096) == (0,)
  assert SearchConfig(max_factor=3.0).max_factor_for(8.0) == 3.0


def recorded_evolve(monkeypatch):
  """Wraps ``rope_search.evolve`` (still searching) and records the bounds each search passes it."""
  calls, real = [], rope_search.evolve

  def recording(fitness, seeds, config, *, max_factor, n_hat_choices=(0,), progress=True):
    calls.append({"max_factor": max_factor, "n_hat_choices": tuple(n_hat_choices), "seeds": dict(seeds)})
    return real(fitness, seeds, config, max_factor=max_factor, n_hat_choices=n_hat_choices, progress=progress)

  monkeypatch.setattr(rope_search, "evolve", recording)
  return calls


TINY_SEARCH = SearchConfig(population=4, iterations=1, mutations=1, crossovers=1)


def test_a_short_search_keeps_the_long_regimes_attention_scale_and_uses_a_short_bound(monkeypatch):
  calls = recorded_evolve(monkeypatch)
  extended = RopeConfig(rope_type="longrope", factor=8.0, original_max_position_embeddings=16,
                        short_factor=(1.0,) * 4, long_factor=(1.0, 2.0, 5.0, 9.0))
  model = ByteLM(tiny_bytelm_config(rope=extended), rngs=nnx.Rngs(0))
  windows = np.random.default_rng(5).integers(0, 256, size=(2, 17)).astype(np.int32)
  found = rope_search.search_longrope(model, windows, target_length=16, original_length=16, search=TINY_SEARCH,
                                      progress=False)
  assert found.searched == "short_factor"
  assert found.rope_config.long_factor == (1.0, 2.0, 5.0, 9.0)
  scale = math.sqrt(1 + math.log(8) / math.log(16))  # the long regime's, written out: s = 8, L = 16
  assert rope.attention_scale(found.rope_config) == pytest.approx(scale)
  assert calls[-1]["max_factor"] == pytest.approx(1.25)  # Table 4's bound at ratio 1
  assert calls[-1]["n_hat_choices"] == (0, 1, 2, 4, 8, 12)
  # A long search on an unextended model: s = 64 / 16 = 4, bound 1.25 * 4.
  plain = ByteLM(tiny_bytelm_config(), rngs=nnx.Rngs(0))
  windows = np.random.default_rng(6).integers(0, 256, size=(2, 65)).astype(np.int32)
  found = rope_search.search_longrope(plain, windows, target_length=64, original_length=16, search=TINY_SEARCH,
                                      progress=False)
  assert found.rope_config.factor == 4.0 and calls[-1]["max_factor"] == pytest.approx(5.0)
  assert max(found.rope_config.long_factor) <= 5.0 and found.rope_config.n_hat in (0, 1, 2, 4, 8, 12)


def test_search_config_is_validated():
  with pytest.raises(ValueError, match="population"):
    SearchConfig(population=8, mutations=4, crossovers=4)
  with pytest.raises(ValueError, match="mutation_rate"):
    SearchConfig(mutation_rate=0.0)
  with pytest.raises(ValueError, match="max_factor"):
    SearchConfig(max_factor=0.5)
  with pytest.raises(ValueError, match="n_hat_choices"):
    SearchConfig(n_hat_choices=(0, -4))


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
                     "--windows", "3", "--batch-size", "3", "--out", out, "--no-progress"])
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
  assert max(found.long_factor) <= 1.25 * 4 and found.n_hat in (0, 1, 2, 4, 8, 12)  # Table 4, below L = 16
  assert found.short_factor == (1.0,) * 4
  # The score the search reports is the bits per byte of the model built from the written file.
  _, held_out = split_stream(frame_documents([text]), 0.1)
  windows = rope_search.held_out_windows(held_out, 64, 3)
  rebuilt = rope_search.rebuild_with_config(model, extended)
  assert rope_search.bits_per_byte_fn(rebuilt, batch_size=3)(windows) == pytest.approx(summary["bpb"], abs=1e-4)
  assert jnp.isfinite(summary["bpb"])


# --- Progressive extension (bytescale rope-extend) --------------------------------------------------------------


def test_rope_extend_flags_are_checked_before_any_work(tmp_path, capsys):
  from bytescale import cli

  base = ["rope-extend", "--ckpt", str(tmp_path / "missing"), "--data", "stdlib", "--out", str(tmp_path / "x")]
  assert cli.main(base + ["--lengths", "64,128", "--steps", "1,2,3"]) == 2
  assert "--steps: give one value or one per stage (2), got 3" in capsys.readouterr().err
  assert cli.main(base + ["--lengths", "64,x"]) == 2
  assert "--lengths: expected comma-separated integers" in capsys.readouterr().err
  assert cli.main(base + ["--lengths", "64", "--population", "8", "--mutations", "4", "--crossovers", "4"]) == 2
  assert "SearchConfig.population" in capsys.readouterr().err
  with pytest.raises(ValueError, match="ExtensionStage.steps"):
    rope_search.ExtensionStage(64, steps=-1)


def test_short_recovery_scales_are_the_final_ratio_halved_and_rescale_like_the_authors_code():
  assert rope_search.short_ratio_candidates(64.0) == [64.0, 32.0, 16.0, 8.0, 4.0, 2.0, 1.0]
  assert rope_search.short_ratio_candidates(6.0) == [6.0, 3.0, 1.5]
  factors = np.array([1.0, 3.0, 17.0, 64.0])
  for t in (1.0, 4.0, 32.0, 64.0):  # lambda - 1 shrinks in proportion to s - 1: ones at t = 1, unchanged at t = s
    expected = [1.0 + (f - 1.0) * (t - 1.0) / 63.0 for f in factors]
    np.testing.assert_allclose(rope_search.rescaled_factors(factors, 64.0, t), expected, rtol=1e-15)


@pytest.mark.slow
def test_rope_extend_chains_search_and_fine_tunes_and_writes_every_set(tmp_path, capsys):
  from bytescale import cli, configs
  from bytescale.data.pipeline import DataConfig, frame_documents, split_stream
  from bytescale.train.checkpoint import load_model, read_meta
  from bytescale.train.loop import train

  text = b"To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer. " * 200
  data = tmp_path / "text.txt"
  data.write_bytes(text)
  run = str(tmp_path / "run")
  train(tiny_bytelm_config(), configs.TrainConfig(steps=3, batch_size=2, seq_len=16, log_every=1),
        DataConfig(source=str(data), seq_len=16, batch_size=2), run, progress=False)
  out = tmp_path / "extended"
  status = cli.main(["rope-extend", "--ckpt", run, "--data", str(data), "--lengths", "48,96", "--steps", "2",
                     "--batch-size", "2", "--population", "4", "--iterations", "1", "--mutations", "1",
                     "--crossovers", "1", "--windows", "2", "--eval-batch-size", "2", "--out", str(out),
                     "--no-progress"])
  assert status == 0
  summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  # Served: the short sets L, 2L, then the last fine-tuned stage's set (the 48 set predates the last fine-tune).
  assert summary["serves"] == [[1, 16], [17, 32], [33, None]]
  # Each stage fine-tuned in its own run, warm-started from the previous one.
  assert read_meta(str(out / "stage_48"))["init_from"]["path"].startswith(run)
  assert read_meta(str(out / "stage_96"))["init_from"]["path"].startswith(str(out / "stage_48"))
  assert summary["final_run"] == str(out / "stage_96")
  model, _ = load_model(summary["final_run"])
  extended = rope.apply_rope_scaling(model.config, str(out / "rope_scaling.json"))
  sets = extended.stack.rope.factor_sets
  assert [s.max_length for s in sets] == [16, 32, 96]
  written = json.loads((out / "rope_scaling.json").read_text())["bytescale_progressive"]["stages"]
  assert [(r["length"], r["served"]) for r in written] == [(48, False), (96, True)]
  assert written[0]["run"] == str(out / "stage_48") and len(written[0]["factors"]) == 4
  scale = lambda s: math.sqrt(1 + math.log(s) / math.log(16))  # LongRoPE's, written out; L = 16
  assert sets[2].attention_factor == pytest.approx(scale(96 / 16))
  for entry, record in zip(sets[:2], summary["short"]):
    # The short re-search runs at the best of the final ratio 6 halved (6, 3, 1.5): its bound and scale.
    assert record["ratio"] in (6.0, 3.0, 1.5) and max(entry.factors) <= 1.25 * record["ratio"]
    assert entry.attention_factor == pytest.approx(scale(record["ratio"]))
  # The scores reported for the final weights are those of the final run's model under the written file; every
  # search scores the bytes of 2 windows of the last length (96).
  rebuilt = rope_search.rebuild_with_config(model, extended)
  _, held_out = split_stream(frame_documents([text]), 0.1)
  windows = lambda n: rope_search.held_out_windows(held_out, n, 2 * 96 // n)
  score = lambda n: rope_search.bits_per_byte_fn(rebuilt, batch_size=2)(windows(n))
  for record in summary["short"]:
    assert score(record["length"]) == pytest.approx(record["bpb_searched"], abs=1e-4)
  assert score(96) == pytest.approx(summary["stages"][-1]["bpb_tuned"], abs=1e-4)
