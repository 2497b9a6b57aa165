#!/usr/bin/env bash
# pdengine's two entry points; each sets itself up on a fresh machine.
#   ./run.sh demo [--out DIR] [...]   the embedded demo (the main job)
#   ./run.sh test [pytest args]       the test suite
# Set-up: a virtual environment in .venv (PDENGINE_VENV overrides), torch==2.13.0 only
# when no torch is importable (never replaces a CUDA build), the other dependencies,
# then `pip install --no-build-isolation -e .`, which builds the C++ extension.
set -euo pipefail
cd "$(dirname "$0")"
VENV=${PDENGINE_VENV:-.venv}
PY="$VENV/bin/python"

say() { echo "[pdengine setup] $*" >&2; }

setup_env() {
  if [ ! -x "$PY" ]; then
    say "creating virtual environment $VENV"
    python3 -m venv "$VENV"
    # an old pip turns `install -e` into `setup.py develop` with an isolated build (no torch)
    "$PY" -m pip install -q --upgrade pip
  fi
  if ! "$PY" -c "import torch" 2>/dev/null; then
    say "installing torch==2.13.0"
    "$PY" -m pip install -q torch==2.13.0
  fi
  if ! "$PY" -c "import triton" 2>/dev/null; then
    say "installing triton"
    "$PY" -m pip install -q triton
  fi
  if ! "$PY" -c "import setuptools, wheel, ninja, transformers, safetensors, numpy, pytest, tqdm, yaml, peft, matplotlib, bm25s, bitsandbytes" 2>/dev/null; then
    say "installing dependencies"
    "$PY" -m pip install -q setuptools wheel ninja transformers safetensors numpy pytest tqdm pyyaml peft matplotlib bm25s bitsandbytes
  fi
  # Rebuild the package (and its C++ extension) only when its sources changed.
  local stamp="$VENV/.pdengine-build-stamp" want
  want=$(cat setup.py csrc/* 2>/dev/null | "$PY" -c "import hashlib,sys; print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest())")
  if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ] || ! "$PY" -c "import pdengine" 2>/dev/null; then
    say "building pdengine (C++ extension included; about a minute)"
    "$PY" -m pip install -q --no-build-isolation --no-deps -e .
    echo "$want" > "$stamp"
  fi
}

cmd=${1:-}
[ $# -gt 0 ] && shift
case "$cmd" in
  demo) setup_env; exec "$PY" -m pdengine demo "$@" ;;
  test) setup_env; [ $# -gt 0 ] || set -- tests; exec "$PY" -m pytest -q "$@" ;;
  *) echo "usage: ./run.sh demo [--out DIR] | ./run.sh test [pytest args]" >&2; exit 2 ;;
esac
