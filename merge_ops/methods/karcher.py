"""``karcher``: the Karcher (Riemannian) mean of the models' tensors on the hypersphere, scaled by their mean norm
(MergeKit 0.1.5 semantics: equal weights, every input counts — a ``base_model`` is one more input, as MergeKit adds it
to the inputs). Streamed like ``multislerp``: one Gram-matrix pass, the fixed-point iteration on N×N numbers
(:func:`merge_ops.methods.sphere_math.karcher_coefficients`), then a linear combination of the inputs."""

from __future__ import annotations

from ..lazy_torch import torch
from .base import Chunk, MergeMethod, ParamSpec, TensorTask, register, weighted_sum
from .multislerp import GramStats, accumulate_gram, vectors
from .sphere_math import karcher_coefficients


@register
class Karcher(MergeMethod):
    name = "karcher"
    base = "optional"
    min_models = 1
    doc = "Karcher mean on the hypersphere of all inputs (base included), equal weights."
    params = (
        ParamSpec("max_iter", 10, kind="int", lo=0, scope="global", doc="maximum fixed-point iterations"),
        ParamSpec("tol", 1e-5, lo=0.0, scope="global", doc="convergence / small-norm threshold"),
    )

    def is_identity(self, task: TensorTask) -> int | None:
        return 0 if len(task.model_params) == 1 and not task.has_base else None

    def stats_passes(self, task: TensorTask, stats) -> int:
        return 1

    def init_stats(self, task: TensorTask) -> GramStats:
        return GramStats()

    def accumulate(self, task: TensorTask, chunk: Chunk, stats: GramStats, pass_index: int) -> None:
        accumulate_gram(stats, vectors(chunk, include_base=True))

    def finish_pass(self, task: TensorTask, stats: GramStats, pass_index: int) -> None:
        n = stats.gram.shape[0]
        c = karcher_coefficients(stats.gram, [1.0 / n] * n, max_iter=task.params["max_iter"], tol=task.params["tol"])
        stats.coeffs = [float(x) for x in c]

    def apply(self, task: TensorTask, chunk: Chunk, stats: GramStats) -> torch.Tensor:
        return weighted_sum(vectors(chunk, include_base=True), stats.coeffs)
