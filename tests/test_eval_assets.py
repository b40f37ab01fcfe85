"""Eval assets on a real Dagster instance: a small pipeline (local base, external adapter, a merge) with an eval that
compares the merge with its parents, asset checks judged from the scores, a failing blocking check that stops a
downstream asset of the same run (the reason in the check's description and metadata), and the eval part of the
pipeline spec (validation messages with YAML paths)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import dagster as dg
import pytest
import yaml

from assets.common import dir_content_hash
from assets.evals import eval_keys_for_model
from pipelines.builder import build_definitions
from pipelines.spec import PipelineSpecError, parse_pipeline
from resources.evaluator import EvaluatorResource
from resources.model_store import ModelStoreResource

EVAL_KEY = dg.AssetKey(["eval", "ev", "blend_eval"])
DOWNSTREAM_KEY = dg.AssetKey(["publish", "ev", "blend"])


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A pipeline folder: a tiny base, a PEFT adapter for it, a multiple-choice task and a held-out text."""
    from pipelines.toy_models import save_lora_adapter, save_tiny_llama

    root = tmp_path_factory.mktemp("evproject")
    base = save_tiny_llama(root / "models" / "base", seed=0, hidden=32, vocab=128)
    save_lora_adapter(base, root / "adapters" / "skill", seed=1, r=4, alpha=16)
    tasks = root / "tasks"
    tasks.mkdir()
    rows = [{"prompt": f"question: what is {a} plus {b}? answer:", "choices": [" four", " two", " ten"],
             "label": (a + b) % 3} for a in range(3) for b in range(3)]
    (tasks / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tasks / "mc.yaml").write_text(yaml.safe_dump({
        "task": "toy_mc", "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": "mc.jsonl"}},
        "test_split": "test", "output_type": "multiple_choice", "doc_to_text": "{{prompt}}",
        "doc_to_choice": "{{choices}}", "doc_to_target": "{{label}}", "metric_list": [{"metric": "acc"}]}))
    (root / "heldout.txt").write_text("the quick brown fox jumps over the lazy dog\n\nmerge models with lora adapters\n")
    return root


def pipeline(root: Path, checks: list[dict], **eval_extra) -> dict:
    return {
        "name": "ev",
        "base_models": {"base": {"path": "models/base"}},
        "adapters": {"skill": {"path": "adapters/skill", "base": "base"}},
        "merges": {"blend": {"method": "task_arithmetic", "base_model": "base", "dtype": "float32",
                             "models": [{"model": "skill", "parameters": {"weight": 0.5}}]}},
        "evals": {"blend_eval": {
            "model": "blend", "compare_to": ["base", "skill"], "include": ["tasks"], "batch_size": 4,
            "tasks": ["toy_mc", {"name": "ppl", "perplexity": "heldout.txt", "metric": "byte_perplexity"}],
            "checks": checks, **eval_extra}},
    }


def defs_with_downstream(root: Path, spec_dict: dict, store: Path) -> dg.Definitions:
    """The pipeline plus a stand-in for an export/publish asset that depends on the eval (gated by its checks)."""
    spec = parse_pipeline(spec_dict, base_dir=root)
    defs = build_definitions(spec, resources={"model_store": ModelStoreResource(root=str(store)),
                                              "evaluator": EvaluatorResource(device="cpu")})

    @dg.asset(key=DOWNSTREAM_KEY, deps=[EVAL_KEY])
    def publish() -> None:
        return None

    return dg.Definitions.merge(defs, dg.Definitions(assets=[publish]))


def instance(tmp_path: Path) -> dg.DagsterInstance:
    """A real SQLite-backed instance (run, event and check storage on disk)."""
    home = tmp_path / "home"
    home.mkdir()
    return dg.DagsterInstance.local_temp(str(home))


def check_evals(res: dg.ExecuteInJobResult) -> dict[str, dg.AssetCheckEvaluation]:
    """The eval assets' check results (merges report their own ``artifact_complete`` check too)."""
    return {e.check_name: e for e in res.get_asset_check_evaluations() if e.asset_key.path[0] == "eval"}


