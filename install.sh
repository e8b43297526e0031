#!/usr/bin/env bash
# Create ./.venv and install slim-plugins with every extra and the tested pins (constraints.txt).
# torch/torchvision come pinned as a matching pair: never let pip resolve torch freely.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade "pip>=23" 2>/dev/null || true
.venv/bin/python -m pip install -c constraints.txt -e ".[dev]"
# Stamp: .ci/run reinstalls when pyproject.toml or constraints.txt change.
cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1 > .venv/.slim-install-stamp
echo "installed into $(pwd)/.venv"
