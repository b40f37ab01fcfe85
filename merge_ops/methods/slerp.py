"""``slerp``: spherical linear interpolation between the base (t = 0) and one other model, per whole tensor."""

from __future__ import annotations

from dataclasses import dataclass

from ..lazy_torch import torch

from .base import Chunk, MergeMethod, ParamSpec, TensorTask, register
from .slerp_math import slerp_coefficients


@dataclass
class _Stats:
    dot: float = 0.0
    sq0: float = 0.0
    sq1: float = 0.0
    c0: float = 1.0
    c1: float = 0.0


@register
class Slerp(MergeMethod):
    name = "slerp"
    base = "required"
    min_models = 1
    max_models = 1
    doc = "SLERP from base_model (t=0) to the other model (t=1)."
    params = (ParamSpec("t", required=True, lo=0.0, hi=1.0, scope="global", doc="interpolation factor"),)

    def stats_passes(self, task: TensorTask, stats) -> int:
        return 1

    def init_stats(self, task: TensorTask) -> _Stats:
        return _Stats()

    def accumulate(self, task: TensorTask, chunk: Chunk, stats: _Stats, pass_index: int) -> None:
        v0 = chunk.base.reshape(-1).double()
        v1 = chunk.models[0].reshape(-1).double()
        stats.dot += float(torch.dot(v0, v1))
        stats.sq0 += float(torch.dot(v0, v0))
        stats.sq1 += float(torch.dot(v1, v1))

    def finish_pass(self, task: TensorTask, stats: _Stats, pass_index: int) -> None:
        stats.c0, stats.c1 = slerp_coefficients(task.params["t"], stats.dot, stats.sq0 ** 0.5, stats.sq1 ** 0.5)

    def apply(self, task: TensorTask, chunk: Chunk, stats: _Stats) -> torch.Tensor:
        out = chunk.base * stats.c0
        out.add_(chunk.models[0], alpha=stats.c1)
        return out
