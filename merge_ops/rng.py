"""Counter-based random numbers: uniform(key, i) depends only on a 64-bit key and the element's flat index.

Why not a ``torch.Generator``: its stream depends on how a tensor is split into chunks and on the device. A hash of
(key, index) (SplitMix64's finalizer) gives the same mask for an element whatever the chunking, the device, the
thread count or the code path (torch here, the numba kernels in :mod:`merge_ops.kernels`, which implement the same
function and are tested against it). Keys come from (seed, tensor name, model index).
"""

from __future__ import annotations

import hashlib

from .lazy_torch import torch

GOLDEN = 0x9E3779B97F4A7C15
M1 = 0xBF58476D1CE4E5B9
M2 = 0x94D049BB133111EB
MASK64 = (1 << 64) - 1


def _signed(v: int) -> int:
    v &= MASK64
    return v - (1 << 64) if v >= 1 << 63 else v


def stream_key(seed: int, tensor: str, model_index: int) -> int:
    """A 64-bit key (as an unsigned int) for one (seed, tensor, model)."""
    h = hashlib.sha256(f"{seed}\0{tensor}\0{model_index}".encode()).digest()
    return int.from_bytes(h[:8], "little")


def _srl(x: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 bit patterns (torch's >> is arithmetic)."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def uniform(key: int, start: int, count: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """float32 uniforms in [0, 1) for flat indices start … start+count-1 (24 random bits each)."""
    idx = torch.arange(start, start + count, dtype=torch.int64, device=device)
    z = idx * _signed(GOLDEN) + _signed(key)  # wraps mod 2^64, as uint64 arithmetic does
    z = (z ^ _srl(z, 30)) * _signed(M1)
    z = (z ^ _srl(z, 27)) * _signed(M2)
    z = z ^ _srl(z, 31)
    return _srl(z, 40).to(torch.float32) * (1.0 / (1 << 24))
