"""The CLI contract, kill -9 / SIGTERM resume, and one-line errors for bad input."""

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from bytescale import cli
from bytescale.train.metrics import read_jsonl

TEXT = ("The quick brown fox jumps over the lazy dog.\x00 Every byte value counts.\n" * 400).encode()
TINY = ["--set", "d_model=32", "--set", "num_layers=1", "--set", "mlp_hidden=64", "--set", "head_dim=8",
        "--batch-size", "4", "--seq-len", "32", "--no-progress"]
# The run the contract tests read: a learning rate at which 12 steps learn more than the byte frequencies.
LEARN = ["--lr", "1e-2", "--set", "warmup_steps=2"]


def unigram_bits(data: bytes) -> float:
  """Entropy of the byte frequencies of ``data`` in bits: what a model that ignores context can reach at best."""
  counts = np.bincount(np.frombuffer(data, np.uint8), minlength=256)
  p = counts[counts > 0] / len(data)
  return float(-(p * np.log2(p)).sum())


# Uniform over the 260 ids is log2(260) = 8.02 bits; these bytes: 4.56. A trained model must beat the latter.
TEXT_UNIGRAM_BITS = unigram_bits(TEXT)


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory):
  path = tmp_path_factory.mktemp("data") / "corpus.txt"
  path.write_bytes(TEXT)
  return str(path)


def run_cli(*args, check=True, timeout=300):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-m", "bytescale.cli", *args], capture_output=True, text=True, env=env,
                        timeout=timeout)
  if check and proc.returncode != 0:
    raise AssertionError(f"exit {proc.returncode}\nstdout: {proc.stdout}\nstderr: {proc.stderr[-3000:]}")
  return proc


def last_json_line(stdout: str) -> dict:
  lines = [line for line in stdout.splitlines() if line.strip()]
  return json.loads(lines[-1])


@pytest.fixture(scope="module")
def trained_run(corpus_file, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("run"))
  proc = run_cli("train", "--data", corpus_file, "--steps", "12", "--out", out, "--set", "log_every=1",
                 "--set", "checkpoint_every=4", *TINY, *LEARN)
  return out, proc


def test_train_prints_one_json_line_with_the_contract_keys(trained_run):
  out, proc = trained_run
  summary = last_json_line(proc.stdout)
  assert len([line for line in proc.stdout.splitlines() if line.strip()]) == 1
  for key in ("model", "preset", "params", "steps", "train_bytes", "bytes_per_s", "val_bpb", "checkpoint"):
    assert key in summary, key
  assert summary["model"] == "bytelm" and summary["steps"] == 12
  assert summary["train_bytes"] == 12 * 4 * 32
  # Context was learned: below the best a context-free model can do on these bytes (untrained: about 8.5).
  assert 0 < summary["val_bpb"] < TEXT_UNIGRAM_BITS - 0.5 and summary["bytes_per_s"] > 0
  assert os.path.isdir(os.path.join(out, "checkpoints", "12"))
  records = read_jsonl(os.path.join(out, "metrics.jsonl"))
  assert [r["step"] for r in records] == list(range(1, 13))


def test_eval_and_generate_read_the_checkpoint(trained_run, corpus_file):
  out, proc = trained_run
  result = last_json_line(run_cli("eval", "--ckpt", out, "--data", corpus_file, "--max-bytes", "3000").stdout)
  # The trained weights were read back: on the same periodic text, eval scores what training's validation did.
  assert 0 < result["bpb"] < TEXT_UNIGRAM_BITS - 0.5
  assert result["bpb"] == pytest.approx(last_json_line(proc.stdout)["val_bpb"], abs=0.05)
  assert result["bytes"] == 3000 + 1  # every byte plus the EOS; BOS is never a target
  gen = last_json_line(run_cli("generate", "--ckpt", out, "--prompt", "The ", "--max-bytes", "20", "--json",
                               "--temperature", "0").stdout)
  assert gen["prompt"] == "The " and gen["bytes"] <= 20


def test_eval_strided_needs_a_megabyte_checkpoint(trained_run, corpus_file):
  """``--strided`` (MegaByte's strided inference) on a ByteLM checkpoint is one clear error line, status 2."""
  out, _ = trained_run
  proc = run_cli("eval", "--ckpt", out, "--data", corpus_file, "--max-bytes", "300", "--strided", "paper", check=False)
  assert proc.returncode == 2 and "Traceback" not in proc.stderr
  error_lines = [line for line in proc.stderr.splitlines() if "error:" in line]
  assert len(error_lines) == 1 and "--strided" in error_lines[0] and "'bytelm'" in error_lines[0], proc.stderr


def test_rerun_with_same_out_resumes(trained_run, corpus_file):
  out, _ = trained_run
  proc = run_cli("train", "--data", corpus_file, "--steps", "14", "--out", out, "--set", "log_every=1",
                 "--set", "checkpoint_every=4", *TINY, *LEARN)
  assert "resuming" in proc.stderr and "from step 12" in proc.stderr
  assert last_json_line(proc.stdout)["steps"] == 14


