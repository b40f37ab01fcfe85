"""Every bad input fails before any tensor math, with a message that names the file, model, tensor or key."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from merge_ops.api import MergeOptions, merge, plan_merge
from merge_ops.config import load_config, parse_config
from merge_ops.errors import ConfigError, InputError, UnsupportedError


def ties_cfg(f, **extra):
    cfg = {
        "merge_method": "ties",
        "base_model": str(f["base"]),
        "models": [
            {"model": str(f["ft1"]), "parameters": {"weight": 0.5, "density": 0.5}},
            {"model": str(f["ft2"]), "parameters": {"weight": 0.5, "density": 0.5}},
        ],
    }
    cfg.update(extra)
    return cfg


def expect(exc, match, cfg, tmp_path=None):
    with pytest.raises(exc, match=match):
        plan_merge(cfg, MergeOptions(device="cpu"))


def test_valid_config_plans(tiny_family):
    plan = plan_merge(ties_cfg(tiny_family), MergeOptions(device="cpu"))
    assert len(plan.tensors) == 21
    assert all(t.task is not None for t in plan.tensors)


def test_unknown_top_level_key_suggests_spelling(tiny_family):
    cfg = ties_cfg(tiny_family)
    cfg["merge_methd"] = cfg.pop("merge_method")
    with pytest.raises(ConfigError, match=r"unknown key 'merge_methd' \(did you mean 'merge_method'\?\)"):
        parse_config(cfg)


def test_unknown_method_lists_available(tiny_family):
    expect(ConfigError, r"unknown method 'tis' \(did you mean 'ties'\?\)", ties_cfg(tiny_family, merge_method="tis"))


def test_misspelled_parameter_is_rejected(tiny_family):
    cfg = ties_cfg(tiny_family)
    cfg["models"][0]["parameters"] = {"weight": 0.5, "desnity": 0.5}
    expect(ConfigError, r"models\[0\]\.parameters\.desnity: .*did you mean 'density'", cfg)


def test_missing_required_parameter(tiny_family):
    cfg = ties_cfg(tiny_family)
    cfg["models"][1]["parameters"] = {"density": 0.5}
    expect(ConfigError, r"parameter 'weight' is required", cfg)


def test_slerp_needs_t(tiny_family):
    cfg = {"merge_method": "slerp", "base_model": str(tiny_family["base"]),
           "models": [{"model": str(tiny_family["base"])}, {"model": str(tiny_family["ft1"])}]}
    expect(ConfigError, r"parameters\.t: required", cfg)


@pytest.mark.parametrize("value", [1.5, -0.1, [0.2, 1.2]])
def test_density_out_of_range(tiny_family, value):
    cfg = ties_cfg(tiny_family)
    cfg["models"][0]["parameters"]["density"] = value
    expect(ConfigError, r"models\[0\]\.parameters\.density.*out of range \[0\.0, 1\.0\]", cfg)


def test_slerp_with_three_models_is_rejected(tiny_family):
    cfg = {"merge_method": "slerp", "base_model": str(tiny_family["base"]), "parameters": {"t": 0.5},
           "models": [{"model": str(tiny_family["ft1"])}, {"model": str(tiny_family["ft2"])}]}
    expect(ConfigError, r"'slerp' takes at most 1 model\(s\) besides the base, got 2", cfg)


def test_base_required(tiny_family):
    cfg = ties_cfg(tiny_family)
    del cfg["base_model"]
    expect(ConfigError, r"needs a base_model", cfg)


def test_global_only_parameter_per_model(tiny_family):
    cfg = ties_cfg(tiny_family)
    cfg["models"][0]["parameters"]["normalize"] = False
    expect(ConfigError, r"models\[0\]\.parameters\.normalize: 'normalize' applies to the whole merge", cfg)


def test_models_and_slices_exclusive(tiny_family):
    cfg = ties_cfg(tiny_family, slices=[{"sources": [{"model": "x", "layer_range": [0, 1]}]}])
    with pytest.raises(ConfigError, match="exactly one of 'models' or 'slices'"):
        parse_config(cfg)


def test_bad_dtype(tiny_family):
    with pytest.raises(ConfigError, match=r"dtype: .*unknown dtype 'float8'"):
        parse_config(ties_cfg(tiny_family, dtype="float8"))


def test_uneven_slice_sources(tiny_family):
    cfg = {"merge_method": "slerp", "base_model": str(tiny_family["base"]), "parameters": {"t": 0.5},
           "slices": [{"sources": [{"model": str(tiny_family["base"]), "layer_range": [0, 2]},
                                   {"model": str(tiny_family["ft1"]), "layer_range": [0, 1]}]}]}
    with pytest.raises(ConfigError, match="same number of layers"):
        parse_config(cfg)


def test_yaml_file_errors_name_the_file(tmp_path):
    p = tmp_path / "bad.yml"
    p.write_text("merge_method: [unclosed\n")
    with pytest.raises(ConfigError, match=str(p)):
        load_config(p)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yml")


def test_missing_model_directory(tiny_family, tmp_path):
    cfg = ties_cfg(tiny_family)
    cfg["models"][1]["model"] = str(tmp_path / "nope")
    expect(InputError, r"nope.*does not exist", cfg)


def test_architecture_mismatch(tiny_family, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(tiny_family["ft1"], other)
    conf = json.loads((other / "config.json").read_text())
    conf["architectures"] = ["MistralForCausalLM"]
    (other / "config.json").write_text(json.dumps(conf))
    cfg = ties_cfg(tiny_family)
    cfg["models"][1]["model"] = str(other)
    expect(InputError, r"different architectures .*MistralForCausalLM", cfg)


def test_shape_mismatch_names_tensor_and_models(tiny_family, tmp_path):
    from tests.tiny_models import save_tiny_llama

    wide = save_tiny_llama(tmp_path / "wide", seed=5, dtype=torch.bfloat16, hidden=48, tokenizer=False)
    cfg = ties_cfg(tiny_family)
    cfg["models"][1]["model"] = str(wide)
    expect(InputError, r"tensor '.*': shape \[.*\] in model '.*wide' differs from", cfg)


def test_vocab_mismatch_hint(tiny_family, tmp_path):
    from tests.tiny_models import save_tiny_llama

    big = save_tiny_llama(tmp_path / "bigvocab", seed=5, dtype=torch.bfloat16, vocab=160, tokenizer=False)
    cfg = ties_cfg(tiny_family)
    cfg["models"][1]["model"] = str(big)
    expect(InputError, r"different vocabulary sizes", cfg)


def test_truncated_safetensors(tiny_family, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_family["ft1"], broken)
    f = broken / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    cfg = ties_cfg(tiny_family)
    cfg["models"][0]["model"] = str(broken)
    expect(InputError, r"model.safetensors: tensor '.*' has inconsistent offsets .*truncated", cfg)


def test_index_pointing_to_missing_shard(tiny_family, tmp_path):
    broken = tmp_path / "sharded"
    shutil.copytree(tiny_family["ft1"], broken)
    (broken / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors"}}))
    cfg = ties_cfg(tiny_family)
    cfg["models"][0]["model"] = str(broken)
    expect(InputError, r"lists shard\(s\) that are missing: model-00002-of-00002.safetensors", cfg)


def test_pickle_refused_without_opt_in(tiny_family, tmp_path):
    from tests.tiny_models import load_state

    pick = tmp_path / "pickled"
    pick.mkdir()
    shutil.copy(tiny_family["ft1"] / "config.json", pick / "config.json")
    torch.save(load_state(tiny_family["ft1"]), pick / "pytorch_model.bin")
    cfg = ties_cfg(tiny_family)
    cfg["models"][0]["model"] = str(pick)
    expect(InputError, r"only pickled weights \(pytorch_model.bin\).*--allow-pickle", cfg)
    # with the opt-in it loads (weights_only=True) and merges to the same result as the safetensors copy
    out_a = merge(cfg, tmp_path / "a", MergeOptions(device="cpu", allow_pickle=True))
    out_b = merge(ties_cfg(tiny_family), tmp_path / "b", MergeOptions(device="cpu"))
    assert out_a.tensors == out_b.tensors
    from tests.tiny_models import load_state as ls
    a, b = ls(tmp_path / "a"), ls(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in b)


def test_malicious_pickle_is_not_executed(tiny_family, tmp_path):
    import pickle

    class Evil:
        def __reduce__(self):
            return (Path.touch, (tmp_path / "pwned",))

    pick = tmp_path / "evil"
    pick.mkdir()
    shutil.copy(tiny_family["ft1"] / "config.json", pick / "config.json")
    with open(pick / "pytorch_model.bin", "wb") as fh:
        pickle.dump({"x": Evil()}, fh)
    cfg = ties_cfg(tiny_family)
    cfg["models"][0]["model"] = str(pick)
    with pytest.raises(InputError, match="weights_only=True"):
        plan_merge(cfg, MergeOptions(device="cpu", allow_pickle=True))
    assert not (tmp_path / "pwned").exists()


def test_union_tokenizer_unsupported(tiny_family):
    expect(UnsupportedError, r"union", ties_cfg(tiny_family, tokenizer_source="union"))


def test_linear_weights_summing_to_zero(tiny_family):
    cfg = {"merge_method": "linear", "models": [{"model": str(tiny_family["ft1"]), "parameters": {"weight": 1.0}},
                                                {"model": str(tiny_family["ft2"]), "parameters": {"weight": -1.0}}]}
    expect(ConfigError, r"sum to ~0 with normalize: true", cfg)


def test_adapter_for_other_base(tiny_family, tmp_path):
    from tests.tiny_models import save_tiny_llama
    from pipelines.toy_models import save_lora_adapter

    other = save_tiny_llama(tmp_path / "other_base", seed=9, dtype=torch.float32, hidden=48, tokenizer=False)
    lora = save_lora_adapter(other, tmp_path / "other_lora", r=4, alpha=8)
    cfg = ties_cfg(tiny_family)
    cfg["models"][0]["model"] = f"{tiny_family['base']}+{lora}"
    with pytest.raises(InputError, match=r"other_lora"):
        plan_merge(cfg, MergeOptions(device="cpu"))


def test_errors_happen_before_any_output(tiny_family, tmp_path):
    cfg = ties_cfg(tiny_family)
    cfg["models"][0]["parameters"]["density"] = 2
    with pytest.raises(ConfigError):
        merge(cfg, tmp_path / "out", MergeOptions(device="cpu"))
    assert not (tmp_path / "out").exists()
    assert list(tmp_path.iterdir()) == []


def test_cli_reports_error_and_exit_code(tiny_family, tmp_path):
    import subprocess
    import sys

    cfg = ties_cfg(tiny_family)
    cfg["models"][0]["parameters"]["desnity"] = 0.5
    p = tmp_path / "c.yml"
    p.write_text(yaml.safe_dump(cfg))
    r = subprocess.run([sys.executable, "-m", "pipelines.cli", "merge", str(p), str(tmp_path / "o")],
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert "mergeline: error:" in r.stderr and "desnity" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "o").exists()
