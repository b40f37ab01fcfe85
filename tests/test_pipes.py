"""GPU steps through Dagster Pipes: the demo merge through ``PipesSubprocessClient`` gives byte-identical outputs and
the same metadata, data version and check result as the in-process path; the entry point runs as a plain subprocess
with ``dagster`` import-blocked; bad input fails without retries on every path."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest

from pipelines.builder import build_definitions
from pipelines.spec import parse_pipeline
from resources.device import GpuResource
from resources.launcher import StepLauncherResource, to_dagster_metadata
from resources.model_store import ModelStoreResource
from resources.object_store import StoredArtifact
from resources.pipes_steps import VOLATILE_METADATA

REPO = Path(__file__).resolve().parent.parent
MERGED = dg.AssetKey(["merged", "demo", "math_reverse"])
#: fields of the engine's manifest (mergeline.json) that are timings or measurements of the process
VOLATILE_MANIFEST = {"seconds"}


def _files(d: Path) -> dict[str, bytes]:
    return {f.relative_to(d).as_posix(): f.read_bytes() for f in sorted(d.rglob("*")) if f.is_file()}


def _stable_manifest(raw: bytes) -> dict:
    m = json.loads(raw)
    return {k: v for k, v in m.items() if k not in VOLATILE_MANIFEST}


def _values(mat) -> dict:
    return {k: getattr(v, "value", v) for k, v in mat.metadata.items()}


def test_demo_merge_through_pipes_subprocess_is_identical_to_in_process(tmp_path):
    from tests.test_pipeline_assets import DEMO, tiny

    spec = parse_pipeline(tiny(DEMO, steps=1), base_dir=DEMO.parent)
    store = ModelStoreResource(root=str(tmp_path / "store"))

    def defs_with(mode: str) -> dg.Definitions:
        return build_definitions(spec, resources={"model_store": store, "gpu": GpuResource(device="cpu"),
                                                  "launcher": StepLauncherResource(mode=mode)})

    inst = dg.DagsterInstance.ephemeral()
    d_in = defs_with("in_process")
    res_in = dg.materialize(list(d_in.assets), resources=d_in.resources, instance=inst)
    assert res_in.success
    m_in = inst.get_latest_materialization_event(MERGED).asset_materialization
    out = Path(m_in.metadata["path"].value)
    in_files = _files(out)
    shutil.move(out, tmp_path / "in_process_copy")  # the subprocess must write it again, not find it published

    d_sub = defs_with("subprocess")
    res_sub = dg.materialize(list(d_sub.assets), resources=d_sub.resources, instance=inst, selection=[MERGED])
    assert res_sub.success
    m_sub = inst.get_latest_materialization_event(MERGED).asset_materialization
    assert m_sub.tags["dagster/data_version"] == m_in.tags["dagster/data_version"]
    # it really ran in another process: the Pipes session opened and closed in the run's logs
    logs = [e.message for e in inst.all_logs(res_sub.run_id)]
    assert any("[pipes] external process successfully opened dagster pipes" in (m or "") for m in logs)
    sub_files = _files(out)

    # byte-identical outputs (the manifest up to its timings)
    assert sorted(sub_files) == sorted(in_files)
    for rel in in_files:
        if rel == "mergeline.json":
            assert _stable_manifest(sub_files[rel]) == _stable_manifest(in_files[rel])
        else:
            assert sub_files[rel] == in_files[rel], rel
    # the same metadata: same keys, same Dagster value types, same values except timings; the artifact size may
    # differ by exactly the manifest's length difference (its "seconds" field has a varying number of digits)
    assert set(m_sub.metadata) == set(m_in.metadata)
    manifest_delta = len(sub_files["mergeline.json"]) - len(in_files["mergeline.json"])
    assert m_sub.metadata["size_bytes"].value - m_in.metadata["size_bytes"].value == manifest_delta
    for k in m_in.metadata:
        assert type(m_sub.metadata[k]) is type(m_in.metadata[k]), k
        if k not in VOLATILE_METADATA | {"size_bytes", "size"} or (k == "size" and manifest_delta == 0):
            assert m_sub.metadata[k] == m_in.metadata[k], k
    # and the same check result
    (c_in,) = [c for c in res_in.get_asset_check_evaluations() if c.asset_key == MERGED]
    (c_sub,) = [c for c in res_sub.get_asset_check_evaluations() if c.asset_key == MERGED]
    assert c_in.passed and c_sub.passed and c_in.check_name == c_sub.check_name == "artifact_complete"
    assert c_in.metadata == c_sub.metadata


# -- the entry point as a plain subprocess ------------------------------------------------------------------------------

_BLOCKED = ["dagster", "dagster_k8s", "dagster_aws", "dagster_postgres", "dagster_webserver"]
_RUNNER = ("import runpy, sys\n"
           f"for m in {_BLOCKED!r}: sys.modules[m] = None   # any import of them raises ImportError\n"
           "runpy.run_module('resources.pipes_entry', run_name='__main__', alter_sys=True)\n")


def run_entry(tmp_path: Path, extras: dict, asset_key: str = "merged/t/m") -> tuple[int, list[dict], str]:
    from dagster_pipes import encode_param

    context = {"asset_keys": [asset_key], "code_version_by_asset_key": {asset_key: "1"},
               "provenance_by_asset_key": {asset_key: None}, "partition_key": None, "partition_key_range": None,
               "partition_time_window": None, "run_id": "plain-run", "job_name": None, "retry_number": 0,
               "extras": extras}
    messages = tmp_path / f"messages-{len(list(tmp_path.glob('messages-*')))}.jsonl"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
           "DAGSTER_PIPES_CONTEXT": encode_param({"data": context}),
           "DAGSTER_PIPES_MESSAGES": encode_param({"path": str(messages)})}
    p = subprocess.run([sys.executable, "-c", _RUNNER], env=env, cwd=tmp_path, capture_output=True, text=True,
                       timeout=300)
    msgs = [json.loads(line) for line in messages.read_text().splitlines()] if messages.exists() else []
    return p.returncode, msgs, p.stderr


def test_entry_point_runs_as_a_plain_subprocess_without_dagster(tiny_family, tmp_path):
    from merge_ops.api import MergeOptions

    from assets.common import dir_content_hash

    store = ModelStoreResource(root=str(tmp_path / "store"))
    request = {
        "name": "m", "method": "task_arithmetic", "node_config": {"method": "task_arithmetic"},
        "engine_config": {"merge_method": "task_arithmetic", "base_model": "base",
                          "models": [{"model": "base+lora", "parameters": {"weight": 0.5}},
                                     {"model": "ft1", "parameters": {"weight": 0.5}}]},
        "parts": {"base": {"model": str(tiny_family["base"]), "adapter": None},
                  "base+lora": {"model": str(tiny_family["base"]), "adapter": str(tiny_family["lora"])},
                  "ft1": {"model": str(tiny_family["ft1"]), "adapter": None}},
        "tokenizer_ref": None, "inputs": {"base_model/t/base": "abc"},
        "options": MergeOptions(device="cpu", seed=0).model_dump(mode="json"),
    }
    rc, msgs, err = run_entry(tmp_path, {"mergeline_step": "merge", "mergeline_request": request,
                                         "mergeline_store": store.client_config()})
    assert rc == 0, err[-3000:]
    methods = [m["method"] for m in msgs]
    assert methods[0] == "opened" and methods[-1] == "closed"
    assert "exception" not in (msgs[-1].get("params") or {})
    (check,) = [m["params"] for m in msgs if m["method"] == "report_asset_check"]
    assert check["check_name"] == "artifact_complete" and check["passed"] is True
    (mat,) = [m["params"] for m in msgs if m["method"] == "report_asset_materialization"]
    meta = mat["metadata"]
    out = Path(meta["path"]["raw_value"])
    assert meta["path"]["type"] == "path" and out.parent == tmp_path / "store" / "merged" / "m"
    assert mat["data_version"] == meta["content_sha256"]["raw_value"] == \
        dir_content_hash(out, store_root=tmp_path / "store")[0]
    assert out.name == mat["data_version"][:16]
    assert meta["engine_inputs"]["raw_value"]["base+lora"]["adapter"] == str(tiny_family["lora"])
    assert meta["input_data_versions"]["raw_value"] == {"base_model/t/base": "abc"}
    assert meta["method"]["raw_value"] == "task_arithmetic" and meta["tensors"]["raw_value"] > 0
    # what Dagster makes of these values
    converted = to_dagster_metadata(meta)
    assert isinstance(converted["output_shards"], dg.JsonMetadataValue)
    assert isinstance(converted["engine_config"], dg.MarkdownMetadataValue)

    # bad input: reported as a custom message, exit 0, no materialization (the orchestrator fails without retries)
    bad = {**request, "parts": {**request["parts"], "ft1": {"model": str(tmp_path / "gone"), "adapter": None}}}
    rc, msgs, err = run_entry(tmp_path, {"mergeline_step": "merge", "mergeline_request": bad,
                                         "mergeline_store": store.client_config()})
    assert rc == 0, err[-3000:]
    (custom,) = [m["params"]["payload"] for m in msgs if m["method"] == "report_custom_message"]
    assert custom["mergeline_error"] == "input" and "is gone" in custom["message"] and "merges.m" in custom["message"]
    assert not [m for m in msgs if m["method"] == "report_asset_materialization"]

    # an unknown step kind is an input error too
    rc, msgs, _ = run_entry(tmp_path, {"mergeline_step": "nope", "mergeline_request": {},
                                       "mergeline_store": store.client_config()})
    (custom,) = [m["params"]["payload"] for m in msgs if m["method"] == "report_custom_message"]
    assert rc == 0 and "unknown step kind 'nope'" in custom["message"]


class _FakeInvocation:
    def __init__(self, custom=(), results=()):
        self._custom, self._results = list(custom), list(results)

    def get_custom_messages(self):
        return self._custom

    def get_results(self):
        return self._results


def test_external_input_errors_fail_without_retries_and_results_are_collected():
    with pytest.raises(dg.Failure) as ei:
        StepLauncherResource._collect(_FakeInvocation([{"mergeline_error": "input", "message": "merges.m: bad"}]))
    assert ei.value.description == "merges.m: bad" and ei.value.allow_retries is False
    with pytest.raises(dg.Failure, match="reported 0 materializations"):
        StepLauncherResource._collect(_FakeInvocation())
    check = dg.AssetCheckResult(check_name="artifact_complete", passed=True)
    (r,) = StepLauncherResource._collect(_FakeInvocation(results=[
        dg.MaterializeResult(metadata={"a": 1}, data_version=dg.DataVersion("x")), check]))
    assert r.data_version == dg.DataVersion("x") and list(r.check_results) == [check]
    # a multi-asset step: one result per reported materialization, in order, checks by asset
    a, b = dg.AssetKey(["finetune", "p", "f"]), dg.AssetKey(["lora", "p", "f"])
    ca = dg.AssetCheckResult(check_name="c", passed=True, asset_key=a)
    got = StepLauncherResource._collect(_FakeInvocation(results=[
        dg.MaterializeResult(asset_key=a, data_version=dg.DataVersion("1")), ca,
        dg.MaterializeResult(asset_key=b, data_version=dg.DataVersion("2"))]))
    assert [g.asset_key for g in got] == [a, b] and list(got[0].check_results) == [ca] and not got[1].check_results


def test_pipes_metadata_twin_equals_the_asset_helper(tiny_family):
    """``resources.pipes_steps.artifact_metadata`` (Pipes wire format) converts to exactly what
    ``assets.common.artifact_metadata`` returns, for a local artifact and for one known by an s3:// URI."""
    from assets.common import artifact_metadata as dagster_side
    from dagster._core.definitions.metadata import normalize_metadata

    from resources.pipes_steps import artifact_metadata as pipes_side

    for path in (tiny_family["base"], StoredArtifact.make(tiny_family["base"], "s3://bkt/p/base_model/b/0123456789abcdef")):
        kw = dict(duration_s=1.23456, config={"x": 1}, inputs={"a/b/c": "dv"})
        a = dagster_side(path, "f" * 64, **kw)
        b = to_dagster_metadata(pipes_side(path, "f" * 64, **kw))
        assert {k: (type(v), getattr(v, "value", v)) for k, v in normalize_metadata(a).items()} == \
               {k: (type(v), v.value) for k, v in b.items()}
    assert b["path"].value == "s3://bkt/p/base_model/b/0123456789abcdef" == b["dagster/uri"].value


