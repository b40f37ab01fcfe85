"""``passthrough``: copy the single input tensor (optionally scaled); with ``slices`` it stacks layers."""

from __future__ import annotations

from ..lazy_torch import torch

from .base import Chunk, MergeMethod, ParamSpec, TensorTask, register


@register
class Passthrough(MergeMethod):
    name = "passthrough"
    base = "none"
    max_models = 1
    doc = "Copies its one input; `scale` multiplies it."
    params = (ParamSpec("scale", 1.0, doc="multiplier applied to the copied tensor"),)

    def apply(self, task: TensorTask, chunk: Chunk, stats) -> torch.Tensor:
        scale = task.model_params[0]["scale"]
        return chunk.models[0] * scale if scale != 1.0 else chunk.models[0]

    def is_identity(self, task: TensorTask) -> int | None:
        return 0 if task.model_params[0]["scale"] == 1.0 else None
