"""``base_model/<pipeline>/<name>``: a toy model built locally, a local model directory, or a Hub snapshot at a
pinned revision copied into the model store."""

import json
import shutil
import time
from pathlib import Path

import dagster as dg

from pipelines.spec import BaseModelSpec
from resources.hub import HubError, HubResource, copy_snapshot
from resources.model_store import ModelStoreResource

from .common import BuildContext, artifact_metadata, dir_content_hash, node_config

HUB_MODEL_PATTERNS = ["*.safetensors", "*.json", "tokenizer.model", "*.txt", "*.jinja", "README.md"]


def save_toy_tokenizer(path: Path, vocab_size: int) -> None:
    """A byte-level BPE tokenizer whose alphabet covers printable ASCII (so digits and letters of the toy skills
    are real tokens), trained on a fixed corpus: deterministic."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from .toy_data import tokenizer_corpus

    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    # byte-level symbols of printable ASCII: 33..126 map to themselves, space -> 'Ġ', newline -> 'Ċ'
    alphabet = [chr(b) for b in range(33, 127)] + ["\u0120", "\u010a"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=alphabet)
    tok.train_from_iterator(tokenizer_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")
    fast.save_pretrained(str(path))


def build_toy_model(node: BaseModelSpec, out: Path, name: str) -> None:
    import torch

    from pipelines.toy_models import save_tiny_llama

    t = node.toy
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[t.dtype]
    save_tiny_llama(out, seed=t.seed, dtype=dtype, num_layers=t.num_layers, hidden=t.hidden, vocab=t.vocab,
                    tie=t.tie, tokenizer=False)
    save_toy_tokenizer(out, t.vocab)
    cfg = json.loads((out / "config.json").read_text())
    cfg.update({"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3})
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    (out / "README.md").write_text(
        "---\nlibrary_name: transformers\ntags: [mergeline, toy]\n---\n\n"
        f"# {name} (toy)\n\nA randomly initialised `LlamaForCausalLM` built locally by mergeline for demos and tests: "
        f"{t.num_layers} layers, hidden size {t.hidden}, vocabulary {t.vocab}, `{t.dtype}`, seed {t.seed}, "
        f"tied embeddings: {t.tie}. Its byte-level BPE tokenizer is trained on a fixed corpus. It knows nothing "
        f"until fine-tuned.\n")


def build_base_model_asset(bc: BuildContext, name: str, node: BaseModelSpec) -> dg.AssetsDefinition:
    key = bc.key("base_model", name)
    cfg = node_config(node)
    if node.toy is not None:
        kinds, how = {"pytorch", "safetensors"}, "a toy Llama built locally"
    elif node.hub is not None:
        kinds, how = {"huggingface", "safetensors"}, f"Hub model `{node.hub}` at revision `{node.revision}`"
    else:
        kinds, how = {"safetensors"}, f"local model directory `{node.path}`"
    local_path = bc.spec.resolve_path(node.path) if node.path is not None else None

    @dg.asset(
        key=key,
        group_name=bc.group,
        description=bc.description(node, f"Base model '{name}': {how}."),
        kinds=kinds,
        owners=bc.owners(node) or None,
        tags=bc.tags(node, "base_model"),
        code_version=bc.code_version("base_model", cfg, node),
        metadata={"source": how},
    )
    def _base_model(context: dg.AssetExecutionContext, model_store: ModelStoreResource,
                    hub: HubResource) -> dg.MaterializeResult:
        t0 = time.perf_counter()
        extra: dict = {}
        if local_path is not None and not getattr(model_store, "is_remote", False):
            # used in place: the content hash says whether it changed since the last materialization
            if not (local_path / "config.json").is_file():
                raise dg.Failure(f"base_models.{name}.path: '{local_path}' is not a model directory", allow_retries=False)
            content, _ = dir_content_hash(local_path, store_root=model_store.root_path)
            final = local_path
            extra["stored"] = "in place (local directory)"
        else:
            with model_store.staging("base_model", name) as staged:
                if local_path is not None:  # remote store: steps on other machines cannot see this directory
                    if not (local_path / "config.json").is_file():
                        raise dg.Failure(f"base_models.{name}.path: '{local_path}' is not a model directory",
                                         allow_retries=False)
                    shutil.copytree(local_path, staged)
                elif node.toy is not None:
                    build_toy_model(node, staged, name)
                else:
                    try:
                        snap = hub.snapshot(node.hub, node.revision, allow_patterns=node.allow_patterns or HUB_MODEL_PATTERNS)
                    except HubError as e:
                        raise dg.Failure(f"base_models.{name}: {e}", allow_retries=False) from None
                    copy_snapshot(snap, staged)
                    extra["hub_repo"] = node.hub
                    extra["hub_revision"] = node.revision
                    extra["hub_commit"] = snap.name
                content, _ = dir_content_hash(staged, store_root=model_store.root_path)
                final = model_store.publish(staged, "base_model", name, content)
            extra["stored"] = "model store"
        try:
            conf = json.loads((final / "config.json").read_text())
            archs = conf.get("architectures") or []
            extra["architecture"] = archs[0] if archs else conf.get("model_type", "unknown")
            extra["num_hidden_layers"] = conf.get("num_hidden_layers", -1)
            extra["hidden_size"] = conf.get("hidden_size", -1)
        except (OSError, ValueError):
            pass
        meta = artifact_metadata(final, content, duration_s=time.perf_counter() - t0, config=cfg, inputs={},
                                 extra=extra)
        context.log.info(f"base model '{name}' at {final} ({meta['size']}, {meta['parameter_count']} parameters)")
        return dg.MaterializeResult(metadata=meta, data_version=dg.DataVersion(content))

    return _base_model
