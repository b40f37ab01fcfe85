"""``dataset/<pipeline>/<name>``: training data normalised to one ``data.jsonl`` (records with ``text``, or
``prompt`` and ``completion``) in the model store, from local jsonl/json/parquet files, a Hub dataset at a pinned
revision, inline records or a deterministic toy generator."""

import fnmatch
import json
import time
from pathlib import Path
from typing import Any, Iterator

import dagster as dg

from pipelines.spec import DatasetSpec
from resources.hub import HubError, HubResource
from resources.model_store import ModelStoreResource

from .common import BuildContext, artifact_metadata, dir_content_hash, node_config

DATA_FILE = "data.jsonl"


class DatasetError(ValueError):
    pass


def _read_records(path: Path) -> Iterator[dict[str, Any]]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        with open(path) as f:
            for i, line in enumerate(f, 1):
                if line.strip():
                    try:
                        yield json.loads(line)
                    except json.JSONDecodeError as e:
                        raise DatasetError(f"{path}:{i}: not valid JSON ({e})") from None
    elif suffix == ".json":
        data = json.loads(path.read_text())
        if isinstance(data, dict):
            data = data.get("data", data.get("rows"))
        if not isinstance(data, list):
            raise DatasetError(f"{path}: expected a list of records (or {{'data': [...]}})")
        yield from data
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        for batch in table.to_batches(max_chunksize=4096):
            yield from batch.to_pylist()
    else:
        raise DatasetError(f"{path}: unsupported file type '{suffix}' (use .jsonl, .json or .parquet)")


def normalise(rec: Any, node: DatasetSpec, where: str) -> dict[str, str]:
    """One training record: ``{"text"}`` or ``{"prompt", "completion"}``, using the node's field mapping."""
    if not isinstance(rec, dict):
        raise DatasetError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    if node.text_field:
        if not isinstance(rec.get(node.text_field), str):
            raise DatasetError(f"{where}: no string field '{node.text_field}' (fields: {', '.join(map(str, rec))})")
        return {"text": rec[node.text_field]}
    if node.prompt_field:
        p, c = rec.get(node.prompt_field), rec.get(node.completion_field)
        if not isinstance(p, str) or not isinstance(c, str):
            raise DatasetError(f"{where}: needs string fields '{node.prompt_field}' and '{node.completion_field}' "
                               f"(fields: {', '.join(map(str, rec))})")
        return {"prompt": p, "completion": c}
    if isinstance(rec.get("prompt"), str) and isinstance(rec.get("completion"), str):
        return {"prompt": rec["prompt"], "completion": rec["completion"]}
    if isinstance(rec.get("text"), str):
        return {"text": rec["text"]}
    raise DatasetError(f"{where}: a record needs 'text' or 'prompt'+'completion' (fields: {', '.join(map(str, rec))}); "
                       f"map other fields with text_field or prompt_field/completion_field")


def hub_dataset_files(root: Path, patterns: list[str] | None) -> list[Path]:
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in (".jsonl", ".json", ".parquet")
                   and ".cache" not in p.relative_to(root).parts)
    if patterns:
        files = [p for p in files if any(fnmatch.fnmatch(p.relative_to(root).as_posix(), pat) for pat in patterns)]
    return files


