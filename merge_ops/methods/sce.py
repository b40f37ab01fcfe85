"""``sce``: Select, Calculate, Erase (Wan et al., FuseChat 2, arXiv:2408.07990), MergeKit 0.1.5 semantics.

1. Select: with ``select_topk`` = ρ < 1, keep only the elements where the task vectors vary most across models: the
   k = int(ρ · #{var ≠ 0}) largest per-element variances (population variance over the models); ties at the k-th
   value are broken by lowest flat index (the engine's top-k rule), MergeKit leaves them to ``torch.topk``.
2. Calculate: each model's weight is the mean of its squared (selected) task vector, normalized to sum 1 (uniform when
   those means sum to < 1e-6).
3. Erase: TIES sign election on the sum of the selected task vectors; the agreeing entries are averaged with the
   weights, dividing by max(Σ agreeing weights, 1e-6).

Streamed: one pass counts the non-zero variances (k depends on it), the top-k selection passes of
:mod:`merge_ops.topk`, one pass for the squared means; the final combine is elementwise.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..lazy_torch import torch
from ..topk import SMALL, TopKSelector
from .base import Chunk, MergeMethod, ParamSpec, TensorTask, register
from .task_vectors import INT8_MASK

WEIGHT_SUM_EPS = 1e-6
DIVISOR_MIN = 1e-6


def task_variance(deltas: list[torch.Tensor]) -> torch.Tensor:
    """Per-element population variance of the task vectors across models."""
    return torch.var(torch.stack(deltas), dim=0, unbiased=False)


def sce_weights(sumsq: list[float], numel: int) -> list[float]:
    means = [s / numel for s in sumsq]
    total = sum(means)
    if abs(total) < WEIGHT_SUM_EPS:
        return [1.0 / len(means)] * len(means)
    return [m / total for m in means]


def erase_combine(deltas: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """Σ m_i w_i δ_i / max(Σ m_i w_i, 1e-6) with m_i = [sign δ_i == elected sign] (sign of Σ δ_i, 0 counts as +)."""
    positive = deltas[0].clone()
    for d in deltas[1:]:
        positive.add_(d)
    positive = positive >= 0
    merged = torch.zeros_like(deltas[0])
    divisor = torch.zeros_like(deltas[0])
    for d, w in zip(deltas, weights):
        agree = torch.where(positive, d > 0, d < 0).to(d.dtype)
        ew = agree * w
        merged.add_(d * ew)
        divisor.add_(ew)
    return merged / divisor.clamp(min=DIVISOR_MIN)


@dataclass
class _Stats:
    select: bool
    sel_passes: int
    nonzero: int = 0
    selector: TopKSelector | None = None
    sumsq: list[float] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    cached_mask: torch.Tensor | None = None
    keep_equal: int = 0  # the selector's tie budget, restored before apply() walks the chunks again


@register
class Sce(MergeMethod):
    name = "sce"
    base = "required"
    min_models = 1
    doc = "Variance-based top-k selection, energy weights, TIES-style sign erase."
    params = (
        ParamSpec("select_topk", 1.0, lo=0.0, hi=1.0, scope="global",
                  doc="fraction of the elements with non-zero variance kept (by variance)"),
        INT8_MASK,
    )

    def init_stats(self, task: TensorTask) -> _Stats:
        select = task.params["select_topk"] < 1.0
        levels = 2 if task.compute_dtype_name == "float32" else 4
        sel_passes = (1 if task.numel <= SMALL else levels) if select else 0
        return _Stats(select=select, sel_passes=sel_passes, sumsq=[0.0] * len(task.model_params))

    def stats_passes(self, task: TensorTask, stats: _Stats) -> int:
        # [count non-zero variances] + [top-k passes] + squared means
        return (1 + stats.sel_passes if stats.select else 0) + 1

    def _mask(self, task: TensorTask, stats: _Stats, deltas: list[torch.Tensor]) -> torch.Tensor | None:
        if not stats.select:
            return None
        if stats.cached_mask is not None:
            return stats.cached_mask
        return stats.selector.mask(task_variance(deltas).abs())

    def accumulate(self, task: TensorTask, chunk: Chunk, stats: _Stats, pass_index: int) -> None:
        deltas = [m - chunk.base for m in chunk.models]
        weight_pass = self.stats_passes(task, stats) - 1
        if pass_index < weight_pass:
            var = task_variance(deltas)
            if pass_index == 0:
                stats.nonzero += int(torch.count_nonzero(var))
            elif pass_index - 1 < stats.selector.passes:
                stats.selector.accumulate(var.abs())
            return
        mask = self._mask(task, stats, deltas)
        if mask is not None and chunk.last and chunk.index == 0:
            stats.cached_mask = mask  # single-chunk tensor: apply() sees the same chunk again
        for i, d in enumerate(deltas):
            kept = d * mask if mask is not None else d
            stats.sumsq[i] += float(kept.double().square().sum())

    def finish_pass(self, task: TensorTask, stats: _Stats, pass_index: int) -> None:
        weight_pass = self.stats_passes(task, stats) - 1
        if pass_index == weight_pass:
            stats.weights = sce_weights(stats.sumsq, max(1, task.numel))
            if stats.selector is not None:
                stats.selector.keep_equal = stats.keep_equal
        elif pass_index == 0:
            k = int(stats.nonzero * task.params["select_topk"])
            stats.selector = TopKSelector(task.numel, k, task.compute_dtype)
        elif pass_index - 1 < stats.selector.passes:
            stats.selector.finish_pass()
            stats.keep_equal = stats.selector.keep_equal

    def apply(self, task: TensorTask, chunk: Chunk, stats: _Stats) -> torch.Tensor:
        deltas = [m - chunk.base for m in chunk.models]
        if stats.select:
            mask = stats.cached_mask if stats.cached_mask is not None else \
                stats.selector.mask(task_variance(deltas).abs())
            deltas = [d * mask for d in deltas]
        return chunk.base + erase_combine(deltas, stats.weights)
