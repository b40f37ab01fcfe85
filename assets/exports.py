"""``export/<pipeline>/<name>``: a model of the pipeline exported as GGUF, bitsandbytes 4-bit or a re-cast safetensors
checkpoint, with its size, compression ratio and a logit-fidelity figure against the unquantized model.

The exported model is a base model or merge (used as it is) or a fine-tune (its LoRA merged into its base first,
streamed, into a scratch directory). When the pipeline declares evals of the same model, the export also depends on
those eval assets, so an eval whose blocking checks fail stops the export. Heavy work runs in the GPU pool like
merges; bad input fails at once, without retries.
"""


import json
import tempfile
import time
from pathlib import Path
from typing import Any

import dagster as dg

from pipelines.spec import ExportSpec
from resources.device import GpuResource
from resources.model_store import ModelStoreResource

from .common import BuildContext, artifact_metadata, dir_content_hash, node_config, upstream
from .merges import split_ref

MANIFEST = "mergeline.json"
KIND_TAG = {"gguf": "gguf", "bnb": "bitsandbytes", "safetensors": "safetensors"}


def export_dep_keys(bc: BuildContext, node: ExportSpec) -> tuple[list[dg.AssetKey], list[dg.AssetKey]]:
    """(model artifact keys, eval keys) an export depends on."""
    model, adapter = split_ref(bc.spec, node.model)
    keys = [bc.model_key(model)] + ([bc.model_key(adapter)] if adapter else [])
    evals = [bc.key("eval", e) for e, ev in bc.spec.evals.items() if ev.model == node.model] if bc.spec.evals else []
    return keys, evals


def _weight_bytes(model_dir: Path) -> int:
    """Tensor bytes of a model directory, from the safetensors headers only."""
    from merge_ops.safetensors_io import read_header

    return sum(t.nbytes for f in sorted(Path(model_dir).glob("*.safetensors")) for t in read_header(f)[0].values())


def _run_export(node: ExportSpec, name: str, src: Path, staged: Path, gpu: GpuResource) -> dict[str, Any]:
    """Write the export into ``staged``; returns what the metadata needs (and ``known`` shard hashes)."""
    if node.type == "bnb":
        from merge_ops.bnb_export import export_bnb

        device = gpu.resolved_device()
        res = export_bnb(src, staged, node.quant, device=device)
        return {"artifact": staged, "bytes": res.bytes, "source_bytes": res.source_bytes,
                "compression_ratio": res.compression_ratio, "sha256": res.sha256, "seconds": res.seconds,
                "peak_rss_bytes": res.peak_rss_bytes, "notes": res.notes, "tensors": res.tensor_count,
                "quantized_tensors": res.quantized_tensors, "device": device,
                "known": {f: s["sha256"] for f, s in res.shards.items()}, "weights": True}
    if node.type == "safetensors":
        from merge_ops.api import merge
        from merge_ops.sources import ModelSource

        source = ModelSource.from_parts(src, None)
        cfg = {"merge_method": "passthrough", "models": [{"model": "source"}], "dtype": node.quant}
        res = merge(cfg, staged, gpu.merge_options(), relation="quantized", sources={"source": source})
        sbytes = _weight_bytes(src)
        shards = res.manifest.get("output_shards", {})
        return {"artifact": staged, "bytes": res.bytes, "source_bytes": sbytes,
                "compression_ratio": sbytes / res.bytes if res.bytes else 0.0,
                "sha256": None, "seconds": res.seconds, "peak_rss_bytes": res.peak_rss_bytes, "notes": [],
                "tensors": res.tensors, "device": res.device,
                "known": {f: s["sha256"] for f, s in shards.items()}, "weights": True}
    # gguf: the exporter lives in merge_ops.gguf_export (its own module); imported only when a GGUF export runs
    from merge_ops.gguf_export import export_gguf

    staged.mkdir(parents=True, exist_ok=True)
    out_file = staged / f"{name}.{node.quant}.gguf"
    res = export_gguf(src, out_file, node.quant, progress=None)
    path = Path(getattr(res, "path", out_file))
    return {"artifact": path, "bytes": res.bytes, "source_bytes": res.source_bytes,
            "compression_ratio": res.compression_ratio, "sha256": res.sha256, "seconds": res.seconds,
            "peak_rss_bytes": res.peak_rss_bytes, "notes": list(getattr(res, "notes", []) or []),
            "tensors": getattr(res, "tensor_count", None), "architecture": getattr(res, "architecture", None),
            "device": "cpu", "known": {path.name: res.sha256} if res.sha256 else {}, "weights": False}


def _fidelity(node: ExportSpec, src: Path, artifact: Path) -> dict[str, Any]:
    from merge_ops.fidelity import gguf_loader, hf_loader, logit_fidelity

    loader = gguf_loader(artifact) if node.type == "gguf" else hf_loader(artifact)
    return logit_fidelity(src, loader, tokenizer_dir=src)


