"""Helpers shared by the benchmarks: machine description, timing, results-file writing."""

from __future__ import annotations

import datetime
import os
import platform
import json
import subprocess
import time


# The corpus the benchmarks default to: shared/data/tinyshakespeare.txt beside this checkout (never a copy in the
# repo, never one machine's absolute path); every benchmark takes --data to use another file.
DEFAULT_CORPUS = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data",
                                               "tinyshakespeare.txt"))


def cpu_description() -> str:
  """CPU model, its widest vector extensions and the load average now (figures mean little without them)."""
  model, flags = platform.processor() or platform.machine(), set()
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name") and ":" in line:
          model = line.split(":", 1)[1].strip()
        elif line.startswith("flags") and ":" in line:
          flags = set(line.split(":", 1)[1].split())
  except OSError:
    pass
  vectors = [name for name in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if name in flags] or ["no avx2"]
  load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
  return f"{model} ({'/'.join(vectors)}), load average {load}"


def machine() -> str:
  import jax  # imported here: peer workers (PyTorch venvs without jax) import this module too

  device = jax.devices()[0]
  kind = getattr(device, "device_kind", device.platform)
  return (f"{platform.machine()} {os.cpu_count()} cores, {cpu_description()}, {device.platform}:{kind} "
          f"x{jax.device_count()}, jax {jax.__version__}, {datetime.date.today().isoformat()}")


def time_call(fn, *, repeats: int = 5, warmup: int = 1) -> float:
  """Median seconds of ``fn()`` (which must block until its result is ready)."""
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  times.sort()
  return times[len(times) // 2]


def measured_matmul_peak(dtype=None, size: int | None = None) -> float:
  """FLOP/s of a large square matmul (float32 unless ``dtype``) on the default device, measured now (not a
  datasheet number)."""
  import jax
  import jax.numpy as jnp

  dtype = jnp.float32 if dtype is None else dtype
  size = size or (1024 if jax.default_backend() == "cpu" else 8192)
  a = jnp.ones((size, size), dtype)
  matmul = jax.jit(lambda x, y: x @ y)
  seconds = time_call(lambda: matmul(a, a).block_until_ready(), repeats=5)
  return 2 * size**3 / seconds


def corpus_bytes(path: str):
  """The corpus file as uint8 (numpy only: the PyTorch peers' workers use it too)."""
  import numpy as np

  with open(path, "rb") as f:
    return np.frombuffer(f.read(), dtype=np.uint8)


def random_windows(data, rng, count: int, length: int):
  """``count`` windows of ``length`` bytes at random offsets of ``data``, int64 ``count x length``."""
  import numpy as np

  starts = rng.integers(0, len(data) - length, size=count)
  return np.stack([data[s:s + length] for s in starts]).astype(np.int64)


def write_section(path: str, title: str, body: str):
  """Replaces (or appends) the section ``## title`` of a markdown results file."""
  text = open(path).read() if os.path.exists(path) else "# Benchmark results\n"
  header = f"## {title}"
  start = text.find(header + "\n")
  section = f"{header}\n\n{body.strip()}\n\n"
  if start == -1:
    text = text.rstrip() + "\n\n" + section
  else:
    end = text.find("\n## ", start + len(header))
    text = text[:start] + section + (text[end + 1:] if end != -1 else "")
  with open(path, "w") as f:
    f.write(text.rstrip() + "\n")


class LineWorker:
  """A benchmark worker in its own process, spoken to in JSON lines: it prints ``{"ready": meta}`` once, then
  answers one line per command; ``{"cmd": "quit"}`` ends it. Its stderr goes to ``log_path``."""

  def __init__(self, name: str, command: list[str], log_path: str, env: dict, *, quit_timeout: float = 60):
    self.name = name
    self.log = open(log_path, "w")
    self.proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True,
                                 env=env)
    self.meta = None
    self.quit_timeout = quit_timeout

  def wait_ready(self):
    line = self.proc.stdout.readline()
    if not line:
      raise SystemExit(f"{self.name} worker failed to start; see {self.log.name}")
    self.meta = json.loads(line)["ready"]

  def ask(self, command: dict) -> dict:
    self.proc.stdin.write(json.dumps(command) + "\n")
    self.proc.stdin.flush()
    line = self.proc.stdout.readline()
    if not line:
      raise SystemExit(f"{self.name} worker died; see {self.log.name}")
    return json.loads(line)

  def close(self):
    try:
      self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
      self.proc.stdin.flush()
    except BrokenPipeError:
      pass
    self.proc.wait(timeout=self.quit_timeout)
    self.log.close()

