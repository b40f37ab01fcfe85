#!/usr/bin/env bash
# The engine's CUDA checks, as one short run on a GPU machine (the `device` tool of a session that is lent one):
#
#     run(command="bash scripts/gpu_check.sh", carry=[".whl"], timeout_s=540)
#
# The GPU image has torch, numba, numpy, safetensors, transformers, peft, pyyaml, threadpoolctl and pytest, but not
# pydantic: carry its wheels for Python 3.12 in .whl/ (git-ignored), made here with
#     python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#         --platform manylinux2014_x86_64 -d .whl pydantic pydantic-core annotated-types typing-inspection
# Runs tests/test_cuda.py (every MergeKit parity case on cuda vs MergeKit's stored output and vs cpu, streamed = whole
# on cuda, LoRA on cuda vs PEFT, auto → cuda), then (GPU_BENCH=1, the default) generates the 0.5 B bench models and
# runs bench/block_sizes.py (GPU block sizes A/B, same bytes) and bench/run_bench.py on cuda and on cpu; PROFILE=1
# adds bench/profile_merge.py. BENCH_METHODS / BENCH_CPU_METHODS / BLOCK_METHODS / BENCH_REPEATS / BENCH_S tune it
# (an empty BENCH_METHODS= or BENCH_CPU_METHODS= skips that half). About 4 minutes on an H200 machine.
# Logs land in $OUT (the device tool's output folder) or /tmp/gpu-check.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/gpu-check}"
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || exit 1
    export PYTHONPATH="/tmp/site:$PWD"
else
    export PYTHONPATH="$PWD"
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$OUT/gpu.txt"
python3 -c "import torch, numba, numpy; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'numba', numba.__version__, 'numpy', numpy.__version__)" 2>&1 | tee -a "$OUT/gpu.txt"
python3 -m pytest tests/test_cuda.py -q -s -p no:cacheprovider -o addopts="-ra" 2>&1 | tee "$OUT/test_cuda.log"
rc=${PIPESTATUS[0]}

# Then the 0.5 B benchmark of bench/run_bench.py on this machine: cuda vs cpu, same inputs, same run (GPU_BENCH=0
# skips it; BENCH_S caps it). The CLI runs from the checkout (no install needed).
if [ "${GPU_BENCH:-1}" = 1 ]; then
    printf '#!/bin/sh\nexec python3 -m pipelines.cli "$@"\n' > /tmp/mergeline-cli && chmod +x /tmp/mergeline-cli
    python3 bench/make_models.py --scale 1 --workdir /tmp/gpu-bench/models 2>&1 | tail -1
    # the GPU's row-block/cache defaults against the CPU's sizes, in one process, outputs compared byte for byte
    timeout "${BENCH_S:-240}" python3 bench/block_sizes.py /tmp/gpu-bench/models/scale1 --device cuda \
        --methods "${BLOCK_METHODS:-linear,ties,lora}" 2>&1 | tee "$OUT/block_sizes.log"
    [ "${PIPESTATUS[0]}" = 0 ] || rc=1
    bench() { timeout "${BENCH_S:-240}" python3 bench/run_bench.py --python python3 --mergeline /tmp/mergeline-cli \
                  --workdir /tmp/gpu-bench --repeats "${BENCH_REPEATS:-3}" "$@"; }
    { [ -z "${BENCH_METHODS-x}" ] || bench --device cuda --methods "${BENCH_METHODS:-linear,ties,slerp,lora}"
      [ -z "${BENCH_CPU_METHODS-x}" ] || bench --device cpu --methods "${BENCH_CPU_METHODS:-linear,ties,lora}"
    } 2>&1 | tee "$OUT/bench.log"
    cp /tmp/gpu-bench/results-*.json "$OUT/" 2>/dev/null
    if [ "${PROFILE:-0}" = 1 ]; then  # where the CUDA path's time goes (host vs device), one linear merge
        timeout 120 python3 bench/profile_merge.py /tmp/gpu-bench/configs/scale1/linear.yaml --device cuda \
            > "$OUT/profile_linear_cuda.txt" 2>&1
        head -1 "$OUT/profile_linear_cuda.txt"
    fi
fi
exit "$rc"
