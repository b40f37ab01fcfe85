"""Where the time of a LoRA merge (or any merge config) goes, inside one process: imports, planning, the run, and the
run again without output hashing / without writing (the writer's methods replaced), to price sha256 and I/O.

    .venv/bin/python bench/phase_breakdown.py lora  [--models bench/.work/models/scale1]
    .venv/bin/python bench/phase_breakdown.py bench/.work/configs/scale1/linear.yaml

Each mode runs in its own process (``--mode`` is the child); medians of ``--repeats``. Prints whether torch was
imported (the bf16 linear and plain-LoRA CPU paths do not need it).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def child(what: str, models: str, mode: str) -> dict:
    t0 = time.perf_counter()
    from merge_ops import safetensors_io as sio
    from merge_ops.api import plan_merge
    from merge_ops.executor import Executor, layout_shards
    from merge_ops.sources import ModelSource

    t1 = time.perf_counter()
    if what == "lora":
        src = ModelSource.from_parts(f"{models}/base", f"{models}/lora_r16")
        plan = plan_merge({"merge_method": "passthrough", "models": [{"model": src.label}]}, sources={src.label: src})
    else:
        plan = plan_merge(what)
    t2 = time.perf_counter()
    if mode == "nowrite":
        sio.ShardStreamWriter.write = lambda self, name, data: None
        sio.ShardStreamWriter.close = lambda self: None
    elif mode == "nohash":
        class _NoHash:
            def update(self, b):
                pass

            def hexdigest(self):
                return "0"

        orig = sio.ShardStreamWriter.__init__

        def init(self, *a, **k):
            orig(self, *a, **k)
            self.sha256 = _NoHash()

        sio.ShardStreamWriter.__init__ = init
    out = Path(tempfile.mkdtemp(prefix="mergeline-phase-"))
    try:
        Executor(plan).run(out, layout_shards(plan.tensors, 5 * 10**9))
    finally:
        shutil.rmtree(out, ignore_errors=True)
    t3 = time.perf_counter()
    return {"import": t1 - t0, "plan": t2 - t1, "run": t3 - t2, "torch_imported": "torch" in sys.modules}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", help="'lora' or a merge config YAML")
    ap.add_argument("--models", default=str(REPO / "bench/.work/models/scale1"))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--mode", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.mode:
        print(json.dumps(child(a.what, a.models, a.mode)))
        return
    rows = {}
    for mode in ("full", "nohash", "nowrite"):
        runs = []
        for _ in range(a.repeats):
            t = time.perf_counter()
            out = subprocess.run([sys.executable, __file__, a.what, "--models", a.models, "--mode", mode],
                                 cwd=REPO, capture_output=True, text=True, check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            r["process"] = time.perf_counter() - t
            runs.append(r)
        rows[mode] = {k: statistics.median(r[k] for r in runs) for k in ("import", "plan", "run", "process")}
        rows[mode]["torch_imported"] = any(r["torch_imported"] for r in runs)
    print(f"| mode ({a.what}) | imports s | plan s | run s | whole process s | torch imported |")
    print("|---|---:|---:|---:|---:|---|")
    for mode, r in rows.items():
        print(f"| {mode} | {r['import']:.2f} | {r['plan']:.2f} | {r['run']:.2f} | {r['process']:.2f} | "
              f"{r['torch_imported']} |")


if __name__ == "__main__":
    main()
