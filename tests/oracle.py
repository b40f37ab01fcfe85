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


# -- MergeKit 0.1.5 methods added later (multislerp, karcher, sce, nearswap, arcee_fusion) ---------------------------
# Whole tensors, float64, the formulas as MergeKit 0.1.5 states them (thresholds included); no Gram-matrix tricks.
def _unit_vectors(vs: list[torch.Tensor], eps: float) -> tuple[list[torch.Tensor], list[float]]:
    norms = [float(v.norm()) for v in vs]
    return [v / (n + eps) for v, n in zip(vs, norms)], norms


def multislerp(thetas: list[torch.Tensor], weights: list[float], base: torch.Tensor | None = None, *,
               normalize_weights: bool = True, eps: float = 1e-8, delta_dtype=torch.float32) -> torch.Tensor:
    """Barycentre on the sphere: unit vectors u_i = v_i/(‖v_i‖+eps), m = normalized Σ w_i u_i, tangents
    u_i − ⟨u_i,m⟩m, T = Σ w_i (…); exp map with ‖T‖+eps; times Σ w_i ‖v_i‖; plus the base. One model: as is."""
    if len(thetas) == 1:
        return f64(thetas[0])
    vs = [delta(x, base, delta_dtype) if base is not None else f64(x) for x in thetas]
    shape = vs[0].shape
    vs = [v.reshape(-1) for v in vs]
    w = torch.tensor(weights, dtype=F64)
    if normalize_weights:
        w = w / w.sum()
    units, norms = _unit_vectors(vs, eps)
    mean = sum(wi * u for wi, u in zip(w, units))
    if float(mean.norm()) < eps:
        assert len(vs) == 2, "antipodal inputs with cancelling weights"
        out = w[0] * vs[0] + w[1] * vs[1]
    else:
        mean = mean / mean.norm()
        tangent = sum(wi * (u - torch.dot(u, mean) * mean) for wi, u in zip(w, units))
        tn = float(tangent.norm()) + eps
        out = (mean * math.cos(tn) + tangent * (math.sin(tn) / tn)) * float(sum(wi * n for wi, n in zip(w, norms)))
    out = out.reshape(shape)
    return out + f64(base) if base is not None else out


def karcher(tensors: list[torch.Tensor], *, max_iter: int = 10, tol: float = 1e-5) -> torch.Tensor:
    """Karcher mean of the unit vectors with equal weights α_i = 1/N, scaled by Σ α_i ‖v_i‖ (inputs with norm ≤ tol
    are left out of the mean, not the scale). Fixed-point iteration on the sphere, as MergeKit runs it."""
    if len(tensors) == 1:
        return f64(tensors[0])
    vs = [f64(x).reshape(-1) for x in tensors]
    shape = tensors[0].shape
    n = len(vs)
    norms = [float(v.norm()) for v in vs]
    valid = [i for i in range(n) if norms[i] > tol]
    if not valid:
        return torch.zeros(shape, dtype=F64)
    alpha = {i: 1.0 / len(valid) for i in valid}
    units = {i: vs[i] / norms[i] for i in valid}
    mean = sum(alpha[i] * units[i] for i in valid)
    mean = units[valid[0]].clone() if float(mean.norm()) < tol else mean / mean.norm()
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for i in valid:
            dot = max(-1.0, min(1.0, float(torch.dot(mean, units[i]))))
            theta = math.acos(dot)
            if theta < tol:
                continue
            tangent = tangent + alpha[i] * (theta / math.sin(theta)) * (units[i] - dot * mean)
        tn = float(tangent.norm())
        if tn < tol:
            break
        mean = math.cos(tn) * mean + math.sin(tn) * (tangent / tn)
        if float(mean.norm()) > tol:
            mean = mean / mean.norm()
    scale = sum(nm / n for nm in norms)
    return (scale * mean).reshape(shape)


