#!/usr/bin/env bash
# Train on several GPU nodes: one process per node, each driving all of its GPUs.
#
# Under SLURM (one task per node; jax.distributed.initialize() reads SLURM's variables):
#   sbatch --nodes=2 --ntasks-per-node=1 --gpus-per-node=8 examples/launch/gpu_multinode.sh
#
# Without a scheduler, run this on every node with the same COORDINATOR (node 0's address and a free port):
#   COORDINATOR=10.0.0.1:12345 NUM_NODES=2 NODE_RANK=0 bash examples/launch/gpu_multinode.sh   # on node 0
#   COORDINATOR=10.0.0.1:12345 NUM_NODES=2 NODE_RANK=1 bash examples/launch/gpu_multinode.sh   # on node 1
#
# OUT must be a directory every node can reach (NFS, Lustre...): orbax writes each node's shards there.
set -euo pipefail

cd "$(dirname "$0")/../.."
PYTHON="${PYTHON:-.venv/bin/python}"
OUT="${OUT:-runs/multinode}"
# Tensor parallel inside a node (fast NVLink), fully sharded data parallel across nodes.
MESH="${MESH:-fsdp=-1,tensor=8}"
MODEL="${MODEL:-bytelm}"
PRESET="${PRESET:-small}"
STEPS="${STEPS:-2000}"
BATCH="${BATCH:-64}"                 # global batch: divisible by data * fsdp

if [[ -n "${COORDINATOR:-}" ]]; then
  : "${NUM_NODES:?set NUM_NODES with COORDINATOR}"
  : "${NODE_RANK:?set NODE_RANK with COORDINATOR}"
  DIST=(--coordinator "$COORDINATOR" --num-processes "$NUM_NODES" --process-id "$NODE_RANK")
  RUN=()
else
  DIST=(--distributed)                # SLURM / Open MPI / JAX_COORDINATOR_ADDRESS auto-detection
  RUN=(srun --ntasks-per-node=1)
fi

exec "${RUN[@]}" "$PYTHON" -m bytescale.cli train "${DIST[@]}" --model "$MODEL" --preset "$PRESET" \
  --mesh "$MESH" --batch-size "$BATCH" --steps "$STEPS" --out "$OUT" --no-progress "$@"
