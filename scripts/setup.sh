#!/usr/bin/env bash
# Set up qwen3lab in ./.venv:  bash scripts/setup.sh        (library + CLI)
#                              bash scripts/setup.sh test   (+ test/bench references: transformers, trl, peft)
# torch: a GPU user's existing install is kept. Otherwise the CUDA build is installed where an NVIDIA GPU is
# present, and the CPU build (a few hundred MB, not several GB of CUDA libraries) where none is.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${VENV:-.venv}
[ -x "$venv/bin/python" ] || "${PYTHON:-python3}" -m venv "$venv"
pip=("$venv/bin/python" -m pip install --quiet)
if ! "$venv/bin/python" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    "${pip[@]}" "torch>=2.5"
  else
    # The CPU wheel from the configured indexes (a local mirror may hold it), else from PyTorch's CPU index.
    "${pip[@]}" "torch==2.13.0+cpu" 2>/dev/null ||
      "${pip[@]}" "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu --extra-index-url https://pypi.org/simple
  fi
fi
if [ "${1:-}" = test ]; then
  "${pip[@]}" -e ".[test]"
else
  "${pip[@]}" -e .
fi
echo "qwen3lab set up in $venv (torch $("$venv/bin/python" -c 'import torch; print(torch.__version__)'))"
