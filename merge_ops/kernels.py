"""Fused CPU kernels (numba) for the hot paths: bf16 task-vector merges (task arithmetic, TIES) and linear.

Why: with plain torch ops a TIES merge makes ~40 passes over memory per element (convert, subtract, abs, histogram,
mask, weight, elect, normalize, add, round), each allocating a temporary. These kernels read the raw bf16 inputs
once per pass, keep everything in registers and write bf16 directly, on all cores (numba ``prange``). They compute
exactly what the torch path computes (same operations, same order, same tie rule), and the torch path remains the
reference used on CUDA, for other dtypes and when numba is not installed. Tests compare the two.

Inputs: ``base`` is a 1-D uint16 array (bf16 bits) and ``models`` a tuple of such arrays — views of memory-mapped
input files, so the kernels read the page cache directly (no copy).

Blocks: each kernel splits the n elements of a chunk into ``nblocks`` contiguous ranges, ``block_start(b)`` =
b·n // nblocks, processed in parallel. The TIES tie rule ("values equal to the threshold: lowest flat index first")
is kept in parallel by counting equal values per block first and giving each block its share of the budget.
"""

from __future__ import annotations

import os

import numpy as np

try:  # numba is optional at runtime: without it the torch path runs
    import numba
    from numba import njit, prange

    HAVE_NUMBA = os.environ.get("MERGELINE_NO_NUMBA", "") == ""
except ImportError:  # pragma: no cover - exercised only without numba
    HAVE_NUMBA = False

MODE_NONE, MODE_ALL, MODE_THRESHOLD, MODE_RANDOM = 0, 1, 2, 3


TILE = 2048  # elements per tile: all temporaries of a tile stay in L1/L2


def nblocks_for(n: int) -> int:
    """Blocks of whole tiles processed in parallel (a fixed function of n, so results never depend on threads)."""
    tiles = (n + TILE - 1) // TILE
    return max(1, min(64, tiles))


