"""Multi-token heads: memory of the loss, next-byte quality, and self-speculative decoding speed.

    python benchmarks/multi_token.py --quick   # CPU, a few minutes
    python benchmarks/multi_token.py           # larger models, more steps
    python benchmarks/multi_token.py --decode-only --models-dir /tmp/mtp_models   # decoding speed only

1. Memory: temporary bytes of the compiled gradient step (``memory_analysis().temp_size_in_bytes``) for
   n = 1, 2, 4, 8 heads, naive (every head's logits at once) vs memory-efficient (remat scan over heads), at a
   long sequence.
2. Training: ByteLM with n = 1, 4, 8 parallel heads, parameter-matched (trunk + heads = the same depth), on the
   built-in code corpus (``stdlib``: this Python's standard library sources, capped), equal steps; next-byte
   bits per byte on the validation split, and every head's training bits per byte. The same for MegaByte with
   heads on its local model (heads added, not parameter-matched: its local stack is too shallow to give up n
   layers), BLT ``tiny`` (space patches, no entropy model) with heads on its local decoder, and a ByteLM of the
   ``small`` preset's shape (d 256, 6 layers, 17.7 MB of float32 weights) with 8 heads added (the longest to
   train: 70 min of the full run on a 2-core CPU at load 6): the one model here whose decode step is bound by
   reading its weights rather than by per-op costs.
3. Decoding: for every model with n >= 4, greedy decoding vs greedy self-speculative decoding of the same model
   at batch 1 and 8 (prompts from the validation split): bytes accepted per forward, bytes/s of each (median of
   alternating repeats, compilation excluded), speedup, and a check that the bytes are identical. ``--profile``
   adds where each decoder's step time goes (trunk, head 1, heads' keys and values, drafting; op times of a
   ``jax.profiler`` trace).

``--decode-only`` runs part 3 alone for ByteLM n=8 (``--decode-models`` for others: bytelm4, bytelm8,
bytelm_small8, megabyte4, megabyte8, blt4, blt8), with the full run's training settings; ``--models-dir`` keeps the
trained models and reuses them on the next run (no training), so a rerun on a quiet machine takes a few minutes
and times the very same models. ``--no-write`` prints the section instead of appending it to the results file.

Results go to ``benchmarks/RESULTS_multi_token.md`` (machine, date, jax version in the section title).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import os
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from benchmarks import profile_ops  # noqa: E402
from benchmarks.common import machine, write_section  # noqa: E402
from bytescale.models.registry import build_model  # noqa: E402
from bytescale.models import registry  # noqa: E402
from bytescale import configs, vocab  # noqa: E402
from bytescale.configs import ByteLMConfig, TransformerConfig  # noqa: E402
from bytescale.data.pipeline import ByteCorpus, DataConfig  # noqa: E402
from bytescale.models.mtp import MultiTokenConfig, multi_token_loss  # noqa: E402
from bytescale.speculative import decoder_programs, greedy_tokens, speculative_generate  # noqa: E402
from bytescale.train.checkpoint import checkpoint_root, latest_step, load_model  # noqa: E402
from bytescale.train.loop import train  # noqa: E402
from bytescale.train.metrics import read_jsonl  # noqa: E402

WHY_NOT_PAPER = (
    "Why not the paper's 6.39x (7B byte model, 8 heads, 7.04 bytes per forward): (1) these models have 0.2 to 10 "
    "million parameters and saw 1.6 million bytes, so heads 2..n predict bytes t+2..t+n poorly and few drafts are "
    "accepted (the per-head bits per byte above); (2) every head is a full transformer block with its own KV cache: "
    "a verification step runs the trunk and head 1 over n bytes, projects the other heads' keys and values there and "
    "runs those heads at the one position drafted from, so it reads the weights and KV caches of trunk + n blocks "
    "where a greedy step reads trunk + 1 (10 vs 3 blocks for the parameter-matched ByteLM n=8, whose trunk is 2 "
    "layers; 14 vs 7 for the small-shaped one: about 2x the bytes, see the note under the table); (3) on this CPU a "
    "step over n bytes costs more than over one: the tiny models (ByteLM d=64, MegaByte and BLT tiny) are bound by "
    "per-op costs (each of the few hundred ops of a step takes microseconds whatever its size), so the extra ops of "
    "a verification step cost several greedy steps; the small-shaped ByteLM is bound by reading its weights, yet "
    "its n rows still cost more than one (its step cost against the weight ratio); (4) a batch steps until its "
    "slowest row is done, and the n x 8 rows of a batch-8 verification step are compute-bound. Where decoding is "
    "bound by reading the weights (a large model on an accelerator), the step cost falls to the ratio of layers "
    "read (trunk + n heads vs trunk + 1: about 1.3 for a 32-layer model with 8 heads) and the speedup approaches "
    "the bytes accepted per forward divided by that.")
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS_multi_token.md")
MiB = 2**20


def bytelm(d, layers, seq, heads=4):
  return ByteLMConfig(stack=TransformerConfig(d_model=d, num_layers=layers, num_heads=heads, num_kv_heads=heads,
                                              head_dim=d // heads, mlp_hidden=-(-(8 * d // 3) // 32) * 32),
                      max_seq_len=seq)


def log(message):
  print(message, file=sys.stderr, flush=True)


# --- 1. Memory ------------------------------------------------------------------------------------------------

def temp_mib(config, batch):
  graphdef, params = nnx.split(nnx.eval_shape(lambda: build_model(config, seed=0)), nnx.Param)

  def step_memory(efficient):
    grad = jax.grad(lambda p, b: multi_token_loss(nnx.merge(graphdef, p), b, memory_efficient=efficient)[0])
    return jax.jit(grad).lower(params, batch).compile().memory_analysis().temp_size_in_bytes / MiB

  return step_memory(False), step_memory(True)


def memory_section(args):
  b, t = 1, args.memory_seq
  trunk = bytelm(64, 2, t)
  ids = jnp.zeros((b, t), jnp.int32)
  batch = {"inputs": ids, "targets": ids, "segment_ids": jnp.ones_like(ids), "loss_mask": jnp.ones((b, t))}
  logits_mib = b * t * vocab.VOCAB_SIZE * 4 / MiB
  rows = []
  variants = ("parallel",) if args.quick else ("parallel", "sequential")
  for variant in variants:
    for n in (1, 2, 4, 8):
      naive, efficient = temp_mib(MultiTokenConfig(trunk=trunk, mtp_heads=n, mtp_variant=variant), batch)
      log(f"memory {variant} n={n}: naive {naive:.1f} MiB, efficient {efficient:.1f} MiB")
      rows.append(f"| {variant} | {n} | {naive:.1f} | {efficient:.1f} | {naive / efficient:.2f} |")
  return "\n".join([
      f"Compiled gradient step of the multi-token loss, ByteLM trunk d=64, 2 layers, 4 attention heads; batch {b} x "
      f"{t} bytes (float32). One head's logits are {logits_mib:.2f} MiB; each head block also keeps its "
      f"activations (the reference attention materialises its {t}x{t} scores) for the backward pass, which the "
      "memory-efficient loss recomputes head by head instead.",
      "",
      "| variant | heads n | naive temp MiB | memory-efficient temp MiB | naive / efficient |",
      "|---|---|---|---|---|",
      *rows,
  ])


# --- 2. Training and 3. decoding --------------------------------------------------------------------------------

def median_alternating(fns, repeats):
  """Median seconds of each function, called in alternation ``repeats`` times (contention hits both alike)."""
  samples = [[] for _ in fns]
  for _ in range(repeats):
    for i, fn in enumerate(fns):
      samples[i].append(fn())
  return [statistics.median(s) for s in samples]


def decode_rows(name, model, prompts, max_new, repeats):
  """Table rows (batch 1 and 8): greedy vs speculative decoding of the same model, timed alternately. Batch 1 decodes
  every prompt alone, one after the other (summed times, bytes/forward averaged over the prompts): how many drafts
  one prompt's continuation accepts depends on which loop the model falls into there, so one prompt would say more
  about that prompt than about the model."""
  rows = []
  for batch in (1, 8):
    groups = [prompts[i:i + batch] for i in range(0, len(prompts), batch)]
    results = [speculative_generate(model, group, max_new, stop_at_eos=False) for group in groups]  # compiles
    greedy = [greedy_tokens(model, group, max_new)[0] for group in groups]
    identical = all(bool((g == r.tokens).all()) for g, r in zip(greedy, results))
    load = os.getloadavg()[0]
    spec_s, greedy_s = median_alternating(
        [lambda: sum(speculative_generate(model, group, max_new, stop_at_eos=False).seconds for group in groups),
         lambda: sum(greedy_tokens(model, group, max_new)[1] for group in groups)], repeats)
    total = len(prompts) * max_new
    forwards = sum(r.steps + 1 for r in results)  # of the batch: it steps until its slowest row is done
    bytes_per_forward = statistics.mean(r.bytes_per_forward for r in results)
    # One speculative step (prefill counted as one): a verification forward over n bytes plus drafting.
    spec_step, greedy_step = spec_s / forwards, greedy_s / (len(groups) * max_new)
    step_cost = spec_step / greedy_step
    log(f"decode {name} batch {batch}: {bytes_per_forward:.2f} bytes/forward, speculative "
        f"{total / spec_s:,.0f} B/s, greedy {total / greedy_s:,.0f} B/s, steps {spec_step * 1e6:,.0f} / "
        f"{greedy_step * 1e6:,.0f} us, step cost {step_cost:.2f}, speedup {greedy_s / spec_s:.2f}x, "
        f"identical {identical}, load {load:.2f} -> {os.getloadavg()[0]:.2f}")
    sample = repr(bytes(vocab.decode(greedy[0][0][:40])))[2:-1].replace("|", "\\|")
    batch_cell = f"1 (x{len(groups)} prompts)" if batch == 1 else f"{batch}"
    rows.append(f"| {name} | {batch_cell} | {bytes_per_forward:.2f} | {forwards} / {len(groups) * max_new} | "
                f"{greedy_step * 1e6:,.0f} | {spec_step * 1e6:,.0f} | {step_cost:.2f} | {total / greedy_s:,.0f} | "
                f"{total / spec_s:,.0f} | **{greedy_s / spec_s:.2f}x** | {'yes' if identical else 'NO'} | "
                f"{load:.1f} -> {os.getloadavg()[0]:.1f} | `{sample}` |")
  return rows


DECODE_HEADER = [
    "| model | batch | bytes accepted / forward | forwards / greedy forwards | greedy step us | speculative step us "
    "| step cost (greedy steps) | greedy bytes/s | speculative bytes/s | speedup | identical bytes "
    "| 1-min load before -> after | greedy output, row 0 (first 40 bytes) |",
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
]


# --- Where a decode step's time goes (--profile) ------------------------------------------------------------------

PARTS = ("trunk", "head 1 + unembedding", "heads' keys and values", "drafting", "rest")


def _frame_functions(module, frame_id) -> list[str]:
  """The function names of an HLO instruction's Python stack, innermost first."""
  names, seen = [], set()
  while frame_id in module.frames and frame_id not in seen:
    seen.add(frame_id)
    _, function, _, frame_id = module.frames[frame_id]
    names.append(function.replace(".<locals>.", "."))
  return names


