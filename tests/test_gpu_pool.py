"""GPU concurrency (issue 4): two merges requested together run one at a time under the pool limit.

A SQLite instance (the ephemeral instance does not enforce pools) with the ``dagster.yaml`` the demo ships
(``concurrency: pools: default_limit:`` the number of GPUs, 1 on a CPU box) runs one job holding two real merges with
the multiprocess executor (each step its own process, two allowed at once): the event log must show one step blocked
on the ``gpu`` pool and the two merge steps' execution windows must not overlap.
"""

from __future__ import annotations

import os
from pathlib import Path

import dagster as dg
import pytest

pytestmark = [pytest.mark.heavy, pytest.mark.timeout(400)]

ROOT_ENV = "MERGELINE_TEST_POOL_ROOT"


def pool_spec(root: Path) -> dict:
    base, lora = root / "base", root / "lora"
    merge = lambda w: {"method": "task_arithmetic", "base_model": "base", "dtype": "float32",  # noqa: E731
                       "models": [{"model": "a", "parameters": {"weight": w}}]}
    return {
        "name": "pool",
        "automation": False,
        "base_models": {"base": {"path": str(base), "observe": False}},
        "adapters": {"a": {"base": "base", "path": str(lora), "observe": False}},
        "merges": {"m1": merge(1.0), "m2": merge(0.5)},
    }


def pool_defs() -> dg.Definitions:
    from pipelines.builder import build_definitions
    from resources.device import GpuResource
    from resources.model_store import ModelStoreResource

    root = Path(os.environ[ROOT_ENV])
    return build_definitions(pool_spec(root), resources={
        "gpu": GpuResource(device="cpu"), "model_store": ModelStoreResource(root=str(root / "store"))})


def two_merges_job() -> dg.JobDefinition:
    """Module-level, so the multiprocess executor's step processes can rebuild it."""
    defs = pool_defs()
    job = dg.define_asset_job("two_merges", selection=dg.AssetSelection.assets(
        dg.AssetKey(["merged", "pool", "m1"]), dg.AssetKey(["merged", "pool", "m2"])),
        executor_def=dg.multiprocess_executor.configured({"max_concurrent": 2}))
    return dg.Definitions(assets=defs.assets, jobs=[job], resources=defs.resources).resolve_job_def("two_merges")


def test_two_merges_run_one_at_a_time_under_the_gpu_pool(tmp_path, tiny_family, monkeypatch):
    import shutil

    shutil.copytree(tiny_family["base"], tmp_path / "base")
    shutil.copytree(tiny_family["lora"], tmp_path / "lora")
    monkeypatch.setenv(ROOT_ENV, str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    defs = pool_defs()
    merged = defs.get_assets_def(dg.AssetKey(["merged", "pool", "m1"]))
    assert merged.op.pool == "gpu"  # from the GPU resource's `pool`
    # the instance config the demo ships (pipelines/demo_dagster.py): pool limit = GPUs on this host, 1 without one
    import yaml

    from pipelines.demo_dagster import prepare_home
    from resources.gpu_slots import gpu_count_for_pool

    home = prepare_home(tmp_path / "home")
    limit = yaml.safe_load((home / "dagster.yaml").read_text())["concurrency"]["pools"]["default_limit"]
    assert limit == gpu_count_for_pool()
    if limit != 1:
        pytest.skip(f"this host has {limit} GPUs: two merges may run at once here")
    with dg.DagsterInstance.from_config(str(home)) as instance:
        up = dg.materialize([a for a in defs.assets if isinstance(a, dg.AssetsDefinition) and a.is_executable],
                            resources=defs.resources, instance=instance,
                            selection=dg.AssetSelection.assets(dg.AssetKey(["base_model", "pool", "base"]),
                                                               dg.AssetKey(["lora", "pool", "a"])))
        assert up.success
        result = dg.execute_job(dg.reconstructable(two_merges_job), instance=instance)
        assert result.success
        records = instance.get_records_for_run(result.run_id).records
        starts, ends, blocked = {}, {}, []
        for r in records:
            ev = r.event_log_entry.dagster_event
            if ev is None:
                continue
            if ev.event_type_value == "STEP_START":
                starts[ev.step_key] = r.event_log_entry.timestamp
            elif ev.event_type_value in ("STEP_SUCCESS", "STEP_FAILURE"):
                ends[ev.step_key] = r.event_log_entry.timestamp
            elif ev.event_type_value == "ENGINE_EVENT" and "gpu" in (ev.message or "") and ev.step_key:
                blocked.append(ev.message)
        assert set(starts) == {"merged__pool__m1", "merged__pool__m2"} == set(ends)
        first, second = sorted(starts, key=starts.get)
        assert ends[first] <= starts[second], (
            f"the merges overlapped: {first} {starts[first]:.2f}-{ends[first]:.2f}, "
            f"{second} {starts[second]:.2f}-{ends[second]:.2f}")
        assert blocked, "no step was reported blocked on the gpu pool"
        # and both produced a merge
        for m in ("m1", "m2"):
            ev = instance.get_latest_materialization_event(dg.AssetKey(["merged", "pool", m]))
            assert Path(ev.asset_materialization.metadata["path"].value).is_dir()
