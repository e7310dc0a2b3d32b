"""Warm start (``TrainConfig.init_from`` / ``bytescale train --init-from``): a new run begins from another run's
parameters, exactly, with fresh optimizer state and step 0; shape-changing configs are refused; resume wins."""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import CLI_RUN_STEPS, CLI_TINY, subprocess_env, tiny_bytelm_config
from flax import nnx

from bytescale import cli, configs, parallel
from bytescale.data.pipeline import ByteCorpus, DataConfig, train_iterator
from bytescale.models import build_model
from bytescale.ops.rope import RopeConfig, replace_rope
from bytescale.train.checkpoint import load_model, read_meta
from bytescale.train.loop import sharded_training, train
from bytescale.train.metrics import read_jsonl

TEXT = ("Warm starts keep what was learned.\x00 Every byte value counts, NUL too.\n" * 300).encode()
SEQ_LEN, BATCH = 32, 2


def train_config(**changes) -> configs.TrainConfig:
  base = configs.TrainConfig(steps=2, batch_size=BATCH, seq_len=SEQ_LEN, warmup_steps=1, log_every=1,
                             checkpoint_every=0, eval_batches=1)
  return configs.dataclasses.replace(base, **changes)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  path = tmp_path_factory.mktemp("data") / "corpus.txt"
  path.write_bytes(TEXT)
  data_config = DataConfig(source=str(path), seq_len=SEQ_LEN, batch_size=BATCH)
  return data_config, ByteCorpus.load(data_config)


@pytest.fixture(scope="module")
def saved_run(data, tmp_path_factory):
  """A finished 4-step run: the checkpoint every warm start below begins from."""
  data_config, corpus = data
  out = str(tmp_path_factory.mktemp("saved"))
  train(tiny_bytelm_config(), train_config(steps=4), data_config, out, corpus=corpus, progress=False)
  return out


@pytest.fixture(scope="module")
def warm_run(data, saved_run, tmp_path_factory):
  data_config, corpus = data
  out = str(tmp_path_factory.mktemp("warm"))
  result = train(tiny_bytelm_config(), train_config(init_from=saved_run), data_config, out, corpus=corpus,
                 progress=False)
  return out, result


def saved_params(run_dir):
  """The checkpoint's parameters by name, restored by ``load_model`` (its own orbax restore, no train state)."""
  model, _ = load_model(run_dir)
  return named_leaves(nnx.split(model, nnx.Param, ...)[1])


