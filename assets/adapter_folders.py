"""A folder of adapters (``adapters: {NAME: {base: B, folder: DIR}}``): "merge every adapter in this folder into the
base".

Every subdirectory of ``DIR`` holding an ``adapter_config.json`` is one dynamic partition (key = the subdirectory
name) of two assets:

* ``lora/<pipeline>/<NAME>`` — the adapter, hashed in place (its data version is the content hash);
* ``merged/<pipeline>/<NAME>`` — the adapter merged into ``B`` by the streaming engine (PEFT semantics), in the GPU
  pool; it carries the automation condition, so it is requested for a new partition and whenever that partition's
  adapter data version changes.

The sensor ``<pipeline>__<NAME>__adapters`` (running by default, ``observe.interval_seconds``) adds a partition per
new adapter and requests the adapter partition of every new or changed adapter. An adapter that disappears or
becomes unreadable is reported in the tick log; its partition and merges are never deleted.
"""


import json
import re
import time
from pathlib import Path

import dagster as dg

from pipelines.spec import AdapterSpec
from resources.device import GpuResource
from resources.model_store import ModelStoreResource

from .common import BuildContext, artifact_metadata, dir_content_hash, node_config, upstream
from .observations import DEFAULT_OBSERVE, observe_local

PARTITION_KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")
MERGE_RETRY = dg.RetryPolicy(max_retries=2, delay=5, backoff=dg.Backoff.EXPONENTIAL)


def partitions_name(bc: BuildContext, name: str) -> str:
    return f"{bc.spec.name}__{name}"


def sensor_name(bc: BuildContext, name: str) -> str:
    return f"{bc.spec.name}__{name}__adapters"


def list_adapters(folder: Path) -> tuple[list[str], list[str]]:
    """(partition keys of the adapter subdirectories, notes about subdirectories that cannot be partitions)."""
    keys, notes = [], []
    if not folder.is_dir():
        return keys, [f"folder '{folder}' does not exist"]
    for d in sorted(folder.iterdir()):
        if not d.is_dir() or d.name.startswith("."):
            continue
        if not (d / "adapter_config.json").is_file():
            notes.append(f"'{d.name}': no adapter_config.json (skipped)")
            continue
        if not PARTITION_KEY_RE.match(d.name):
            notes.append(f"'{d.name}': not usable as a partition key (letters, digits, '_', '-', '.'; skipped)")
            continue
        keys.append(d.name)
    return keys, notes


def build_folder_adapter_defs(bc: BuildContext, *, running: bool = True
                              ) -> tuple[list[dg.AssetsDefinition], list[dg.SensorDefinition]]:
    assets: list[dg.AssetsDefinition] = []
    sensors: list[dg.SensorDefinition] = []
    for name, node in bc.spec.adapters.items():
        if node.folder is None:
            continue
        a, m, s = _build_one(bc, name, node, running)
        assets += [a, m]
        sensors.append(s)
    return assets, sensors


