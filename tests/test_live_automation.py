"""Live (issue 4): a fresh ``dagster dev`` keeps a merge current by itself.

A pipeline with a local base model directory and a local PEFT adapter written by "another tool" (this test) is
materialized into a temp ``DAGSTER_HOME``; ``dagster dev`` then serves it (``MERGELINE_PIPELINES``) with nothing
toggled. The test rewrites the adapter's weights on disk and asserts through GraphQL that, within a bounded time,

* the observation sensor recorded a new data version of ``source/live/a``,
* the automation sensor launched runs (tag ``mergeline/trigger=automation``) that re-materialized
  ``lora/live/a`` and ``merged/live/m_a``, and the merge's data version changed;

then it observes again on demand (the ``live__observe`` job, launched through GraphQL) with nothing changed and
asserts that the automation sensor keeps ticking without launching anything.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from tests.live_helpers import LOCATION, REPO, REPOSITORY, DagsterDev, dagster_executable

pytestmark = [pytest.mark.heavy, pytest.mark.timeout(420)]

P = "live"
INTERVAL = 2  # seconds: observation and automation sensor intervals in this test's pipeline
CHANGE_DEADLINE_S = 150.0


def live_spec(root: Path) -> dict:
    return {
        "name": P,
        "automation": {"interval_seconds": INTERVAL},
        "base_models": {"base": {"path": str(root / "base"), "observe": {"interval_seconds": INTERVAL}}},
        "adapters": {"a": {"base": "base", "path": str(root / "adapter_a"), "observe": {"interval_seconds": INTERVAL}}},
        "merges": {"m_a": {"method": "task_arithmetic", "base_model": "base", "dtype": "float32",
                           "models": [{"model": "a", "parameters": {"weight": 1.0}}]}},
    }


class LiveDev(DagsterDev):
    """``dagster dev`` serving one pipeline file, with the instance config a user would have (pool limit 1)."""

    def __init__(self, home: Path, store: Path, pipeline_file: Path):
        super().__init__(home, store)
        self.pipeline_file = pipeline_file

    def start(self) -> None:
        env = dict(os.environ)
        env.update(DAGSTER_HOME=str(self.home), MERGELINE_STORE=str(self.store), MERGELINE_PIPELINES=str(self.pipeline_file),
                   MERGELINE_DEVICE="cpu", DAGSTER_DISABLE_TELEMETRY="1", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1",
                   OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [*dagster_executable(), "dev", "-w", "workspace.yaml", "-h", "127.0.0.1", "-p", str(self.port)],
            cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
            start_new_session=True)


RUNS_Q = """{ runsOrError(limit: 50) { ... on Runs { results { runId status jobName
  tags { key value } assetSelection { path } } } } }"""
ASSET_Q = """query($p: [String!]!) { assetOrError(assetKey: {path: $p}) { ... on Asset {
  assetMaterializations(limit: 1) { runId tags { key value } }
  assetObservations(limit: 1) { runId tags { key value } metadataEntries { label ... on TextMetadataEntry { text } } }
} } }"""
TICKS_Q = """query($s: SensorSelector!) { sensorOrError(sensorSelector: $s) { __typename
  ... on Sensor { sensorState { status ticks(limit: 100) { id status timestamp } } } } }"""
LAUNCH_M = """mutation($p: ExecutionParams!) { launchPipelineExecution(executionParams: $p) { __typename
  ... on LaunchRunSuccess { run { runId } } ... on PythonError { message } } }"""


def data_version(entry: dict | None) -> str | None:
    if not entry:
        return None
    return {t["key"]: t["value"] for t in entry["tags"]}.get("dagster/data_version")


def latest(dev: DagsterDev, kind: str, name: str) -> dict:
    return dev.graphql(ASSET_Q, {"p": [kind, P, name]})["assetOrError"]


def runs(dev: DagsterDev) -> list[dict]:
    return dev.graphql(RUNS_Q)["runsOrError"]["results"]


def ticks(dev: DagsterDev, sensor: str) -> tuple[str, list[dict]]:
    s = dev.graphql(TICKS_Q, {"s": {"repositoryLocationName": LOCATION, "repositoryName": REPOSITORY,
                                    "sensorName": sensor}})["sensorOrError"]
    assert s["__typename"] == "Sensor", s
    return s["sensorState"]["status"], s["sensorState"]["ticks"]


def automation_runs(rs: list[dict]) -> list[dict]:
    return [r for r in rs if {t["key"]: t["value"] for t in r["tags"]}.get("mergeline/trigger") == "automation"]


def wait_for(what: str, fn, timeout: float, dev: DagsterDev, poll: float = 1.0):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        v = fn()
        if v:
            return v, time.monotonic() - t0
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}; dagster dev log:\n{dev.log_tail(6000)}")


def rewrite_adapter_weights(adapter: Path) -> None:
    """What a training tool does when it saves a new checkpoint: new tensor values, written to a temp file and
    renamed into place."""
    from safetensors.torch import load_file, save_file

    f = adapter / "adapter_model.safetensors"
    tensors = {k: (v * 1.5).contiguous() for k, v in load_file(str(f)).items()}
    tmp = f.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, f)


def test_dagster_dev_remerges_when_an_adapter_changes_on_disk(tmp_path):
    import dagster as dg

    from pipelines.builder import build_definitions
    from pipelines.toy_models import save_lora_adapter, save_tiny_llama
    from resources.device import GpuResource
    from resources.model_store import ModelStoreResource

    t_start = time.monotonic()
    save_tiny_llama(tmp_path / "base", seed=0, num_layers=1, hidden=32, vocab=128)
    save_lora_adapter(tmp_path / "base", tmp_path / "adapter_a", seed=1, r=4, alpha=8, targets=("q_proj", "v_proj"))
    spec_file = tmp_path / "pipeline.yaml"
    spec_file.write_text(yaml.safe_dump(live_spec(tmp_path)))
    home, store = tmp_path / "home", tmp_path / "store"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\nnux:\n  enabled: false\n"
                                       "concurrency:\n  pools:\n    default_limit: 1\n")

    # what `./dev.sh demo` does first: materialize everything (and observe the inputs) into the persistent home
    defs = build_definitions(spec_file, resources={"gpu": GpuResource(device="cpu"),
                                                   "model_store": ModelStoreResource(root=str(store))})
    with dg.DagsterInstance.from_config(str(home)) as instance:
        assert defs.resolve_job_def(f"{P}__observe").execute_in_process(instance=instance).success
        assert defs.resolve_job_def(f"{P}__all").execute_in_process(instance=instance).success

    dev = LiveDev(home, store, spec_file)
    dev.start()
    try:
        load_s = dev.wait_loaded(LOCATION, timeout_s=180)
        # both sensors are on without anyone toggling them, and have ticked at least once (the baseline)
        for sensor in (f"{P}__automation", f"{P}__observe"):
            wait_for(f"a tick of {sensor}", lambda: ticks(dev, sensor)[0] == "RUNNING" and ticks(dev, sensor)[1],
                     90, dev)
        before_merge = data_version(latest(dev, "merged", "m_a")["assetMaterializations"][0])
        before_runs = {r["runId"] for r in runs(dev)}
        assert not automation_runs(runs(dev)), "the automation sensor launched runs before anything changed"

        t_change = time.monotonic()
        rewrite_adapter_weights(tmp_path / "adapter_a")

        def merged_again():
            m = latest(dev, "merged", "m_a")["assetMaterializations"]
            return m and m[0]["runId"] not in before_runs and data_version(m[0]) != before_merge and m[0]

        new_merge, took = wait_for("an automation run re-materializing merged/live/m_a", merged_again,
                                   CHANGE_DEADLINE_S, dev)
        launched = {r["runId"]: r for r in automation_runs(runs(dev))}
        assert new_merge["runId"] in launched, "the new merge did not come from an automation-sensor run"
        lora = latest(dev, "lora", "a")["assetMaterializations"][0]
        assert lora["runId"] in launched  # the adapter was re-hashed by an automation run too
        obs = latest(dev, "source", "a")["assetObservations"][0]
        assert {e["label"]: e.get("text") for e in obs["metadataEntries"]}["status"] == "ok"
        print(f"\nloaded in {load_s:.1f} s; adapter change -> new merge in {took:.1f} s "
              f"({len(launched)} automation runs)")

        # settle: no automation run still queued or running
        wait_for("the automation runs to finish", lambda: all(
            r["status"] in ("SUCCESS", "FAILURE", "CANCELED") for r in automation_runs(runs(dev))), 120, dev)
        assert all(r["status"] == "SUCCESS" for r in automation_runs(runs(dev)))

        # a second observation with no change (on demand, through GraphQL) launches nothing
        res = dev.graphql(LAUNCH_M, {"p": {"selector": {"repositoryLocationName": LOCATION,
                                                        "repositoryName": REPOSITORY, "jobName": f"{P}__observe"},
                                           "mode": "default"}})["launchPipelineExecution"]
        assert res["__typename"] == "LaunchRunSuccess", res
        observe_run = res["run"]["runId"]
        wait_for("the observe run", lambda: next(r for r in runs(dev) if r["runId"] == observe_run)["status"]
                 in ("SUCCESS", "FAILURE"), 120, dev)
        assert next(r for r in runs(dev) if r["runId"] == observe_run)["status"] == "SUCCESS"
        obs2 = latest(dev, "source", "a")["assetObservations"][0]
        assert obs2["runId"] == observe_run and data_version(obs2) == data_version(obs)
        n_auto = len(automation_runs(runs(dev)))
        _, t_before = ticks(dev, f"{P}__automation")
        wait_for("three more automation ticks", lambda: len(ticks(dev, f"{P}__automation")[1]) >= len(t_before) + 3,
                 90, dev)
        assert len(automation_runs(runs(dev))) == n_auto, "an unchanged observation launched a run"
        print(f"live test total {time.monotonic() - t_start:.1f} s (change at +{t_change - t_start:.1f} s)")
    finally:
        dev.stop()
