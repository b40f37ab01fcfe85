"""``linear``: a weighted average of the models' parameters (model soup)."""

from __future__ import annotations

from ..lazy_torch import torch

from ..errors import ConfigError
from .base import Chunk, MergeMethod, ParamSpec, TensorTask, register


def linear_combination(tensors: list[torch.Tensor], weights: list[float], normalize: bool) -> torch.Tensor:
    """MergeKit's operation order, so a linear merge is byte-identical to MergeKit's: start from zeros, fuse each
    weighted model in with ``addcmul_`` (one rounding per model: a fused multiply-add on CPU and CUDA), then divide
    by the float32 sum of the weights. The fused CPU kernel (:class:`merge_ops.kernels.FusedLinear`) does the
    same operations."""
    first = tensors[0]
    w = torch.tensor(weights, dtype=first.dtype, device=first.device)
    shape = (len(weights),) + (1,) * first.dim()
    w = w.reshape(shape)
    acc = torch.zeros_like(first)
    for t, wi in zip(tensors, w.unbind(0)):
        acc.addcmul_(t, wi)
    if normalize:
        acc.div_(w.sum(dim=0))
    return acc


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
        return linear_combination(chunk.models, [p["weight"] for p in task.model_params], task.params["normalize"])

    def fused_cpu(self, task: TensorTask):
        from ..kernels import HAVE_NUMBA, FusedLinear

        if not HAVE_NUMBA:  # any size: small tensors (norms) too, so a bf16 linear merge never needs torch
            return None
        return FusedLinear([p["weight"] for p in task.model_params], task.params["normalize"])

    def is_identity(self, task: TensorTask) -> int | None:
        weights = [p["weight"] for p in task.model_params]
        if len(weights) == 1 and (task.params["normalize"] or weights[0] == 1.0):
            return 0
        return None
