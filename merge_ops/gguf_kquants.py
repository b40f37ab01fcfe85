"""In-process k-quant encoders (Q4_K, Q5_K, Q6_K) and llama.cpp's Q4_K_M / Q5_K_M / Q6_K tensor-type mixes.

Why in-process: the ``gguf`` package can only *decode* k-quants, and llama.cpp's quantizer needs a native build
(llama-cpp-python compiles for ~14 min). These encoders follow ggml's reference quantizers without an importance
matrix (``quantize_row_q{4,5,6}_K_ref``): the same candidate-scale search (``make_qkx2_quants`` for the
scale+min formats, ``make_qx_quants`` for Q6_K), the same weighting (``rms + |x|`` per 32-value sub-block), the same
6-/8-bit packing of sub-block scales, fp16 super-block scales and bit layout, vectorised with numpy over all blocks
and computed in float32 with sums accumulated in element order, as the C code does. Verified bit for bit against
ggml's C ``quantize_row_q{4,5,6}_K_ref`` compiled without ``-march`` (see the test
``test_kquants_bit_exact_vs_ggml_c_reference``); a llama.cpp built with ``-march=native`` may fuse multiply-adds in
those loops and then round an occasional value to the neighbouring level. The format is decoded by
``gguf.quants.dequantize``. Two implementations exist: the numpy one below (vectorised over blocks) and compiled
scalar loops in :mod:`merge_ops.gguf_kquants_numba` (used when numba is importable, ~10× faster and parallel over
super-blocks); both produce the same bytes.

The type mix (which tensors get Q6_K in a Q4_K_M file, the fallbacks for rows that are not a multiple of 256) follows
llama.cpp's ``llama_tensor_get_type`` for dense (non-MoE, non-70B-special-cased) models.
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as T

QK_K = 256
F32 = np.float32
GROUP_MAX_EPS = F32(1e-15)


def _seqsum(a: np.ndarray) -> np.ndarray:
    """Sum over the last axis in element order, in float32 (what a C ``for`` loop with ``+=`` does)."""
    s = a[..., 0].astype(F32, copy=True)
    for i in range(1, a.shape[-1]):
        s += a[..., i]
    return s


def _nearest(v: np.ndarray) -> np.ndarray:
    """ggml's ``nearest_int``: round half to even of a float32 (valid for |v| < 2^22)."""
    return np.rint(v.astype(F32, copy=False)).astype(np.int32)


def _make_qkx2(x: np.ndarray, w: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int):
    """Scale+min search of ``make_qkx2_quants`` (squared error) for rows of ``x`` (M, n). Returns
    (scale (M,), the_min (M,), L (M, n) uint8)."""
    mn = x.min(axis=-1)
    mx = x.max(axis=-1)
    sum_w = _seqsum(w)
    sum_x = _seqsum(w * x)
    mn = np.minimum(mn, F32(0))
    flat = mx == mn
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        iscale = F32(nmax) / (mx - mn)
        scale = F32(1) / iscale
        L = np.clip(_nearest(iscale[:, None] * (x - mn[:, None])), 0, nmax)
        diff = (scale[:, None] * L.astype(F32) + mn[:, None]) - x
        best = _seqsum(w * (diff * diff))
        for step in range(nstep + 1):
            isc = (F32(rmin) + F32(rdelta) * F32(step) + F32(nmax)) / (mx - mn)
            la = np.clip(_nearest(isc[:, None] * (x - mn[:, None])), 0, nmax)
            laf = la.astype(F32)
            sum_l = _seqsum(w * laf)
            sum_l2 = _seqsum(w * laf * laf)
            sum_xl = _seqsum(w * laf * x)
            d = sum_w * sum_l2 - sum_l * sum_l
            ok = d > 0
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / d
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / d
            pos = this_min > 0
            this_min = np.where(pos, F32(0), this_min)
            this_scale = np.where(pos, sum_xl / sum_l2, this_scale)
            diff = (this_scale[:, None] * laf + this_min[:, None]) - x
            cur = _seqsum(w * (diff * diff))
            better = ok & (cur < best) & ~flat
            L = np.where(better[:, None], la, L)
            best = np.where(better, cur, best)
            scale = np.where(better, this_scale, scale)
            mn = np.where(better, this_min, mn)  # the C loop keeps using the updated min
    scale = np.where(flat, F32(0), scale).astype(F32)
    L = np.where(flat[:, None], 0, L)
    return scale, (-mn).astype(F32), L.astype(np.uint8)


