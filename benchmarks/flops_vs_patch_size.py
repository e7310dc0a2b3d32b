"""FLOPs per byte against patch size, for a fixed global model and for FLOP-matched global models.

1. Measures the average patch size of the entropy patcher (a small entropy model trained here, or
   ``--entropy-model DIR``) at the preset's threshold and at a threshold calibrated on training rows for
   ``--entropy-target`` bytes, and of the space patcher, on held-out rows of a real corpus.
2. Table + plot: forward and training FLOPs per byte of BLT (``--blt-preset``, its global model fixed) at patch
   sizes 1..16 and at the measured averages, component by component, beside MegaByte (``--megabyte-preset``, its
   global stack fixed, at the patch sizes its width divides) and a byte-level transformer with the same global
   stack (what patching saves against).
3. FLOP-matched table (the BLT paper's fixed-inference-budget study): the budget is BLT at patch size
   ``--budget-patch-size`` (4.5, the paper's); at each larger patch the global model is widened (heads of the
   same head dim, SwiGLU hidden from the width, depth fixed) to the widest that stays within the budget.

Analytic counts from ``bytescale.flops`` (exact convention: causal attention counts the keys a query sees;
hash-embedding lookups and the entropy model are free, as in the paper). They are checked against XLA's
cost analysis in tests/test_flops.py.

    python benchmarks/flops_vs_patch_size.py [--quick] [--data PATH] [--blt-preset 1b] [--seq-len 8192]
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import tempfile
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import DEFAULT_CORPUS, machine, write_section  # noqa: E402

from bytescale.models import registry  # noqa: E402
from bytescale import configs, entropy, flops  # noqa: E402
from bytescale.configs import ByteLMConfig, TransformerConfig, swiglu_hidden  # noqa: E402
from bytescale.data.pipeline import ByteCorpus, DataConfig, eval_batches  # noqa: E402
from bytescale.models import blt  # noqa: E402
from bytescale.models.blt import BLTConfig  # noqa: E402
from bytescale.train.checkpoint import load_entropy_model  # noqa: E402
from bytescale.models.blt import flops_per_byte as blt_flops  # noqa: E402
from bytescale.patching import PatchingConfig  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "RESULTS_flops.md")
PLOT = os.path.join(HERE, "flops_vs_patch_size.png")
PATCH_SIZES = tuple(range(1, 17))


def log(message: str):
  print(f"[flops_vs_patch_size] {message}", file=sys.stderr, flush=True)


def stack_params(stack: TransformerConfig) -> int:
  """Non-embedding parameters of a TransformerStack (projections, MLP, the two norms per layer)."""
  d, k = stack.d_model, stack.head_dim
  per_layer = d * k * (2 * stack.num_heads + 2 * stack.num_kv_heads) + 3 * d * stack.mlp_hidden + 2 * d
  return stack.num_layers * per_layer


def group(count: flops.FlopCount) -> dict[str, float]:
  """Components summed into encoder / global / decoder / cross-attention (+ unembedding in decoder)."""
  parts = {"encoder": 0.0, "global": 0.0, "decoder": 0.0, "cross": 0.0}
  for name, value in count.components.items():
    if "cross_attention" in name:
      parts["cross"] += value
    elif name.startswith("global"):
      parts["global"] += value
    elif name.startswith("encoder") or name.startswith("local_"):
      parts["encoder"] += value
    else:  # decoder layers, unembedding; MegaByte's projection
      parts["decoder"] += value
  return parts


# --- 1. measured average patch sizes -------------------------------------------------------------------------

def measure_patch_sizes(args, blt: BLTConfig) -> dict:
  source = args.data or (DEFAULT_CORPUS if os.path.exists(DEFAULT_CORPUS) else "stdlib")
  data = DataConfig(source=source, seq_len=args.entropy_seq_len, batch_size=8,
                    max_bytes=200_000 if args.quick else None)
  corpus = ByteCorpus.load(data)
  log(f"corpus {corpus.name}: {len(corpus.train_tokens):,} train tokens")
  out = {"corpus": os.path.normpath(corpus.name)}
  if args.entropy_model:
    entropy_dir, out["entropy_model"] = args.entropy_model, f"`{args.entropy_model}`"
  else:
    from bytescale.train.loop import train

    entropy_dir = tempfile.mkdtemp(prefix="flops_entropy_")
    steps = args.entropy_steps or (100 if args.quick else 400)
    log(f"training the entropy model (bytelm/entropy-tiny, {steps} steps) ...")
    result = train(registry.get_preset("bytelm", "entropy-tiny"),
                   configs.TrainConfig(steps=steps, batch_size=8, seq_len=args.entropy_seq_len),
                   data, entropy_dir, preset="entropy-tiny", corpus=corpus, progress=False)
    out["entropy_model"] = f"bytelm/entropy-tiny trained {steps} steps here ({result.summary['val_bpb']:.3f} val bpb)"
  lm = load_entropy_model(entropy_dir)
  # The entropies and the bytes of the same framed rows (the space patcher reads the bytes).
  entropies_of = jax.jit(lambda ids, seg: entropy.compute_entropies(lm, ids, seg))
  rows = 16 if args.quick else 64

  def sample(tokens):
    hs, ids, segs = [], [], []
    for batch in eval_batches(tokens, seq_len=args.entropy_seq_len, batch_size=8):
      if len(hs) * 8 >= rows:
        break
      hs.append(np.asarray(entropies_of(batch["inputs"], batch["segment_ids"])))
      ids.append(batch["inputs"])
      segs.append(batch["segment_ids"])
    return np.concatenate(hs), np.concatenate(ids), np.concatenate(segs)

  h, ids, segs = sample(corpus.validation_tokens)
  out["threshold"] = blt.patching.threshold
  out["entropy"] = entropy.average_patch_size(blt.patching, h, segs, ids)
  out["space"] = entropy.average_patch_size(PatchingConfig("space"), h, segs, ids)
  # A small entropy model is less certain than the paper's 100M one, so the preset's threshold cuts short
  # patches; as in the paper, also pick the threshold for a target size (on training rows), then measure it on
  # the held-out rows.
  h_train, _, segs_train = sample(corpus.train_tokens)
  threshold, _ = entropy.threshold_for_patch_size(h_train, segs_train, args.entropy_target)
  out["calibrated_threshold"] = threshold
  out["entropy_calibrated"] = entropy.average_patch_size(
      dataclasses.replace(blt.patching, threshold=threshold), h, segs, ids)
  out["bytes"] = int((segs != 0).sum())
  log(f"measured average patch size: entropy {out['entropy']:.2f} (threshold {out['threshold']:.3f}), "
      f"{out['entropy_calibrated']:.2f} (threshold {threshold:.3f} picked for {args.entropy_target}), "
      f"space {out['space']:.2f} "
      f"over {out['bytes']:,} validation bytes")
  return out


# --- 2. fixed global model ---------------------------------------------------------------------------------

def fixed_global_rows(blt: BLTConfig, megabyte, seq_len: int, patch_sizes) -> list[dict]:
  bytelm = ByteLMConfig(stack=blt.global_stack, max_seq_len=seq_len)
  bytelm_forward = registry.flops_per_byte(bytelm, seq_len).forward
  rows = []
  for label, p in patch_sizes:
    count = blt_flops(blt, seq_len, p)
    spacebyte = blt_flops(blt, seq_len, p, convention="spacebyte")
    row = {"label": label, "p": p, "forward": count.forward, "training": count.training,
           "spacebyte": spacebyte.forward, **group(count), "bytelm": bytelm_forward, "megabyte": math.nan}
    if float(p).is_integer() and megabyte.global_stack.d_model % int(p) == 0:
      mb = dataclasses.replace(megabyte, patch_size=int(p), cross_patch_r=0)
      row["megabyte"] = registry.flops_per_byte(mb, seq_len).forward
    rows.append(row)
  return rows


# --- 3. FLOP-matched global models ---------------------------------------------------------------------------

def widened(stack: TransformerConfig, heads: int) -> TransformerConfig:
  kv = max(1, heads * stack.num_kv_heads // stack.num_heads)
  while heads % kv:
    kv -= 1
  d = heads * stack.head_dim
  return dataclasses.replace(stack, d_model=d, num_heads=heads, num_kv_heads=kv, mlp_hidden=swiglu_hidden(d))


def flop_matched_rows(blt: BLTConfig, seq_len: int, budget_p: float, patch_sizes) -> tuple[float, list[dict]]:
  budget = blt_flops(blt, seq_len, budget_p).forward
  rows = []
  for p in patch_sizes:
    def forward(heads):
      return blt_flops(dataclasses.replace(blt, global_stack=widened(blt.global_stack, heads)), seq_len, p).forward

    lo, hi = 0, 1
    while forward(hi) <= budget:  # widths double until over budget, then bisect on the head count
      lo, hi = hi, hi * 2
    while hi - lo > 1:
      mid = (lo + hi) // 2
      lo, hi = (mid, hi) if forward(mid) <= budget else (lo, mid)
    if lo == 0:
      rows.append({"p": p, "fits": False})
      continue
    stack = widened(blt.global_stack, lo)
    rows.append({"p": p, "fits": True, "d_model": stack.d_model, "heads": stack.num_heads, "layers": stack.num_layers,
                 "params": stack_params(stack), "forward": forward(lo), "budget": budget})
  return budget, rows


# --- output ----------------------------------------------------------------------------------------------------

def gflops(x: float) -> str:
  return "—" if math.isnan(x) else f"{x / 1e9:.3f}"


def plot(rows, matched, measured, args, path):
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  integer = [r for r in rows if r["label"].isdigit()]
  p = [r["p"] for r in integer]
  fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
  left.plot(p, [r["forward"] / 1e9 for r in integer], "o-", label=f"BLT {args.blt_preset} (global fixed)")
  left.plot(p, [r["global"] / 1e9 for r in integer], "--", label="  of which global model")
  left.plot(p, [(r["encoder"] + r["decoder"] + r["cross"]) / 1e9 for r in integer], ":",
            label="  of which local models + cross-attention")
  mb = [(r["p"], r["megabyte"] / 1e9) for r in integer if not math.isnan(r["megabyte"])]
  left.plot([x for x, _ in mb], [y for _, y in mb], "s-", label=f"MegaByte {args.megabyte_preset} (global fixed)")
  left.axhline(integer[0]["bytelm"] / 1e9, color="gray", lw=1, label="byte transformer, same global stack")
  for name, style, label in (("entropy", "r", "entropy, preset threshold"),
                             ("entropy_calibrated", "m", "entropy, calibrated threshold"), ("space", "g", "space")):
    left.axvline(measured[name], color=style, lw=1, ls="-.", label=f"measured: {label} ({measured[name]:.2f})")
  left.set_yscale("log")
  left.set_xlabel("patch size (bytes)")
  left.set_ylabel("forward GFLOPs per byte")
  left.set_title(f"FLOPs per byte, context {args.seq_len} bytes")
  left.legend(fontsize=7)
  fits = [r for r in matched if r["fits"]]
  right.plot([r["p"] for r in fits], [r["params"] / 1e6 for r in fits], "o-")
  right.set_xlabel("patch size (bytes)")
  right.set_ylabel("global model parameters (M, non-embedding)")
  right.set_title(f"FLOP-matched to BLT {args.blt_preset} at patch {args.budget_patch_size}")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def write(args, measured, rows, budget, matched, seconds):
  lines = [
      f"Machine: {machine()}. Command: `{' '.join(['python benchmarks/flops_vs_patch_size.py', *sys.argv[1:]])}` "
      f"({seconds:.0f} s). Counts are analytic (`bytescale.flops`, exact convention unless noted; per byte of a "
      f"{args.seq_len}-byte context; hash lookups and the entropy model free). Plot: "
      f"`benchmarks/flops_vs_patch_size.png`.",
      "",
      f"Measured average patch sizes on {measured['corpus']} ({measured.get('bytes', 0):,} validation bytes): "
      f"entropy patcher {measured['entropy']:.2f} bytes (global threshold {measured['threshold']}, entropy model: "
      f"{measured['entropy_model']}); {measured['entropy_calibrated']:.2f} bytes with the threshold "
      f"{measured['calibrated_threshold']:.3f} picked on training rows for {args.entropy_target} bytes; space patcher "
      f"{measured['space']:.2f} bytes.",
      "",
      f"### Fixed global model (BLT `{args.blt_preset}`, MegaByte `{args.megabyte_preset}`)",
      "",
      "GFLOPs per byte. BLT columns split its forward count; the byte transformer runs BLT's global stack on "
      "every byte; MegaByte keeps its global stack (its width must be a multiple of the patch size: — where not).",
      "",
      "| patch size | BLT forward | BLT training | BLT SpaceByte conv. | encoder | global | decoder | cross-attn |"
      " MegaByte forward | byte transformer forward |",
      "|---|---|---|---|---|---|---|---|---|---|",
  ]
  for r in rows:
    lines.append(f"| {r['label']} | {gflops(r['forward'])} | {gflops(r['training'])} | {gflops(r['spacebyte'])} | "
                 f"{gflops(r['encoder'])} | {gflops(r['global'])} | {gflops(r['decoder'])} | {gflops(r['cross'])} | "
                 f"{gflops(r['megabyte'])} | {gflops(r['bytelm'])} |")
  base = rows[0]["forward"]
  lines += [
      "",
      f"### FLOP-matched global models (budget: BLT `{args.blt_preset}` at patch {args.budget_patch_size}, "
      f"{budget / 1e9:.3f} forward GFLOPs per byte)",
      "",
      "The global model is widened (same head dim and depth) to the widest that fits the budget; the local models "
      "stay as they are.",
      "",
      "| patch size | global d_model | heads | layers | global params (non-embedding) | forward GFLOPs/byte |"
      " of budget |",
      "|---|---|---|---|---|---|---|",
  ]
  for r in matched:
    if not r["fits"]:
      lines.append(f"| {r['p']:g} | — | — | — | local models alone exceed the budget | — | — |")
      continue
    lines.append(f"| {r['p']:g} | {r['d_model']} | {r['heads']} | {r['layers']} | {r['params'] / 1e6:,.0f}M | "
                 f"{r['forward'] / 1e9:.3f} | {100 * r['forward'] / r['budget']:.1f}% |")
  entropy_lm = blt.entropy_model_flops(registry.get_preset("bytelm", "entropy-100m"), args.seq_len)
  lines += ["", f"Not in the table (as in the paper): the paper-size entropy model (`bytelm/entropy-100m`, frozen) "
            f"adds {entropy_lm.forward / 1e9:.3f} GFLOPs per byte to inference and to training (forward only) "
            f"at every patch size."]
  at = {r["label"]: r for r in rows}
  if "8" in at:
    lines += ["", f"Patch 8 against patch 1 with the global model fixed: {at['8']['forward'] / base:.2f}x the FLOPs "
              f"per byte; against the byte transformer: {at['8']['forward'] / at['8']['bytelm']:.2f}x."]
  section = "\n".join(lines)
  write_section(RESULTS, "FLOPs per byte against patch size", section)
  print(section)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true", help="short entropy-model training, fewer sample rows")
  parser.add_argument("--data", default=None, help="corpus for the measured patch sizes (default tinyshakespeare)")
  parser.add_argument("--entropy-model", default=None, help="checkpoint dir of a trained entropy model")
  parser.add_argument("--entropy-steps", type=int, default=None)
  parser.add_argument("--entropy-seq-len", type=int, default=256)
  parser.add_argument("--entropy-target", type=float, default=4.5, help="average patch size to calibrate for")
  parser.add_argument("--blt-preset", default="1b")
  parser.add_argument("--megabyte-preset", default="paper")
  parser.add_argument("--seq-len", type=int, default=8192, help="context in bytes for the counts")
  parser.add_argument("--budget-patch-size", type=float, default=4.5)
  parser.add_argument("--matched-patch-sizes", default="2,3,4,4.5,6,8,12,16")
  parser.add_argument("--plot", default=PLOT)
  args = parser.parse_args()
  started = time.perf_counter()
  blt = registry.get_preset("blt", args.blt_preset)
  megabyte = registry.get_preset("megabyte", args.megabyte_preset)
  measured = measure_patch_sizes(args, blt)
  sizes = [(str(p), float(p)) for p in PATCH_SIZES]
  for name, label in (("entropy", "entropy, preset threshold"), ("entropy_calibrated", "entropy, calibrated"),
                      ("space", "space")):
    sizes.append((f"{measured[name]:.2f} ({label}, measured)", measured[name]))
  rows = fixed_global_rows(blt, megabyte, args.seq_len, sizes)
  matched_sizes = sorted({float(x) for x in args.matched_patch_sizes.split(",")})
  budget, matched = flop_matched_rows(blt, args.seq_len, args.budget_patch_size, matched_sizes)
  plot(rows, matched, measured, args, args.plot)
  log(f"plot written to {args.plot}")
  write(args, measured, rows, budget, matched, time.perf_counter() - started)


if __name__ == "__main__":
  main()
