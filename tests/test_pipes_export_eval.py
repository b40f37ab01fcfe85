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
    if isinstance(obj, dict):
        return {k: _stable(v) for k, v in obj.items() if k not in VOLATILE_MANIFEST}
    if isinstance(obj, list):
        return [_stable(v) for v in obj]
    return obj


def _spec():
    from tests.test_pipeline_assets import DEMO, tiny

    d = tiny(DEMO, steps=1)
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
