#!/usr/bin/env bash
# Rehearse a multi-host run on one machine: 2 processes x 4 simulated CPU devices, joined on localhost.
# The same commands (other --coordinator, no XLA_FLAGS) run on real hosts.
#
#   bash examples/launch/local_cpu.sh [extra train flags]
set -euo pipefail

cd "$(dirname "$0")/../.."
PYTHON="${PYTHON:-.venv/bin/python}"
OUT="${OUT:-runs/local-2x4}"
PORT="${PORT:-$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("localhost", 0)); print(s.getsockname()[1])')}"
export JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=4
mkdir -p "$(dirname "$OUT")"

pids=()
for rank in 0 1; do
  "$PYTHON" -m bytescale.cli train --coordinator "localhost:$PORT" --num-processes 2 --process-id "$rank" \
    --mesh data=2,fsdp=2,tensor=2 --model bytelm --preset tiny --steps 50 --batch-size 8 --seq-len 128 \
    --max-data-bytes 2000000 --out "$OUT" --no-progress "$@" > "$OUT.process$rank.json" &
  pids+=($!)
done
for pid in "${pids[@]}"; do wait "$pid"; done
cat "$OUT.process0.json"
