"""The CLI contract, kill -9 / SIGTERM resume, and one-line errors for bad input.

The contract tests read one shared run (``cli_run`` in conftest); the kill -9 test repeats its arguments, so that run
is also the uninterrupted reference."""

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from bytescale import cli
from bytescale.train.metrics import read_jsonl
from conftest import CLI_RUN_STEPS, CLI_TEXT, CLI_TINY, run_cli, subprocess_env


def unigram_bits(data: bytes) -> float:
  """Entropy of the byte frequencies of ``data`` in bits: what a model that ignores context can reach at best."""
  counts = np.bincount(np.frombuffer(data, np.uint8), minlength=256)
  p = counts[counts > 0] / len(data)
  return float(-(p * np.log2(p)).sum())


# Uniform over the 260 ids is log2(260) = 8.02 bits; these bytes: 4.56. A trained model must beat the latter.
TEXT_UNIGRAM_BITS = unigram_bits(CLI_TEXT)


def last_json_line(stdout: str) -> dict:
  lines = [line for line in stdout.splitlines() if line.strip()]
  return json.loads(lines[-1])


def test_train_prints_one_json_line_with_the_contract_keys(cli_run):
  out, steps = cli_run.out, CLI_RUN_STEPS
  summary = last_json_line(cli_run.stdout)
  assert len([line for line in cli_run.stdout.splitlines() if line.strip()]) == 1
  for key in ("model", "preset", "params", "steps", "train_bytes", "bytes_per_s", "val_bpb", "checkpoint"):
    assert key in summary, key
  assert summary["model"] == "bytelm" and summary["steps"] == steps
  assert summary["train_bytes"] == steps * 4 * 32
  # Context was learned: below the best a context-free model can do on these bytes (untrained: about 8.5).
  assert 0 < summary["val_bpb"] < TEXT_UNIGRAM_BITS - 0.5 and summary["bytes_per_s"] > 0
  assert os.path.isdir(os.path.join(out, "checkpoints", str(steps)))
  records = read_jsonl(os.path.join(out, "metrics.jsonl"))
  assert [r["step"] for r in records] == list(range(1, steps + 1))


def test_eval_and_generate_read_the_checkpoint(cli_run):
  out = cli_run.out
  result = last_json_line(run_cli("eval", "--ckpt", out, "--data", cli_run.corpus, "--max-bytes", "3000").stdout)
  # The trained weights were read back: on the same periodic text, eval scores what training's validation did.
  assert 0 < result["bpb"] < TEXT_UNIGRAM_BITS - 0.5
  assert result["bpb"] == pytest.approx(last_json_line(cli_run.stdout)["val_bpb"], abs=0.05)
  assert result["bytes"] == 3000 + 1  # every byte plus the EOS; BOS is never a target
  gen = last_json_line(run_cli("generate", "--ckpt", out, "--prompt", "The ", "--max-bytes", "20", "--json",
                               "--temperature", "0").stdout)
  assert gen["prompt"] == "The " and gen["bytes"] <= 20


def test_eval_strided_needs_a_megabyte_checkpoint(cli_run):
  """``--strided`` (MegaByte's strided inference) on a ByteLM checkpoint is one clear error line, status 2."""
  proc = run_cli("eval", "--ckpt", cli_run.out, "--data", cli_run.corpus, "--max-bytes", "300", "--strided", "paper",
                 check=False)
  assert proc.returncode == 2 and "Traceback" not in proc.stderr
  error_lines = [line for line in proc.stderr.splitlines() if "error:" in line]
  assert len(error_lines) == 1 and "--strided" in error_lines[0] and "'bytelm'" in error_lines[0], proc.stderr


def test_rerun_with_same_out_resumes(cli_run, tmp_path):
  out = str(tmp_path / "run")
  shutil.copytree(cli_run.out, out)  # the shared run stays as it was for the other tests
  proc = run_cli(*cli_run.train_args(out, steps=CLI_RUN_STEPS + 2))
  assert "resuming" in proc.stderr and f"from step {CLI_RUN_STEPS}" in proc.stderr
  assert last_json_line(proc.stdout)["steps"] == CLI_RUN_STEPS + 2


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


def start_cli(*args):
  return subprocess.Popen([sys.executable, "-m", "bytescale.cli", *args], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, env=subprocess_env())


def losses_by_step(path):
  losses = {}
  for record in read_jsonl(path):
    losses[record["step"]] = record["loss"]  # a resumed run re-logs steps after its checkpoint: keep the last
  return losses


def test_kill_9_then_resume_equals_uninterrupted_run(cli_run, tmp_path):
  """The killed run repeats the shared run's arguments (checkpoints every 4 steps): the shared run is the reference."""
  steps, reference_out, killed_out = CLI_RUN_STEPS, cli_run.out, str(tmp_path / "killed")
  args = cli_run.train_args(killed_out)
  proc = start_cli(*args)
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


def test_sigterm_saves_and_exits_cleanly(cli_run, tmp_path):
  out = str(tmp_path / "term")
  proc = start_cli("train", "--data", cli_run.corpus, "--steps", "500", "--out", out, "--set", "log_every=1",
                   "--set", "checkpoint_every=3", *CLI_TINY)
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
def test_bad_input_gets_one_clear_line(args, message, tmp_path, capsys):
  """Through ``cli.main`` in this process (the subprocess entry point's status 2 is checked by the --strided test):
  an exception escaping ``main`` would fail the test with its traceback."""
  extra = ["--out", str(tmp_path / "x")] if args[0] == "train" else []
  status = cli.main([*args, *extra])
  stderr = capsys.readouterr().err
  assert status == 2, stderr[-2000:]
  assert "Traceback" not in stderr
  error_lines = [line for line in stderr.splitlines() if "error:" in line]
  assert len(error_lines) == 1 and message in error_lines[0], stderr[-2000:]


def test_empty_file_and_too_small_corpus(tmp_path, capsys):
  empty = tmp_path / "empty.txt"
  empty.write_bytes(b"")
  status = cli.main(["train", "--data", str(empty), "--out", str(tmp_path / "a")])
  assert status == 2 and "empty" in capsys.readouterr().err.lower()
  small = tmp_path / "small.txt"
  small.write_bytes(b"abc")
  status = cli.main(["train", "--data", str(small), "--out", str(tmp_path / "b")])
  assert status == 2 and "seq" in capsys.readouterr().err.lower()


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
