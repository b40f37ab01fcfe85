"""The Dagster layer: Definitions of every shipped example, and in-process materializations of demo-sized graphs
(files, data versions, metadata, determinism, store layout), plus the resources' behaviour."""

from __future__ import annotations

import copy
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import dagster as dg
import pytest
import torch
import yaml

from assets.common import dir_content_hash
from pipelines.builder import build_definitions, definitions_for
from pipelines.spec import parse_pipeline
from resources.device import GpuResource
from resources.hub import HubError, HubResource
from resources.model_store import ModelStoreResource

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((REPO / "pipelines" / "examples").glob("*/pipeline.yaml"))
DEMO = REPO / "pipelines" / "examples" / "demo" / "pipeline.yaml"


def tiny(path: Path, steps: int = 3) -> dict:
    """A shipped example with the same graph but tiny settings (hidden 32, 40 records, a few steps)."""
    d = yaml.safe_load(path.read_text())
    for b in d.get("base_models", {}).values():
        if "toy" in b:
            b["toy"].update(hidden=32, vocab=128)
    for ds in d.get("datasets", {}).values():
        if "generated" in ds:
            ds["generated"]["n"] = 40
    for f in d.get("finetunes", {}).values():
        f.update(max_steps=steps, batch_size=8, r=4, alpha=8)
    for e in d.get("evals", {}).values():
        e["limit"] = 4
        for c in e.get("checks", []):  # 3-step fine-tunes learn nothing: the demo's blocking gate is for its own settings
            c["blocking"] = False
    return d


def materialize_all(defs: dg.Definitions, instance: dg.DagsterInstance, selection=None) -> dg.ExecuteInJobResult:
    res = dg.materialize(list(defs.assets), resources=defs.resources, instance=instance, selection=selection)
    assert res.success
    return res


def latest(instance: dg.DagsterInstance, key: dg.AssetKey):
    ev = instance.get_latest_materialization_event(key)
    assert ev is not None, key
    return ev.asset_materialization


def meta_value(mat, name):
    v = mat.metadata[name]
    return getattr(v, "value", v)


def key(*parts: str) -> dg.AssetKey:
    return dg.AssetKey(list(parts))


# -- Definitions ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.parent.name for p in EXAMPLES])
def test_every_shipped_example_loads(path):
    defs = build_definitions(path)
    dg.Definitions.validate_loadable(defs)
    graph = defs.resolve_asset_graph()
    name = path.parent.name
    keys = graph.get_all_asset_keys()
    assert keys and all(k.path[1] == name for k in keys)
    assert {k.path[0] for k in keys} <= {"base_model", "dataset", "finetune", "lora", "merged", "eval", "export", "published"}
    for k in keys:
        node = graph.get(k)
        assert node.group_name == name
        assert node.code_version
        assert node.owners == ["team:mergeline"]
        assert node.kinds
    assert defs.resolve_job_def(f"{name}__all") is not None


def test_the_shipped_code_location_serves_all_examples():
    from pipelines.definitions import defs, pipeline_files

    assert [p.resolve() for p in pipeline_files()] == [p.resolve() for p in EXAMPLES]
    graph = defs.resolve_asset_graph()
    groups = {graph.get(k).group_name for k in graph.get_all_asset_keys()}
    assert groups == {p.parent.name for p in EXAMPLES}
    assert sorted(defs.resources) == ["evaluator", "gpu", "hub", "launcher", "model_store", "trainer"]
    ws = yaml.safe_load((REPO / "workspace.yaml").read_text())
    assert ws["load_from"][0]["python_module"]["module_name"] == "pipelines.definitions"


