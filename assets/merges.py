"""``merged/<pipeline>/<name>``: a merge run by the streaming merge engine on the GPU resource's device.

Inputs are node names: base models and merges are used as they are; fine-tunes and adapters are applied to the base
they were trained on (``base+adapter``, streamed by the engine, no merged copy on disk); ``model+adapter`` applies an
adapter or fine-tune's LoRA to another model on purpose.
"""

import time
from pathlib import Path
from typing import Any

import dagster as dg

from pipelines.spec import MergeSpec, PipelineSpec
from resources.device import GpuResource
from resources.launcher import StepLauncherResource
from resources.merge_step import CHECK_NAME, MANIFEST  # noqa: F401  (MANIFEST: re-exported)
from resources.model_store import ModelStoreResource

from .common import BuildContext, artifact_metadata, dir_content_hash, md_json, node_config, upstream


def split_ref(spec: PipelineSpec, ref: str) -> tuple[str, str | None]:
    """(full model node, adapter/fine-tune node or None) a merge reference stands for."""
    if "+" in ref:
        model, _, adapter = ref.partition("+")
        return model, adapter
    sec = spec.section_of(ref)
    if sec == "finetunes":
        return spec.finetunes[ref].base, ref
    if sec == "adapters":
        return spec.adapters[ref].base, ref
    return ref, None


def engine_config(m: MergeSpec, tokenizer_path: str | None = None) -> dict[str, Any]:
    """The MergeKit config the engine runs (references stay node names; ``sources=`` maps them to directories)."""
    cfg: dict[str, Any] = {"merge_method": m.method}
    if m.base_model:
        cfg["base_model"] = m.base_model
    if m.models is not None:
        cfg["models"] = [e.model_dump(mode="json", exclude_none=True) for e in m.models]
    if m.slices is not None:
        cfg["slices"] = [s.model_dump(mode="json", exclude_none=True) for s in m.slices]
    if m.parameters:
        cfg["parameters"] = {k: (v.model_dump(mode="json", exclude_none=True) if hasattr(v, "model_dump") else
                                 [x.model_dump(mode="json", exclude_none=True) if hasattr(x, "model_dump") else x
                                  for x in v] if isinstance(v, list) else v)
                             for k, v in m.parameters.items()}
    for k in ("dtype", "out_dtype", "chat_template"):
        if getattr(m, k) is not None:
            cfg[k] = getattr(m, k)
    if m.tokenizer_source is not None:
        cfg["tokenizer_source"] = tokenizer_path or m.tokenizer_source
    return cfg


def build_merge_asset(bc: BuildContext, name: str, node: MergeSpec, retry_policy: dg.RetryPolicy
                      ) -> dg.AssetsDefinition:
    spec = bc.spec
    key = bc.key("merged", name)
    refs = list(dict.fromkeys(r for _, r in node.references()))
    parts = {r: split_ref(spec, r) for r in refs}
    dep_keys: list[dg.AssetKey] = []
    for model, adapter in parts.values():
        dep_keys.append(bc.model_key(model))
        if adapter:
            dep_keys.append(bc.model_key(adapter))
    ts = node.tokenizer_source
    ts_node = ts if ts is not None and ts not in refs and spec.section_of(ts) else None
    if ts_node:
        dep_keys.append(bc.model_key(split_ref(spec, ts_node)[0]))
    dep_keys = list(dict.fromkeys(dep_keys))
    cfg = node_config(node)
    inputs_desc = ", ".join(f"`{r}`" for r in refs)

    @dg.asset(
        key=key,
        deps=dep_keys,
        group_name=bc.group,
        description=bc.description(node, f"Merge '{name}': `{node.method}` of {inputs_desc}."),
        kinds={"mergeline", "safetensors"},
        owners=bc.owners(node) or None,
        tags={**bc.tags(node, "merged"), "mergeline/method": node.method},
        code_version=bc.code_version("merged", cfg, node),
        pool=bc.gpu_pool,
        op_tags=bc.gpu_op_tags or None,
        retry_policy=retry_policy,
        check_specs=[dg.AssetCheckSpec(CHECK_NAME, asset=key, description=(
            "Every shard the engine wrote is in the published artifact with the engine's size (S3 store: and the "
            "sha256 computed while uploading)."))],
    )
    def _merge(context: dg.AssetExecutionContext, gpu: GpuResource,
               model_store: ModelStoreResource, launcher: StepLauncherResource) -> dg.MaterializeResult:
        # thin: find the inputs' store references (no download) and hand the work to the launcher, which runs
        # resources/merge_step.py here, in a subprocess or in a GPU pod (Dagster Pipes)
        ups = {k: upstream(context, k, fetch=False) for k in dep_keys}
        inputs = {k.to_user_string(): u.data_version for k, u in ups.items()}
        request = {
            "name": name,
            "method": node.method,
            "node_config": cfg,
            "engine_config": engine_config(node),
            "parts": {r: {"model": ups[bc.model_key(m)].ref, "adapter": ups[bc.model_key(a)].ref if a else None}
                      for r, (m, a) in parts.items()},
            "tokenizer_ref": ups[bc.model_key(split_ref(spec, ts_node)[0])].ref if ts_node else None,
            "inputs": inputs,
            "options": gpu.merge_options(seed=node.seed).model_dump(mode="json"),
        }
        return launcher.run(context, "merge", request, model_store=model_store, gpu=gpu)

    return _merge
