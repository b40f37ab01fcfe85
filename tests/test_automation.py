"""Incremental by default (issue 4): ``dagster.evaluate_automation_conditions`` over a SQLite instance with real
materializations of a real pipeline (tests/automation_world.py: a local base model directory with its tokenizer, two
local PEFT adapters written by "another tool", merges of each and of both, a real lm-eval eval and a real safetensors
float16 export of ``m_a`` and of ``m_b``, a folder of adapters as dynamic partitions). What it proves:

1. re-materializing the adapters and the base with identical bytes (and re-observing them) requests nothing, where
   plain ``eager()`` re-requests the merges;
2. new bytes in adapter ``a`` request ``lora/auto/a``, then exactly the merges using it (``m_a``, ``m_ab``), then the
   eval and the export of ``m_a`` (one run, eval first; ``m_ab`` has neither) — never anything of ``m_b``;
3. bumping a merge's code version requests that merge; identical output bytes request nothing after it;
4. a failed blocking check of the real eval of ``m_a`` stops ``export/auto/m_a_st``: when the threshold is raised
   (the eval's code version changes: the eval, not the export, is re-requested; after its check failed the export is
   not requested, tick after tick), and when a new ``m_a`` arrives under the raised threshold (eval and export are
   requested in one tick and run as one run, where the failed check skips the export step; nothing is requested
   after it); lowering the threshold re-runs the eval, its check passes, and the export of the new ``m_a`` is
   requested and built.

The tests share one world (building it, with two lm-eval runs and two exports, costs ~20-35 s here; the file ~80 s) and run in file order; each starts
from, and leaves, a settled state: an evaluation that requests nothing.

The eval's blocking check is ``acc >= min`` on 4 samples; the test sets ``min`` in the spec to 0 (no model can fail)
or 1.01 (no model can pass), so pass/fail does not depend on what a random tiny model happens to score.
"""

from __future__ import annotations

import shutil

import dagster as dg
import pytest

from assets.automation import derived_asset_condition
from tests.automation_world import GATE_CHECK, GATE_FAIL, GATE_PASS, K, World, make_world, write_adapter

pytestmark = pytest.mark.timeout(300)

M_A, M_B, M_AB = K("merged", "m_a"), K("merged", "m_b"), K("merged", "m_ab")
E_A, E_B = K("eval", "m_a_eval"), K("eval", "m_b_eval")
X_A, X_B = K("export", "m_a_st"), K("export", "m_b_st")
L_A, L_B = K("lora", "a"), K("lora", "b")
OF_B = (L_B, M_B, E_B, X_B)  # nothing of these may be requested or rebuilt when only adapter a changes


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    w = make_world(tmp_path_factory.mktemp("automation"))
    w.evaluate_eager()  # initialises the contrast's cursor
    return w


def settled(w: World) -> None:
    assert w.evaluate() == set(), "the world is not settled: an evaluation requested something"


def mat_count(w: World, key: dg.AssetKey) -> int:
    return len(w.instance.fetch_materializations(dg.AssetRecordsFilter(asset_key=key), limit=1000).records)


def latest_meta(w: World, key: dg.AssetKey) -> dict:
    return w.instance.get_latest_materialization_event(key).asset_materialization.metadata


def check_events(res: dg.ExecuteInJobResult) -> dict[str, bool]:
    """check key (``asset/check``) -> passed, for the checks a run evaluated."""
    return {f"{e.event_specific_data.asset_key.to_user_string()}/{e.event_specific_data.check_name}":
            e.event_specific_data.passed for e in res.all_events if e.event_type_value == "ASSET_CHECK_EVALUATION"}


