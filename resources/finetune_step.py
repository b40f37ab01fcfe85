"""The ``finetune`` step: train a LoRA adapter on a base model and dataset(s) found through the store; publish the
adapter (``lora/…``) and the run record (``finetune/…``). Dagster-free (see :mod:`resources.pipes_steps`);
``assets/finetunes.py`` builds the request and a launcher runs it in process, in a subprocess or in a GPU pod.

Request keys: ``name``, ``pipeline``, ``node_base`` and ``node_datasets`` (node names, for the model card),
``run_key`` and ``lora_key`` (asset keys as user strings), ``base`` (``{"key", "ref", "data_version"}``),
``datasets`` (list of the same), ``train_config`` (a ``LoraTrainConfig`` dump), ``device`` (the gpu resource's).
"""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path
from typing import Any, Callable

from .artifact_files import dir_content_hash, loss_plot_png
from .object_store import ArtifactStore, StoreError
from .pipes_steps import StepInputError, StepOutput, artifact_metadata, artifact_uri, md_json, mv, register_step

RUN_FILE = "run.json"
PLOT_FILE = "loss.png"
DATA_FILE = "data.jsonl"
VOLATILE_METRICS = ("train_seconds", "tokens_per_second", "seconds_total")


def normalise_adapter_config(adapter_dir) -> None:
    """PEFT writes ``target_modules`` from a set, so its order changes with the process's hash seed; sort it (PEFT
    reads it back as a set) so that the same training gives the same bytes, and the same data version, in any
    process."""
    f = Path(adapter_dir) / "adapter_config.json"
    conf = json.loads(f.read_text())
    changed = False
    for key in ("target_modules", "modules_to_save", "exclude_modules"):
        if isinstance(conf.get(key), list):
            conf[key] = sorted(conf[key])
            changed = True
    if changed:
        f.write_text(json.dumps(conf, indent=2, sort_keys=True) + "\n")


def run_card(name: str, base: str, datasets: list[str], record: dict) -> str:
    m = record["metrics"]
    rows = "\n".join(f"| {k} | {v} |" for k, v in sorted(m.items()) if not isinstance(v, (dict, list)))
    return (f"# Fine-tune `{name}`\n\nLoRA fine-tune of `{base}` on {', '.join(f'`{d}`' for d in datasets)} with the "
            f"`{record['backend']}` backend: {record['num_examples']} examples, final loss "
            f"{record['final_loss']:.4f}.\n\n## Hyper-parameters\n\n```json\n"
            f"{json.dumps(record['config'], indent=2, sort_keys=True)}\n```\n\n## Metrics\n\n| metric | value |\n"
            f"|---|---|\n{rows}\n")


def md_png(png: bytes, alt: str) -> dict[str, Any]:
    return mv(f"![{alt}](data:image/png;base64,{base64.b64encode(png).decode()})", "md")


def _shown(path: Path, file: str | None = None) -> str:
    """How metadata names a stored file or directory: its s3:// address, else the local path."""
    uri = artifact_uri(path)
    if uri:
        return f"{uri}/{file}" if file else uri
    return str(Path(path) / file) if file else str(path)


def resolve_device(device: str) -> str:
    from merge_ops.device import resolve_device as _resolve

    dev = _resolve(device)
    return str(dev) if dev.type == "cpu" else f"cuda:{dev.index or 0}"


