"""``bytescale entropy-threshold``: the entropy-patching threshold that gives a target average patch size on a
sample of a corpus, for a trained entropy model (``bytescale.entropy`` holds the calibration itself)."""

from __future__ import annotations

import json

from bytescale.data.pipeline import frame_documents
from bytescale.data.sources import load_documents
from bytescale.entropy import sample_entropies, threshold_for_patch_size
from bytescale.patching import PatchingConfig
from bytescale.train.checkpoint import load_entropy_model


def add_command(subparsers):
  p = subparsers.add_parser(
      "entropy-threshold", help="calibrate BLT's entropy threshold for a target average patch size",
      description="Pick the entropy threshold (global, or monotonic) giving a target average patch size on a sample "
      "of the data, with a trained bytelm entropy model; prints one JSON line.")
  p.add_argument("--entropy-model", required=True, help="run directory of a bytelm entropy model")
  p.add_argument("--data", required=True, help="file, directory, glob or 'stdlib'")
  p.add_argument("--target-patch-size", type=float, default=4.0, help="bytes per patch to aim for (default 4)")
  p.add_argument("--monotonic", action="store_true", help="calibrate the monotonic rule instead of the global one")
  p.add_argument("--max-patch-length", type=int, default=None, help="also split patches longer than this")
  p.add_argument("--seq-len", type=int, default=512, help="row length of the sample (default 512)")
  p.add_argument("--rows", type=int, default=64, help="rows in the sample (default 64)")
  p.add_argument("--max-bytes", type=int, default=2_000_000, help="read at most this many corpus bytes")
  return "entropy-threshold", run


def run(args):
  model = load_entropy_model(args.entropy_model)
  tokens = frame_documents(load_documents(args.data, max_bytes=args.max_bytes))
  h, seg = sample_entropies(model, tokens, seq_len=args.seq_len, max_rows=args.rows)
  if args.monotonic:
    config = PatchingConfig("entropy", threshold=None, monotonic_threshold=0.0, max_patch_length=args.max_patch_length)
    field = "monotonic_threshold"
  else:
    config = PatchingConfig("entropy", max_patch_length=args.max_patch_length)
    field = "threshold"
  value, size = threshold_for_patch_size(h, seg, args.target_patch_size, config, field=field)
  print(json.dumps({field: value, "average_patch_size": size, "sample_bytes": int((seg != 0).sum())}))
