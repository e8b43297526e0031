#!/usr/bin/env bash
# Create ./.venv and install slim-plugins with every extra and the tested pins (constraints.txt).
# torch/torchvision come pinned as a matching pair: never let pip resolve torch freely.
# mmcv has no wheel for this torch: tools/build_mmcv.sh builds it from source once (~10 min on 2 cores) and keeps
# the wheel in ~/.cache/slim-plugins/wheels for later installs.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade "pip>=23" 2>/dev/null || true
# 1. torch (pinned pair) and mmengine: what the mmcv build compiles and imports against.
.venv/bin/python -m pip install -c constraints.txt torch torchvision mmengine
# 2. mmcv with ops (RoIAlign, NMS, ...), built against that torch, or reused from the wheel cache.
tools/build_mmcv.sh
# 3. basicsr-fixed is an sdist whose setup_requires lists torch: built in isolation it downloads a second torch
#    (GBs); built against the venv it takes seconds.
.venv/bin/python -m pip install -c constraints.txt --no-build-isolation basicsr-fixed
# 4. The package and every extra; mmcv and basicsr-fixed are already satisfied, so pip builds neither again.
.venv/bin/python -m pip install -c constraints.txt -e ".[dev]"
# Stamp: .ci/run reinstalls when pyproject.toml, constraints.txt or the mmcv build script change.
cat pyproject.toml constraints.txt tools/build_mmcv.sh | sha256sum | cut -d' ' -f1 > .venv/.slim-install-stamp
echo "installed into $(pwd)/.venv"
