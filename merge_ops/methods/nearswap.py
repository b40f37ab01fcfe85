"""``nearswap``: take the other model's value only where it is close to the base's (MergeKit's NearSwap).

Per element, w = clamp(t / max(|θ_b − θ_1|, 1e-6), 0, 1) and the result is w·θ_1 + (1 − w)·θ_b: elements that differ
by at most t are swapped in fully, larger differences are pulled in less and less. Elementwise, so it streams with
no statistics pass.
"""

from __future__ import annotations

from ..lazy_torch import torch
from .base import Chunk, MergeMethod, ParamSpec, TensorTask, register

MIN_DIFF = 1e-6


def nearswap(base: torch.Tensor, other: torch.Tensor, t: float) -> torch.Tensor:
    w = (t / (base - other).abs().clamp(min=MIN_DIFF)).clamp(min=0.0, max=1.0)
    return w * other + (1 - w) * base


@register
class NearSwap(MergeMethod):
    name = "nearswap"
    base = "required"
    min_models = 1
    max_models = 1
    doc = "Blend towards the other model where it is within t of the base."
    params = (ParamSpec("t", required=True, lo=0.0, scope="global", doc="similarity threshold"),)

    def apply(self, task: TensorTask, chunk: Chunk, stats) -> torch.Tensor:
        return nearswap(chunk.base, chunk.models[0], task.params["t"])