def _users(module) -> dict[str, list[str]]:
  users = collections.defaultdict(list)
  for instruction in module.instructions.values():
    for operand in instruction.operands:
      users[operand].append(instruction.name)
  return users


def part_of(module, users, op: str, trunk_decode: str) -> str:
  """The model part (one of PARTS) whose Python code made ``op``: its own stack frames, else (ops the compiler made
  carry no metadata, e.g. batched dots) those of the nearest op that uses its result, else of its operands."""
  for neighbours in (lambda name: users.get(name, []), lambda name: module.instructions[name].operands):
    pending, seen = [op], set()
    while pending:
      name = pending.pop(0)
      if name in seen or name not in module.instructions:
        continue
      seen.add(name)
      shown = profile_ops.representative(module, name)
      if shown is not None and shown.stack_frame_id:
        return _part(_frame_functions(module, shown.stack_frame_id), trunk_decode)
      pending.extend(neighbours(name))
  return "rest"


def _part(functions: list[str], trunk_decode: str) -> str:
  if "layer_state" in functions:
    return "rest"  # weights sliced from the stacked layers: once per decode, hoisted out of the loop
  if any(f == "MultiTokenLM.draft" or f.startswith("MultiTokenLM._parallel_draft") for f in functions):
    return "drafting"
  if trunk_decode in functions:
    return "trunk"
  if "MultiTokenLM.decode" in functions:
    if any("keys_values" in f or "_extra_heads_decode" in f for f in functions):
      return "heads' keys and values"
    if any(f.startswith("Block.") or f.endswith(".unembed") for f in functions):
      return "head 1 + unembedding"
    return "heads' keys and values"  # the drafting state decode writes (heads' caches, trunk states)
  return "rest"


