"""``model_stock``: interpolate between the average of the fine-tunes and the base by a factor derived from the angle
between their task vectors (Jang et al., "Model Stock"): t = N·c / (1 + (N−1)·c), c = mean pairwise cosine."""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import combinations

from ..lazy_torch import torch

from .base import Chunk, MergeMethod, ParamSpec, TensorTask, register

EPS = 1e-8


def stock_ratio(n: int, cos: torch.Tensor | float):
    denom = 1 + (n - 1) * cos
    if isinstance(denom, torch.Tensor):
        safe = torch.where(denom.abs() < EPS, torch.ones_like(denom), denom)
        return torch.where(denom.abs() < EPS, torch.zeros_like(denom), n * cos / safe)
    return 0.0 if abs(denom) < EPS else n * cos / denom


@dataclass
class _Stats:
    dots: dict = field(default_factory=dict)
    sq: dict = field(default_factory=dict)
    t: float = 0.0


@register
class ModelStock(MergeMethod):
    name = "model_stock"
    base = "required"
    min_models = 2
    doc = "Average of N ≥ 2 fine-tunes pulled towards the base by the geometry of their task vectors."
    params = (ParamSpec("filter_wise", False, kind="bool", scope="global", doc="compute the ratio per row"),)

    def stats_passes(self, task: TensorTask, stats) -> int:
        return 0 if task.params["filter_wise"] and len(task.shape) >= 2 else 1

    def init_stats(self, task: TensorTask) -> _Stats:
        return _Stats()

    def accumulate(self, task: TensorTask, chunk: Chunk, stats: _Stats, pass_index: int) -> None:
        d = [(m - chunk.base).reshape(-1).double() for m in chunk.models]
        for i in range(len(d)):
            stats.sq[i] = stats.sq.get(i, 0.0) + float(torch.dot(d[i], d[i]))
        for i, j in combinations(range(len(d)), 2):
            stats.dots[i, j] = stats.dots.get((i, j), 0.0) + float(torch.dot(d[i], d[j]))

    def finish_pass(self, task: TensorTask, stats: _Stats, pass_index: int) -> None:
        n = len(task.model_params)
        coss = []
        for (i, j), dot in stats.dots.items():
            ni, nj = stats.sq[i] ** 0.5, stats.sq[j] ** 0.5
            coss.append(0.0 if ni <= EPS or nj <= EPS else dot / (ni * nj))
        stats.t = stock_ratio(n, sum(coss) / len(coss))

    def apply(self, task: TensorTask, chunk: Chunk, stats: _Stats | None) -> torch.Tensor:
        n = len(chunk.models)
        mean = chunk.models[0].clone()
        for m in chunk.models[1:]:
            mean.add_(m)
        mean.div_(n)
        if task.params["filter_wise"] and len(task.shape) >= 2:
            rows = chunk.base.shape[0]
            d = [(m - chunk.base).reshape(rows, -1).double() for m in chunk.models]
            norms = [x.norm(dim=1) for x in d]
            coss = []
            for i, j in combinations(range(n), 2):
                denom = norms[i] * norms[j]
                ok = (norms[i] > EPS) & (norms[j] > EPS)
                coss.append(torch.where(ok, (d[i] * d[j]).sum(1) / torch.where(ok, denom, torch.ones_like(denom)),
                                        torch.zeros_like(denom)))
            cos = torch.stack(coss).mean(0)
            t = stock_ratio(n, cos).to(mean.dtype).reshape((rows,) + (1,) * (mean.dim() - 1))
        else:
            t = stats.t
        return t * mean + (1 - t) * chunk.base
