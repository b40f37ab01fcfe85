"""Merge methods, each in its own module, registered by name (see :mod:`merge_ops.methods.base`)."""

from .base import REGISTRY, MergeMethod, ParamSpec, get_method, register  # noqa: F401


def _load_all() -> None:
    """Import every method module so that its ``@register`` runs. New methods: add one import line here."""
    from . import (  # noqa: F401
        arcee_fusion,
        breadcrumbs,
        dare,
        della,
        karcher,
        linear,
        model_stock,
        multislerp,
        nearswap,
        nuslerp,
        passthrough,
        ram,
        sce,
        slerp,
        task_arithmetic,
        ties,
    )


_load_all()
