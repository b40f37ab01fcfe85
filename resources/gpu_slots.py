"""One GPU per step on a multi-GPU host: with ``device: auto`` and N ≥ 2 CUDA GPUs, a step process claims the first
free GPU (an exclusive ``flock`` on a per-GPU lock file) and keeps it until the process exits.

Why: the Dagster ``gpu`` pool limits how many GPU steps run at once (the shipped instance config: the number of GPUs),
but ``auto`` alone would put every step on ``cuda:0``. Under the multiprocess executor each step is its own process,
so a process-lifetime claim is a step-lifetime claim; the kernel drops the lock when the process dies (no stale locks
after a crash). With one GPU or none nothing is claimed and ``auto`` keeps its meaning.
"""

from __future__ import annotations

import fcntl
import os
import tempfile
import time
from pathlib import Path

_CLAIMED: tuple[int, int] | None = None  # (gpu index, lock fd) held by this process


def lock_dir() -> Path:
    """Host-wide (GPUs are host-wide): ``$MERGELINE_GPU_LOCKS`` or ``<tmp>/mergeline-gpu-locks-<uid>``."""
    d = os.environ.get("MERGELINE_GPU_LOCKS") or os.path.join(tempfile.gettempdir(), f"mergeline-gpu-locks-{os.getuid()}")
    p = Path(d)
    p.mkdir(parents=True, exist_ok=True)
    return p


def cuda_device_count() -> int:
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # pragma: no cover - torch is a core dependency
        return 0


def try_claim(n: int, directory: Path) -> tuple[int, int] | None:
    """(index, fd) of the first of ``n`` GPUs whose lock is free, or None. The caller owns the fd."""
    for i in range(n):
        fd = os.open(directory / f"cuda{i}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        return i, fd
    return None


def claim(n: int, directory: Path, *, timeout_s: float = 6 * 3600, poll_s: float = 2.0) -> tuple[int, int]:
    """Wait for a free GPU (only happens if more GPU steps run than GPUs, i.e. the pool limit is set too high or
    another instance uses the same GPUs)."""
    deadline = time.monotonic() + timeout_s
    while True:
        got = try_claim(n, directory)
        if got is not None:
            return got
        if time.monotonic() > deadline:
            raise TimeoutError(f"no free GPU among {n} after {timeout_s:.0f} s (locks in {directory}); lower the "
                               f"'gpu' pool limit to the number of GPUs")
        time.sleep(poll_s)


def step_device(device: str) -> str:
    """The device a step should use: ``device`` itself, except ``auto`` on a host with ≥ 2 GPUs, which becomes the
    ``cuda:N`` this process claimed."""
    global _CLAIMED
    if device != "auto":
        return device
    if _CLAIMED is not None:
        return f"cuda:{_CLAIMED[0]}"
    n = cuda_device_count()
    if n < 2:
        return device
    _CLAIMED = claim(n, lock_dir())
    return f"cuda:{_CLAIMED[0]}"


def gpu_count_for_pool() -> int:
    """How many GPU steps may run at once on this host: the number of NVIDIA GPUs ``nvidia-smi -L`` lists (no torch
    import), at least 1."""
    import shutil
    import subprocess

    exe = shutil.which("nvidia-smi")
    if not exe:
        return 1
    try:
        out = subprocess.run([exe, "-L"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return 1
    return max(1, sum(1 for line in out.splitlines() if line.startswith("GPU ")))
