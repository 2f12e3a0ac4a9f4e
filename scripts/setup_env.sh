#!/usr/bin/env bash
# Create (or reuse) .venv in the repository root and install what the project needs.
# torch: if the venv has none yet, the CPU build (requirements-cpu.txt) is installed first; GPU users
# install their CUDA torch into .venv before running this (see README), and it is kept.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
python_bin="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$python_bin" -m venv .venv
fi
py=.venv/bin/python
stamp=.venv/.sdtk-installed
want="$(cat requirements.txt requirements-dev.txt requirements-cpu.txt requirements-deepspeed.txt | sha256sum | cut -c1-16)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  export PIP_DISABLE_PIP_VERSION_CHECK=1
  if ! "$py" -c "import torch" >/dev/null 2>&1; then
    "$py" -m pip install -q -r requirements-cpu.txt
  fi
  "$py" -m pip install -q -r requirements-dev.txt
  "$py" -m pip install -q --no-build-isolation -r requirements-deepspeed.txt
  echo "$want" > "$stamp"
fi
