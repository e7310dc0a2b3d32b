"""BLT (entropy / space / strided patches) against MegaByte and the byte-level baseline at equal training FLOPs.

    python benchmarks/blt_compare.py [--quick] [--data PATH]

1. Trains the entropy model (``bytelm/entropy-tiny``; its FLOPs are excluded from the budget, as in the BLT
   paper) and picks the global threshold giving ``--patch-size`` bytes per patch on a training sample.
2. Every contender gets the same training-FLOP budget: the baseline's FLOPs/byte x bytes of its ``--steps``
   steps. A contender's steps = budget / (its training FLOPs/byte x bytes per step), FLOPs/byte from
   ``bytescale.flops`` (exact convention, causal attention: what a block-skipping kernel computes), with BLT's
   average patch size measured on a training sample first. Same data order, batch, sequence length, optimizer.
3. Training alternates between the contenders in chunks of steps, so machine-load drift hits all of them alike;
   bytes/s excludes each contender's first (compiling) step.
4. Validation bits per byte on the same held-out bytes; average patch size and overflow measured on them.
5. Generation bytes/s (greedy, KV caches), contenders alternated, median of the rounds, compilation excluded.

Results go to ``benchmarks/RESULTS_blt.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import DEFAULT_CORPUS, machine  # noqa: E402

from bytescale.models import registry  # noqa: E402
from bytescale import configs, entropy, flops  # noqa: E402
from bytescale.data.pipeline import ByteCorpus, DataConfig, eval_batches, train_iterator  # noqa: E402
from bytescale.generate import SamplingConfig, frame_prompts, make_sampler  # noqa: E402
from bytescale.models import MODELS, build_model  # noqa: E402
from bytescale.models.blt import BLT, BLTConfig  # noqa: E402
from bytescale.train.checkpoint import load_entropy_model  # noqa: E402
from bytescale.models.blt import flops_per_byte as blt_flops  # noqa: E402
from bytescale.patching import PatchingConfig  # noqa: E402
from bytescale.train.evaluate import evaluate_bpb  # noqa: E402
from bytescale.train.loop import train  # noqa: E402
from bytescale.train.state import init_train_state, make_optimizer  # noqa: E402
from bytescale.train.step import make_eval_step, make_train_step  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS_blt.md")
BATCH_KEYS = ("inputs", "targets", "segment_ids", "loss_mask")


def megabyte_flops(config, seq_len):
  """MegaByte's count when ``bytescale.flops`` has none registered: global stack over T/P patches once per
  patch, the per-position projection D_G x D_L per byte, local stack over P bytes, the unembedding."""
  try:
    return registry.flops_per_byte(config, seq_len)
  except ValueError:
    pass
  p, g, l = config.patch_size, config.global_stack, config.local_stack
  count = flops.stack_flops(g, seq_len // p, prefix="global.").scaled(1.0 / p)
  count += flops.stack_flops(l, p, prefix="local.")
  return count + flops.FlopCount({"projection": 2.0 * config.d_global_embed * l.d_model,
                                  "unembed": 2.0 * l.d_model * 260})


def training_flops(config, seq_len, patch_size=None):
  if isinstance(config, BLTConfig):
    return blt_flops(config, seq_len, patch_size).training
  if type(config).__name__ == "MegaByteConfig":
    return megabyte_flops(config, seq_len).training
  return registry.flops_per_byte(config, seq_len).training


def measured_patch_size(model: BLT, tokens, seq_len, batch_size, max_batches):
  """Bytes per patch and overflow bytes of ``model``'s own patching over the first rows of ``tokens``."""
  graphdef, state = nnx.split(model)
  patch = jax.jit(lambda s, ids, segs: nnx.merge(graphdef, s).patch(ids, segs))
  real = patches = overflow = 0
  for i, batch in enumerate(eval_batches(tokens, seq_len=seq_len, batch_size=batch_size)):
    if i >= max_batches:
      break
    p = patch(state, batch["inputs"], batch["segment_ids"])
    real += int((batch["segment_ids"] != 0).sum())
    patches += int(p.valid_BxM.sum())
    overflow += int(p.overflow_bytes_B.sum())
  return real / max(patches, 1), overflow


