#!/usr/bin/env bash
# The GPU suite in one command (benchmarks/gpu_suite.py, docs/gpu.md).
#
#   benchmarks/gpu_suite.sh prepare                  # here, where the package registry is reachable:
#                                                    # Python 3.12 manylinux x86-64 wheels into .whl/
#   benchmarks/gpu_suite.sh --out gpu_suite.json     # on the GPU machine (no registry), .whl/ carried:
#                                                    # installs what it lacks, runs every part
#
# The GPU machine has torch, triton, timm, transformers, safetensors, numpy, pyyaml, ... but not
# deepspeed (nor its hjson and pydantic), webdataset (nor braceexpand) or tyro, which parses every
# command's options (nor its docstring_parser and typeguard). They are installed with
# pip --no-index --no-deps --target .gpu/site and put first on PYTHONPATH, beside a
# .gpu/path/tritower -> repository symlink (the repository root is the package). Versions come
# from constraints.txt. wandb is not installed there: the suite never logs to it.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
WHEELS=$ROOT/.whl
# The interpreter that has torch (python3, else python), unless PYTHON names one.
if [ -z "${PYTHON:-}" ]; then
  PYTHON=python3
  if ! python3 -c "import torch" >/dev/null 2>&1 && command -v python >/dev/null 2>&1; then PYTHON=python; fi
fi
# What the GPU machine lacks; typing_extensions too: pydantic needs a newer one than torch does.
PACKAGES="hjson pydantic pydantic_core annotated-types typing-inspection typing_extensions webdataset braceexpand"
PACKAGES="$PACKAGES tyro docstring_parser typeguard"

pinned() {  # name==version from constraints.txt
  grep -iE "^$1==" "$ROOT/constraints.txt" | head -n 1
}

if [ "${1:-}" = "prepare" ]; then
  rm -rf "$WHEELS" && mkdir -p "$WHEELS"
  specs=""
  for package in $PACKAGES; do
    spec=$(pinned "$package")
    [ -n "$spec" ] || { echo "gpu_suite.sh: $package is not pinned in constraints.txt" >&2; exit 1; }
    specs="$specs $spec"
  done
  # shellcheck disable=SC2086
  "$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --abi cp312 --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 -d "$WHEELS" $specs
  # deepspeed is a source package: its pure-Python wheel builds in seconds; its CUDA ops would
  # JIT-compile on first use there, and the suite uses none (torch's fused AdamW, docs/gpu.md).
  "$PYTHON" -m pip wheel --quiet --no-deps "$(pinned deepspeed)" -w "$WHEELS"
  ls -l "$WHEELS"
  du -sh "$WHEELS"
  exit 0
fi

SITE=$ROOT/.gpu/site
mkdir -p "$ROOT/.gpu/path"
ln -sfn "$ROOT" "$ROOT/.gpu/path/tritower"
ls "$WHEELS"/deepspeed-*.whl >/dev/null 2>&1 || {
  echo "gpu_suite.sh: no wheels in $WHEELS: run 'benchmarks/gpu_suite.sh prepare' where the registry is reachable" >&2
  exit 1
}
wanted=$(cd "$WHEELS" && ls -- *.whl | sort)
if [ "$(cat "$SITE/.installed" 2>/dev/null)" != "$wanted" ]; then
  rm -rf "$SITE" && mkdir -p "$SITE"
  if ! "$PYTHON" -m pip install --quiet --no-index --no-deps --target "$SITE" "$WHEELS"/*.whl; then
    # No pip there: a wheel is a zip archive laid out as site-packages.
    "$PYTHON" -c 'import sys, zipfile; [zipfile.ZipFile(w).extractall(sys.argv[1]) for w in sys.argv[2:]]' \
      "$SITE" "$WHEELS"/*.whl
  fi
  echo "$wanted" >"$SITE/.installed"
fi
export PYTHONPATH="$ROOT/.gpu/path:$SITE${PYTHONPATH:+:$PYTHONPATH}"
export WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false
exec "$PYTHON" "$ROOT/benchmarks/gpu_suite.py" "$@"
