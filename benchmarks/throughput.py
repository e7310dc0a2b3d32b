"""Training and generation bytes/s per model and preset, achieved FLOP/s and MFU.

MFU is against the device's matmul peak measured in the same run (a large float32 matmul on CPU, bf16 on
accelerators), with FLOPs from ``bytescale.flops`` (exact convention, attention counted as implemented).

    python benchmarks/throughput.py [--quick] [--models bytelm,megabyte,blt] [--presets tiny,small]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine, measured_matmul_peak, write_section  # noqa: E402

from bytescale import configs  # noqa: E402
from bytescale.configs import TrainConfig  # noqa: E402
from bytescale.flops import flops_per_byte  # noqa: E402
from bytescale.generate import SamplingConfig, generate  # noqa: E402
from bytescale.models import MODELS, build_model  # noqa: E402
from bytescale.train.state import init_train_state, make_optimizer  # noqa: E402
from bytescale.train.step import make_train_step  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md")


def random_batch(batch_size, seq_len, seed=0):
  rng = np.random.default_rng(seed)
  ids = rng.integers(0, 256, size=(batch_size, seq_len + 1)).astype(np.int32)
  return {"inputs": ids[:, :-1], "targets": ids[:, 1:], "segment_ids": np.ones((batch_size, seq_len), np.int32),
          "loss_mask": np.ones((batch_size, seq_len), np.float32)}


def train_rate(config, batch_size, seq_len, steps):
  model = build_model(config)
  optimizer = make_optimizer(TrainConfig(steps=1000))
  graphdef, state = init_train_state(model, optimizer)
  step = jax.jit(make_train_step(graphdef, optimizer), donate_argnums=0)
  batch = random_batch(batch_size, seq_len)
  state, metrics = step(state, batch)
  jax.block_until_ready(metrics)
  start = time.perf_counter()
  for _ in range(steps):
    state, metrics = step(state, batch)
  jax.block_until_ready(metrics)
  return steps * batch_size * seq_len / (time.perf_counter() - start), model


def generation_rate(model, batch_size, new_bytes):
  prompts = [b"def main():\n"] * batch_size
  generate(model, prompts, new_bytes, sampling=SamplingConfig(temperature=0.0))  # compile
  start = time.perf_counter()
  generate(model, prompts, new_bytes, sampling=SamplingConfig(temperature=0.0), stop_at_eos=False)
  return batch_size * new_bytes / (time.perf_counter() - start)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true", help="tiny presets, few steps (CPU minutes)")
  parser.add_argument("--models", default="bytelm,megabyte,blt")
  parser.add_argument("--presets", default=None, help="comma-separated (default tiny, plus small unless --quick)")
  parser.add_argument("--seq-len", type=int, default=None)
  parser.add_argument("--batch-size", type=int, default=8)
  parser.add_argument("--steps", type=int, default=None)
  parser.add_argument("--gen-bytes", type=int, default=128)
  args = parser.parse_args()
  presets = (args.presets or ("tiny" if args.quick else "tiny,small")).split(",")
  seq_len = args.seq_len or (256 if args.quick else 1024)
  steps = args.steps or (5 if args.quick else 20)
  peak = measured_matmul_peak()
  print(f"measured matmul peak: {peak / 1e9:.1f} GFLOP/s", file=sys.stderr)
  rows = []
  for model_name in args.models.split(","):
    if model_name not in MODELS:
      print(f"skipping {model_name}: not available in this build", file=sys.stderr)
      continue
    for preset in presets:
      config = configs.get_preset(model_name, preset)
      if model_name == "blt":  # entropy patching needs a trained entropy model; time the space patcher instead
        config = configs.replace_path(config, "patcher", "space")
      print(f"{model_name}/{preset} ...", file=sys.stderr)
      bytes_per_s, model = train_rate(config, args.batch_size, seq_len, steps)
      try:
        training_flops = flops_per_byte(config, seq_len).training
      except ValueError:
        training_flops = float("nan")
      achieved = bytes_per_s * training_flops
      gen_1 = generation_rate(model, 1, args.gen_bytes)
      gen_8 = generation_rate(model, 8, args.gen_bytes)
      params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
      rows.append(f"| {model_name} | {preset} | {params:,} | {seq_len} | {bytes_per_s:,.0f} | "
                  f"{achieved / 1e9:.2f} | {100 * achieved / peak:.1f}% | {gen_1:,.0f} | {gen_8:,.0f} |")
      print(rows[-1], file=sys.stderr)
  table = "\n".join([
      f"Machine: {machine()}. Matmul peak measured in the same run: {peak / 1e9:.1f} GFLOP/s (float32).",
      f"Command: `python benchmarks/throughput.py {' '.join(sys.argv[1:])}`; batch {args.batch_size}, "
      f"{steps} timed steps after compilation; generation is greedy, {args.gen_bytes} new bytes per row.",
      "",
      "| model | preset | params | seq len | train bytes/s | achieved GFLOP/s | MFU | generate bytes/s (batch 1) |"
      " generate bytes/s (batch 8) |",
      "|---|---|---|---|---|---|---|---|---|",
      *rows,
  ])
  write_section(RESULTS, "Throughput and MFU", table)
  print(table)


if __name__ == "__main__":
  main()