@dataclasses.dataclass
class Contender:
  name: str
  config: object
  flops_per_byte: float
  patch_size: float | None = None
  steps: int = 0
  done: int = 0
  seconds: float = 0.0
  timed_steps: int = 0
  state: object = None
  step_fn: object = None
  graphdef: object = None
  iterator: object = None
  last_loss: float = float("nan")


def build(contender: Contender, corpus, data: DataConfig, lr: float):
  tc = configs.TrainConfig(steps=contender.steps, batch_size=data.batch_size, seq_len=data.seq_len,
                           learning_rate=lr, warmup_steps=max(1, contender.steps // 10))
  optimizer = make_optimizer(tc)
  contender.graphdef, contender.state = init_train_state(build_model(contender.config, seed=0), optimizer)
  contender.step_fn = jax.jit(make_train_step(contender.graphdef, optimizer), donate_argnums=0)
  contender.iterator = train_iterator(corpus, data)


def train_chunk(contender: Contender, chunk: int):
  for _ in range(min(chunk, contender.steps - contender.done)):
    batch = {k: v for k, v in next(contender.iterator).items() if k in BATCH_KEYS}
    start = time.perf_counter()
    contender.state, metrics = contender.step_fn(contender.state, batch)
    contender.last_loss = float(jax.device_get(metrics["loss"]))
    if contender.done:  # the first step compiles
      contender.seconds += time.perf_counter() - start
      contender.timed_steps += 1
    contender.done += 1


def generation_rates(contenders, batch_size, new_bytes, rounds):
  """Greedy sampling bytes/s per contender (compiled once, then timed ``rounds`` times, alternating)."""
  ids, lengths = frame_prompts([b"ROMEO:\n"] * batch_size)
  samplers = {}
  for c in contenders:
    model = c.state.model(c.graphdef)
    graphdef, state = nnx.split(model)
    sampler = make_sampler(graphdef, new_bytes, SamplingConfig(temperature=0.0), ids.shape[1] + new_bytes)
    jax.block_until_ready(sampler(state, jnp.asarray(ids), jnp.asarray(lengths), jax.random.key(0)))
    samplers[c.name] = (sampler, state)
  times = {c.name: [] for c in contenders}
  for _ in range(rounds):
    for c in contenders:
      sampler, state = samplers[c.name]
      start = time.perf_counter()
      jax.block_until_ready(sampler(state, jnp.asarray(ids), jnp.asarray(lengths), jax.random.key(0)))
      times[c.name].append(time.perf_counter() - start)
  return {name: batch_size * new_bytes / float(np.median(t)) for name, t in times.items()}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true", help="tiny presets and few steps (CPU minutes)")
  parser.add_argument("--data", default=DEFAULT_CORPUS)
  parser.add_argument("--max-bytes", type=int, default=None)
  parser.add_argument("--preset", default="tiny", help="preset of every contender (bytelm, blt, megabyte)")
  parser.add_argument("--steps", type=int, default=None, help="baseline (bytelm) steps; sets the FLOP budget")
  parser.add_argument("--entropy-steps", type=int, default=None)
  parser.add_argument("--batch-size", type=int, default=None)
  parser.add_argument("--seq-len", type=int, default=None)
  parser.add_argument("--patch-size", type=float, default=4.0, help="target for entropy, stride for strided")
  parser.add_argument("--lr", type=float, default=3e-3)
  parser.add_argument("--eval-batches", type=int, default=None)
  parser.add_argument("--gen-bytes", type=int, default=None)
  args = parser.parse_args()
  quick = args.quick
  steps = args.steps or (120 if quick else 600)
  entropy_steps = args.entropy_steps or (150 if quick else 600)
  batch_size = args.batch_size or 8
  seq_len = args.seq_len or (128 if quick else 256)
  eval_count = args.eval_batches or (8 if quick else 32)
  gen_bytes = args.gen_bytes or (64 if quick else 256)
  max_bytes = args.max_bytes or (1_000_000 if quick else None)
  started = time.perf_counter()

  data = DataConfig(source=args.data, seq_len=seq_len, batch_size=batch_size, max_bytes=max_bytes)
  corpus = ByteCorpus.load(data)
  log(f"{corpus.name}: {len(corpus.train_tokens):,} train / {len(corpus.validation_tokens):,} validation tokens")
  workdir = tempfile.mkdtemp(prefix="blt_compare_")

  # 1. Entropy model and threshold.
  entropy_dir = os.path.join(workdir, "entropy")
  ent = train(registry.get_preset("bytelm", "entropy-tiny"),
              configs.TrainConfig(steps=entropy_steps, batch_size=batch_size, seq_len=seq_len, learning_rate=args.lr),
              data, entropy_dir, preset="entropy-tiny", corpus=corpus, progress=False)
  lm = load_entropy_model(entropy_dir)
  h, segs = entropy.sample_entropies(lm, corpus.train_tokens[: 64 * seq_len], seq_len=seq_len)
  threshold, calibrated = entropy.threshold_for_patch_size(h, segs, args.patch_size)
  log(f"entropy model {ent.summary['val_bpb']:.3f} bpb; threshold {threshold:.4f} -> {calibrated:.2f} bytes/patch")

  # 2. Contenders and the FLOP budget.
  blt = registry.get_preset("blt", args.preset)
  stride = int(round(args.patch_size))
  configs_by_name = {"bytelm": registry.get_preset("bytelm", args.preset)}
  configs_by_name["blt-entropy"] = dataclasses.replace(
      blt, entropy_model=entropy_dir, patching=dataclasses.replace(blt.patching, threshold=threshold,
                                                                   max_patches_ratio=0.5))
  configs_by_name["blt-space"] = dataclasses.replace(blt, patching=PatchingConfig("space", max_patches_ratio=0.5))
  configs_by_name["blt-strided"] = dataclasses.replace(
      blt, patching=PatchingConfig("strided", stride=stride, max_patches_ratio=min(1.0, 1.25 / stride)))
  notes = []
  if "megabyte" in MODELS:
    megabyte = registry.get_preset("megabyte", args.preset)
    configs_by_name["megabyte"] = configs.replace_path(megabyte, "patch_size", str(stride)) \
        if megabyte.patch_size != stride and megabyte.global_stack.d_model % stride == 0 else megabyte
  else:
    notes.append("MegaByte: bytescale.models.megabyte not available in this build, skipped.")
  contenders = []
  for name, config in configs_by_name.items():
    patch_size = None
    if name.startswith("blt"):
      patch_size, _ = measured_patch_size(build_model(config), corpus.train_tokens, seq_len, batch_size, 8)
    contenders.append(Contender(name, config, training_flops(config, seq_len, patch_size), patch_size))
  budget = contenders[0].flops_per_byte * steps * batch_size * seq_len
  for c in contenders:
    c.steps = max(1, round(budget / (c.flops_per_byte * batch_size * seq_len)))
    build(c, corpus, data, args.lr)
    log(f"{c.name}: {c.flops_per_byte:,.0f} training FLOPs/byte -> {c.steps} steps")

  # 3. Training, alternating.
  chunk = 10
  while any(c.done < c.steps for c in contenders):
    for c in contenders:
      train_chunk(c, chunk)
    log("  " + "  ".join(f"{c.name} {c.done}/{c.steps} loss {c.last_loss:.3f}" for c in contenders))

  # 4. Validation.
  rows = []
  for c in contenders:
    frozen = c.state.frozen
    eval_fn = jax.jit(make_eval_step(c.graphdef))
    bpb, count = evaluate_bpb(c.graphdef, c.state.params, corpus.validation_tokens, frozen=frozen, seq_len=seq_len,
                              batch_size=batch_size, max_batches=eval_count, eval_fn=eval_fn)
    val_patch, overflow = (None, 0)
    if c.name.startswith("blt"):
      val_patch, overflow = measured_patch_size(c.state.model(c.graphdef), corpus.validation_tokens, seq_len,
                                                batch_size, eval_count)
    elif c.name == "megabyte":
      val_patch = float(c.config.patch_size)
    rows.append(dict(name=c.name, bpb=bpb, count=count, patch=val_patch, overflow=overflow,
                     params=sum(x.size for x in jax.tree.leaves(c.state.params)),
                     flops=c.flops_per_byte, steps=c.steps, train_bytes=c.steps * batch_size * seq_len,
                     train_rate=c.timed_steps * batch_size * seq_len / max(c.seconds, 1e-9)))
    log(f"{c.name}: {bpb:.4f} bpb over {count:,} bytes")

  # 5. Generation.
  rates = generation_rates(contenders, 4, gen_bytes, rounds=3)
  elapsed = (time.perf_counter() - started) / 60
  write_results(args, rows, rates, notes, ent.summary, threshold, calibrated, dict(
      steps=steps, entropy_steps=entropy_steps, batch_size=batch_size, seq_len=seq_len, eval_count=eval_count,
      gen_bytes=gen_bytes, max_bytes=max_bytes, minutes=elapsed, corpus=corpus.name), budget)


def write_results(args, rows, rates, notes, entropy_summary, threshold, calibrated, run, budget):
  best = min(r["bpb"] for r in rows)
  table = [
      "| model | val bits/byte | avg patch size (val) | train FLOPs/byte | steps | train bytes | params |"
      " train bytes/s | generate bytes/s (batch 4) |",
      "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
  ]
  for r in rows:
    bpb = f"**{r['bpb']:.4f}**" if r["bpb"] == best else f"{r['bpb']:.4f}"
    patch = "1 (bytes)" if r["patch"] is None else f"{r['patch']:.2f}"
    if r["overflow"]:
      patch += f" ({r['overflow']:,} overflow bytes)"
    table.append(f"| {r['name']} | {bpb} | {patch} | {r['flops']:,.0f} | {r['steps']} | {r['train_bytes']:,} | "
                 f"{r['params']:,} | {r['train_rate']:,.0f} | {rates[r['name']]:,.0f} |")
  command = "python benchmarks/blt_compare.py " + " ".join(sys.argv[1:])
  first = f", first {run['max_bytes']:,} bytes" if run["max_bytes"] else ""
  body = "\n".join([
      f"- command: `{command.strip()}`",
      f"- machine: {machine()} (shared CPU: absolute rates are noisy; contenders alternate so ratios are fair)",
      f"- data: `{os.path.basename(run['corpus'])}`{first}; validation = last 10%, {run['eval_count']} batches x "
      f"{args.batch_size or 8} rows x {run['seq_len']} bytes",
      f"- preset `{args.preset}` for every model; batch {args.batch_size or 8} x {run['seq_len']} bytes; AdamW, "
      f"peak lr {args.lr}, warmup 10%, cosine to each run's own step count",
      f"- equal training FLOPs: {budget:.3e} per contender (baseline bytelm x {run['steps']} steps); FLOPs/byte from "
      "`bytescale.flops` (exact convention, causal attention; BLT at its average patch size measured on a training "
      "sample; entropy model and embeddings excluded, as in the BLT paper)",
      f"- entropy model: `bytelm/entropy-tiny`, {run['entropy_steps']} steps, {entropy_summary['val_bpb']:.3f} val "
      f"bpb (its training FLOPs are not in the budget); global threshold {threshold:.4f} nats, calibrated to "
      f"{calibrated:.2f} bytes/patch on a training sample",
      f"- generation: greedy, {run['gen_bytes']} new bytes per row after a 7-byte prompt, KV caches, median of 3 "
      "alternating rounds after compilation",
      f"- total run time {run['minutes']:.1f} min",
      *[f"- {note}" for note in notes],
      "",
      *table,
      "",
      "Bold: lowest bits per byte. These are tiny models trained for minutes on a CPU: the table checks that every "
      "contender trains and decodes end to end under one FLOP budget; it does not reproduce the paper's scaling "
      "results. On CPU the XLA attention computes every masked score, so bytes/s does not follow FLOPs/byte.",
  ])
  from common import write_section

  mode = "quick" if args.quick else "full"
  write_section(RESULTS, f"BLT vs MegaByte vs byte baseline at equal training FLOPs ({mode})", body)
  print(body)


def log(message):
  print(f"[blt_compare] {message}", file=sys.stderr, flush=True)


if __name__ == "__main__":
  main()
