"""``torch``, imported on first use.

Why: ``import torch`` costs 1.5–2.5 s of start-up on a small CPU box — as long as a whole bf16 ``linear`` merge of a
1 GB model. The fused numba kernels (bf16 ``linear``, ``task_arithmetic``, ``ties``, ``dare_*``, ``breadcrumbs*``) and
raw tensor copies never need torch, so the CLI only pays for it when a tensor takes the torch path (another dtype, a
LoRA delta, SLERP, CUDA, …). Modules write ``from .lazy_torch import torch`` and use ``torch.x`` as usual; the first
attribute access imports the real module.
"""

from __future__ import annotations

import glob
import importlib
import os
import sys
import threading
from typing import Any


_real: Any = None
_lock = threading.Lock()


def _load() -> Any:
    """The real module, imported once. Under a lock: the engine's threads (prefetch, writer, main) may all reach
    for torch at the same moment, and a second thread must not see the half-initialised module in sys.modules."""
    global _real
    with _lock:
        if _real is None:
            had = "torch" in sys.modules
            mod = importlib.import_module("torch")
            if not had:
                n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
                if mod.get_num_threads() != n:
                    mod.set_num_threads(n)  # what merge_ops.device.use_all_cores would have done
            _real = mod
    return _real


class _LazyTorch:
    __slots__ = ()

    def __getattr__(self, name: str) -> Any:
        return getattr(_real if _real is not None else _load(), name)

    def __repr__(self) -> str:
        return "<lazy module 'torch'>"


torch: Any = _LazyTorch()


def torch_loaded() -> bool:
    return "torch" in sys.modules


def is_tensor(x: Any) -> bool:
    """``isinstance(x, torch.Tensor)`` without importing torch (nothing can be a tensor before torch is loaded)."""
    mod = sys.modules.get("torch")
    tensor = getattr(mod, "Tensor", None) if mod is not None else None
    return tensor is not None and isinstance(x, tensor)


def gpu_driver_present() -> bool:
    """Whether this machine could have a CUDA/ROCm device at all (driver nodes), checked without importing torch:
    without them ``torch.cuda.is_available()`` is False, so ``--device auto`` means the CPU."""
    return (os.path.exists("/proc/driver/nvidia/version") or bool(glob.glob("/dev/nvidia[0-9]*"))
            or os.path.exists("/dev/kfd") or os.environ.get("MERGELINE_ASSUME_GPU") == "1")


class CpuDevice(str):
    """The CPU as a device, before (or without) torch: a ``str`` ("cpu") that torch accepts wherever a device goes,
    with ``torch.device``'s ``type``/``index`` attributes for mergeline's own checks."""

    type = "cpu"
    index = None

    def __new__(cls) -> "CpuDevice":
        return super().__new__(cls, "cpu")
