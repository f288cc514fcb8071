#!/usr/bin/env bash
# Install stagediff (editable) with its test and logging extras.
# torch is installed only when missing, pinned: a bare `torch` (or an open range) makes pip pull
# a multi-GB CUDA build; 2.13.0 resolves to the CPU wheel on CPU-only machines. GPU users
# install the torch build they want first, and this leaves it alone.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -c "import torch" 2>/dev/null || python3 -m pip install "torch==2.13.0"
python3 -m pip install -e ".[test,tensorboard]"
