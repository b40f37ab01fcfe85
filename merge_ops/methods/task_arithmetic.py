"""``task_arithmetic``: θ_b + λ·Σ w_i (θ_i − θ_b) (Ilharco et al., "Editing models with task arithmetic")."""

from .base import register
from .task_vectors import INT8_MASK, LAMBDA, WEIGHT, TaskVectorMethod, normalize_spec


@register
class TaskArithmetic(TaskVectorMethod):
    name = "task_arithmetic"
    sparsify = "none"
    elect = False
    doc = "Adds the weighted task vectors to the base."
    params = (WEIGHT, LAMBDA, normalize_spec(False), INT8_MASK)