@register_step("finetune")
def finetune_step(request: dict[str, Any], store: ArtifactStore, log: Callable[[str], None]) -> StepOutput:
    from resources.training_backend import DatasetError, LoraTrainConfig, TrainingError, train_lora

    t0 = time.perf_counter()
    name = request["name"]
    try:
        device = resolve_device(request.get("device") or "auto")
    except Exception as e:  # merge_ops' ConfigError: CUDA asked for but missing
        raise StepInputError(f"finetunes.{name}: {e}") from None
    try:
        base_path = store.resolve(request["base"]["ref"])
        data_paths = [store.resolve(d["ref"]) for d in request["datasets"]]
    except StoreError as e:
        raise StepInputError(f"finetunes.{name}: {e}") from None
    files = [p / DATA_FILE for p in data_paths]
    inputs = {request["base"]["key"]: request["base"]["data_version"],
              **{d["key"]: d["data_version"] for d in request["datasets"]}}
    train_cfg = LoraTrainConfig.model_validate(request["train_config"])
    with store.staging("lora", name) as staged:
        try:
            res = train_lora(base_path, files, train_cfg, staged, device=device, log=log)
        except (DatasetError, TrainingError, ValueError) as e:
            raise StepInputError(f"finetunes.{name}: {e}") from None
        normalise_adapter_config(staged)
        adapter_hash, _ = dir_content_hash(staged, store_root=store.root_path)
        adapter_dir = store.publish(staged, "lora", name, adapter_hash)
    train_s = time.perf_counter() - t0

    metrics = {k: v for k, v in res.metrics.items() if k not in VOLATILE_METRICS}
    record: dict[str, Any] = {
        "finetune": name,
        "pipeline": request["pipeline"],
        "backend": res.backend,
        "config": train_cfg.model_dump(mode="json"),
        "base": {"key": request["base"]["key"], "data_version": request["base"]["data_version"],
                 "path": str(base_path)},
        "datasets": [{"key": d["key"], "data_version": d["data_version"], "path": str(p)}
                     for d, p in zip(request["datasets"], data_paths)],
        "adapter": {"path": str(adapter_dir), "content_sha256": adapter_hash},
        "num_examples": res.num_examples,
        "losses": [[int(s), float(v)] for s, v in res.losses],
        "final_loss": float(res.final_loss),
        "metrics": metrics,
    }
    png = loss_plot_png(res.losses, f"{request['pipeline']}/{name}: training loss ({res.backend})")
    with store.staging("finetune", name) as staged_run:
        staged_run.mkdir(parents=True)
        (staged_run / RUN_FILE).write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
        (staged_run / PLOT_FILE).write_bytes(png)
        (staged_run / "README.md").write_text(run_card(name, request["node_base"], request["node_datasets"], record))
        run_hash, _ = dir_content_hash(staged_run, store_root=store.root_path)
        run_dir = store.publish(staged_run, "finetune", name, run_hash)

    loss_table = mv({"records": [{"step": int(s), "loss": float(v)} for s, v in res.losses],
                     "schema": [{"name": "step", "type": "int"}, {"name": "loss", "type": "float"}]}, "table")
    scalar_metrics = {f"metric/{k}": mv(v) for k, v in metrics.items()
                      if isinstance(v, (int, float)) and not isinstance(v, bool)}
    run_meta = artifact_metadata(
        run_dir, run_hash, duration_s=train_s, config=record["config"], inputs=inputs, weights=False,
        extra={
            "backend": mv(res.backend),
            "device": mv(device),
            "final_loss": mv(float(res.final_loss)),
            "num_examples": mv(res.num_examples),
            "train_seconds": mv(round(res.seconds, 3)),
            "loss_curve": loss_table,
            "loss_plot": md_png(png, f"training loss of {name}"),
            "loss_plot_file": mv(_shown(run_dir, PLOT_FILE), "path"),
            "metrics": md_json(res.metrics),
            "adapter_path": mv(_shown(adapter_dir), "path"),
            **scalar_metrics,
        },
    )
    lora_meta = artifact_metadata(
        adapter_dir, adapter_hash, duration_s=train_s, config=record["config"],
        inputs={request["run_key"]: run_hash, **inputs},
        extra={"backend": mv(res.backend), "base_model_path": mv(request["base"]["ref"], "path"),
               "r": mv(train_cfg.r), "lora_alpha": mv(train_cfg.alpha),
               "target_modules": mv(", ".join(train_cfg.target_modules)), "final_loss": mv(float(res.final_loss))},
    )
    log(f"fine-tune '{name}': final loss {res.final_loss:.4f} after {len(res.losses)} steps ({res.backend}); "
        f"adapter at {_shown(adapter_dir)}")
    lora_out = StepOutput(metadata=lora_meta, data_version=adapter_hash, asset_key=request["lora_key"])
    return StepOutput(metadata=run_meta, data_version=run_hash, asset_key=request["run_key"], also=[lora_out])