def _make_qx(x: np.ndarray, nmax: int):
    """``make_qx_quants(n, nmax, x, L, rmse_type=1, NULL)``: symmetric scale search weighted by x². Returns
    (scale (M,), L (M, n) in 0..2*nmax-1)."""
    ax = np.abs(x)
    idx = ax.argmax(axis=-1)  # first maximum, as the strict '>' in C
    amax = np.take_along_axis(ax, idx[:, None], -1)[:, 0]
    mx = np.take_along_axis(x, idx[:, None], -1)[:, 0]
    zero = amax < GROUP_MAX_EPS
    w = x * x
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        iscale = F32(-nmax) / mx
        lv = np.clip(_nearest(iscale[:, None] * x), -nmax, nmax - 1)
        lf = lv.astype(F32)
        sumlx = _seqsum(w * x * lf)
        suml2 = _seqsum(w * lf * lf)
        scale = np.where(suml2 != 0, sumlx / suml2, F32(0)).astype(F32)
        best = scale * sumlx
        L = lv + nmax
        for step in range(-9, 10):
            if step == 0:
                continue
            isc = -(F32(nmax) + F32(0.1) * F32(step)) / mx
            lv = np.clip(_nearest(isc[:, None] * x), -nmax, nmax - 1)
            lf = lv.astype(F32)
            sumlx = _seqsum(w * x * lf)
            suml2 = _seqsum(w * lf * lf)
            upd = (suml2 > 0) & (sumlx * sumlx > best * suml2) & ~zero
            L = np.where(upd[:, None], lv + nmax, L)
            new_scale = sumlx / suml2
            scale = np.where(upd, new_scale, scale)
            best = np.where(upd, new_scale * sumlx, best)
    scale = np.where(zero, F32(0), scale).astype(F32)
    L = np.where(zero[:, None], 0, L)
    return scale, L.astype(np.int32)


