"""Compiled (numba) scalar kernels for :mod:`merge_ops.gguf_kquants`.

The same algorithms as the vectorised numpy code there, written as the scalar loops of ggml's reference quantizers
and compiled: much faster, and a second, independent implementation (the tests require both to agree bit for bit).
All arithmetic is float32: every constant is cast, since a float64 literal would promote the whole expression.
numba has no float16, so the fp16 rounding of super-block scales happens in numpy between a search kernel and a
levels kernel.
"""

from __future__ import annotations

import numba
import numpy as np

jit = numba.njit(cache=True, nogil=True)
pjit = numba.njit(cache=True, nogil=True, parallel=True)  # super-blocks are independent: one per thread
prange = numba.prange


@jit
def nearest(v):
    return np.int32(np.rint(np.float32(v)))


@jit
def make_qkx2(x, w, L, laux, nmax, rmin, rdelta, nstep):
    n = x.shape[0]
    mn = x[0]
    mx = x[0]
    sum_w = w[0]
    sum_x = np.float32(sum_w * x[0])
    for i in range(1, n):
        if x[i] < mn:
            mn = x[i]
        if x[i] > mx:
            mx = x[i]
        sum_w = np.float32(sum_w + w[i])
        sum_x = np.float32(sum_x + np.float32(w[i] * x[i]))
    if mn > np.float32(0):
        mn = np.float32(0)
    if mx == mn:
        for i in range(n):
            L[i] = 0
        return np.float32(0), np.float32(-mn)
    iscale = np.float32(np.float32(nmax) / np.float32(mx - mn))
    scale = np.float32(np.float32(1) / iscale)
    best = np.float32(0)
    for i in range(n):
        lv = nearest(np.float32(iscale * np.float32(x[i] - mn)))
        lv = max(0, min(nmax, lv))
        L[i] = lv
        diff = np.float32(np.float32(np.float32(scale * np.float32(lv)) + mn) - x[i])
        best = np.float32(best + np.float32(w[i] * np.float32(diff * diff)))
    for step in range(nstep + 1):
        iscale = np.float32(np.float32(np.float32(rmin + np.float32(rdelta * np.float32(step))) + np.float32(nmax))
                            / np.float32(mx - mn))
        sum_l = np.float32(0)
        sum_l2 = np.float32(0)
        sum_xl = np.float32(0)
        for i in range(n):
            lv = nearest(np.float32(iscale * np.float32(x[i] - mn)))
            lv = max(0, min(nmax, lv))
            laux[i] = lv
            wl = np.float32(w[i] * np.float32(lv))
            sum_l = np.float32(sum_l + wl)
            sum_l2 = np.float32(sum_l2 + np.float32(wl * np.float32(lv)))
            sum_xl = np.float32(sum_xl + np.float32(wl * x[i]))
        d = np.float32(np.float32(sum_w * sum_l2) - np.float32(sum_l * sum_l))
        if d > np.float32(0):
            this_scale = np.float32(np.float32(np.float32(sum_w * sum_xl) - np.float32(sum_x * sum_l)) / d)
            this_min = np.float32(np.float32(np.float32(sum_l2 * sum_x) - np.float32(sum_l * sum_xl)) / d)
            if this_min > np.float32(0):
                this_min = np.float32(0)
                this_scale = np.float32(sum_xl / sum_l2)
            cur = np.float32(0)
            for i in range(n):
                diff = np.float32(np.float32(np.float32(this_scale * np.float32(laux[i])) + this_min) - x[i])
                cur = np.float32(cur + np.float32(w[i] * np.float32(diff * diff)))
            if cur < best:
                for i in range(n):
                    L[i] = laux[i]
                best = cur
                scale = this_scale
                mn = this_min
    return scale, np.float32(-mn)


