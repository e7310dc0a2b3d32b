"""Progressive LongRoPE at CPU scale: a ByteLM trained at 64 bytes extended 64 -> 256 -> 1024 -> 4096 (64x).
Writes a section of ``benchmarks/RESULTS_rope.md`` and the plot ``benchmarks/rope_extension.png``.

    python benchmarks/rope_progressive.py            # ~15-25 minutes on 2 shared CPU cores
    python benchmarks/rope_progressive.py --smoke    # a tiny end-to-end run of the script (not a result)

1. Train a narrow ByteLM at L = 64 (``bytescale.train.loop.train``).
2. One-shot, from the trained model, for the 4096 target (s = 64), no fine-tuning: none (as trained), PI, NTK,
   YaRN, and LongRoPE with one factor set searched at 4096 (the trained rotation up to L). Then the same LongRoPE
   one-shot set fine-tuned at 4096 with the budget of the progressive run's 4096 stage (direct fine-tuning at
   the target, the alternative the paper's progressive strategy replaces).
3. LongRoPE progressive (``bytescale.rope_search.progressive_extension``, what ``bytescale rope-extend`` runs):
   search at 256, fine-tune at 256; search at 1024 on the fine-tuned model, fine-tune; search at 4096,
   fine-tune; then re-search short sets at 64 and 128 on the final weights.
4. Score every model at 64, 256, 1024 and 4096 bytes on held-out windows, after every step of the pipeline too.

Searches score windows from the first half of the held-out tail, the tables the second half. Every search uses
the reduced settings printed in the results (the paper's P=64, T=40 would take hours at 4096 on a CPU).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import sys
import tempfile
import time

import jax

from bytescale import configs, rope_search
from common import DEFAULT_CORPUS, write_section  # noqa: E402
from bytescale.configs import ByteLMConfig, TransformerConfig
from bytescale.data.pipeline import ByteCorpus, DataConfig, frame_documents, split_stream
from bytescale.data.sources import load_documents
from bytescale.ops import rope
from bytescale.ops.rope import RopeConfig
from bytescale.train.loop import train

HERE = os.path.dirname(os.path.abspath(__file__))
SECTION = "Progressive LongRoPE: 64 -> 256 -> 1024 -> 4096 bytes (`benchmarks/rope_progressive.py`)"


def settings_for(smoke: bool) -> dict:
  if smoke:
    return dict(length=16, d_model=32, layers=1, heads=2, head_dim=16, train_steps=30, batch=8, lr=3e-3,
                stages=((32, 4, 2), (64, 4, 1)), short=(16, 24), ft_lr=1e-3, eval_tokens=512,
                search=dict(population=4, iterations=1, mutations=1, crossovers=1), search_windows=2)
  return dict(length=64, d_model=48, layers=2, heads=2, head_dim=24, train_steps=3000, batch=16, lr=3e-3,
              stages=((256, 300, 8), (1024, 200, 2), (4096, 150, 1)), short=(64, 128), ft_lr=1e-3,
              eval_tokens=16384, search=dict(population=16, iterations=8, mutations=4, crossovers=4),
              search_windows=2)


def log(message):
  print(message, file=sys.stderr, flush=True)


def machine_lines(load_at_start) -> list[str]:
  cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
  return [f"- machine: {cpu}, {os.cpu_count()} cores, load average at start {load_at_start}; jax {jax.__version__}; "
          f"{datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}"]


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--smoke", action="store_true", help="tiny settings: checks the script runs, not a result")
  parser.add_argument("--data", default=DEFAULT_CORPUS if os.path.exists(DEFAULT_CORPUS) else "stdlib",
                      help=f"corpus (default {DEFAULT_CORPUS}, else stdlib)")
  parser.add_argument("--max-data-bytes", type=int, default=2_000_000)
  parser.add_argument("--out", default=None, help="results file (default benchmarks/RESULTS_rope.md; with --smoke "
                      "one in the run directory)")
  parser.add_argument("--plot", default=None, help="plot (default benchmarks/rope_extension.png; with --smoke one in "
                      "the run directory)")
  parser.add_argument("--work", default=None, help="run directory (default: a temporary one)")
  args = parser.parse_args()
  load_at_start = " ".join(open("/proc/loadavg").read().split()[:3])
  s = settings_for(args.smoke)
  started = time.perf_counter()
  work = args.work or tempfile.mkdtemp(prefix="bytescale_rope_progressive_")
  where = work if args.smoke else HERE
  args.out = args.out or os.path.join(where, "RESULTS_rope.md")
  args.plot = args.plot or os.path.join(where, "rope_extension.png")
  length = s["length"]
  target = s["stages"][-1][0]
  lengths = (length,) + tuple(stage[0] for stage in s["stages"])
  search = rope_search.SearchConfig(**s["search"])

  documents = load_documents(args.data, max_bytes=args.max_data_bytes)
  data_config = DataConfig(source=args.data, seq_len=length, batch_size=s["batch"], max_bytes=args.max_data_bytes)
  corpus = ByteCorpus.from_documents(documents, dataclasses.replace(data_config, seq_len=target), name=args.data)
  _, held_out = split_stream(frame_documents(documents), data_config.val_fraction)
  search_part, table_part = held_out[: len(held_out) // 2], held_out[len(held_out) // 2:]
  windows = {n: rope_search.held_out_windows(table_part, n, max(1, s["eval_tokens"] // n)) for n in lengths}

  def score_all(model) -> dict[int, float]:
    score = rope_search.bits_per_byte_fn(model, batch_size=4)
    return {n: score(windows[n]) for n in lengths}

  # 1. The base model, trained at L.
  model_config = ByteLMConfig(stack=TransformerConfig(
      d_model=s["d_model"], num_layers=s["layers"], num_heads=s["heads"], num_kv_heads=s["heads"],
      head_dim=s["head_dim"], mlp_hidden=configs.swiglu_hidden(s["d_model"])), max_seq_len=length)
  base_dir = os.path.join(work, "base")
  tick = time.perf_counter()
  base = train(model_config, configs.TrainConfig(steps=s["train_steps"], batch_size=s["batch"], seq_len=length,
                                                 learning_rate=s["lr"], checkpoint_every=0, log_every=50),
               data_config, base_dir, corpus=corpus, progress=False)
  log(f"trained at L={length}: {json.dumps(base.summary)} ({time.perf_counter() - tick:.0f}s)")
  base_model = base.model
  base_rope = base_model.config.stack.rope
  rotary_dim = rope.rotary_dim_for(base_rope, s["head_dim"])
  ft_config = configs.TrainConfig(learning_rate=s["ft_lr"], checkpoint_every=0, eval_batches=2, seed=1,
                                  warmup_steps=10)

  # 2. One-shot methods for the target, no fine-tuning.
  methods, curves, searches = rope_search.extension_configs(base_rope, length, float(target / length)), {}, {}
  for name in ("none", "pi", "ntk", "yarn"):
    curves[name] = score_all(rope_search.rebuild_with_config(
        base_model, rope.replace_rope(base_model.config, methods[name])))
    log(f"{name}: {fmt(curves[name])}")
  tick = time.perf_counter()
  one_set, one_result = rope_search.search_factor_set(
      base_model, rope_search.held_out_windows(search_part, target, s["search_windows"]), length=target,
      original_length=length, rope_path="stack.rope", search=search, progress=False)
  searches["one-shot"] = (one_set, one_result, time.perf_counter() - tick)
  one_shot_rope = RopeConfig(rope_type="longrope", original_max_position_embeddings=length, factor_sets=(
      rope.FactorSet(length, (1.0,) * (rotary_dim // 2), 1.0, 0), one_set))
  one_shot_config = rope.replace_rope(base_model.config, one_shot_rope)
  curves["longrope one-shot"] = score_all(rope_search.rebuild_with_config(base_model, one_shot_config))
  log(f"longrope one-shot: {fmt(curves['longrope one-shot'])} (search {time.perf_counter() - tick:.0f}s)")
  last_length, last_steps, last_batch = s["stages"][-1]
  tick = time.perf_counter()
  tuned = train(one_shot_config, dataclasses.replace(ft_config, steps=last_steps, batch_size=last_batch,
                                                   seq_len=target, init_from=base_dir),
                DataConfig(source=args.data, seq_len=target, batch_size=last_batch, seed=1),
                os.path.join(work, "one_shot_ft"), corpus=corpus, progress=False).model
  one_shot_tuned = score_all(tuned)
  log(f"longrope one-shot + FT (before the short re-search): {fmt(one_shot_tuned)}")
  # The same short re-search as the progressive run gets, so both end the way the paper's method does.
  short_sets, _ = rope_search.research_short_sets(
      tuned, one_shot_rope.factor_sets, short_lengths=s["short"], original_length=length, rope_path="stack.rope",
      tokens=search_part, window_bytes=s["search_windows"] * target, search=search, progress=False, log=log)
  one_shot_final = dataclasses.replace(one_shot_rope, factor_sets=tuple(short_sets) + (one_set,))
  curves["longrope one-shot + FT"] = score_all(rope_search.rebuild_with_config(
      tuned, rope.replace_rope(tuned.config, one_shot_final)))
  one_shot_ft_seconds = time.perf_counter() - tick
  log(f"longrope one-shot + FT: {fmt(curves['longrope one-shot + FT'])} ({one_shot_ft_seconds:.0f}s)")

  # 3. Progressive extension, scored after every step.
  steps_table = [("trained at 64 (no extension)", curves["none"])]

  def observe(event, at_length, model):
    label = {"searched": f"searched {at_length}", "fine-tuned": f"fine-tuned at {at_length}",
             "short": "short sets re-searched (final)"}[event]
    steps_table.append((label, score_all(model)))
    log(f"progressive, {label}: {fmt(steps_table[-1][1])}")

  tick = time.perf_counter()
  stages = [rope_search.ExtensionStage(n, steps, batch) for n, steps, batch in s["stages"]]
  result = rope_search.progressive_extension(
      base_dir, corpus, stages=stages, short_lengths=s["short"], out_dir=os.path.join(work, "progressive"),
      train_config=ft_config, search=search, search_tokens=search_part, windows=s["search_windows"],
      batch_size=4, progress=False, log=log, observe=observe)
  progressive_seconds = time.perf_counter() - tick
  curves["longrope progressive"] = steps_table[-1][1]
  # Diagnostic: the final weights with the trained rotation (ones, scale 1) for the short lengths instead of the
  # re-searched sets, i.e. what a short re-search confined to ratio 1 could at best start from.
  sets = result.rope_config.factor_sets
  plain = dataclasses.replace(result.rope_config, factor_sets=(
      rope.FactorSet(s["short"][-1], (1.0,) * (rotary_dim // 2), 1.0, 0),) + sets[len(s["short"]):])
  steps_table.append((f"diagnostic: final weights, trained rotation up to {s['short'][-1]}", score_all(
      rope_search.rebuild_with_config(result.model, rope.replace_rope(result.model.config, plain)))))
  with open(os.path.join(work, "progressive", "rope_scaling.json"), "w") as handle:
    json.dump(result.rope_scaling(), handle, indent=1)

  write_results(args, s, curves, steps_table, result, searches, rotary_dim, load_at_start,
                time.perf_counter() - started, progressive_seconds, one_shot_ft_seconds, search, one_shot_tuned)
  plot(args.plot, curves, lengths, length)


def fmt(scores: dict) -> str:
  return " ".join(f"{n}:{v:.3f}" for n, v in scores.items())


def fmt_row(scores: dict) -> str:
  return ", ".join(f"{v:.3f} at {n}" for n, v in scores.items())


def write_results(args, s, curves, steps_table, result, searches, rotary_dim, load_at_start, seconds,
                  progressive_seconds, one_shot_ft_seconds, search, one_shot_tuned):
  lengths = list(next(iter(curves.values())))
  length = s["length"]
  header = "| method | " + " | ".join(str(n) for n in lengths) + " |"
  rule = "|---|" + "---:|" * len(lengths)
  best = {n: min(c[n] for c in curves.values()) for n in lengths}
  cell = lambda v, n: f"**{v:.3f}**" if v == best[n] else f"{v:.3f}"  # noqa: E731
  original, recovered = curves["none"][length], curves["longrope progressive"][length]
  change = (recovered / original - 1) * 100
  stage_text = ", ".join(f"{n} ({steps} steps x {batch} rows)" for n, steps, batch in s["stages"])
  lines = [
      ("**Smoke run (tiny settings): checks the script, not a result.**\n" if args.smoke else "")
      + f"- command: `python benchmarks/rope_progressive.py{' --smoke' if args.smoke else ''}` "
      f"(data `{os.path.basename(args.data)}`); total {seconds / 60:.1f} min",
      *machine_lines(load_at_start),
      f"- model: ByteLM d_model {s['d_model']}, {s['layers']} layers, {s['heads']} heads of {s['head_dim']} "
      f"(rotary dim {rotary_dim}, rope_theta 10000), trained {s['train_steps']} steps x {s['batch']} rows at "
      f"L = {length} bytes",
      f"- progressive: stages {stage_text}, AdamW peak lr {s['ft_lr']}, each a new run warm-started from the "
      f"previous (`init_from`); short sets re-searched at {', '.join(map(str, s['short']))}; "
      f"{progressive_seconds / 60:.1f} min",
      f"- one-shot: PI, NTK, YaRN at s = {lengths[-1] // length}; LongRoPE one-shot = one set searched at "
      f"{lengths[-1]} on the trained model (the trained rotation up to L); `+ FT` = that set fine-tuned "
      f"{s['stages'][-1][1]} steps x {s['stages'][-1][2]} rows at {lengths[-1]} (the progressive run's last-stage "
      f"budget), then the same short re-search as the progressive run ({one_shot_ft_seconds / 60:.1f} min; before "
      f"the re-search it scored {fmt_row(one_shot_tuned)}); the other one-shot rows are not fine-tuned",
      f"- searches: population {search.population}, {search.iterations} iterations, {search.mutations} mutations + "
      f"{search.crossovers} crossovers, mutation rate {search.mutation_rate}, factors in [1, 1.25 s] on a 0.01 grid, "
      f"n_hat over the paper's set below L (the paper: P 64, T 40, N1 = N2 = 16: reduced here for time); each "
      f"search scores {s['search_windows'] * lengths[-1]:,} bytes (windows of its length) from the first half of "
      f"the held-out tail; the short re-search runs at the best of the last set's ratio halved (s, s/2, ..., 1), "
      f"as the authors' code picks it",
      f"- scored: bits per byte on held-out windows from the second half of the held-out tail, "
      f"{s['eval_tokens']:,} bytes per length, each window one sequence from position 0",
      "",
      "Bits per byte by evaluation length (bold: best of its column):",
      "",
      header, rule,
      *[f"| {name} | " + " | ".join(cell(c[n], n) for n in lengths) + " |" for name, c in curves.items()],
      "",
      f"Short-length recovery: at {length} bytes the progressive model scores {recovered:.3f} vs {original:.3f} for "
      f"the model as trained ({change:+.1f}%): "
      + ("within the 2% target." if abs(change) <= 2 or recovered < original else "the 2% target is NOT reached."),
      "",
      "LongRoPE progressive, step by step (each row: the model after that step, with the factor sets it serves "
      "then; before the short re-search the lowest set also serves every shorter length):",
      "",
      "| after | " + " | ".join(str(n) for n in lengths) + " |", rule,
      *[f"| {label} | " + " | ".join(f"{scores[n]:.3f}" for n in lengths) + " |" for label, scores in steps_table],
      "",
      "Factor sets of the progressive run, in the written `rope_scaling` file: the served ones (the short sets and "
      "the last fine-tuned stage's; the sets of earlier stages were searched on weights that later fine-tunes "
      "changed, so they are kept in the file's record but not served):",
      "",
      "| set | serves | searched at ratio | bpb on its search windows: before -> searched | attention factor | "
      "n_hat | factors |",
      "|---|---|---:|---|---:|---:|---|",
  ]
  served = dict(zip(result.rope_config.factor_sets, result.served_lengths()))
  for r in result.short + result.stages:
    entry = r.factor_set
    low, high = served.get(entry, (None, None))
    serves = f"{low}-{high if high else '...'}" if low else "none (fine-tuning only)"
    lines.append(f"| {entry.max_length} | {serves} | {r.ratio:g} | {r.bpb_before:.4f} -> {r.bpb_searched:.4f} | "
                 f"{entry.attention_factor:.3f} | {entry.n_hat} | {list(entry.factors)} |")
  one_set, one_result, took = searches["one-shot"]
  lines += ["", f"LongRoPE one-shot search at {lengths[-1]}: best {one_result.fitness:.4f} bpb after "
            f"{one_result.evaluations} candidates ({took:.0f}s); seeds "
            + ", ".join(f"{k} {v:.4f}" for k, v in one_result.seed_fitness.items())
            + f"; n_hat {one_set.n_hat}; factors {list(one_set.factors)}",
            "", f"Plot: `{os.path.basename(args.plot)}` (bits per byte vs evaluation length, one line per method)."]
  ensure_title(args.out)
  write_section(args.out, SECTION, "\n".join(lines))
  print("\n".join(lines))


def ensure_title(path):
  if not os.path.exists(path):
    with open(path, "w") as handle:
      handle.write("# Rotary context extension\n")


def plot(path, curves, lengths, length):
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(7, 4.5))
  for name, scores in curves.items():
    style = "--" if name.endswith("+ FT") else "-"
    width = 2.5 if name == "longrope progressive" else 1.5
    ax.plot(lengths, [scores[n] for n in lengths], style, marker="o", linewidth=width, label=name)
  ax.set_xscale("log", base=2)
  ax.set_xticks(lengths, [str(n) for n in lengths])
  ax.axvline(length, color="grey", linewidth=0.8, linestyle=":")
  ax.set_xlabel("evaluation length (bytes)")
  ax.set_ylabel("bits per byte (held-out)")
  ax.set_title(f"ByteLM trained at {length} bytes, extended to {lengths[-1]}")
  top = min(8.0, max(max(s.values()) for s in curves.values()) + 0.1)
  ax.set_ylim(min(min(s.values()) for s in curves.values()) - 0.1, top)
  ax.grid(True, alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  log(f"plot: {path}")


if __name__ == "__main__":
  main()
