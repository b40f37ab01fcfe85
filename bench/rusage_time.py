"""``rusage_time.py -o FILE CMD...``: a stand-in for GNU ``/usr/bin/time -v -o FILE`` where that is not installed
(e.g. a bare GPU image). It runs CMD, waits for it with ``os.wait4`` and writes the same lines GNU time writes for
the figures the benchmark reads. GNU time takes its "Maximum resident set size" from the very same ``wait4`` rusage
(``ru_maxrss``, kilobytes on Linux, mapped pages that were touched included), so the two report the same number.
Only the standard library: it must run with any python."""

from __future__ import annotations

import os
import subprocess
import sys
import time


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[0] != "-o":
        print("usage: rusage_time.py -o FILE CMD [ARGS...]", file=sys.stderr)
        return 2
    out, cmd = argv[1], argv[2:]
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd)
    _, status, ru = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    with open(out, "w") as f:
        f.write(f"\tCommand being timed: \"{' '.join(cmd)}\"\n"
                f"\tUser time (seconds): {ru.ru_utime:.2f}\n"
                f"\tSystem time (seconds): {ru.ru_stime:.2f}\n"
                f"\tElapsed (wall clock) time (h:mm:ss or m:ss): {int(wall // 60)}:{wall % 60:05.2f}\n"
                f"\tMaximum resident set size (kbytes): {ru.ru_maxrss}\n"
                f"\tExit status: {p.returncode}\n")
    return p.returncode if p.returncode >= 0 else 128 - p.returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
