"""The evaluator resource: where and how lm-eval runs (device, batch size, a sample limit, whether lm-eval's built-in
task index is searched). The work itself is in :mod:`resources.eval_backend` (no Dagster import)."""

from __future__ import annotations


import dagster as dg
from pydantic import Field, field_validator

from .device import check_device_spec



class EvaluatorResource(dg.ConfigurableResource):
    """Settings of every eval asset in a code location.

    ``batch_size`` and ``limit`` here override the pipeline's ``evals.<name>.batch_size`` / ``limit`` when set (e.g.
    a small ``limit`` for a smoke-test deployment); ``include_defaults`` lets task names refer to lm-eval's built-in
    tasks (indexing them costs ~17 s per eval, and their datasets must already be in the local Hugging Face cache:
    nothing is downloaded when ``HF_HUB_OFFLINE=1`` / ``HF_DATASETS_OFFLINE=1``)."""

    device: str = Field("auto", description="auto (first CUDA GPU if present, else CPU), cpu, cuda or cuda:N")
    batch_size: int | None = Field(None, ge=1, description="lm-eval batch size (default: the eval's batch_size)")
    limit: int | None = Field(None, ge=1, description="at most this many samples per task (overrides the spec)")
    include_defaults: bool = Field(False, description="also search lm-eval's built-in tasks (slow to index)")
    dtype: str = Field("auto", description="model dtype for evaluation: auto (as saved), float32, bfloat16, float16")

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        return check_device_spec(v)

    @field_validator("dtype")
    @classmethod
    def _dtype(cls, v: str) -> str:
        if v not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError("dtype must be auto, float32, bfloat16 or float16")
        return v

    def resolved_device(self) -> str:
        """``cpu`` or ``cuda:N``; raises a clear error if CUDA was asked for but is missing."""
        from merge_ops.device import resolve_device

        dev = resolve_device(self.device)
        return "cpu" if dev.type == "cpu" else f"cuda:{dev.index or 0}"

    def options(self, *, batch_size: int = 8, limit: int | None = None, add_bos_token: bool | None = None,
                num_fewshot: int | None = None):
        """:class:`resources.eval_backend.EvalOptions` for one eval (resource settings win over the spec's)."""
        from resources.eval_backend import EvalOptions

        return EvalOptions(device=self.resolved_device(), batch_size=self.batch_size or batch_size,
                           limit=self.limit or limit, include_defaults=self.include_defaults,
                           add_bos_token=add_bos_token, dtype=self.dtype, num_fewshot=num_fewshot)

    def request_options(self, *, batch_size: int = 8, limit: int | None = None, add_bos_token: bool | None = None,
                        num_fewshot: int | None = None) -> dict:
        """The :meth:`options` fields as JSON for a step request, the device left *unresolved* (``auto``, ``cuda``):
        the step resolves it on the machine that runs the models (a GPU pod, not the orchestrator)."""
        return {"device": self.device, "batch_size": self.batch_size or batch_size, "limit": self.limit or limit,
                "include_defaults": self.include_defaults, "add_bos_token": add_bos_token, "dtype": self.dtype,
                "num_fewshot": num_fewshot}