def test_world_has_real_evals_and_exports(world):
    from transformers import AutoTokenizer

    graph = world.defs().resolve_asset_graph()
    # the export of a model depends on its merge and on its eval, whose check is blocking
    assert graph.get(X_A).parent_keys == {M_A, E_A} and graph.get(X_B).parent_keys == {M_B, E_B}
    assert graph.get(E_A).parent_keys == {M_A} and graph.get(E_B).parent_keys == {M_B}
    assert not graph.get(M_AB).child_keys  # m_ab has no eval and no export
    for e in (E_A, E_B):
        spec = world.defs().get_assets_def(e).check_specs_by_output_name
        [check] = spec.values()
        assert check.name == GATE_CHECK and check.blocking
    # the merges carry the base's tokenizer, and lm-eval scored the demo task on them: 4 samples, acc in [0, 1]
    for m, e, x in (("m_a", E_A, X_A), ("m_b", E_B, X_B)):
        merged_dir = latest_meta(world, K("merged", m))["path"].value
        tok = AutoTokenizer.from_pretrained(merged_dir)
        ids = tok("calc: 42+4=46")["input_ids"]
        assert tok.unk_token_id not in ids and len(ids) > 3
        meta = latest_meta(world, e)
        scores = meta["results"].value["scores"][m]["arithmetic_choice"]
        assert 0.0 <= scores["acc"] <= 1.0 and scores["acc"] * 4 == round(scores["acc"] * 4)
        assert meta["limit"].value == 4
        gate = world.latest_gate(m)
        assert gate.passed and gate.metadata["min"].value == GATE_PASS
        assert gate.metadata["observed"].value == scores["acc"]
        xm = latest_meta(world, x)
        assert xm["type"].value == "safetensors" and xm["quant"].value == "float16"
        assert xm["input_data_versions"].value == {K("merged", m).to_user_string(): world.latest_version(K("merged", m))}
        assert 1.9 < xm["compression_ratio"].value < 2.1  # float32 merge -> float16 export


def test_condition_is_on_derived_assets_only(world):
    graph = world.defs().resolve_asset_graph()
    cond = derived_asset_condition()
    for key in (M_A, M_B, M_AB, E_A, E_B, X_A, X_B, L_A, L_B, K("base_model", "base"), K("merged", "community")):
        assert graph.get(key).automation_condition == cond, key
    assert graph.get(K("lora", "community")).automation_condition is None  # the folder sensor requests it
    # every external input feeds its asset through an observable source, with an input_available check on it
    for name, fed in (("a", L_A), ("b", L_B), ("base", K("base_model", "base"))):
        assert K("source", name) in graph.get(fed).parent_keys
        assert graph.get(K("source", name)).is_observable
        assert dg.AssetCheckKey(fed, "input_available") in graph.asset_check_keys


def test_1_identical_bytes_request_nothing(world):
    settled(world)
    before = {k: world.latest_version(k) for k in (L_A, L_B, M_A)}
    # another run re-materializes the adapters and the base: same bytes, same data versions
    world.materialize(L_A, L_B, K("base_model", "base"))
    assert {k: world.latest_version(k) for k in (L_A, L_B, M_A)} == before
    # re-observe on demand (the observe job) and by the sensor after a rewrite with identical bytes (new mtime)
    world.observe_job()
    a_file = world.root / "adapters" / "a" / "adapter_model.safetensors"
    a_file.write_bytes(a_file.read_bytes())
    assert world.observation_tick() == []  # unchanged content: nothing recorded
    assert world.evaluate() == set()
    # the contrast: plain eager() re-requests the merges (and what follows) on those identical re-materializations
    assert {M_A, M_B, M_AB} <= world.evaluate_eager()


def test_2_changed_adapter_requests_exactly_its_downstream(world):
    settled(world)
    runs_of_b = {k: mat_count(world, k) for k in OF_B}
    old = {k: world.latest_version(k) for k in (L_A, M_A, M_AB, E_A, X_A)}
    write_adapter(world.root / "base", world.root / "adapters" / "a", seed=11)  # the other tool writes new weights
    events = world.observation_tick()
    assert [e.asset_key for e in events] == [K("source", "a")]
    assert world.evaluate() == {L_A}
    world.materialize(L_A)
    assert world.latest_version(L_A) != old[L_A]
    assert world.evaluate() == {M_A, M_AB}  # not m_b: it does not use adapter a
    world.materialize(M_A, M_AB)
    assert world.latest_version(M_A) != old[M_A] and world.latest_version(M_AB) != old[M_AB]
    # the eval and the export of m_a (m_ab has neither); requested in one tick, they run as one run, eval first,
    # so the eval's blocking check gates the export inside that run
    assert world.evaluate() == {E_A, X_A}
    res = world.materialize(E_A, X_A)
    assert check_events(res) == {f"{E_A.to_user_string()}/{GATE_CHECK}": True}
    assert world.latest_version(E_A) != old[E_A] and world.latest_version(X_A) != old[X_A]
    assert latest_meta(world, X_A)["input_data_versions"].value == {M_A.to_user_string(): world.latest_version(M_A)}
    # the export's new eval input came from the run that also built the export: not a reason to build it again
    settled(world)
    assert {k: mat_count(world, k) for k in OF_B} == runs_of_b


