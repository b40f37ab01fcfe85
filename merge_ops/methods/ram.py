"""``ram`` / ``ramplus_tl``: Reinforced Agent Merging (arXiv:2601.13572), MergeKit 0.1.5 semantics.

Per element, a task vector δ_i = θ_i − θ_b "contributes" when |δ_i| > ε. Elements where exactly one model contributes
take that model's δ unchanged; elements where several contribute take their mean (over the contributors only);
elements where none does keep the base. ``ramplus_tl`` (tensor-local RAM+) scales each model's unique contributions
by λ_i = 1 + r·clamp(ρ_i, 0, α), ρ_i = (its shared contributions) / max(its unique contributions, ε), counted over
the whole tensor (one statistics pass).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..lazy_torch import torch
from .base import Chunk, MergeMethod, ParamSpec, TensorTask, register

EPSILON = ParamSpec("epsilon", 1e-5, lo=0.0, scope="global", doc="|δ| above which a model contributes")


def contributions(chunk: Chunk, eps: float) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    """Task vectors, their contribution masks and the number of contributors per element."""
    deltas = [m - chunk.base for m in chunk.models]
    nonzero = [d.abs() > eps for d in deltas]
    count = torch.stack(nonzero).sum(0)
    return deltas, nonzero, count


def ram_combine(deltas, nonzero, count, scales: list[torch.Tensor | None]) -> torch.Tensor:
    """Σ_i [δ_i·nz_i·unique·λ_i + δ_i·nz_i·overlap / max(count, 1)] in MergeKit's order of operations."""
    unique = count == 1
    overlap = count > 1
    divisor = count.clamp(min=1)
    out = None
    for d, nz, lam in zip(deltas, nonzero, scales):
        dz = d * nz
        u = dz * unique
        if lam is not None:
            u = u * lam
        term = u + dz * overlap / divisor
        out = term if out is None else out + term
    return out


@register
class Ram(MergeMethod):
    name = "ram"
    base = "required"
    min_models = 1
    doc = "Keep unique task-vector entries, average the overlapping ones (RAM)."
    params = (EPSILON,)

    def apply(self, task: TensorTask, chunk: Chunk, stats) -> torch.Tensor:
        deltas, nonzero, count = contributions(chunk, task.params["epsilon"])
        return chunk.base + ram_combine(deltas, nonzero, count, [None] * len(deltas))


@dataclass
class _Counts:
    shared: list[int] = field(default_factory=list)
    unique: list[int] = field(default_factory=list)
    scales: list[torch.Tensor] = field(default_factory=list)


@register
class RamPlusTL(MergeMethod):
    name = "ramplus_tl"
    base = "required"
    min_models = 1
    doc = "RAM with each model's unique entries scaled up by its shared/unique ratio (RAM+, tensor-local)."
    params = (
        ParamSpec("r", 0.1, lo=0.0, scope="global", doc="rescale strength"),
        ParamSpec("alpha", 0.2, lo=0.0, scope="global", doc="cap on the shared/unique ratio"),
        EPSILON,
    )

    def stats_passes(self, task: TensorTask, stats) -> int:
        return 1

    def init_stats(self, task: TensorTask) -> _Counts:
        n = len(task.model_params)
        return _Counts(shared=[0] * n, unique=[0] * n)

    def accumulate(self, task: TensorTask, chunk: Chunk, stats: _Counts, pass_index: int) -> None:
        _, nonzero, count = contributions(chunk, task.params["epsilon"])
        for i, nz in enumerate(nonzero):
            stats.shared[i] += int((nz & (count > 1)).sum())
            stats.unique[i] += int((nz & (count == 1)).sum())

    def finish_pass(self, task: TensorTask, stats: _Counts, pass_index: int) -> None:
        # float32 scalar arithmetic like MergeKit's (count tensors clamped by a float → float32)
        p = task.params
        shared = torch.tensor(stats.shared, dtype=torch.int64)
        unique = torch.tensor(stats.unique, dtype=torch.int64)
        rho = shared / unique.clamp(min=p["epsilon"])
        lam = 1 + p["r"] * rho.clamp(min=0, max=p["alpha"])
        stats.scales = [lam[i] for i in range(len(stats.shared))]

    def apply(self, task: TensorTask, chunk: Chunk, stats: _Counts) -> torch.Tensor:
        deltas, nonzero, count = contributions(chunk, task.params["epsilon"])
        scales = [s.to(chunk.base.device) for s in stats.scales]
        return chunk.base + ram_combine(deltas, nonzero, count, scales)
