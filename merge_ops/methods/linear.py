"""``linear``: a weighted average of the models' parameters (model soup)."""

from __future__ import annotations

from ..lazy_torch import torch

from ..errors import ConfigError
from .base import Chunk, MergeMethod, ParamSpec, TensorTask, register, weighted_sum


@register
class Linear(MergeMethod):
    name = "linear"
    base = "none"
    doc = "Σ w_i θ_i, divided by Σ w_i when normalize (default)."
    params = (
        ParamSpec("weight", required=True, doc="per-model weight"),
        ParamSpec("normalize", True, kind="bool", scope="global"),
    )

    def check_task(self, task: TensorTask) -> None:
        if task.params["normalize"] and abs(sum(p["weight"] for p in task.model_params)) < 1e-8:
            raise ConfigError(
                f"tensor '{task.name}': the weights of {', '.join(task.model_labels)} sum to ~0 with normalize: true; "
                f"change the weights or set normalize: false"
            )

    def apply(self, task: TensorTask, chunk: Chunk, stats) -> torch.Tensor:
        weights = [p["weight"] for p in task.model_params]
        if task.params["normalize"]:
            total = sum(weights)
            weights = [w / total for w in weights]
        return weighted_sum(chunk.models, weights)

    def fused_cpu(self, task: TensorTask):
        from ..kernels import HAVE_NUMBA, FusedLinear

        if not HAVE_NUMBA:  # any size: small tensors (norms) too, so a bf16 linear merge never needs torch
            return None
        weights = [p["weight"] for p in task.model_params]
        if task.params["normalize"]:
            total = sum(weights)
            weights = [w / total for w in weights]
        return FusedLinear(weights)

    def is_identity(self, task: TensorTask) -> int | None:
        weights = [p["weight"] for p in task.model_params]
        if len(weights) == 1 and (task.params["normalize"] or weights[0] == 1.0):
            return 0
        return None