def profile_rows(name, model, prompts, max_new, calls=3):
  """Table rows (batch 1 and 8): op time per step of the greedy and the speculative decoder, by model part, from a
  ``jax.profiler`` trace of ``calls`` whole decodes each (``benchmarks/profile_ops.py`` reads the trace)."""
  rows = []
  trunk_decode = f"{type(model.trunk).__name__}.decode"
  for batch in (1, 8):
    programs = decoder_programs(model, prompts[:batch], max_new)
    compiled, args = programs["speculative"]
    steps = {"speculative": int(jax.block_until_ready(compiled(*args))[2]) + 1, "greedy": max_new}
    for decoder in ("greedy", "speculative"):
      compiled, args = programs[decoder]
      events, seconds = profile_ops.trace_calls(lambda: jax.block_until_ready(compiled(*args)), calls)
      module = profile_ops.parse_hlo(compiled.as_text())
      times, counts = profile_ops.op_times(events, module)
      parts, users = collections.Counter(), _users(module)
      for op, ns in times.items():
        parts[part_of(module, users, op, trunk_decode)] += ns
      per_step = calls * steps[decoder]
      total = sum(times.values())
      top = profile_ops.summarise(times, counts, module, per_step)[0]
      cells = " | ".join(f"{parts[p] / per_step / 1e3:,.0f} ({parts[p] / total:.0%})" for p in PARTS)
      log(f"profile {name} batch {batch} {decoder}: {min(seconds) / steps[decoder] * 1e6:,.0f} us/step wall, "
          f"{sum(counts.values()) / per_step:.0f} ops/step, {cells}")
      rows.append(f"| {name} | {batch} | {decoder} | {min(seconds) / steps[decoder] * 1e6:,.0f} | "
                  f"{sum(counts.values()) / per_step:,.0f} | {total / per_step / 1e3:,.0f} | {cells} | "
                  f"{top.share:.0%} `{top.shape}` {top.source} |")
  return rows


