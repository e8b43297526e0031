#!/usr/bin/env bash
# Install mmcv (with its compiled ops: RoIAlign, NMS, ...) into ./.venv, built from source against the pinned torch.
#
# Why: PyPI has no mmcv wheel for torch 2.14, and mmcv 2.1.0's setup.py passes -std=c++17 while torch 2.14's
# headers need C++20. We patch that one flag, build a wheel once (~10 min on 2 cores) and keep it in a cache
# keyed by mmcv, torch and Python versions and by this script, so later installs (CI, a new venv) reuse it.
# pip's own wheel cache is bypassed: a wheel built there against another torch would hide a broken build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
MMCV_VERSION=${MMCV_VERSION:-2.1.0}
CACHE=${SLIM_WHEEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/slim-plugins/wheels}
torch_v=$($PY -c "import torch; print(torch.__version__)")
py_tag=$($PY -c "import sys; print(f'cp{sys.version_info[0]}{sys.version_info[1]}')")
script_hash=$(sha256sum "$0" | cut -c1-12)
key="mmcv-${MMCV_VERSION}_torch-${torch_v//+/-}_${py_tag}_${script_hash}"
stamp=.venv/.mmcv-stamp

ops_ok() { $PY -c "import mmcv, mmcv.ops; assert mmcv.__version__ == '$MMCV_VERSION'; mmcv.ops.nms; mmcv.ops.RoIAlign" 2>/dev/null; }
if [ "$(cat "$stamp" 2>/dev/null)" = "$key" ] && ops_ok; then
  echo "mmcv $MMCV_VERSION with ops already installed ($key)"; exit 0
fi

# Build requirements (--no-build-isolation: the build must see the venv's torch). setup.py imports pkg_resources,
# which setuptools 81 removed.
$PY -m pip install -q -c constraints.txt "setuptools<81" wheel ninja

wheel_dir="$CACHE/$key"
if ! ls "$wheel_dir"/mmcv-*.whl >/dev/null 2>&1; then
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  echo "building mmcv $MMCV_VERSION with ops against torch $torch_v (about 10 min on 2 cores) ..."
  $PY -m pip download -q --no-deps --no-binary :all: --no-build-isolation "mmcv==$MMCV_VERSION" -d "$work"
  tar xzf "$work"/mmcv-"$MMCV_VERSION".tar.gz -C "$work"
  src="$work/mmcv-$MMCV_VERSION"
  grep -q "\['-std=c++17'\]" "$src/setup.py" || { echo "build_mmcv.sh: setup.py has no -std=c++17 flag to patch" >&2; exit 1; }
  sed -i "s/extra_compile_args\['cxx'\] = \['-std=c++17'\]/extra_compile_args['cxx'] = ['-std=c++20']/" "$src/setup.py"
  # CPU ops unless a GPU is visible to torch (setup.py's own rule); FORCE_CUDA=1 from the caller still works.
  MMCV_WITH_OPS=1 MAX_JOBS=${MAX_JOBS:-2} $PY -m pip wheel -q --no-deps --no-build-isolation --no-cache-dir \
    "$src" -w "$work/dist"
  mkdir -p "$wheel_dir"
  cp "$work"/dist/mmcv-*.whl "$wheel_dir/.tmp.whl.part"
  mv "$wheel_dir/.tmp.whl.part" "$wheel_dir/$(basename "$work"/dist/mmcv-*.whl)"
fi
$PY -m pip install -q --no-deps --force-reinstall "$wheel_dir"/mmcv-*.whl
ops_ok || { echo "build_mmcv.sh: mmcv installed but mmcv.ops does not import" >&2; exit 1; }
echo "$key" > "$stamp"
echo "mmcv $MMCV_VERSION with ops installed from $wheel_dir"
