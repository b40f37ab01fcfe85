"""The ``merge`` step: run the streaming merge engine on inputs found through the store, publish the result.

Dagster-free (see :mod:`resources.pipes_steps`): ``assets/merges.py`` builds the request and a launcher runs this
function in the step process, in a local subprocess or in a Kubernetes pod.

Request keys: ``name``, ``method``, ``node_config`` (the node's YAML), ``engine_config`` (MergeKit config with node
names as references), ``parts`` (``{reference: {"model": ref, "adapter": ref | None}}``, refs being upstream
``path`` metadata: local paths or ``s3://`` URIs), ``tokenizer_ref`` (ref or None), ``inputs`` (upstream data
versions) and ``options`` (``merge_ops.api.MergeOptions`` fields).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

from .artifact_files import dir_content_hash
from .object_store import ArtifactStore, StoreError
from .pipes_steps import CheckOutput, StepInputError, StepOutput, artifact_metadata, artifact_uri, md_json, mv, \
    register_step

MANIFEST = "mergeline.json"
CHECK_NAME = "artifact_complete"


def completeness_check(store: ArtifactStore, final: Path, name: str, content: str,
                       shards: dict[str, dict[str, Any]]) -> CheckOutput:
    """Every shard the engine wrote is in the published artifact with the size its header and the engine's tensor
    byte count imply; on S3 also with the sha256 the upload computed while streaming (end to end, no extra read)."""
    problems: list[str] = []
    uploaded = None
    if store.remote:
        marker = store.read_commit("merged", name, content) or {}
        uploaded = marker.get("files", {})
    for f, info in sorted(shards.items()):
        p = Path(final) / f
        if not p.is_file():
            problems.append(f"{f}: missing")
            continue
        with open(p, "rb") as fh:  # 8-byte header length + header + tensor data: the size the engine implies
            expected = 8 + int.from_bytes(fh.read(8), "little") + int(info.get("bytes", -1))
        if p.stat().st_size != expected:
            problems.append(f"{f}: {p.stat().st_size} bytes, the engine's header + {info.get('bytes')} tensor bytes "
                            f"make {expected}")
        if uploaded is not None:
            up = uploaded.get(f)
            if up is None or up.get("sha256") != info.get("sha256"):
                problems.append(f"{f}: uploaded sha256 {up and up.get('sha256')} != engine sha256 {info.get('sha256')}")
    return CheckOutput(CHECK_NAME, passed=not problems, metadata={
        "shards": mv(len(shards)),
        "verified": mv("size + sha256 of the uploaded stream" if uploaded is not None else "size"),
        "problems": mv(problems, "json"),
    })


@register_step("merge")
def merge_step(request: dict[str, Any], store: ArtifactStore, log: Callable[[str], None]) -> StepOutput:
    t0 = time.perf_counter()
    name = request["name"]
    refs = [r for p in request["parts"].values() for r in (p["model"], p.get("adapter")) if r]
    refs += [request["tokenizer_ref"]] if request.get("tokenizer_ref") else []
    try:  # inputs first (cheap, and a missing one is reported before torch is even imported)
        local = {ref: store.resolve(ref) for ref in dict.fromkeys(refs)}
    except StoreError as e:
        raise StepInputError(f"merges.{name}: {e}") from None

    from merge_ops.api import MergeOptions, merge
    from merge_ops.errors import MergeError
    from merge_ops.sources import ModelSource

    try:
        sources = {r: ModelSource.from_parts(local[p["model"]], local[p["adapter"]] if p.get("adapter") else None)
                   for r, p in request["parts"].items()}
        config = dict(request["engine_config"])
        if request.get("tokenizer_ref"):
            config["tokenizer_source"] = str(local[request["tokenizer_ref"]])
        opts = MergeOptions(**request["options"])
        with store.staging("merged", name) as staged:
            res = merge(config, staged, opts, relation="merge", sources=sources)
            shard_hashes = {f: s["sha256"] for f, s in res.manifest.get("output_shards", {}).items()}
            content, _ = dir_content_hash(staged, known=shard_hashes, store_root=store.root_path)
            final = store.publish(staged, "merged", name, content)
    except MergeError as e:
        raise StepInputError(f"merges.{name}: {e}") from None
    except StoreError as e:
        raise StepInputError(f"merges.{name}: {e}") from None
    man = res.manifest
    uri = artifact_uri(final)
    meta = artifact_metadata(
        final, content, duration_s=time.perf_counter() - t0, config=request["node_config"], inputs=request["inputs"],
        extra={
            "method": mv(request["method"]),
            "device": mv(res.device),
            "tensors": mv(res.tensors),
            "merge_seconds": mv(round(res.seconds, 3)),
            "peak_rss_mib": mv(round(res.peak_rss_bytes / 2**20, 1)),
            "engine_config": md_json(config),
            "engine_inputs": mv({r: {"model": p["model"], "adapter": p.get("adapter")}
                                 for r, p in request["parts"].items()}, "json"),
            "input_file_sha256": mv(man.get("input_sha256", {}), "json"),
            "output_shards": mv(man.get("output_shards", {}), "json"),
            "warnings": mv(list(res.warnings), "json"),
            "manifest": mv(f"{uri}/{MANIFEST}" if uri else str(Path(final) / MANIFEST), "path"),
        },
    )
    check = completeness_check(store, final, name, content, man.get("output_shards", {}))
    log(f"merge '{name}': {res.tensors} tensors, {res.bytes / 1e6:.1f} MB in {res.seconds:.1f} s on {res.device}; "
        f"published at {uri or final}")
    return StepOutput(metadata=meta, data_version=content, checks=[check])
