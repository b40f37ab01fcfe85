"""The ``export/<pipeline>/<name>`` assets: graph wiring (model deps, eval gates, fine-tunes through their base and
LoRA) and a real materialization of a small pipeline with bnb and safetensors exports (files, data versions,
metadata with size, compression ratio and fidelity)."""

from __future__ import annotations

import json
from pathlib import Path

import dagster as dg
import pytest

REPO = Path(__file__).resolve().parent.parent
import torch

from assets.common import dir_content_hash
from pipelines.builder import build_definitions
from pipelines.spec import parse_pipeline
from resources.model_store import ModelStoreResource

pytest.importorskip("bitsandbytes")


def _pipeline(**extra) -> dict:
    toy = {"num_layers": 2, "hidden": 64, "vocab": 128, "dtype": "bfloat16"}
    d = {
        "name": "exp",
        "base_models": {"a": {"toy": {"seed": 0, **toy}}, "b": {"toy": {"seed": 1, **toy}}},
        "merges": {"ab": {"method": "linear", "models": [{"model": "a", "parameters": {"weight": 0.5}},
                                                        {"model": "b", "parameters": {"weight": 0.5}}]}},
        "exports": {"ab_nf4": {"model": "ab", "type": "bnb", "quant": "nf4"},
                    "a_f16": {"model": "a", "type": "safetensors", "quant": "float16"}},
    }
    d.update(extra)
    return d


def K(*p: str) -> dg.AssetKey:
    return dg.AssetKey(list(p))


def _graph(d: dict, tmp_path: Path):
    spec = parse_pipeline(d, base_dir=tmp_path)
    return build_definitions(spec, resources={"model_store": ModelStoreResource(root=str(tmp_path / "s"))})


def test_export_graph_deps_eval_gates_and_finetunes(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"text": "hello"}\n')
    d = _pipeline(
        datasets={"ds": {"path": "d.jsonl"}},
        finetunes={"ft": {"base": "a", "dataset": "ds", "max_steps": 1}},
        evals={"ab_eval": {"model": "ab", "tasks": ["t1"]}, "a_eval": {"model": "b", "tasks": ["t1"]}},
    )
    d["exports"]["ft_fp4"] = {"model": "ft", "type": "bnb", "quant": "fp4", "fidelity": False}
    d["exports"]["ab_gguf"] = {"model": "ab", "type": "gguf", "quant": "q8_0"}
    defs = _graph(d, tmp_path)
    g = defs.resolve_asset_graph()
    parents = lambda k: set(g.get(k).parent_keys)  # noqa: E731
    # an export waits for its model and for every eval of that model (blocking checks gate it)
    assert parents(K("export", "exp", "ab_nf4")) == {K("merged", "exp", "ab"), K("eval", "exp", "ab_eval")}
    assert parents(K("export", "exp", "ab_gguf")) == {K("merged", "exp", "ab"), K("eval", "exp", "ab_eval")}
    assert parents(K("export", "exp", "a_f16")) == {K("base_model", "exp", "a")}
    # a fine-tune is exported as its base with its LoRA merged in
    assert parents(K("export", "exp", "ft_fp4")) == {K("base_model", "exp", "a"), K("lora", "exp", "ft")}
    node = g.get(K("export", "exp", "ab_nf4"))
    op = defs.get_assets_def(K("export", "exp", "ab_nf4")).op
    assert node.group_name == "exp" and op.pool == "gpu" and op.retry_policy.max_retries == 2
    assert node.tags["mergeline/export_type"] == "bnb" and node.tags["mergeline/quant"] == "nf4"
    assert {"mergeline", "bitsandbytes"} <= set(node.kinds)
    assert g.get(K("export", "exp", "ab_gguf")).kinds >= {"gguf"}
    # no evals in the spec: no eval deps at all
    g2 = _graph(_pipeline(), tmp_path).resolve_asset_graph()
    assert set(g2.get(K("export", "exp", "ab_nf4")).parent_keys) == {K("merged", "exp", "ab")}
    # the code version follows the node's YAML
    d3 = _pipeline()
    d3["exports"]["ab_nf4"]["quant"] = "fp4"
    g3 = _graph(d3, tmp_path).resolve_asset_graph()
    assert g3.get(K("export", "exp", "ab_nf4")).code_version != g2.get(K("export", "exp", "ab_nf4")).code_version
    assert g3.get(K("export", "exp", "a_f16")).code_version == g2.get(K("export", "exp", "a_f16")).code_version


def _meta(inst, key):
    mat = inst.get_latest_materialization_event(key).asset_materialization
    return {k: getattr(v, "value", v) for k, v in mat.metadata.items()}, mat.tags