def weights_note(name, model) -> str | None:
  """What a decode step bound by reading the weights would cost, verification vs greedy, for a trunk that runs all
  its layers at every byte (ByteLM; a patch model's global stack runs once per patch instead): None otherwise."""
  if type(model.trunk).__name__ != "ByteLM":
    return None
  megabytes = lambda module: sum(x.nbytes for x in jax.tree.leaves(nnx.state(module, nnx.Param))) / 1e6  # noqa: E731
  trunk, heads, n = megabytes(model.trunk), megabytes(model.heads), model.num_heads
  greedy, verify = trunk + heads / n, trunk + heads
  return (f"{name}: the trunk holds {trunk:.1f} MB of weights and each head {heads / n:.2f} MB; a greedy step reads "
          f"trunk + head 1 ({greedy:.1f} MB), a verification step the trunk and head 1 over n bytes plus the other "
          f"{n - 1} heads (keys and values over the block, the rest at one position): {verify:.1f} MB, "
          f"{verify / greedy:.2f}x a greedy step's bytes. That is the step cost where a step is bound by reading the "
          "weights and n rows cost what one row costs; above it, the extra rows' compute and the attention over n "
          "queries.")


PROFILE_HEADER = [
    "| model | batch | decoder | wall us/step | ops/step | op us/step | " + " | ".join(f"{p} us" for p in PARTS)
    + " | top op (share, shape, source) |",
    "|---|---|---|---|---|---|---|---|---|---|---|---|",
]


