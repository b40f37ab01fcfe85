"""Where one merge's time goes, inside one process: torch import and device start-up timed apart, then the merge
under cProfile (top functions by cumulative and by own time). For the CUDA path, where host work hides easily.

    python3 bench/profile_merge.py CONFIG.yml [--device cuda] [--top 25]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--top", type=int, default=25)
    a = ap.parse_args()
    t0 = time.perf_counter()
    import torch
    t1 = time.perf_counter()
    if a.device.startswith("cuda"):
        torch.zeros(1, device=a.device)
        torch.cuda.synchronize()
    t2 = time.perf_counter()
    from merge_ops.api import MergeOptions, merge
    out = Path(tempfile.mkdtemp()) / "out"
    prof = cProfile.Profile()
    t3 = time.perf_counter()
    prof.enable()
    res = merge(a.config, out, MergeOptions(device=a.device, hash_inputs=False, copy_tokenizer=False))
    prof.disable()
    t4 = time.perf_counter()
    ru = resource.getrusage(resource.RUSAGE_SELF)
    print(f"import torch {t1 - t0:.2f} s | device start {t2 - t1:.2f} s | merge {t4 - t3:.2f} s on {res.device} | "
          f"process CPU user {ru.ru_utime:.1f} s sys {ru.ru_stime:.1f} s | peak RSS {ru.ru_maxrss / 1024:.0f} MB")
    for key in ("cumulative", "tottime"):
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats(key).print_stats(a.top)
        print(f"--- by {key}\n" + "\n".join(s.getvalue().splitlines()[6:]))
    shutil.rmtree(out.parent, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
