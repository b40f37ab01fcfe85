#!/usr/bin/env bash
# One entry point for a fresh clone:  ./dev.sh demo   (set up + run the demo)   |   ./dev.sh test   (set up + tests)
#   ./dev.sh demo        set up, materialize the demo pipeline into .dagster_home/ (SQLite), then serve the Dagster UI
#   ./dev.sh test        set up (incl. Debian chromium for the UI test when root), run the whole pytest suite
#   ./dev.sh merge-demo  set up, run the engine-only merge demo (no Dagster)
#   ./dev.sh unsloth     create the optional .venv-unsloth/ (see README)
# Setup creates .venv/ in the repo root. torch: on a machine with an NVIDIA GPU the default PyPI build (CUDA) is
# installed; without one, torch==2.13.0 (on this project's CPU machines a CPU wheel from the local wheel cache).
# Override with MERGELINE_TORCH="torch==X.Y --index-url ..." if you need another build.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}

setup() {
  if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
    .venv/bin/python -m pip install -q --upgrade pip
  fi
  if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    if [ -n "${MERGELINE_TORCH:-}" ]; then
      # shellcheck disable=SC2086
      .venv/bin/pip install -q $MERGELINE_TORCH
    elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
      .venv/bin/pip install -q torch
    else
      .venv/bin/pip install -q "torch==2.13.0"
    fi
  fi
  local stamp=.venv/.mergeline-installed
  local want
  want=$(cat pyproject.toml | sha256sum | cut -c1-16)
  if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    .venv/bin/pip install -q -e ".[test,hub]"
    echo "$want" > "$stamp"
  fi
}

cmd=${1:-}
shift || true
case "$cmd" in
  setup) setup ;;
  demo) setup; exec .venv/bin/python -m pipelines.demo_dagster "$@" ;;
  merge-demo) setup; exec .venv/bin/python -m pipelines.demo "$@" ;;
  test) setup; bash scripts/install_browser.sh; exec .venv/bin/python -m pytest "$@" ;;
  unsloth) setup; exec bash scripts/install_unsloth.sh "$@" ;;
  *) echo "usage: ./dev.sh demo | test | merge-demo | unsloth | setup" >&2; exit 2 ;;
esac
