"""``finetune/<pipeline>/<name>`` (the run record: config, loss curve, metrics) and ``lora/<pipeline>/<name>`` (the
PEFT adapter directory), produced together by one step that trains a LoRA adapter on the base and dataset(s)."""

import json
import time
from typing import Any

import dagster as dg

from pipelines.spec import FinetuneSpec
from resources.device import GpuResource
from resources.model_store import ModelStoreResource
from resources.trainer import TrainerResource

from .common import (
    BuildContext,
    artifact_metadata,
    dir_content_hash,
    loss_plot_png,
    md_json,
    md_png,
    node_config,
    upstream,
)
from .datasets import DATA_FILE

RUN_FILE = "run.json"
PLOT_FILE = "loss.png"
VOLATILE_METRICS = ("train_seconds", "tokens_per_second", "seconds_total")


def normalise_adapter_config(adapter_dir) -> None:
    """PEFT writes ``target_modules`` from a set, so its order changes with the process's hash seed; sort it (PEFT
    reads it back as a set) so that the same training gives the same bytes, and the same data version, in any
    process."""
    f = adapter_dir / "adapter_config.json"
    conf = json.loads(f.read_text())
    changed = False
    for key in ("target_modules", "modules_to_save", "exclude_modules"):
        if isinstance(conf.get(key), list):
            conf[key] = sorted(conf[key])
            changed = True
    if changed:
        f.write_text(json.dumps(conf, indent=2, sort_keys=True) + "\n")


def _run_card(name: str, base: str, datasets: list[str], record: dict) -> str:
    m = record["metrics"]
    rows = "\n".join(f"| {k} | {v} |" for k, v in sorted(m.items()) if not isinstance(v, (dict, list)))
    return (f"# Fine-tune `{name}`\n\nLoRA fine-tune of `{base}` on {', '.join(f'`{d}`' for d in datasets)} with the "
            f"`{record['backend']}` backend: {record['num_examples']} examples, final loss "
            f"{record['final_loss']:.4f}.\n\n## Hyper-parameters\n\n```json\n"
            f"{json.dumps(record['config'], indent=2, sort_keys=True)}\n```\n\n## Metrics\n\n| metric | value |\n"
            f"|---|---|\n{rows}\n")


