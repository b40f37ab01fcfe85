"""The GPU/device resource: which device merges and fine-tunes run on, the working precision, a memory budget, the
Dagster concurrency pool that serialises GPU work, and optional Kubernetes GPU requests for ``dagster-k8s``."""

from __future__ import annotations

import re
from typing import Any

import dagster as dg
from pydantic import Field, field_validator

_DEVICE_RE = re.compile(r"^(auto|cpu|cuda|cuda:\d+)$")


def check_device_spec(v: str) -> str:
    """A device setting (``auto``, ``cpu``, ``cuda``, ``cuda:N``), normalised; shared by the GPU and eval resources."""
    v = v.strip().lower()
    if not _DEVICE_RE.match(v):
        raise ValueError(f"device '{v}': expected auto, cpu, cuda or cuda:N")
    return v


class GpuResource(dg.ConfigurableResource):
    """Where heavy steps run.

    ``pool`` is read when the asset graph is built (it becomes ``pool=`` on merge and fine-tune assets); limit it with
    ``concurrency: pools:`` in ``dagster.yaml`` or ``dagster instance concurrency set gpu 1``. ``k8s_gpus`` > 0 adds a
    ``dagster-k8s/config`` op tag requesting that many GPUs for the step's pod (used by the k8s run launcher /
    ``k8s_job_executor``; ignored elsewhere).
    """

    device: str = Field("auto", description="auto (first CUDA GPU if present, else CPU), cpu, cuda or cuda:N")
    dtype: str | None = Field(None, description="merge arithmetic precision: float32 (default) or float64")
    memory_budget: str | None = Field(
        None, description="rough cap on the merge engine's working memory, e.g. '8GB' (row blocks shrink to fit)")
    pool: str = Field("gpu", description="Dagster concurrency pool of GPU-bound steps")
    k8s_gpus: int = Field(0, ge=0, description="GPUs to request per step pod on Kubernetes (dagster-k8s)")
    k8s_gpu_resource: str = Field("nvidia.com/gpu", description="the extended resource name of a GPU")
    k8s_node_selector: dict[str, str] = Field(default_factory=dict, description="node selector for GPU step pods")
    k8s_tolerations: list[dict[str, Any]] = Field(
        default_factory=list, description="tolerations for GPU step pods (Kubernetes field names, e.g. "
                                          "{key: nvidia.com/gpu, operator: Exists, effect: NoSchedule})")

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        return check_device_spec(v)

    @field_validator("dtype")
    @classmethod
    def _dtype(cls, v: str | None) -> str | None:
        if v not in (None, "float32", "float64"):
            raise ValueError("dtype must be float32 or float64")
        return v

    @field_validator("memory_budget")
    @classmethod
    def _budget(cls, v: str | None) -> str | None:
        if v is not None:
            from merge_ops.units import parse_size

            parse_size(v)
        return v

    # -- runtime -----------------------------------------------------------------------------------------------------
    def resolved_device(self) -> str:
        """The concrete device string (``cpu`` / ``cuda:N``); raises a clear error if CUDA was asked for but is
        missing."""
        from merge_ops.device import resolve_device

        from .gpu_slots import step_device

        dev = resolve_device(step_device(self.device))  # auto on a multi-GPU host: this step's own GPU
        return str(dev) if dev.type == "cpu" else f"cuda:{dev.index or 0}"

    def budget_bytes(self) -> int | None:
        if self.memory_budget is None:
            return None
        from merge_ops.units import parse_size

        return parse_size(self.memory_budget)

    def merge_options(self, *, seed: int = 0, **kw: Any):
        """:class:`merge_ops.api.MergeOptions` for this device; a memory budget shrinks the engine's row blocks and
        its whole-tensor cache (peak memory ≈ a few × (inputs + 2) row blocks + the cache)."""
        from merge_ops.api import MergeOptions
        from merge_ops.executor import DEFAULT_CACHE_BYTES, DEFAULT_CHUNK_ELEMENTS

        from .gpu_slots import step_device

        opts: dict[str, Any] = {"device": step_device(self.device), "seed": seed, "compute_dtype": self.dtype}
        budget = self.budget_bytes()
        if budget is not None:
            opts["cache_bytes"] = max(1 << 20, min(DEFAULT_CACHE_BYTES, budget // 8))
            opts["chunk_elements"] = max(1 << 16, min(DEFAULT_CHUNK_ELEMENTS, budget // 64))
        opts.update(kw)
        return MergeOptions(**opts)

    def op_tags(self) -> dict[str, Any]:
        """Op tags for GPU-bound steps (a ``dagster-k8s/config`` GPU request when ``k8s_gpus`` > 0)."""
        return gpu_op_tags(self.k8s_gpus, self.k8s_gpu_resource, self.k8s_node_selector, self.k8s_tolerations)


def gpu_op_tags(gpus: int, resource: str = "nvidia.com/gpu", node_selector: dict[str, str] | None = None,
                tolerations: list[dict[str, Any]] | None = None) -> dict:
    if gpus <= 0:
        return {}
    n = str(gpus)
    conf: dict[str, Any] = {"container_config": {"resources": {"limits": {resource: n}, "requests": {resource: n}}}}
    if node_selector:
        conf["pod_spec_config"] = {"node_selector": dict(node_selector)}
    if tolerations:
        conf.setdefault("pod_spec_config", {})["tolerations"] = [dict(t) for t in tolerations]
    return {"dagster-k8s/config": conf}
