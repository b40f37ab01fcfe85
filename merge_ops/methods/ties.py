"""``ties``: trim each task vector to its top-ρ magnitudes, elect a sign per element, merge the agreeing entries
(Yadav et al., "TIES-Merging")."""

from .base import register
from .task_vectors import DENSITY, INT8_MASK, LAMBDA, WEIGHT, TaskVectorMethod, normalize_spec


@register
class Ties(TaskVectorMethod):
    name = "ties"
    sparsify = "magnitude"
    elect = True
    doc = "Magnitude trim + sign election + disjoint mean."
    params = (WEIGHT, DENSITY, LAMBDA, normalize_spec(True), INT8_MASK)