def named_leaves(tree) -> dict:
  return {jax.tree_util.keystr(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def plain_loss(model_config, params, batch) -> float:
  """Mean next-byte NLL of ``model_config`` carrying ``params`` on ``batch``: a plain forward, float64 softmax."""
  model = build_model(model_config, seed=1)
  nnx.update(model, params)
  logits = np.asarray(model(batch["inputs"], batch["segment_ids"]).logits_BxTxV, np.float64)
  log_probs = logits - logits.max(-1, keepdims=True)
  log_probs -= np.log(np.exp(log_probs).sum(-1, keepdims=True))
  nll = -np.take_along_axis(log_probs, batch["targets"][..., None].astype(np.int64), -1)[..., 0]
  mask = batch["loss_mask"].astype(np.float64)
  return float((nll * mask).sum() / mask.sum())


def first_batch(data):
  data_config, corpus = data
  return next(train_iterator(corpus, data_config, process_index=0, process_count=1))


def test_warm_start_state_is_exactly_the_saved_parameters_with_fresh_shardings(saved_run):
  setup = sharded_training(tiny_bytelm_config(), train_config(init_from=saved_run),
                           parallel.make_mesh(parallel.MeshConfig()))
  state, source = setup.warm_start_state(saved_run)
  assert source == {"path": os.path.join(saved_run, "checkpoints"), "step": 4}
  loaded, expected = named_leaves(state.params), saved_params(saved_run)
  fresh = named_leaves(setup.init_state().params)
  assert loaded.keys() == expected.keys() == fresh.keys()
  shardings = named_leaves(setup.state_shardings.params)
  for name, leaf in loaded.items():
    np.testing.assert_array_equal(np.asarray(leaf), np.asarray(expected[name]), err_msg=name)
    assert leaf.sharding == shardings[name], name
  assert any(not np.array_equal(fresh[name], expected[name]) for name in fresh)  # training moved the parameters
  assert int(state.step) == 0
  assert all(not np.any(np.asarray(x)) for x in jax.tree.leaves(state.opt_state))  # fresh Adam moments and count


def test_first_step_loss_is_the_saved_models_loss_on_that_batch(data, saved_run, warm_run):
  out, result = warm_run
  model, _ = load_model(saved_run)
  expected = plain_loss(tiny_bytelm_config(), nnx.split(model, nnx.Param, ...)[1], first_batch(data))
  records = read_jsonl(os.path.join(out, "metrics.jsonl"))
  assert [r["step"] for r in records] == [1, 2]  # a new run: the step count starts at 0
  np.testing.assert_allclose(records[0]["loss"], expected, rtol=1e-5)
  fresh_first_loss = read_jsonl(os.path.join(saved_run, "metrics.jsonl"))[0]["loss"]
  assert abs(records[0]["loss"] - fresh_first_loss) > 1e-3  # same batch, fresh init: a different loss
  source = {"path": os.path.join(saved_run, "checkpoints"), "step": 4}
  assert result.summary["init_from"] == source and result.summary["steps"] == 2
  assert read_meta(out)["init_from"] == source


def test_rope_change_is_accepted_and_runs_with_the_saved_parameters(data, saved_run, tmp_path):
  data_config, corpus = data
  yarn = RopeConfig(rope_type="yarn", factor=4.0, original_max_position_embeddings=SEQ_LEN)
  extended = configs.dataclasses.replace(replace_rope(tiny_bytelm_config(), yarn), max_seq_len=256)
  result = train(extended, train_config(steps=1, init_from=saved_run), data_config, str(tmp_path), corpus=corpus,
                 progress=False)
  model, _ = load_model(saved_run)
  expected = plain_loss(extended, nnx.split(model, nnx.Param, ...)[1], first_batch(data))
  np.testing.assert_allclose(read_jsonl(os.path.join(tmp_path, "metrics.jsonl"))[0]["loss"], expected, rtol=1e-5)
  assert result.summary["init_from"]["step"] == 4


@pytest.mark.parametrize("change, fragments", [
    ({"d_model": 48}, ["parameter embed.table is shape (260, 32) in the checkpoint", "shape (260, 48) in this"]),
    ({"num_layers": 3}, ["attention.wk is shape (2, 32, 2, 8) in the checkpoint", "shape (3, 32, 2, 8) in"]),
    ({"tie_embeddings": True}, ["parameter unembedding is shape (32, 260) in the checkpoint", "missing in this"]),
])
def test_shape_or_structure_change_is_refused_naming_the_parameter(data, saved_run, tmp_path, change, fragments):
  data_config, corpus = data
  model_config = tiny_bytelm_config(**{k: v for k, v in change.items() if k != "tie_embeddings"})
  model_config = configs.dataclasses.replace(model_config, tie_embeddings=change.get("tie_embeddings", False))
  with pytest.raises(configs.ConfigError, match="TrainConfig.init_from") as error:
    train(model_config, train_config(init_from=saved_run), data_config, str(tmp_path), corpus=corpus,
          progress=False)
  for fragment in fragments:
    assert fragment in str(error.value)
  assert not os.listdir(os.path.join(tmp_path, "checkpoints"))  # refused before training a step


def test_missing_init_from_is_a_config_error_naming_the_field(data, tmp_path):
  data_config, corpus = data
  with pytest.raises(configs.ConfigError, match=r"TrainConfig.init_from: .*does not exist; pass a run directory"):
    train(tiny_bytelm_config(), train_config(init_from=str(tmp_path / "nope")), data_config, str(tmp_path / "out"),
          corpus=corpus, progress=False)
  (tmp_path / "empty").mkdir()
  with pytest.raises(configs.ConfigError, match=r"TrainConfig.init_from: no checkpoint under"):
    train(tiny_bytelm_config(), train_config(init_from=str(tmp_path / "empty")), data_config, str(tmp_path / "out"),
          corpus=corpus, progress=False)


def test_resume_beats_init_from(data, saved_run, warm_run, tmp_path, capsys):
  data_config, corpus = data
  out = str(tmp_path / "run")
  shutil.copytree(warm_run[0], out)  # a warm-started run that stopped at step 2
  result = train(tiny_bytelm_config(), train_config(steps=3, init_from=saved_run), data_config, out, corpus=corpus,
                 progress=False)
  stderr = capsys.readouterr().err
  assert "ignored" in stderr and "resuming" in stderr and "warm start" not in stderr
  assert [r["step"] for r in read_jsonl(os.path.join(out, "metrics.jsonl"))] == [1, 2, 3]
  assert result.summary["steps"] == 3
  assert result.summary["init_from"] == {"path": os.path.join(saved_run, "checkpoints"), "step": 4}


def test_set_init_from_reaches_the_train_config():
  _, train_cfg = cli._apply_overrides(tiny_bytelm_config(), configs.TrainConfig(), ["init_from=/some/run"])
  assert train_cfg.init_from == "/some/run"


def test_cli_init_from_end_to_end_onto_a_sharded_mesh(cli_run, tmp_path):
  """The shared one-device CLI run (conftest ``cli_run``), then 5 steps from it in a new directory on a 2-device
  fsdp mesh, on the same data with the same batch shape."""
  first, second = cli_run.out, str(tmp_path / "second")
  args = ["train", "--data", cli_run.corpus, "--steps", "5", "--set", "log_every=1", *CLI_TINY, "--out", second,
          "--init-from", first, "--mesh", "data=1,fsdp=2"]
  proc = subprocess.run([sys.executable, "-m", "bytescale.cli", *args], capture_output=True, text=True,
                        env=subprocess_env(devices=2), timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  summary, stderr = json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr
  assert summary["init_from"] == {"path": os.path.join(first, "checkpoints"), "step": CLI_RUN_STEPS}
  assert summary["steps"] == 5 and summary["mesh"] == "data=1,fsdp=2,tensor=1" and "warm start" in stderr
  fresh, warm = (read_jsonl(os.path.join(d, "metrics.jsonl"))[0]["loss"] for d in (first, second))
  assert abs(warm - fresh) > 1e-3  # the same first batch (same seed): the warm run starts from trained weights
