"""An independent float64 reference ("oracle") for the merge methods of /work/shared/merge-methods.md.

Written from the spec's formulas only, never from ``merge_ops``: every function takes whole tensors, converts them
to float64 and does the plainest thing the formula says (sort-based top-k, explicit loops over model pairs, ...).
Nothing here streams, chunks or optimises; it exists to be obviously right.

Conventions shared with the engine (documented engine choices the spec leaves open):

* ``δ_i = θ_i − θ_b`` is formed in float32 (the engine's default compute dtype; the spec allows "float32 or
  better") and then widened to float64, so magnitude rankings see exactly the values the engine ranks. Pass
  ``delta_dtype=torch.float64`` for a merge run with ``compute_dtype="float64"``.
* Top-k tie rule: exactly ``k`` entries are kept; every ``|δ|`` strictly above the k-th largest value is kept and,
  among entries equal to it, those with the lowest flat (row-major) index come first.
* Parameter lists are gradients sampled at ``t·(K−1)`` with linear interpolation, where ``t = i/(L−1)`` for layer
  ``i`` of an ``L``-layer output slice (``t = 1`` when ``L = 1``); non-layer tensors use ``t = 0``. Lists of
  ``{filter, value}`` pick the first entry whose filter is a substring of the tensor name (no filter matches all).
"""

from __future__ import annotations

import math
import re
from typing import Any, Sequence

import numpy as np
import torch

F64 = torch.float64
LAYER_RE = re.compile(r"\.layers\.(\d+)\.")


# -- parameters ------------------------------------------------------------------------------------------------------
def layer_index(name: str) -> int | None:
    m = LAYER_RE.search(name)
    return int(m.group(1)) if m else None


def gradient_t(name: str, num_layers: int, layer_offset: int = 0) -> float:
    """Position of ``name`` in its output slice: layer_index/(L−1) (1 when L = 1); 0 outside the layer stack."""
    idx = layer_index(name)
    if idx is None:
        return 0.0
    idx -= layer_offset
    assert 0 <= idx < num_layers, (name, num_layers, layer_offset)
    return 1.0 if num_layers == 1 else idx / (num_layers - 1)


def sample_gradient(values: Sequence[float], t: float) -> float:
    """Sample a list of numbers at t·(K−1) with linear interpolation."""
    values = [float(v) for v in values]
    if len(values) == 1:
        return values[0]
    pos = t * (len(values) - 1)
    i = min(int(math.floor(pos)), len(values) - 2)
    frac = pos - i
    return values[i] + frac * (values[i + 1] - values[i])


def resolve(value: Any, name: str, t: float) -> Any:
    """A config parameter value (scalar, gradient list or ``{filter, value}`` list) for tensor ``name``."""
    if isinstance(value, (list, tuple)):
        if value and isinstance(value[0], dict):
            for entry in value:
                f = entry.get("filter")
                if f is None or f in name:
                    return resolve(entry["value"], name, t)
            raise KeyError(f"no filter entry matches {name}")
        return sample_gradient(value, t)
    return value


# -- helpers ---------------------------------------------------------------------------------------------------------
def f64(x: torch.Tensor) -> torch.Tensor:
    return x.detach().to(F64)