def build_export_asset(bc: BuildContext, name: str, node: ExportSpec, retry_policy: dg.RetryPolicy
                       ) -> dg.AssetsDefinition:
    spec = bc.spec
    key = bc.key("export", name)
    model, adapter = split_ref(spec, node.model)
    model_keys, eval_keys = export_dep_keys(bc, node)
    cfg = node_config(node)
    gate = f" Gated by the evals {', '.join(k.path[-1] for k in eval_keys)}." if eval_keys else ""

    @dg.asset(
        key=key,
        deps=model_keys + eval_keys,
        group_name=bc.group,
        description=bc.description(node, f"Export of '{node.model}' as {node.type} ({node.quant}).{gate}"),
        kinds={"mergeline", KIND_TAG[node.type]},
        owners=bc.owners(node) or None,
        tags={**bc.tags(node, "export"), "mergeline/export_type": node.type, "mergeline/quant": str(node.quant)},
        code_version=bc.code_version("export", cfg, node),
        pool=bc.gpu_pool,
        op_tags=bc.gpu_op_tags or None,
        retry_policy=retry_policy,
    )
    def _export(context: dg.AssetExecutionContext, gpu: GpuResource,
                model_store: ModelStoreResource) -> dg.MaterializeResult:
        from merge_ops.errors import MergeError

        t0 = time.perf_counter()
        ups = {k: upstream(context, k) for k in model_keys}
        inputs = {k.to_user_string(): u.data_version for k, u in ups.items()}
        try:
            with tempfile.TemporaryDirectory(prefix=f"mergeline-export-{name}-") as work, \
                    model_store.staging("export", name) as staged:
                src = ups[bc.model_key(model)].path
                if adapter:  # a fine-tune: its LoRA merged into its base first (streamed)
                    from merge_ops.api import merge_lora

                    merged = Path(work) / "merged"
                    merge_lora(src, ups[bc.model_key(adapter)].path, merged, gpu.merge_options())
                    src = merged
                out = _run_export(node, name, src, staged, gpu)
                fid = _fidelity(node, src, out["artifact"]) if node.fidelity else None
                if fid is not None:
                    context.log.info(f"export '{name}': fidelity {fid}")
                _record(staged, node, out, fid)
                content, _ = dir_content_hash(staged, known=out["known"], store_root=model_store.root_path)
                final = model_store.publish(staged, "export", name, content)
        except MergeError as e:
            raise dg.Failure(f"exports.{name}: {e}", allow_retries=False) from None
        extra: dict[str, Any] = {
            "type": node.type,
            "quant": str(node.quant),
            "exported_model": node.model,
            "compression_ratio": round(float(out["compression_ratio"]), 4),
            "export_bytes": int(out["bytes"]),
            "source_bytes": int(out["source_bytes"]),
            "export_seconds": round(float(out["seconds"]), 3),
            "peak_rss_mib": round(out["peak_rss_bytes"] / 2**20, 1),
            "device": out["device"],
            "notes": dg.MetadataValue.json(list(out["notes"])),
        }
        if out.get("sha256"):
            extra["export_sha256"] = out["sha256"]
        if node.type == "gguf":
            extra["gguf_file"] = dg.MetadataValue.path(str(Path(final) / Path(out["artifact"]).name))
        if fid is not None:
            extra.update({"max_abs_logit_diff": fid["max_abs_logit_diff"],
                          "mean_abs_logit_diff": fid["mean_abs_logit_diff"],
                          "top1_agreement": fid["top1_agreement"],
                          "fidelity_prompts": fid["prompts"],
                          "fidelity_positions": fid["positions"]})
        if eval_keys:
            extra["gated_by_evals"] = dg.MetadataValue.json([k.to_user_string() for k in eval_keys])
        meta = artifact_metadata(final, content, duration_s=time.perf_counter() - t0, config=cfg, inputs=inputs,
                                 extra=extra, weights=out["weights"])
        context.log.info(f"export '{name}' ({node.type} {node.quant}): {out['source_bytes'] / 1e6:.1f} MB -> "
                         f"{out['bytes'] / 1e6:.1f} MB ({out['compression_ratio']:.2f}x); published at {final}")
        return dg.MaterializeResult(metadata=meta, data_version=dg.DataVersion(content))

    return _export


def _record(staged: Path, node: ExportSpec, out: dict[str, Any], fid: dict[str, Any] | None) -> None:
    """Add the export summary and the fidelity figures to the artifact's ``mergeline.json`` (a volatile file: left
    out of the content hash, since timings and library versions change from run to run)."""
    path = staged / MANIFEST
    man = json.loads(path.read_text()) if path.is_file() else {"mergeline_manifest": 1}
    man["export_asset"] = {"type": node.type, "quant": node.quant, "model": node.model,
                           "compression_ratio": out["compression_ratio"], "bytes": out["bytes"],
                           "source_bytes": out["source_bytes"], "fidelity": fid}
    path.write_text(json.dumps(man, indent=2) + "\n")