def test_demo_graph_shape_pools_retries_and_tags():
    defs = build_definitions(DEMO, resources={"gpu": GpuResource(pool="gpu", k8s_gpus=1)})
    graph = defs.resolve_asset_graph()
    parents = {k.to_user_string(): sorted(p.to_user_string() for p in graph.get(k).parent_keys)
               for k in graph.get_all_asset_keys()}
    assert parents == {
        "base_model/demo/tiny_llama": [],
        "dataset/demo/arithmetic": [],
        "dataset/demo/reverse": [],
        "finetune/demo/math": ["base_model/demo/tiny_llama", "dataset/demo/arithmetic"],
        "finetune/demo/reverse_skill": ["base_model/demo/tiny_llama", "dataset/demo/reverse"],
        "lora/demo/math": ["finetune/demo/math"],
        "lora/demo/reverse_skill": ["finetune/demo/reverse_skill"],
        "merged/demo/math_reverse": ["base_model/demo/tiny_llama", "lora/demo/math", "lora/demo/reverse_skill"],
        "eval/demo/math_reverse_skills": ["base_model/demo/tiny_llama", "lora/demo/math", "lora/demo/reverse_skill",
                                          "merged/demo/math_reverse"],
        # blocking eval checks gate the export: it depends on the eval of the model it exports
        "export/demo/math_reverse_gguf": ["eval/demo/math_reverse_skills", "merged/demo/math_reverse"],
    }
    merged = defs.get_assets_def(key("merged", "demo", "math_reverse"))
    op = merged.op
    assert op.pool == "gpu"
    assert op.retry_policy is not None and op.retry_policy.max_retries == 2
    k8s = op.tags["dagster-k8s/config"]
    k8s = json.loads(k8s) if isinstance(k8s, str) else k8s
    assert k8s["container_config"]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    ft = defs.get_assets_def(key("finetune", "demo", "math"))
    assert ft.op.pool == "gpu" and ft.keys == {key("finetune", "demo", "math"), key("lora", "demo", "math")}
    node = graph.get(key("merged", "demo", "math_reverse"))
    assert node.tags["mergeline/method"] == "ties" and node.tags["project"] == "mergeline"
    assert node.kinds == {"mergeline", "safetensors"}
    sched = defs.resolve_schedule_def("demo__nightly_schedule")
    assert sched.cron_schedule == "0 3 * * *"
    job = defs.resolve_job_def("demo__nightly")
    assert {k.to_user_string() for k in job.asset_layer.selected_asset_keys} == set(parents) - {
        "eval/demo/math_reverse_skills", "export/demo/math_reverse_gguf"}  # merge + upstream


def test_code_version_changes_with_the_node_config_only():
    d = tiny(DEMO)
    g1 = build_definitions(parse_pipeline(copy.deepcopy(d), base_dir=DEMO.parent)).resolve_asset_graph()
    d["merges"]["math_reverse"]["models"][0]["parameters"]["density"] = 0.7
    g2 = build_definitions(parse_pipeline(d, base_dir=DEMO.parent)).resolve_asset_graph()
    changed = {k.to_user_string() for k in g1.get_all_asset_keys()
               if g1.get(k).code_version != g2.get(k).code_version}
    assert changed == {"merged/demo/math_reverse"}


def test_two_pipelines_with_one_name_are_refused():
    with pytest.raises(ValueError, match="two pipelines are named 'demo'"):
        definitions_for([DEMO, DEMO])