def delta(theta: torch.Tensor, base: torch.Tensor, delta_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """δ = θ − θ_b formed in ``delta_dtype`` (float32 like the engine's default), returned as float64."""
    return (theta.to(delta_dtype) - base.to(delta_dtype)).to(F64)


def topk_mask(values: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the k largest entries of ``values`` (compared as given), ties by lowest flat index.

    Uses numpy's lexsort on (−value, index) so the order is fully specified, with no reliance on torch's sort
    stability.
    """
    flat = values.detach().to(F64).reshape(-1).numpy()
    n = flat.size
    k = max(0, min(int(k), n))
    order = np.lexsort((np.arange(n), -flat))  # primary key: -value (ascending), secondary: index (ascending)
    mask = np.zeros(n, dtype=bool)
    mask[order[:k]] = True
    return torch.from_numpy(mask).reshape(values.shape)


def magnitude_keep(d: torch.Tensor, density: float) -> torch.Tensor:
    """TIES sparsification: keep k = int(ρ·numel) largest |δ| (ρ ≥ 1 keeps all)."""
    n = d.numel()
    k = n if density >= 1 else int(density * n)
    return d * topk_mask(d.abs(), k).to(F64)


def breadcrumbs_keep(d: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Drop the top int(γ·n) magnitudes and keep the next int(ρ·n) (top cut shrunk when they overlap)."""
    n = d.numel()
    k2 = n if density >= 1 else int(density * n)
    k1 = int(gamma * n)
    if k1 + k2 > n:
        k1 = n - k2
    a = d.abs()
    keep = topk_mask(a, k1 + k2) & ~topk_mask(a, k1)
    return d * keep.to(F64)


def elect(weighted: list[torch.Tensor]) -> list[torch.Tensor]:
    """TIES sign election over already weighted, sparsified deltas: masks m_i as float64 0/1 tensors."""
    total = torch.stack(weighted).sum(0)
    s = torch.where(total >= 0, 1.0, -1.0).to(F64)  # 0 counts as +
    return [(torch.sign(wd) == s).to(F64) for wd in weighted]  # sign(0) = 0 never matches ±1


def combine(base: torch.Tensor, deltas: list[torch.Tensor], weights: list[float], *, lam: float, normalize: bool,
            elected: bool) -> torch.Tensor:
    """θ_b + λ·mixed for already sparsified float64 deltas (shared by the task-arithmetic family)."""
    b = f64(base)
    weighted = [w * d for w, d in zip(weights, deltas)]
    if elected:
        masks = elect(weighted)
        mixed = sum(m * wd for m, wd in zip(masks, weighted))
        if normalize:
            div = sum(m * w for m, w in zip(masks, weights))
            div = torch.where(div == 0, torch.ones_like(div), div)
            mixed = mixed / div
    else:
        mixed = sum(weighted)
        if normalize:
            mixed = mixed / sum(weights)
    return b + lam * mixed


# -- methods ---------------------------------------------------------------------------------------------------------
def linear(thetas: list[torch.Tensor], weights: list[float], *, normalize: bool = True) -> torch.Tensor:
    out = sum(w * f64(x) for w, x in zip(weights, thetas))
    if normalize:
        s = sum(weights)
        assert abs(s) > 1e-12, "weights sum to zero"
        out = out / s
    return out


def task_arithmetic(base, thetas, weights, *, lam: float = 1.0, normalize: bool = False,
                    delta_dtype=torch.float32) -> torch.Tensor:
    ds = [delta(x, base, delta_dtype) for x in thetas]
    return combine(base, ds, weights, lam=lam, normalize=normalize, elected=False)


def ties(base, thetas, weights, densities, *, lam: float = 1.0, normalize: bool = True,
         delta_dtype=torch.float32) -> torch.Tensor:
    ds = [magnitude_keep(delta(x, base, delta_dtype), rho) for x, rho in zip(thetas, densities)]
    return combine(base, ds, weights, lam=lam, normalize=normalize, elected=True)


def breadcrumbs(base, thetas, weights, densities, *, gamma: float = 0.01, lam: float = 1.0, normalize: bool = False,
                elected: bool = False, delta_dtype=torch.float32) -> torch.Tensor:
    ds = [breadcrumbs_keep(delta(x, base, delta_dtype), rho, gamma) for x, rho in zip(thetas, densities)]
    return combine(base, ds, weights, lam=lam, normalize=normalize, elected=elected)


def slerp(t: float, v0: torch.Tensor, v1: torch.Tensor, *, dot_threshold: float = 0.9995,
          eps: float = 1e-8) -> torch.Tensor:
    """SLERP of two whole tensors treated as one vector each (spec formula; lerp when nearly (anti)parallel)."""
    a, b = f64(v0), f64(v1)
    na, nb = a.norm(), b.norm()
    ua = a / na if na > eps else a
    ub = b / nb if nb > eps else b
    dot = float((ua * ub).sum())
    if abs(dot) > dot_threshold:
        return (1 - t) * a + t * b
    theta = math.acos(max(-1.0, min(1.0, dot)))
    s = math.sin(theta)
    return math.sin((1 - t) * theta) / s * a + math.sin(t * theta) / s * b


def nuslerp(thetas: list[torch.Tensor], weights: list[float], base: torch.Tensor | None = None, *,
            flatten: bool = True, row_wise: bool = False, delta_dtype=torch.float32) -> torch.Tensor:
    """NuSLERP of two models: t = w2/(w1+w2) (0.5 if ~0); with a base, SLERP the task vectors and add the base.

    Vector layout when ``flatten`` is false follows MergeKit (the spec says the same config must give MergeKit's
    model): vectors run along the last dimension (each row of a [out, in] matrix) unless ``row_wise``, in which case
    MergeKit transposes dims 0 and −1 first, so the vectors run along dimension 0.
    """
    assert len(thetas) == 2 and len(weights) == 2
    s = weights[0] + weights[1]
    t = 0.5 if abs(s) < 1e-8 else weights[1] / s
    if base is not None:
        v0, v1 = delta(thetas[0], base, delta_dtype), delta(thetas[1], base, delta_dtype)
    else:
        v0, v1 = f64(thetas[0]), f64(thetas[1])
    if flatten or v0.dim() < 2:
        out = slerp(t, v0.reshape(-1), v1.reshape(-1)).reshape(v0.shape)
    else:
        a, b = (v0.transpose(0, -1), v1.transpose(0, -1)) if row_wise else (v0, v1)
        rows = [slerp(t, a[i], b[i]) for i in range(a.shape[0])] if a.dim() == 2 else None
        assert rows is not None, "only 1-D/2-D tensors in the tiny models"
        out = torch.stack(rows)
        out = out.transpose(0, -1) if row_wise else out
    return out + f64(base) if base is not None else out


def model_stock(base: torch.Tensor, thetas: list[torch.Tensor], *, filter_wise: bool = False,
                delta_dtype=torch.float32) -> torch.Tensor:
    """t = N·c/(1+(N−1)·c) from the mean pairwise cosine c of the offsets; t·mean(θ_i) + (1−t)·θ_b.

    ``filter_wise`` computes c per row (a 1-D tensor is a single row, as in MergeKit).
    """
    n = len(thetas)
    assert n >= 2
    b = f64(base)
    ds = [delta(x, base, delta_dtype) for x in thetas]
    if filter_wise and b.dim() >= 2:
        ds2 = [d.reshape(d.shape[0], -1) for d in ds]
    else:
        ds2 = [d.reshape(1, -1) for d in ds]
    cos = []
    for i in range(n):
        for j in range(i + 1, n):
            num = (ds2[i] * ds2[j]).sum(-1)
            den = ds2[i].norm(dim=-1) * ds2[j].norm(dim=-1)
            cos.append(num / den)
    c = torch.stack(cos).mean(0)  # [rows]
    t = n * c / (1 + (n - 1) * c)
    shape = (-1,) + (1,) * (b.dim() - 1) if (filter_wise and b.dim() >= 2) else ()
    t = t.reshape(shape) if shape else t.reshape(())
    mean = sum(f64(x) for x in thetas) / n
    return t * mean + (1 - t) * b


def passthrough(theta: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    return f64(theta) * scale


# -- DELLA keep probabilities (used for statistical checks only: the engine's random masks cannot be reproduced) ---
def della_keep_probability(d: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """Per row, p rises linearly from ρ−ε (smallest |δ|) to ρ+ε (largest), ranks ties by lowest index."""
    a = f64(d).abs()
    rows = a.reshape(1, -1) if a.dim() < 2 else a.reshape(a.shape[0], -1)
    m = rows.shape[1]
    probs = torch.empty_like(rows)
    for r in range(rows.shape[0]):
        order = np.lexsort((np.arange(m), rows[r].numpy()))  # ascending magnitude
        rank = np.empty(m)
        rank[order] = np.arange(m)
        frac = rank / (m - 1) if m > 1 else np.full(m, 0.5)
        probs[r] = torch.from_numpy(density - epsilon + 2 * epsilon * frac)
    return probs.reshape(d.shape)


# -- dtype-aware comparison ------------------------------------------------------------------------------------------
def assert_matches(actual: torch.Tensor, expected64: torch.Tensor, name: str = "", *, rtol: float = 1e-5,
                   atol_rel: float = 1e-5, ulps: float = 1.0) -> None:
    """Compare an engine output with a float64 oracle value.

    float32/float64 output: |a − e| ≤ rtol·|e| + atol_rel·max|e| (1e-5 of the tensor's magnitude).
    bfloat16/float16 output: the oracle is rounded to that dtype first and |a − round(e)| may be at most ``ulps``
    units in the last place of round(e) (the engine rounds a float32 result, the oracle a float64 one, so the two
    roundings can land one ulp apart), plus 1e-6·max|e| for cancellation near zero.
    """
    assert actual.shape == expected64.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected64.shape)}"
    assert torch.isfinite(actual.float()).all(), f"{name}: non-finite output"
    scale = float(expected64.abs().max()) if expected64.numel() else 0.0
    if actual.dtype in (torch.float32, torch.float64):
        a = actual.to(F64)
        tol = rtol * expected64.abs() + atol_rel * scale + 1e-30
    else:
        ref = expected64.to(actual.dtype)
        mag = ref.abs()
        ulp = (torch.nextafter(mag, torch.full_like(mag, float("inf"))) - mag).to(F64)
        a = actual.to(F64)
        expected64 = ref.to(F64)
        tol = ulps * ulp + 1e-6 * scale + 1e-30
    err = (a - expected64).abs()
    bad = err > tol
    if bad.any():
        i = int(torch.argmax((err - tol).reshape(-1)))
        raise AssertionError(
            f"{name}: {int(bad.sum())}/{err.numel()} elements off; worst flat index {i}: got "
            f"{float(a.reshape(-1)[i])!r}, expected {float(expected64.reshape(-1)[i])!r} "
            f"(err {float(err.reshape(-1)[i]):.3g}, tol {float(tol.reshape(-1)[i]):.3g}, dtype {actual.dtype})")
