"""Every evaluation suite (noise, chars, passkey, induction) on ByteLM, MegaByte, BLT and ByteLM + 4 multi-token
heads, trained at equal training FLOPs on the same corpus.

    python benchmarks/eval_suite.py --quick   # CPU, a few minutes
    python benchmarks/eval_suite.py           # more steps, more examples

1. BLT's entropy model (``bytelm/entropy-tiny``) is trained first, as ``examples/train_blt.py`` does, and the
   global threshold is calibrated to ``--patch-size`` bytes per patch on a training sample; its FLOPs are not in
   the budget (as in the BLT paper).
2. Budget: ByteLM's training FLOPs/byte x the bytes of ``--steps`` steps. Each contender's steps = budget /
   (its ``registry.flops_per_byte(config, seq_len).training`` x bytes per step); BLT is counted at its average
   patch size measured on a training sample. Same data order, batch, sequence length, optimizer.
3. Each trained model runs every suite (``bytescale.evals.suites.run_suites``) on the held-out validation split,
   with the sizes ``SuiteSettings.for_seq_len(seq_len)`` picks (what ``bytescale eval --suite all`` does).

Results: one table in ``benchmarks/RESULTS_eval.md`` (machine, load, jax version and date beside it) and a bar
chart, ``benchmarks/eval_suite.png`` (``eval_suite_quick.png`` with ``--quick``).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from benchmarks.common import DEFAULT_CORPUS, machine, write_section  # noqa: E402
from bytescale import configs, entropy  # noqa: E402
from bytescale.data.pipeline import ByteCorpus, DataConfig, eval_batches  # noqa: E402
from bytescale.evals import suites  # noqa: E402
from bytescale.models import registry  # noqa: E402
from bytescale.models.mtp import MultiTokenConfig  # noqa: E402
from bytescale.train.checkpoint import load_entropy_model  # noqa: E402
from bytescale.train.loop import train  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "RESULTS_eval.md")


def chart_path(quick: bool) -> str:
  return os.path.join(HERE, "eval_suite_quick.png" if quick else "eval_suite.png")


def log(message):
  print(f"[eval_suite] {message}", file=sys.stderr, flush=True)


def measured_patch_size(model, tokens, seq_len: int, batch_size: int, batches: int) -> float:
  """Bytes per patch of a BLT's own patching over the first rows of ``tokens``."""
  graphdef, state = nnx.split(model)
  patch = jax.jit(lambda s, ids, segs: nnx.merge(graphdef, s).patch(ids, segs))
  real = patches = 0
  for i, batch in enumerate(eval_batches(tokens, seq_len=seq_len, batch_size=batch_size)):
    if i >= batches:
      break
    p = patch(state, batch["inputs"], batch["segment_ids"])
    real += int((batch["segment_ids"] != 0).sum())
    patches += int(p.valid_BxM.sum())
  return real / max(patches, 1)