def decode_text(args, rows, profiles=(), notes=()):
  profile_text = []
  if profiles:
    profile_text = [
        "",
        "Where a step's time goes (`--profile`): `jax.profiler` trace of 3 whole decodes with each compiled decoder "
        "(the same programs as timed above; tracing slows them), op self times summed over threads "
        "(`benchmarks/profile_ops.py`) and given to the model part whose Python code made the op (an op the "
        "compiler made, without metadata, goes to the part of the nearest op that uses its result, else of its "
        "operands); per step = per decode / steps, the prefill included. Trunk: the trunk's decode (for the "
        "speculative decoder over the n bytes of a block); head 1 + unembedding: the next-byte head and logits; "
        "heads' keys and values: heads 2..n projected over the block; drafting: heads 2..n at one position and "
        "their logits; rest: the loop, acceptance, rollback, sampling, and the layers' weights sliced out of their "
        "stacks (once per decode).",
        "",
        *PROFILE_HEADER,
        *profiles,
    ]
  return "\n".join([
      f"Greedy decoding of {args.max_new} bytes after {args.prompt_bytes}-byte prompts from the validation split, "
      "the same model decoded plainly (trunk + next-byte head, one byte per forward) and self-speculatively "
      f"(heads draft n-1 bytes, one forward verifies). Median of {args.repeats} alternating runs, compilation "
      "excluded. Batch 1: each of the 8 prompts decoded alone, one after the other (times summed; how much a "
      "continuation accepts depends on the loop the model falls into after that prompt). Bytes/forward counts the "
      "prefill forward and is averaged over rows; a batch runs until its slowest row is done (forwards of the "
      "batch vs greedy's one per byte shown, summed over the batch-1 runs). Step cost = time of one "
      "speculative step (verification forward over n bytes: trunk and head 1 over the block, the other heads' "
      "keys and values there, their drafts at one position) / time of one greedy step (trunk + head 1 over one "
      "byte): speedup = bytes per forward / step cost, roughly. Greedy text from small models loops (runs of "
      "spaces, repeated lines), which is easy to draft: the acceptance below is that of such text, not of varied "
      "code.",
      "",
      *DECODE_HEADER,
      *rows,
      *profile_text,
      *(["", *[f"- {note}" for note in notes]] if notes else []),
      "",
      WHY_NOT_PAPER,
  ])


@dataclasses.dataclass(frozen=True)
class BenchModel:
  name: str  # as in the tables
  config: MultiTokenConfig


def model_configs(args) -> dict:
  """``{key: BenchModel}`` of every model the benchmark trains, in table order."""
  d, seq, layers = args.d_model, args.seq_len, args.layers
  models = {f"bytelm{n}": BenchModel(f"ByteLM n={n} (trunk {layers - n} + {n} heads)",
                                     MultiTokenConfig(trunk=bytelm(d, layers, seq), mtp_heads=n,
                                                      mtp_parameter_matched=True))
            for n in (1, 4, 8)}
  # Decoding bound by reading the weights (17.7 MB of float32 in the trunk's blocks): heads added, not
  # parameter-matched.
  small = registry.get_preset("bytelm", "small")
  stack = small.stack
  models["bytelm_small8"] = BenchModel(
      f"ByteLM small shape n=8 (d {stack.d_model}, trunk {stack.num_layers} + 8 heads added, not parameter-matched)",
      MultiTokenConfig(trunk=small, mtp_heads=8))
  megabyte = dataclasses.replace(registry.get_preset("megabyte", "tiny"), max_seq_len=seq)
  for n in (1, 4, 8):
    models[f"megabyte{n}"] = BenchModel(
        f"MegaByte n={n} (local {megabyte.local_stack.num_layers} + {n} heads, P={megabyte.patch_size})",
        MultiTokenConfig(trunk=megabyte, mtp_heads=n))
  # Space patches: no entropy model to train first.
  blt = configs.replace_path(registry.get_preset("blt", "tiny"), "patching.patcher", "space")
  for n in (4, 8):
    models[f"blt{n}"] = BenchModel(
        f"BLT tiny n={n} (space patches, decoder {blt.decoder.num_layers} + {n} heads)",
        MultiTokenConfig(trunk=blt, mtp_heads=n))
  return models


