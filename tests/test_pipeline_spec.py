"""The pipeline spec: every validation error class, with its YAML path, before anything runs; ``mergeline validate``."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipelines.spec import PipelineSpecError, load_pipeline, parse_pipeline

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((REPO / "pipelines" / "examples").glob("*/pipeline.yaml"))

BASE = {
    "name": "p",
    "base_models": {"base": {"toy": {"hidden": 64}}},
    "datasets": {"math": {"generated": {"kind": "arithmetic", "n": 10}},
                 "code": {"generated": {"kind": "reverse", "n": 10}}},
    "finetunes": {
        "math_ft": {"base": "base", "dataset": "math", "max_steps": 2},
        "code": {"base": "base", "dataset": "code", "max_steps": 2},
    },
    "merges": {
        "math_code": {
            "method": "ties", "base_model": "base",
            "models": [{"model": "math_ft", "parameters": {"weight": 0.5, "density": 0.5}},
                       {"model": "code", "parameters": {"weight": 0.5, "density": 0.5}}],
        },
    },
}


def errors_of(data: dict, tmp_path: Path | None = None) -> list[str]:
    with pytest.raises(PipelineSpecError) as ei:
        parse_pipeline(data, base_dir=tmp_path)
    return ei.value.errors


def with_(**sections) -> dict:
    d = copy.deepcopy(BASE)
    for k, v in sections.items():
        d[k] = v
    return d


def test_valid_base_parses():
    spec = parse_pipeline(copy.deepcopy(BASE))
    assert spec.summary() == "pipeline 'p': 1 base model, 2 datasets, 2 fine-tunes, 1 merge"
    assert spec.warnings == []


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.parent.name for p in EXAMPLES])
def test_shipped_examples_validate(path):
    spec = load_pipeline(path)
    assert spec.name == path.parent.name
    assert spec.warnings == []


# -- unknown names ----------------------------------------------------------------------------------------------------


def test_unknown_merge_input_points_at_yaml_path_with_did_you_mean():
    d = copy.deepcopy(BASE)
    d["merges"]["math_code"]["models"][1]["model"] = "cod"
    errs = errors_of(d)
    assert "merges.math_code.models[1].model: no base model, adapter, fine-tune or merge named 'cod' " \
           "(did you mean 'code'?)" in errs


def test_unknown_dataset_and_base_of_finetune():
    d = copy.deepcopy(BASE)
    d["finetunes"]["math_ft"]["dataset"] = "maths"
    d["finetunes"]["code"]["base"] = "bas"
    errs = errors_of(d)
    assert "finetunes.math_ft.dataset: no dataset named 'maths' (did you mean 'math'?)" in errs
    assert "finetunes.code.base: no base model or merge named 'bas' (did you mean 'base'?)" in errs


def test_reference_to_wrong_kind_of_node():
    d = copy.deepcopy(BASE)
    d["finetunes"]["code"]["base"] = "math_ft"  # a fine-tune is not a full model to train on
    d["merges"]["math_code"]["models"][0]["model"] = "base+math"  # 'math' is a dataset
    errs = errors_of(d)
    assert "finetunes.code.base: 'math_ft' is a fine-tune, but this needs a base model or merge" in errs
    assert any(e.startswith("merges.math_code.models[0].model (after '+'): 'math' is a dataset") for e in errs)


def test_duplicate_names_across_model_sections():
    d = copy.deepcopy(BASE)
    d["merges"]["base"] = d["merges"].pop("math_code")
    errs = errors_of(d)
    assert any(e.startswith("merges.base: the name is also used in base_models.base") for e in errs)


def test_exports_evals_and_schedules_references():
    d = with_(
        exports={"e": {"model": "math_cod", "type": "gguf"}},
        evals={"v": {"model": "math_code", "tasks": ["a"], "compare_to": ["bse"]}},
        schedules={"s": {"cron": "0 3 * * *", "target": ["merges.math_cod"]}},
    )
    errs = errors_of(d)
    assert "exports.e.model: no base model, fine-tune or merge named 'math_cod' (did you mean 'math_code'?)" in errs
    assert "evals.v.compare_to[0]: no base model, fine-tune or merge named 'bse' (did you mean 'base'?)" in errs
    assert any(e.startswith("schedules.s.target[0]: no node named 'merges.math_cod'") and "merges.math_code" in e
               for e in errs)


# -- cycles -----------------------------------------------------------------------------------------------------------


def test_cycle_between_merges_and_finetunes():
    d = copy.deepcopy(BASE)
    d["merges"]["a"] = {"method": "linear", "models": [{"model": "b", "parameters": {"weight": 1.0}}]}
    d["merges"]["b"] = {"method": "linear", "models": [{"model": "ft_on_a", "parameters": {"weight": 1.0}}]}
    d["finetunes"]["ft_on_a"] = {"base": "a", "dataset": "math"}
    errs = errors_of(d)
    cyc = [e for e in errs if "cycle" in e]
    assert len(cyc) == 1, errs
    assert "a -> b -> ft_on_a -> a" in cyc[0] or "b -> ft_on_a -> a -> b" in cyc[0] or "ft_on_a -> a -> b -> ft_on_a" in cyc[0]


def test_self_reference_is_a_cycle():
    d = copy.deepcopy(BASE)
    d["merges"]["math_code"]["models"][0]["model"] = "math_code"
    errs = errors_of(d)
    assert any("cycle: math_code -> math_code" in e for e in errs)


# -- architectures / shapes -------------------------------------------------------------------------------------------


def test_architecture_mismatch_from_local_config_and_declared_hub(tmp_path):
    mistral = tmp_path / "mistral"
    mistral.mkdir()
    (mistral / "config.json").write_text(json.dumps({"architectures": ["MistralForCausalLM"], "hidden_size": 64}))
    d = copy.deepcopy(BASE)
    d["base_models"]["mistral"] = {"path": "mistral"}
    d["base_models"]["qwen"] = {"hub": "Qwen/Qwen2-0.5B", "revision": "a" * 40, "architecture": "Qwen2ForCausalLM"}
    d["merges"]["mix"] = {"method": "linear", "models": [
        {"model": "base", "parameters": {"weight": 1}}, {"model": "mistral", "parameters": {"weight": 1}},
        {"model": "qwen", "parameters": {"weight": 1}}]}
    errs = errors_of(d, tmp_path)
    assert "merges.mix.models[1].model: 'mistral' is a MistralForCausalLM but 'base' (models[0].model) is a " \
           "LlamaForCausalLM; only models of one architecture can be merged" in errs
    assert any(e.startswith("merges.mix.models[2].model: 'qwen' is a Qwen2ForCausalLM") for e in errs)


def test_architecture_of_finetune_follows_its_base(tmp_path):
    other = tmp_path / "gpt2"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "n_embd": 64}))
    d = copy.deepcopy(BASE)
    d["base_models"]["gpt"] = {"path": str(other)}
    d["finetunes"]["gpt_ft"] = {"base": "gpt", "dataset": "math"}
    d["merges"]["m"] = {"method": "linear", "models": [{"model": "math_ft", "parameters": {"weight": 1}},
                                                       {"model": "gpt_ft", "parameters": {"weight": 1}}]}
    errs = errors_of(d, tmp_path)
    assert any(e.startswith("merges.m.models[1].model: 'gpt_ft' is a GPT2LMHeadModel") for e in errs)


def test_hidden_size_mismatch_of_toy_models():
    d = copy.deepcopy(BASE)
    d["base_models"]["small"] = {"toy": {"hidden": 32}}
    d["merges"]["m"] = {"method": "linear", "models": [{"model": "base", "parameters": {"weight": 1}},
                                                       {"model": "small", "parameters": {"weight": 1}}]}
    errs = errors_of(d)
    assert "merges.m.models[1].model: 'small' has hidden size 32 but 'base' (models[0].model) has 64; their " \
           "tensors cannot be merged" in errs


# -- adapters on the wrong base ---------------------------------------------------------------------------------------


def test_adapter_and_finetune_on_other_base_than_merge(tmp_path):
    adir = tmp_path / "chat"
    adir.mkdir()
    (adir / "adapter_config.json").write_text("{}")
    d = copy.deepcopy(BASE)
    d["base_models"]["base2"] = {"toy": {"hidden": 64, "seed": 1}}
    d["adapters"] = {"chat": {"path": "chat", "base": "base2"}}
    d["finetunes"]["ft2"] = {"base": "base2", "dataset": "math"}
    d["merges"]["math_code"]["models"].append({"model": "chat", "parameters": {"weight": 0.2}})
    d["merges"]["math_code"]["models"].append({"model": "ft2", "parameters": {"weight": 0.2}})
    errs = errors_of(d, tmp_path)
    assert "merges.math_code.models[2].model: adapter 'chat' was trained on 'base2' but this merge's base is " \
           "'base'; merge it onto 'base2', or write 'base+chat' to apply its LoRA to 'base' on purpose" in errs
    assert any(e.startswith("merges.math_code.models[3].model: fine-tune 'ft2' was trained on 'base2'") for e in errs)
    # the explicit form is accepted
    d["merges"]["math_code"]["models"][2]["model"] = "base+chat"
    d["merges"]["math_code"]["models"][3]["model"] = "base+ft2"
    parse_pipeline(d, base_dir=tmp_path)


# -- methods ----------------------------------------------------------------------------------------------------------


def test_wrong_arity_uses_the_engine_rule():
    d = copy.deepcopy(BASE)
    d["merges"]["s"] = {"method": "slerp", "base_model": "base", "parameters": {"t": 0.5},
                        "models": [{"model": "base"}, {"model": "math_ft"}, {"model": "code"}]}
    d["merges"]["t"] = {"method": "ties", "models": [{"model": "math_ft", "parameters": {"weight": 1}}]}
    errs = errors_of(d)
    assert "merges.s.models: merge_method 'slerp' takes at most 1 model(s) besides the base, got 2" in errs
    assert "merges.t.models: merge_method 'ties' needs a 'base_model'" in errs


def test_unknown_method_and_parameters():
    d = copy.deepcopy(BASE)
    d["merges"]["math_code"]["method"] = "tiez"
    errs = errors_of(d)
    assert any(e.startswith("merges.math_code.method: unknown method 'tiez' (did you mean 'ties'?)") for e in errs)
    d = copy.deepcopy(BASE)
    d["merges"]["math_code"]["models"][0]["parameters"] = {"weight": 0.5, "desnity": 0.5}
    errs = errors_of(d)
    assert any(e.startswith("merges.math_code.models[0].parameters.desnity: merge_method 'ties' has no parameter "
                            "'desnity' (did you mean 'density'?)") for e in errs)


def test_missing_required_parameter_and_out_of_range():
    d = copy.deepcopy(BASE)
    del d["merges"]["math_code"]["models"][1]["parameters"]["weight"]
    d["merges"]["math_code"]["models"][0]["parameters"]["density"] = 1.5
    errs = errors_of(d)
    assert any("models[0].parameters.density" in e and "out of range" in e for e in errs)
    d["merges"]["math_code"]["models"][0]["parameters"]["density"] = 0.5
    errs = errors_of(d)
    assert errs == ["merges.math_code.models[1].parameters: parameter 'weight' is required by merge_method 'ties' "
                    "(set it here or under merges.math_code.parameters)"]
    d["merges"]["math_code"]["parameters"] = {"weight": 0.5}  # a global value satisfies it
    parse_pipeline(d)


def test_merge_alias_merge_method_and_mergekit_vocabulary():
    d = copy.deepcopy(BASE)
    m = d["merges"]["math_code"]
    m["merge_method"] = m.pop("method")
    m["dtype"] = "bf16"
    m["models"][0]["parameters"]["density"] = [0.3, {"oops": 1}]
    errs = errors_of(d)
    assert any(e.startswith("merges.math_code.models[0].parameters.density") for e in errs), errs
    m["models"][0]["parameters"]["density"] = [0.3, 0.7]
    spec = parse_pipeline(d)
    assert spec.merges["math_code"].method == "ties" and spec.merges["math_code"].dtype == "bfloat16"


# -- unknown keys / structure -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("mutate, expected", [
    (lambda d: d.update(bse_models={}), "bse_models: unknown key 'bse_models' (did you mean 'base_models'?)"),
    (lambda d: d["finetunes"]["code"].update(lerning_rate=0.1),
     "finetunes.code.lerning_rate: unknown key 'lerning_rate' (did you mean 'learning_rate'?)"),
    (lambda d: d["base_models"]["base"]["toy"].update(hiden=32),
     "base_models.base.toy.hiden: unknown key 'hiden' (did you mean 'hidden'?)"),
    (lambda d: d["merges"]["math_code"]["models"][0].update(parameter={}),
     "merges.math_code.models[0].parameter: unknown key 'parameter' (did you mean 'parameters'?)"),
    (lambda d: d["merges"]["math_code"].update(base_modle="base"),
     "merges.math_code.base_modle: unknown key 'base_modle' (did you mean 'base_model'?)"),
    (lambda d: d["datasets"]["math"]["generated"].update(kind="algebra"), "datasets.math.generated.kind: Input should be"),
    (lambda d: d["datasets"]["math"].update(path="x.jsonl"), "datasets.math: give exactly one of 'path', 'hub', "
                                                             "'generated' or 'inline' (got path, generated)"),
    (lambda d: d["base_models"]["base"].update(hub="a/b"), "base_models.base: give exactly one of 'toy', 'path' or 'hub'"),
    (lambda d: d["finetunes"]["code"].update(backend="deepspeed"), "finetunes.code.backend: Input should be 'auto', "
                                                                   "'unsloth' or 'peft'"),
    (lambda d: d["finetunes"]["code"].update(r=0), "finetunes.code.r: Input should be greater than or equal to 1"),
])
def test_structure_errors_name_the_yaml_path(mutate, expected):
    d = copy.deepcopy(BASE)
    mutate(d)
    errs = errors_of(d)
    assert any(e.startswith(expected) for e in errs), errs


def test_duplicate_yaml_keys_are_errors(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text("name: p\nbase_models:\n  a: {toy: {}}\n  a: {toy: {seed: 1}}\n")
    with pytest.raises(PipelineSpecError) as ei:
        load_pipeline(f)
    assert "duplicate key 'a'" in ei.value.errors[0]


def test_names_owners_tags_and_schedules():
    d = with_(schedules={"s": {"cron": "0 25 * * *", "target": "math_code"},
                         "t": {"cron": "0 3 * * *", "timezone": "Mars/Olympus"}})
    d["name"] = "my-pipeline"
    d["owners"] = ["not an owner"]
    d["tags"] = {"bad key!": "x"}
    d["finetunes"]["2fast"] = {"base": "base", "dataset": "math"}
    errs = errors_of(d)
    assert any(e.startswith("schedules.s.cron: cron '0 25 * * *': hour value 25 is out of range 0-23") for e in errs)
    assert any(e.startswith("schedules.t.timezone: unknown timezone 'Mars/Olympus'") for e in errs)
    d["schedules"] = {}
    errs = errors_of(d)
    assert any(e.startswith("name: 'my-pipeline' must be letters, digits and underscores") for e in errs)
    assert any(e.startswith("owners[0]: 'not an owner' must be an email address or 'team:NAME'") for e in errs)
    assert any(e.startswith("tags.bad key!: tag keys") for e in errs)
    assert any(e.startswith("finetunes.2fast: node names must be letters") for e in errs)


def test_exports_and_evals_are_validated():
    d = with_(exports={"g": {"model": "math_code", "type": "gguf", "quant": "q4_k_n"}})
    assert any(e.startswith("exports.g.quant: unknown gguf quant type 'q4_k_n' (did you mean 'q4_k_")
               for e in errors_of(d))
    d = with_(exports={"b": {"model": "math_code", "type": "bnb", "quant": "nf4"}},
              evals={"v": {"model": "math_code", "tasks": ["arith", {"name": "rev", "threshold": 0.5}],
                           "thresholds": {"arth": 0.3}}})
    assert any(e.startswith("evals.v.thresholds: 'arth' is not one of the tasks (did you mean 'arith'?)")
               for e in errors_of(d))
    d["evals"]["v"]["thresholds"] = {"arith": 0.3}
    spec = parse_pipeline(d)
    assert spec.exports["b"].quant == "nf4" and spec.evals["v"].task_names() == ["arith", "rev"]


def test_hub_revision_pinning_and_local_paths(tmp_path):
    d = copy.deepcopy(BASE)
    d["base_models"]["llama"] = {"hub": "meta-llama/Llama-3.2-1B"}
    d["base_models"]["local"] = {"path": "does/not/exist"}
    d["datasets"]["files"] = {"path": ["a.jsonl", "b.csv"]}
    errs = errors_of(d, tmp_path)
    assert any(e.startswith("base_models.llama.revision: pin a revision for 'meta-llama/Llama-3.2-1B'") for e in errs)
    assert any(e.startswith("base_models.local.path: model directory") and "does not exist" in e for e in errs)
    assert any(e.startswith("datasets.files.path[0]: file") for e in errs)
    assert any(e.startswith("datasets.files.path[1]: 'b.csv' must be a .jsonl, .json or .parquet file") for e in errs)
    d["base_models"]["llama"]["revision"] = "main"
    del d["base_models"]["local"]
    del d["datasets"]["files"]
    spec = parse_pipeline(d, base_dir=tmp_path)
    assert spec.warnings == ["base_models.llama.revision: 'main' is not a commit sha; the content behind it can "
                             "change between runs"]


def test_every_error_is_reported_at_once():
    d = copy.deepcopy(BASE)
    d["merges"]["math_code"]["models"][1]["model"] = "cod"
    d["merges"]["math_code"]["method"] = "tiez"
    d["finetunes"]["code"]["dataset"] = "mat"
    d["merges"]["loop"] = {"method": "linear", "models": [{"model": "loop", "parameters": {"weight": 1}}]}
    errs = errors_of(d)
    assert len(errs) == 4, errs
    msg = str(PipelineSpecError(errs, "p.yaml"))
    assert msg.startswith("p.yaml: 4 error(s) in the pipeline:")


def test_code_versions_and_tag_values_stay_strings():
    d = copy.deepcopy(BASE)
    d["code_version"] = 2
    d["finetunes"]["code"]["code_version"] = 1.5
    d["tags"] = {"release": 3}
    spec = parse_pipeline(d)
    assert spec.code_version == "2" and spec.finetunes["code"].code_version == "1.5" and spec.tags == {"release": "3"}


# -- CLI --------------------------------------------------------------------------------------------------------------


def _cli(*args: str) -> subprocess.CompletedProcess:
    code = ("import sys; from pipelines.cli import main; rc = main(sys.argv[1:]); "
            "assert 'dagster' not in sys.modules, 'validate imported dagster'; sys.exit(rc)")
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=REPO, timeout=120)


def test_cli_validate_ok_prints_summary_without_dagster():
    cp = _cli("validate", *map(str, EXAMPLES))
    assert cp.returncode == 0, cp.stderr
    assert "ok: pipeline 'demo': 1 base model, 2 datasets, 2 fine-tunes, 1 merge, 1 export, 1 eval, 1 schedule" in cp.stdout
    assert "merged/demo/math_reverse  <- ties(tiny_llama, math, reverse_skill)" in cp.stdout


def test_cli_validate_errors_exit_2(tmp_path):
    d = copy.deepcopy(BASE)
    d["merges"]["math_code"]["models"][1]["model"] = "cod"
    f = tmp_path / "bad.yaml"
    f.write_text(yaml.safe_dump(d))
    cp = _cli("validate", str(f))
    assert cp.returncode == 2
    assert f"mergeline: {f}: 1 error(s)" in cp.stderr
    assert "  merges.math_code.models[1].model: no base model, adapter, fine-tune or merge named 'cod'" in cp.stderr
    assert "Traceback" not in cp.stderr


def test_schedule_target_naming_both_a_dataset_and_a_model_is_ambiguous():
    d = with_(schedules={"s": {"cron": "@daily", "target": "code"}})  # dataset 'code' and fine-tune 'code'
    assert errors_of(d) == ["schedules.s.target: 'code' names both a dataset and a fine-tune; write 'datasets.code' "
                            "or 'finetunes.code'"]
    d["schedules"]["s"]["target"] = "finetunes.code"
    parse_pipeline(d)