def test_failing_blocking_check_stops_downstream_with_reason(project, tmp_path):
    checks = [
        {"task": "ppl", "max": 1.0, "name": "ppl_under_one"},  # byte perplexity is > 1: fails, blocking
        {"task": "toy_mc", "min": 0.0, "blocking": False},  # passes
        {"task": "ppl", "max_ratio_of_best_parent": 100.0},  # passes: within 100x the best (lowest) parent
    ]
    defs = defs_with_downstream(project, pipeline(project, checks), tmp_path / "store")
    with instance(tmp_path) as inst:
        res = dg.materialize(list(defs.assets), resources=defs.resources, instance=inst, raise_on_error=False)
        assert not res.success
        evs = check_evals(res)
        assert set(evs) == {"ppl_under_one", "toy_mc_min", "ppl_vs_best_parent"}
        bad = evs["ppl_under_one"]
        assert not bad.passed and bad.severity == dg.AssetCheckSeverity.ERROR
        reason = bad.description
        assert reason.startswith("FAILED: 'blend' byte_perplexity on ppl: ") and "> max 1" in reason
        assert "blocking: downstream assets of this run are skipped" in reason
        meta = {k: getattr(v, "value", v) for k, v in bad.metadata.items()}
        assert meta["reason"] == reason and meta["max"] == 1.0 and meta["observed"] > 1.0
        assert evs["toy_mc_min"].passed
        ratio = {k: getattr(v, "value", v) for k, v in evs["ppl_vs_best_parent"].metadata.items()}
        assert evs["ppl_vs_best_parent"].passed and ratio["best_parent"] in ("base", "skill")

        # the eval itself was recorded; the downstream asset never ran
        mat = inst.get_latest_materialization_event(EVAL_KEY).asset_materialization
        assert inst.get_latest_materialization_event(DOWNSTREAM_KEY) is None
        steps = {s.step_key: s.status.value for s in inst.get_run_step_stats(res.run_id)}
        assert steps["eval__ev__blend_eval"] == "FAILURE" and "publish__ev__blend" not in steps  # never started
        (failure,) = [e for e in res.all_events if e.event_type_value == "STEP_FAILURE"]
        assert "blocking asset check failed" in failure.step_failure_data.error.message
        assert "ppl_under_one" in failure.step_failure_data.error.message
        # the reason is in the UI's check record too (what the asset's Checks tab shows)
        rec = inst.event_log_storage.get_latest_asset_check_execution_by_key(
            [dg.AssetCheckKey(EVAL_KEY, "ppl_under_one")])[dg.AssetCheckKey(EVAL_KEY, "ppl_under_one")]
        assert rec.event.dagster_event.event_specific_data.description == reason

        meta = {k: getattr(v, "value", v) for k, v in mat.metadata.items()}
        results = meta["results"]
        assert results["model"] == "blend" and set(results["scores"]) == {"blend", "base", "skill"}
        for node, tasks in results["scores"].items():
            assert set(tasks) == {"toy_mc", "ppl"}, node
            assert 0.0 <= tasks["toy_mc"]["acc"] <= 1.0
            assert tasks["ppl"]["byte_perplexity"] > 1.0
        s = results["scores"]
        assert s["base"]["ppl"]["byte_perplexity"] != s["skill"]["ppl"]["byte_perplexity"]  # the adapter is applied
        observed = {k: getattr(v, "value", v) for k, v in bad.metadata.items()}["observed"]
        assert observed == s["blend"]["ppl"]["byte_perplexity"]
        best = min(s["base"]["ppl"]["byte_perplexity"], s["skill"]["ppl"]["byte_perplexity"])
        assert ratio["threshold"] == pytest.approx(100.0 * best)

        # the report in the store; data version = content hash of files that depend on the scores only
        path = Path(meta["path"])
        assert path.parent == tmp_path / "store" / "eval" / "blend_eval"
        dv = mat.tags["dagster/data_version"]
        assert dir_content_hash(path, store_root=tmp_path / "store")[0] == dv and path.name == dv[:16]
        stored = json.loads((path / "results.json").read_text())
        assert stored["scores"] == results["scores"] and stored["model"] == "blend"
        assert (path / "scores.png").read_bytes()[:4] == b"\x89PNG"
        assert meta["scores_plot"].startswith("![scores of blend vs its parents](data:image/png;base64,")
        assert "| ppl | byte_perplexity ↓ |" in meta["scores_table"] and "`blend` (evaluated)" in meta["scores_table"]
        assert "**toy_mc** (acc, higher is better)" in meta["summary"] and "⛔ `ppl_under_one`" in meta["summary"]
        cols = [c.name for c in mat.metadata["scores"].value.schema.columns]
        assert cols == ["task", "metric", "blend", "base", "skill"]
        assert meta["checks_failed"] == ["ppl_under_one"]
        assert set(meta["input_data_versions"]) == {"merged/ev/blend", "base_model/ev/base", "lora/ev/skill"}


