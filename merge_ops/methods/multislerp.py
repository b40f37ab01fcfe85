"""``multislerp``: barycentric interpolation of any number of models on the hypersphere (MergeKit's Multi-SLERP).

Each tensor (minus the base, when one is given) is one vector per model. Their unit vectors are averaged with the
``weight``s, projected back onto the sphere through the tangent space at that mean, and rescaled to the weighted mean
norm. Streamed: one pass accumulates the Gram matrix of the inputs, the geometry runs on it
(:mod:`merge_ops.methods.sphere_math`), the output is a fixed linear combination of the inputs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..errors import ConfigError, InputError
from ..lazy_torch import torch
from .base import Chunk, MergeMethod, ParamSpec, TensorTask, register, weighted_sum
from .sphere_math import SphereError, multislerp_coefficients


@dataclass
class GramStats:
    """Gram matrix ⟨v_i, v_j⟩ of the input vectors (float64), then the output coefficients."""

    gram: np.ndarray | None = None
    coeffs: list[float] = field(default_factory=list)


def vectors(chunk: Chunk, include_base: bool = False) -> list[torch.Tensor]:
    """The vectors a sphere method combines: task vectors when there is a base, else the tensors themselves (and
    the base as one more input when ``include_base``)."""
    if chunk.base is None:
        return list(chunk.models)
    if include_base:
        return list(chunk.models) + [chunk.base]
    return [m - chunk.base for m in chunk.models]


def accumulate_gram(stats: GramStats, vs: list[torch.Tensor]) -> None:
    x = torch.stack([v.reshape(-1) for v in vs]).to(torch.float64)
    g = (x @ x.T).cpu().numpy()
    stats.gram = g if stats.gram is None else stats.gram + g


@register
class MultiSlerp(MergeMethod):
    name = "multislerp"
    base = "optional"
    min_models = 1
    doc = "Weighted barycentre of N models (or task vectors) on the hypersphere."
    params = (
        ParamSpec("weight", required=True, doc="per-model weight"),
        ParamSpec("normalize_weights", True, kind="bool", scope="global", doc="divide the weights by their sum"),
        ParamSpec("eps", 1e-8, lo=0.0, scope="global", doc="added to norms for numerical stability"),
    )

    def check_task(self, task: TensorTask) -> None:
        if task.params["normalize_weights"] and len(task.model_params) > 1 and \
                abs(sum(p["weight"] for p in task.model_params)) < 1e-8:
            raise ConfigError(
                f"tensor '{task.name}': the weights of {', '.join(task.model_labels)} sum to ~0 with "
                f"normalize_weights: true; change the weights or set normalize_weights: false")

    def is_identity(self, task: TensorTask) -> int | None:
        return 0 if len(task.model_params) == 1 else None  # MergeKit returns the single model's tensor as is

    def stats_passes(self, task: TensorTask, stats) -> int:
        return 1

    def init_stats(self, task: TensorTask) -> GramStats:
        return GramStats()

    def accumulate(self, task: TensorTask, chunk: Chunk, stats: GramStats, pass_index: int) -> None:
        accumulate_gram(stats, vectors(chunk))

    def finish_pass(self, task: TensorTask, stats: GramStats, pass_index: int) -> None:
        try:
            c = multislerp_coefficients(stats.gram, [p["weight"] for p in task.model_params],
                                        normalize_weights=task.params["normalize_weights"], eps=task.params["eps"])
        except SphereError as e:
            raise InputError(f"tensor '{task.name}' ({', '.join(task.model_labels)}): {e}") from None
        stats.coeffs = [float(x) for x in c]

    def apply(self, task: TensorTask, chunk: Chunk, stats: GramStats) -> torch.Tensor:
        out = weighted_sum(vectors(chunk), stats.coeffs)
        return out + chunk.base if chunk.base is not None else out
