"""Row-block size / whole-tensor cache on a device, A/B in one process: the device's defaults against explicit sizes
(the CPU's 2 Mi elements / 16 MiB unless given), same inputs, interleaved repeats, medians; and the two outputs must
be the same bytes (the engine promises streamed = whole). Times are the merge call (the process's torch import and
CUDA start-up are the same for both and left out).

    python3 bench/block_sizes.py bench/.work/models/scale1 --device cuda --methods linear,ties,lora
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", type=Path, help="a make_models.py folder (base, ft1..3, lora_r16)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--methods", default="linear,ties,lora")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--chunk-elements", type=int, default=2 * 1024 * 1024)
    ap.add_argument("--cache-bytes", type=int, default=16 * 1024 * 1024)
    a = ap.parse_args()
    from merge_ops.api import MergeOptions, merge, merge_lora
    from run_bench import method_config

    tmp = Path(tempfile.mkdtemp(prefix="mergeline-blocks-"))
    settings = {"default": {}, "explicit": {"chunk_elements": a.chunk_elements, "cache_bytes": a.cache_bytes}}
    print(f"device {a.device}; explicit = chunk_elements {a.chunk_elements}, cache_bytes {a.cache_bytes}")
    print("| method | device defaults s | explicit s | ratio | same bytes |\n|---|---:|---:|---:|---|")
    failed = False
    # one untimed merge first: the process's CUDA context, cuBLAS and kernel caches start here, not in a timed run
    warm = tmp / "warm-up"
    merge(method_config("linear", a.models, "bfloat16"), warm, MergeOptions(device=a.device, copy_tokenizer=False))
    shutil.rmtree(warm, ignore_errors=True)
    for method in a.methods.split(","):
        times: dict[str, list[float]] = {k: [] for k in settings}
        shas: dict[str, dict] = {}
        for _ in range(a.repeats):
            for name, kw in settings.items():
                out = tmp / f"{method}-{name}"
                shutil.rmtree(out, ignore_errors=True)
                opts = MergeOptions(device=a.device, copy_tokenizer=False, **kw)
                t0 = time.perf_counter()
                if method == "lora":
                    res = merge_lora(a.models / "base", a.models / "lora_r16", out, opts)
                else:
                    res = merge(method_config(method, a.models, "bfloat16"), out, opts)
                times[name].append(time.perf_counter() - t0)
                shas[name] = res.manifest["output_shards"]
                shutil.rmtree(out, ignore_errors=True)
        same = shas["default"] == shas["explicit"]
        failed |= not same
        d, e = statistics.median(times["default"]), statistics.median(times["explicit"])
        print(f"| {method} | {d:.2f} | {e:.2f} | {e / d:.2f}x | {'yes' if same else 'NO'} |", flush=True)
    shutil.rmtree(tmp, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
