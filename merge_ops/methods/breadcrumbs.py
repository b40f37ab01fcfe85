"""``breadcrumbs`` / ``breadcrumbs_ties``: drop the largest-magnitude outliers (γ) and the smallest entries so that a
fraction ρ remains (Davari & Belilovsky, "Model Breadcrumbs"); the ``_ties`` variant adds sign election.

(differs from older MergeKit) when int(γ·n) rounds to 0, the int(ρ·n) largest entries are kept instead of zeroing
the whole task vector.
"""

from .base import register
from .task_vectors import DENSITY, GAMMA, INT8_MASK, LAMBDA, WEIGHT, TaskVectorMethod, normalize_spec

_PARAMS = (WEIGHT, DENSITY, GAMMA, LAMBDA, normalize_spec(False), INT8_MASK)


@register
class Breadcrumbs(TaskVectorMethod):
    name = "breadcrumbs"
    sparsify = "breadcrumbs"
    elect = False
    doc = "Drop top-γ outliers and small entries, keep ρ."
    params = _PARAMS


@register
class BreadcrumbsTies(TaskVectorMethod):
    name = "breadcrumbs_ties"
    sparsify = "breadcrumbs"
    elect = True
    doc = "Breadcrumbs sparsification + TIES sign election."
    params = _PARAMS