def test_launcher_is_configuration(monkeypatch):
    from resources.bundle import default_resources

    assert default_resources()["launcher"].mode == "in_process"
    monkeypatch.setenv("MERGELINE_LAUNCHER", "subprocess")
    assert default_resources()["launcher"].mode == "subprocess"
    with pytest.raises(Exception, match="in_process"):
        StepLauncherResource(mode="ssh")
    assert StepLauncherResource(mode="subprocess").command() == [sys.executable, "-m", "resources.pipes_entry"]


@pytest.mark.heavy
def test_finetune_through_pipes_subprocess_is_identical_to_in_process(tmp_path):
    """The fine-tune multi-asset (run record + LoRA) through PipesSubprocessClient: both assets with the same data
    versions, byte-identical files and the same metadata as in process (CPU training is deterministic)."""
    from tests.test_pipeline_assets import DEMO, tiny

    spec = parse_pipeline(tiny(DEMO, steps=2), base_dir=DEMO.parent)
    store = ModelStoreResource(root=str(tmp_path / "store"))
    keys = [dg.AssetKey(["finetune", "demo", "math"]), dg.AssetKey(["lora", "demo", "math"])]

    def defs_with(mode: str) -> dg.Definitions:
        return build_definitions(spec, resources={"model_store": store, "gpu": GpuResource(device="cpu"),
                                                  "launcher": StepLauncherResource(mode=mode)})

    inst = dg.DagsterInstance.ephemeral()
    d_in = defs_with("in_process")
    upstream_keys = [dg.AssetKey(["base_model", "demo", "tiny_llama"]), dg.AssetKey(["dataset", "demo", "arithmetic"])]
    assert dg.materialize(list(d_in.assets), resources=d_in.resources, instance=inst,
                          selection=[*upstream_keys, *keys]).success
    first = {k: inst.get_latest_materialization_event(k).asset_materialization for k in keys}
    files = {}
    for k, m in first.items():
        out = Path(m.metadata["path"].value)
        files[k] = _files(out)
        shutil.move(out, tmp_path / f"copy-{k.path[0]}")

    d_sub = defs_with("subprocess")
    res = dg.materialize(list(d_sub.assets), resources=d_sub.resources, instance=inst, selection=keys)
    assert res.success
    for k in keys:
        m_sub = inst.get_latest_materialization_event(k).asset_materialization
        m_in = first[k]
        assert m_sub.tags["dagster/data_version"] == m_in.tags["dagster/data_version"], k
        assert _files(Path(m_sub.metadata["path"].value)) == files[k], k
        assert set(m_sub.metadata) == set(m_in.metadata), k
        for name in m_in.metadata:
            assert type(m_sub.metadata[name]) is type(m_in.metadata[name]), (k, name)
            if name not in VOLATILE_METADATA | {"metrics"}:  # 'metrics' shows the training timings
                assert m_sub.metadata[name] == m_in.metadata[name], (k, name)
    assert first[keys[0]].metadata["loss_curve"].value.records[0].data["step"] == 1
