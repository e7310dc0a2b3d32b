"""BLT train step with bucketed patch slots against the full ``max_patches``, alternating in one process.

    python benchmarks/blt_buckets.py [--data PATH] [--seq-len 1024] [--batch 4] [--rounds 3] [--steps 3]
                                     [--entropy-model DIR [--target-patch-size 4.5]] [--no-write]

BLT ``small`` (``max_patches_ratio`` 0.5: 512 slots per 1,024 bytes) trained through ``bytescale.train.loop``'s
``sharded_training`` twice from the same initialisation: ``full`` with ``patch_buckets=[]`` (patches computed inside
the jitted step at the full size, the path before buckets) and ``bucketed`` with the default ``patch_buckets``
(patches computed before the step, the step run at the smallest bucket holding the batch's largest row). The
bucketed time includes the patcher, the host read of the patch count and the cut. Both run the same batches
(random windows of the corpus), alternating round by round; every bucket a batch needs is compiled in a warm-up
pass first. Patching: the preset's entropy patching needs a trained entropy model, so the default is space patching
(``--entropy-model DIR`` uses entropy patching with that model, its threshold calibrated to ``--target-patch-size``
on the benchmark's batches).

Results go to ``benchmarks/RESULTS_blt.md`` (one section per patcher, "Bucketed patch slots ..."; a rerun replaces it).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import DEFAULT_CORPUS, corpus_bytes, machine, random_windows, write_section  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from bytescale import configs, entropy  # noqa: E402
from bytescale.models import registry  # noqa: E402
from bytescale.parallel import MeshConfig, make_mesh  # noqa: E402
from bytescale.patching import PatchingConfig  # noqa: E402
from bytescale.train.checkpoint import load_entropy_model, read_meta  # noqa: E402
from bytescale.train.loop import sharded_training  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS_blt.md")
TITLE = "Bucketed patch slots: the global model over the patches that exist"


def blt_config(args, windows):
  """The ``small`` preset at ``--seq-len``: space patching, or entropy patching with ``--entropy-model``."""
  preset = registry.get_preset("blt", "small")
  ratio = preset.patching.max_patches_ratio
  if args.entropy_model is None:
    patching, note = PatchingConfig("space", max_patches_ratio=ratio), "space (the preset's entropy patching needs " \
        "a trained entropy model; pass --entropy-model DIR)"
  else:
    lm = load_entropy_model(args.entropy_model)
    h, segments = entropy.sample_entropies(lm, windows.reshape(-1), seq_len=args.seq_len)
    threshold, size = entropy.threshold_for_patch_size(h, segments, args.target_patch_size)
    patching = PatchingConfig("entropy", threshold=threshold, max_patches_ratio=ratio)
    meta = read_meta(args.entropy_model)
    tc = meta["train_config"]
    source = os.path.basename(str(meta["data_config"]["source"]))
    note = (f"entropy, model `{meta['model']}/{meta['preset']}` ({meta['step']} steps of {tc['batch_size']} x "
            f"{tc['seq_len']} bytes of `{source}`), threshold {threshold:.4f} ({size:.2f} bytes/patch on these "
            "batches)")
  config = dataclasses.replace(preset, max_seq_len=args.seq_len, patching=patching,
                               entropy_model=args.entropy_model)
  return config, note


def make_batches(args):
  data = corpus_bytes(args.data)
  rng = np.random.default_rng(0)
  windows = random_windows(data, rng, args.batches * args.batch, args.seq_len + 1).astype(np.int32)
  batches = []
  for rows in windows.reshape(args.batches, args.batch, -1):
    ones = np.ones((args.batch, args.seq_len), np.int32)
    batches.append({"inputs": rows[:, :-1], "targets": rows[:, 1:], "segment_ids": ones,
                    "loss_mask": ones.astype(np.float32)})
  return batches, windows[:, :-1]


class Contender:
  def __init__(self, name, model_config, train_config):
    self.name = name
    self.setup = sharded_training(model_config, train_config, make_mesh(MeshConfig()))
    self.state = self.setup.init_state()
    self.times, self.used, self.patch_sizes = [], [], []

  def step(self, batch, record: bool):
    start = time.perf_counter()
    self.state, metrics = self.setup.train_step(self.state, self.setup.shard_batch(batch))
    metrics = jax.device_get(metrics)  # what the training loop does after every step
    elapsed = time.perf_counter() - start
    if record:
      self.times.append(elapsed)
      self.used.append((metrics.get("max_row_patches"), metrics.get("patch_slots")))
      self.patch_sizes.append(float(metrics["average_patch_size"]))
    return float(metrics["loss"])


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--data", default=DEFAULT_CORPUS)
  parser.add_argument("--seq-len", type=int, default=1024)
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--batches", type=int, default=6, help="distinct batches, cycled through")
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--steps", type=int, default=3, help="steps per contender per round")
  parser.add_argument("--entropy-model", default=None)
  parser.add_argument("--target-patch-size", type=float, default=4.5)
  parser.add_argument("--no-write", action="store_true")
  args = parser.parse_args()
  if not os.path.exists(args.data):
    raise SystemExit(f"--data: {args.data} does not exist; pass a text file")

  started = time.perf_counter()
  machine_line = machine()
  batches, windows = make_batches(args)
  config, patching_note = blt_config(args, windows)
  train_config = configs.TrainConfig(steps=10**6, batch_size=args.batch, seq_len=args.seq_len, warmup_steps=0)
  off = configs.replace_path(config, "patch_buckets", "[]")
  contenders = [Contender("full", off, train_config), Contender("bucketed", config, train_config)]
  bucket_slots = config.patching.bucket_slots(args.seq_len)

  compile_seconds = {}
  for c in contenders:  # warm-up: every batch once (compiles every bucket the batches need)
    start = time.perf_counter()
    for batch in tqdm(batches, desc=f"warm-up {c.name}", file=sys.stderr):
      c.step(batch, record=False)
    compile_seconds[c.name] = time.perf_counter() - start

  losses = {c.name: [] for c in contenders}
  at = 0
  for _ in tqdm(range(args.rounds), desc="rounds", file=sys.stderr):
    for c in contenders:
      for i in range(args.steps):
        losses[c.name].append(c.step(batches[(at + i) % len(batches)], record=True))
    at += args.steps
  load_end = ", ".join(f"{x:.2f}" for x in os.getloadavg())

  full, bucketed = contenders
  t_full, t_bucketed = statistics.median(full.times), statistics.median(bucketed.times)
  counts = [count for count, _ in bucketed.used]
  slots_used = sorted({slots for _, slots in bucketed.used})
  full_slots = config.patching.max_patches(args.seq_len)
  bytes_per_step = args.batch * args.seq_len
  per_row = args.seq_len / statistics.mean(bucketed.patch_sizes)
  rows = [
      "| variant | global-model slots | median step s | train bytes/s | steps timed |",
      "|---|---|---:|---:|---:|",
      f"| full `max_patches` | {full_slots} | {t_full:.3f} | {bytes_per_step / t_full:,.0f} | {len(full.times)} |",
      f"| bucketed | {', '.join(map(str, slots_used))} | {t_bucketed:.3f} | {bytes_per_step / t_bucketed:,.0f} | "
      f"{len(bucketed.times)} |",
  ]
  body = "\n".join([
      f"- command: `python benchmarks/blt_buckets.py{_flags(args)}`",
      f"- machine: {machine_line}; load average at the end {load_end}. **Taken under load** (the machine was shared "
      "with other engineers' jobs): the ratio is indicative only, absolute times are not comparable to other runs",
      f"- model: BLT `small` (global d 256 x 4 layers), {args.batch} x {args.seq_len} bytes of "
      f"`{os.path.basename(args.data)}` ({args.batches} random windows, cycled); AdamW step through "
      "`bytescale.train.loop.sharded_training`, one device",
      f"- patching: {patching_note}; `max_patches_ratio` {config.patching.max_patches_ratio} -> {full_slots} slots; "
      f"buckets {list(bucket_slots)} (`patch_buckets` {list(config.patching.patch_buckets)})",
      f"- patches: {per_row:.0f} per row on average, largest row per batch {min(counts)}-{max(counts)} "
      f"-> slots used {slots_used} of {full_slots}",
      f"- alternating: {args.rounds} rounds x {args.steps} steps per variant, medians; warm-up (compilation, every "
      f"batch once): full {compile_seconds['full']:.0f} s, bucketed {compile_seconds['bucketed']:.0f} s "
      f"({len(slots_used)} bucket(s) compiled)",
      f"- losses equal step for step (same init, same batches): max |difference| "
      f"{max(abs(a - b) for a, b in zip(losses['full'], losses['bucketed'])):.2e}",
      "",
      *rows,
      "",
      f"Step time full / bucketed: **{t_full / t_bucketed:.2f}x** (under load; total run "
      f"{(time.perf_counter() - started) / 60:.1f} min).",
  ])
  print(body)
  if not args.no_write:
    write_section(RESULTS, f"{TITLE} ({config.patching.patcher} patching)", body)
    print(f"wrote {RESULTS}", file=sys.stderr)


def _flags(args) -> str:
  defaults = {"data": DEFAULT_CORPUS, "seq_len": 1024, "batch": 4, "batches": 6, "rounds": 3, "steps": 3,
              "entropy_model": None, "target_patch_size": 4.5, "no_write": False}
  return "".join(f" --{k.replace('_', '-')} {v}" if not isinstance(v, bool) else f" --{k.replace('_', '-')}"
                 for k, v in vars(args).items() if v != defaults[k])


if __name__ == "__main__":
  main()
