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
   layers).
3. Decoding: for every model with n >= 4, greedy decoding vs greedy self-speculative decoding of the same model
   at batch 1 and 8 (prompts from the validation split): bytes accepted per forward, bytes/s of each (median of
   alternating repeats, compilation excluded), speedup, and a check that the bytes are identical.

``--decode-only`` runs part 3 alone for ByteLM n=8 (``--decode-models`` for others), with the full run's
training settings; ``--models-dir`` keeps the trained models and reuses them on the next run (no training), so a
rerun on a quiet machine takes a few minutes and times the very same models.

Results go to ``benchmarks/RESULTS_multi_token.md`` (machine, date, jax version in the section title).
"""

from __future__ import annotations

import argparse
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

from benchmarks.common import machine, write_section  # noqa: E402
from bytescale.models.registry import build_model  # noqa: E402
from bytescale.models import registry  # noqa: E402
from bytescale import configs, vocab  # noqa: E402
from bytescale.configs import ByteLMConfig, TransformerConfig  # noqa: E402
from bytescale.data.pipeline import ByteCorpus, DataConfig  # noqa: E402
from bytescale.models.mtp import MultiTokenConfig, multi_token_loss  # noqa: E402
from bytescale.speculative import greedy_tokens, speculative_generate  # noqa: E402
from bytescale.train.checkpoint import checkpoint_root, latest_step, load_model  # noqa: E402
from bytescale.train.loop import train  # noqa: E402
from bytescale.train.metrics import read_jsonl  # noqa: E402

WHY_NOT_PAPER = (
    "Why not the paper's 6.39x (7B byte model, 8 heads, 7.04 bytes per forward): (1) these models have a few "
    "hundred thousand parameters and saw a few million bytes, so heads 2..n predict bytes t+2..t+n poorly and few "
    "drafts are accepted (the per-head bits per byte above); (2) every head is a full transformer block with its "
    "own KV cache: a verification step runs the trunk and head 1 over n bytes, projects the other heads' keys and "
    "values there and runs those heads at the one position drafted from, so it reads the weights and KV caches of "
    "trunk + n blocks where a greedy step reads trunk + 1 (10 vs 3 blocks for the parameter-matched n=8 model, "
    "whose trunk is 2 layers and whose heads are 8 of its 10 layers), and on a CPU a forward over n bytes costs "
    "more than over one (the step cost column); (3) a batch steps until its slowest row is done. Where decoding is "
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
  """Table rows (batch 1 and 8): greedy vs speculative decoding of the same model, timed alternately."""
  rows = []
  for batch in (1, 8):
    chosen = prompts[:batch]
    result = speculative_generate(model, chosen, max_new, stop_at_eos=False)  # compiles
    greedy, _ = greedy_tokens(model, chosen, max_new)
    identical = bool((greedy == result.tokens).all())
    load = os.getloadavg()[0]
    spec_s, greedy_s = median_alternating(
        [lambda: speculative_generate(model, chosen, max_new, stop_at_eos=False).seconds,
         lambda: greedy_tokens(model, chosen, max_new)[1]], repeats)
    total = batch * max_new
    # One speculative step (prefill counted as one): a verification forward over n bytes plus drafting.
    spec_step, greedy_step = spec_s / (result.steps + 1), greedy_s / max_new
    step_cost = spec_step / greedy_step
    log(f"decode {name} batch {batch}: {result.bytes_per_forward:.2f} bytes/forward, speculative "
        f"{total / spec_s:,.0f} B/s, greedy {total / greedy_s:,.0f} B/s, steps {spec_step * 1e6:,.0f} / "
        f"{greedy_step * 1e6:,.0f} us, step cost {step_cost:.2f}, speedup {greedy_s / spec_s:.2f}x, "
        f"identical {identical}, load {load:.2f} -> {os.getloadavg()[0]:.2f}")
    sample = repr(bytes(vocab.decode(greedy[0][:40])))[2:-1].replace("|", "\\|")
    rows.append(f"| {name} | {batch} | {result.bytes_per_forward:.2f} | {result.steps + 1} / {max_new} | "
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


def decode_text(args, rows):
  return "\n".join([
      f"Greedy decoding of {args.max_new} bytes after {args.prompt_bytes}-byte prompts from the validation split, "
      "the same model decoded plainly (trunk + next-byte head, one byte per forward) and self-speculatively "
      f"(heads draft n-1 bytes, one forward verifies). Median of {args.repeats} alternating runs, compilation "
      "excluded. Bytes/forward counts the prefill forward and is averaged over rows; a batch runs until its "
      "slowest row is done (forwards of the batch vs greedy's one per byte shown). Step cost = time of one "
      "speculative step (verification forward over n bytes: trunk and head 1 over the block, the other heads' "
      "keys and values there, their drafts at one position) / time of one greedy step (trunk + head 1 over one "
      "byte): speedup = bytes per forward / step cost, roughly. Greedy text from small models loops (runs of "
      "spaces, repeated lines), which is easy to draft: the acceptance below is that of such text, not of varied "
      "code.",
      "",
      *DECODE_HEADER,
      *rows,
      "",
      WHY_NOT_PAPER,
  ])


def model_configs(args) -> dict:
  """``{key: (table name, MultiTokenConfig)}`` of every model the benchmark trains, in table order."""
  d, seq, layers = args.d_model, args.seq_len, args.layers
  models = {f"bytelm{n}": (f"ByteLM n={n} (trunk {layers - n} + {n} heads)",
                           MultiTokenConfig(trunk=bytelm(d, layers, seq), mtp_heads=n, mtp_parameter_matched=True))
            for n in (1, 4, 8)}
  megabyte = dataclasses.replace(registry.get_preset("megabyte", "tiny"), max_seq_len=seq)
  for n in (1, 4, 8):
    models[f"megabyte{n}"] = (
        f"MegaByte n={n} (local {megabyte.local_stack.num_layers} + {n} heads, P={megabyte.patch_size})",
        MultiTokenConfig(trunk=megabyte, mtp_heads=n))
  return models


def trained(args, key, config, corpus, data):
  """``(model, summary or None, last metrics record or None, seconds)``: trained now, or loaded from
  ``--models-dir`` when it already holds this model (saved there after training otherwise)."""
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
  keys = ["bytelm1", "bytelm4", "bytelm8", "megabyte1", "megabyte4"] + ([] if args.quick else ["megabyte8"])
  train_rows, decode_table = [], []
  prompts = validation_prompts(args, corpus)
  for key in keys:
    name, config = models[key]
    model, s, last, seconds = trained(args, key, config, corpus, data)
    if s is None:
      raise SystemExit(f"--models-dir: {key} was loaded, not trained; the training table needs a fresh directory "
                       "(or use --decode-only)")
    heads = " / ".join(f"{last[f'bpb_head{i + 1}']:.2f}" for i in range(config.mtp_heads))
    log(f"train {name}: val bpb {s['val_bpb']}, heads {heads}, {seconds:.0f} s")
    train_rows.append(f"| {name} | {s['params']:,} | {steps} | {s['train_bytes']:,} | **{s['val_bpb']:.3f}** | "
                      f"{heads} | {s['bytes_per_s']:,.0f} |")
    if config.mtp_heads >= 4:
      decode_table += decode_rows(name, model, prompts, args.max_new, args.repeats)
  train_text = "\n".join([
      f"Parallel heads, equal steps ({steps} x {batch} rows x {seq} bytes), AdamW lr 3e-3 cosine; ByteLM d={d}, "
      f"{layers} layers in all (parameter-matched: the n=1 model is a plain {layers}-layer ByteLM whose last layer is "
      "its head); MegaByte preset tiny with heads added. Validation = next-byte bits per byte (head 1) on "
      f"{args.eval_batches} batches of the held-out split; per-head bits per byte from the last training batch.",
      "",
      "| model | params | steps | train bytes | val bpb (next byte) | train bpb per head 1 / 2 / ... | train bytes/s |",
      "|---|---|---|---|---|---|---|",
      *train_rows,
  ])
  return train_text, decode_text(args, decode_table)


def decode_section(args, corpus, data):
  """``--decode-only``: the decoding table of the models in ``--decode-models`` (trained or loaded)."""
  models = model_configs(args)
  prompts = validation_prompts(args, corpus)
  rows = []
  for key in args.decode_models:
    name, config = models[key]
    model, _, _, seconds = trained(args, key, config, corpus, data)
    if seconds:
      log(f"trained {key} in {seconds:.0f} s")
    rows += decode_rows(name, model, prompts, args.max_new, args.repeats)
  return decode_text(args, rows)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true", help="small models, few steps (a few minutes on a CPU)")
  parser.add_argument("--skip-memory", action="store_true")
  parser.add_argument("--skip-train", action="store_true")
  parser.add_argument("--decode-only", action="store_true",
                      help="only the self-speculative decoding table, for --decode-models (training settings of the "
                           "full run, or of --quick)")
  parser.add_argument("--decode-models", default="bytelm8",
                      help="with --decode-only: comma-separated models among bytelm4, bytelm8, megabyte4, megabyte8 "
                           "(default bytelm8)")
  parser.add_argument("--models-dir", default=None,
                      help="keep the trained models here and load them on later runs instead of training (the same "
                           "models timed again, e.g. on a quiet machine)")
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
  known = [key for key in model_configs(args) if not key.endswith("1")]
  unknown = [key for key in args.decode_models if key not in known]
  if unknown or not args.decode_models:
    parser.error(f"--decode-models: {', '.join(unknown) or 'none given'}; choose among {', '.join(known)}")
  command = "benchmarks/multi_token.py" + (" --quick" if quick else "")
  if args.decode_only:
    command += f" --decode-only --decode-models {','.join(args.decode_models)} --repeats {args.repeats}"
  title = f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} -- {machine()} -- `{command}`"
  if args.decode_only:
    data = DataConfig(source="stdlib", seq_len=args.seq_len, batch_size=args.batch_size, max_bytes=args.max_bytes)
    corpus = ByteCorpus.load(data)
    write_section(RESULTS, title, "### Self-speculative decoding\n\n" + decode_section(args, corpus, data))
    log(f"wrote {RESULTS}")
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
  write_section(RESULTS, title, "\n\n".join(parts))
  log(f"wrote {RESULTS}")


if __name__ == "__main__":
  main()
