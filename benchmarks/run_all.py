"""Regenerates benchmarks/RESULTS.md: runs every benchmark, then gathers their result files into one.

    python benchmarks/run_all.py [--quick] [--only kernels,throughput,...]

Each benchmark writes its own ``RESULTS_<name>.md`` (with machine, date and versions beside every figure);
this script runs them in sequence and concatenates those files, newest run first, under one heading.
"""

from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))

# (name, script, extra arguments in quick mode, results file)
BENCHMARKS = [
    ("throughput", "throughput.py", ["--quick"], "RESULTS_throughput.md"),
    ("kernels", "kernels.py", ["--quick"], "RESULTS_kernels.md"),
    ("megabyte", "megabyte_vs_bytelm.py", ["--quick"], "RESULTS_megabyte.md"),
    ("blt", "blt_compare.py", ["--quick"], "RESULTS_blt.md"),
    ("multi_token", "multi_token.py", ["--quick"], "RESULTS_multi_token.md"),
    ("rope", "context_extension.py", ["--quick"], "RESULTS_rope.md"),
    ("flops", "flops_vs_patch_size.py", [], "RESULTS_flops.md"),
    ("eval", "eval_suite.py", ["--quick"], "RESULTS_eval.md"),
    # Needs the peers' venv (bash benchmarks/setup_pytorch_peer.sh); fails with that hint without it.
    ("vs_pytorch", "vs_pytorch.py", ["--quick"], "RESULTS_vs_pytorch.md"),
    ("profile", "profile_ops.py", ["--steps", "1"], "RESULTS_profile.md"),
    ("decode", "decode_step.py", ["--quick"], "RESULTS_decode.md"),
]


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--only", default=None, help="comma-separated benchmark names")
  parser.add_argument("--no-run", action="store_true", help="only gather the existing result files")
  args = parser.parse_args()
  chosen = set(args.only.split(",")) if args.only else None
  failures = []
  for name, script, quick_args, _ in BENCHMARKS:
    if args.no_run or (chosen and name not in chosen):
      continue
    path = os.path.join(HERE, script)
    if not os.path.exists(path):
      print(f"[run_all] {name}: {script} not present, skipped", file=sys.stderr)
      continue
    print(f"[run_all] {name}: running {script}", file=sys.stderr, flush=True)
    proc = subprocess.run([sys.executable, path, *(quick_args if args.quick else [])])
    if proc.returncode:
      failures.append(name)
  gather()
  if failures:
    sys.exit(f"[run_all] failed: {', '.join(failures)}")


def gather():
  parts = []
  for name, _, _, results in BENCHMARKS:
    path = os.path.join(HERE, results)
    if os.path.exists(path):
      # One level down: each file's title becomes a section of this file.
      text = "\n".join("#" + line if line.startswith("#") else line for line in open(path).read().strip().splitlines())
      parts.append(f"<!-- from {results} -->\n" + text)
  own = os.path.join(HERE, "RESULTS.md")
  head = open(own).read().split("<!-- gathered -->")[0].strip() if os.path.exists(own) else "# Benchmark results"
  stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
  with open(own, "w") as f:
    f.write(head + f"\n\n<!-- gathered -->\n_Gathered {stamp} by `python benchmarks/run_all.py`._\n\n")
    f.write("\n\n".join(parts) + "\n")


if __name__ == "__main__":
  main()