def build_finetune_assets(bc: BuildContext, name: str, node: FinetuneSpec, retry_policy: dg.RetryPolicy
                          ) -> dg.AssetsDefinition:
    run_key = bc.key("finetune", name)
    lora_key = bc.key("lora", name)
    base_key = bc.model_key(node.base)
    dataset_keys = [bc.key("dataset", d) for d in node.datasets]
    cfg = node_config(node)
    overrides = node.train_overrides()
    backend_kind = {"unsloth": "unsloth", "peft": "peft"}.get(node.backend or "", "peft")
    specs = [
        dg.AssetSpec(
            run_key, deps=[base_key, *dataset_keys], group_name=bc.group,
            description=bc.description(node, f"Fine-tune run '{name}': LoRA training of '{node.base}' on "
                                             f"{', '.join(node.datasets)} (loss curve, metrics, config)."),
            kinds={"pytorch", backend_kind}, owners=bc.owners(node) or None, tags=bc.tags(node, "finetune"),
            code_version=bc.code_version("finetune", cfg, node),
        ),
        dg.AssetSpec(
            lora_key, deps=[run_key], group_name=bc.group,
            description=bc.description(node, f"LoRA checkpoint of fine-tune '{name}' (a PEFT adapter directory for "
                                             f"'{node.base}')."),
            kinds={"peft", "safetensors"}, owners=bc.owners(node) or None, tags=bc.tags(node, "lora"),
            code_version=bc.code_version("lora", cfg, node),
        ),
    ]

    @dg.multi_asset(
        name=f"finetune__{bc.spec.name}__{name}",
        specs=specs,
        pool=bc.gpu_pool,
        op_tags=bc.gpu_op_tags or None,
        retry_policy=retry_policy,
    )
    def _finetune(context: dg.AssetExecutionContext, gpu: GpuResource, model_store: ModelStoreResource,
                  trainer: TrainerResource):
        from resources.training_backend import DatasetError, TrainingError

        t0 = time.perf_counter()
        base = upstream(context, base_key)
        data = [upstream(context, k) for k in dataset_keys]
        files = [d.path / DATA_FILE for d in data]
        inputs = {base.key.to_user_string(): base.data_version, **{d.key.to_user_string(): d.data_version for d in data}}
        try:
            device = gpu.resolved_device()
        except Exception as e:
            raise dg.Failure(f"finetunes.{name}: {e}", allow_retries=False) from None
        with model_store.staging("lora", name) as staged:
            try:
                train_cfg, res = trainer.train(base.path, files, overrides, staged, device=device,
                                               log=context.log.info)
            except (DatasetError, TrainingError, ValueError) as e:
                raise dg.Failure(f"finetunes.{name}: {e}", allow_retries=False) from None
            normalise_adapter_config(staged)
            adapter_hash, _ = dir_content_hash(staged, store_root=model_store.root_path)
            adapter_dir = model_store.publish(staged, "lora", name, adapter_hash)
        train_s = time.perf_counter() - t0

        metrics = {k: v for k, v in res.metrics.items() if k not in VOLATILE_METRICS}
        record: dict[str, Any] = {
            "finetune": name,
            "pipeline": bc.spec.name,
            "backend": res.backend,
            "config": train_cfg.model_dump(mode="json"),
            "base": {"key": base.key.to_user_string(), "data_version": base.data_version, "path": str(base.path)},
            "datasets": [{"key": d.key.to_user_string(), "data_version": d.data_version, "path": str(d.path)}
                         for d in data],
            "adapter": {"path": str(adapter_dir), "content_sha256": adapter_hash},
            "num_examples": res.num_examples,
            "losses": [[int(s), float(v)] for s, v in res.losses],
            "final_loss": float(res.final_loss),
            "metrics": metrics,
        }
        png = loss_plot_png(res.losses, f"{bc.spec.name}/{name}: training loss ({res.backend})")
        with model_store.staging("finetune", name) as staged_run:
            staged_run.mkdir(parents=True)
            (staged_run / RUN_FILE).write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
            (staged_run / PLOT_FILE).write_bytes(png)
            (staged_run / "README.md").write_text(_run_card(name, node.base, node.datasets, record))
            run_hash, _ = dir_content_hash(staged_run, store_root=model_store.root_path)
            run_dir = model_store.publish(staged_run, "finetune", name, run_hash)

        loss_table = dg.MetadataValue.table(
            records=[dg.TableRecord({"step": int(s), "loss": float(v)}) for s, v in res.losses],
            schema=dg.TableSchema(columns=[dg.TableColumn("step", "int"), dg.TableColumn("loss", "float")]),
        )
        scalar_metrics = {f"metric/{k}": v for k, v in metrics.items()
                          if isinstance(v, (int, float)) and not isinstance(v, bool)}
        run_meta = artifact_metadata(
            run_dir, run_hash, duration_s=train_s, config=record["config"], inputs=inputs, weights=False,
            extra={
                "backend": res.backend,
                "device": device,
                "final_loss": float(res.final_loss),
                "num_examples": res.num_examples,
                "train_seconds": round(res.seconds, 3),
                "loss_curve": loss_table,
                "loss_plot": md_png(png, f"training loss of {name}"),
                "loss_plot_file": dg.MetadataValue.path(str(run_dir / PLOT_FILE)),
                "metrics": md_json(res.metrics),
                "adapter_path": dg.MetadataValue.path(str(adapter_dir)),
                **scalar_metrics,
            },
        )
        lora_meta = artifact_metadata(
            adapter_dir, adapter_hash, duration_s=train_s, config=record["config"],
            inputs={run_key.to_user_string(): run_hash, **inputs},
            extra={"backend": res.backend, "base_model_path": dg.MetadataValue.path(str(base.path)),
                   "r": train_cfg.r, "lora_alpha": train_cfg.alpha, "target_modules": ", ".join(train_cfg.target_modules),
                   "final_loss": float(res.final_loss)},
        )
        context.log.info(f"fine-tune '{name}': final loss {res.final_loss:.4f} after {len(res.losses)} steps "
                         f"({res.backend}); adapter at {adapter_dir}")
        yield dg.MaterializeResult(asset_key=run_key, metadata=run_meta, data_version=dg.DataVersion(run_hash))
        yield dg.MaterializeResult(asset_key=lora_key, metadata=lora_meta, data_version=dg.DataVersion(adapter_hash))

    return _finetune