@jit
def make_qx(x, L, nmax):
    n = x.shape[0]
    mx = np.float32(0)
    amax = np.float32(0)
    for i in range(n):
        ax = abs(x[i])
        if ax > amax:
            amax = ax
            mx = x[i]
    if amax < np.float32(1e-15):
        for i in range(n):
            L[i] = 0
        return np.float32(0)
    iscale = np.float32(np.float32(-nmax) / mx)
    sumlx = np.float32(0)
    suml2 = np.float32(0)
    for i in range(n):
        lv = nearest(np.float32(iscale * x[i]))
        lv = max(-nmax, min(nmax - 1, lv))
        L[i] = lv + nmax
        w = np.float32(x[i] * x[i])
        sumlx = np.float32(sumlx + np.float32(np.float32(w * x[i]) * np.float32(lv)))
        suml2 = np.float32(suml2 + np.float32(np.float32(w * np.float32(lv)) * np.float32(lv)))
    scale = np.float32(sumlx / suml2) if suml2 != np.float32(0) else np.float32(0)
    best = np.float32(scale * sumlx)
    for step in range(-9, 10):
        if step == 0:
            continue
        iscale = np.float32(-np.float32(np.float32(nmax) + np.float32(np.float32(0.1) * np.float32(step))) / mx)
        sumlx = np.float32(0)
        suml2 = np.float32(0)
        for i in range(n):
            lv = nearest(np.float32(iscale * x[i]))
            lv = max(-nmax, min(nmax - 1, lv))
            w = np.float32(x[i] * x[i])
            sumlx = np.float32(sumlx + np.float32(np.float32(w * x[i]) * np.float32(lv)))
            suml2 = np.float32(suml2 + np.float32(np.float32(w * np.float32(lv)) * np.float32(lv)))
        if suml2 > np.float32(0) and np.float32(sumlx * sumlx) > np.float32(best * suml2):
            for i in range(n):
                lv = nearest(np.float32(iscale * x[i]))
                L[i] = nmax + max(-nmax, min(nmax - 1, lv))
            scale = np.float32(sumlx / suml2)
            best = np.float32(scale * sumlx)
    return scale


@pjit
def scale_min_k_search(xb, nmax, rmin, nstep, Ls, Lm, MAXS, MAXM, L):
    """Per 32-value sub-block search and 6-bit scale/min codes; the super-block maxima go out to be rounded
    to fp16 (numba has no float16) before the final levels are chosen."""
    nb = xb.shape[0]
    for b in prange(nb):
        w = np.empty(32, np.float32)
        laux = np.empty(32, np.int32)
        lsub = np.empty(32, np.int32)
        scales = np.empty(8, np.float32)
        mins = np.empty(8, np.float32)
        max_scale = np.float32(0)
        max_min = np.float32(0)
        for j in range(8):
            x = xb[b, 32 * j:32 * j + 32]
            sum_x2 = np.float32(0)
            for l in range(32):
                sum_x2 = np.float32(sum_x2 + np.float32(x[l] * x[l]))
            av_x = np.float32(np.sqrt(np.float32(sum_x2 / np.float32(32))))
            for l in range(32):
                w[l] = np.float32(av_x + abs(x[l]))
            s, m = make_qkx2(x, w, lsub, laux, nmax, rmin, np.float32(0.1), nstep)
            for l in range(32):
                L[b, 32 * j + l] = lsub[l]
            scales[j] = s
            mins[j] = m
            if s > max_scale:
                max_scale = s
            if m > max_min:
                max_min = m
        inv_scale = np.float32(np.float32(63) / max_scale) if max_scale > np.float32(0) else np.float32(0)
        inv_min = np.float32(np.float32(63) / max_min) if max_min > np.float32(0) else np.float32(0)
        for j in range(8):
            Ls[b, j] = min(63, nearest(np.float32(inv_scale * scales[j])) & 0xFF)
            Lm[b, j] = min(63, nearest(np.float32(inv_min * mins[j])) & 0xFF)
        MAXS[b] = max_scale
        MAXM[b] = max_min


@jit
def scale_min_k_levels(xb, nmax, Ls, Lm, D, DM, L):
    """Final levels from the fp16-rounded super-block scales D, DM (as float32)."""
    for b in range(xb.shape[0]):
        for j in range(8):
            d = np.float32(D[b] * np.float32(Ls[b, j]))
            if d == np.float32(0):
                continue
            dm = np.float32(DM[b] * np.float32(Lm[b, j]))
            for ii in range(32):
                lv = nearest(np.float32(np.float32(xb[b, 32 * j + ii] + dm) / d))
                L[b, 32 * j + ii] = max(0, min(nmax, lv))


@pjit
def q6_k_search(xb, SCALES, L):
    for b in prange(xb.shape[0]):
        lsub = np.empty(16, np.int32)
        for ib in range(16):
            SCALES[b, ib] = make_qx(xb[b, 16 * ib:16 * ib + 16], lsub, 32)
            for l in range(16):
                L[b, 16 * ib + l] = lsub[l]


@jit
def q6_k_levels(xb, SC, D, L):
    for b in range(xb.shape[0]):
        for j in range(16):
            d = np.float32(D[b] * np.float32(SC[b, j]))
            if d == np.float32(0):
                continue
            for ii in range(16):
                lv = nearest(np.float32(xb[b, 16 * j + ii] / d))
                L[b, 16 * j + ii] = max(-32, min(31, lv)) + 32
