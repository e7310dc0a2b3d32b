"""bytescale's MegaByte against the PyTorch port on PyPI (MEGABYTE-pytorch, CPU torch 2.13.0), same configuration,
measured alternately in one run: training step time and generation bytes/s.

``benchmarks/vs_pytorch.py`` compares all three models (ByteLM, MegaByte, BLT) with their peers at 1k and 4k bytes
per row; this script stays for the MegaByte section of RESULTS_megabyte.md that README and docs/megabyte.md cite.

  bash benchmarks/setup_pytorch_peer.sh                  # once: a separate venv with torch and the peer
  python benchmarks/megabyte_vs_pytorch.py --quick       # a few minutes on a 2-core CPU
  python benchmarks/megabyte_vs_pytorch.py               # more rounds, the peer generates all 512 bytes

Configuration (both): dims (512, 256), depths (6, 4), 8 heads of 64, patches of P=8, K=128 patches (1024 bytes)
per row, batch 4, float32, Adam(W). The two run in separate processes (bytescale in this venv, the peer in its
own venv, which is never a dependency of bytescale); the driver interleaves rounds (one round of steps for one,
then for the other, the order swapped every round), so load on the machine hits both alike.

Generation: 512 bytes after a 512-byte prompt. bytescale: ``bytescale.generate.make_sampler`` (cached decoding:
the global model runs once per patch, the local model once per byte; compiled once, timed on later calls). Peer:
its ``generate()`` (no cache: one full forward per byte), under ``torch.no_grad()`` in eval mode. With
``--quick`` the peer generates only the first 64 of those bytes (a model built with ``max_seq_len=(72, 8)``,
since its ``generate()`` always fills the model's whole length); its later bytes cost more (longer context), so
the quick figure flatters the peer.

Known differences of the peer (its own design, not settings): a token shift in every layer, a LayerNorm+Linear
patch embedder from 8 local-width byte embeddings, a 512 -> 8x256 global-to-local Linear, GELU MLPs (ours are
SwiGLU with the same parameter count), 256 token ids (ours 260), and pad id 0 ignored in its loss (NUL bytes are
never trained there).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from common import DEFAULT_CORPUS, LineWorker, corpus_bytes, random_windows  # noqa: E402  (no jax: peer workers import it too)
RESULTS = os.path.join(HERE, "RESULTS_megabyte.md")
DEFAULT_PEER_PYTHON = "/tmp/bytescale-peer-venv/bin/python"
DIMS, DEPTHS, HEADS, DIM_HEAD, PATCH, PATCHES, BATCH = (512, 256), (6, 4), 8, 64, 8, 128, 4
SEQ_LEN = PATCH * PATCHES
PROMPT_BYTES, GENERATE_BYTES = 512, 512


# --- Workers: each reads one JSON command per line on stdin and answers one JSON line on stdout ---------------

class JaxWorker:
  def __init__(self, args):
    sys.path.insert(0, os.path.dirname(HERE))
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from bytescale.configs import TrainConfig, TransformerConfig
    from bytescale.generate import SamplingConfig, frame_prompts, make_sampler
    from bytescale.models import build_model
    from bytescale.models.megabyte import MegaByteConfig
    from bytescale.train.state import init_train_state, make_optimizer
    from bytescale.train.step import make_train_step

    def stack(d, layers):
      return TransformerConfig(d_model=d, num_layers=layers, num_heads=HEADS, num_kv_heads=HEADS, head_dim=DIM_HEAD,
                               mlp_hidden=-(-(8 * d // 3) // 32) * 32)

    self.jax, self.jnp, self.np = jax, jnp, np
    config = MegaByteConfig(global_stack=stack(DIMS[0], DEPTHS[0]), local_stack=stack(DIMS[1], DEPTHS[1]),
                            patch_size=PATCH, max_seq_len=2 * SEQ_LEN)
    train_config = TrainConfig(steps=10**6, batch_size=BATCH, seq_len=SEQ_LEN, learning_rate=3e-4, warmup_steps=0)
    model = build_model(config, seed=0)
    sampler_graphdef, _ = nnx.split(model)
    self.nnx = nnx
    optimizer = make_optimizer(train_config)
    self.graphdef, self.state = init_train_state(model, optimizer)
    self.params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(self.state.params))
    self.step = jax.jit(make_train_step(self.graphdef, optimizer), donate_argnums=0)
    self.data = corpus_bytes(args.data)
    self.rng = np.random.default_rng(0)
    prompt = bytes(self.data[:PROMPT_BYTES])
    ids, lengths = frame_prompts([prompt])
    self.prompt_ids, self.prompt_lengths = jnp.asarray(ids), jnp.asarray(lengths)
    self.sampler = make_sampler(sampler_graphdef, GENERATE_BYTES, SamplingConfig(temperature=1.0, top_k=25),
                                ids.shape[1] + GENERATE_BYTES)
    self.train(1)  # compile
    self.generate(0)  # compile

  def batch(self):
    rows = random_windows(self.data, self.rng, BATCH, SEQ_LEN + 1).astype(self.np.int32)
    ones = self.np.ones((BATCH, SEQ_LEN), self.np.int32)
    return {"inputs": rows[:, :-1], "targets": rows[:, 1:], "segment_ids": ones,
            "loss_mask": ones.astype(self.np.float32)}

  def train(self, steps):
    times, loss = [], None
    for _ in range(steps):
      batch = self.batch()
      start = time.perf_counter()
      self.state, metrics = self.step(self.state, batch)
      loss = float(metrics["loss"])  # blocks until the step is done
      times.append(time.perf_counter() - start)
    return {"step_seconds": times, "loss": loss}

  def generate(self, seed):
    _, params = self.nnx.split(self.state.model(self.graphdef))  # the trained parameters (train donates buffers)
    start = time.perf_counter()
    out = self.sampler(params, self.prompt_ids, self.prompt_lengths, self.jax.random.key(seed))
    out.block_until_ready()
    return {"seconds": time.perf_counter() - start, "bytes": int(out.shape[1])}


class TorchWorker:
  def __init__(self, args):
    import numpy as np
    import torch
    from MEGABYTE_pytorch import MEGABYTE

    torch.manual_seed(0)
    self.torch, self.np = torch, np

    def build(num_patches):
      return MEGABYTE(num_tokens=256, dim=DIMS, depth=DEPTHS, max_seq_len=(num_patches, PATCH), dim_head=DIM_HEAD,
                      heads=HEADS)

    self.model = build(PATCHES)
    self.params = sum(p.numel() for p in self.model.parameters())
    self.optimizer = torch.optim.Adam(self.model.parameters(), lr=3e-4)
    self.generate_bytes = args.peer_generate_bytes
    total = PROMPT_BYTES + self.generate_bytes
    if total % PATCH:
      raise SystemExit(f"--peer-generate-bytes: prompt + generated ({total}) must be a multiple of {PATCH}")
    self.generator = self.model if total == SEQ_LEN else build(total // PATCH)
    self.generator.eval()
    self.data = corpus_bytes(args.data)
    self.rng = np.random.default_rng(0)
    self.prompt = torch.from_numpy(self.data[:PROMPT_BYTES].astype(np.int64))[None]
    self.train(1)  # warm-up (allocator, threads)
    with torch.no_grad():
      self.generator.generate(torch.from_numpy(self.data[:total - 2].astype(np.int64))[None])

  def train(self, steps):
    times, loss = [], None
    for _ in range(steps):
      ids = self.torch.from_numpy(random_windows(self.data, self.rng, BATCH, SEQ_LEN))
      start = time.perf_counter()
      loss = self.model(ids, return_loss=True)
      loss.backward()
      self.optimizer.step()
      self.optimizer.zero_grad()
      times.append(time.perf_counter() - start)
    return {"step_seconds": times, "loss": float(loss)}

  def generate(self, seed):
    self.torch.manual_seed(seed)
    start = time.perf_counter()
    with self.torch.no_grad():
      out = self.generator.generate(self.prompt)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "bytes": int(out.numel() - PROMPT_BYTES)}


def run_worker(kind: str, args):
  worker = (JaxWorker if kind == "jax" else TorchWorker)(args)
  meta = {"params": worker.params, "python": sys.version.split()[0]}
  if kind == "jax":
    import jax
    meta["framework"] = f"jax {jax.__version__}"
  else:
    import torch
    meta["framework"] = f"torch {torch.__version__} ({torch.get_num_threads()} threads)"
  print(json.dumps({"ready": meta}), flush=True)
  for line in sys.stdin:
    command = json.loads(line)
    if command["cmd"] == "quit":
      break
    result = worker.train(command["steps"]) if command["cmd"] == "train" else worker.generate(command["seed"])
    print(json.dumps(result), flush=True)


# --- Driver ------------------------------------------------------------------------------------------------

class WorkerProcess(LineWorker):
  def __init__(self, name, python, args, log_path):
    command = [python, os.path.abspath(__file__), "--worker", "jax" if name == "bytescale" else "torch",
               "--data", args.data, "--peer-generate-bytes", str(args.peer_generate_bytes)]
    env = dict(os.environ)
    if name == "bytescale":
      env.setdefault("JAX_PLATFORMS", "cpu")
    super().__init__(name, command, log_path, env)
    self.step_seconds, self.generate_rates, self.loss = [], [], None


def machine_line() -> str:
  return (f"{platform.platform()}, {platform.machine()}, {os.cpu_count()} CPUs, "
          f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, "
          f"1-minute load average {os.getloadavg()[0]:.1f} when written")


def drive(args):
  if not os.path.exists(args.peer_python):
    raise SystemExit(f"peer python {args.peer_python} not found; run `bash benchmarks/setup_pytorch_peer.sh` first "
                     f"(or pass --peer-python)")
  workers = [WorkerProcess("bytescale", sys.executable, args, "/tmp/megabyte_vs_pytorch.bytescale.log"),
             WorkerProcess("MEGABYTE-pytorch", args.peer_python, args, "/tmp/megabyte_vs_pytorch.peer.log")]
  try:
    for w in workers:  # one at a time: start-up (compilation) is not measured, but must not overlap the other's
      w.wait_ready()
      print(f"{w.name} ready: {w.meta}", file=sys.stderr, flush=True)
    for r in range(args.rounds):
      for w in (workers if r % 2 == 0 else workers[::-1]):
        result = w.ask({"cmd": "train", "steps": args.steps_per_round})
        w.step_seconds += result["step_seconds"]
        w.loss = result["loss"]
        print(f"round {r} {w.name}: steps {['%.2f' % s for s in result['step_seconds']]} s", file=sys.stderr,
              flush=True)
    for r in range(args.generate_rounds):
      for w in (workers if r % 2 == 0 else workers[::-1]):
        result = w.ask({"cmd": "generate", "seed": r + 1})
        w.generate_rates.append(result["bytes"] / result["seconds"])
        w.generated_bytes = result["bytes"]
        print(f"generate {r} {w.name}: {result['bytes']} bytes in {result['seconds']:.2f} s", file=sys.stderr,
              flush=True)
  finally:
    for w in workers:
      w.close()
  return workers


def report(args, workers, command: str) -> str:
  ours, peer = workers
  step = {w.name: statistics.median(w.step_seconds) for w in workers}
  train_rate = {w.name: BATCH * SEQ_LEN / step[w.name] for w in workers}
  gen_rate = {w.name: statistics.median(w.generate_rates) for w in workers}
  lines = [
      "## MegaByte vs MEGABYTE-pytorch (CPU): training step time and generation",
      "",
      f"`{command}` -- {machine_line()}",
      "",
      f"Same configuration: dims {DIMS}, depths {DEPTHS}, {HEADS} heads of {DIM_HEAD}, P={PATCH}, K={PATCHES} patches "
      f"({SEQ_LEN} bytes) per row, batch {BATCH}, float32. bytescale: {ours.meta['framework']}, Python "
      f"{ours.meta['python']}; peer: MEGABYTE-pytorch with {peer.meta['framework']}, Python {peer.meta['python']}, "
      f"in its own venv. Separate processes, {args.rounds} alternating rounds of {args.steps_per_round} training steps "
      f"each (medians over all steps), then {args.generate_rounds} alternating generation round(s). Generation: "
      f"bytes/s after a {PROMPT_BYTES}-byte prompt; bytescale generates {GENERATE_BYTES} bytes with its KV caches, "
      f"the peer {peer.generated_bytes} bytes with its `generate()` (no cache; under `torch.no_grad()`)"
      + (" -- only the first 64 with --quick, which flatters the peer (its later bytes see a longer context)."
         if peer.generated_bytes < GENERATE_BYTES else "."),
      "",
      "| | params | train step (median s) | train bytes/s | generation bytes/s | final train loss |",
      "|---|---|---|---|---|---|",
  ]
  for w in workers:
    lines.append(f"| {w.name} | {w.meta['params']:,} | {step[w.name]:.3f} | {train_rate[w.name]:,.0f} | "
                 f"{gen_rate[w.name]:,.1f} | {w.loss:.3f} |")
  lines += [
      f"| **bytescale / peer** | | | **{train_rate[ours.name] / train_rate[peer.name]:.2f}x** | "
      f"**{gen_rate[ours.name] / gen_rate[peer.name]:.1f}x** | |",
      "",
      f"All step times (s): bytescale {['%.3f' % s for s in ours.step_seconds]}; "
      f"peer {['%.3f' % s for s in peer.step_seconds]}.",
      "",
      "The goal in issue 3 is bytescale >= 2x the peer's training bytes/s on CPU. Losses are not comparable (the "
      "peer's vocabulary is 256 and it ignores id 0 in its loss; data windows differ).",
  ]
  return "\n".join(lines)


def write_results(section: str):
  title = section.splitlines()[0]
  header = ("# MegaByte benchmarks\n\nWritten by `benchmarks/megabyte_vs_bytelm.py` and "
            "`benchmarks/megabyte_vs_pytorch.py`; each replaces its own section.\n")
  text = open(RESULTS).read() if os.path.exists(RESULTS) else header
  start = text.find(title)
  if start == -1:
    text = text.rstrip() + "\n\n" + section
  else:
    end = text.find("\n## ", start + len(title))
    text = text[:start] + section + (text[end:] if end != -1 else "")
  with open(RESULTS, "w") as f:
    f.write(text.rstrip() + "\n")


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true", help="fewer rounds; the peer generates 64 bytes")
  parser.add_argument("--data", default=DEFAULT_CORPUS,
                      help="corpus file (default: shared/data/tinyshakespeare.txt beside the checkout)")
  parser.add_argument("--peer-python", default=DEFAULT_PEER_PYTHON, help="python of the peer's venv")
  parser.add_argument("--rounds", type=int, default=None)
  parser.add_argument("--steps-per-round", type=int, default=None)
  parser.add_argument("--generate-rounds", type=int, default=None)
  parser.add_argument("--peer-generate-bytes", type=int, default=None)
  parser.add_argument("--no-write", action="store_true")
  parser.add_argument("--worker", choices=("jax", "torch"), help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker:
    args.peer_generate_bytes = args.peer_generate_bytes or GENERATE_BYTES
    run_worker(args.worker, args)
    return
  args.rounds = args.rounds or (3 if args.quick else 6)
  args.steps_per_round = args.steps_per_round or (2 if args.quick else 4)
  args.generate_rounds = args.generate_rounds or (1 if args.quick else 2)
  args.peer_generate_bytes = args.peer_generate_bytes or (64 if args.quick else GENERATE_BYTES)
  workers = drive(args)
  section = report(args, workers, "python benchmarks/" + " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:]))
  print(section)
  if not args.no_write:
    write_results(section)


if __name__ == "__main__":
  main()
