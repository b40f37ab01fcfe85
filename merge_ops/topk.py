"""Exact streamed top-k selection by magnitude (radix select), used by TIES, breadcrumbs and friends.

Why not ``torch.topk``/``kthvalue``: they need the whole tensor in memory and run at ~40–190 M elements/s on two
cores. A non-negative IEEE float orders like its bit pattern read as an integer, so the k-th largest value can be
found digit by digit (16 bits at a time) from histograms (``bincount`` ≈ 400 M/s), one pass per digit over row
chunks, holding only a 65 536-bin histogram. fp32 needs 2 passes, fp64 4.

Tie rule (documented contract): exactly k elements are kept. All values strictly above the threshold are kept; of
the values equal to it, the ones with the lowest flat index (row-major order) are kept first. bf16 deltas tie often,
so this matters.
"""

from __future__ import annotations

import numpy as np
from .lazy_torch import torch

_BINS = 1 << 16
SMALL = 1 << 18  # up to this many values, collect them and select with one sort (histograms cost more)


class TopKSelector:
    """Select the ``k`` largest of ``numel`` non-negative values streamed in row order.

    Usage: for each of :attr:`passes` passes, call :meth:`accumulate` on every chunk in order, then
    :meth:`finish_pass`; afterwards call :meth:`mask` on every chunk in order to get the keep mask.
    """

    def __init__(self, numel: int, k: int, dtype: torch.dtype):
        self.numel = numel
        self.k = max(0, min(int(k), numel))
        if dtype == torch.float32:
            self.bits, self.int_dtype = 32, torch.int32
        elif dtype == torch.float64:
            self.bits, self.int_dtype = 64, torch.int64
        else:
            raise ValueError(f"top-k selection works on float32/float64 magnitudes, got {dtype}")
        self.levels = self.bits // 16
        self.level = 0
        self.prefix = 0
        self.above = 0  # elements known to be strictly above the current prefix bucket
        self.hist: torch.Tensor | None = None
        self.threshold: float | None = None
        self.keep_equal = 0  # how many values equal to the threshold are still to be kept (in row order)
        self.trivial = self.k == 0 or self.k == numel
        self.small = numel <= SMALL
        self._collected: list[torch.Tensor] = []

    @property
    def passes(self) -> int:
        if self.trivial:
            return 0
        return 1 if self.small else self.levels

    def accumulate(self, values: torch.Tensor) -> None:
        if self.small:
            self._collected.append(values.reshape(-1))
            return
        shift = self.bits - 16 * (self.level + 1)
        if values.device.type == "cpu" and _numba_hist(values, shift, self):
            return
        ints = values.reshape(-1).view(self.int_dtype)
        if self.level == 0:
            digits = ints >> shift
        else:
            sel = ints[(ints >> (shift + 16)) == self.prefix]
            digits = (sel >> shift) & 0xFFFF
        h = torch.bincount(digits, minlength=_BINS)
        h = h.cpu()
        self.hist = h if self.hist is None else self.hist + h

    def finish_pass(self) -> None:
        if self.small:
            values = torch.cat(self._collected) if len(self._collected) > 1 else self._collected[0]
            self._collected = []
            kth = torch.kthvalue(values.cpu(), values.numel() - self.k + 1).values  # k-th largest
            self.threshold = float(kth)
            self.above = int(torch.count_nonzero(values > self.threshold))
            self.keep_equal = self.k - self.above
            self.level = self.levels
            return
        hist = (self.hist if self.hist is not None else torch.zeros(_BINS, dtype=torch.int64)).numpy()
        need = self.k - self.above
        # suffix[d] = number of elements in this bucket whose digit is >= d
        suffix = np.cumsum(hist[::-1])[::-1]
        # largest d with suffix[d] >= need
        ok = np.flatnonzero(suffix >= need)
        d = int(ok[-1]) if len(ok) else 0
        self.above += int(suffix[d + 1]) if d + 1 < _BINS else 0
        self.prefix = (self.prefix << 16) | d
        self.level += 1
        self.hist = None
        if self.level == self.levels:
            t = torch.tensor([self.prefix], dtype=torch.int64).to(self.int_dtype)
            self.threshold = float(t.view(torch.float32 if self.bits == 32 else torch.float64)[0])
            self.keep_equal = self.k - self.above

    def mask(self, values: torch.Tensor) -> torch.Tensor:
        """Keep mask for the next chunk (chunks must come in row order, each exactly once)."""
        if self.trivial:
            return torch.full(values.shape, self.k == self.numel, dtype=torch.bool, device=values.device)
        if self.threshold is None:
            raise RuntimeError("internal: TopKSelector.mask called before all passes finished")
        keep = values > self.threshold
        if self.keep_equal <= 0:
            return keep
        eq = values == self.threshold
        n_eq = int(torch.count_nonzero(eq))
        if n_eq <= self.keep_equal:
            self.keep_equal -= n_eq
            return keep | eq
        flat_eq = eq.reshape(-1)
        idx = torch.nonzero(flat_eq).flatten()[: self.keep_equal]
        self.keep_equal = 0
        keep = keep.reshape(-1)
        keep[idx] = True
        return keep.reshape(values.shape)


def _numba_hist(values: torch.Tensor, shift: int, sel: TopKSelector) -> bool:
    """Histogram pass with the numba kernel (several times faster than shift/compare/index/bincount in torch)."""
    from . import kernels

    if not kernels.HAVE_NUMBA or values.numel() < 65536:
        return False
    flat = values.reshape(-1).contiguous()
    bits = flat.view(sel.int_dtype).numpy().view(np.uint32 if sel.bits == 32 else np.uint64)
    nb = max(1, min(16, flat.numel() // 262144))
    hist = np.zeros((nb, _BINS), dtype=np.int64)
    prefix = -1 if sel.level == 0 else sel.prefix
    kernels.radix_hist(bits, np.uint64(shift) if sel.bits == 64 else np.uint32(shift),
                       np.int64(prefix), hist)
    h = torch.from_numpy(hist.sum(0))
    sel.hist = h if sel.hist is None else sel.hist + h
    return True
