"""Barycentres on the hypersphere (``multislerp``, ``karcher``) from Gram matrices alone.

Why this works streamed: both methods only ever form linear combinations of the input vectors v_1…v_N (unit
vectors, their weighted mean, tangent vectors, exponential maps). Every such vector is a coefficient vector c in
the basis (v_i), and every norm or dot product it needs is cᵀ G c' with the Gram matrix G_ij = ⟨v_i, v_j⟩. So one
pass over the tensor accumulates G (float64), all the geometry runs on N×N numbers here, and the output is
Σ c_i v_i written row block by row block.

Thresholds and order of operations follow MergeKit 0.1.5 (the contract: same config, same model).
"""

from __future__ import annotations

import math

import numpy as np


STEP_EPS2 = 1e-14  # squared norm below which a tangent step of unit vectors is zero to float precision


class SphereError(ValueError):
    """The inputs have no defined barycentre (e.g. antipodal vectors whose weights cancel)."""


def _norm(c: np.ndarray, gram: np.ndarray) -> float:
    return math.sqrt(max(0.0, float(c @ gram @ c)))


def multislerp_coefficients(gram: np.ndarray, weights: list[float], *, normalize_weights: bool = True,
                            eps: float = 1e-8) -> np.ndarray:
    """Coefficients c with multislerp(v) = Σ c_i v_i.

    Steps (MergeKit's): u_i = v_i / (‖v_i‖ + eps); m = Σ w_i u_i, normalized (two inputs whose mean vanishes fall
    back to Σ w_i v_i; more inputs are an error); tangent t_i = u_i − ⟨u_i, m⟩ m; T = Σ w_i t_i;
    r = m cos‖T‖' + T sin‖T‖' / ‖T‖' with ‖T‖' = ‖T‖ + eps; result r · Σ w_i ‖v_i‖.
    """
    n = gram.shape[0]
    w = np.asarray(weights, dtype=np.float64)
    if normalize_weights:
        w = w / w.sum()
    norms = np.sqrt(np.clip(np.diag(gram), 0.0, None))
    if np.any(norms + eps <= 0.0):
        raise SphereError("an input vector is zero and eps is 0, so it has no direction (MergeKit would write NaNs); "
                          "set eps > 0")
    a = 1.0 / (norms + eps)  # u_i = a_i v_i
    mean = w * a
    mean_norm = _norm(mean, gram)
    if mean_norm < eps:
        if n == 2:
            return w.copy()
        raise SphereError("the weighted mean of the unit vectors is zero (antipodal inputs whose weights cancel); "
                          "change the weights")
    mean = mean / mean_norm
    gm = gram @ mean
    tangent = np.zeros(n)
    for i in range(n):
        dot = a[i] * gm[i]  # ⟨u_i, m⟩
        t_i = -dot * mean
        t_i[i] += a[i]
        tangent += w[i] * t_i
    tn = _norm(tangent, gram) + eps
    result = mean * math.cos(tn) + tangent * (math.sin(tn) / tn)
    return result * float((norms * w).sum())


def karcher_coefficients(gram: np.ndarray, alphas: list[float], *, max_iter: int = 10,
                         tol: float = 1e-5) -> np.ndarray:
    """Coefficients c with karcher(v) = Σ c_i v_i: the weighted Riemannian (Karcher) mean of the unit vectors,
    scaled by the weighted mean norm.

    MergeKit's rules: inputs with norm ≤ tol are left out of the mean (their alphas renormalized over the rest) but
    still count in the final scale Σ α_i ‖v_i‖; all inputs ≤ tol → zero. Start at the normalized weighted mean of the
    units (the first valid unit if that mean is shorter than tol); each iteration moves along
    T = Σ α_i θ_i/sin θ_i (u_i − cos θ_i m) (terms with θ_i < tol skipped) by the exponential map, stopping when
    ‖T‖ < tol or after ``max_iter`` iterations.
    """
    n = gram.shape[0]
    norms = np.sqrt(np.clip(np.diag(gram), 0.0, None))
    valid = [i for i in range(n) if norms[i] > tol]
    if not valid:
        return np.zeros(n)
    a = np.where(norms > 0, 1.0 / np.where(norms > 0, norms, 1.0), 0.0)  # u_i = a_i v_i
    alpha_sum = sum(alphas[i] for i in valid)
    alpha = {i: alphas[i] / alpha_sum for i in valid}
    mean = np.zeros(n)
    for i in valid:
        mean[i] += alpha[i] * a[i]
    mean_norm = _norm(mean, gram)
    if mean_norm < tol:
        mean = np.zeros(n)
        mean[valid[0]] = a[valid[0]]
    else:
        mean = mean / mean_norm
    for _ in range(max_iter):
        gm = gram @ mean
        tangent = np.zeros(n)
        for i in valid:
            dot = min(1.0, max(-1.0, a[i] * gm[i]))
            theta = math.acos(dot)
            if theta < tol:
                continue
            step = -dot * mean
            step[i] += a[i]
            # u_i − cos θ·m has norm sin θ; for (anti)parallel inputs it is zero, which MergeKit's float vectors
            # show as exact zeros, while its coefficients here stay finite and only the Gram form reveals ~0: skip
            # it rather than multiply rounding noise by θ / sin θ ≈ 1e16
            if float(step @ gram @ step) < STEP_EPS2:
                continue
            tangent += alpha[i] * (theta / math.sin(theta)) * step
        tn = _norm(tangent, gram)
        if tn < tol:
            break
        mean = math.cos(tn) * mean + math.sin(tn) * (tangent / tn)
        un = _norm(mean, gram)
        if un > tol:
            mean = mean / un
    scale = float(sum(al * nm for al, nm in zip(alphas, norms)))
    return scale * mean
