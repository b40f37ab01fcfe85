"""Spherical interpolation coefficients, shared by ``slerp`` and ``nuslerp``.

The vectors can be streamed: only their dot product and norms are needed to compute the two coefficients, after
which the result is c0·v0 + c1·v1 on the original (unnormalized) tensors.
"""

from __future__ import annotations

import math

from ..lazy_torch import torch

DOT_THRESHOLD = 0.9995
NORM_EPS = 1e-8


def slerp_coefficients(t: float, dot: float, norm0: float, norm1: float) -> tuple[float, float]:
    """(c0, c1) such that slerp(t; v0, v1) = c0·v0 + c1·v1.

    Copies whose norm is ≤ 1e-8 are left as is (treated as unit length); nearly parallel vectors (|cos| > 0.9995)
    fall back to linear interpolation of the originals.
    """
    n0 = norm0 if norm0 > NORM_EPS else 1.0
    n1 = norm1 if norm1 > NORM_EPS else 1.0
    cos = dot / (n0 * n1)
    if abs(cos) > DOT_THRESHOLD:
        return 1.0 - t, t
    theta = math.acos(max(-1.0, min(1.0, cos)))
    s = math.sin(theta)
    return math.sin((1.0 - t) * theta) / s, math.sin(t * theta) / s


def slerp_rows(t: float, v0: torch.Tensor, v1: torch.Tensor, dim: int) -> torch.Tensor:
    """SLERP of many vector pairs at once (along ``dim``), same rules as :func:`slerp_coefficients`."""
    a = v0.to(torch.float64) if v0.dtype != torch.float64 else v0
    b = v1.to(torch.float64) if v1.dtype != torch.float64 else v1
    n0 = a.norm(dim=dim, keepdim=True)
    n1 = b.norm(dim=dim, keepdim=True)
    n0 = torch.where(n0 > NORM_EPS, n0, torch.ones_like(n0))
    n1 = torch.where(n1 > NORM_EPS, n1, torch.ones_like(n1))
    cos = (a * b).sum(dim=dim, keepdim=True) / (n0 * n1)
    theta = torch.arccos(cos.clamp(-1.0, 1.0))
    s = torch.sin(theta)
    parallel = cos.abs() > DOT_THRESHOLD
    safe_s = torch.where(parallel, torch.ones_like(s), s)
    c0 = torch.where(parallel, torch.full_like(s, 1.0 - t), torch.sin((1.0 - t) * theta) / safe_s)
    c1 = torch.where(parallel, torch.full_like(s, t), torch.sin(t * theta) / safe_s)
    return (c0.to(v0.dtype) * v0 + c1.to(v0.dtype) * v1)
