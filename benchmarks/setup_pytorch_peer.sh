#!/usr/bin/env bash
# Optional set-up for benchmarks/vs_pytorch.py and benchmarks/megabyte_vs_pytorch.py: a SEPARATE virtual environment
# holding CPU torch 2.13.0 and the peers, MEGABYTE-pytorch and `transformers` (LlamaForCausalLM, BltForCausalLM).
# Nothing here becomes a dependency of bytescale.
#
#   bash benchmarks/setup_pytorch_peer.sh [VENV_DIR]      (default: /tmp/bytescale-peer-venv)
#
# torch 2.13.0 must be the CPU build: pip on these machines takes it from a local wheel for Python 3.11, so the
# venv is made with Python 3.11 (override with PEER_PYTHON=/path/to/python3.11).
set -euo pipefail
VENV_DIR="${1:-/tmp/bytescale-peer-venv}"
PEER_PYTHON="${PEER_PYTHON:-}"
if [ -z "$PEER_PYTHON" ]; then
  for candidate in /root/.pyenv/versions/3.11.7/bin/python3.11 python3.11; do
    if command -v "$candidate" >/dev/null 2>&1; then PEER_PYTHON="$candidate"; break; fi
  done
fi
if [ -z "$PEER_PYTHON" ]; then
  echo "setup_pytorch_peer.sh: no python3.11 found; set PEER_PYTHON to a Python 3.11 interpreter" >&2
  exit 2
fi
if [ ! -x "$VENV_DIR/bin/python" ]; then
  "$PEER_PYTHON" -m venv "$VENV_DIR"
fi
"$VENV_DIR/bin/python" -m pip install --quiet "torch==2.13.0" "MEGABYTE-pytorch" numpy "transformers==5.25.0"
"$VENV_DIR/bin/python" -c "import torch, MEGABYTE_pytorch, transformers; print('peer ready:', torch.__version__, torch.version.cuda, 'transformers', transformers.__version__)"
echo "$VENV_DIR/bin/python"
