"""``finetune/<pipeline>/<name>`` (the run record: config, loss curve, metrics) and ``lora/<pipeline>/<name>`` (the
PEFT adapter directory), produced together by one step that trains a LoRA adapter on the base and dataset(s)."""

import json
import time
from typing import Any

import dagster as dg

from pipelines.spec import FinetuneSpec
from resources.device import GpuResource
from resources.launcher import StepLauncherResource
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

from resources.finetune_step import (  # noqa: F401  (moved: shared with the Pipes entry point, re-exported)
    PLOT_FILE,
    RUN_FILE,
    VOLATILE_METRICS,
    normalise_adapter_config,
    run_card as _run_card,
)


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
                  trainer: TrainerResource, launcher: StepLauncherResource):
        # thin: the inputs' store references (no download) and the resolved training config go to the launcher,
        # which runs resources/finetune_step.py here, in a subprocess or in a GPU pod (Dagster Pipes)
        base = upstream(context, base_key, fetch=False)
        data = [upstream(context, k, fetch=False) for k in dataset_keys]
        try:
            train_cfg = trainer.train_config(overrides)
        except ValueError as e:
            raise dg.Failure(f"finetunes.{name}: {e}", allow_retries=False) from None
        request = {
            "name": name,
            "pipeline": bc.spec.name,
            "node_base": node.base,
            "node_datasets": list(node.datasets),
            "run_key": run_key.to_user_string(),
            "lora_key": lora_key.to_user_string(),
            "base": {"key": base.key.to_user_string(), "ref": base.ref, "data_version": base.data_version},
            "datasets": [{"key": d.key.to_user_string(), "ref": d.ref, "data_version": d.data_version} for d in data],
            "train_config": train_cfg.model_dump(mode="json"),
            "device": gpu.device,
        }
        yield from launcher.run_all(context, "finetune", request, model_store=model_store, gpu=gpu)

    return _finetune

