"""From a validated pipeline spec to ``dagster.Definitions``.

:func:`build_pipeline_defs` is the one code path: the Python API (:func:`build_definitions`), the shipped code
location (``pipelines/definitions.py``) and the Dagster Component (``pipelines/component.py``) all call it. It returns
assets, jobs and schedules *without* resources; resources are bound once per code location (two components binding
the same resource key would not load), by :func:`build_definitions` / :func:`definitions_for` or by the
``MergelineResources`` component.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Mapping

import dagster as dg

from assets.adapters import build_adapter_asset
from assets.automation import with_automation
from assets.base_models import build_base_model_asset
from assets.common import BuildContext
from assets.datasets import build_dataset_asset
from assets.exports import build_export_asset
from assets.evals import build_eval_asset
from assets.finetunes import build_finetune_assets
from assets.merges import build_merge_asset
from assets.publish import build_publish_asset, publish_targets
from pipelines.spec import PipelineSpec, as_spec, resolve_schedule_targets
from resources.device import GpuResource

#: merges: transient failures (a CUDA OOM next to another job, a flaky filesystem) get two more tries
MERGE_RETRY = dg.RetryPolicy(max_retries=2, delay=5, backoff=dg.Backoff.EXPONENTIAL)
FINETUNE_RETRY = dg.RetryPolicy(max_retries=1, delay=10)


def node_keys(bc: BuildContext, section: str, name: str) -> list[dg.AssetKey]:
    """The asset keys a node produces."""
    if section == "base_models":
        return [bc.key("base_model", name)]
    if section == "datasets":
        return [bc.key("dataset", name)]
    if section == "finetunes":
        return [bc.key("finetune", name), bc.key("lora", name)]
    if section == "adapters":
        return [bc.key("lora", name)]
    if section == "merges":
        return [bc.key("merged", name)]
    if section == "exports":
        return [bc.key("export", name)]
    if section == "evals":
        return [bc.key("eval", name)]
    return []


def build_pipeline_defs(spec_or_path: PipelineSpec | str | Path | dict, *, gpu: GpuResource | None = None,
                        code_version: str | None = None) -> dg.Definitions:
    """Assets (one factory per node kind), a job materializing the whole pipeline, and the spec's schedules.

    ``gpu`` supplies the concurrency pool name and Kubernetes GPU op tags of merge and fine-tune steps (default:
    pool ``gpu``, no tags); ``code_version`` is prepended to every asset's code version."""
    spec = as_spec(spec_or_path)
    gpu = gpu or GpuResource()
    bc = BuildContext(spec, gpu_pool=gpu.pool, gpu_op_tags=gpu.op_tags(), code_version_prefix=code_version)
    assets: list[dg.AssetsDefinition] = []
    for name, node in spec.base_models.items():
        assets.append(build_base_model_asset(bc, name, node))
    for name, node in spec.datasets.items():
        assets.append(build_dataset_asset(bc, name, node))
    for name, node in spec.adapters.items():
        if node.folder is None:  # folders of adapters: assets/adapter_folders.py (via with_automation)
            assets.append(build_adapter_asset(bc, name, node))
    for name, node in spec.finetunes.items():
        assets.append(build_finetune_assets(bc, name, node, FINETUNE_RETRY))
    for name, node in spec.merges.items():
        assets.append(build_merge_asset(bc, name, node, MERGE_RETRY))
    for name, node in spec.evals.items():
        assets.append(build_eval_asset(bc, name, node))
    for name, node in spec.exports.items():
        assets.append(build_export_asset(bc, name, node, MERGE_RETRY))
    for section, name, node in publish_targets(spec):  # published/<pipeline>/<name>: merges and exports
        assets.append(build_publish_asset(bc, section, name, node))

    all_job = dg.define_asset_job(
        f"{spec.name}__all", selection=dg.AssetSelection.groups(bc.group),
        description=f"Materialize every asset of pipeline '{spec.name}'.",
        tags={"mergeline/pipeline": spec.name},
    )
    jobs: list[Any] = [all_job]
    schedules = []
    for sname, sc in spec.schedules.items():
        targets = resolve_schedule_targets(spec, sc)
        if targets is None:
            selection: dg.AssetSelection = dg.AssetSelection.groups(bc.group)
        else:
            keys = [k for sec, n in targets for k in node_keys(bc, sec, n)]
            selection = dg.AssetSelection.assets(*keys)
            if sc.upstream:
                selection = selection.upstream()
        job = dg.define_asset_job(f"{spec.name}__{sname}", selection=selection,
                                  tags={"mergeline/pipeline": spec.name, "mergeline/schedule": sname, **sc.tags})
        jobs.append(job)
        schedules.append(dg.ScheduleDefinition(
            name=f"{spec.name}__{sname}_schedule", job=job, cron_schedule=sc.cron, execution_timezone=sc.timezone,
            tags=sc.tags or None, description=sc.description or f"Schedule '{sname}' of pipeline '{spec.name}'.",
            default_status=dg.DefaultScheduleStatus.RUNNING if sc.enabled else dg.DefaultScheduleStatus.STOPPED,
        ))
    # observable sources, folder adapters, the re-merge-on-change condition on derived assets, sensors (running)
    return with_automation(bc, dg.Definitions(assets=assets, jobs=jobs, schedules=schedules))


def _resources(resources: Mapping[str, Any] | None) -> dict[str, Any]:
    from resources.bundle import default_resources

    return default_resources(**dict(resources or {}))


def build_definitions(spec_or_path: PipelineSpec | str | Path | dict, *, resources: Mapping[str, Any] | None = None,
                      bind_resources: bool = True, code_version: str | None = None) -> dg.Definitions:
    """``Definitions`` for one pipeline. ``resources`` replaces some of the defaults (``gpu``, ``model_store``,
    ``hub``, ``trainer``); ``bind_resources=False`` leaves binding to the caller (one binding per code location)."""
    return definitions_for([spec_or_path], resources=resources, bind_resources=bind_resources,
                           code_version=code_version)


def definitions_for(specs: Iterable[PipelineSpec | str | Path | dict], *,
                    resources: Mapping[str, Any] | None = None, bind_resources: bool = True,
                    code_version: str | None = None) -> dg.Definitions:
    """One code location serving several pipelines (one asset group each), resources bound once."""
    res = _resources(resources)
    gpu = res.get("gpu") if isinstance(res.get("gpu"), GpuResource) else None
    loaded = [as_spec(s) for s in specs]
    seen: dict[str, str] = {}
    for s in loaded:
        if s.name in seen:
            raise ValueError(f"two pipelines are named '{s.name}' ({seen[s.name]} and {s.source}); pipeline names "
                             f"must be unique within a code location (they name the asset groups and keys)")
        seen[s.name] = s.source
    parts = [build_pipeline_defs(s, gpu=gpu, code_version=code_version) for s in loaded]
    if bind_resources:
        parts.append(dg.Definitions(resources=res))
    return dg.Definitions.merge(*parts)