if HAVE_NUMBA:
    _OPTS = dict(nogil=True, cache=True, fastmath=False, error_model="numpy", boundscheck=False)

    @njit(inline="always")
    def _tile_range(b, nb, n):
        tiles = (n + TILE - 1) // TILE
        return (b * tiles // nb) * TILE, min(n, ((b + 1) * tiles // nb) * TILE)

    @njit(inline="always")
    def _decode(src, s, L, dst_u):
        for j in range(L):
            dst_u[j] = np.uint32(src[s + j]) << np.uint32(16)

    @njit(inline="always")
    def _deltas(base, models, s, L, bu, xu):
        """bu ← base bits; xu[i] ← bits of (model_i − base) as float32."""
        m = len(models)
        _decode(base, s, L, bu)
        bf = bu.view(np.float32)
        for i in range(m):
            xi = xu[i]
            _decode(models[i], s, L, xi)
            xf = xi.view(np.float32)
            for j in range(L):
                xf[j] = xf[j] - bf[j]

    @njit(parallel=True, **_OPTS)
    def hist_level0(base, models, active, hist):
        """hist[b, i, top16(|m_i − base|)] += 1 for active models."""
        nb = hist.shape[0]
        m = len(models)
        n = base.shape[0]
        for b in prange(nb):
            bs, be = _tile_range(b, nb, n)
            bu = np.empty(TILE, np.uint32)
            xu = np.empty((m, TILE), np.uint32)
            for s in range(bs, be, TILE):
                L = min(TILE, be - s)
                _deltas(base, models, s, L, bu, xu)
                for i in range(m):
                    if active[i]:
                        for j in range(L):
                            hist[b, i, (xu[i, j] & np.uint32(0x7FFFFFFF)) >> np.uint32(16)] += 1

    @njit(parallel=True, **_OPTS)
    def hist_level1(base, models, prefix, hist):
        """hist[b, s, low16(|d|)] += 1 where top16(|d|) == prefix[s], for selector s on model s % m
        (prefix < 0: selector inactive)."""
        nb = hist.shape[0]
        m = len(models)
        ns = prefix.shape[0]
        n = base.shape[0]
        for b in prange(nb):
            bs, be = _tile_range(b, nb, n)
            bu = np.empty(TILE, np.uint32)
            xu = np.empty((m, TILE), np.uint32)
            for s in range(bs, be, TILE):
                L = min(TILE, be - s)
                _deltas(base, models, s, L, bu, xu)
                for k in range(ns):
                    if prefix[k] >= 0:
                        i = k % m
                        p = np.uint32(prefix[k])
                        for j in range(L):
                            a = xu[i, j] & np.uint32(0x7FFFFFFF)
                            if (a >> np.uint32(16)) == p:
                                hist[b, k, a & np.uint32(0xFFFF)] += 1

    @njit(parallel=True, **_OPTS)
    def count_equal(base, models, mode, thr, counts):
        """counts[b, s] = number of |d| (model s % m) equal to selector s's threshold in block b (mode 2 only)."""
        nb = counts.shape[0]
        m = len(models)
        ns = mode.shape[0]
        n = base.shape[0]
        for b in prange(nb):
            bs, be = _tile_range(b, nb, n)
            bu = np.empty(TILE, np.uint32)
            xu = np.empty((m, TILE), np.uint32)
            for s in range(bs, be, TILE):
                L = min(TILE, be - s)
                _deltas(base, models, s, L, bu, xu)
                for k in range(ns):
                    if mode[k] == 2:
                        i = k % m
                        c = 0
                        t = thr[k]
                        for j in range(L):
                            c += (xu[i, j] & np.uint32(0x7FFFFFFF)) == t
                        counts[b, k] += c

    @njit(inline="always")
    def _uniform(key, idx):
        """Same function as merge_ops.rng.uniform: SplitMix64 finalizer of key + idx·golden, top 24 bits."""
        z = np.uint64(key) + np.uint64(idx) * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
        return np.float32(z >> np.uint64(40)) * np.float32(1.0 / 16777216.0)

    @njit(inline="always")
    def _select(xi, L, mode, thr, budget, k, out, key=np.uint64(0), rho=np.float32(1.0), start=0):
        """out[j] = 1.0 where |d_j| is in the selector's top-k (exact tie rule, index order), else 0.0;
        mode 3: Bernoulli(rho) from the counter-based generator at flat index start + j."""
        one = np.float32(1.0)
        if mode == 3:
            for j in range(L):
                out[j] = np.float32(_uniform(key, start + j) < rho)
            return
        if mode == 0:
            for j in range(L):
                out[j] = np.float32(0.0)
        elif mode == 1:
            for j in range(L):
                out[j] = one
        else:
            for j in range(L):
                out[j] = np.float32((xi[j] & np.uint32(0x7FFFFFFF)) > thr)
            if budget[k] > 0:  # values equal to the threshold: lowest index first
                for j in range(L):
                    if budget[k] > 0 and (xi[j] & np.uint32(0x7FFFFFFF)) == thr:
                        out[j] = one
                        budget[k] -= 1

    @njit(parallel=True, **_OPTS)
    def task_vector_apply(base, models, mode, thr, eq_budget, weights, elect, normalize, total_w, lam,
                          out_u16, out_f32, write_bf16, keys, rhos, offset, dweights):
        """θ_b + λ·combine(mask_i · w_i · δ_i), the same float32 operations in the same order as the torch path.

        Selector i (< m) keeps the top entries of δ_i; selector m + i, when active, removes its own (smaller) top
        set again (breadcrumbs' outlier cut): mask_i = top(k_hi) ∧ ¬top(k_lo)."""
        nb = eq_budget.shape[0]
        m = len(models)
        n = base.shape[0]
        zero = np.float32(0.0)
        one = np.float32(1.0)
        for b in prange(nb):
            bs, be = _tile_range(b, nb, n)
            budget = eq_budget[b].copy()
            bu = np.empty(TILE, np.uint32)
            xu = np.empty((m, TILE), np.uint32)
            keep = np.empty(TILE, np.float32)
            cut = np.empty(TILE, np.float32)
            total = np.empty(TILE, np.float32)
            mixed = np.empty(TILE, np.float32)
            div = np.empty(TILE, np.float32)
            ou = np.empty(TILE, np.uint32)
            of = ou.view(np.float32)
            for s in range(bs, be, TILE):
                L = min(TILE, be - s)
                _deltas(base, models, s, L, bu, xu)
                bf = bu.view(np.float32)
                for i in range(m):
                    xi = xu[i]
                    xf = xi.view(np.float32)
                    w = weights[i]
                    if mode[i] == 1 and mode[m + i] == 0:
                        for j in range(L):
                            xf[j] = xf[j] * w
                        continue
                    _select(xi, L, mode[i], thr[i], budget, i, keep, keys[i], rhos[i], offset + s)
                    if mode[m + i] != 0:
                        _select(xi, L, mode[m + i], thr[m + i], budget, m + i, cut)
                        for j in range(L):
                            keep[j] = np.float32(keep[j] > zero and cut[j] == zero)
                    for j in range(L):
                        xf[j] = (xf[j] * keep[j]) * w
                if elect:
                    x0 = xu[0].view(np.float32)
                    for j in range(L):
                        total[j] = x0[j]
                    for i in range(1, m):
                        xf = xu[i].view(np.float32)
                        for j in range(L):
                            total[j] = total[j] + xf[j]
                    for j in range(L):
                        mixed[j] = zero
                        div[j] = zero
                    for i in range(m):
                        xf = xu[i].view(np.float32)
                        w = dweights[i]
                        for j in range(L):
                            pos = total[j] >= zero
                            agree = np.float32((pos and xf[j] > zero) or ((not pos) and xf[j] < zero))
                            mixed[j] = mixed[j] + xf[j] * agree
                            div[j] = div[j] + agree * w
                    if normalize:
                        for j in range(L):
                            d = div[j] if div[j] != zero else one
                            mixed[j] = mixed[j] / d
                else:
                    x0 = xu[0].view(np.float32)
                    for j in range(L):
                        mixed[j] = x0[j]
                    for i in range(1, m):
                        xf = xu[i].view(np.float32)
                        for j in range(L):
                            mixed[j] = mixed[j] + xf[j]
                    if normalize:
                        for j in range(L):
                            mixed[j] = mixed[j] / total_w
                if lam != one:
                    for j in range(L):
                        mixed[j] = mixed[j] * lam
                for j in range(L):
                    of[j] = bf[j] + mixed[j]
                if write_bf16:
                    for j in range(L):
                        r = ou[j]
                        nan = (r & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
                        bias = ((r >> np.uint32(16)) & np.uint32(1)) + np.uint32(0x7FFF)
                        out_u16[s + j] = np.uint16(0x7FC0) if nan else np.uint16((r + bias) >> np.uint32(16))
                else:
                    for j in range(L):
                        out_f32[s + j] = of[j]

    @njit(parallel=True, **_OPTS)
    def random_l1_stats(base, models, keys, rhos, offset, sums):
        """sums[b, i, 0] += Σ|δ_i|, sums[b, i, 1] += Σ|δ_i|·keep_i (DARE's L1 rescale), in float64."""
        nb = sums.shape[0]
        m = len(models)
        n = base.shape[0]
        for b in prange(nb):
            bs, be = _tile_range(b, nb, n)
            bu = np.empty(TILE, np.uint32)
            xu = np.empty((m, TILE), np.uint32)
            for s in range(bs, be, TILE):
                L = min(TILE, be - s)
                _deltas(base, models, s, L, bu, xu)
                for i in range(m):
                    xf = xu[i].view(np.float32)
                    full = 0.0
                    kept = 0.0
                    for j in range(L):
                        a = np.float64(abs(xf[j]))
                        full += a
                        if _uniform(keys[i], offset + s + j) < rhos[i]:
                            kept += a
                    sums[b, i, 0] += full
                    sums[b, i, 1] += kept

    @njit(parallel=True, **_OPTS)
    def radix_hist(bits, shift, prefix, hist):
        """hist[b, (bits >> shift) & 0xFFFF] += 1 where bits >> (shift + 16) == prefix (prefix < 0: all values).

        ``bits`` are float magnitudes viewed as unsigned integers (their order is the float order)."""
        nb = hist.shape[0]
        n = bits.shape[0]
        for b in prange(nb):
            s, e = b * n // nb, (b + 1) * n // nb
            if prefix < 0:
                for j in range(s, e):
                    hist[b, (bits[j] >> shift) & 0xFFFF] += 1
            else:
                for j in range(s, e):
                    v = bits[j]
                    if (v >> (shift + 16)) == prefix:
                        hist[b, (v >> shift) & 0xFFFF] += 1

    @njit(parallel=True, **_OPTS)
    def linear_apply(models, weights, norm, tw, out_u16, out_f32, write_bf16):
        """(x_0·w_0 ⊕ x_1·w_1 ⊕ …) / Σw over bf16 inputs in MergeKit's operation order (see ``_fma32``)."""
        m = len(models)
        n = models[0].shape[0]
        nb = max(1, min(64, (n + TILE - 1) // TILE))
        for b in prange(nb):
            bs, be = _tile_range(b, nb, n)
            xu = np.empty(TILE, np.uint32)
            xf = xu.view(np.float32)
            acc = np.empty(TILE, np.float32)
            accu = acc.view(np.uint32)
            for s in range(bs, be, TILE):
                L = min(TILE, be - s)
                _decode(models[0], s, L, xu)
                w = weights[0]
                for j in range(L):
                    acc[j] = xf[j] * w
                for i in range(1, m):
                    _decode(models[i], s, L, xu)
                    w = weights[i]
                    for j in range(L):
                        acc[j] = _fma32(xf[j], w, acc[j])
                if norm:
                    for j in range(L):
                        acc[j] = acc[j] / tw
                if write_bf16:
                    for j in range(L):
                        r = accu[j]
                        nan = (r & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
                        bias = ((r >> np.uint32(16)) & np.uint32(1)) + np.uint32(0x7FFF)
                        out_u16[s + j] = np.uint16(0x7FC0) if nan else np.uint16((r + bias) >> np.uint32(16))
                else:
                    for j in range(L):
                        out_f32[s + j] = acc[j]


if HAVE_NUMBA:
    from llvmlite import ir as _ir
    from numba import types as _types
    from numba.extending import intrinsic

    @intrinsic
    def _u32_as_f32(typingctx, x):
        """Reinterpret bits (no conversion): lets a single pass decode bf16, compute and round in registers."""
        def codegen(context, builder, signature, args):
            return builder.bitcast(args[0], _ir.FloatType())
        return _types.float32(_types.uint32), codegen

    @intrinsic
    def _f32_as_u32(typingctx, x):
        def codegen(context, builder, signature, args):
            return builder.bitcast(args[0], _ir.IntType(32))
        return _types.uint32(_types.float32), codegen

    @njit(inline="always")
    def _bf16_val(x):
        return _u32_as_f32(np.uint32(x) << np.uint32(16))

    @njit(inline="always")
    def _to_bf16(a):
        """float32 → bf16 bits, round to nearest even, any NaN → canonical 0x7FC0 (what torch's cast produces)."""
        r = _f32_as_u32(a)
        v = (r + (((r >> np.uint32(16)) & np.uint32(1)) + np.uint32(0x7FFF))) >> np.uint32(16)
        if (r & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000):
            v = np.uint32(0x7FC0)
        return np.uint16(v)

    @intrinsic
    def _fma32(typingctx, a, b, c):
        """a·b + c rounded once (IEEE fused multiply-add): what torch's ``addcmul_`` computes, so the linear kernels
        reproduce MergeKit's accumulation bit for bit. LLVM emits the FMA instruction where the CPU has one and
        a correctly rounded libm call where it does not."""
        def codegen(context, builder, signature, args):
            f32 = _ir.FloatType()
            fn = builder.module.declare_intrinsic("llvm.fma", [f32], fnty=_ir.FunctionType(f32, [f32, f32, f32]))
            return builder.call(fn, args)
        return _types.float32(_types.float32, _types.float32, _types.float32), codegen

    # Serial kernels, run on all cores by :func:`split_run` (threads; the kernels release the GIL). Why not prange:
    # inside numba's parallel loops these simple loops were not vectorised here (2-4x slower per core), and its
    # worker pool degrades badly when the machine is oversubscribed.
    @njit(**_OPTS)
    def _linear4_bf16(a0, a1, a2, a3, k, w0, w1, w2, w3, norm, tw, out):
        # written out, not through an inline helper taking the arrays: that form ran 2-3x slower here
        for j in range(a0.shape[0]):
            v = _bf16_val(a0[j]) * w0
            if k >= 2:
                v = _fma32(_bf16_val(a1[j]), w1, v)
            if k >= 3:
                v = _fma32(_bf16_val(a2[j]), w2, v)
            if k >= 4:
                v = _fma32(_bf16_val(a3[j]), w3, v)
            if norm:
                v = v / tw
            out[j] = _to_bf16(v)

    @njit(**_OPTS)
    def _linear4_f32(a0, a1, a2, a3, k, w0, w1, w2, w3, norm, tw, out):
        for j in range(a0.shape[0]):
            v = _bf16_val(a0[j]) * w0
            if k >= 2:
                v = _fma32(_bf16_val(a1[j]), w1, v)
            if k >= 3:
                v = _fma32(_bf16_val(a2[j]), w2, v)
            if k >= 4:
                v = _fma32(_bf16_val(a3[j]), w3, v)
            if norm:
                v = v / tw
            out[j] = v

    @njit(**_OPTS)
    def _bf16_to_f32_serial(src, out):
        ou = out.view(np.uint32)
        for j in range(src.shape[0]):
            ou[j] = np.uint32(src[j]) << np.uint32(16)

    @njit(**_OPTS)
    def _f32_to_bf16_serial(src, out):
        su = src.view(np.uint32)
        for j in range(su.shape[0]):
            r = su[j]
            v = (r + (((r >> np.uint32(16)) & np.uint32(1)) + np.uint32(0x7FFF))) >> np.uint32(16)
            m = np.uint32(0) - np.uint32((r & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000))  # all ones if NaN
            out[j] = np.uint16((v & ~m) | (np.uint32(0x7FC0) & m))

    @njit(**_OPTS)
    def _lora_rows(w16, w32, bf16_in, B, A, s, out16, out32, bf16_out):
        """Rows of ``W + s·(B @ A)`` in one pass per row: the rank-r product accumulates in a row buffer (L1), then
        base row, scale and rounding in registers. ``w16``/``out16`` are bf16 bits, ``w32``/``out32`` float32; the
        flags say which are used. Same operation order as PEFT (product, scale, add); the product's summation runs
        over r in order without FMA, so it can differ from a BLAS product in the last bit."""
        rows = B.shape[0]
        r = A.shape[0]
        cols = A.shape[1]
        acc = np.empty(cols, np.float32)
        for i in range(rows):
            b0 = B[i, 0]
            a = A[0]
            for j in range(cols):
                acc[j] = b0 * a[j]
            for k in range(1, r):
                bk = B[i, k]
                a = A[k]
                for j in range(cols):
                    acc[j] = acc[j] + bk * a[j]
            o = i * cols
            if bf16_in and bf16_out:
                for j in range(cols):
                    out16[o + j] = _to_bf16(_bf16_val(w16[o + j]) + acc[j] * s)
            elif bf16_in:
                for j in range(cols):
                    out32[o + j] = _bf16_val(w16[o + j]) + acc[j] * s
            elif bf16_out:
                for j in range(cols):
                    out16[o + j] = _to_bf16(w32[o + j] + acc[j] * s)
            else:
                for j in range(cols):
                    out32[o + j] = w32[o + j] + acc[j] * s

    @njit(**_OPTS)
    def _lora_add(w16, w32, bf16_in, d, s, out16, out32, bf16_out):
        """``out`` ← ``W + d·s`` elementwise (``d`` = the rows of B @ A): PEFT's order (product, scale, add), rounded
        once to the output dtype."""
        if bf16_in and bf16_out:
            for j in range(d.shape[0]):
                out16[j] = _to_bf16(_bf16_val(w16[j]) + d[j] * s)
        elif bf16_in:
            for j in range(d.shape[0]):
                out32[j] = _bf16_val(w16[j]) + d[j] * s
        elif bf16_out:
            for j in range(d.shape[0]):
                out16[j] = _to_bf16(w32[j] + d[j] * s)
        else:
            for j in range(d.shape[0]):
                out32[j] = w32[j] + d[j] * s

    def lora_apply(w, bf16_in: bool, B, A, s: float, out, bf16_out: bool) -> None:
        """``out`` ← rows of ``W + s·(B @ A)`` for flat base rows ``w`` (bf16 bits or float32), on all cores.

        Each kernel thread takes a run of rows and, block by block, has BLAS (numpy's sgemm, held to ONE thread per
        caller: its own pool would fight ours) compute ``B[rows] @ A`` into an L2-sized float32 buffer, then adds it
        to the base rows with scale and rounding in one numba pass. A rank-r product is r multiply-adds per element:
        BLAS keeps partial sums in registers, which the row-buffer kernel (:func:`_lora_rows`, the fallback without
        threadpoolctl) cannot; measured ~1.5-2x faster here."""
        cols = A.shape[1]
        rows = B.shape[0]
        d16 = np.empty(1, np.uint16)
        d32 = np.empty(1, np.float32)
        sf = np.float32(s)
        Bc = np.ascontiguousarray(B, dtype=np.float32)
        Ac = np.ascontiguousarray(A, dtype=np.float32)
        limit = _one_blas_thread()
        if limit is None:  # no threadpoolctl: the self-contained row kernel
            def part(r0: int, r1: int) -> None:
                sl = slice(r0 * cols, r1 * cols)
                _lora_rows(w[sl] if bf16_in else d16, d32 if bf16_in else w[sl], bf16_in, Bc[r0:r1], Ac, sf,
                           out[sl] if bf16_out else d16, d32 if bf16_out else out[sl], bf16_out)
        else:
            blk = max(1, min(rows, _LORA_BLOCK_ELEMS // max(1, cols)))

            def part(r0: int, r1: int) -> None:
                buf = np.empty(min(blk, r1 - r0) * cols, np.float32)
                for i in range(r0, r1, blk):
                    e = min(r1, i + blk)
                    d = buf[: (e - i) * cols]
                    np.matmul(Bc[i:e], Ac, out=d.reshape(e - i, cols))
                    sl = slice(i * cols, e * cols)
                    _lora_add(w[sl] if bf16_in else d16, d32 if bf16_in else w[sl], bf16_in, d, sf,
                              out[sl] if bf16_out else d16, d32 if bf16_out else out[sl], bf16_out)

        if limit is None:
            split_run(rows, part, min_items=max(1, (1 << 16) // max(1, cols)))
        else:
            with limit:
                split_run(rows, part, min_items=max(1, (1 << 16) // max(1, cols)))

    def linear_apply4(a0, a1, a2, a3, k, w, divisor, out16, out32, write_bf16):
        """Linear merge of up to four bf16 inputs (``k`` of a0..a3 used) in ONE pass: decode, weight, add and round
        in registers (the tile-based :func:`linear_apply` makes 2k+1 passes over L1 and is ~4x slower here)."""
        w0, w1, w2, w3 = (np.float32(x) for x in w[:4])
        norm = divisor is not None
        tw = np.float32(divisor if norm else 1.0)

        kern, out = (_linear4_bf16, out16) if write_bf16 else (_linear4_f32, out32)

        def part(s: int, e: int) -> None:
            kern(a0[s:e], a1[s:e], a2[s:e], a3[s:e], k, w0, w1, w2, w3, norm, tw, out[s:e])

        split_run(a0.shape[0], part)

    def bf16_to_f32(src, out):
        """bf16 bits → float32 (exact), on all cores."""
        split_run(src.shape[0], lambda s, e: _bf16_to_f32_serial(src[s:e], out[s:e]))

    def f32_to_bf16(src, out):
        """float32 → bf16 bits, round to nearest even, any NaN → 0x7FC0 (torch's cast), on all cores."""
        split_run(src.shape[0], lambda s, e: _f32_to_bf16_serial(src[s:e], out[s:e]))


_SPLIT_POOL = None
_LORA_BLOCK_ELEMS = 1 << 17  # float32 elements of B @ A per block (512 KB: stays in L2 until the add pass reads it)
_BLAS = None


def _one_blas_thread():
    """A context manager holding numpy's BLAS to one thread (threadpoolctl, its controller built once), or None
    when threadpoolctl is missing."""
    global _BLAS
    if _BLAS is None:
        try:
            from threadpoolctl import ThreadpoolController

            _BLAS = ThreadpoolController()
        except Exception:  # noqa: BLE001 - optional speed-up only
            _BLAS = False
    return _BLAS.limit(limits=1, user_api="blas") if _BLAS else None
_SPLIT_MIN = 1 << 16  # elements: below this one thread is faster than handing work over


def split_run(n: int, fn, min_items: int = _SPLIT_MIN) -> None:
    """``fn(start, end)`` over contiguous parts of ``range(n)``, one per core, in threads (elementwise kernels give
    the same result however they are split)."""
    global _SPLIT_POOL
    from concurrent.futures import ThreadPoolExecutor

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    k = max(1, min(cores, n // max(1, min_items)))
    if k == 1:
        fn(0, n)
        return
    if _SPLIT_POOL is None:
        _SPLIT_POOL = ThreadPoolExecutor(max_workers=max(1, cores - 1), thread_name_prefix="mergeline-kernel")
    bounds = [n * i // k for i in range(k + 1)]
    futures = [_SPLIT_POOL.submit(fn, bounds[i], bounds[i + 1]) for i in range(1, k)]
    fn(bounds[0], bounds[1])
    for f in futures:
        f.result()


class FusedTaskVector:
    """Streams a bf16 task-vector merge (no sparsification, magnitude top-k, or breadcrumbs' band) through the
    kernels above.

    Same protocol as a method's stats/apply, but on raw uint16 arrays: two histogram passes over every chunk (when
    any selector needs a threshold), then one apply pass. Each model has an "upper" selector (keep its top k_hi
    entries) and optionally a "lower" one (drop its top k_lo again); thresholds come from
    :class:`merge_ops.topk.TopKSelector` fed with the kernel histograms, so both paths select exactly the same
    elements.
    """

    def __init__(self, numel: int, ks: list[int], weights: list[float], elect: bool, normalize: bool, lam: float,
                 ks_lo: list[int] | None = None, random: tuple[list[int], list[float], str | None] | None = None):
        import torch

        from .topk import TopKSelector

        self.numel = numel
        self.m = len(ks)
        ks_all = list(ks) + list(ks_lo if ks_lo is not None else [0] * self.m)
        self.selectors = [TopKSelector(numel, k, torch.float32) for k in ks_all]
        self.mode = np.array([MODE_NONE if k <= 0 else MODE_ALL if k >= numel else MODE_THRESHOLD for k in ks_all],
                             dtype=np.int8)
        self.weights = np.array(weights, dtype=np.float32)
        self.div_weights = self.weights.copy()  # TIES divisor Σ m_i w_i uses the weights before any rescale
        self.elect, self.normalize = bool(elect), bool(normalize)
        self.total_w = float32_sum(weights)
        self.lam = np.float32(lam)
        self.passes = 2 if (self.mode == MODE_THRESHOLD).any() else 0
        self.thr = np.zeros(2 * self.m, dtype=np.uint32)
        self.remaining = np.zeros(2 * self.m, dtype=np.int64)
        self.keys = np.zeros(self.m, dtype=np.uint64)
        self.rhos = np.ones(self.m, dtype=np.float32)
        self.rescale: str | None = None
        self.base_weights = list(weights)
        self.offset = 0  # flat index of the current chunk's first element (random masks are per element)
        self.sums = np.zeros((self.m, 2), dtype=np.float64)
        if random is not None:  # DARE: Bernoulli(ρ) masks, optional L1 rescale (one statistics pass)
            keys, rhos, self.rescale = random
            for i, (key, rho) in enumerate(zip(keys, rhos)):
                if rho < 1.0:
                    self.mode[i] = MODE_RANDOM
                    self.keys[i] = np.uint64(key)
                    self.rhos[i] = np.float32(rho)
            self.passes = 1 if self.rescale == "l1" and (self.mode[: self.m] == MODE_RANDOM).any() else 0
            if self.rescale == "inverse_density":
                self.weights = np.array([w * (1.0 / r if r > 0 else 1.0) if md == MODE_RANDOM else w
                                         for w, r, md in zip(weights, rhos, self.mode[: self.m])], dtype=np.float32)

    def _hist_blocks(self, n: int) -> int:
        return max(1, min(8, (n + TILE - 1) // TILE))

    def accumulate(self, base: np.ndarray, models: np.ndarray, pass_index: int) -> None:
        import torch

        nb = self._hist_blocks(base.shape[0])
        if self.rescale is not None:
            sums = np.zeros((nb, self.m, 2), dtype=np.float64)
            random_l1_stats(base, models, self.keys, self.rhos, np.int64(self.offset), sums)
            self.sums += sums.sum(0)
            self.offset += base.shape[0]
            return
        active = self.mode == MODE_THRESHOLD
        if pass_index == 0:
            per_model = active[: self.m] | active[self.m:]
            hist = np.zeros((nb, self.m, 32768), dtype=np.int32)
            hist_level0(base, models, per_model, hist)
            total = hist.sum(0, dtype=np.int64)
            for k, sel in enumerate(self.selectors):
                if active[k]:
                    h = np.zeros(65536, dtype=np.int64)
                    h[:32768] = total[k % self.m]
                    sel.hist = torch.from_numpy(h) if sel.hist is None else sel.hist + torch.from_numpy(h)
        else:
            prefix = np.array([sel.prefix if active[k] else -1 for k, sel in enumerate(self.selectors)],
                              dtype=np.int64)
            hist = np.zeros((nb, 2 * self.m, 65536), dtype=np.int32)
            hist_level1(base, models, prefix, hist)
            total = hist.sum(0, dtype=np.int64)
            for k, sel in enumerate(self.selectors):
                if active[k]:
                    h = torch.from_numpy(total[k].copy())
                    sel.hist = h if sel.hist is None else sel.hist + h

    def finish_pass(self, pass_index: int) -> None:
        if self.rescale == "l1":
            w = []
            for i, bw in enumerate(self.base_weights):
                full, kept = self.sums[i]
                scale = 1.0 if (self.mode[i] != MODE_RANDOM or full < 1e-7 or kept < 1e-7) else full / kept
                w.append(bw * scale)
            self.weights = np.array(w, dtype=np.float32)
            self.offset = 0
            return
        for k, sel in enumerate(self.selectors):
            if self.mode[k] == MODE_THRESHOLD:
                sel.finish_pass()
                if pass_index == 1:
                    self.thr[k] = np.uint32(sel.prefix)
                    self.remaining[k] = sel.keep_equal

    def apply(self, base: np.ndarray, models: np.ndarray, out_u16: np.ndarray | None,
              out_f32: np.ndarray | None) -> None:
        n = base.shape[0]
        nb = nblocks_for(n)
        budget = np.zeros((nb, 2 * self.m), dtype=np.int64)
        if (self.remaining > 0).any():
            counts = np.zeros((nb, 2 * self.m), dtype=np.int64)
            mode = np.where(self.remaining > 0, self.mode, MODE_ALL).astype(np.int8)
            count_equal(base, models, mode, self.thr, counts)
            for k in range(2 * self.m):
                left = self.remaining[k]
                for b in range(nb):
                    take = min(left, counts[b, k])
                    budget[b, k] = take
                    left -= take
                self.remaining[k] = left
        write_bf16 = out_u16 is not None
        dummy16 = out_u16 if write_bf16 else np.empty(1, dtype=np.uint16)
        dummy32 = out_f32 if not write_bf16 else np.empty(1, dtype=np.float32)
        task_vector_apply(base, models, self.mode, self.thr, budget, self.weights, self.elect, self.normalize,
                          self.total_w, self.lam, dummy16, dummy32, write_bf16, self.keys, self.rhos,
                          np.int64(self.offset), self.div_weights)
        self.offset += n


def float32_sum(values) -> np.float32:
    """Σ values in float32, added in order: the divisor MergeKit gets from ``weights.sum()`` of a float32 tensor."""
    total = np.float32(0.0)
    for v in values:
        total = np.float32(total + np.float32(v))
    return total


class FusedLinear:
    """Linear merge of bf16 inputs in one pass (no statistics)."""

    passes = 0

    def __init__(self, weights: list[float], normalize: bool):
        self.weights = np.array(weights, dtype=np.float32)
        self.divisor = float32_sum(self.weights) if normalize else None

    def accumulate(self, base, models, pass_index):  # pragma: no cover - no passes
        raise RuntimeError("internal: linear has no statistics pass")

    def finish_pass(self, pass_index: int) -> None:  # pragma: no cover
        pass

    def apply(self, base, models, out_u16, out_f32) -> None:
        write_bf16 = out_u16 is not None
        d16 = out_u16 if write_bf16 else np.empty(1, dtype=np.uint16)
        d32 = out_f32 if not write_bf16 else np.empty(1, dtype=np.float32)
        m = len(models)
        if m > 4:  # rare: the general tile kernel
            norm = self.divisor is not None
            linear_apply(models, self.weights, norm, np.float32(self.divisor if norm else 1.0), d16, d32, write_bf16)
            return
        w = np.zeros(4, dtype=np.float32)
        w[:m] = self.weights
        a = list(models) + [models[0]] * (4 - m)
        linear_apply4(a[0], a[1], a[2], a[3], m, w, self.divisor, d16, d32, write_bf16)


def warm_up_hiding_scipy() -> None:
    """Load numba's compiler registries (the first jitted call does this) with ``scipy.linalg`` hidden.

    Why: on its first compile or cache load numba imports ``numba.np.arraymath``, which imports all of
    ``scipy.linalg`` (0.36 s here) only to learn whether ``np.dot`` inside jitted code may call BLAS. None of
    mergeline's kernels does (the LoRA product runs in numpy's BLAS, outside numba), so a short-lived CLI process skips
    that import; the finder is removed again before this returns, so scipy stays importable. Library callers (the
    Dagster assets, long-lived processes) do not call this and keep numba's defaults."""
    import importlib.abc
    import sys

    if not HAVE_NUMBA or "numba.np.arraymath" in sys.modules or "scipy.linalg" in sys.modules:
        return

    class _HideScipyLinalg(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "scipy.linalg" or name.startswith("scipy.linalg."):
                raise ImportError(f"{name} hidden while numba loads its registries")
            return None

    finder = _HideScipyLinalg()
    sys.meta_path.insert(0, finder)
    try:
        src = np.zeros(16, dtype=np.uint16)
        bf16_to_f32(src, np.empty(16, dtype=np.float32))
    finally:
        sys.meta_path.remove(finder)
