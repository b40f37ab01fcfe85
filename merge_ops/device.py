"""Choosing the compute device: ``auto`` takes the first CUDA GPU when there is one, else the CPU (all cores).

Without GPU driver nodes on the machine, ``auto`` and ``cpu`` resolve to :class:`~merge_ops.lazy_torch.CpuDevice`
without importing torch (see ``lazy_torch`` for why); torch accepts it wherever a device goes."""

from __future__ import annotations

import os
import re
from typing import Any

from .errors import ConfigError
from .lazy_torch import CpuDevice, gpu_driver_present, torch, torch_loaded


def resolve_device(spec: str | None) -> Any:
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        if not gpu_driver_present():
            return CpuDevice()
        return torch.device("cuda:0") if torch.cuda.is_available() else CpuDevice()
    if spec == "cpu":
        return CpuDevice()
    if spec == "cuda" or spec.startswith("cuda:"):
        if spec != "cuda" and not re.fullmatch(r"cuda:\d+", spec):
            raise ConfigError(f"device '{spec}': expected auto, cpu, cuda or cuda:N (N = the GPU index, e.g. cuda:0)")
        if not torch.cuda.is_available():
            raise ConfigError(f"device '{spec}': CUDA is not available on this machine (torch {torch.__version__}); "
                              f"use --device cpu or auto")
        dev = torch.device(spec if ":" in spec else "cuda:0")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"device '{spec}': only {torch.cuda.device_count()} CUDA device(s) present")
        return dev
    raise ConfigError(f"device '{spec}': expected auto, cpu, cuda or cuda:N (N = the GPU index, e.g. cuda:0)")


def cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def use_all_cores() -> int:
    """torch's intra-op pool on every core (when torch is in use; numba's pool already defaults to all cores)."""
    n = cpu_count()
    if torch_loaded() and torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n


def describe(device: Any) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"cpu ({torch.get_num_threads() if torch_loaded() else cpu_count()} threads)"
