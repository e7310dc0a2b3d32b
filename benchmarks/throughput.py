"""Training and generation bytes/s per model and preset, achieved FLOP/s and MFU.

MFU is against the device's matmul peak measured in the same run (a large float32 matmul on CPU, bf16 on
accelerators), with FLOPs from ``bytescale.flops`` (exact convention, causal attention counted as
the keys a query sees).

    python benchmarks/throughput.py [--quick] [--models bytelm,megabyte,blt] [--presets tiny,small]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import DEFAULT_CORPUS, machine, measured_matmul_peak, write_section  # noqa: E402

from bytescale.models import registry  # noqa: E402
from bytescale import configs  # noqa: E402
from bytescale.configs import TrainConfig  # noqa: E402
from bytescale import patching  # noqa: E402
from bytescale.data.pipeline import ByteCorpus, DataConfig, eval_batches  # noqa: E402
from bytescale.models.registry import flops_per_byte  # noqa: E402
from bytescale.models.blt import flops_per_byte as blt_flops  # noqa: E402
from bytescale.generate import SamplingConfig, generate  # noqa: E402
from bytescale.models import MODELS, build_model  # noqa: E402
from bytescale.train.buckets import PatchBuckets, bucket_slots_for  # noqa: E402
from bytescale.train.state import init_train_state, make_optimizer  # noqa: E402
from bytescale.train.step import make_train_step  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "RESULTS_throughput.md")


def text_batch(source, batch_size, seq_len):
  """One batch of real text (the space patcher's patch sizes, hence BLT's cost, depend on the bytes)."""
  corpus = ByteCorpus.load(DataConfig(source=source, seq_len=seq_len, batch_size=batch_size, max_bytes=2_000_000))
  batch = next(eval_batches(corpus.train_tokens, seq_len=seq_len, batch_size=batch_size))
  return {key: np.asarray(batch[key]) for key in ("inputs", "targets", "segment_ids", "loss_mask")}


def average_space_patch(batch) -> float:
  patches = patching.space(batch["inputs"], batch["segment_ids"])
  return float(np.sum(batch["segment_ids"] != 0) / np.sum(np.asarray(patches.valid_BxM)))


def train_rate(config, batch, steps):
  model = build_model(config)
  optimizer = make_optimizer(TrainConfig(steps=1000))
  graphdef, state = init_train_state(model, optimizer)
  step = jax.jit(make_train_step(graphdef, optimizer), donate_argnums=0)
  batch_size, seq_len = batch["inputs"].shape
  slots = bucket_slots_for(config, seq_len)
  if slots is not None:  # BLT: patches made before the step, cut to a bucket, as the training loop does
    batch, _ = PatchBuckets.plain(graphdef, slots)(state.params, state.frozen, batch)
  state, metrics = step(state, batch)
  jax.block_until_ready(metrics)
  start = time.perf_counter()
  for _ in range(steps):
    state, metrics = step(state, batch)
  jax.block_until_ready(metrics)
  # The step donated the model's original arrays: generate with the trained ones.
  return steps * batch_size * seq_len / (time.perf_counter() - start), state.model(graphdef)


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
  parser.add_argument("--data", default=None, help="text for the batches (default tinyshakespeare, else stdlib)")
  args = parser.parse_args()
  presets = (args.presets or ("tiny" if args.quick else "tiny,small")).split(",")
  seq_len = args.seq_len or (256 if args.quick else 1024)
  steps = args.steps or (5 if args.quick else 20)
  source = args.data or (DEFAULT_CORPUS if os.path.exists(DEFAULT_CORPUS) else "stdlib")
  batch = text_batch(source, args.batch_size, seq_len)
  peak_size, peak_dtype = (1024, "float32") if jax.default_backend() == "cpu" else (8192, "bfloat16")
  rows = []
  for model_name in args.models.split(","):
    if model_name not in MODELS:
      print(f"skipping {model_name}: not available in this build", file=sys.stderr)
      continue
    for preset in presets:
      config = registry.get_preset(model_name, preset)
      if model_name == "blt":  # entropy patching needs a trained entropy model; time the space patcher instead
        config = configs.replace_path(config, "patcher", "space")
      print(f"{model_name}/{preset} ...", file=sys.stderr)
      # Beside each row: the machine is shared and its speed drifts.
      peak = measured_matmul_peak(jnp.dtype(peak_dtype), peak_size)
      bytes_per_s, model = train_rate(config, batch, steps)
      if model_name == "blt":  # counted at the patch size the batch really has
        training_flops = blt_flops(config, seq_len, average_space_patch(batch)).training
      else:
        training_flops = flops_per_byte(config, seq_len).training
      achieved = bytes_per_s * training_flops
      gen_1 = generation_rate(model, 1, args.gen_bytes)
      gen_8 = generation_rate(model, 8, args.gen_bytes)
      params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
      rows.append(f"| {model_name} | {preset} | {params:,} | {seq_len} | {bytes_per_s:,.0f} | "
                  f"{achieved / 1e9:.2f} | {peak / 1e9:.0f} | {100 * achieved / peak:.1f}% | {gen_1:,.0f} | "
                  f"{gen_8:,.0f} |")
      print(rows[-1], file=sys.stderr)
  table = "\n".join([
      f"Machine: {machine()}. Matmul peak: a {peak_size}-square {peak_dtype} matmul, measured just before each "
      f"row's training run.",
      f"Command: `{' '.join(['python benchmarks/throughput.py', *sys.argv[1:]])}`; batch {args.batch_size}, "
      f"{steps} timed steps after compilation on a batch of {os.path.basename(source)}; generation is greedy, "
      f"{args.gen_bytes} new bytes per row. Training FLOPs from `bytescale.flops` (exact, causal attention "
      f"counted as the keys a query sees, 3x forward); BLT times and counts the space patcher (entropy patching "
      f"needs a trained entropy model), at the batch's measured average patch size, with its patches made before the "
      f"step and cut to the smallest `patch_buckets` slot count that holds them (as the training loop does).",
      "",
      "| model | preset | params | seq len | train bytes/s | achieved GFLOP/s | matmul peak GFLOP/s | MFU |"
      " generate bytes/s (batch 1) | generate bytes/s (batch 8) |",
      "|---|---|---|---|---|---|---|---|---|---|",
      *rows,
  ])
  write_section(RESULTS, f"Throughput and MFU ({'quick' if args.quick else 'full'})", table)
  print(table)


if __name__ == "__main__":
  main()