# -- materialization --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """The demo graph (tiny settings) materialized twice into one instance: first into one store, then into another
    (data versions must depend on the content only, not on where the store lives)."""
    root = tmp_path_factory.mktemp("demo")
    spec = parse_pipeline(tiny(DEMO), base_dir=DEMO.parent)
    defs = build_definitions(spec, resources={"model_store": ModelStoreResource(root=str(root / "store")),
                                              "gpu": GpuResource(device="cpu")})
    instance = dg.DagsterInstance.ephemeral()
    materialize_all(defs, instance)
    first = {k: latest(instance, k) for k in defs.resolve_asset_graph().get_all_asset_keys()}
    defs2 = build_definitions(spec, resources={"model_store": ModelStoreResource(root=str(root / "store2")),
                                               "gpu": GpuResource(device="cpu")})
    materialize_all(defs2, instance)
    second = {k: latest(instance, k) for k in defs.resolve_asset_graph().get_all_asset_keys()}
    return {"root": root, "store": root / "store", "defs": defs, "instance": instance, "first": first,
            "second": second}


def test_demo_materializes_every_asset_with_files(demo_run):
    first = demo_run["first"]
    assert len(first) == 10
    p = {k.to_user_string(): Path(meta_value(m, "path")) for k, m in first.items()}
    store = demo_run["store"]
    for k, path in p.items():
        kind, _, name = k.split("/")
        assert path.parent == store / kind / name, path  # <root>/<kind>/<name>/<hash16>
        dv = first[key(*k.split("/"))].tags["dagster/data_version"]
        assert path.name == dv[:16]
    base = p["base_model/demo/tiny_llama"]
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md"} <= {f.name for f in base.iterdir()}
    assert sum(1 for _ in open(p["dataset/demo/arithmetic"] / "data.jsonl")) == 40
    for ft in ("math", "reverse_skill"):
        assert (p[f"lora/demo/{ft}"] / "adapter_config.json").is_file()
        assert (p[f"lora/demo/{ft}"] / "adapter_model.safetensors").is_file()
        targets = json.loads((p[f"lora/demo/{ft}"] / "adapter_config.json").read_text())["target_modules"]
        assert targets == sorted(targets)  # PEFT writes a set: normalised so bytes do not depend on the hash seed
        run = json.loads((p[f"finetune/demo/{ft}"] / "run.json").read_text())
        assert len(run["losses"]) == 3 and run["backend"] == "peft"
        assert (p[f"finetune/demo/{ft}"] / "loss.png").read_bytes()[:4] == b"\x89PNG"
    merged = p["merged/demo/math_reverse"]
    manifest = json.loads((merged / "mergeline.json").read_text())
    assert manifest["method"] == "ties"
    assert (merged / "model.safetensors.index.json").is_file() or (merged / "model-00001-of-00001.safetensors").is_file()


def test_data_versions_are_content_hashes(demo_run):
    for k, m in demo_run["first"].items():
        dv = m.tags["dagster/data_version"]
        path = Path(meta_value(m, "path"))
        assert meta_value(m, "content_sha256") == dv
        # recomputed from the files (mergeline.json excluded, the store root normalised in text files)
        assert dir_content_hash(path, store_root=demo_run["store"])[0] == dv, k


def test_rematerializing_gives_identical_data_versions(demo_run):
    first, second = demo_run["first"], demo_run["second"]
    for k in first:
        assert first[k].tags["dagster/data_version"] == second[k].tags["dagster/data_version"], k
        assert Path(meta_value(second[k], "path")).is_relative_to(demo_run["root"] / "store2")
    # and the second materialization is a new event, not a cached one
    inst = demo_run["instance"]
    assert len(inst.fetch_materializations(key("merged", "demo", "math_reverse"), limit=10).records) == 2


def test_metadata_a_person_wants(demo_run):
    first = demo_run["first"]
    base = first[key("base_model", "demo", "tiny_llama")]
    assert meta_value(base, "architecture") == "LlamaForCausalLM"
    assert meta_value(base, "parameter_count") > 10_000 and meta_value(base, "dtype") == "float32"
    assert "toy" in meta_value(base, "model_card")
    assert meta_value(base, "dagster/uri").startswith("file://")

    ds = first[key("dataset", "demo", "arithmetic")]
    assert meta_value(ds, "dagster/row_count") == 40 and "calc:" in meta_value(ds, "preview")

    run = first[key("finetune", "demo", "math")]
    table = run.metadata["loss_curve"].value
    assert [r.data["step"] for r in table.records] == [1, 2, 3]
    assert meta_value(run, "loss_plot").startswith("![training loss of math](data:image/png;base64,")
    assert meta_value(run, "final_loss") == pytest.approx(table.records[-1].data["loss"])
    assert meta_value(run, "config")["r"] == 4 and meta_value(run, "config")["max_steps"] == 3
    inputs = meta_value(run, "input_data_versions")
    assert inputs["base_model/demo/tiny_llama"] == base.tags["dagster/data_version"]
    assert inputs["dataset/demo/arithmetic"] == ds.tags["dagster/data_version"]
    assert "# Fine-tune `math`" in meta_value(run, "model_card")
    assert "metric/eval_loss_after" in run.metadata

    lora = first[key("lora", "demo", "math")]
    assert meta_value(lora, "r") == 4 and meta_value(lora, "parameter_count") > 0

    merged = first[key("merged", "demo", "math_reverse")]
    assert meta_value(merged, "method") == "ties"
    assert meta_value(merged, "device").startswith("cpu")
    assert set(meta_value(merged, "input_data_versions")) == {
        "base_model/demo/tiny_llama", "lora/demo/math", "lora/demo/reverse_skill"}
    assert "base_model_relation: merge" in meta_value(merged, "model_card")
    assert meta_value(merged, "parameter_count") == meta_value(base, "parameter_count")
    assert meta_value(merged, "duration_s") >= 0 and meta_value(merged, "size_bytes") > 0
    shards = meta_value(merged, "output_shards")
    assert all(len(s["sha256"]) == 64 for s in shards.values())


def test_merged_model_loads_and_differs_from_base(demo_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    first = demo_run["first"]
    mpath = meta_value(first[key("merged", "demo", "math_reverse")], "path")
    bpath = meta_value(first[key("base_model", "demo", "tiny_llama")], "path")
    tok = AutoTokenizer.from_pretrained(mpath)
    ids = tok("calc: 12+7=", return_tensors="pt").input_ids
    with torch.no_grad():
        a = AutoModelForCausalLM.from_pretrained(mpath)(ids).logits
        b = AutoModelForCausalLM.from_pretrained(bpath)(ids).logits
    assert torch.isfinite(a).all() and (a - b).abs().max() > 1e-4


def test_upstream_never_materialized_is_a_clear_failure(tmp_path):
    defs = build_definitions(parse_pipeline(tiny(DEMO), base_dir=DEMO.parent),
                             resources={"model_store": ModelStoreResource(root=str(tmp_path / "s"))})
    res = dg.materialize(list(defs.assets), resources=defs.resources, instance=dg.DagsterInstance.ephemeral(),
                         selection=[key("merged", "demo", "math_reverse")], raise_on_error=False)
    assert not res.success
    failure = [e for e in res.all_events if e.event_type_value == "STEP_FAILURE"][0]
    msg = failure.step_failure_data.user_failure_data.description
    assert "has never been materialized" in msg and "base_model/demo/tiny_llama" in msg


def test_local_base_external_adapter_and_merge_of_merges(tmp_path):
    """Base from a local directory and an external PEFT adapter, both used in place; a merge of a merge."""
    from pipelines.toy_models import save_lora_adapter, save_tiny_llama

    base = save_tiny_llama(tmp_path / "models" / "base", seed=0, hidden=32, vocab=128)
    save_lora_adapter(base, tmp_path / "adapters" / "chat", seed=1, r=4, alpha=8)
    spec = parse_pipeline({
        "name": "local",
        "base_models": {"base": {"path": "models/base"}},
        "adapters": {"chat": {"path": "adapters/chat", "base": "base"}},
        "merges": {
            "chat_ta": {"method": "task_arithmetic", "base_model": "base",
                        "models": [{"model": "chat", "parameters": {"weight": 0.5}}]},
            "blend": {"method": "linear", "models": [{"model": "chat_ta", "parameters": {"weight": 0.5}},
                                                     {"model": "base", "parameters": {"weight": 0.5}}],
                      "dtype": "float32", "seed": 1},
        },
    }, base_dir=tmp_path)
    defs = build_definitions(spec, resources={"model_store": ModelStoreResource(root=str(tmp_path / "store"))})
    inst = dg.DagsterInstance.ephemeral()
    materialize_all(defs, inst)
    b = latest(inst, key("base_model", "local", "base"))
    assert Path(meta_value(b, "path")) == base  # used in place
    a = latest(inst, key("lora", "local", "chat"))
    assert meta_value(a, "r") == 4 and meta_value(a, "peft_type") == "LORA"
    blend = latest(inst, key("merged", "local", "blend"))
    assert set(meta_value(blend, "input_data_versions")) == {"merged/local/chat_ta", "base_model/local/base"}
    graph = defs.resolve_asset_graph()
    # + the observable source of the external adapter (assets/observations.py)
    assert graph.get(key("lora", "local", "chat")).parent_keys == {key("base_model", "local", "base"),
                                                                   key("source", "local", "chat")}
    assert graph.get(key("merged", "local", "chat_ta")).parent_keys == {key("base_model", "local", "base"),
                                                                        key("lora", "local", "chat")}


def test_skill_soup_example_materializes(tmp_path):
    """The second example: DARE-TIES of three skills, SLERP with filters, a fine-tune on a merge, model+adapter."""
    path = REPO / "pipelines" / "examples" / "skill_soup" / "pipeline.yaml"
    defs = build_definitions(parse_pipeline(tiny(path, steps=2), base_dir=path.parent),
                             resources={"model_store": ModelStoreResource(root=str(tmp_path / "store"))})
    inst = dg.DagsterInstance.ephemeral()
    materialize_all(defs, inst)
    polish = latest(inst, key("finetune", "skill_soup", "soup_polish"))
    assert set(meta_value(polish, "input_data_versions")) == {
        "merged/skill_soup/soup", "dataset/skill_soup/arithmetic", "dataset/skill_soup/reverse"}
    final = latest(inst, key("merged", "skill_soup", "polished_on_soup"))
    inputs = meta_value(final, "engine_inputs")
    assert inputs["soup_half+soup_polish"]["adapter"].endswith(
        latest(inst, key("lora", "skill_soup", "soup_polish")).tags["dagster/data_version"][:16])


# -- resources --------------------------------------------------------------------------------------------------------


def test_model_store_is_content_addressed_and_atomic(tmp_path):
    store = ModelStoreResource(root=str(tmp_path / "s"))
    paths = []
    for content in ("a", "a", "b"):
        with store.staging("merged", "m") as staged:
            staged.mkdir()
            (staged / "f.txt").write_text(content)
            h, _ = dir_content_hash(staged)
            paths.append(store.publish(staged, "merged", "m", h))
            assert not staged.exists()
    assert paths[0] == paths[1] != paths[2]
    assert sorted(p.name for p in (tmp_path / "s" / "merged" / "m").iterdir()) == sorted({paths[0].name, paths[2].name})
    assert list((tmp_path / "s" / ".staging").iterdir()) == []
    with pytest.raises(RuntimeError):
        with store.staging("merged", "m") as staged:
            staged.mkdir()
            raise RuntimeError("boom")
    assert list((tmp_path / "s" / ".staging").iterdir()) == []  # nothing half-written is left
    with pytest.raises(ValueError):
        store.path_for("merged", "../x", "0" * 64)


def test_model_store_default_root(monkeypatch, tmp_path):
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path))
    assert ModelStoreResource().root_path == tmp_path / "mergeline-store"
    monkeypatch.delenv("DAGSTER_HOME")
    assert ModelStoreResource().root_path == (Path.cwd() / ".mergeline" / "store")


def test_gpu_resource():
    with pytest.raises(Exception, match="expected auto, cpu, cuda or cuda:N"):
        GpuResource(device="tpu")
    g = GpuResource(device="cpu", memory_budget="64MB", dtype="float64")
    opts = g.merge_options(seed=3)
    assert opts.device == "cpu" and opts.seed == 3 and opts.compute_dtype == "float64"
    assert opts.cache_bytes == 8_000_000 and opts.chunk_elements == 1_000_000
    assert g.resolved_device() == "cpu" and g.op_tags() == {}
    if not torch.cuda.is_available():
        with pytest.raises(Exception, match="CUDA is not available"):
            GpuResource(device="cuda:0").resolved_device()


def test_hub_offline_miss_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("MY_TOKEN", "hf_secret_value_123")
    hub = HubResource(offline=True, token_env_var="MY_TOKEN", cache_dir=str(tmp_path / "hf"))
    with pytest.raises(HubError) as ei:
        hub.snapshot("someone/not-cached-model", "0" * 40)
    msg = str(ei.value)
    assert "not in the local Hugging Face cache" in msg and "offline" in msg
    assert "hf_secret_value_123" not in msg and "hf_secret_value_123" not in repr(hub)


def test_hub_base_model_offline_fails_the_step_without_retries(tmp_path):
    spec = parse_pipeline({"name": "hubp", "base_models": {
        "llama": {"hub": "someone/not-cached-model", "revision": "0" * 40}}})
    defs = build_definitions(spec, resources={"model_store": ModelStoreResource(root=str(tmp_path / "s")),
                                              "hub": HubResource(offline=True, cache_dir=str(tmp_path / "hf"))})
    res = dg.materialize(list(defs.assets), resources=defs.resources, instance=dg.DagsterInstance.ephemeral(),
                         raise_on_error=False)
    assert not res.success
    failure = [e for e in res.all_events if e.event_type_value == "STEP_FAILURE"][0]
    assert "base_models.llama: model 'someone/not-cached-model' at revision" in \
           failure.step_failure_data.user_failure_data.description


def test_gpu_pool_slot_is_claimed_on_a_sqlite_instance(tmp_path):
    """pool="gpu" with a limit of 1 (dagster.yaml) on a SQLite instance: the merge step claimed a slot of the pool
    (ephemeral instances do not enforce pools) and released it."""
    home = tmp_path / "home"
    home.mkdir()
    (home / "dagster.yaml").write_text("concurrency:\n  pools:\n    default_limit: 1\n")
    base_dir = tmp_path / "models"
    from pipelines.toy_models import save_tiny_llama

    save_tiny_llama(base_dir / "base", seed=0, hidden=32, vocab=128)
    spec = parse_pipeline({"name": "pool", "base_models": {"base": {"path": "models/base"}}, "merges": {
        "m": {"method": "linear", "models": [{"model": "base", "parameters": {"weight": 1.0}}]}}}, base_dir=tmp_path)
    defs = build_definitions(spec, resources={"model_store": ModelStoreResource(root=str(tmp_path / "s"))})
    with dg.DagsterInstance.local_temp(str(home)) as inst:
        materialize_all(defs, inst)
        assert "gpu" in inst.event_log_storage.get_concurrency_keys()
        info = inst.event_log_storage.get_concurrency_info("gpu")
        assert info.slot_count == 1 and info.active_slot_count == 0


# -- Hugging Face Hub (a loopback stand-in for the read endpoints snapshot_download uses) -------------------------------


class FakeHub:
    """Serves ``{(repo_type, repo_id): {filename: bytes}}`` at one commit sha; anything else is a 404 with the Hub's
    ``X-Error-Code`` header, so the unmodified ``huggingface_hub`` client raises its real error types."""

    def __init__(self, repos: dict[tuple[str, str], dict[str, bytes]], sha: str = "c" * 40):
        self.repos, self.sha, self.requests = repos, sha, []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, code, body=b"", headers=None):
                self.send_response(code)
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _repo(self, rtype, repo, rev):
                files = hub.repos.get((rtype, repo))
                if files is None:
                    self._send(404, b'{"error": "Repository not found"}', {"X-Error-Code": "RepoNotFound"})
                elif rev not in (hub.sha, "main"):
                    self._send(404, b'{"error": "Invalid rev id"}', {"X-Error-Code": "RevisionNotFound"})
                return files if files is not None and rev in (hub.sha, "main") else None

            def _route(self):
                path = self.path.split("?")[0]
                hub.requests.append(f"{self.command} {path}")
                m = re.match(r"^/api/(models|datasets)/([^/]+/[^/]+)/(revision|tree)/([^/]+)", path)
                if m:
                    rtype = m.group(1)[:-1]
                    files = self._repo(rtype, m.group(2), m.group(4))
                    if files is None:
                        return
                    if m.group(3) == "revision":
                        body = {"id": m.group(2), "sha": hub.sha, "siblings": [{"rfilename": f} for f in files]}
                    else:
                        body = [{"type": "file", "path": f, "size": len(b), "oid": hashlib.sha1(b).hexdigest()}
                                for f, b in files.items()]
                    return self._send(200, json.dumps(body).encode(), {"Content-Type": "application/json"})
                m = re.match(r"^/(datasets/)?([^/]+/[^/]+)/resolve/([^/]+)/(.+)$", path)
                if m:
                    files = self._repo("dataset" if m.group(1) else "model", m.group(2), m.group(3))
                    if files is None:
                        return
                    if m.group(4) not in files:
                        return self._send(404, b"{}", {"X-Error-Code": "EntryNotFound"})
                    b = files[m.group(4)]
                    return self._send(200, b, {"X-Repo-Commit": hub.sha, "Content-Type": "application/octet-stream",
                                               "ETag": '"' + hashlib.sha256(b).hexdigest() + '"'})
                self._send(404, b"{}", {"X-Error-Code": "EntryNotFound"})

            do_GET = do_HEAD = _route

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def _dir_files(path: Path) -> dict[str, bytes]:
    return {f.relative_to(path).as_posix(): f.read_bytes() for f in sorted(path.rglob("*")) if f.is_file()}


@pytest.fixture
def fake_hub(tmp_path):
    from pipelines.toy_models import save_lora_adapter, save_tiny_llama

    base = save_tiny_llama(tmp_path / "src" / "base", seed=0, hidden=32, vocab=128)
    adapter = save_lora_adapter(base, tmp_path / "src" / "adapter", seed=1, r=4, alpha=8)
    rows = "".join(json.dumps({"question": f"q{i}", "answer": f"a{i}"}) + "\n" for i in range(12))
    hub = FakeHub({("model", "acme/tiny-llama"): _dir_files(base),
                   ("model", "acme/tiny-llama-lora"): _dir_files(adapter),
                   ("dataset", "acme/qa"): {"data/train.jsonl": rows.encode(), "README.md": b"# qa"}})
    yield hub
    hub.close()


def _hub_pipeline(revision: str) -> dict:
    return {
        "name": "hubp",
        "base_models": {"llama": {"hub": "acme/tiny-llama", "revision": revision}},
        "adapters": {"lora": {"hub": "acme/tiny-llama-lora", "revision": revision, "base": "llama"}},
        "datasets": {"qa": {"hub": "acme/qa", "revision": revision, "files": ["data/*.jsonl"],
                            "prompt_field": "question", "completion_field": "answer"}},
        "merges": {"with_lora": {"method": "task_arithmetic", "base_model": "llama",
                                 "models": [{"model": "lora", "parameters": {"weight": 1.0}}]}},
    }


def _client_online(monkeypatch) -> None:
    """The fake Hub is on loopback: let the client talk to it even where HF_HUB_OFFLINE=1 is set for the session
    (huggingface_hub reads it once, at import)."""
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


def test_hub_models_adapters_datasets_at_pinned_revision_into_the_store(fake_hub, tmp_path, monkeypatch):
    _client_online(monkeypatch)
    sha = fake_hub.sha
    store = ModelStoreResource(root=str(tmp_path / "store"))
    cache = str(tmp_path / "hf-cache")
    defs = build_definitions(parse_pipeline(_hub_pipeline(sha)), resources={
        "model_store": store, "hub": HubResource(endpoint=fake_hub.url, cache_dir=cache)})
    inst = dg.DagsterInstance.ephemeral()
    materialize_all(defs, inst)
    base = latest(inst, key("base_model", "hubp", "llama"))
    path = Path(meta_value(base, "path"))
    assert path.parent == tmp_path / "store" / "base_model" / "llama"  # copied into the store, not the HF cache
    assert meta_value(base, "hub_commit") == sha and meta_value(base, "architecture") == "LlamaForCausalLM"
    assert all(not f.is_symlink() for f in path.iterdir())
    assert any(r.startswith(f"GET /acme/tiny-llama/resolve/{sha}/") for r in fake_hub.requests)
    ds = latest(inst, key("dataset", "hubp", "qa"))
    assert meta_value(ds, "dagster/row_count") == 12
    first = json.loads((Path(meta_value(ds, "path")) / "data.jsonl").read_text().splitlines()[0])
    assert first == {"prompt": "q0", "completion": "a0"}
    assert latest(inst, key("merged", "hubp", "with_lora")) is not None

    # offline: the same revision materializes again from the local cache; the data version does not move
    fake_hub.requests.clear()
    defs_off = build_definitions(parse_pipeline(_hub_pipeline(sha)), resources={
        "model_store": store, "hub": HubResource(endpoint=fake_hub.url, cache_dir=cache, offline=True)})
    materialize_all(defs_off, inst)
    assert fake_hub.requests == []
    assert latest(inst, key("base_model", "hubp", "llama")).tags["dagster/data_version"] == \
        base.tags["dagster/data_version"]


def test_hub_missing_revision_is_a_clear_step_failure(fake_hub, tmp_path, monkeypatch):
    _client_online(monkeypatch)
    spec = parse_pipeline({"name": "hubp", "base_models": {"llama": {"hub": "acme/tiny-llama", "revision": "d" * 40}}})
    defs = build_definitions(spec, resources={"model_store": ModelStoreResource(root=str(tmp_path / "s")),
                                              "hub": HubResource(endpoint=fake_hub.url, cache_dir=str(tmp_path / "c"))})
    res = dg.materialize(list(defs.assets), resources=defs.resources, instance=dg.DagsterInstance.ephemeral(),
                         raise_on_error=False)
    assert not res.success
    failures = [e for e in res.all_events if e.event_type_value == "STEP_FAILURE"]
    assert len(failures) == 1  # allow_retries=False: no retry of a permanent error
    msg = failures[0].step_failure_data.user_failure_data.description
    assert msg == (f"base_models.llama: model 'acme/tiny-llama' at revision '{'d' * 40}': the revision does not exist "
                   f"in the repository (pin an existing commit sha, branch or tag)")


# -- dagster dev + GraphQL ----------------------------------------------------------------------------------------------

# The live `dagster dev` + GraphQL + browser checks are in tests/test_live_ui.py.


def test_an_export_can_be_scheduled():
    """A schedule may target an export (by name or ``exports.NAME``): its job materializes the export and, with
    ``upstream: true``, everything it depends on — the eval that gates it included."""
    d = yaml.safe_load(DEMO.read_text())
    d["schedules"] = {"weekly": {"cron": "0 4 * * 1", "target": ["math_reverse_gguf"]},
                      "only": {"cron": "0 5 * * 1", "target": ["exports.math_reverse_gguf"], "upstream": False}}
    spec = parse_pipeline(d, base_dir=DEMO.parent)
    defs = build_definitions(spec)
    weekly = {k.to_user_string() for k in defs.resolve_job_def("demo__weekly").asset_layer.selected_asset_keys}
    assert {"export/demo/math_reverse_gguf", "eval/demo/math_reverse_skills", "merged/demo/math_reverse",
            "base_model/demo/tiny_llama"} <= weekly
    only = {k.to_user_string() for k in defs.resolve_job_def("demo__only").asset_layer.selected_asset_keys}
    assert only == {"export/demo/math_reverse_gguf"}
