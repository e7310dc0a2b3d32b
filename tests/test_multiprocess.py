"""Multi-host training on localhost: 2 processes x 4 CPU devices joined by ``jax.distributed.initialize``.

Three ``bytescale train`` runs on the same data: a one-process, one-device reference for 6 steps; a two-process
run on ``--mesh data=2,fsdp=2,tensor=2`` for 4 steps (each process loads only its half of every batch); then
one process resumes that run's checkpoint on its single device for steps 5 and 6 (another mesh and another
process count), after ``bytescale eval`` read that checkpoint on one device. Every step's loss must equal the
reference's within float32 tolerance. The learning rate is constant so the schedule does not depend on the
total step count.
"""

import json
import os
import socket
import subprocess
import sys

import pytest

from bytescale.train.metrics import read_jsonl
from conftest import background_result, subprocess_env

TEXT = ("Multi-host byte models share one mesh.\x00 Every byte value is trained.\n" * 300).encode()
COMMON = ["--set", "d_model=32", "--set", "num_layers=1", "--set", "mlp_hidden=64", "--set", "head_dim=8",
          "--batch-size", "8", "--seq-len", "32", "--no-progress", "--set", "log_every=1", "--set", "warmup_steps=0",
          "--set", "min_lr_ratio=1.0", "--set", "eval_batches=1", "--set", "checkpoint_every=0", "--lr", "1e-2"]
TOL = 2e-5


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def cli(*args, devices=1):
  return [sys.executable, "-m", "bytescale.cli", "train", *args], subprocess_env(devices)


def run(args, env, timeout=300):
  proc = subprocess.run(args, capture_output=True, text=True, env=env, timeout=timeout)
  if proc.returncode != 0:
    raise AssertionError(f"exit {proc.returncode}: {' '.join(args[3:])}\n{proc.stderr[-4000:]}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


def losses(path):
  by_step = {}
  for record in read_jsonl(path):
    assert record["step"] not in by_step, f"step {record['step']} was logged twice"
    by_step[record["step"]] = record["loss"]
  return by_step


def train_like_one_and_resume(directory) -> dict:
  """Runs everything the test checks, in order, and keeps what it saw; a failed run ends it early (the test then
  fails on that run). A BACKGROUND job: it starts with the session (conftest)."""
  corpus = os.path.join(directory, "corpus.txt")
  with open(corpus, "wb") as f:
    f.write(TEXT)
  reference_out, shared_out = os.path.join(directory, "reference"), os.path.join(directory, "two_processes")
  seen = {"reference": run(*cli("--data", corpus, "--steps", "6", "--out", reference_out, *COMMON))}
  seen["reference_losses"] = losses(os.path.join(reference_out, "metrics.jsonl"))

  port = free_port()
  procs = []
  for process_id in range(2):
    args, env = cli("--data", corpus, "--steps", "4", "--out", shared_out, "--mesh", "data=2,fsdp=2,tensor=2",
                    "--coordinator", f"localhost:{port}", "--num-processes", "2", "--process-id", str(process_id),
                    *COMMON, devices=4)
    procs.append(subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
  outputs = []
  try:
    for proc in procs:
      outputs.append(proc.communicate(timeout=300))
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
  seen["two_processes"] = [(proc.returncode, stdout, stderr) for proc, (stdout, stderr) in zip(procs, outputs)]
  if any(proc.returncode != 0 for proc in procs):
    return seen
  seen["two_process_losses"] = losses(os.path.join(shared_out, "metrics.jsonl"))  # process 0 alone, once a step

  # One process on one device reads the two-process checkpoint for evaluation...
  seen["eval"] = subprocess.run([sys.executable, "-m", "bytescale.cli", "eval", "--ckpt", shared_out, "--data",
                                 corpus, "--max-bytes", "500"], capture_output=True, text=True, env=cli()[1],
                                timeout=300)
  if seen["eval"].returncode != 0:
    return seen
  # ...and resumes it (resharded onto another mesh, data position carried over).
  seen["resumed"] = run(*cli("--data", corpus, "--steps", "6", "--out", shared_out, *COMMON))
  seen["resumed_records"] = read_jsonl(os.path.join(shared_out, "metrics.jsonl"))
  return seen


BACKGROUND = {"runs": train_like_one_and_resume}


@pytest.fixture(scope="module")
def runs(request):
  return background_result(train_like_one_and_resume, request)


def test_two_processes_train_like_one_and_resume_on_another_mesh(runs):
  reference = runs["reference"]
  assert reference["processes"] == 1 and reference["devices"] == 1

  for returncode, _, stderr in runs["two_processes"]:
    assert returncode == 0, f"process exit {returncode}\n{stderr[-4000:]}"
  summaries = [json.loads(stdout.strip().splitlines()[-1]) for _, stdout, _ in runs["two_processes"]]
  for summary in summaries:
    assert summary["processes"] == 2 and summary["devices"] == 8 and summary["steps"] == 4, summary
    assert summary["mesh"] == "data=2,fsdp=2,tensor=2"
  assert summaries[0]["val_bpb"] == summaries[1]["val_bpb"]

  reference_losses = runs["reference_losses"]
  two_process_losses = runs["two_process_losses"]
  assert sorted(two_process_losses) == [1, 2, 3, 4]
  for step in range(1, 5):
    assert abs(two_process_losses[step] - reference_losses[step]) <= TOL, (step, two_process_losses, reference_losses)

  # One process on one device read the two-process checkpoint for evaluation...
  proc = runs["eval"]
  assert proc.returncode == 0, proc.stderr[-4000:]
  evaluated = json.loads(proc.stdout.strip().splitlines()[-1])
  assert evaluated["checkpoint_step"] == 4 and 0 < evaluated["bpb"] < 9

  # ...and resumed it (resharded onto another mesh, data position carried over).
  resumed = runs["resumed"]
  assert resumed["steps"] == 6 and resumed["processes"] == 1
  records = runs["resumed_records"]
  assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
  for record in records[4:]:
    assert abs(record["loss"] - reference_losses[record["step"]]) <= TOL, (record, reference_losses)
  assert abs(resumed["val_bpb"] - reference["val_bpb"]) <= 1e-3
