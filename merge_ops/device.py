"""Choosing the compute device: ``auto`` takes the first CUDA GPU when there is one, else the CPU (all cores)."""

from __future__ import annotations

import os

import torch

from .errors import ConfigError


def resolve_device(spec: str | None) -> torch.device:
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        return torch.device("cuda:0") if torch.cuda.is_available() else torch.device("cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "cuda" or spec.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ConfigError(f"device '{spec}': CUDA is not available on this machine (torch {torch.__version__}); "
                              f"use --device cpu or auto")
        dev = torch.device(spec if ":" in spec else "cuda:0")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"device '{spec}': only {torch.cuda.device_count()} CUDA device(s) present")
        return dev
    raise ConfigError(f"device '{spec}': expected auto, cpu, cuda or cuda:N")


def use_all_cores() -> int:
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n


def describe(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"cpu ({torch.get_num_threads()} threads)"
