"""Shared pieces of the asset factories: asset keys, content hashes, code versions, upstream look-ups, metadata.

Artifacts never travel through an IO manager: each asset writes its artifact into the model store and returns a
``MaterializeResult`` whose ``data_version`` is the artifact's content hash and whose ``path`` metadata says where it
is. A downstream asset finds its inputs through the latest materialization of each upstream key.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import dagster as dg

from pipelines.spec import PipelineSpec

#: asset key prefix per node kind
KIND_PREFIX = {
    "base_models": "base_model",
    "datasets": "dataset",
    "finetunes": "finetune",
    "lora": "lora",
    "merges": "merged",
    "exports": "export",
    "evals": "eval",
}
#: bump when an asset kind's implementation changes what it produces (part of every code version)
IMPL_VERSION = {
    "base_model": "1",
    "dataset": "1",
    "finetune": "1",
    "lora": "1",
    "merged": "1",
}
from resources.artifact_files import (  # noqa: F401  (moved: shared with the Pipes entry point, re-exported)
    STORE_PLACEHOLDER,
    TEXT_SUFFIXES,
    VOLATILE_FILES,
    _normalised_sha256,
    canonical_json,
    dir_content_hash,
    file_sha256,
    human_size,
    loss_plot_png,
    main_dtype,
    read_model_card,
    safetensors_stats,
    sha256_text,
    tree_size,
)


# -- build-time context ----------------------------------------------------------------------------------------------


@dataclass
class BuildContext:
    """What every asset factory needs to know about the pipeline being built."""

    spec: PipelineSpec
    gpu_pool: str = "gpu"
    gpu_op_tags: dict[str, Any] = field(default_factory=dict)
    code_version_prefix: str | None = None

    @property
    def group(self) -> str:
        return self.spec.name

    def key(self, kind: str, name: str) -> dg.AssetKey:
        """``<kind prefix>/<pipeline>/<node>``: the pipeline name keeps two pipelines in one code location apart."""
        return dg.AssetKey([kind, self.spec.name, name])

    def model_key(self, name: str) -> dg.AssetKey:
        """The asset holding a model node's artifact (fine-tunes and adapters: their LoRA checkpoint)."""
        sec = self.spec.section_of(name)
        kind = {"base_models": "base_model", "merges": "merged", "finetunes": "lora", "adapters": "lora"}[sec]
        return self.key(kind, name)

    def owners(self, node: Any) -> list[str]:
        return list(dict.fromkeys([*self.spec.owners, *getattr(node, "owners", [])]))

    def tags(self, node: Any, kind: str) -> dict[str, str]:
        return {**self.spec.tags, **getattr(node, "tags", {}), "mergeline/pipeline": self.spec.name,
                "mergeline/node_kind": kind}

    def code_version(self, kind: str, node_config: Any, node: Any = None) -> str:
        """``[user version-]<impl version>.<hash of the node's config>``: editing a node's YAML makes the asset stale
        in the UI (code version changed); so does bumping ``code_version`` in the YAML or component."""
        digest = sha256_text(canonical_json(node_config))[:10]
        user = [v for v in (self.code_version_prefix, self.spec.code_version, getattr(node, "code_version", None)) if v]
        return "-".join([*user, f"{IMPL_VERSION.get(kind, '1')}.{digest}"])

    def description(self, node: Any, fallback: str) -> str:
        d = getattr(node, "description", None)
        return f"{d}\n\n{fallback}" if d else fallback


def node_config(node: Any) -> dict[str, Any]:
    """The node's YAML (validated, defaults filled) without its bookkeeping fields."""
    data = node.model_dump(mode="json", exclude_none=True, by_alias=True)
    for k in ("description", "owners", "tags", "code_version"):
        data.pop(k, None)
    data.pop("publish", None)  # where it is published is not part of what is built (published/… assets use it)
    return data


# -- run-time helpers ------------------------------------------------------------------------------------------------


@dataclass
class Upstream:
    key: dg.AssetKey
    path: Path
    data_version: str | None
    metadata: dict[str, Any]
    #: the store reference from ``path`` metadata: a local path, or an ``s3://`` artifact URI
    ref: str = ""


