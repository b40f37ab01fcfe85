"""``export/<pipeline>/<name>``: a model of the pipeline exported as GGUF, bitsandbytes 4-bit or a re-cast safetensors
checkpoint, with its size, compression ratio and a logit-fidelity figure against the unquantized model.

The exported model is a base model or merge (used as it is) or a fine-tune (its LoRA merged into its base first,
streamed, into a scratch directory). When the pipeline declares evals of the same model, the export also depends on
those eval assets, so an eval whose blocking checks fail stops the export. Heavy work runs in the GPU pool like
merges, through the ``launcher`` resource (in process, a subprocess or a pod via Dagster Pipes:
the work is :mod:`resources.export_step`); bad input fails at once, without retries.
"""


import dagster as dg

from pipelines.spec import ExportSpec
from resources.device import GpuResource
from resources.launcher import StepLauncherResource
from resources.model_store import ModelStoreResource

from .common import BuildContext, node_config, upstream
from .merges import split_ref

KIND_TAG = {"gguf": "gguf", "bnb": "bitsandbytes", "safetensors": "safetensors"}


def export_dep_keys(bc: BuildContext, node: ExportSpec) -> tuple[list[dg.AssetKey], list[dg.AssetKey]]:
    """(model artifact keys, eval keys) an export depends on."""
    model, adapter = split_ref(bc.spec, node.model)
    keys = [bc.model_key(model)] + ([bc.model_key(adapter)] if adapter else [])
    evals = [bc.key("eval", e) for e, ev in bc.spec.evals.items() if ev.model == node.model] if bc.spec.evals else []
    return keys, evals


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
    def _export(context: dg.AssetExecutionContext, gpu: GpuResource, model_store: ModelStoreResource,
                launcher: StepLauncherResource) -> dg.MaterializeResult:
        # thin: the inputs' store references (no download) go to the launcher, which runs resources/export_step.py
        # here, in a subprocess or in a GPU pod (Dagster Pipes)
        ups = {k: upstream(context, k, fetch=False) for k in model_keys}
        request = {
            "name": name,
            "type": node.type,
            "quant": node.quant,
            "model": node.model,
            "fidelity": bool(node.fidelity),
            "node_config": cfg,
            "model_ref": ups[bc.model_key(model)].ref,
            "adapter_ref": ups[bc.model_key(adapter)].ref if adapter else None,
            "inputs": {k.to_user_string(): u.data_version for k, u in ups.items()},
            "device": gpu.device,
            "options": gpu.merge_options().model_dump(mode="json"),
            "gated_by_evals": [k.to_user_string() for k in eval_keys],
        }
        return launcher.run(context, "export", request, model_store=model_store, gpu=gpu)

    return _export

