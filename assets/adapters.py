"""``lora/<pipeline>/<name>`` for adapters produced elsewhere: a local PEFT adapter directory (used in place) or a Hub
adapter repo at a pinned revision (copied into the model store)."""

import json
import shutil
import time

import dagster as dg

from pipelines.spec import AdapterSpec
from resources.hub import HubError, HubResource, copy_snapshot
from resources.model_store import ModelStoreResource

from .common import BuildContext, artifact_metadata, dir_content_hash, node_config

ADAPTER_PATTERNS = ["adapter_config.json", "*.safetensors", "README.md", "*.json"]


def build_adapter_asset(bc: BuildContext, name: str, node: AdapterSpec) -> dg.AssetsDefinition:
    key = bc.key("lora", name)
    cfg = node_config(node)
    how = f"Hub adapter `{node.hub}` at revision `{node.revision}`" if node.hub else f"local adapter `{node.path}`"
    local = bc.spec.resolve_path(node.path) if node.path is not None else None

    @dg.asset(
        key=key,
        deps=[bc.model_key(node.base)],
        group_name=bc.group,
        description=bc.description(node, f"External LoRA adapter '{name}' for '{node.base}': {how}."),
        kinds={"peft", "huggingface" if node.hub else "safetensors"},
        owners=bc.owners(node) or None,
        tags=bc.tags(node, "lora"),
        code_version=bc.code_version("lora", cfg, node),
    )
    def _adapter(context: dg.AssetExecutionContext, model_store: ModelStoreResource,
                 hub: HubResource) -> dg.MaterializeResult:
        t0 = time.perf_counter()
        extra: dict = {}
        if local is not None and getattr(model_store, "is_remote", False):
            # remote store: steps on other machines cannot see this directory, so it is copied into the store
            if not (local / "adapter_config.json").is_file():
                raise dg.Failure(f"adapters.{name}.path: '{local}' is not a PEFT adapter directory", allow_retries=False)
            with model_store.staging("lora", name) as staged:
                shutil.copytree(local, staged)
                content, _ = dir_content_hash(staged, store_root=model_store.root_path)
                final = model_store.publish(staged, "lora", name, content)
            extra["stored"] = "model store (copied from a local directory)"
        elif local is not None:
            if not (local / "adapter_config.json").is_file():
                raise dg.Failure(f"adapters.{name}.path: '{local}' is not a PEFT adapter directory", allow_retries=False)
            content, _ = dir_content_hash(local, store_root=model_store.root_path)
            final = local
            extra["stored"] = "in place (local directory)"
        else:
            try:
                snap = hub.snapshot(node.hub, node.revision, allow_patterns=ADAPTER_PATTERNS)
            except HubError as e:
                raise dg.Failure(f"adapters.{name}: {e}", allow_retries=False) from None
            if not (snap / "adapter_config.json").is_file():
                raise dg.Failure(f"adapters.{name}: Hub repo '{node.hub}' has no adapter_config.json (not a PEFT "
                                 f"adapter)", allow_retries=False)
            with model_store.staging("lora", name) as staged:
                copy_snapshot(snap, staged)
                content, _ = dir_content_hash(staged, store_root=model_store.root_path)
                final = model_store.publish(staged, "lora", name, content)
            extra.update(hub_repo=node.hub, hub_revision=node.revision or "", hub_commit=snap.name,
                         stored="model store")
        try:
            ac = json.loads((final / "adapter_config.json").read_text())
            extra.update({"peft_type": str(ac.get("peft_type")), "r": ac.get("r", -1),
                          "lora_alpha": ac.get("lora_alpha", -1),
                          "target_modules": str(ac.get("target_modules"))})
        except (OSError, ValueError):
            pass
        meta = artifact_metadata(final, content, duration_s=time.perf_counter() - t0, config=cfg, inputs={},
                                 extra=extra)
        return dg.MaterializeResult(metadata=meta, data_version=dg.DataVersion(content))

    return _adapter
