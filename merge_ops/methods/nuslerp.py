"""``nuslerp``: SLERP of two models weighted by their ``weight``s (t = w2 / (w1 + w2)); with a base model the two
task vectors are interpolated and added back to the base. ``nuslerp_flatten`` (default) treats each tensor as one
vector; otherwise each row is interpolated separately (or each column with ``nuslerp_row_wise: true``, MergeKit's
naming)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..lazy_torch import torch

from .base import Chunk, MergeMethod, ParamSpec, TensorTask, register
from .slerp_math import slerp_coefficients, slerp_rows


@dataclass
class _Stats:
    dot: torch.Tensor | float = 0.0
    sq0: torch.Tensor | float = 0.0
    sq1: torch.Tensor | float = 0.0
    coeffs: tuple = field(default_factory=tuple)


@register
class NuSlerp(MergeMethod):
    name = "nuslerp"
    base = "optional"
    min_models = 2
    max_models = 2
    doc = "Weighted SLERP of two models (or of their task vectors when a base is given)."
    params = (
        ParamSpec("weight", required=True, doc="per-model weight; t = w2 / (w1 + w2)"),
        ParamSpec("nuslerp_flatten", True, kind="bool", scope="global"),
        ParamSpec("nuslerp_row_wise", False, kind="bool", scope="global"),
    )

    @staticmethod
    def _t(task: TensorTask) -> float:
        w1, w2 = task.model_params[0]["weight"], task.model_params[1]["weight"]
        return 0.5 if abs(w1 + w2) < 1e-8 else w2 / (w1 + w2)

    @staticmethod
    def _vectors(chunk: Chunk) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = chunk.models
        if chunk.base is not None:
            return a - chunk.base, b - chunk.base
        return a, b

    def _mode(self, task: TensorTask) -> str:
        if task.params["nuslerp_flatten"] or len(task.shape) < 2:
            return "flat"
        # MergeKit's convention: row_wise false interpolates each row W[i, :]; true interpolates columns
        return "cols" if task.params["nuslerp_row_wise"] else "rows"

    def stats_passes(self, task: TensorTask, stats) -> int:
        return 0 if self._mode(task) == "rows" else 1

    def init_stats(self, task: TensorTask) -> _Stats:
        return _Stats()

    def accumulate(self, task: TensorTask, chunk: Chunk, stats: _Stats, pass_index: int) -> None:
        v0, v1 = (v.double() for v in self._vectors(chunk))
        if self._mode(task) == "flat":
            stats.dot += float((v0 * v1).sum())
            stats.sq0 += float((v0 * v0).sum())
            stats.sq1 += float((v1 * v1).sum())
        else:  # per column: reduce over rows
            stats.dot = stats.dot + (v0 * v1).sum(0)
            stats.sq0 = stats.sq0 + (v0 * v0).sum(0)
            stats.sq1 = stats.sq1 + (v1 * v1).sum(0)

    def finish_pass(self, task: TensorTask, stats: _Stats, pass_index: int) -> None:
        t = self._t(task)
        if self._mode(task) == "flat":
            stats.coeffs = slerp_coefficients(t, stats.dot, stats.sq0 ** 0.5, stats.sq1 ** 0.5)
        else:
            c0 = torch.empty_like(stats.dot)
            c1 = torch.empty_like(stats.dot)
            for j in range(stats.dot.numel()):
                c0[j], c1[j] = slerp_coefficients(t, float(stats.dot[j]), float(stats.sq0[j]) ** 0.5,
                                                  float(stats.sq1[j]) ** 0.5)
            stats.coeffs = (c0, c1)

    def apply(self, task: TensorTask, chunk: Chunk, stats: _Stats | None) -> torch.Tensor:
        v0, v1 = self._vectors(chunk)
        mode = self._mode(task)
        if mode == "rows":
            out = slerp_rows(self._t(task), v0.reshape(v0.shape[0], -1), v1.reshape(v1.shape[0], -1), dim=1)
            out = out.reshape(v0.shape)
        elif mode == "flat":
            c0, c1 = stats.coeffs
            out = v0 * c0 + v1 * c1
        else:
            c0, c1 = (c.to(v0.dtype).to(v0.device) for c in stats.coeffs)
            out = v0 * c0 + v1 * c1
        return out + chunk.base if chunk.base is not None else out
