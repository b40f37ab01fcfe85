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
#: files whose bytes change from run to run without the artifact changing (timings, library versions)
VOLATILE_FILES = {"mergeline.json"}


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(8 * 1024 * 1024), b""):
            h.update(block)
    return h.hexdigest()


TEXT_SUFFIXES = {".json", ".md", ".txt", ".yaml", ".yml", ".jinja"}
STORE_PLACEHOLDER = b"<mergeline-store>"


def _normalised_sha256(path: Path, replace: bytes | None) -> str:
    """sha256 of a file; in small text files the model store's root is replaced by a placeholder first (configs and
    model cards name their inputs by path), so a data version does not depend on where the store lives."""
    if replace and path.suffix.lower() in TEXT_SUFFIXES and path.stat().st_size < 64 * 2**20:
        return hashlib.sha256(path.read_bytes().replace(replace, STORE_PLACEHOLDER)).hexdigest()
    return file_sha256(path)


def dir_content_hash(path: Path, *, known: dict[str, str] | None = None, exclude: Iterable[str] = VOLATILE_FILES,
                     store_root: Path | str | None = None) -> tuple[str, dict[str, str]]:
    """sha256 over the sorted (relative path, file sha256) pairs of a directory (or of one file).

    ``known`` maps relative paths to hashes computed elsewhere (the merge engine hashes shards while writing them);
    ``exclude`` names files left out (a manifest with timings); ``store_root``: occurrences of this path in text
    files are normalised (see :func:`_normalised_sha256`)."""
    path = Path(path)
    known = known or {}
    skip = set(exclude)
    replace = str(store_root).encode() if store_root else None
    files: dict[str, str] = {}
    if path.is_file():
        files[path.name] = _normalised_sha256(path, replace)
    else:
        for f in sorted(path.rglob("*")):
            if not f.is_file():
                continue
            rel = f.relative_to(path).as_posix()
            if rel in skip or any(part.startswith(".") for part in f.relative_to(path).parts):
                continue
            files[rel] = known.get(rel) or _normalised_sha256(f, replace)
    h = hashlib.sha256()
    for rel in sorted(files):
        h.update(f"{rel}\0{files[rel]}\n".encode())
    return h.hexdigest(), files


def tree_size(path: Path) -> int:
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def human_size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"


def safetensors_stats(path: Path) -> tuple[int, dict[str, int]]:
    """(parameter count, {dtype: parameters}) from the safetensors headers of a directory (no tensor is read)."""
    total = 0
    by_dtype: dict[str, int] = {}
    files = [path] if Path(path).is_file() else sorted(Path(path).glob("*.safetensors"))
    for f in files:
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        for name, info in header.items():
            if name == "__metadata__":
                continue
            count = 1
            for d in info["shape"]:
                count *= d
            total += count
            by_dtype[info["dtype"]] = by_dtype.get(info["dtype"], 0) + count
    return total, by_dtype


def main_dtype(by_dtype: dict[str, int]) -> str | None:
    names = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64", "I8": "int8", "U8": "uint8"}
    if not by_dtype:
        return None
    top = max(by_dtype, key=by_dtype.get)
    return names.get(top, top.lower())


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


def upstream(context: dg.AssetExecutionContext, key: dg.AssetKey) -> Upstream:
    """The artifact of an upstream asset, from its latest materialization (path + data version)."""
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
    p = Path(str(path))
    if not p.exists():
        raise dg.Failure(description=f"the artifact of {key.to_user_string()} is gone from {p}; re-materialize it",
                         allow_retries=False)
    dv = (mat.tags or {}).get("dagster/data_version")
    return Upstream(key, p, dv, meta)


def _single(context: dg.AssetExecutionContext) -> bool:
    try:
        return len(context.selected_asset_keys) == 1
    except Exception:
        return False


def md_json(obj: Any) -> dg.MetadataValue:
    return dg.MetadataValue.md("```json\n" + json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n```")


def read_model_card(path: Path, limit: int = 20000) -> str | None:
    f = Path(path) / "README.md"
    if not f.is_file():
        return None
    text = f.read_text(errors="replace")
    return text if len(text) <= limit else text[:limit] + "\n\n…(truncated)"


def artifact_metadata(path: Path, content_hash: str, *, duration_s: float, config: Any,
                      inputs: dict[str, str | None], extra: dict[str, Any] | None = None,
                      weights: bool = True) -> dict[str, Any]:
    """Metadata every artifact reports."""
    size = tree_size(path)
    meta: dict[str, Any] = {
        "path": dg.MetadataValue.path(str(path)),
        "dagster/uri": dg.MetadataValue.url(Path(path).absolute().as_uri()),
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


def loss_plot_png(losses: list[tuple[int, float]], title: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=100)
    if losses:
        ax.plot([s for s, _ in losses], [v for _, v in losses], marker="." if len(losses) < 60 else None)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def md_png(png: bytes, alt: str) -> dg.MetadataValue:
    """A PNG as markdown (the Dagster UI renders data-URI images in markdown metadata)."""
    return dg.MetadataValue.md(f"![{alt}](data:image/png;base64,{base64.b64encode(png).decode()})")