def test_3_code_version_bump_requests_the_merge(world):
    settled(world)
    before = {k: world.latest_version(k) for k in (M_B, E_B, X_B)}
    runs = {k: mat_count(world, k) for k in (E_B, X_B)}
    world.merge_code_versions["m_b"] = "2"  # someone bumps merges.m_b.code_version in the YAML
    assert world.evaluate() == {M_B}
    world.materialize(M_B)
    # same inputs, same method: same bytes, so neither the eval nor the export after it is requested
    assert world.latest_version(M_B) == before[M_B]
    settled(world)
    assert {k: world.latest_version(k) for k in (M_B, E_B, X_B)} == before
    assert {k: mat_count(world, k) for k in (E_B, X_B)} == runs


def test_4_failed_blocking_eval_check_stops_the_export(world):
    settled(world)
    runs_of_b = {k: mat_count(world, k) for k in OF_B}
    x_runs, x_version = mat_count(world, X_A), world.latest_version(X_A)
    gate = f"{E_A.to_user_string()}/{GATE_CHECK}"

    # (a) the gate is raised above any accuracy: the threshold is part of the eval's node, so the eval's code version
    # changed and the eval (only) is re-requested; its check fails and the export is not requested
    world.eval_min["m_a"] = GATE_FAIL
    assert world.evaluate() == {E_A}
    res = world.materialize(E_A, expect_success=False)  # the eval materializes; its blocking check fails the step
    assert check_events(res) == {gate: False}
    failed = world.latest_gate("m_a")
    assert not failed.passed and failed.metadata["min"].value == GATE_FAIL
    assert "FAILED" in failed.description and f"< min {GATE_FAIL:g}" in failed.description
    assert world.evaluate() == set()  # export/auto/m_a_st waits on the failed gate ...
    assert world.evaluate() == set()  # ... tick after tick

    # (b) a new m_a under the failing gate: lora, merges, the eval again — and still no export
    write_adapter(world.root / "base", world.root / "adapters" / "a", seed=12)
    world.observation_tick()
    assert world.evaluate() == {L_A}
    world.materialize(L_A)
    assert world.evaluate() == {M_A, M_AB}
    world.materialize(M_A, M_AB)
    # the eval and the export are requested in one tick (Dagster's all_blocking_checks_passed is true for a check
    # that will run in the same tick), so they run as one run, eval first: the failed check skips the export step
    assert world.evaluate() == {E_A, X_A}
    res = world.materialize(E_A, X_A, expect_success=False)
    assert check_events(res) == {gate: False}
    # the eval step failed on its blocking check, after materializing; the export step never started
    assert [e.step_key for e in res.all_events if e.event_type_value == "STEP_START"] == ["eval__auto__m_a_eval"]
    assert [e.asset_key for e in res.get_asset_materialization_events()] == [E_A]
    assert world.evaluate() == set()
    assert world.evaluate() == set()
    assert (mat_count(world, X_A), world.latest_version(X_A)) == (x_runs, x_version)

    # (c) the gate is lowered again: the eval is re-requested (code version), passes, and releases the export
    world.eval_min["m_a"] = GATE_PASS
    assert world.evaluate() == {E_A}
    assert check_events(world.materialize(E_A)) == {gate: True}
    assert world.latest_gate("m_a").passed
    assert world.evaluate() == {X_A}
    world.materialize(X_A)
    assert mat_count(world, X_A) == x_runs + 1 and world.latest_version(X_A) != x_version
    # the export holds the new m_a
    assert latest_meta(world, X_A)["input_data_versions"].value == {M_A.to_user_string(): world.latest_version(M_A)}
    settled(world)
    assert {k: mat_count(world, k) for k in OF_B} == runs_of_b


