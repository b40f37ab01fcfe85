#!/usr/bin/env bash
# Create or update a SEPARATE virtual environment for mergeline's Unsloth fine-tune backend.
#
#   scripts/install_unsloth.sh [VENV]        # default VENV: $MERGELINE_UNSLOTH_VENV or .venv-unsloth/ in the repo root
#
# Why a separate venv: unsloth 2026.10 pins transformers <= 5.17, datasets < 5 and trl <= 1.15, while mergeline's
# main venv tracks newer transformers / datasets. The fine-tune backend runs Unsloth in its own subprocess anyway
# (resources/unsloth_entry.py: `import unsloth` must come before transformers/peft/trl), so that subprocess uses
# another interpreter: $MERGELINE_UNSLOTH_PYTHON, else .venv-unsloth/bin/python when it exists.
#
# What it installs. torch is pinned by a constraints file in EVERY step, so nothing can pull another torch build:
#   1. torch ($MERGELINE_UNSLOTH_TORCH, default "torch==2.13.0": on this project's CPU machines a CPU wheel from the
#      local wheel cache; on a CUDA machine PyPI's default CUDA build of the same version).
#   2. transformers / trl / datasets / peft / accelerate / bitsandbytes at versions inside unsloth's ranges, plus the
#      light packages unsloth and unsloth_zoo import.
#   3. unsloth + unsloth_zoo with --no-deps (their full dependency set pulls CUDA torch, triton, xformers, ...).
#      On a CUDA machine (nvidia-smi works, or MERGELINE_UNSLOTH_GPU=1) also cut_cross_entropy and torchao, still
#      under the torch pin (untested in this project's CI, which has no GPU).
#   4. this repo, editable, with --no-deps, plus mergeline's light dependencies (no numba, no Dagster: the Unsloth
#      subprocess needs only resources/training_backend.py).
# Idempotent: a stamp records what was installed; a re-run with the same inputs is a ~1 s check.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${1:-${MERGELINE_UNSLOTH_VENV:-$ROOT/.venv-unsloth}}"
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null 2>&1 || PY=python3

TORCH_SPEC="${MERGELINE_UNSLOTH_TORCH:-torch==2.13.0}"
UNSLOTH_VERSION="2026.10.9"
UNSLOTH_ZOO_VERSION="2026.10.9"
# Inside unsloth's supported ranges (transformers<=5.17.0, trl<=1.15.0, datasets<5, peft>=0.18).
TRANSFORMERS_VERSION="5.17.0"
TRL_VERSION="1.15.0"
DATASETS_VERSION="4.8.5"
PEFT_VERSION="0.21.2"
ACCELERATE_VERSION="1.15.0"
BITSANDBYTES_VERSION="0.50.2"

GPU="${MERGELINE_UNSLOTH_GPU:-}"
if [ -z "$GPU" ]; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then GPU=1; else GPU=0; fi
fi

start=$(date +%s)
say() { echo "install_unsloth: $*"; }
# pip, quiet, without the "Location ... is ignored" noise of absent local index folders
pipq() {
    "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
}

STAMP="$VENV/.mergeline-unsloth-installed"
WANT="$(cat "${BASH_SOURCE[0]}" | sha256sum | cut -c1-16) $TORCH_SPEC gpu=$GPU"
if [ -x "$VENV/bin/python" ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ] && \
   "$VENV/bin/python" -c "import importlib.util as u, sys; sys.exit(0 if u.find_spec('unsloth') else 1)" 2>/dev/null; then
    say "$VENV is up to date"
    exit 0
fi

if [ ! -x "$VENV/bin/python" ]; then
    say "creating $VENV ($("$PY" --version 2>&1))"
    "$PY" -m venv "$VENV"
fi
# never let git see a multi-GB venv, whatever .gitignore says (Python >= 3.13 venvs do the same)
[ -f "$VENV/.gitignore" ] || echo "*" > "$VENV/.gitignore"

CONSTRAINTS="$VENV/mergeline-unsloth-constraints.txt"
TORCH_PIN="${TORCH_SPEC%% *}"   # the requirement itself, without e.g. "--index-url ..."
printf '%s\ntransformers==%s\ntrl==%s\ndatasets==%s\npeft==%s\naccelerate==%s\nbitsandbytes==%s\n' \
    "$TORCH_PIN" "$TRANSFORMERS_VERSION" "$TRL_VERSION" "$DATASETS_VERSION" "$PEFT_VERSION" "$ACCELERATE_VERSION" \
    "$BITSANDBYTES_VERSION" > "$CONSTRAINTS"

t=$(date +%s)
# 1. torch first, so nothing later resolves a different build.
# shellcheck disable=SC2086
pipq install $TORCH_SPEC
say "torch: $(( $(date +%s) - t )) s"; t=$(date +%s)

# 2. the libraries unsloth patches, at versions it supports, and the light packages unsloth / unsloth_zoo import
#    (their heavy requirements torchvision, xformers, triton, diffusers are left out: the text LoRA path does
#    not import them).
pipq install -c "$CONSTRAINTS" \
    "transformers==$TRANSFORMERS_VERSION" "trl==$TRL_VERSION" "datasets==$DATASETS_VERSION" \
    "peft==$PEFT_VERSION" "accelerate==$ACCELERATE_VERSION" "bitsandbytes==$BITSANDBYTES_VERSION" \
    tokenizers safetensors sentencepiece protobuf psutil packaging tyro msgspec hf_transfer regex einops \
    typing_extensions filelock requests "huggingface_hub>=0.34" pillow wheel
say "transformers/trl/datasets/peft/bitsandbytes: $(( $(date +%s) - t )) s"; t=$(date +%s)

# 3. unsloth itself, without its (CUDA) dependency set.
pipq install -c "$CONSTRAINTS" --no-deps "unsloth==$UNSLOTH_VERSION" "unsloth_zoo==$UNSLOTH_ZOO_VERSION"
if [ "$GPU" = "1" ]; then
    pipq install -c "$CONSTRAINTS" cut_cross_entropy torchao
fi
say "unsloth: $(( $(date +%s) - t )) s"; t=$(date +%s)

# 4. this repo (so `python -m resources.unsloth_entry` works from anywhere) with mergeline's light dependencies.
pipq install -c "$CONSTRAINTS" "numpy>=1.26" "pydantic>=2.6" "pyyaml>=6" "tqdm>=4.60" "pyarrow"
pipq install -c "$CONSTRAINTS" --no-deps -e "$ROOT"
say "mergeline (editable): $(( $(date +%s) - t )) s"

# Verify: unsloth imports first, FastLanguageModel is there, torch is the pinned build.
"$VENV/bin/python" - "$TORCH_PIN" <<'EOF'
import os, sys, warnings
os.environ.setdefault("UNSLOTH_DISABLE_STATISTICS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore")
import unsloth  # noqa: F401  (must come before transformers/peft/trl)
from unsloth import FastLanguageModel  # noqa: F401
from importlib.metadata import version
import torch
want = sys.argv[1].split("==", 1)[-1]
assert "==" not in sys.argv[1] or torch.__version__.split("+")[0] == want, (torch.__version__, want)
print("install_unsloth:", ", ".join(f"{p} {version(p)}" for p in
      ("unsloth", "unsloth_zoo", "torch", "transformers", "trl", "peft", "datasets", "bitsandbytes")),
      "| cuda:", torch.cuda.is_available())
EOF
echo "$WANT" > "$STAMP"
say "OK $VENV/bin/python ($(( $(date +%s) - start )) s)"