def _fp16(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(fp16 bytes view, the fp16 value back in float32)."""
    h = v.astype(np.float16)
    return h, h.astype(F32)


def _pack_scale_min(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """The 12-byte, 6-bit scale/min packing shared by Q4_K and Q5_K (ls, lm: (nb, 8) uint8 ≤ 63)."""
    out = np.zeros((ls.shape[0], 12), dtype=np.uint8)
    out[:, 0:4] = ls[:, 0:4]
    out[:, 4:8] = lm[:, 0:4]
    out[:, 8:12] = (ls[:, 4:8] & 0xF) | ((lm[:, 4:8] & 0xF) << 4)
    out[:, 0:4] |= (ls[:, 4:8] >> 4) << 6
    out[:, 4:8] |= (lm[:, 4:8] >> 4) << 6
    return out


def _scale_min_k(x: np.ndarray, nmax: int, rmin: float, nstep: int, use_numba: bool = True):
    """Q4_K / Q5_K scales and levels, compiled when numba is available (same results as the numpy version)."""
    k = _numba_kernels() if use_numba else None
    if k is None:
        return _scale_min_k_np(x, nmax, rmin, nstep)
    nb = x.shape[0]
    ls = np.empty((nb, 8), np.uint8)
    lm = np.empty((nb, 8), np.uint8)
    max_scale = np.empty(nb, F32)
    max_min = np.empty(nb, F32)
    L = np.empty((nb, QK_K), np.int32)
    k[0](x, nmax, F32(rmin), nstep, ls, lm, max_scale, max_min, L)
    d16, d = _fp16(max_scale / F32(63))
    m16, dm = _fp16(max_min / F32(63))
    k[1](x, nmax, ls, lm, d, dm, L)
    return d16, m16, _pack_scale_min(ls, lm), L


def _scale_min_k_np(x: np.ndarray, nmax: int, rmin: float, nstep: int):
    """Common part of Q4_K / Q5_K: per-sub-block search, 6-bit scale quantization, final levels.
    x: (nb, 256) float32. Returns (d16, dmin16, packed scales, L (nb, 256))."""
    nb = x.shape[0]
    xs = x.reshape(nb * 8, 32)
    av_x = np.sqrt(_seqsum(xs * xs) / F32(32))
    w = av_x[:, None] + np.abs(xs)
    scales, mins, L = _make_qkx2(xs, w, nmax, rmin, 0.1, nstep)
    scales, mins, L = scales.reshape(nb, 8), mins.reshape(nb, 8), L.reshape(nb, 8, 32).astype(np.int32)
    max_scale = np.maximum(scales.max(axis=1), F32(0))
    max_min = np.maximum(mins.max(axis=1), F32(0))
    with np.errstate(divide="ignore"):
        inv_scale = np.where(max_scale > 0, F32(63) / max_scale, F32(0)).astype(F32)
        inv_min = np.where(max_min > 0, F32(63) / max_min, F32(0)).astype(F32)
    ls = np.minimum(63, _nearest(inv_scale[:, None] * scales) & 0xFF).astype(np.uint8)
    lm = np.minimum(63, _nearest(inv_min[:, None] * mins) & 0xFF).astype(np.uint8)
    d16, d = _fp16(max_scale / F32(63))
    m16, dm = _fp16(max_min / F32(63))
    dsub = d[:, None] * ls.astype(F32)
    msub = dm[:, None] * lm.astype(F32)
    xb = x.reshape(nb, 8, 32)
    with np.errstate(divide="ignore", invalid="ignore"):
        lnew = np.clip(_nearest((xb + msub[..., None]) / dsub[..., None]), 0, nmax)
    L = np.where((dsub != 0)[..., None], lnew, L).reshape(nb, QK_K)
    return d16, m16, _pack_scale_min(ls, lm), L


def quantize_q4_k(x: np.ndarray, use_numba: bool = True) -> np.ndarray:
    """(rows, n*256) float32 -> (rows, n*144) uint8 Q4_K blocks."""
    rows = x.shape[0]
    xb = np.ascontiguousarray(x, dtype=F32).reshape(-1, QK_K)
    d16, m16, sc, L = _scale_min_k(xb, 15, -1.0, 20, use_numba)
    L = L.reshape(-1, 4, 2, 32).astype(np.uint8)  # 64-value groups: low nibble first 32, high nibble next 32
    qs = (L[:, :, 0, :] | (L[:, :, 1, :] << 4)).reshape(-1, 128)
    blocks = np.concatenate([d16.view(np.uint8).reshape(-1, 2), m16.view(np.uint8).reshape(-1, 2), sc, qs], axis=1)
    return blocks.reshape(rows, -1)


def quantize_q5_k(x: np.ndarray, use_numba: bool = True) -> np.ndarray:
    """(rows, n*256) float32 -> (rows, n*176) uint8 Q5_K blocks."""
    rows = x.shape[0]
    xb = np.ascontiguousarray(x, dtype=F32).reshape(-1, QK_K)
    d16, m16, sc, L = _scale_min_k(xb, 31, -0.5, 15, use_numba)
    L = L.reshape(-1, 4, 2, 32).astype(np.uint8)
    low = L & 0xF
    high = (L >> 4) & 1
    qs = (low[:, :, 0, :] | (low[:, :, 1, :] << 4)).reshape(-1, 128)
    # bit 2g of qh[j] holds the 5th bit of L[64g + j], bit 2g+1 that of L[64g + 32 + j]
    shifts = (np.arange(4, dtype=np.uint8)[None, :, None, None] * 2 + np.arange(2, dtype=np.uint8)[None, None, :, None])
    qh = np.bitwise_or.reduce((high << shifts).reshape(-1, 8, 32), axis=1).astype(np.uint8)
    blocks = np.concatenate([d16.view(np.uint8).reshape(-1, 2), m16.view(np.uint8).reshape(-1, 2), sc, qh, qs],
                            axis=1)
    return blocks.reshape(rows, -1)


def _q6_levels(xb: np.ndarray, use_numba: bool = True):
    """Q6_K sub-block scales (int8), fp16 super-block scale and levels (nb, 256) in 0..63."""
    nb = xb.shape[0]
    k = _numba_kernels() if use_numba else None
    if k is None:
        scales, L = _make_qx(xb.reshape(nb * 16, 16), 32)
        scales, L = scales.reshape(nb, 16), L.reshape(nb, 16, 16)
    else:
        scales = np.empty((nb, 16), F32)
        L = np.empty((nb, QK_K), np.int32)
        k[2](xb, scales, L)
        L = L.reshape(nb, 16, 16)
    absd = np.abs(scales)
    idx = absd.argmax(axis=1)  # first maximum, as the strict '>' in C
    max_abs = np.take_along_axis(absd, idx[:, None], 1)[:, 0]
    max_scale = np.take_along_axis(scales, idx[:, None], 1)[:, 0]
    zero = max_abs < GROUP_MAX_EPS
    with np.errstate(divide="ignore", invalid="ignore"):
        iscale = np.where(zero, F32(0), F32(-128) / max_scale).astype(F32)
        d16, d = _fp16(np.where(zero, F32(0), F32(1) / iscale))
    sc = np.minimum(127, _nearest(iscale[:, None] * scales)).astype(np.int8)
    sc[zero] = 0
    if k is None:
        dsub = d[:, None] * sc.astype(F32)
        xs = xb.reshape(nb, 16, 16)
        with np.errstate(divide="ignore", invalid="ignore"):
            lnew = np.clip(_nearest(xs / dsub[..., None]), -32, 31) + 32
        L = np.where((dsub != 0)[..., None], lnew, L).reshape(nb, QK_K)
    else:
        L = np.ascontiguousarray(L.reshape(nb, QK_K))
        k[3](xb, sc, d, L)
    L[zero] = 0
    return sc, d16, L


def quantize_q6_k(x: np.ndarray, use_numba: bool = True) -> np.ndarray:
    """(rows, n*256) float32 -> (rows, n*210) uint8 Q6_K blocks."""
    rows = x.shape[0]
    xb = np.ascontiguousarray(x, dtype=F32).reshape(-1, QK_K)
    nb = xb.shape[0]
    sc, d16, L = _q6_levels(xb, use_numba)
    L = L.reshape(nb, 2, 4, 32).astype(np.uint8)  # halves of 128 values, quarters of 32
    ql = np.concatenate([(L[:, :, 0] & 0xF) | ((L[:, :, 2] & 0xF) << 4),
                         (L[:, :, 1] & 0xF) | ((L[:, :, 3] & 0xF) << 4)], axis=2).reshape(nb, 128)
    qh = ((L[:, :, 0] >> 4) | ((L[:, :, 1] >> 4) << 2) | ((L[:, :, 2] >> 4) << 4)
          | ((L[:, :, 3] >> 4) << 6)).reshape(nb, 64)
    blocks = np.concatenate([ql, qh, sc.view(np.uint8), d16.view(np.uint8).reshape(-1, 2)], axis=1)
    return blocks.reshape(rows, -1)


ENCODERS = {T.Q4_K: quantize_q4_k, T.Q5_K: quantize_q5_k, T.Q6_K: quantize_q6_k}

#: k-quant mix -> its default type for 2-D weights
MIX_BASE = {"q4_k_s": T.Q4_K, "q4_k_m": T.Q4_K, "q5_k_s": T.Q5_K, "q5_k_m": T.Q5_K, "q6_k": T.Q6_K}
#: llama.cpp's fallback when a row is not a multiple of 256 (then F16 if not a multiple of 32 either)
FALLBACK = {T.Q4_K: T.Q5_0, T.Q5_K: T.Q5_1, T.Q6_K: T.Q8_0}


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    """llama.cpp's choice of layers that get more bits in the _M mixes: the first and last eighth, and every third
    layer in between."""
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


def mix_type(quant: str, gguf_name: str, shape: tuple[int, ...], n_layers: int, has_output: bool) -> T:
    """The type llama.cpp's quantizer gives this 2-D tensor in the ``quant`` mix (before the row-length fallback).

    Rules (llama.cpp ``llama_tensor_get_type``, dense models): the logit projection (or the embedding when it is
    tied to it) gets Q6_K (Q8_0 if its rows are not a multiple of 256); in Q4_K_M/Q5_K_M ``attn_v`` and ``ffn_down``
    of the layers ``use_more_bits`` picks get Q6_K; in Q4_K_S the first 4 ``attn_v`` and the first eighth of
    ``ffn_down`` get Q5_K; everything else gets the mix's base type.
    """
    base = MIX_BASE[quant]
    cols = shape[-1]
    if gguf_name == "output.weight" or (not has_output and gguf_name == "token_embd.weight"):
        return T.Q8_0 if cols % QK_K else T.Q6_K
    parts = gguf_name.split(".")
    layer = int(parts[1]) if parts[0] == "blk" else -1
    if layer >= 0 and ".attn_v." in gguf_name:
        if quant in ("q4_k_m", "q5_k_m") and use_more_bits(layer, n_layers):
            return T.Q6_K
        if quant == "q4_k_s" and layer < 4:
            return T.Q5_K
    if layer >= 0 and ".ffn_down." in gguf_name:
        if quant in ("q4_k_m", "q5_k_m") and use_more_bits(layer, n_layers):
            return T.Q6_K
        if quant == "q4_k_s" and layer < n_layers // 8:
            return T.Q5_K
    return base


_NUMBA = None


def _numba_kernels():
    """(scale_min_k_search, scale_min_k_levels, q6_k_search, q6_k_levels), or None without numba."""
    global _NUMBA
    if _NUMBA is None:
        try:
            from . import gguf_kquants_numba as k

            _NUMBA = (k.scale_min_k_search, k.scale_min_k_levels, k.q6_k_search, k.q6_k_levels)
        except ImportError:
            _NUMBA = False
    return _NUMBA or None