def contenders(args, corpus, data, workdir):
  """``[(name, config, training FLOPs/byte, note)]``, BLT's entropy model trained on the way."""
  seq = args.seq_len
  bytelm = dataclasses.replace(registry.get_preset("bytelm", args.preset), max_seq_len=seq)
  megabyte = registry.get_preset("megabyte", args.preset)
  log(f"training the entropy model (bytelm/entropy-tiny, {args.entropy_steps} steps)")
  entropy_dir = os.path.join(workdir, "entropy")
  ent = train(registry.get_preset("bytelm", "entropy-tiny"),
              configs.TrainConfig(steps=args.entropy_steps, batch_size=args.batch_size, seq_len=seq,
                                  learning_rate=args.lr, warmup_steps=max(1, args.entropy_steps // 10)),
              data, entropy_dir, preset="entropy-tiny", corpus=corpus, progress=False)
  lm = load_entropy_model(entropy_dir)
  h, segs = entropy.sample_entropies(lm, corpus.train_tokens[:64 * seq], seq_len=seq)
  threshold, calibrated = entropy.threshold_for_patch_size(h, segs, args.patch_size)
  blt = registry.get_preset("blt", args.preset)
  blt = dataclasses.replace(blt, entropy_model=entropy_dir,
                            patching=dataclasses.replace(blt.patching, threshold=threshold))
  patch_size = measured_patch_size(registry.build_model(blt, entropy_lm=lm), corpus.train_tokens, seq,
                                   args.batch_size, 8)
  blt_note = (f"entropy model {ent.summary['val_bpb']:.3f} val bpb after {args.entropy_steps} steps; threshold "
              f"{threshold:.4f} nats (calibrated to {calibrated:.2f} bytes/patch), {patch_size:.2f} measured")
  mtp = MultiTokenConfig(trunk=bytelm, mtp_heads=4)
  return [
      ("ByteLM", bytelm, registry.flops_per_byte(bytelm, seq).training, ""),
      ("MegaByte", megabyte, registry.flops_per_byte(megabyte, seq).training, f"P={megabyte.patch_size}"),
      ("BLT (entropy)", blt, registry.spec_for(blt).flops(blt, seq, patch_size).training, blt_note),
      ("ByteLM+MTP(n=4)", mtp, registry.flops_per_byte(mtp, seq).training, "4 parallel heads added to ByteLM"),
  ]


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true", help="few steps and examples (CPU, a few minutes)")
  parser.add_argument("--data", default=DEFAULT_CORPUS)
  parser.add_argument("--max-bytes", type=int, default=None, help="read at most this many corpus bytes")
  parser.add_argument("--preset", default="tiny", help="preset of ByteLM, MegaByte and BLT (default tiny)")
  parser.add_argument("--steps", type=int, default=None, help="ByteLM's steps: set the FLOP budget")
  parser.add_argument("--entropy-steps", type=int, default=None)
  parser.add_argument("--batch-size", type=int, default=8)
  parser.add_argument("--seq-len", type=int, default=None)
  parser.add_argument("--lr", type=float, default=3e-3)
  parser.add_argument("--patch-size", type=float, default=4.0, help="BLT's target bytes per patch")
  parser.add_argument("--examples", type=int, default=None, help="examples per task (default: quick 8, else each "
                      "suite's default)")
  parser.add_argument("--seed", type=int, default=0, help="seed of the task generators")
  args = parser.parse_args()
  args.steps = args.steps or (150 if args.quick else 600)
  args.entropy_steps = args.entropy_steps or (100 if args.quick else 300)
  args.seq_len = args.seq_len or (128 if args.quick else 256)
  args.max_bytes = args.max_bytes or (400_000 if args.quick else None)
  examples = args.examples or (8 if args.quick else None)
  machine_at_start = machine()  # with the load average before this run adds to it
  started = time.perf_counter()

  data = DataConfig(source=args.data, seq_len=args.seq_len, batch_size=args.batch_size, max_bytes=args.max_bytes)
  corpus = ByteCorpus.load(data)
  text = suites.stream_text(corpus.validation_tokens)
  log(f"{corpus.name}: {len(corpus.train_tokens):,} train / {len(corpus.validation_tokens):,} held-out tokens")
  workdir = tempfile.mkdtemp(prefix="eval_suite_")
  entries = contenders(args, corpus, data, workdir)
  budget = entries[0][2] * args.steps * args.batch_size * args.seq_len
  settings = suites.SuiteSettings.for_seq_len(args.seq_len, seed=args.seed, examples=examples)
  runs = []
  for i, (name, config, flops_per_byte, note) in enumerate(entries):
    steps = max(1, round(budget / (flops_per_byte * args.batch_size * args.seq_len)))
    log(f"{name}: {flops_per_byte:,.0f} training FLOPs/byte -> {steps} steps")
    tc = configs.TrainConfig(steps=steps, batch_size=args.batch_size, seq_len=args.seq_len, learning_rate=args.lr,
                             warmup_steps=max(1, steps // 10), log_every=max(1, steps // 5), checkpoint_every=0)
    result = train(config, tc, data, os.path.join(workdir, f"model{i}"), corpus=corpus, progress=False)
    log(f"{name}: val bpb {result.summary['val_bpb']:.4f}; running the suites")
    tick = time.perf_counter()
    scores = suites.run_suites(result.model, suites.SUITE_NAMES, text, settings, batch_size=16, progress=True)
    log(f"{name}: suites done in {time.perf_counter() - tick:.0f} s")
    runs.append(dict(name=name, steps=steps, flops=flops_per_byte, note=note, summary=result.summary,
                     scores=scores))
  minutes = (time.perf_counter() - started) / 60
  write_results(args, runs, settings, budget, machine_at_start, minutes)
  chart(runs, settings, chart_path(args.quick))


HEADLINE = [  # (suite, score, label) shown in the chart
    ("noise", "mixed@0.1", "noise: bpb increase, mixed@0.1 (lower is better)"),
    ("chars", "choice", "chars: choice accuracy (chance 0.25)"),
    ("chars", "exact", "chars: greedy exact match"),
    ("passkey", "mean", "passkey: retrieval accuracy"),
    ("induction", "letters/L={L}", "induction: next-byte accuracy, letters L={L}"),
    ("induction", "bytes/L={L}", "induction: next-byte accuracy, bytes L={L}"),
]


def _headline(settings):
  longest = max(settings.induction_lengths)
  return [(suite, score.format(L=longest), label.format(L=longest)) for suite, score, label in HEADLINE]


def write_results(args, runs, settings, budget, machine_at_start, minutes):
  names = [r["name"] for r in runs]
  rows = [
      "| score | " + " | ".join(names) + " |",
      "|---|" + "---:|" * len(runs),
      "| training FLOPs/byte | " + " | ".join(f"{r['flops']:,.0f}" for r in runs) + " |",
      "| steps (equal FLOPs) | " + " | ".join(str(r["steps"]) for r in runs) + " |",
      "| params | " + " | ".join(f"{r['summary']['params']:,}" for r in runs) + " |",
      "| validation bpb | " + " | ".join(f"{r['summary']['val_bpb']:.4f}" for r in runs) + " |",
  ]
  keys = []
  for r in runs:
    for suite, result in r["scores"]["suites"].items():
      for key in result["scores"]:
        if (suite, key) not in keys:
          keys.append((suite, key))
  for suite, key in keys:
    cells = []
    for r in runs:
      value = r["scores"]["suites"][suite]["scores"].get(key)
      cells.append("-" if value is None else f"{value:+.4f}" if suite == "noise" and key != "clean_bpb"
                   else f"{value:.4f}")
    rows.append(f"| {suite}: {key} | " + " | ".join(cells) + " |")
  rows.append("| bytes evaluated | " + " | ".join(f"{r['scores']['bytes_evaluated']:,}" for r in runs) + " |")
  command = "python benchmarks/eval_suite.py " + " ".join(sys.argv[1:])
  first = f", first {args.max_bytes:,} bytes" if args.max_bytes else ""
  examples = "each suite's default" if settings.examples is None else settings.examples
  body = "\n".join([
      f"- command: `{command.strip()}`",
      f"- machine: {machine_at_start} (load average at the start; a shared machine: no speed figures here)",
      f"- data: `{os.path.basename(args.data)}`{first}; training on the first 90%, every suite on the held-out 10%",
      f"- training: preset `{args.preset}`, batch {args.batch_size} x {args.seq_len} bytes, AdamW peak lr {args.lr}, "
      f"warmup 10%, cosine; equal training FLOPs {budget:.3e} each (ByteLM x {args.steps} steps), FLOPs/byte from "
      "`registry.flops_per_byte(config, seq_len).training` (BLT at its measured average patch size)",
      *[f"- {r['name']}: {r['note']}" for r in runs if r["note"]],
      f"- suites: `SuiteSettings.for_seq_len({args.seq_len})`, seed {settings.seed}, examples per task: {examples}; "
      f"noise windows {settings.context_chars} + {settings.continuation_chars} characters, levels "
      f"{', '.join(f'{x:g}' for x in settings.noise_levels)}; chars {settings.shots}-shot; passkey lengths "
      f"{', '.join(map(str, settings.passkey_lengths))} at depths "
      f"{', '.join(f'{x:g}' for x in settings.passkey_depths)}; induction lengths "
      f"{', '.join(map(str, settings.induction_lengths))} (docs/evals.md)",
      f"- total run time {minutes:.1f} min",
      "",
      *rows,
      "",
      "Noise rows are increases in bits per byte of the clean continuation over the clean context (lower is "
      "more robust); accuracies are fractions. Chars choice accuracy can fall below chance (0.25): the distractors "
      "include the task done wrongly (the word left unchanged, the operation on another letter), which reads more "
      "like ordinary text than the right answer does to a model that does not follow the instruction. Induction "
      "`/first` is the same positions of the first copy (nothing to copy yet: the baseline), `/headK` the K-th "
      "multi-token head (predicting K bytes ahead). These are tiny models trained for minutes on a CPU: the table "
      "shows the suites run end to end on every model under one FLOP budget, not the papers' results at scale.",
      "",
      f"![eval suite]({os.path.basename(chart_path(args.quick))})",
  ])
  mode = "quick" if args.quick else "full"
  write_section(RESULTS, f"Evaluation suites at equal training FLOPs ({mode})", body)
  print(body)


def chart(runs, settings, path):
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  headline = _headline(settings)
  fig, axes = plt.subplots(2, (len(headline) + 1) // 2, figsize=(11, 6.5))
  colors = ["#4c72b0", "#dd8452", "#55a868", "#c44e52"]
  for ax, (suite, score, label) in zip(axes.flat, headline):
    values = [r["scores"]["suites"][suite]["scores"][score] for r in runs]
    x = np.arange(len(runs), dtype=float)
    if suite == "induction":  # beside each bar: the same positions of the first copy (nothing to copy yet)
      baseline = [r["scores"]["suites"][suite]["scores"][score + "/first"] for r in runs]
      ax.bar_label(ax.bar(x + 0.2, baseline, width=0.4, color=colors[:len(runs)], alpha=0.35,
                          label="1st copy (no copying)"), fmt="%.3f", fontsize=6)
      x -= 0.2
    bars = ax.bar(x, values, width=0.4 if suite == "induction" else 0.8, color=colors[:len(runs)])
    ax.bar_label(bars, fmt="%.3f", fontsize=7)
    ax.set_xticks(range(len(runs)), [r["name"] for r in runs], rotation=20, ha="right", fontsize=8)
    ax.set_title(label, fontsize=9)
    ax.axhline(0, color="black", linewidth=0.5)
    if suite == "chars" and score == "choice":
      ax.axhline(0.25, color="gray", linestyle="--", linewidth=0.8, label="chance")
    if ax.get_legend_handles_labels()[0]:
      ax.legend(fontsize=7, loc="upper right")
    ax.set_ylim(min(0.0, min(values)) * 1.25, max(max(values) * 1.4, 0.05, 0.3 if score == "choice" else 0.0))
  fig.suptitle(f"Evaluation suites, equal training FLOPs ({datetime.date.today().isoformat()})", fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  log(f"wrote {path}")


if __name__ == "__main__":
  main()