def write_dataset(node: DatasetSpec, name: str, out: Path, *, source_files: list[Path] | None = None) -> dict:
    """Write ``out/data.jsonl`` (+ ``dataset.json``); returns the info dict."""
    from .toy_data import generate

    out.mkdir(parents=True)
    count, fields = 0, set()
    preview: list[dict[str, str]] = []
    with open(out / DATA_FILE, "w") as f:
        if node.generated is not None:
            g = node.generated
            records: Iterator[tuple[str, Any]] = ((f"generated[{i}]", r) for i, r in enumerate(generate(g.kind, g.n, g.seed)))
        elif node.inline is not None:
            records = ((f"datasets.{name}.inline[{i}]", r) for i, r in enumerate(node.inline))
        else:
            records = ((f"{p}[{i}]", r) for p in source_files or [] for i, r in enumerate(_read_records(p)))
        for where, rec in records:
            if node.limit is not None and count >= node.limit:
                break
            r = normalise(rec, node, where)
            f.write(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n")
            count += 1
            fields.update(r)
            if len(preview) < 5:
                preview.append(r)
    if count == 0:
        raise DatasetError(f"datasets.{name}: no records")
    info = {"records": count, "fields": sorted(fields), "format": "prompt/completion" if "prompt" in fields else "text"}
    (out / "dataset.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    info["preview"] = preview
    return info


def build_dataset_asset(bc: BuildContext, name: str, node: DatasetSpec) -> dg.AssetsDefinition:
    key = bc.key("dataset", name)
    cfg = node_config(node)
    if node.generated is not None:
        kinds, how = {"python", "json"}, f"generated toy skill '{node.generated.kind}' ({node.generated.n} records)"
    elif node.inline is not None:
        kinds, how = {"json"}, f"{len(node.inline)} inline records"
    elif node.hub is not None:
        kinds, how = {"huggingface", "json"}, f"Hub dataset `{node.hub}` at revision `{node.revision}`"
    else:
        kinds = {"parquet" if any(p.endswith(".parquet") for p in node.paths) else "json"}
        how = "local file(s) " + ", ".join(f"`{p}`" for p in node.paths)
    local_files = [bc.spec.resolve_path(p) for p in node.paths]

    @dg.asset(
        key=key,
        group_name=bc.group,
        description=bc.description(node, f"Dataset '{name}': {how}, normalised to jsonl."),
        kinds=kinds,
        owners=bc.owners(node) or None,
        tags=bc.tags(node, "dataset"),
        code_version=bc.code_version("dataset", cfg, node),
    )
    def _dataset(context: dg.AssetExecutionContext, model_store: ModelStoreResource,
                 hub: HubResource) -> dg.MaterializeResult:
        t0 = time.perf_counter()
        extra: dict[str, Any] = {}
        files = local_files
        if node.hub is not None:
            try:
                snap = hub.snapshot(node.hub, node.revision, repo_type="dataset", allow_patterns=node.files)
            except HubError as e:
                raise dg.Failure(f"datasets.{name}: {e}", allow_retries=False) from None
            files = hub_dataset_files(snap, node.files)
            if not files:
                raise dg.Failure(f"datasets.{name}: Hub dataset '{node.hub}' has no .jsonl/.json/.parquet files"
                                 + (f" matching {node.files}" if node.files else ""), allow_retries=False)
            extra.update(hub_repo=node.hub, hub_revision=node.revision or "", hub_commit=snap.name)
        for f in files:
            if not f.is_file():
                raise dg.Failure(f"datasets.{name}: file '{f}' does not exist", allow_retries=False)
        with model_store.staging("dataset", name) as staged:
            try:
                info = write_dataset(node, name, staged, source_files=files)
            except DatasetError as e:
                raise dg.Failure(str(e), allow_retries=False) from None
            content, _ = dir_content_hash(staged, store_root=model_store.root_path)
            final = model_store.publish(staged, "dataset", name, content)
        preview = info.pop("preview")
        cols = sorted({k for r in preview for k in r})
        extra.update({
            "dagster/row_count": info["records"],
            "format": info["format"],
            "data_file": dg.MetadataValue.path(str(final / DATA_FILE)),
            "preview": dg.MetadataValue.md(
                "| " + " | ".join(cols) + " |\n|" + "---|" * len(cols) + "\n"
                + "\n".join("| " + " | ".join(json.dumps(r.get(c, ""))[1:-1].replace("|", "\\|") for c in cols) + " |"
                            for r in preview)),
            "source_files": dg.MetadataValue.json([str(f) for f in files]),
        })
        meta = artifact_metadata(final, content, duration_s=time.perf_counter() - t0, config=cfg, inputs={},
                                 extra=extra, weights=False)
        context.log.info(f"dataset '{name}': {info['records']} records at {final}")
        return dg.MaterializeResult(metadata=meta, data_version=dg.DataVersion(content))

    return _dataset