def sce(base: torch.Tensor, thetas: list[torch.Tensor], *, select_topk: float = 1.0,
        delta_dtype=torch.float32) -> torch.Tensor:
    """SCE: keep the int(ρ·#nonzero-variance) elements of largest variance across the task vectors (ties: lowest
    index), weights = mean squared task vector normalized (uniform if the means sum < 1e-6), TIES sign erase,
    weighted mean of the agreeing entries over max(Σ agreeing weights, 1e-6)."""
    ds = [delta(x, base, delta_dtype) for x in thetas]
    if select_topk < 1:
        stack = torch.stack(ds)
        var = ((stack - stack.mean(0)) ** 2).mean(0)
        if select_topk <= 0:
            keep = torch.zeros_like(var, dtype=torch.bool)
        else:
            keep = topk_mask(var, int(int(torch.count_nonzero(var)) * select_topk))
        ds = [d * keep.to(F64) for d in ds]
    means = [float((d ** 2).mean()) for d in ds]
    total = sum(means)
    weights = [1.0 / len(ds)] * len(ds) if abs(total) < 1e-6 else [m / total for m in means]
    s = torch.where(sum(ds) >= 0, 1.0, -1.0).to(F64)
    masks = [(torch.sign(d) == s).to(F64) for d in ds]
    num = sum(m * w * d for m, w, d in zip(masks, weights, ds))
    den = sum(m * w for m, w in zip(masks, weights))
    return f64(base) + num / torch.clamp(den, min=1e-6)


def nearswap(base: torch.Tensor, other: torch.Tensor, t: float) -> torch.Tensor:
    """w = clamp(t / max(|θ_b − θ_1|, 1e-6), 0, 1); w·θ_1 + (1 − w)·θ_b."""
    a, b = f64(base), f64(other)
    w = torch.clamp(t / torch.clamp((a - b).abs(), min=1e-6), 0.0, 1.0)
    return w * b + (1 - w) * a


def arcee_fusion_importance(base: torch.Tensor, other: torch.Tensor,
                            importance_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """|θ_1 − θ_b| · KL(softmax θ_1 + 1e-8 ‖ softmax θ_b + 1e-8) per row, computed in ``importance_dtype``.

    Why not float64 by default: the KL of two nearly equal rows (~1e-6) is a sum of ±1e-3-sized terms, so float32
    gets it only to about 1 %, and which elements cross the threshold depends on exactly those values. MergeKit and
    the engine both compute it in the compute dtype (float32 unless float64 is asked for), like δ above."""
    a, b = base.to(importance_dtype), other.to(importance_dtype)
    p = torch.softmax(b, dim=-1) + 1e-8
    q = torch.softmax(a, dim=-1) + 1e-8
    kl = (p * torch.log(p / q)).sum(-1, keepdim=True)
    return ((b - a).abs() * kl).to(F64)


def arcee_fusion(base: torch.Tensor, other: torch.Tensor, importance_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Take θ_1 where |θ_1 − θ_b|·KL(row) ≥ median + 1.5·IQR of the tensor (quantiles: sorted[int(q·(n−1))])."""
    imp = arcee_fusion_importance(base, other, importance_dtype)
    flat = torch.sort(imp.reshape(-1)).values.to(importance_dtype)
    n = flat.numel()
    q1, med, q3 = (flat[int(q * (n - 1))] for q in (0.25, 0.5, 0.75))
    # the threshold is rounded in the importance dtype too: with bf16 inputs |Δ| sits on a grid, and
    # median + 1.5·IQR often lands exactly on another element's importance, where rounding decides
    threshold = float(med + 1.5 * (q3 - q1))
    mask = (imp >= threshold).to(F64)
    return f64(base) + (f64(other) - f64(base)) * mask


def ram(base: torch.Tensor, thetas: list[torch.Tensor], *, epsilon: float = 1e-5, r: float | None = None,
        alpha: float = 0.2, delta_dtype=torch.float32) -> torch.Tensor:
    """RAM: per element, the entries with |δ_i| > ε; one contributor → its δ, several → their mean, none → 0.
    With ``r`` (RAM+ tensor-local): model i's sole-contributor entries × (1 + r·clamp(S_i / max(U_i, ε), 0, α)),
    S_i / U_i = how many of its contributing entries are shared / unique over the whole tensor."""
    ds = [delta(x, base, delta_dtype) for x in thetas]
    nz = [(d.abs() > epsilon) for d in ds]
    count = sum(m.to(torch.int64) for m in nz)
    unique, overlap = count == 1, count > 1
    out = torch.zeros_like(ds[0])
    for d, m in zip(ds, nz):
        lam = 1.0
        if r is not None:
            shared_n, unique_n = int((m & overlap).sum()), int((m & unique).sum())
            lam = 1.0 + r * min(max(shared_n / max(unique_n, epsilon), 0.0), alpha)
        out = out + torch.where(m & unique, d * lam, torch.zeros_like(d))
        out = out + torch.where(m & overlap, d / count.clamp(min=1).to(F64), torch.zeros_like(d))
    return f64(base) + out
