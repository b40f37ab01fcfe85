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
from resources.model_store import ModelStoreResource

from .common import BuildContext, artifact_metadata, dir_content_hash, md_json, node_config, upstream

MANIFEST = "mergeline.json"


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
    )
    def _merge(context: dg.AssetExecutionContext, gpu: GpuResource,
               model_store: ModelStoreResource) -> dg.MaterializeResult:
        from merge_ops.api import merge
        from merge_ops.errors import MergeError
        from merge_ops.sources import ModelSource

        t0 = time.perf_counter()
        ups = {k: upstream(context, k) for k in dep_keys}
        inputs = {k.to_user_string(): u.data_version for k, u in ups.items()}
        try:
            sources = {}
            for r, (model, adapter) in parts.items():
                mpath = ups[bc.model_key(model)].path
                apath = ups[bc.model_key(adapter)].path if adapter else None
                sources[r] = ModelSource.from_parts(mpath, apath)
            tok_path = str(ups[bc.model_key(split_ref(spec, ts_node)[0])].path) if ts_node else None
            config = engine_config(node, tok_path)
            opts = gpu.merge_options(seed=node.seed)
            with model_store.staging("merged", name) as staged:
                res = merge(config, staged, opts, relation="merge", sources=sources)
                shard_hashes = {f: s["sha256"] for f, s in res.manifest.get("output_shards", {}).items()}
                content, _ = dir_content_hash(staged, known=shard_hashes, store_root=model_store.root_path)
                final = model_store.publish(staged, "merged", name, content)
        except MergeError as e:
            # bad input is not transient: retrying would fail the same way
            raise dg.Failure(f"merges.{name}: {e}", allow_retries=False) from None
        man = res.manifest
        meta = artifact_metadata(
            final, content, duration_s=time.perf_counter() - t0, config=cfg, inputs=inputs,
            extra={
                "method": node.method,
                "device": res.device,
                "tensors": res.tensors,
                "merge_seconds": round(res.seconds, 3),
                "peak_rss_mib": round(res.peak_rss_bytes / 2**20, 1),
                "engine_config": md_json(config),
                "engine_inputs": dg.MetadataValue.json(
                    {r: {"model": str(ups[bc.model_key(m)].path),
                         "adapter": str(ups[bc.model_key(a)].path) if a else None} for r, (m, a) in parts.items()}),
                "input_file_sha256": dg.MetadataValue.json(man.get("input_sha256", {})),
                "output_shards": dg.MetadataValue.json(man.get("output_shards", {})),
                "warnings": dg.MetadataValue.json(list(res.warnings)),
                "manifest": dg.MetadataValue.path(str(Path(final) / MANIFEST)),
            },
        )
        context.log.info(f"merge '{name}': {res.tensors} tensors, {res.bytes / 1e6:.1f} MB in {res.seconds:.1f} s on "
                         f"{res.device}; published at {final}")
        return dg.MaterializeResult(metadata=meta, data_version=dg.DataVersion(content))

    return _merge