def test_5_vanished_adapter_is_reported_and_the_last_merge_stays(world):
    settled(world)
    adapter_b = world.root / "adapters" / "b"
    stash = world.root / "b.stash"
    version_before = world.latest_version(M_B)
    merged_path = world.instance.get_latest_materialization_event(M_B).asset_materialization.metadata["path"].value
    shutil.move(adapter_b, stash)
    try:
        events = world.observation_tick()
        assert len(events) == 1 and events[0].asset_key == K("source", "b")
        meta = events[0].metadata
        assert meta["status"].value == "missing" and "does not exist" in meta["reason"].value
        assert (events[0].tags or {}).get("dagster/data_version") == meta["kept_data_version"].value  # last good
        # the lineage graph shows why on lora/auto/b: its input_available check fails (WARN, not blocking)
        [check] = world.last_checks
        assert check.asset_key == L_B and check.check_name == "input_available" and not check.passed
        assert check.severity == dg.AssetCheckSeverity.WARN and "does not exist" in check.description
        summary = world.instance.event_log_storage.get_asset_check_execution_history(
            dg.AssetCheckKey(L_B, "input_available"), limit=1)
        assert summary and summary[0].event.dagster_event.event_specific_data.passed is False
        assert world.evaluate() == set()  # nothing is requested ...
        assert world.latest_version(M_B) == version_before  # ... the last good merge stays
        from pathlib import Path

        assert Path(merged_path).is_dir()
        assert world.observation_tick() == []  # still missing: reported once, not every tick
        # an unreadable adapter (config gone) is reported the same way
        shutil.copytree(stash, adapter_b)
        (adapter_b / "adapter_config.json").unlink()
        ev = world.observation_tick()
        assert ev[0].metadata["status"].value == "unreadable"
        shutil.rmtree(adapter_b)
    finally:
        if not adapter_b.exists():
            shutil.move(stash, adapter_b)
    ev = world.observation_tick()  # back with the same bytes: status ok, same version, nothing to do
    assert ev[0].metadata["status"].value == "ok" and world.last_checks[0].passed
    settled(world)


def test_6_folder_of_adapters_becomes_partitions_and_per_adapter_merges(world):
    settled(world)
    defs = world.defs()
    sensor = defs.resolve_sensor_def("auto__community__adapters")
    assert sensor.default_status == dg.DefaultSensorStatus.RUNNING
    folder = world.root / "community"
    write_adapter(world.root / "base", folder / "x1", seed=21)
    write_adapter(world.root / "base", folder / "x2", seed=22)

    def tick(cursor=None):
        ctx = dg.build_sensor_context(instance=world.instance, cursor=cursor)
        result = sensor(ctx)
        for req in result.dynamic_partitions_requests or []:
            world.instance.add_dynamic_partitions(req.partitions_def_name, list(req.partition_keys))
        return result

    r = tick()
    assert sorted(r.dynamic_partitions_requests[0].partition_keys) == ["x1", "x2"]
    assert sorted(q.partition_key for q in r.run_requests) == ["x1", "x2"]
    assert world.instance.get_dynamic_partitions("auto__community") == ["x1", "x2"]
    for pk in ("x1", "x2"):
        world.materialize(K("lora", "community"), partition=pk)
    req = world.evaluate_partitions()
    assert req == {K("merged", "community"): {"x1", "x2"}}
    for pk in ("x1", "x2"):
        world.materialize(K("merged", "community"), partition=pk)
    settled(world)
    # a second tick with nothing new requests nothing; a changed adapter requests its partition only
    r2 = tick(r.cursor)
    assert not r2.run_requests and not r2.dynamic_partitions_requests
    write_adapter(world.root / "base", folder / "x2", seed=23)
    shutil.rmtree(folder / "x1")  # vanished: reported, partition kept
    r3 = tick(r.cursor)
    assert [q.partition_key for q in r3.run_requests] == ["x2"] and not r3.dynamic_partitions_requests
    assert world.instance.get_dynamic_partitions("auto__community") == ["x1", "x2"]
    world.materialize(K("lora", "community"), partition="x2")
    assert world.evaluate_partitions() == {K("merged", "community"): {"x2"}}
    world.materialize(K("merged", "community"), partition="x2")
    settled(world)
