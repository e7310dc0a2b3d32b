"""BLT with the reference's options (``blt.reference_options``) against bytescale's defaults, one option at a time.

    python benchmarks/blt_reference_options.py [--steps 600] [--seeds 0,1] [--data PATH] [--no-write]

Trains the BLT ``tiny`` preset with space patching (no entropy model needed) through ``bytescale.train`` for each
variant below: same steps, batch, sequence length, optimizer; per seed the same initialisation seed and data order
(``TrainConfig.seed`` and ``DataConfig.seed`` both set to the seed). The first seed runs every variant; the other
seeds run only ``ours`` and ``reference``, so the spread between seeds says how large a difference must be before
it means anything. Each run is scored on the whole held-out split (the corpus' last 10%, never trained on).

Variants (issue #14: keep our own variant only where it is measurably better):

- ``ours``: the preset as is (``PatchingConfig("space")``);
- ``reference``: ``reference_options(ours)``, every option the reference's way;
- ``completed-patch``: ours + ``decoder_context="completed_patch"`` (+ ``patching.bos_patch``, which it needs);
- ``reference-hash``: ours + ``hash_function="reference"``, ``hash_embedding_sum="plain"``;
- ``decoder-cross-every-layer``: ours + ``decoder_cross_every_layer=True``.

Results go to ``benchmarks/RESULTS_blt.md`` (section "Reference options vs bytescale's defaults").
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import DEFAULT_CORPUS, machine, write_section  # noqa: E402
from blt_compare import measured_patch_size  # noqa: E402

from bytescale import configs  # noqa: E402
from bytescale.data.pipeline import ByteCorpus, DataConfig, eval_batches  # noqa: E402
from bytescale.models import registry  # noqa: E402
from bytescale.models.blt import reference_options  # noqa: E402
from bytescale.patching import PatchingConfig  # noqa: E402
from bytescale.train.loop import train  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS_blt.md")
TITLE = "Reference options vs bytescale's defaults"
LOSS_WINDOW = 50  # "train loss at the end": the mean of the last steps' losses (one batch's loss is noisy)


def variants(preset: str) -> dict[str, tuple[object, str]]:
  """name -> (BLTConfig, what differs from ``ours``)."""
  base = registry.get_preset("blt", preset)
  ours = dataclasses.replace(base, patching=PatchingConfig("space", max_patches_ratio=base.patching.max_patches_ratio))
  bos_patch = dataclasses.replace(ours.patching, bos_patch=True)
  return {
      "ours": (ours, "the preset, space patching"),
      "reference": (reference_options(ours), "`reference_options(ours)`"),
      "completed-patch": (dataclasses.replace(ours, patching=bos_patch, decoder_context="completed_patch"),
                          "`decoder_context=completed_patch`, `bos_patch`"),
      "reference-hash": (dataclasses.replace(ours, hash_function="reference", hash_embedding_sum="plain"),
                         "`hash_function=reference`, `hash_embedding_sum=plain`"),
      "decoder-cross-every-layer": (dataclasses.replace(ours, decoder_cross_every_layer=True),
                                    "`decoder_cross_every_layer`"),
  }


def run_one(name, config, seed, args, corpus, data_source, eval_count, workdir) -> dict:
  data = DataConfig(source=data_source, seq_len=args.seq_len, batch_size=args.batch_size, seed=seed)
  tc = configs.TrainConfig(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len,
                           learning_rate=args.lr, warmup_steps=max(1, args.steps // 10), seed=seed, log_every=1,
                           eval_batches=eval_count, checkpoint_every=0, keep_checkpoints=1)
  out = os.path.join(workdir, f"{name}-seed{seed}")
  log(f"{name} seed {seed}: training {args.steps} steps")
  start = time.perf_counter()
  result = train(config, tc, data, out, preset=args.preset, corpus=corpus, progress=True)
  wall = time.perf_counter() - start
  with open(os.path.join(out, "metrics.jsonl")) as f:
    losses = [json.loads(line)["loss"] for line in f if line.strip()]
  patch, overflow = measured_patch_size(result.model, corpus.validation_tokens, args.seq_len, args.batch_size,
                                        eval_count)
  s = result.summary
  row = dict(name=name, seed=seed, params=s["params"], bpb=s["val_bpb"], val_bytes=s["val_bytes"],
             loss=statistics.fmean(losses[-LOSS_WINDOW:]), patch=patch, overflow=overflow,
             steps_per_s=s["bytes_per_s"] / (args.batch_size * args.seq_len), wall=wall)
  log(f"{name} seed {seed}: {row['bpb']:.4f} val bpb over {row['val_bytes']:,} bytes, loss {row['loss']:.4f}, "
      f"{patch:.2f} bytes/patch, {row['steps_per_s']:.2f} steps/s, {wall:.0f} s")
  return row


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--data", default=DEFAULT_CORPUS, help="training corpus; its last 10%% is held out")
  parser.add_argument("--preset", default="tiny", help="blt preset (default tiny)")
  parser.add_argument("--steps", type=int, default=600, help="training steps of every run (default 600)")
  parser.add_argument("--batch-size", type=int, default=8)
  parser.add_argument("--seq-len", type=int, default=256)
  parser.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (warmup 10%%, cosine)")
  parser.add_argument("--seeds", default="0,1", help="comma-separated; the first runs every variant, the others "
                      "only ours and reference (default 0,1)")
  parser.add_argument("--only", default=None, help="comma-separated variant names (default: all)")
  parser.add_argument("--no-write", action="store_true", help="print the table only")
  args = parser.parse_args()
  seeds = [int(s) for s in args.seeds.split(",")]
  all_variants = variants(args.preset)
  chosen = args.only.split(",") if args.only else list(all_variants)
  unknown = [n for n in chosen if n not in all_variants]
  if unknown:
    parser.error(f"--only: unknown variant(s) {unknown}; choose from {list(all_variants)}")
  machine_line = machine()  # the load average at the start
  started = time.perf_counter()
  # The default corpus by its place beside the checkout, not this machine's absolute path.
  data_shown = "shared/data/tinyshakespeare.txt" if os.path.abspath(args.data) == DEFAULT_CORPUS else args.data

  corpus = ByteCorpus.load(DataConfig(source=args.data, seq_len=args.seq_len, batch_size=args.batch_size))
  eval_count = sum(1 for _ in eval_batches(corpus.validation_tokens, seq_len=args.seq_len,
                                           batch_size=args.batch_size))  # the whole held-out split
  workdir = tempfile.mkdtemp(prefix="blt_reference_options_")
  runs = [(name, seeds[0]) for name in chosen]
  runs += [(name, seed) for seed in seeds[1:] for name in chosen if name in ("ours", "reference")]
  rows = [run_one(name, all_variants[name][0], seed, args, corpus, args.data, eval_count, workdir)
          for name, seed in runs]
  minutes = (time.perf_counter() - started) / 60
  body = report(args, rows, all_variants, seeds, machine_line, data_shown, minutes)
  print(body)
  if not args.no_write:
    write_section(RESULTS, TITLE, body)
    log(f"written to {RESULTS}")


def report(args, rows, all_variants, seeds, machine_line, data_shown, minutes) -> str:
  by_key = {(r["name"], r["seed"]): r for r in rows}
  # Seed spread: the largest gap between two seeds of one variant.
  spreads = {name: max(by_key[(name, s)]["bpb"] for s in seeds) - min(by_key[(name, s)]["bpb"] for s in seeds)
             for name in ("ours", "reference") if all((name, s) in by_key for s in seeds)}
  spread = max(spreads.values()) if spreads and len(seeds) > 1 else None
  table = ["| variant | differs from ours | seed | params | val bits/byte | vs ours (same seed) | train loss, "
           f"nats/byte (last {LOSS_WINDOW} steps) | avg patch size (val) | steps/s |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
  for r in rows:
    base = by_key.get(("ours", r["seed"]))
    delta = "" if base is None or r["name"] == "ours" else f"{r['bpb'] - base['bpb']:+.4f}"
    patch = f"{r['patch']:.2f}" + (f" ({r['overflow']:,} overflow bytes)" if r["overflow"] else "")
    table.append(f"| {r['name']} | {all_variants[r['name']][1]} | {r['seed']} | {r['params']:,} | {r['bpb']:.4f} | "
                 f"{delta} | {r['loss']:.4f} | {patch} | {r['steps_per_s']:.2f} |")
  reading = []
  if spread is not None:
    reading.append(f"Seed spread (largest gap between seeds {', '.join(map(str, seeds))} of one variant): "
                   + ", ".join(f"{name} {gap:.4f}" for name, gap in spreads.items())
                   + f" bits/byte. A difference from ours is called real below only if it exceeds {spread:.4f}.")
    for name in all_variants:
      paired = [s for s in seeds if (name, s) in by_key and ("ours", s) in by_key]
      if name == "ours" or not paired:
        continue
      # The mean over the seeds both ran (every variant ran the first seed).
      delta = statistics.fmean(by_key[(name, s)]["bpb"] - by_key[("ours", s)]["bpb"] for s in paired)
      if abs(delta) <= spread:
        verdict = "within the seed spread: no measurable difference"
      else:
        verdict = "better than ours" if delta < 0 else "worse than ours"
      where = f"seed {paired[0]}" if len(paired) == 1 else f"mean over seeds {', '.join(map(str, paired))}"
      reading.append(f"- {name}: {delta:+.4f} bits/byte ({where}), {verdict}.")
  val_bytes = rows[0]["val_bytes"]
  command = ("python benchmarks/blt_reference_options.py " + " ".join(sys.argv[1:])).strip()
  return "\n".join([
      f"- command: `{command}`",
      f"- machine: {machine_line} (shared CPU: steps/s is indicative only; runs are sequential, not alternated)",
      f"- data: `{data_shown}`; validation = its last 10% (never trained on), the whole split: "
      f"{val_bytes:,} predicted bytes in rows of {args.seq_len}",
      f"- model: blt preset `{args.preset}`, space patching; each run {args.steps} steps of {args.batch_size} x "
      f"{args.seq_len} bytes, AdamW, peak lr {args.lr}, warmup 10%, cosine; seed s = initialisation seed s and "
      f"data-order seed s (every variant at a seed sees the same batches)",
      f"- total run time {minutes:.1f} min",
      "",
      *table,
      "",
      *reading,
      "",
      "Tiny models trained for minutes on a CPU: a difference here says which option trains better at this size, "
      "not at the released sizes.",
  ])


def log(message):
  print(f"[blt_reference_options] {message}", file=sys.stderr, flush=True)


if __name__ == "__main__":
  main()
