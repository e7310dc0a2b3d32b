"""MegaByte strided inference: held-out bits per byte of one trained model with none / paper / average.

  python benchmarks/megabyte_strided.py                       # trains the tiny preset 300 steps, then scores
  python benchmarks/megabyte_strided.py --ckpt runs/mb        # scores an existing MegaByte run

Trains with ``bytescale train`` on the corpus (default: benchmarks/common.py DEFAULT_CORPUS), whose last 10% is
held out (the run's validation split, never trained on), then scores that split with the same parameters under
each ``strided_inference`` mode (docs/megabyte.md): ``none`` (one pass), ``paper`` (MegaByte section 2.3: two
passes offset by P // 2, each byte read from the pass in which it sits in the first half of its patch) and
``average`` (mean probability of the two passes). It also reports bits per byte by the predicted byte's
position within its patch (the paper's observation that later positions are worse), and cross-checks the totals
with ``bytescale eval --strided MODE`` on the held-out bytes written to a file. The table goes to
``benchmarks/RESULTS_megabyte.md``, one section per model shape and training length.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import json
import math
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from benchmarks.common import DEFAULT_CORPUS, write_section  # noqa: E402
from bytescale import cli  # noqa: E402
from bytescale.data.pipeline import ByteCorpus, DataConfig, eval_batches  # noqa: E402
from bytescale.models.megabyte import MegaByte  # noqa: E402
from bytescale.train.checkpoint import load_model  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS_megabyte.md")
TITLE = "MegaByte strided inference: held-out bits per byte with none / paper / average"
MODES = ("none", "paper", "average")


def machine_line(load_at_start: float) -> str:
  model = "unknown CPU"
  with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
    model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
  return (f"{model}, {os.cpu_count()} cores, jax {jax.__version__} ({jax.default_backend()}), "
          f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, 1-minute load average {load_at_start:.1f} "
          "at start")


def run_cli(argv) -> dict:
  """``bytescale ARGV`` in this process; its last JSON line."""
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    status = cli.main(argv)
  if status != 0:
    raise SystemExit(f"bytescale {' '.join(argv)} exited with {status}")
  return json.loads(out.getvalue().strip().splitlines()[-1])


def nll_by_patch_position(model: MegaByte, tokens: np.ndarray, seq_len: int, batch_size: int):
  """Summed negative log-likelihood (nats) and counts of the held-out targets, by the predicted byte's position
  within its (aligned) patch of the row: output t predicts byte t + 1 of the row."""
  p = model.config.patch_size
  graphdef, state = nnx.split(model)

  @jax.jit
  def target_nll(state, inputs, segments, targets):
    logits = nnx.merge(graphdef, state)(inputs, segments).logits_BxTxV
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]

  position = (np.arange(1, seq_len + 1) % p)[None]
  sums, counts = np.zeros(p), np.zeros(p)
  for batch in eval_batches(tokens, seq_len=seq_len, batch_size=batch_size):
    nll = np.asarray(target_nll(state, batch["inputs"], batch["segment_ids"], batch["targets"]), np.float64)
    mask = np.asarray(batch["loss_mask"], np.float64)
    positions = np.broadcast_to(position, mask.shape)
    np.add.at(sums, positions, nll * mask)
    np.add.at(counts, positions, mask)
  return sums, counts


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--data", default=DEFAULT_CORPUS, help="training corpus; its last 10%% is held out")
  parser.add_argument("--ckpt", default=None, help="score this MegaByte run instead of training one")
  parser.add_argument("--out", default=None, help="run directory for the training (default: a temporary one)")
  parser.add_argument("--preset", default="tiny", help="megabyte preset (default tiny)")
  parser.add_argument("--steps", type=int, default=300, help="training steps (default 300)")
  parser.add_argument("--batch-size", type=int, default=8, help="training and scoring rows per batch (default 8)")
  parser.add_argument("--seq-len", type=int, default=256, help="bytes per row, training and scoring (default 256)")
  parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                      help="model/train config override passed to bytescale train")
  parser.add_argument("--no-write", action="store_true", help="print the table only")
  args = parser.parse_args()
  load_at_start = os.getloadavg()[0]
  command = "python benchmarks/megabyte_strided.py " + " ".join(sys.argv[1:])
  # The default corpus by its place beside the checkout, not this machine's absolute path.
  data_shown = "shared/data/tinyshakespeare.txt" if os.path.abspath(args.data) == DEFAULT_CORPUS else args.data

  run_dir = args.ckpt
  train_line = "an existing run"
  if run_dir is None:
    run_dir = args.out or tempfile.mkdtemp(prefix="megabyte_strided_")
    train_argv = ["train", "--model", "megabyte", "--preset", args.preset, "--data", args.data, "--steps",
                  str(args.steps), "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len),
                  *[x for s in args.set for x in ("--set", s)]]
    start = time.perf_counter()
    summary = run_cli(train_argv + ["--out", run_dir])
    shown_argv = [data_shown if x == args.data else x for x in train_argv]
    train_line = (f"`bytescale {' '.join(shown_argv)} --out RUN`: {summary['params']:,} parameters, "
                  f"{summary['steps']} steps, "
                  f"{time.perf_counter() - start:.0f} s wall (compilation included), final validation bpb "
                  f"{summary['val_bpb']:.4f}")
  model, meta = load_model(run_dir)
  if not isinstance(model, MegaByte):
    raise SystemExit(f"{run_dir} holds a {meta['model']!r} model, not megabyte")
  seq_len = meta["train_config"]["seq_len"]
  corpus = ByteCorpus.load(DataConfig(source=args.data, seq_len=seq_len, batch_size=args.batch_size))
  held_out = corpus.validation_tokens
  p, c = model.config.patch_size, model.config

  rows = {}
  for mode in MODES:
    sums, counts = nll_by_patch_position(model.with_strided_inference(mode), held_out, seq_len, args.batch_size)
    rows[mode] = (sums.sum() / counts.sum() / math.log(2), sums / counts / math.log(2), int(counts.sum()))

  # The same figures through the command line, on the held-out bytes as a file (framed as one document).
  with tempfile.NamedTemporaryFile(suffix=".txt", delete=False) as f:
    f.write(bytes(int(x) for x in held_out if x < 256))
    held_out_file = f.name
  cli_bpb = {mode: run_cli(["eval", "--ckpt", run_dir, "--data", held_out_file, "--batch-size",
                            str(args.batch_size), "--strided", mode])["bpb"] for mode in MODES}
  os.unlink(held_out_file)

  base = rows["none"][0]
  header = ("| strided_inference | passes | held-out bpb | vs none | `bytescale eval --strided` bpb | "
            + " | ".join(f"bpb at in-patch {i}" for i in range(p)) + " |")
  lines = [header, "|" + "---|" * (5 + p)]
  for mode in MODES:
    bpb, by_position, _ = rows[mode]
    lines.append(f"| {mode} | {1 if mode == 'none' else 2} | {bpb:.4f} | {bpb - base:+.4f} | {cli_bpb[mode]:.4f} | "
                 + " | ".join(f"{x:.3f}" for x in by_position) + " |")
  table = "\n".join(lines)
  body = (
      f"`{command}` -- {machine_line(load_at_start)}\n\n"
      f"Model: megabyte (P={p}, global D={c.global_stack.d_model} L={c.global_stack.num_layers}, local "
      f"D={c.local_stack.d_model} L={c.local_stack.num_layers}), trained by {train_line}. Scored: the run's "
      f"validation split (the last 10% of `{data_shown}`'s framed stream, "
      f"{rows['none'][2]:,} targets, never trained on), rows of {seq_len} bytes, float32. 'bpb at in-patch i': "
      f"the bytes at position i of their patch in the row's aligned grid (whichever pass predicted them). The "
      f"`bytescale eval` column scores the same bytes written to a file (one document: BOS/EOS framing and row "
      f"cuts differ slightly).\n\n{table}"
  )
  print(body)
  if not args.no_write:
    # One section per model shape and training length: rerunning the same one replaces it.
    shape = (f"P={p}, global D={c.global_stack.d_model} L={c.global_stack.num_layers}, local D={c.local_stack.d_model} "
             f"L={c.local_stack.num_layers}, {meta['step']} steps")
    write_section(RESULTS, f"{TITLE} ({shape})", body)
    print(f"written to {RESULTS}", file=sys.stderr)


if __name__ == "__main__":
  main()
