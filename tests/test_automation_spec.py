"""Issue 4's spec additions and wiring, without materializing anything: ``observe``, ``automation``, folder adapters,
schedule ``enabled``; sensors shipped RUNNING; Hub revision → commit sha resolution (cache, loopback Hub server)."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import dagster as dg
import pytest

from assets.automation import derived_asset_condition
from assets.observations import observe_hub, observe_local, resolve_hub_revision
from pipelines.builder import build_definitions
from pipelines.spec import PipelineSpecError, parse_pipeline
from resources.hub import HubError, HubResource

SHA = "0123456789abcdef0123456789abcdef01234567"
SHA2 = "fedcba9876543210fedcba9876543210fedcba98"


def adapter_dir(root: Path, name: str = "a") -> Path:
    d = root / name
    d.mkdir(parents=True)
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    (d / "adapter_model.safetensors").write_bytes(b"x" * 64)
    return d


def base_spec(tmp_path: Path, **extra) -> dict:
    d = {
        "name": "p",
        "base_models": {"tiny": {"toy": {"hidden": 32, "vocab": 128}},
                        "hubbed": {"hub": "org/model", "revision": "main", "architecture": "LlamaForCausalLM"}},
        "adapters": {"a": {"base": "tiny", "path": str(tmp_path / "a")}},
        "merges": {"m": {"method": "task_arithmetic", "base_model": "tiny",
                         "models": [{"model": "a", "parameters": {"weight": 1.0}}]}},
    }
    d.update(extra)
    return d


def errors_of(d: dict, tmp_path: Path) -> list[str]:
    with pytest.raises(PipelineSpecError) as e:
        parse_pipeline(d, base_dir=tmp_path)
    return e.value.errors


def test_observe_shorthands_and_strictness(tmp_path):
    adapter_dir(tmp_path)
    d = base_spec(tmp_path)
    d["adapters"]["a"]["observe"] = False
    assert parse_pipeline(d).adapters["a"].observe.enabled is False
    d["adapters"]["a"]["observe"] = 15
    assert parse_pipeline(d).adapters["a"].observe.interval_seconds == 15
    d["adapters"]["a"]["observe"] = {"intervall_seconds": 5}
    errs = errors_of(d, tmp_path)
    assert errs == ["adapters.a.observe.intervall_seconds: unknown key 'intervall_seconds' (did you mean 'interval_seconds'?); "
                    "allowed here: enabled, interval_seconds"]
    d["adapters"]["a"]["observe"] = {"interval_seconds": 0}
    assert errors_of(d, tmp_path)[0].startswith("adapters.a.observe.interval_seconds: Input should be greater")
    d["adapters"]["a"].pop("observe")
    d["base_models"]["tiny"]["observe"] = 10
    assert errors_of(d, tmp_path) == ["base_models.tiny: 'observe' only applies to 'path' and 'hub' models (a toy "
                                      "model is built by mergeline)"]
    d["base_models"]["tiny"].pop("observe")
    d["automation"] = {"interval_secs": 3}
    assert errors_of(d, tmp_path)[0].startswith("automation.interval_secs: unknown key 'interval_secs' (did you mean "
                                                "'interval_seconds'?)")


def test_missing_observed_adapter_loads_with_a_warning_unobserved_is_an_error(tmp_path):
    d = base_spec(tmp_path)  # adapter directory not there (deleted, or not written yet)
    spec = parse_pipeline(d)
    assert any(w.startswith("adapters.a.path:") and "observed" in w for w in spec.warnings)
    d["adapters"]["a"]["observe"] = False
    assert errors_of(d, tmp_path)[0].startswith("adapters.a.path:")


def test_folder_adapter_rules(tmp_path):
    d = base_spec(tmp_path)
    d["adapters"]["many"] = {"base": "tiny", "folder": str(tmp_path / "many"), "path": str(tmp_path / "a")}
    assert any(e.startswith("adapters.many: give exactly one of 'path', 'hub' or 'folder' (got path, folder)")
               for e in errors_of(d, tmp_path))
    d["adapters"]["many"].pop("path")
    d["merges"]["m"]["models"].append({"model": "many", "parameters": {"weight": 1.0}})
    assert any(e.startswith("merges.m.models[1].model: adapter 'many' is a folder of adapters")
               for e in errors_of(d, tmp_path))


def test_definitions_sensors_running_schedules_and_conditions(tmp_path):
    adapter_dir(tmp_path)
    d = base_spec(tmp_path, automation={"interval_seconds": 7},
                  schedules={"nightly": {"cron": "0 3 * * *", "target": "m", "tags": {"trigger": "nightly"}},
                             "manual": {"cron": "@weekly", "target": "m", "enabled": False}})
    d["adapters"]["many"] = {"base": "tiny", "folder": str(tmp_path / "many"), "observe": 20}
    defs = build_definitions(d)
    dg.Definitions.validate_loadable(defs)
    auto = defs.resolve_sensor_def("p__automation")
    assert isinstance(auto, dg.AutomationConditionSensorDefinition)
    assert auto.default_status == dg.DefaultSensorStatus.RUNNING and auto.minimum_interval_seconds == 7
    obs = defs.resolve_sensor_def("p__observe")
    assert obs.default_status == dg.DefaultSensorStatus.RUNNING and obs.minimum_interval_seconds == 60
    assert defs.resolve_sensor_def("p__many__adapters").minimum_interval_seconds == 20
    assert defs.resolve_schedule_def("p__nightly_schedule").default_status == dg.DefaultScheduleStatus.RUNNING
    assert defs.resolve_schedule_def("p__manual_schedule").default_status == dg.DefaultScheduleStatus.STOPPED
    nightly_job = defs.resolve_job_def("p__nightly")
    assert nightly_job.tags["trigger"] == "nightly" and nightly_job.tags["mergeline/schedule"] == "nightly"
    graph = defs.resolve_asset_graph()
    cond = derived_asset_condition()
    k = lambda *p: dg.AssetKey(list(p))  # noqa: E731
    assert graph.get(k("merged", "p", "m")).automation_condition == cond
    assert graph.get(k("base_model", "p", "hubbed")).automation_condition == cond  # fed by an observed Hub repo
    assert graph.get(k("base_model", "p", "tiny")).automation_condition is None  # built by mergeline itself
    assert k("source", "p", "hubbed") in graph.get(k("base_model", "p", "hubbed")).parent_keys
    assert graph.get(k("merged", "p", "many")).partitions_def.name == "p__many"
    assert defs.resolve_job_def("p__observe") is not None
    # no default (stopped) automation sensor is created: every condition is covered by a running one
    assert {s.name for s in defs.sensors} == {"p__automation", "p__observe", "p__many__adapters"}


def test_automation_off_attaches_nothing_and_ships_sensors_stopped(tmp_path):
    adapter_dir(tmp_path)
    d = base_spec(tmp_path, automation=False)
    d["adapters"]["many"] = {"base": "tiny", "folder": str(tmp_path / "many")}
    defs = build_definitions(d)
    graph = defs.resolve_asset_graph()
    assert all(graph.get(x).automation_condition is None for x in graph.get_all_asset_keys())
    assert {s.name for s in defs.sensors} == {"p__many__adapters"}
    assert defs.resolve_sensor_def("p__many__adapters").default_status == dg.DefaultSensorStatus.STOPPED


def test_local_observation_statuses(tmp_path):
    a = adapter_dir(tmp_path)
    ok = observe_local(a, marker="adapter_config.json")
    assert ok.ok and len(ok.version) == 64 and ok.metadata["files"] == 2
    assert observe_local(a, marker="adapter_config.json").version == ok.version  # stable
    (a / "adapter_model.safetensors").write_bytes(b"y" * 64)
    assert observe_local(a, marker="adapter_config.json").version != ok.version
    (a / ".partial").write_bytes(b"z")  # hidden files (partial writes) do not count
    assert observe_local(a, marker="adapter_config.json").ok
    assert observe_local(tmp_path / "nope", marker="adapter_config.json").status == "missing"
    (a / "adapter_config.json").write_text("{not json")
    bad = observe_local(a, marker="adapter_config.json")
    assert bad.status == "unreadable" and "JSONDecodeError" in bad.reason


def test_hub_revision_resolution_offline_from_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub = HubResource(cache_dir=str(tmp_path / "hf"))
    assert resolve_hub_revision(hub, "org/model", SHA) == SHA  # a pinned commit cannot move: no look-up
    refs = tmp_path / "hf" / "models--org--model" / "refs"
    refs.mkdir(parents=True)
    (refs / "main").write_text(SHA2)
    assert resolve_hub_revision(hub, "org/model", "main") == SHA2
    with pytest.raises(HubError, match="offline and not in the local Hugging Face cache"):
        resolve_hub_revision(hub, "org/model", "dev")
    miss = observe_hub(hub, "org/model", "dev")
    assert miss.status == "offline" and miss.version is None


class _FakeHub(BaseHTTPRequestHandler):
    shas = {"main": SHA, "v2": SHA2}

    def do_GET(self):  # noqa: N802
        parts = self.path.split("?")[0].strip("/").split("/")
        # /api/models/<owner>/<name>/revision/<rev>
        if parts[:2] == ["api", "models"] and len(parts) >= 6 and parts[4] == "revision":
            rev = parts[5]
            if rev in self.shas:
                body = json.dumps({"id": f"{parts[2]}/{parts[3]}", "sha": self.shas[rev]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                return
            self.send_response(404)
            self.send_header("X-Error-Code", "RevisionNotFound")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *a):
        pass


def test_hub_revision_resolution_online_against_a_loopback_hub(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_OFFLINE", False, raising=False)
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _FakeHub)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        hub = HubResource(endpoint=f"http://127.0.0.1:{srv.server_port}")
        assert resolve_hub_revision(hub, "org/model", "main") == SHA
        _FakeHub.shas = {"main": SHA2}  # someone pushed: the branch moved
        ob = observe_hub(hub, "org/model", "main")
        assert ob.ok and ob.version == SHA2 and ob.metadata["hub_commit"] == SHA2
        err = observe_hub(hub, "org/model", "nope")
        assert err.status == "error" and "nope" in err.reason
    finally:
        srv.shutdown()
