"""Heavy step functions that run either inside the Dagster step process or in an external process (Dagster Pipes),
with one implementation: no Dagster import here or in any registered step module.

A step kind is a registered function ``fn(request, store, log) -> StepOutput``:

- ``request``: a JSON-serialisable dict the thin Dagster step built (node config, input *references* — local paths
  or ``s3://`` URIs read from upstream metadata — and options);
- ``store``: an :class:`~resources.object_store.ArtifactStore` opened from the same configuration as the Dagster
  ``model_store`` resource; the step fetches its inputs and publishes its output through it;
- ``log``: a ``str -> None`` callable (Dagster's ``context.log.info`` in process, the Pipes logger outside).

:class:`StepOutput` carries the metadata in the Pipes wire format (``{"raw_value": ..., "type": ...}``), the data
version and asset-check results. The in-process launcher converts them with Dagster's own Pipes converter
(``metadata_map_from_external``), so both paths give the same metadata values and types by construction.

Registering a new kind (e.g. an export or an eval): put ``@register_step("export")`` on a Dagster-free function in
a module and add ``"export": "that.module"`` to :data:`STEP_MODULES` so the entry point can import it on demand.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .artifact_files import human_size, main_dtype, read_model_card, safetensors_stats, tree_size

StepFn = Callable[[dict[str, Any], Any, Callable[[str], None]], "StepOutput"]
STEPS: dict[str, StepFn] = {}
#: step kind -> module that registers it (imported lazily by :func:`get_step`)
STEP_MODULES: dict[str, str] = {
    "merge": "resources.merge_step",
    "finetune": "resources.finetune_step",
    "export": "resources.export_step",
    "eval": "resources.eval_step",
}
#: metadata keys whose values are timings or process measurements (differ between any two runs)
VOLATILE_METADATA = frozenset({"duration_s", "merge_seconds", "peak_rss_mib", "train_seconds", "export_seconds"})


class StepInputError(Exception):
    """Bad input: retrying cannot help (the Dagster step fails with ``allow_retries=False``)."""


@dataclass
class CheckOutput:
    name: str
    passed: bool
    severity: str = "ERROR"
    metadata: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: the check's description (why it passed or failed); Pipes' report_asset_check has no such field, so the entry
    #: point sends it as metadata key :data:`CHECK_DESCRIPTION_KEY` and the launcher moves it back
    description: str | None = None


#: reserved check-metadata key carrying a check description over Dagster Pipes (removed again by the launcher)
CHECK_DESCRIPTION_KEY = "mergeline/check_description"


@dataclass
class StepOutput:
    metadata: dict[str, dict[str, Any]]
    data_version: str
    checks: list[CheckOutput] = field(default_factory=list)
    #: the asset key (user string) when the step materializes one of several assets; None: the only one
    asset_key: str | None = None
    #: further materializations of the same step (a multi-asset: a fine-tune's run record, then its LoRA), in order
    also: list["StepOutput"] = field(default_factory=list)

    def all(self) -> list["StepOutput"]:
        return [self, *self.also]


def register_step(kind: str) -> Callable[[StepFn], StepFn]:
    def deco(fn: StepFn) -> StepFn:
        STEPS[kind] = fn
        return fn

    return deco


def get_step(kind: str) -> StepFn:
    if kind not in STEPS and kind in STEP_MODULES:
        importlib.import_module(STEP_MODULES[kind])
    if kind not in STEPS:
        raise StepInputError(f"unknown step kind '{kind}' (known: {', '.join(sorted(set(STEPS) | set(STEP_MODULES)))})")
    return STEPS[kind]


def run_step(kind: str, request: dict[str, Any], store: Any, log: Callable[[str], None] = print) -> StepOutput:
    return get_step(kind)(request, store, log)


# -- metadata in the Pipes wire format --------------------------------------------------------------------------------


def mv(value: Any, type_: str = "__infer__") -> dict[str, Any]:
    return {"raw_value": value, "type": type_}


def md_json(obj: Any) -> dict[str, Any]:
    return mv("```json\n" + json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n```", "md")


def artifact_uri(path: Path) -> str | None:
    uri = getattr(path, "store_uri", None)
    return str(uri) if uri and str(uri).startswith("s3://") else None


def artifact_metadata(path: Path, content_hash: str, *, duration_s: float, config: Any,
                      inputs: dict[str, str | None], extra: dict[str, Any] | None = None,
                      weights: bool = True) -> dict[str, dict[str, Any]]:
    """The metadata every artifact reports (the Pipes-format twin of ``assets.common.artifact_metadata``; a test
    keeps the two equal)."""
    size = tree_size(path)
    uri = artifact_uri(path)
    meta: dict[str, dict[str, Any]] = {
        "path": mv(uri or str(path), "path"),
        "dagster/uri": mv(uri or Path(path).absolute().as_uri(), "url"),
        "content_sha256": mv(content_hash),
        "size_bytes": mv(size),
        "size": mv(human_size(size)),
        "duration_s": mv(round(duration_s, 3)),
        "input_data_versions": mv(inputs or {}, "json"),
        "config": mv(config, "json"),
    }
    if weights:
        params, by_dtype = safetensors_stats(path)
        meta["parameter_count"] = mv(params)
        meta["dtype"] = mv(main_dtype(by_dtype) or "n/a")
    card = read_model_card(path)
    if card:
        meta["model_card"] = mv(card, "md")
    if extra:
        meta.update(extra)
    return meta
