"""``arcee_fusion``: take the other model's value only where it matters most (MergeKit's Arcee Fusion).

Importance of each element: |θ_1 − θ_b| times the KL divergence, per row (softmax over the last dimension, + 1e-8),
between the two models' rows. Elements whose importance reaches median + 1.5·(Q3 − Q1) of the tensor's importances
are taken from the other model, the rest from the base: θ_b + (θ_1 − θ_b)·mask.

Quantiles are exact order statistics at index int(q·(n−1)) of the sorted importances. **(differs)** MergeKit estimates
them from 1 M random samples (with replacement) when a tensor has more than 1 M elements, so its result for large
tensors (embeddings, big projections) is random; here it is exact and deterministic. Streamed: importance is
row-local; the three order statistics come from the exact radix selection of :mod:`merge_ops.topk`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..lazy_torch import torch
from ..topk import SMALL, TopKSelector
from .base import Chunk, MergeMethod, TensorTask, register

KL_EPS = 1e-8
QUANTILES = (0.25, 0.5, 0.75)


def importance(params: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """|θ_1 − θ_b| · KL(softmax θ_1 ‖ softmax θ_b) per row (last dimension), clamped at +0 (the KL of the
    eps-shifted distributions can round a hair below zero; the order statistics need non-negative values)."""
    diff = (params - base).abs()
    p = torch.softmax(params, dim=-1) + KL_EPS
    q = torch.softmax(base, dim=-1) + KL_EPS
    kl = torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)
    imp = diff * kl
    return torch.where(imp > 0, imp, torch.zeros_like(imp))


def quantile_indices(n: int) -> list[int]:
    """int(q·(n−1)) computed in float32 like MergeKit."""
    q = torch.tensor(QUANTILES, dtype=torch.float32)
    return [int(i) for i in (q * (n - 1)).long()]


def fusion_threshold(q1: float, median: float, q3: float, dtype: torch.dtype) -> float:
    """median + 1.5·(Q3 − Q1), rounded step by step in the compute dtype."""
    t = torch.tensor([q1, median, q3], dtype=dtype)
    return float(t[1] + 1.5 * (t[2] - t[0]))


@dataclass
class _Stats:
    small: bool
    collected: list = field(default_factory=list)
    selectors: list[TopKSelector] = field(default_factory=list)
    threshold: float = 0.0


@register
class ArceeFusion(MergeMethod):
    name = "arcee_fusion"
    base = "required"
    min_models = 1
    max_models = 1
    doc = "Take the other model's values where their KL-weighted change is an outlier (median + 1.5 IQR)."
    params = ()

    def init_stats(self, task: TensorTask) -> _Stats:
        n = task.numel
        st = _Stats(small=n <= SMALL)
        if not st.small:
            st.selectors = [TopKSelector(n, n - j, task.compute_dtype) for j in quantile_indices(n)]
        return st

    def stats_passes(self, task: TensorTask, stats: _Stats) -> int:
        return 1 if stats.small else max(s.passes for s in stats.selectors)

    def accumulate(self, task: TensorTask, chunk: Chunk, stats: _Stats, pass_index: int) -> None:
        imp = importance(chunk.models[0], chunk.base)
        if stats.small:
            stats.collected.append(imp.reshape(-1).cpu())
            return
        for sel in stats.selectors:
            if pass_index < sel.passes:
                sel.accumulate(imp)

    def finish_pass(self, task: TensorTask, stats: _Stats, pass_index: int) -> None:
        if stats.small:
            values = torch.sort(torch.cat(stats.collected)).values
            stats.collected = []
            q1, med, q3 = (float(values[j]) for j in quantile_indices(values.numel()))
        else:
            for sel in stats.selectors:
                if pass_index < sel.passes:
                    sel.finish_pass()
            if pass_index < max(s.passes for s in stats.selectors) - 1:
                return
            q1, med, q3 = (sel.threshold for sel in stats.selectors)
        stats.threshold = fusion_threshold(q1, med, q3, task.compute_dtype)

    def apply(self, task: TensorTask, chunk: Chunk, stats: _Stats) -> torch.Tensor:
        base, other = chunk.base, chunk.models[0]
        mask = (importance(other, base) >= stats.threshold).to(base.dtype)
        return base + (other - base) * mask