def wait_for_step(metrics_path, step, proc, timeout=240):
  deadline = time.time() + timeout
  while time.time() < deadline:
    if proc.poll() is not None:
      raise AssertionError(f"training exited early: {proc.stderr.read()[-2000:]}")
    if os.path.exists(metrics_path):
      records = read_jsonl(metrics_path)
      if records and records[-1]["step"] >= step:
        return records[-1]["step"]
    time.sleep(0.05)
  raise AssertionError("training did not reach the step in time")


def start_training(corpus_file, out, steps):
  args = ["train", "--data", corpus_file, "--steps", str(steps), "--out", out, "--set", "log_every=1",
          "--set", "checkpoint_every=3", *TINY]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.Popen([sys.executable, "-m", "bytescale.cli", *args], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, env=env), args


def losses_by_step(path):
  losses = {}
  for record in read_jsonl(path):
    losses[record["step"]] = record["loss"]  # a resumed run re-logs steps after its checkpoint: keep the last
  return losses


def test_kill_9_then_resume_equals_uninterrupted_run(corpus_file, tmp_path):
  steps = 24
  reference_out, killed_out = str(tmp_path / "reference"), str(tmp_path / "killed")
  run_cli("train", "--data", corpus_file, "--steps", str(steps), "--out", reference_out, "--set", "log_every=1",
          "--set", "checkpoint_every=3", *TINY)
  proc, args = start_training(corpus_file, killed_out, steps)
  reached = wait_for_step(os.path.join(killed_out, "metrics.jsonl"), 7, proc)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert reached < steps
  resumed = run_cli(*args)
  assert "resuming" in resumed.stderr
  reference, killed = losses_by_step(os.path.join(reference_out, "metrics.jsonl")), losses_by_step(
      os.path.join(killed_out, "metrics.jsonl"))
  assert sorted(killed) == list(range(1, steps + 1))
  for step in range(1, steps + 1):
    assert killed[step] == reference[step], (step, killed[step], reference[step])


def test_sigterm_saves_and_exits_cleanly(corpus_file, tmp_path):
  out = str(tmp_path / "term")
  proc, _ = start_training(corpus_file, out, 500)
  wait_for_step(os.path.join(out, "metrics.jsonl"), 2, proc)
  proc.send_signal(signal.SIGTERM)
  stdout, stderr = proc.communicate(timeout=120)
  assert proc.returncode == 0, stderr[-2000:]
  summary = last_json_line(stdout)
  assert summary["stopped_by"] == "SIGTERM"
  assert os.path.isdir(os.path.join(out, "checkpoints", str(summary["steps"])))


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "--data", "/no/such/file.txt"], "no such file"),
        (["train", "--model", "nosuchmodel"], "unknown model"),
        (["train", "--preset", "huge-nonexistent"], "no preset"),
        (["train", "--set", "num_heads=3"], "num_kv_heads"),
        (["train", "--set", "nosuchfield=1"], "is not a field"),
        (["train", "--data", "tfds:surely_not_a_dataset_name:text"], "surely_not_a_dataset_name"),
        (["eval", "--ckpt", "/no/such/run", "--data", "stdlib"], "no checkpoint"),
    ],
)
def test_bad_input_gets_one_clear_line(args, message, tmp_path):
  extra = ["--out", str(tmp_path / "x")] if args[0] == "train" else []
  proc = run_cli(*args, *extra, check=False)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr
  error_lines = [line for line in proc.stderr.splitlines() if "error:" in line]
  assert len(error_lines) == 1 and message in error_lines[0], proc.stderr[-2000:]


def test_empty_file_and_too_small_corpus(tmp_path):
  empty = tmp_path / "empty.txt"
  empty.write_bytes(b"")
  proc = run_cli("train", "--data", str(empty), "--out", str(tmp_path / "a"), check=False)
  assert proc.returncode == 2 and "empty" in proc.stderr.lower()
  small = tmp_path / "small.txt"
  small.write_bytes(b"abc")
  proc = run_cli("train", "--data", str(small), "--out", str(tmp_path / "b"), check=False)
  assert proc.returncode == 2 and "seq" in proc.stderr.lower()


def subcommand_parser(command):
  actions = [a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
  return actions[0].choices[command]


@pytest.mark.parametrize("command", ["train", "eval", "generate", "flops", "rope-search", "entropy-threshold"])
def test_help_explains_every_flag(command, capsys):
  """``bytescale COMMAND --help`` (through ``cli.main``) lists every option the parser accepts, each with its help
  text (compared without whitespace: argparse re-wraps it)."""
  with pytest.raises(SystemExit) as done:
    cli.main([command, "--help"])
  assert done.value.code == 0
  out = capsys.readouterr().out
  assert out.startswith(f"usage: bytescale {command}")
  squeezed = "".join(out.split())
  options = [a for a in subcommand_parser(command)._actions if a.option_strings and a.help != argparse.SUPPRESS]
  assert len(options) > 3
  unlisted = [f for a in options for f in a.option_strings if not re.search(rf"(?<![\w-]){re.escape(f)}(?![\w-])", out)]
  assert not unlisted, f"bytescale {command} --help does not list {unlisted}"
  unexplained = [a.option_strings[-1] for a in options
                 if not (a.help or "").strip() or "".join((a.help % vars(a)).split()) not in squeezed]
  assert not unexplained, f"bytescale {command} --help: no help text for {unexplained}"
