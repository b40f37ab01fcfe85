"""Resources from a YAML file (``MERGELINE_RESOURCES=/path/resources.yaml``): the deployment — store on S3, where
GPU steps run, GPU requests — is configuration, not code.

.. code-block:: yaml

    model_store: {root: s3://ml-artifacts/mergeline, cache_dir: /var/cache/mergeline}
    gpu: {device: cuda, k8s_gpus: 1, k8s_node_selector: {nvidia.com/gpu.product: NVIDIA-H100-80GB-HBM3}}
    launcher: {mode: k8s, k8s_image: registry.example.com/mergeline:1.0, k8s_namespace: mergeline}

Each top-level key names a resource; its mapping holds that resource's fields (unknown keys and fields are errors).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from .device import GpuResource
from .hub import HubResource
from .launcher import StepLauncherResource
from .model_store import ModelStoreResource
from .trainer import TrainerResource

RESOURCE_TYPES: dict[str, type] = {
    "gpu": GpuResource,
    "model_store": ModelStoreResource,
    "hub": HubResource,
    "trainer": TrainerResource,
    "launcher": StepLauncherResource,
}


def resources_from_mapping(data: dict[str, Any], source: str = "<mapping>") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, fields in (data or {}).items():
        cls = RESOURCE_TYPES.get(key)
        if cls is None:
            raise ValueError(f"{source}: unknown resource '{key}' (known: {', '.join(RESOURCE_TYPES)})")
        if not isinstance(fields, dict):
            raise ValueError(f"{source}: '{key}' must be a mapping of {cls.__name__} fields")
        unknown = sorted(set(fields) - set(cls.model_fields))
        if unknown:
            raise ValueError(f"{source}: {key}: unknown field(s) {', '.join(unknown)} (known: "
                             f"{', '.join(cls.model_fields)})")
        try:
            out[key] = cls(**fields)
        except Exception as e:
            errors = e.errors() if callable(getattr(e, "errors", None)) else None  # pydantic: one line per field
            if errors:
                msg = "; ".join(f"{key}.{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in errors)
                raise ValueError(f"{source}: {msg}") from None
            raise ValueError(f"{source}: {key}: {e}") from None
    return out


def resources_from_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"resources file '{p}' does not exist (MERGELINE_RESOURCES)")
    return resources_from_mapping(yaml.safe_load(p.read_text()) or {}, str(p))
