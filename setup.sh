#!/usr/bin/env bash
# Create .venv and install dift-sfm with its test tools. Idempotent.
#   TORCH_SPEC: the torch to install first (default: the CPU wheel torch==2.13.0; on a CUDA
#   machine use e.g. TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cu128").
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch first and pinned: left to itself, pip may pick a multi-GB CUDA build for kornia's range.
.venv/bin/python -m pip install -q ${TORCH_SPEC:-torch==2.13.0}
.venv/bin/python -m pip install -q -e ".[dev,text,ray]"
.venv/bin/dift-sfm --help >/dev/null
echo "dift-sfm installed in $(pwd)/.venv"
