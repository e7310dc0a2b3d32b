"""Shared fixtures: tiny configs compiled once per session. Tests run on CPU (set before jax is imported).

Compilation, not running, is most of this suite's time on a small CPU, so before jax is imported the suite sets:

* ``--xla_backend_optimization_level=0`` in ``XLA_FLAGS``: LLVM's code optimization off, which compiles the tiny
  test programs several times faster and runs them barely slower. The XLA (HLO) passes, and so fusion, buffer
  assignment and cost analysis, are unchanged; results may differ from the default level in the last bits (e.g.
  where LLVM would contract a multiply-add), which every tolerance here allows, and runs compared bit for bit are
  compiled alike. An ``XLA_FLAGS`` that already names the level wins
  (``XLA_FLAGS=--xla_backend_optimization_level=3 make test`` tests at the level users run).
* a persistent compilation cache in a temporary directory for this session (removed at exit) unless
  ``JAX_COMPILATION_CACHE_DIR`` is set: the ``bytescale`` subprocesses that CLI tests start inherit it, so a program
  one of them compiled (the same model init, train or eval step) is read back by the next, not compiled again.

Tests that start subprocesses build their environment with :func:`subprocess_env` so the children get both. The
longest of them run in the background from the start of the session (see ``BACKGROUND`` below).
"""

import atexit
import concurrent.futures
import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
TEST_XLA_FLAGS = ["--xla_backend_optimization_level=0"]
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""), *TEST_XLA_FLAGS]).strip()
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="bytescale-tests-jax-cache-")
  atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")  # default 1 s: most CLI compiles are less

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from bytescale import configs  # noqa: E402
from bytescale.configs import ByteLMConfig, TransformerConfig  # noqa: E402


def tiny_bytelm_config(**stack_overrides) -> ByteLMConfig:
  stack = TransformerConfig(d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, mlp_hidden=64)
  return ByteLMConfig(stack=configs.dataclasses.replace(stack, **stack_overrides), max_seq_len=64)


def subprocess_env(devices: int | None = None) -> dict[str, str]:
  """The environment for a ``bytescale`` subprocess: this one's (CPU, test XLA flags, compilation cache) with the
  simulated host device count set to ``devices`` (``None``: jax's default of one), never inherited."""
  flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device")]
  if devices is not None:
    flags.append(f"--xla_force_host_platform_device_count={devices}")
  return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=" ".join(flags))


@pytest.fixture
def rng():
  return np.random.default_rng(0)


@pytest.fixture(scope="session")
def tiny_config():
  return tiny_bytelm_config()


# --- Subprocess work started ahead of the tests that read it ------------------------------------------------------
# A test module (and this file, for session fixtures) may declare ``BACKGROUND = {fixture name: job}``, a job being a
# function of a fresh directory that returns what the fixture gives. Once collection shows that a selected test uses
# that fixture, the job starts in a background thread (one job at a time, in test order) and the fixture returns
# ``background_result(job, request)``. The jobs run subprocesses (simulated meshes, several processes, CLI runs) that
# are mostly single-threaded compilation: on a 2-core machine they use the core this process leaves idle while it runs
# the tests before theirs. A job's exception is raised in the test that reads its result.

_BACKGROUND = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="tests-background")
_STARTED: dict[object, concurrent.futures.Future] = {}


def pytest_collection_finish(session):
  if session.config.option.collectonly:
    return
  for item in session.items:
    jobs = {**BACKGROUND, **getattr(getattr(item, "module", None), "BACKGROUND", {})}
    for name in getattr(item, "fixturenames", ()):
      job = jobs.get(name)
      if job is not None and job not in _STARTED:
        directory = tempfile.mkdtemp(prefix=f"bytescale-tests-{name}-")
        atexit.register(shutil.rmtree, directory, ignore_errors=True)
        _STARTED[job] = _BACKGROUND.submit(job, directory)


def pytest_sessionfinish(session):
  _BACKGROUND.shutdown(wait=False, cancel_futures=True)  # jobs of tests that did not run (-x, Ctrl-C) never start


def background_result(job, request):
  """What ``job`` returned: waited for if collection started it, else run now."""
  future = _STARTED.pop(job, None)
  if future is None:
    return job(str(request.getfixturevalue("tmp_path_factory").mktemp(job.__name__)))
  return future.result()


# --- One `bytescale train` run that the CLI tests share -----------------------------------------------------------

CLI_TEXT = ("The quick brown fox jumps over the lazy dog.\x00 Every byte value counts.\n" * 400).encode()
# The tiny ByteLM the CLI tests train: one layer, d 32, 4 rows of 32 bytes a step.
CLI_TINY = ["--set", "d_model=32", "--set", "num_layers=1", "--set", "mlp_hidden=64", "--set", "head_dim=8",
            "--batch-size", "4", "--seq-len", "32", "--no-progress"]
# The shared run: a learning rate at which 24 steps learn more than the byte frequencies; a checkpoint every 4 steps.
CLI_RUN_STEPS = 24
CLI_RUN_FLAGS = ["--set", "log_every=1", "--set", "checkpoint_every=4", *CLI_TINY, "--lr", "1e-2",
                 "--set", "warmup_steps=2"]


def run_cli(*args, check=True, timeout=300) -> subprocess.CompletedProcess:
  """``python -m bytescale.cli ARGS`` in a subprocess; with ``check``, a non-zero exit fails with its stderr."""
  proc = subprocess.run([sys.executable, "-m", "bytescale.cli", *args], capture_output=True, text=True,
                        env=subprocess_env(), timeout=timeout)
  if check and proc.returncode != 0:
    raise AssertionError(f"exit {proc.returncode}\nstdout: {proc.stdout}\nstderr: {proc.stderr[-3000:]}")
  return proc


@dataclasses.dataclass(frozen=True)
class CliRun:
  corpus: str  # the file of CLI_TEXT it trained on
  out: str  # its --out directory: read it; copy it before resuming it (other tests read it after you)
  stdout: str
  stderr: str

  def train_args(self, out: str, steps: int = CLI_RUN_STEPS) -> list[str]:
    """The ``bytescale train`` arguments of this run, writing to ``out`` (``steps``: a longer schedule)."""
    return ["train", "--data", self.corpus, "--steps", str(steps), "--out", out, *CLI_RUN_FLAGS]


def train_cli_run(directory: str) -> CliRun:
  """``bytescale train`` of the tiny ByteLM for CLI_RUN_STEPS steps on CLI_TEXT, in ``directory``."""
  corpus = os.path.join(directory, "corpus.txt")
  with open(corpus, "wb") as f:
    f.write(CLI_TEXT)
  run = CliRun(corpus=corpus, out=os.path.join(directory, "run"), stdout="", stderr="")
  proc = run_cli(*run.train_args(run.out))
  return dataclasses.replace(run, stdout=proc.stdout, stderr=proc.stderr)


BACKGROUND = {"cli_run": train_cli_run}


@pytest.fixture(scope="session")
def cli_run(request) -> CliRun:
  """The one shared CLI run (a BACKGROUND job: it starts with the session)."""
  return background_result(train_cli_run, request)


def assert_close(actual, expected, *, atol, rtol=0.0, what=""):
  actual = np.asarray(actual, np.float64)
  expected = np.asarray(expected, np.float64)
  assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
  np.testing.assert_allclose(actual, expected, atol=atol, rtol=rtol, err_msg=what)


jax.config.update("jax_default_matmul_precision", "highest")
