"""``della`` / ``della_linear``: magnitude-aware random dropping (Deep et al., "DELLA-Merging"): within each row the
keep probability rises linearly with the magnitude rank from ρ−ε to ρ+ε; kept entries are L1-rescaled. ``della``
elects signs and normalizes like TIES; ``della_linear`` does neither."""

from .base import register
from .task_vectors import (DENSITY, EPSILON, INT8_MASK, LAMBDA, RESCALE, RESCALE_MODE, WEIGHT, TaskVectorMethod,
                           normalize_spec)


@register
class Della(TaskVectorMethod):
    name = "della"
    sparsify = "della"
    elect = True
    doc = "Rank-dependent random drop + rescale + sign election."
    params = (WEIGHT, DENSITY, EPSILON, LAMBDA, normalize_spec(True), RESCALE, RESCALE_MODE, INT8_MASK)


@register
class DellaLinear(TaskVectorMethod):
    name = "della_linear"
    sparsify = "della"
    elect = False
    doc = "Rank-dependent random drop + rescale, then task arithmetic."
    params = (WEIGHT, DENSITY, EPSILON, LAMBDA, normalize_spec(False), RESCALE, RESCALE_MODE, INT8_MASK)