def test_passing_checks_let_downstream_run_and_scores_match_a_direct_evaluation(project, tmp_path):
    from resources.eval_backend import EvalOptions, EvalTask, evaluate

    spec = pipeline(project, [{"task": "toy_mc", "min_ratio_of_best_parent": 0.01}], limit=5)
    spec["evals"]["blend_eval"]["thresholds"] = {"ppl": 1.0}  # shorthand: byte perplexity >= 1 (always true)
    defs = defs_with_downstream(project, spec, tmp_path / "store")
    with instance(tmp_path) as inst:
        res = dg.materialize(list(defs.assets), resources=defs.resources, instance=inst)
        assert res.success
        evs = check_evals(res)
        assert set(evs) == {"toy_mc_vs_best_parent", "ppl_min"} and all(e.passed for e in evs.values())
        assert inst.get_latest_materialization_event(DOWNSTREAM_KEY) is not None
        mat = inst.get_latest_materialization_event(EVAL_KEY).asset_materialization
        results = mat.metadata["results"].value
        merged = Path(inst.get_latest_materialization_event(dg.AssetKey(["merged", "ev", "blend"]))
                      .asset_materialization.metadata["path"].value)
    direct = evaluate(merged, [EvalTask("toy_mc"), EvalTask("ppl", text_file=project / "heldout.txt")],
                      EvalOptions(batch_size=4, limit=5), include=[project / "tasks"])
    for task, metrics in direct.scores.items():
        assert results["scores"]["blend"][task] == pytest.approx(metrics, rel=1e-9)
    assert all(not math.isnan(v) for t in results["scores"]["blend"].values() for v in t.values())


def test_eval_graph_shape_pool_and_gating_helper(project):
    spec = parse_pipeline(pipeline(project, [{"task": "toy_mc", "min": 0.2, "blocking": False}]), base_dir=project)
    defs = build_definitions(spec)
    graph = defs.resolve_asset_graph()
    assert graph.get(EVAL_KEY).parent_keys == {dg.AssetKey(["merged", "ev", "blend"]),
                                               dg.AssetKey(["base_model", "ev", "base"]),
                                               dg.AssetKey(["lora", "ev", "skill"])}
    ad = defs.get_assets_def(EVAL_KEY)
    assert ad.op.pool == "gpu"
    (cs,) = list(ad.check_specs)
    assert cs.name == "toy_mc_min" and cs.blocking is False and ">= 0.2" in cs.description
    from assets.common import BuildContext

    assert eval_keys_for_model(BuildContext(spec), "blend") == [EVAL_KEY]
    # editing a task file makes the eval stale (its code version changes), nothing else
    before = {k: graph.get(k).code_version for k in graph.get_all_asset_keys()}
    (project / "heldout.txt").write_text((project / "heldout.txt").read_text() + "\nmore held-out text\n")
    try:
        g2 = build_definitions(parse_pipeline(pipeline(project, [{"task": "toy_mc", "min": 0.2, "blocking": False}]),
                                              base_dir=project)).resolve_asset_graph()
        changed = {k for k in before if g2.get(k).code_version != before[k]}
        assert changed == {EVAL_KEY}
    finally:
        (project / "heldout.txt").write_text("the quick brown fox jumps over the lazy dog\n\nmerge models with lora "
                                             "adapters\n")


# -- the eval part of the spec ------------------------------------------------------------------------------------------


def errors_of(project: Path, d: dict) -> list[str]:
    with pytest.raises(PipelineSpecError) as ei:
        parse_pipeline(d, base_dir=project)
    return ei.value.errors


