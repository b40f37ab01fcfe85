"""The resources of a mergeline code location, bound once (``Definitions(resources=default_resources())``)."""

from __future__ import annotations

import os
from typing import Any

from .device import GpuResource
from .evaluator import EvaluatorResource
from .hub import HubResource
from .launcher import StepLauncherResource
from .model_store import ModelStoreResource
from .trainer import TrainerResource

RESOURCE_KEYS = ("gpu", "model_store", "hub", "trainer", "launcher", "evaluator")


def default_resources(**overrides: Any) -> dict[str, Any]:
    """Resources configured from the environment: ``MERGELINE_DEVICE`` (auto), ``MERGELINE_STORE`` (store root),
    ``HF_HUB_OFFLINE``, ``MERGELINE_TRAIN_BACKEND`` (auto), ``MERGELINE_LAUNCHER`` (in_process | subprocess | k8s),
    ``MERGELINE_STORE_ENDPOINT`` (S3-compatible endpoint of an ``s3://`` store); ``MERGELINE_RESOURCES`` names a YAML
    file whose resources replace those (see :mod:`resources.config_file`). Keyword arguments replace whole
    resources."""
    res: dict[str, Any] = {
        "gpu": GpuResource(device=os.environ.get("MERGELINE_DEVICE", "auto")),
        "model_store": ModelStoreResource(root=os.environ.get("MERGELINE_STORE") or None,
                                          s3_endpoint_url=os.environ.get("MERGELINE_STORE_ENDPOINT") or None),
        "hub": HubResource(),
        "trainer": TrainerResource(backend=os.environ.get("MERGELINE_TRAIN_BACKEND", "auto")),
        "launcher": StepLauncherResource(mode=os.environ.get("MERGELINE_LAUNCHER") or "in_process"),
    }
    res["evaluator"] = EvaluatorResource(device=os.environ.get("MERGELINE_EVAL_DEVICE")
                                         or os.environ.get("MERGELINE_DEVICE", "auto"))
    if os.environ.get("MERGELINE_RESOURCES"):
        from .config_file import resources_from_yaml

        res.update(resources_from_yaml(os.environ["MERGELINE_RESOURCES"]))
    res.update(overrides)
    return res