def _build_one(bc: BuildContext, name: str, node: AdapterSpec, running: bool):
    folder = bc.spec.resolve_path(node.folder)
    parts = dg.DynamicPartitionsDefinition(name=partitions_name(bc, name))
    lora_key, merged_key = bc.key("lora", name), bc.key("merged", name)
    base_key = bc.model_key(node.base)
    cfg = node_config(node)
    observe = node.observe or DEFAULT_OBSERVE

    @dg.asset(
        key=lora_key,
        deps=[base_key],
        partitions_def=parts,
        group_name=bc.group,
        description=bc.description(node, f"Adapters in folder `{node.folder}` (one partition per subdirectory) for "
                                         f"'{node.base}', hashed in place."),
        kinds={"peft", "safetensors"},
        owners=bc.owners(node) or None,
        tags=bc.tags(node, "lora"),
        code_version=bc.code_version("lora", cfg, node),
    )
    def _adapter(context: dg.AssetExecutionContext, model_store: ModelStoreResource) -> dg.MaterializeResult:
        t0 = time.perf_counter()
        path = folder / context.partition_key
        obs = observe_local(path, marker="adapter_config.json")
        if not obs.ok:
            raise dg.Failure(f"adapters.{name} [{context.partition_key}]: {obs.status}: {obs.reason}",
                             allow_retries=False)
        content, _ = dir_content_hash(path, store_root=model_store.root_path)
        extra = {"stored": "in place (folder of adapters)", "partition": context.partition_key}
        try:
            ac = json.loads((path / "adapter_config.json").read_text())
            extra.update(peft_type=str(ac.get("peft_type")), r=ac.get("r", -1), lora_alpha=ac.get("lora_alpha", -1))
        except (OSError, ValueError):
            pass
        meta = artifact_metadata(path, content, duration_s=time.perf_counter() - t0, config=cfg, inputs={},
                                 extra=extra)
        return dg.MaterializeResult(metadata=meta, data_version=dg.DataVersion(content))

    @dg.asset(
        key=merged_key,
        deps=[base_key, lora_key],
        partitions_def=parts,
        group_name=bc.group,
        description=bc.description(node, f"Each adapter of folder `{node.folder}` merged into '{node.base}' "
                                         f"(W + s·B·A, PEFT semantics), one partition per adapter."),
        kinds={"mergeline", "safetensors"},
        owners=bc.owners(node) or None,
        tags={**bc.tags(node, "merged"), "mergeline/method": "lora"},
        code_version=bc.code_version("merged", {"merge_lora_into": node.base, **cfg}, node),
        pool=bc.gpu_pool,
        op_tags=bc.gpu_op_tags or None,
        retry_policy=MERGE_RETRY,
    )
    def _merge(context: dg.AssetExecutionContext, gpu: GpuResource,
               model_store: ModelStoreResource) -> dg.MaterializeResult:
        from merge_ops.api import merge_lora
        from merge_ops.errors import MergeError

        t0 = time.perf_counter()
        pk = context.partition_key
        base = upstream(context, base_key)
        adapter = folder / pk
        obs = observe_local(adapter, marker="adapter_config.json")
        if not obs.ok:
            raise dg.Failure(f"adapters.{name} [{pk}]: {obs.status}: {obs.reason}; the last good merge of this "
                             f"partition stays", allow_retries=False)
        try:
            with model_store.staging("merged", name) as staged:
                res = merge_lora(base.path, adapter, staged, gpu.merge_options())
                shard_hashes = {f: s["sha256"] for f, s in res.manifest.get("output_shards", {}).items()}
                content, _ = dir_content_hash(staged, known=shard_hashes, store_root=model_store.root_path)
                final = model_store.publish(staged, "merged", name, content)
        except MergeError as e:
            raise dg.Failure(f"adapters.{name} [{pk}]: {e}", allow_retries=False) from None
        meta = artifact_metadata(
            final, content, duration_s=time.perf_counter() - t0, config=cfg,
            inputs={base_key.to_user_string(): base.data_version, f"{lora_key.to_user_string()}[{pk}]": obs.version},
            extra={"method": "lora", "adapter": dg.MetadataValue.path(str(adapter)), "device": res.device,
                   "tensors": res.tensors, "merge_seconds": round(res.seconds, 3)})
        context.log.info(f"adapter '{pk}' merged into '{node.base}': {res.tensors} tensors on {res.device} -> {final}")
        return dg.MaterializeResult(metadata=meta, data_version=dg.DataVersion(content))

    @dg.sensor(
        name=sensor_name(bc, name),
        minimum_interval_seconds=observe.interval_seconds,
        default_status=dg.DefaultSensorStatus.RUNNING if running else dg.DefaultSensorStatus.STOPPED,
        description=(f"Watches `{folder}`: adds a partition of {lora_key.to_user_string()} / "
                     f"{merged_key.to_user_string()} per new adapter and re-hashes new or changed adapters; the "
                     f"automation sensor then merges them. Adapters that disappear are reported, never deleted."),
        asset_selection=dg.AssetSelection.assets(lora_key),
    )
    def _discover(context: dg.SensorEvaluationContext) -> dg.SensorResult:
        try:
            seen: dict[str, str] = json.loads(context.cursor) if context.cursor else {}
        except ValueError:
            seen = {}
        keys, notes = list_adapters(folder)
        existing = set(context.instance.get_dynamic_partitions(parts.name))
        new_parts = [k for k in keys if k not in existing]
        requests = []
        for k in keys:
            obs = observe_local(folder / k, marker="adapter_config.json")
            if not obs.ok:
                notes.append(f"'{k}': {obs.status}: {obs.reason} (its last merge stays)")
                continue
            if seen.get(k) != obs.version:
                seen[k] = obs.version
                requests.append(dg.RunRequest(
                    run_key=f"{k}:{obs.version[:16]}", partition_key=k, asset_selection=[lora_key],
                    tags={"mergeline/pipeline": bc.spec.name, "mergeline/trigger": "adapter-folder"}))
        for k in sorted(existing - set(keys)):
            notes.append(f"'{k}': gone from the folder (partition and its merges kept)")
        for n in notes:
            context.log.warning(n)
        return dg.SensorResult(
            run_requests=requests, cursor=json.dumps(seen, sort_keys=True),
            dynamic_partitions_requests=[parts.build_add_request(new_parts)] if new_parts else None,
            skip_reason=None if requests or new_parts else ("no new or changed adapters"
                                                            + (f"; {'; '.join(notes)}" if notes else "")),
        )

    return _adapter, _merge, _discover
