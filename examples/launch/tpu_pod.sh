#!/usr/bin/env bash
# Train on every host of a Cloud TPU pod slice (e.g. v5p-32 = 4 hosts x 4 chips): one process per host.
#
#   TPU_NAME=my-pod ZONE=us-east5-a OUT=/mnt/shared/runs/pod1 bash examples/launch/tpu_pod.sh [extra train flags]
#
# Every host runs the same command; `--distributed` lets jax.distributed.initialize() read the pod's topology
# (coordinator, process count and id) from the TPU metadata. OUT must be a directory all hosts share (NFS /
# Filestore, or a gcsfuse mount of a bucket): orbax writes each host's shards of the checkpoint there.
# The repository is expected at ~/bytescale on every host (see README.md, "Set up the hosts").
set -euo pipefail

: "${TPU_NAME:?set TPU_NAME to the TPU VM name}"
: "${ZONE:?set ZONE to its zone}"
: "${OUT:?set OUT to a directory shared by all hosts}"
MESH="${MESH:-data=-1,fsdp=4}"       # fsdp over the 4 chips of a host, data parallel across hosts
MODEL="${MODEL:-bytelm}"
PRESET="${PRESET:-small}"
STEPS="${STEPS:-2000}"
BATCH="${BATCH:-64}"                 # global batch: divisible by data * fsdp

# Quote the extra flags so they survive the remote shell.
EXTRA=""
for arg in "$@"; do EXTRA+=" $(printf '%q' "$arg")"; done

gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command "
  cd ~/bytescale && .venv/bin/python -m bytescale.cli train --distributed \
    --model $MODEL --preset $PRESET --mesh $MESH --batch-size $BATCH --steps $STEPS \
    --out $OUT --no-progress $EXTRA
"
