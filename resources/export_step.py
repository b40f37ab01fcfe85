"""The ``export`` step: a model (or base + LoRA, merged first) exported as GGUF, bitsandbytes 4-bit or re-cast
safetensors, with a logit-fidelity figure against the unquantized model, published into the store.

Dagster-free (see :mod:`resources.pipes_steps`): ``assets/exports.py`` builds the request and a launcher runs this
function in the step process, in a local subprocess or in a Kubernetes pod, so every path writes the same files
and reports the same metadata.

Request keys: ``name``, ``type`` (gguf | bnb | safetensors), ``quant``, ``model`` (the exported node's name),
``fidelity`` (bool), ``node_config`` (the node's YAML), ``model_ref`` / ``adapter_ref`` (upstream ``path`` metadata:
local paths or ``s3://`` URIs; ``adapter_ref`` None unless a fine-tune is exported), ``inputs`` (upstream data
versions), ``device`` (the ``gpu`` resource's device, resolved *here*, on the machine that does the work),
``options`` (``merge_ops.api.MergeOptions`` fields) and ``gated_by_evals`` (eval asset keys, may be empty).
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from .artifact_files import dir_content_hash
from .object_store import ArtifactStore, StoreError
from .pipes_steps import StepInputError, StepOutput, artifact_metadata, artifact_uri, mv, register_step

MANIFEST = "mergeline.json"
EXPORT_TYPES = ("gguf", "bnb", "safetensors")


def _weight_bytes(model_dir: Path) -> int:
    """Tensor bytes of a model directory, from the safetensors headers only."""
    from merge_ops.safetensors_io import read_header

    return sum(t.nbytes for f in sorted(Path(model_dir).glob("*.safetensors")) for t in read_header(f)[0].values())


def resolve_device(device: str) -> str:
    """``cpu`` or ``cuda:N`` for a device setting (``auto``, ``cuda``, …), as ``GpuResource.resolved_device``."""
    from merge_ops.device import resolve_device as _resolve

    dev = _resolve(device)
    return "cpu" if dev.type == "cpu" else f"cuda:{dev.index or 0}"


def run_export(kind: str, quant: str, name: str, src: Path, staged: Path, device: str,
               options: Any) -> dict[str, Any]:
    """Write the export into ``staged``; returns what the metadata needs (and ``known`` shard hashes)."""
    if kind == "bnb":
        from merge_ops.bnb_export import export_bnb

        device = resolve_device(device)
        res = export_bnb(src, staged, quant, device=device)
        return {"artifact": staged, "bytes": res.bytes, "source_bytes": res.source_bytes,
                "compression_ratio": res.compression_ratio, "sha256": res.sha256, "seconds": res.seconds,
                "peak_rss_bytes": res.peak_rss_bytes, "notes": res.notes, "tensors": res.tensor_count,
                "quantized_tensors": res.quantized_tensors, "device": device,
                "known": {f: s["sha256"] for f, s in res.shards.items()}, "weights": True}
    if kind == "safetensors":
        from merge_ops.api import merge
        from merge_ops.sources import ModelSource

        source = ModelSource.from_parts(src, None)
        cfg = {"merge_method": "passthrough", "models": [{"model": "source"}], "dtype": quant}
        res = merge(cfg, staged, options, relation="quantized", sources={"source": source})
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
    out_file = staged / f"{name}.{quant}.gguf"
    res = export_gguf(src, out_file, quant, progress=None)
    path = Path(getattr(res, "path", out_file))
    return {"artifact": path, "bytes": res.bytes, "source_bytes": res.source_bytes,
            "compression_ratio": res.compression_ratio, "sha256": res.sha256, "seconds": res.seconds,
            "peak_rss_bytes": res.peak_rss_bytes, "notes": list(getattr(res, "notes", []) or []),
            "tensors": getattr(res, "tensor_count", None), "architecture": getattr(res, "architecture", None),
            "device": "cpu", "known": {path.name: res.sha256} if res.sha256 else {}, "weights": False}


def fidelity(kind: str, src: Path, artifact: Path) -> dict[str, Any]:
    from merge_ops.fidelity import gguf_loader, hf_loader, logit_fidelity

    loader = gguf_loader(artifact) if kind == "gguf" else hf_loader(artifact)
    return logit_fidelity(src, loader, tokenizer_dir=src)


def record(staged: Path, request: dict[str, Any], out: dict[str, Any], fid: dict[str, Any] | None) -> None:
    """Add the export summary and the fidelity figures to the artifact's ``mergeline.json`` (a volatile file: left
    out of the content hash, since timings and library versions change from run to run)."""
    path = staged / MANIFEST
    man = json.loads(path.read_text()) if path.is_file() else {"mergeline_manifest": 1}
    man["export_asset"] = {"type": request["type"], "quant": request["quant"], "model": request["model"],
                           "compression_ratio": out["compression_ratio"], "bytes": out["bytes"],
                           "source_bytes": out["source_bytes"], "fidelity": fid}
    path.write_text(json.dumps(man, indent=2) + "\n")


@register_step("export")
def export_step(request: dict[str, Any], store: ArtifactStore, log: Callable[[str], None]) -> StepOutput:
    t0 = time.perf_counter()
    name, kind, quant = request["name"], request["type"], request["quant"]
    if kind not in EXPORT_TYPES:
        raise StepInputError(f"exports.{name}: unknown export type '{kind}' (known: {', '.join(EXPORT_TYPES)})")
    try:  # inputs first: a missing one is reported before torch is imported
        model_dir = store.resolve(request["model_ref"])
        adapter_dir = store.resolve(request["adapter_ref"]) if request.get("adapter_ref") else None
    except StoreError as e:
        raise StepInputError(f"exports.{name}: {e}") from None

    from merge_ops.api import MergeOptions
    from merge_ops.errors import MergeError

    options = MergeOptions(**request["options"])
    try:
        with tempfile.TemporaryDirectory(prefix=f"mergeline-export-{name}-") as work, \
                store.staging("export", name) as staged:
            src = model_dir
            if adapter_dir is not None:  # a fine-tune: its LoRA merged into its base first (streamed)
                from merge_ops.api import merge_lora

                merged = Path(work) / "merged"
                merge_lora(src, adapter_dir, merged, options)
                src = merged
            out = run_export(kind, quant, name, src, staged, request["device"], options)
            fid = fidelity(kind, src, out["artifact"]) if request.get("fidelity") else None
            if fid is not None:
                log(f"export '{name}': fidelity {fid}")
            record(staged, request, out, fid)
            content, _ = dir_content_hash(staged, known=out["known"], store_root=store.root_path)
            final = store.publish(staged, "export", name, content)
    except MergeError as e:
        raise StepInputError(f"exports.{name}: {e}") from None
    except StoreError as e:
        raise StepInputError(f"exports.{name}: {e}") from None
    extra: dict[str, Any] = {
        "type": mv(kind),
        "quant": mv(str(quant)),
        "exported_model": mv(request["model"]),
        "compression_ratio": mv(round(float(out["compression_ratio"]), 4)),
        "export_bytes": mv(int(out["bytes"])),
        "source_bytes": mv(int(out["source_bytes"])),
        "export_seconds": mv(round(float(out["seconds"]), 3)),
        "peak_rss_mib": mv(round(out["peak_rss_bytes"] / 2**20, 1)),
        "device": mv(out["device"]),
        "notes": mv(list(out["notes"]), "json"),
    }
    if out.get("sha256"):
        extra["export_sha256"] = mv(out["sha256"])
    uri = artifact_uri(final)  # S3 store: the artifact's s3:// address (``final`` is the local copy)
    if kind == "gguf":
        fname = Path(out["artifact"]).name
        extra["gguf_file"] = mv(f"{uri}/{fname}" if uri else str(Path(final) / fname), "path")
    if fid is not None:
        extra.update({"max_abs_logit_diff": mv(fid["max_abs_logit_diff"]),
                      "mean_abs_logit_diff": mv(fid["mean_abs_logit_diff"]),
                      "top1_agreement": mv(fid["top1_agreement"]),
                      "fidelity_prompts": mv(fid["prompts"]),
                      "fidelity_positions": mv(fid["positions"])})
    if request.get("gated_by_evals"):
        extra["gated_by_evals"] = mv(list(request["gated_by_evals"]), "json")
    meta = artifact_metadata(final, content, duration_s=time.perf_counter() - t0, config=request["node_config"],
                             inputs=request["inputs"], extra=extra, weights=out["weights"])
    log(f"export '{name}' ({kind} {quant}): {out['source_bytes'] / 1e6:.1f} MB -> {out['bytes'] / 1e6:.1f} MB "
        f"({out['compression_ratio']:.2f}x); published at {uri or final}")
    return StepOutput(metadata=meta, data_version=content)