def test_eval_spec_errors_name_the_yaml_path(project):
    d = pipeline(project, [{"task": "toy_mcc", "min": 0.5},
                           {"task": "ppl", "metric": "acc", "max": 3},
                           {"task": "toy_mc", "mn": 0.5}])
    errs = errors_of(project, d)
    assert "evals.blend_eval.checks[2].mn: unknown key 'mn' (did you mean 'min'?); allowed here: task, metric, min, " \
           "max, min_ratio_of_best_parent, max_ratio_of_best_parent, blocking, name, description" in errs

    d["evals"]["blend_eval"]["checks"] = [{"task": "toy_mcc", "min": 0.5}, {"task": "ppl", "metric": "acc", "max": 3},
                                          {"task": "toy_mc"}, {"task": "toy_mc", "min": 2, "max": 1}]
    errs = errors_of(project, d)
    assert "evals.blend_eval.checks[2]: give at least one of 'min', 'max', 'min_ratio_of_best_parent', " \
           "'max_ratio_of_best_parent'" in errs
    assert "evals.blend_eval.checks[3]: min 2.0 is above max 1.0: no score can pass" in errs

    d["evals"]["blend_eval"]["checks"] = [{"task": "toy_mcc", "min": 0.5}, {"task": "ppl", "metric": "acc", "max": 3}]
    errs = errors_of(project, d)
    assert "evals.blend_eval.checks[0].task: 'toy_mcc' is not one of the tasks (did you mean 'toy_mc'?); tasks: " \
           "toy_mc, ppl" in errs
    assert any(e.startswith("evals.blend_eval.checks[1].metric: a perplexity task reports word_perplexity, "
                            "byte_perplexity, bits_per_byte, not 'acc'") for e in errs)

    d = pipeline(project, [{"task": "toy_mc", "min_ratio_of_best_parent": 0.9}])
    d["evals"]["blend_eval"].update(compare_to=[], include=["tasks", "no_such_dir"])
    d["evals"]["blend_eval"]["tasks"] = ["toy_mc", {"name": "ppl", "perplexity": "missing.txt"},
                                         {"name": "other", "path": "tasks/mc.yaml"},
                                         {"name": "x", "path": "heldout.jsonl"}]
    assert errors_of(project, d) == [
        "evals.blend_eval.tasks[3]: 'path: heldout.jsonl' must be an lm-eval task YAML or a folder of them; for "
        "perplexity on a text file write 'perplexity: heldout.jsonl'"]
    d["evals"]["blend_eval"]["tasks"].pop()
    errs = errors_of(project, d)
    assert "evals.blend_eval.checks[0]: a ratio-of-best-parent check needs models to compare with; list them in " \
           "evals.blend_eval.compare_to" in errs
    assert any(e.startswith("evals.blend_eval.include[1]: ") and "no_such_dir' does not exist" in e for e in errs)
    assert any(e.startswith("evals.blend_eval.tasks[1].perplexity: file ") and "missing.txt' does not exist" in e
               for e in errs)
    assert any(e.startswith("evals.blend_eval.tasks[2].path: ") and "defines no lm-eval task 'other'" in e
               and "it defines toy_mc" in e for e in errs)

    d = pipeline(project, [])
    d["evals"]["blend_eval"]["compare_to"] = ["blend", "skill", "skill"]
    errs = errors_of(project, d)
    assert "evals.blend_eval.compare_to[0]: 'blend' is the evaluated model itself" in errs
    assert "evals.blend_eval.compare_to[2]: 'skill' is listed twice" in errs

    d = pipeline(project, [{"task": "toy_mc", "min": 0.1}, {"task": "toy_mc", "min": 0.2}])
    assert "evals.blend_eval.checks: two checks are named 'toy_mc_min'; give one a distinct 'name:'" in \
        errors_of(project, d)


def test_eval_spec_shorthands_adapters_and_warnings(project):
    d = pipeline(project, [{"task": "ppl", "max": 40}])
    d["evals"]["blend_eval"]["tasks"][0] = {"name": "toy_mc", "threshold": 0.25}
    d["evals"]["blend_eval"]["tasks"].append("hellaswag")  # not local: allowed, with a warning
    d["evals"]["blend_eval"]["thresholds"] = {"hellaswag": 0.3}
    d["evals"]["skill_eval"] = {"model": "skill", "tasks": ["toy_mc"], "include": ["tasks"]}  # adapter as a model
    spec = parse_pipeline(d, base_dir=project)
    e = spec.evals["blend_eval"]
    checks = {c.check_name(): c for c in e.all_checks()}
    assert set(checks) == {"ppl_max", "toy_mc_min", "hellaswag_min"}
    assert checks["toy_mc_min"].min == 0.25 and checks["hellaswag_min"].min == 0.3
    assert all(c.blocking for c in checks.values())
    assert e.task_metric("ppl") == "byte_perplexity" and e.task_metric("toy_mc") is None
    assert any(w.startswith("evals.blend_eval.tasks[2]: 'hellaswag' is not defined in evals.blend_eval.include")
               for w in spec.warnings)
    defs = build_definitions(spec)
    assert defs.resolve_asset_graph().get(dg.AssetKey(["eval", "ev", "skill_eval"])).parent_keys == {
        dg.AssetKey(["base_model", "ev", "base"]), dg.AssetKey(["lora", "ev", "skill"])}


def test_an_eval_can_be_scheduled(project):
    d = pipeline(project, [])
    d["schedules"] = {"nightly_eval": {"cron": "0 4 * * *", "target": "blend_eval"},
                      "by_section": {"cron": "0 5 * * *", "target": "evals.blend_eval", "upstream": False}}
    defs = build_definitions(parse_pipeline(d, base_dir=project))
    job = defs.resolve_job_def("ev__nightly_eval")
    assert EVAL_KEY in job.asset_layer.selected_asset_keys
    assert dg.AssetKey(["merged", "ev", "blend"]) in job.asset_layer.selected_asset_keys  # and upstream
    assert defs.resolve_job_def("ev__by_section").asset_layer.selected_asset_keys == {EVAL_KEY}
