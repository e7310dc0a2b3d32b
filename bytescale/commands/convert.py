"""``bytescale convert``: Hugging Face BLT directories to bytescale run directories and back (``bytescale.convert``).

    bytescale convert --from-hf HF_DIR --out RUN_DIR    # then: bytescale generate --ckpt RUN_DIR --prompt ...
    bytescale convert --to-hf RUN_DIR --out HF_DIR      # transformers' BltForCausalLM.from_pretrained(HF_DIR)
"""

from __future__ import annotations

import json
import sys

from bytescale.configs import ConfigError


def add_command(subparsers):
  p = subparsers.add_parser("convert", help="convert a Hugging Face BLT (config.json + safetensors) to a bytescale "
                                            "run directory, or back")
  source = p.add_mutually_exclusive_group(required=True)
  source.add_argument("--from-hf", metavar="HF_DIR", help="a transformers BLT directory (model.safetensors or a "
                                                          "sharded index); writes a run directory")
  source.add_argument("--to-hf", metavar="RUN_DIR", help="a bytescale BLT run directory (reference options); writes a "
                                                         "transformers directory")
  p.add_argument("--out", required=True, help="new directory to write (must not exist or be empty); nothing is "
                                              "left there if conversion fails")
  p.add_argument("--seq-len", type=int, default=None,
                 help="--from-hf: sequence length eval uses by default (default: min(max_position_embeddings, 1024))")
  return "convert", _run


def _run(args):
  from bytescale import convert

  if args.seq_len is not None and args.seq_len < 2:
    raise ConfigError(f"--seq-len must be >= 2, got {args.seq_len}")
  if args.from_hf:
    print(f"converting {args.from_hf} -> {args.out}", file=sys.stderr)
    meta = convert.hf_to_run_directory(args.from_hf, args.out, seq_len=args.seq_len)
    print(json.dumps({"from_hf": args.from_hf, "out": args.out, "model": meta["model"],
                      "max_seq_len": meta["model_config"]["max_seq_len"]}))
  else:
    print(f"exporting {args.to_hf} -> {args.out}", file=sys.stderr)
    convert.run_directory_to_hf(args.to_hf, args.out)
    print(json.dumps({"to_hf": args.to_hf, "out": args.out}))
