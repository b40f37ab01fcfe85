"""``dare_linear`` / ``dare_ties``: drop task-vector entries at random with keep probability ρ and rescale the rest
(Yu et al., "Language Models are Super Mario"); ``dare_ties`` adds TIES sign election."""

from .base import register
from .task_vectors import DENSITY, INT8_MASK, LAMBDA, RESCALE, RESCALE_MODE, WEIGHT, TaskVectorMethod, normalize_spec

_PARAMS = (WEIGHT, DENSITY, LAMBDA, normalize_spec(False), RESCALE, RESCALE_MODE, INT8_MASK)


@register
class DareLinear(TaskVectorMethod):
    name = "dare_linear"
    sparsify = "random"
    elect = False
    doc = "Random drop + rescale, then task arithmetic."
    params = _PARAMS


@register
class DareTies(TaskVectorMethod):
    name = "dare_ties"
    sparsify = "random"
    elect = True
    doc = "Random drop + rescale, then TIES sign election."
    params = _PARAMS
