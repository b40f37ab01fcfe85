"""The resources of a mergeline code location, bound once (``Definitions(resources=default_resources())``)."""

from __future__ import annotations

import os
from typing import Any

from .device import GpuResource
from .evaluator import EvaluatorResource
from .hub import HubResource
from .model_store import ModelStoreResource
from .trainer import TrainerResource

RESOURCE_KEYS = ("gpu", "model_store", "hub", "trainer")
RESOURCE_KEYS += ("evaluator",)


def default_resources(**overrides: Any) -> dict[str, Any]:
    """Resources configured from the environment: ``MERGELINE_DEVICE`` (auto), ``MERGELINE_STORE`` (store root),
    ``HF_HUB_OFFLINE``, ``MERGELINE_TRAIN_BACKEND`` (auto). Keyword arguments replace whole resources."""
    res: dict[str, Any] = {
        "gpu": GpuResource(device=os.environ.get("MERGELINE_DEVICE", "auto")),
        "model_store": ModelStoreResource(root=os.environ.get("MERGELINE_STORE") or None),
        "hub": HubResource(),
        "trainer": TrainerResource(backend=os.environ.get("MERGELINE_TRAIN_BACKEND", "auto")),
    }
    res["evaluator"] = EvaluatorResource(device=os.environ.get("MERGELINE_EVAL_DEVICE")
                                         or os.environ.get("MERGELINE_DEVICE", "auto"))
    res.update(overrides)
    return res
