"""Incremental by default (issue 4): ``dagster.evaluate_automation_conditions`` over a SQLite instance with real
materializations of a real pipeline (tests/automation_world.py: a local base model directory, two local PEFT
adapters written by "another tool", merges of each and of both, export stand-ins, a blocking check, a folder of
adapters as dynamic partitions).

The tests share one world (building it costs ~30 s here) and run in file order; each starts from, and leaves, a
settled state: an evaluation that requests nothing.

Exports and evals: the builder's hook gives every ``export/…`` and ``eval/…`` asset the same condition by key
prefix; the ``export/auto/<merge>_x`` stand-ins get it through the same function (``apply_conditions``). When the
export/eval assets exist, add them to the world's spec and extend the expected sets below.
"""

from __future__ import annotations

import shutil

import dagster as dg
import pytest

from assets.automation import derived_asset_condition
from tests.automation_world import K, World, make_world, write_adapter

pytestmark = pytest.mark.timeout(300)

M_A, M_B, M_AB = K("merged", "m_a"), K("merged", "m_b"), K("merged", "m_ab")
X_A, X_B = K("export", "m_a_x"), K("export", "m_b_x")
L_A, L_B = K("lora", "a"), K("lora", "b")


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    w = make_world(tmp_path_factory.mktemp("automation"))
    w.evaluate_eager()  # initialises the contrast's cursor
    return w


def settled(w: World) -> None:
    assert w.evaluate() == set(), "the world is not settled: an evaluation requested something"


def mat_count(w: World, key: dg.AssetKey) -> int:
    return len(w.instance.fetch_materializations(dg.AssetRecordsFilter(asset_key=key), limit=1000).records)


def test_condition_is_on_derived_assets_only(world):
    graph = world.defs().resolve_asset_graph()
    cond = derived_asset_condition()
    for key in (M_A, M_B, M_AB, X_A, X_B, L_A, L_B, K("base_model", "base"), K("merged", "community")):
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
    m_b_runs = mat_count(world, M_B)
    old = {k: world.latest_version(k) for k in (L_A, M_A, M_AB, X_A)}
    write_adapter(world.root / "base", world.root / "adapters" / "a", seed=11)  # the other tool writes new weights
    events = world.observation_tick()
    assert [e.asset_key for e in events] == [K("source", "a")]
    assert world.evaluate() == {L_A}
    world.materialize(L_A)
    assert world.latest_version(L_A) != old[L_A]
    assert world.evaluate() == {M_A, M_AB}  # not m_b: it does not use adapter a
    world.materialize(M_A, M_AB)
    assert world.latest_version(M_A) != old[M_A] and world.latest_version(M_AB) != old[M_AB]
    assert world.evaluate() == {X_A}  # the export of m_a; m_ab has none
    world.materialize(X_A)
    assert world.latest_version(X_A) != old[X_A]
    settled(world)
    assert mat_count(world, M_B) == m_b_runs


def test_3_code_version_bump_requests_the_merge(world):
    settled(world)
    before = world.latest_version(M_B)
    world.merge_code_versions["m_b"] = "2"  # someone bumps merges.m_b.code_version in the YAML
    assert world.evaluate() == {M_B}
    world.materialize(M_B)
    # same inputs, same method: same bytes, so the export after it is not requested
    assert world.latest_version(M_B) == before
    settled(world)


def test_4_failed_blocking_check_stops_the_export(world):
    settled(world)
    world.check_passes["ok"] = False
    write_adapter(world.root / "base", world.root / "adapters" / "a", seed=12)
    world.observation_tick()
    assert world.evaluate() == {L_A}
    world.materialize(L_A)
    assert world.evaluate() == {M_A, M_AB}
    res = world.materialize(M_A, M_AB, expect_success=False)  # m_a materializes; its blocking check fails
    checks = [e for e in res.all_events if e.event_type_value == "ASSET_CHECK_EVALUATION"]
    assert checks and not checks[0].event_specific_data.passed
    assert world.evaluate() == set()  # export/auto/m_a_x waits on the failed gate
    assert world.evaluate() == set()
    # the gate passes on a re-check: the export goes
    world.check_passes["ok"] = True
    defs = world.defs()
    job_res = dg.materialize([*[a for a in defs.assets if isinstance(a, dg.AssetsDefinition) and a.is_executable
                                and a.partitions_def is None], *defs.asset_checks], instance=world.instance,
                             resources=defs.resources, selection=dg.AssetSelection.checks_for_assets(M_A))
    assert job_res.success and [e.event_specific_data.passed for e in job_res.all_events
                                if e.event_type_value == "ASSET_CHECK_EVALUATION"] == [True]
    assert world.evaluate() == {X_A}
    world.materialize(X_A)
    settled(world)


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
