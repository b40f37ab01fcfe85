"""Exports and evals through Dagster Pipes: the demo's exports (GGUF of the merge, re-cast safetensors of the merge,
bitsandbytes 4-bit of a fine-tune = base + LoRA) and its eval (one passing blocking check, one failing warning check)
materialized in process, then again through ``PipesSubprocessClient``: byte-identical artifacts (the volatile
``mergeline.json`` up to its timings), the same data versions, the same metadata (keys, Dagster value types and
values except timings) and the same check results (passed, severity, metadata, description)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import dagster as dg
import pytest

from pipelines.builder import build_definitions
from pipelines.spec import parse_pipeline
from resources.device import GpuResource
from resources.evaluator import EvaluatorResource
from resources.launcher import StepLauncherResource
from resources.model_store import ModelStoreResource
from resources.pipes_steps import CHECK_DESCRIPTION_KEY, VOLATILE_METADATA

pytest.importorskip("bitsandbytes")

EVAL = dg.AssetKey(["eval", "demo", "math_reverse_skills"])
EXPORTS = [dg.AssetKey(["export", "demo", n]) for n in ("math_reverse_gguf", "math_reverse_st", "math_bnb")]
#: timing / process-measurement fields of the volatile manifests (mergeline.json), at any depth
VOLATILE_MANIFEST = {"seconds", "peak_rss_bytes", "peak_rss_mib", "duration_s"}
PASSING, FAILING = "arithmetic_choice_min_0", "perplexity_at_most_half"


def _files(d: Path) -> dict[str, bytes]:
    return {f.relative_to(d).as_posix(): f.read_bytes() for f in sorted(d.rglob("*")) if f.is_file()}


def _stable(obj):
    if isinstance(obj, dict):  # a fine-tune's export records its scratch base+LoRA directory (a fresh temp dir)
        return {k: _stable(v) for k, v in obj.items() if k not in VOLATILE_MANIFEST
                and not (k == "source" and "mergeline-export-" in str(v))}
    if isinstance(obj, list):
        return [_stable(v) for v in obj]
    return obj


def _spec():
    from tests.test_pipeline_assets import DEMO, tiny

    d = tiny(DEMO, steps=1)
    d["base_models"]["tiny_llama"]["toy"]["hidden"] = 64  # bitsandbytes' CPU 4-bit kernels need rows of >= 64
    d["exports"].update({
        "math_reverse_st": {"model": "math_reverse", "type": "safetensors", "quant": "bfloat16"},
        "math_bnb": {"model": "math", "type": "bnb", "quant": "nf4"},
    })
    ev = d["evals"]["math_reverse_skills"]
    ev.update(compare_to=["math"], limit=4, tasks=[
        "arithmetic_choice", {"name": "skills_perplexity", "perplexity": "tasks/skills_heldout.txt",
                              "metric": "byte_perplexity"}])
    ev["checks"] = [
        {"name": PASSING, "task": "arithmetic_choice", "min": 0.0, "blocking": True},  # gates the merge's exports
        {"name": FAILING, "task": "skills_perplexity", "max": 0.5, "blocking": False},  # perplexity is >= 1
    ]
    d.pop("schedules", None)
    return parse_pipeline(d, base_dir=DEMO.parent)


def _check_view(c) -> dict:
    return {"passed": c.passed, "severity": c.severity, "metadata": dict(c.metadata), "description": c.description}


@pytest.mark.heavy
def test_exports_and_eval_through_pipes_subprocess_are_identical_to_in_process(tmp_path):
    spec = _spec()
    store = ModelStoreResource(root=str(tmp_path / "store"))

    def defs_with(mode: str) -> dg.Definitions:
        return build_definitions(spec, resources={
            "model_store": store, "gpu": GpuResource(device="cpu"), "evaluator": EvaluatorResource(device="cpu"),
            "launcher": StepLauncherResource(mode=mode)})

    inst = dg.DagsterInstance.ephemeral()
    d_in = defs_with("in_process")
    res_in = dg.materialize(list(d_in.assets), resources=d_in.resources, instance=inst)
    assert res_in.success
    targets = [EVAL, *EXPORTS]
    mats_in = {k: inst.get_latest_materialization_event(k).asset_materialization for k in targets}
    files_in = {}
    for k, m in mats_in.items():  # the subprocess must write every artifact again, not find it published
        out = Path(m.metadata["path"].value)
        files_in[k] = _files(out)
        shutil.move(out, tmp_path / ("moved-" + "-".join(k.path)))
    checks_in = {c.check_name: c for c in res_in.get_asset_check_evaluations() if c.asset_key == EVAL}

    d_sub = defs_with("subprocess")
    res_sub = dg.materialize(list(d_sub.assets), resources=d_sub.resources, instance=inst, selection=targets)
    assert res_sub.success
    logs = [e.message or "" for e in inst.all_logs(res_sub.run_id)]
    assert sum("[pipes] external process successfully opened dagster pipes" in m for m in logs) == len(targets)
    checks_sub = {c.check_name: c for c in res_sub.get_asset_check_evaluations() if c.asset_key == EVAL}

    for k in targets:
        m_in, m_sub = mats_in[k], inst.get_latest_materialization_event(k).asset_materialization
        name = k.to_user_string()
        assert m_sub.tags["dagster/data_version"] == m_in.tags["dagster/data_version"], name
        out = Path(m_sub.metadata["path"].value)
        assert out == Path(m_in.metadata["path"].value) and out.exists(), name
        f_in, f_sub = files_in[k], _files(out)
        assert sorted(f_sub) == sorted(f_in), name
        for rel in f_in:
            if rel == "mergeline.json":
                assert _stable(json.loads(f_sub[rel])) == _stable(json.loads(f_in[rel])), (name, rel)
            else:
                assert f_sub[rel] == f_in[rel], (name, rel)
        # the same metadata: keys, Dagster value types, values except timings (the size follows the manifest's)
        assert set(m_sub.metadata) == set(m_in.metadata), name
        delta = sum(len(f_sub[r]) - len(f_in[r]) for r in f_in)
        assert m_sub.metadata["size_bytes"].value - m_in.metadata["size_bytes"].value == delta, name
        for key in m_in.metadata:
            a, b = m_in.metadata[key], m_sub.metadata[key]
            assert type(a) is type(b), (name, key)
            if key == "models_evaluated":
                assert _stable(a.value) == _stable(b.value), (name, key)
            elif key not in VOLATILE_METADATA | {"size_bytes", "size"} or (key == "size" and delta == 0):
                assert a == b, (name, key)

    # the export metadata the in-process path always had
    gguf = mats_in[EXPORTS[0]].metadata
    assert gguf["type"].value == "gguf" and gguf["gguf_file"].value.endswith(".q8_0.gguf")
    assert gguf["gated_by_evals"].value == [EVAL.to_user_string()]
    assert mats_in[EXPORTS[2]].metadata["type"].value == "bnb"
    assert 0.0 <= mats_in[EXPORTS[1]].metadata["top1_agreement"].value <= 1.0

    # the same check results, with the reason as description and metadata, and no transport key left behind
    assert set(checks_in) == set(checks_sub) == {PASSING, FAILING}
    assert checks_in[PASSING].passed and not checks_in[FAILING].passed
    assert checks_in[PASSING].severity == dg.AssetCheckSeverity.ERROR
    assert checks_in[FAILING].severity == dg.AssetCheckSeverity.WARN
    assert checks_in[FAILING].description.startswith("FAILED: 'math_reverse' byte_perplexity on skills_perplexity")
    for n in (PASSING, FAILING):
        assert _check_view(checks_sub[n]) == _check_view(checks_in[n]), n
        assert CHECK_DESCRIPTION_KEY not in checks_sub[n].metadata
        assert checks_sub[n].metadata["reason"].value == checks_sub[n].description
    assert mats_in[EVAL].metadata["checks_failed"].value == [FAILING]


def test_export_and_eval_steps_run_in_the_entry_point_without_dagster(tiny_family, tmp_path):
    """The export and eval step modules import no Dagster: the entry point (``dagster`` import-blocked) runs a
    safetensors (bf16 -> float32) export end to end, and turns bad eval/export input into ``mergeline_error`` messages (exit 0)."""
    from merge_ops.api import MergeOptions

    from resources.artifact_files import dir_content_hash
    from tests.test_pipes import run_entry

    store = ModelStoreResource(root=str(tmp_path / "store"))
    request = {"name": "x", "type": "safetensors", "quant": "float32", "model": "base", "fidelity": False,
               "node_config": {"type": "safetensors"}, "model_ref": str(tiny_family["base"]), "adapter_ref": None,
               "inputs": {"base_model/t/base": "abc"}, "device": "cpu", "gated_by_evals": [],
               "options": MergeOptions(device="cpu", seed=0).model_dump(mode="json")}
    extras = {"mergeline_step": "export", "mergeline_request": request, "mergeline_store": store.client_config()}
    rc, msgs, err = run_entry(tmp_path, extras, asset_key="export/t/x")
    assert rc == 0, err[-3000:]
    (mat,) = [m["params"] for m in msgs if m["method"] == "report_asset_materialization"]
    meta = mat["metadata"]
    out = Path(meta["path"]["raw_value"])
    assert out.parent == tmp_path / "store" / "export" / "x"
    assert mat["data_version"] == dir_content_hash(out, store_root=tmp_path / "store")[0]
    assert meta["dtype"]["raw_value"] in ("F32", "float32")  # the bf16 base up-cast: twice the bytes
    assert meta["compression_ratio"]["raw_value"] == pytest.approx(0.5, abs=0.01)
    assert "max_abs_logit_diff" not in meta and "gated_by_evals" not in meta

    bad = {**request, "model_ref": str(tmp_path / "gone")}
    rc, msgs, err = run_entry(tmp_path, {**extras, "mergeline_request": bad}, asset_key="export/t/x")
    (custom,) = [m["params"]["payload"] for m in msgs if m["method"] == "report_custom_message"]
    assert rc == 0 and "exports.x" in custom["message"] and "is gone" in custom["message"]

    eval_request = {"name": "e", "plan": {"model": "base", "compare_to": [], "tasks": ["t"], "metrics": {}},
                    "checks": [], "tasks": [{"name": "t"}], "include": [], "node_config": {}, "inputs": {},
                    "parts": {"base": {"model": str(tmp_path / "gone"), "adapter": None}},
                    "options": {"device": "cpu", "batch_size": 1, "limit": 1}}
    rc, msgs, err = run_entry(tmp_path, {"mergeline_step": "eval", "mergeline_request": eval_request,
                                         "mergeline_store": store.client_config()}, asset_key="eval/t/e")
    (custom,) = [m["params"]["payload"] for m in msgs if m["method"] == "report_custom_message"]
    assert rc == 0 and custom["mergeline_error"] == "input" and "evals.e" in custom["message"], err[-2000:]
    assert not [m for m in msgs if m["method"] == "report_asset_materialization"]


def test_check_descriptions_cross_pipes_and_the_transport_key_is_removed():
    from resources.launcher import _with_description

    sent = dg.AssetCheckResult(check_name="c", passed=False, severity=dg.AssetCheckSeverity.WARN,
                               metadata={"reason": "FAILED: x", CHECK_DESCRIPTION_KEY: dg.MetadataValue.text("FAILED: x")})
    got = _with_description(sent)
    assert got.description == "FAILED: x" and set(got.metadata) == {"reason"}
    assert got.severity == dg.AssetCheckSeverity.WARN and got.passed is False
    plain = dg.AssetCheckResult(check_name="c", passed=True)
    assert _with_description(plain) is plain