def trained(args, key, bench, corpus, data):
  """``(model, summary or None, last metrics record or None, seconds)``: trained now, or loaded from
  ``--models-dir`` when it already holds this model (saved there after training otherwise)."""
  config = bench.config
  steps, batch = args.steps, args.batch_size
  train_config = configs.TrainConfig(steps=steps, batch_size=batch, seq_len=args.seq_len, learning_rate=3e-3,
                                     warmup_steps=max(steps // 10, 1), log_every=max(steps // 10, 1),
                                     checkpoint_every=0, eval_batches=args.eval_batches)
  saved = os.path.join(args.models_dir, key) if args.models_dir else None
  if saved and os.path.isdir(saved) and latest_step(checkpoint_root(saved)) is not None:
    model, meta = load_model(saved)
    if (registry.config_from_dict(meta["model_config"]) != config
        or meta["train_config"] != configs.to_dict(train_config)):
      raise SystemExit(f"--models-dir {args.models_dir}: {key} there was trained with other settings (e.g. "
                       "--quick vs full); use another directory")
    log(f"loaded {key} from {saved}")
    return model, None, None, 0.0
  out = tempfile.mkdtemp()
  try:
    tick = time.perf_counter()
    result = train(config, train_config, data, out, progress=False, corpus=corpus)
    seconds = time.perf_counter() - tick
    if result.summary["stopped_by"] is not None:
      raise SystemExit(f"training {key} stopped early ({result.summary['stopped_by']}); nothing saved")
    last = read_jsonl(os.path.join(out, "metrics.jsonl"))[-1]
    if saved:
      shutil.copytree(out, saved, dirs_exist_ok=True)
  finally:
    shutil.rmtree(out, ignore_errors=True)
  return result.model, result.summary, last, seconds


def validation_prompts(args, corpus):
  return [bytes(vocab.decode(corpus.validation_tokens[i * 997: i * 997 + args.prompt_bytes])) for i in range(8)]


def train_section(args, corpus, data):
  steps, d, seq, batch, layers = args.steps, args.d_model, args.seq_len, args.batch_size, args.layers
  models = model_configs(args)
  keys = (["bytelm1", "bytelm4", "bytelm8"] + ([] if args.quick else ["bytelm_small8"]) + ["megabyte1", "megabyte4"]
          + ([] if args.quick else ["megabyte8"]) + ["blt4", "blt8"])
  train_rows, decode_table, profiles, notes = [], [], [], []
  prompts = validation_prompts(args, corpus)
  for key in keys:
    bench = models[key]
    name, config = bench.name, bench.config
    model, s, last, seconds = trained(args, key, bench, corpus, data)
    if s is None:
      raise SystemExit(f"--models-dir: {key} was loaded, not trained; the training table needs a fresh directory "
                       "(or use --decode-only)")
    heads = " / ".join(f"{last[f'bpb_head{i + 1}']:.2f}" for i in range(config.mtp_heads))
    log(f"train {name}: val bpb {s['val_bpb']}, heads {heads}, {seconds:.0f} s")
    train_rows.append(f"| {name} | {s['params']:,} | {steps} | {s['train_bytes']:,} | "
                      f"**{s['val_bpb']:.3f}** | {heads} | {s['bytes_per_s']:,.0f} |")
    if config.mtp_heads >= 4:
      decode_table += decode_rows(name, model, prompts, args.max_new, args.repeats)
      profiles += profile_rows(name, model, prompts, args.max_new) if args.profile else []
      notes += [note for note in [weights_note(name, model)] if note]
  train_text = "\n".join([
      f"Parallel heads, equal steps ({steps} x {batch} rows x {seq} bytes), AdamW lr 3e-3 cosine; ByteLM d={d}, "
      f"{layers} layers in all (parameter-matched: the n=1 model is a plain {layers}-layer ByteLM whose last layer is "
      "its head); ByteLM preset small (d 256, 6 layers), MegaByte preset tiny and BLT preset tiny (space patches) "
      "with heads added. Validation = next-byte bits per byte (head 1) on "
      f"{args.eval_batches} batches of the held-out split; per-head bits per byte from the last training batch.",
      "",
      "| model | params | steps | train bytes | val bpb (next byte) | train bpb per head 1 / 2 / ... | train bytes/s |",
      "|---|---|---|---|---|---|---|",
      *train_rows,
  ])
  return train_text, decode_text(args, decode_table, profiles, notes)


def decode_section(args, corpus, data):
  """``--decode-only``: the decoding table of the models in ``--decode-models`` (trained or loaded)."""
  models = model_configs(args)
  prompts = validation_prompts(args, corpus)
  rows, profiles, notes = [], [], []
  for key in args.decode_models:
    bench = models[key]
    model, _, _, seconds = trained(args, key, bench, corpus, data)
    if seconds:
      log(f"trained {key} in {seconds:.0f} s")
    rows += decode_rows(bench.name, model, prompts, args.max_new, args.repeats)
    profiles += profile_rows(bench.name, model, prompts, args.max_new) if args.profile else []
    notes += [note for note in [weights_note(bench.name, model)] if note]
  return decode_text(args, rows, profiles, notes)


def finish(args, title, body):
  if args.no_write:
    print(f"## {title}\n\n{body}")
    return
  write_section(RESULTS, title, body)
  log(f"wrote {RESULTS}")


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true", help="small models, few steps (a few minutes on a CPU)")
  parser.add_argument("--skip-memory", action="store_true")
  parser.add_argument("--skip-train", action="store_true")
  parser.add_argument("--decode-only", action="store_true",
                      help="only the self-speculative decoding table, for --decode-models (training settings of the "
                           "full run, or of --quick)")
  parser.add_argument("--decode-models", default="bytelm8",
                      help="with --decode-only: comma-separated models among bytelm4, bytelm8, bytelm_small8, "
                           "megabyte4, megabyte8, blt4, blt8 (default bytelm8)")
  parser.add_argument("--models-dir", default=None,
                      help="keep the trained models here and load them on later runs instead of training (the same "
                           "models timed again, e.g. on a quiet machine)")
  parser.add_argument("--profile", action="store_true",
                      help="also trace each decoded model's greedy and speculative decoders (jax.profiler, CPU) and "
                           "tabulate op time per step by model part: trunk, head 1, heads' keys and values, drafting")
  parser.add_argument("--no-write", action="store_true",
                      help=f"print the section to stdout instead of appending it to {os.path.basename(RESULTS)} "
                           "(smoke checks, loaded machines)")
  parser.add_argument("--repeats", type=int, default=None,
                      help="alternating greedy/speculative timings per row, median taken (default 3, 5 with "
                           "--decode-only)")
  args = parser.parse_args()
  quick = args.quick
  defaults = dict(steps=150 if quick else 400, d_model=64, layers=10, seq_len=128 if quick else 256,
                  batch_size=8 if quick else 16, eval_batches=8 if quick else 32, max_new=128 if quick else 256,
                  prompt_bytes=64, memory_seq=1024 if quick else 2048,
                  max_bytes=2_000_000 if quick else 8_000_000)
  for key, value in defaults.items():
    setattr(args, key, value)
  if args.repeats is None:
    args.repeats = 5 if args.decode_only else 3
  if args.repeats < 1:
    parser.error(f"--repeats must be >= 1, got {args.repeats}")
  args.decode_models = [key.strip() for key in args.decode_models.split(",") if key.strip()]
  known = [key for key, bench in model_configs(args).items() if bench.config.mtp_heads > 1]
  unknown = [key for key in args.decode_models if key not in known]
  if unknown or not args.decode_models:
    parser.error(f"--decode-models: {', '.join(unknown) or 'none given'}; choose among {', '.join(known)}")
  command = "benchmarks/multi_token.py" + (" --quick" if quick else "")
  if args.decode_only:
    command += f" --decode-only --decode-models {','.join(args.decode_models)} --repeats {args.repeats}"
  command += " --profile" if args.profile else ""
  title = f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} -- {machine()} -- `{command}`"
  if args.decode_only:
    data = DataConfig(source="stdlib", seq_len=args.seq_len, batch_size=args.batch_size, max_bytes=args.max_bytes)
    corpus = ByteCorpus.load(data)
    finish(args, title, "### Self-speculative decoding\n\n" + decode_section(args, corpus, data))
    return
  parts = []
  if not args.skip_memory:
    parts += ["### Memory of the multi-token loss", memory_section(args)]
  if not args.skip_train:
    data = DataConfig(source="stdlib", seq_len=args.seq_len, batch_size=args.batch_size, max_bytes=args.max_bytes)
    corpus = ByteCorpus.load(data)
    log(f"corpus: {len(corpus.train_tokens):,} train / {len(corpus.validation_tokens):,} validation tokens")
    train_text, decode_text = train_section(args, corpus, data)
    parts += [f"### Next-byte quality (stdlib code, {args.max_bytes:,} bytes read)", train_text,
              "### Self-speculative decoding", decode_text]
  finish(args, title, "\n\n".join(parts))


if __name__ == "__main__":
  main()