def upstream(context: dg.AssetExecutionContext, key: dg.AssetKey, *, fetch: bool = True) -> Upstream:
    """The artifact of an upstream asset, from its latest materialization (path + data version).

    With an S3 model store the ``path`` metadata is an ``s3://`` URI: the artifact is fetched into the local cache
    (verified against its commit marker) and ``.path`` is that local copy. ``fetch=False`` (thin steps that hand the
    work to another process) skips the download: ``.ref`` is the URI and ``.path`` is ``Path(ref)``."""
    event = context.instance.get_latest_materialization_event(key)
    if event is None or event.asset_materialization is None:
        raise dg.Failure(
            description=f"upstream asset {key.to_user_string()} has never been materialized; materialize it first "
                        f"(or select it together with {context.asset_key.to_user_string() if _single(context) else 'this step'})",
            allow_retries=False,
        )
    mat = event.asset_materialization
    meta = {k: getattr(v, "value", v) for k, v in mat.metadata.items()}
    path = meta.get("path")
    if not path:
        raise dg.Failure(description=f"upstream asset {key.to_user_string()} has no 'path' metadata", allow_retries=False)
    dv = (mat.tags or {}).get("dagster/data_version")
    ref = str(path)
    if ref.startswith("s3://"):
        if not fetch:
            return Upstream(key, Path(ref), dv, meta, ref)
        from resources.object_store import StoreError

        store = getattr(context.resources, "model_store", None)
        if store is None:
            raise dg.Failure(description=f"the artifact of {key.to_user_string()} is in S3 ({ref}) but this step has "
                                         f"no model_store resource to fetch it with", allow_retries=False)
        try:
            return Upstream(key, store.resolve(ref), dv, meta, ref)
        except StoreError as e:
            raise dg.Failure(description=f"{key.to_user_string()}: {e}", allow_retries=False) from None
    p = Path(ref)
    if not p.exists():
        raise dg.Failure(description=f"the artifact of {key.to_user_string()} is gone from {p}; re-materialize it",
                         allow_retries=False)
    return Upstream(key, p, dv, meta, ref)


def _single(context: dg.AssetExecutionContext) -> bool:
    try:
        return len(context.selected_asset_keys) == 1
    except Exception:
        return False


def md_json(obj: Any) -> dg.MetadataValue:
    return dg.MetadataValue.md("```json\n" + json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n```")


def artifact_metadata(path: Path, content_hash: str, *, duration_s: float, config: Any,
                      inputs: dict[str, str | None], extra: dict[str, Any] | None = None,
                      weights: bool = True) -> dict[str, Any]:
    """Metadata every artifact reports."""
    size = tree_size(path)
    uri = getattr(path, "store_uri", None)  # S3 store: the artifact's s3:// address (``path`` is the local copy)
    remote = bool(uri) and str(uri).startswith("s3://")
    meta: dict[str, Any] = {
        "path": dg.MetadataValue.path(str(uri) if remote else str(path)),
        "dagster/uri": dg.MetadataValue.url(str(uri) if remote else Path(path).absolute().as_uri()),
        "content_sha256": content_hash,
        "size_bytes": size,
        "size": human_size(size),
        "duration_s": round(duration_s, 3),
        "input_data_versions": dg.MetadataValue.json(inputs) if inputs else dg.MetadataValue.json({}),
        "config": dg.MetadataValue.json(config),
    }
    if weights:
        params, by_dtype = safetensors_stats(path)
        meta["parameter_count"] = params
        meta["dtype"] = main_dtype(by_dtype) or "n/a"
    card = read_model_card(path)
    if card:
        meta["model_card"] = dg.MetadataValue.md(card)
    if extra:
        meta.update(extra)
    return meta


def md_png(png: bytes, alt: str) -> dg.MetadataValue:
    """A PNG as markdown (the Dagster UI renders data-URI images in markdown metadata)."""
    return dg.MetadataValue.md(f"![{alt}](data:image/png;base64,{base64.b64encode(png).decode()})")