def test_pipeline_materializes_bnb_and_safetensors_exports(tmp_path):
    from transformers import AutoModelForCausalLM

    task = {"name": "arithmetic_choice", "path": str(REPO / "pipelines/examples/demo/tasks/arithmetic_choice.yaml")}
    defs = _graph(_pipeline(evals={"ab_eval": {"model": "ab", "tasks": [task], "limit": 4}}), tmp_path)
    inst = dg.DagsterInstance.ephemeral()
    res = dg.materialize(list(defs.assets), resources=defs.resources, instance=inst)
    assert res.success

    meta, tags = _meta(inst, K("export", "exp", "ab_nf4"))
    path = Path(str(meta["path"]))
    assert path.is_dir() and path.parent == tmp_path / "s" / "export" / "ab_nf4"
    content, _ = dir_content_hash(path, store_root=tmp_path / "s")
    assert tags["dagster/data_version"] == meta["content_sha256"] == content
    assert meta["type"] == "bnb" and meta["quant"] == "nf4" and meta["size_bytes"] > 0
    assert meta["source_bytes"] / meta["export_bytes"] == pytest.approx(meta["compression_ratio"], rel=1e-3)
    assert 2.0 < meta["compression_ratio"] < 4.0  # bf16 -> 4 bit, embeddings/lm_head/norms kept
    assert 0 < meta["mean_abs_logit_diff"] <= meta["max_abs_logit_diff"] < 1.0
    assert 0.5 <= meta["top1_agreement"] <= 1.0 and meta["fidelity_prompts"] == 8
    assert meta["gated_by_evals"] == ["eval/exp/ab_eval"]
    assert meta["input_data_versions"] == {"merged/exp/ab": _meta(inst, K("merged", "exp", "ab"))[1]["dagster/data_version"]}
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
    man = json.loads((path / "mergeline.json").read_text())
    assert man["export_asset"]["fidelity"]["top1_agreement"] == meta["top1_agreement"]
    m = AutoModelForCausalLM.from_pretrained(str(path), device_map="cpu")
    out = m.generate(torch.tensor([[1, 5, 9]]), max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert out.shape == (1, 7)

    meta16, tags16 = _meta(inst, K("export", "exp", "a_f16"))
    p16 = Path(str(meta16["path"]))
    assert meta16["type"] == "safetensors" and meta16["dtype"] == "float16"
    assert meta16["compression_ratio"] == pytest.approx(1.0)  # bf16 -> f16: same size
    assert meta16["max_abs_logit_diff"] < 1e-3 and meta16["top1_agreement"] == 1.0
    assert tags16["dagster/data_version"] == dir_content_hash(p16, store_root=tmp_path / "s")[0]
    assert json.loads((p16 / "config.json").read_text())["dtype"] == "float16"

    # same inputs again: same data versions (content-addressed, deterministic)
    res2 = dg.materialize(list(defs.assets), resources=defs.resources, instance=inst,
                          selection=[K("export", "exp", "ab_nf4")])
    assert res2.success
    assert _meta(inst, K("export", "exp", "ab_nf4"))[1]["dagster/data_version"] == tags["dagster/data_version"]


def test_unsupported_quant_fails_without_retries(tmp_path):
    d = _pipeline()
    d["exports"] = {"a_int8": {"model": "a", "type": "bnb", "quant": "int8"}}
    defs = _graph(d, tmp_path)
    inst = dg.DagsterInstance.ephemeral()
    res = dg.materialize(list(defs.assets), resources=defs.resources, instance=inst, raise_on_error=False,
                         selection=[K("base_model", "exp", "a"), K("export", "exp", "a_int8")])
    assert not res.success
    failures = [e for e in res.all_events if e.event_type_value == "STEP_FAILURE"]
    assert len(failures) == 1 and "exports.a_int8" in str(failures[0].event_specific_data.error)
    assert "int8" in str(failures[0].event_specific_data.error)
    assert not [e for e in res.all_events if e.event_type_value == "STEP_UP_FOR_RETRY"]


@pytest.mark.heavy
def test_finetune_export_is_base_plus_lora_quantized(tmp_path):
    """A fine-tune's export = its LoRA merged into its base (streamed), then quantized: bit-identical to doing the
    two steps by hand with the engine and the exporter."""
    from merge_ops.api import MergeOptions, merge_lora
    from merge_ops.bnb_export import export_bnb

    d = _pipeline(
        datasets={"ds": {"inline": [{"text": f"the quick brown fox {i}"} for i in range(16)]}},
        finetunes={"ft": {"base": "a", "dataset": "ds", "max_steps": 2, "r": 4, "alpha": 8, "batch_size": 8,
                          "backend": "peft", "target_modules": ["q_proj", "v_proj", "down_proj"]}},
    )
    d["merges"] = {}
    d["exports"] = {"ft_nf4": {"model": "ft", "type": "bnb", "quant": "nf4"}}
    defs = _graph(d, tmp_path)
    inst = dg.DagsterInstance.ephemeral()
    assert dg.materialize(list(defs.assets), resources=defs.resources, instance=inst).success
    meta, _ = _meta(inst, K("export", "exp", "ft_nf4"))
    assert set(meta["input_data_versions"]) == {"base_model/exp/a", "lora/exp/ft"}
    assert 0 < meta["max_abs_logit_diff"] and meta["top1_agreement"] > 0.3
    base = Path(str(_meta(inst, K("base_model", "exp", "a"))[0]["path"]))
    lora = Path(str(_meta(inst, K("lora", "exp", "ft"))[0]["path"]))
    merge_lora(base, lora, tmp_path / "by_hand", MergeOptions(device="cpu"))
    export_bnb(tmp_path / "by_hand", tmp_path / "by_hand_nf4", "nf4")
    from safetensors.torch import load_file

    got = load_file(str(next(Path(str(meta["path"])).glob("*.safetensors"))))
    want = load_file(str(next((tmp_path / "by_hand_nf4").glob("*.safetensors"))))
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in got)
    # and the LoRA changed the quantized weights (the fine-tune is really in the export)
    plain = tmp_path / "plain_nf4"
    export_bnb(base, plain, "nf4")
    base_q = load_file(str(next(plain.glob("*.safetensors"))))
    assert not torch.equal(base_q["model.layers.0.self_attn.q_proj.weight"], got["model.layers.0.self_attn.q_proj.weight"])
