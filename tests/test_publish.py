"""Publishing to the Hugging Face Hub: the model card, the ``publish:`` spec option, and ``published/…`` assets
pushing a real merge through the unmodified ``huggingface_hub`` client to a loopback Hub (tests/fake_hub.py), then
downloading it back with ``snapshot_download``; eval gating by blocking asset checks; a wrong token."""

from __future__ import annotations

import json
from pathlib import Path

import dagster as dg
import pytest

from assets.model_card import build_model_card, default_license, eval_rows, read_front_matter
from pipelines.builder import build_definitions
from pipelines.spec import PipelineSpecError, parse_pipeline
from resources.hub import HubError, HubResource
from resources.model_store import ModelStoreResource
from tests.fake_hub import FakeHub

TOKEN = "hf_publish_test_token_5f2a"
PIPE = "pub"
REPO = "acme/tiny-merge"


def _offline_client() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


@pytest.fixture(autouse=True)
def _client_online(monkeypatch):
    """The fake Hub is on loopback: let the client talk to it even where HF_HUB_OFFLINE=1 is set for the session
    (huggingface_hub reads it once, at import)."""
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


# -- model card (pure) -----------------------------------------------------------------------------------------------


def test_model_card_front_matter_round_trips_through_huggingface_hub(tmp_path):
    from huggingface_hub import ModelCard
    from huggingface_hub.repocard import metadata_load

    results = {"model": "m", "scores": {
        "m": {"arith": {"acc,none": 0.75, "acc_stderr,none": 0.02, "note": "n/a"}, "rev": {"exact_match": 1}},
        "base": {"arith": {"acc,none": 0.1}}}}
    rows = eval_rows(results, "quality")
    assert rows == [{"eval": "quality", "task": "arith", "metric": "acc,none", "value": 0.75},
                    {"eval": "quality", "task": "rev", "metric": "exact_match", "value": 1.0}]
    text, front = build_model_card(
        repo_id="acme/m", relation="merge", base_models=["acme/base", "ft", "acme/base"], license="apache-2.0",
        tags=["ties", "merge", "x"], config={"merge_method": "ties", "models": [{"model": "ft"}]},
        eval_rows_=rows, pipeline="p", node="m", content_sha256="ab" * 32)
    (tmp_path / "README.md").write_text(text)
    assert metadata_load(tmp_path / "README.md") == front == read_front_matter(text)
    assert front["base_model"] == ["acme/base", "ft"]
    assert front["base_model_relation"] == "merge"
    assert front["tags"] == ["mergeline", "merge", "ties", "x"]
    assert front["license"] == "apache-2.0" and front["library_name"] == "transformers"
    assert front["mergeline"] == {"pipeline": "p", "node": "m", "content_sha256": "ab" * 32}
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.model_name == "acme/m"
    got = {(r.task_name, r.metric_name): r.metric_value for r in card.data.eval_results}
    assert got == {("arith", "acc,none"): 0.75, ("rev", "exact_match"): 1.0}
    assert [r.metric_type for r in card.data.eval_results] == ["acc", "exact_match"]
    assert "```yaml\nmerge_method: ties\n" in text and "| quality | arith | acc,none | 0.7500 |" in text

    q_text, q_front = build_model_card(repo_id="acme/q", relation="quantized", base_models=["acme/m"],
                                       license="other", license_name="custom", library_name="gguf")
    assert q_front["base_model_relation"] == "quantized" and "merge" not in q_front["tags"]
    assert q_front["license_name"] == "custom" and "model-index" not in q_front

    a = tmp_path / "a"
    a.mkdir()
    (a / "README.md").write_text("---\nlicense: mit\n---\n")
    b = tmp_path / "b.md"
    b.write_text("---\nlicense: apache-2.0\n---\n")
    assert default_license([a, tmp_path / "missing"]) == "mit"
    assert default_license([a, b]) == "other" and default_license([]) == "other"


def test_staged_files_leave_out_the_local_manifest_and_keep_only_gguf_for_gguf_exports(tmp_path):
    from assets.publish import stage_files

    art = tmp_path / "art"
    (art / "sub").mkdir(parents=True)
    for rel, data in {"model.safetensors": b"w", "config.json": b"{}", "README.md": b"engine card",
                      "mergeline.json": b"{}", ".cache/x": b"", "sub/tokenizer.json": b"t"}.items():
        (art / rel).parent.mkdir(parents=True, exist_ok=True)
        (art / rel).write_bytes(data)
    assert stage_files(art, tmp_path / "s1") == ["config.json", "model.safetensors", "sub/tokenizer.json"]
    assert (tmp_path / "s1" / "sub" / "tokenizer.json").read_bytes() == b"t"
    gguf = tmp_path / "g"
    gguf.mkdir()
    (gguf / "m-q8_0.gguf").write_bytes(b"GGUF")
    (gguf / "convert.log").write_text("x")
    assert stage_files(gguf, tmp_path / "s2", only_suffix=".gguf") == ["m-q8_0.gguf"]
    assert stage_files(gguf / "m-q8_0.gguf", tmp_path / "s3", only_suffix=".gguf") == ["m-q8_0.gguf"]
    with pytest.raises(dg.Failure, match=r"nothing to publish in .* \(no \*\.gguf file\)"):
        stage_files(art, tmp_path / "s4", only_suffix=".gguf")


# -- spec ------------------------------------------------------------------------------------------------------------


def _spec_dict(**merge_extra) -> dict:
    return {"name": PIPE, "base_models": {"b": {"toy": {"hidden": 32, "vocab": 128}}},
            "merges": {"m": {"method": "linear", "models": [{"model": "b", "parameters": {"weight": 1.0}}],
                             **merge_extra}}}


def test_publish_option_is_validated_with_yaml_paths():
    d = _spec_dict(publish={"repo": "acme/m", "licence": "mit", "private": "maybe"})
    d["merges"]["m2"] = {"method": "linear", "models": [{"model": "b", "parameters": {"weight": 1.0}}],
                         "publish": {"repo": "no_owner", "license": "apache2", "branch": "a..b",
                                     "tags": ["fine", "has space"], "license_name": "x"}}
    d["exports"] = {"q": {"model": "m", "type": "gguf", "push_to_hub": "acme/q", "publish": {"repo": "acme/q"}}}
    with pytest.raises(PipelineSpecError) as ei:
        parse_pipeline(d)
    errs = ei.value.errors
    assert "merges.m.publish.licence: unknown key 'licence' (did you mean 'license'?); allowed here: repo, private, " \
           "license, license_name, license_link, branch, tags, commit_message" in errs
    assert any(e.startswith("merges.m.publish.private: ") for e in errs)
    assert "merges.m2.publish.repo: 'no_owner' is not a Hub repo id (owner/name)" in errs
    assert any(e.startswith("merges.m2.publish.license: 'apache2' is not a license id the Hub accepts (did you mean "
                            "'apache-2.0'?)") for e in errs)
    assert "merges.m2.publish.branch: 'a..b' is not a valid branch name" in errs
    assert any(e.startswith("merges.m2.publish.tags: tag 'has space' must be") for e in errs)
    assert "exports.q: give 'publish' or its shorthand 'push_to_hub', not both" in errs

    # push_to_hub is shorthand for publish: {repo: ...}; one repo+branch per node
    d = _spec_dict(publish={"repo": "acme/q"})
    d["exports"] = {"q": {"model": "m", "type": "gguf", "push_to_hub": "acme/q"}}
    with pytest.raises(PipelineSpecError) as ei:
        parse_pipeline(d)
    assert ei.value.errors == ["exports.q.push_to_hub: 'acme/q' (branch 'main') is also published by merges.m; "
                               "publish each model to its own repo or branch"]
    d["exports"]["q"]["push_to_hub"] = "acme/q-gguf"
    spec = parse_pipeline(d)
    assert spec.exports["q"].publish.repo == "acme/q-gguf" and spec.exports["q"].publish.private is True
    assert spec.merges["m"].publish.branch == "main" and spec.merges["m"].publish.license is None


# -- assets against the loopback Hub -------------------------------------------------------------------------------


def stand_in_eval(name: str, model: str, score: float, threshold: float = 0.5) -> dg.AssetsDefinition:
    """An eval-shaped asset (the eval branch builds the real one): ``results`` metadata in the eval assets' format
    and a blocking threshold check."""
    key = dg.AssetKey(["eval", PIPE, name])

    @dg.asset(key=key, deps=[dg.AssetKey(["merged", PIPE, model])], group_name=PIPE,
              check_specs=[dg.AssetCheckSpec("threshold_arith", asset=key, blocking=True)])
    def _eval() -> dg.MaterializeResult:
        results = {"model": model, "scores": {model: {"arith": {"acc,none": score, "acc_stderr,none": 0.01}},
                                              "base": {"arith": {"acc,none": 0.05}}}}
        passed = score >= threshold
        return dg.MaterializeResult(
            metadata={"results": dg.MetadataValue.json(results)},
            check_results=[dg.AssetCheckResult(
                check_name="threshold_arith", passed=passed, severity=dg.AssetCheckSeverity.ERROR,
                description=f"arith acc,none = {score} " + (">=" if passed else "<") + f" threshold {threshold}",
                metadata={"score": score, "threshold": threshold})])

    return _eval


@pytest.fixture
def hub_env(tmp_path):
    """A fake Hub holding a tiny base model (with an apache-2.0 card) that the pipeline downloads, and a second,
    local model; the merge of both is what gets published."""
    if _offline_client():
        pytest.skip("HF_HUB_OFFLINE is set in this environment: the client refuses even a loopback endpoint")
    from tests.tiny_models import save_tiny_llama, save_variant

    base = save_tiny_llama(tmp_path / "src" / "base", seed=0, hidden=32, vocab=128)
    (base / "README.md").write_text("---\nlicense: apache-2.0\n---\n# base\n")
    save_variant(base, tmp_path / "models" / "other", seed=1)
    hub = FakeHub(TOKEN)
    repo = hub.create("model", "acme/base-llama", private=False)
    files = {f.relative_to(base).as_posix(): f.read_bytes() for f in sorted(base.rglob("*")) if f.is_file()}
    sha = hub.commit(repo, "main", "add model", files, []).sha
    yield hub, sha, tmp_path
    hub.close()


def _pipeline(sha: str, tmp_path: Path, *, evals: bool = True) -> dict:
    d = {"name": PIPE,
         "base_models": {"base": {"hub": "acme/base-llama", "revision": sha}, "other": {"path": "models/other"}},
         "merges": {"m": {"method": "linear", "models": [{"model": "base", "parameters": {"weight": 0.5}},
                                                         {"model": "other", "parameters": {"weight": 0.5}}],
                          "publish": {"repo": REPO, "private": True, "tags": ["tiny"]}}}}
    if evals:
        d["evals"] = {"quality": {"model": "m", "tasks": ["arith"], "thresholds": {"arith": 0.5}}}
    return d


def _defs(sha, tmp_path, hub_res: HubResource, score: float | None = 0.8):
    spec = parse_pipeline(_pipeline(sha, tmp_path, evals=score is not None), base_dir=tmp_path)
    defs = build_definitions(spec, resources={"model_store": ModelStoreResource(root=str(tmp_path / "store")),
                                              "hub": hub_res})
    eval_key = dg.AssetKey(["eval", PIPE, "quality"])
    # once the eval assets exist in the builder, the stand-in replaces them (lm-eval is not what is tested here)
    assets = [a for a in defs.assets if eval_key not in getattr(a, "keys", ())]
    checks = [c for c in (defs.asset_checks or []) if all(k.asset_key != eval_key for k in c.check_keys)]
    if score is not None:
        assets.append(stand_in_eval("quality", "m", score))
    return assets, checks, defs.resources


def _instance(tmp_path: Path):
    """A real SQLite instance (check records, event log) in a throw-away DAGSTER_HOME."""
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    return dg.DagsterInstance.local_temp(str(home))


def _events_text(result: dg.ExecuteInJobResult) -> str:
    return "\n".join(repr(e) for e in result.all_events)


def test_publish_a_merge_then_download_it_back(hub_env, monkeypatch):
    hub, sha, tmp_path = hub_env
    monkeypatch.setenv("MERGELINE_TEST_HF_TOKEN", TOKEN)
    hub_res = HubResource(endpoint=hub.url, token=dg.EnvVar("MERGELINE_TEST_HF_TOKEN"),
                          cache_dir=str(tmp_path / "hf-cache"))
    assets, checks, resources = _defs(sha, tmp_path, hub_res)
    with _instance(tmp_path) as inst:
        res = dg.materialize([*assets, *checks], resources=resources, instance=inst)
        assert res.success
        assert TOKEN not in _events_text(res)
        merged = inst.get_latest_materialization_event(dg.AssetKey(["merged", PIPE, "m"])).asset_materialization
        pub = inst.get_latest_materialization_event(dg.AssetKey(["published", PIPE, "m"])).asset_materialization
        meta = {k: getattr(v, "value", v) for k, v in pub.metadata.items()}
        merged_dir = Path(merged.metadata["path"].value)

        # the Hub holds one new commit on main with the artifact (minus the local manifest) and the new card
        repo = hub.repos[("model", REPO)]
        assert repo.private is True
        assert meta["commit_sha"] == repo.refs["main"] and meta["repo_id"] == REPO
        assert meta["url"] == f"{hub.url}/{REPO}"
        expected = sorted(f.relative_to(merged_dir).as_posix() for f in merged_dir.rglob("*")
                          if f.is_file() and f.name != "mergeline.json")
        assert meta["files"] == expected and "model.safetensors.index.json" in expected and "README.md" in expected
        assert all(ok for _, _, ok in hub.requests)  # every request carried the token
        assert any(m == "POST" and p == f"/api/models/{REPO}/commit/main" for m, p, _ in hub.requests)

        # front matter: Hub id of the downloaded base, node name of the local one, license inherited from the base
        front = meta["card_front_matter"]
        assert front["base_model"] == ["acme/base-llama", "other"]
        assert front["base_model_relation"] == "merge"
        assert front["tags"] == ["mergeline", "merge", "linear", "tiny"]
        assert front["license"] == "apache-2.0" == meta["license"]
        assert front["mergeline"]["content_sha256"] == merged.tags["dagster/data_version"]
        assert front["model-index"][0]["name"] == REPO
        res0 = front["model-index"][0]["results"]
        assert [(r["task"]["name"], r["metrics"][0]["name"], r["metrics"][0]["value"]) for r in res0] == \
               [("arith", "acc,none", 0.8)]  # the evaluated model's score only: no stderr, no comparison model

        # download it back with the real client: byte-identical files, the card's front matter as reported
        from huggingface_hub import HfApi, snapshot_download

        snap = Path(snapshot_download(REPO, revision=meta["commit_sha"], endpoint=hub.url, token=TOKEN,
                                      cache_dir=str(tmp_path / "dl-cache")))
        got = sorted(f.relative_to(snap).as_posix() for f in snap.rglob("*") if f.is_file())
        assert got == sorted([*expected, ".gitattributes"])
        for rel in expected:
            if rel == "README.md":
                continue
            assert (snap / rel).read_bytes() == (merged_dir / rel).read_bytes(), rel
        card = (snap / "README.md").read_text()
        assert card == meta["model_card"] and read_front_matter(card) == front
        assert card != (merged_dir / "README.md").read_text()  # the published card, not the engine's
        info = HfApi(endpoint=hub.url, token=TOKEN).model_info(REPO)
        assert info.sha == meta["commit_sha"] and info.private
        assert info.card_data.to_dict()["base_model_relation"] == "merge"

        # publishing again with nothing changed makes no new commit; the data version stays
        n_commits = len(repo.commits)
        again = dg.materialize([*assets, *checks], resources=resources, instance=inst,
                               selection=[dg.AssetKey(["published", PIPE, "m"])])
        assert again.success and len(repo.commits) == n_commits
        pub2 = inst.get_latest_materialization_event(dg.AssetKey(["published", PIPE, "m"])).asset_materialization
        assert pub2.metadata["commit_sha"].value == meta["commit_sha"]
        assert pub2.tags["dagster/data_version"] == pub.tags["dagster/data_version"]

        # the merge changes but the eval is not re-run: publishing refuses (the scores belong to the old model)
        d = _pipeline(sha, tmp_path)
        d["merges"]["m"]["models"][0]["parameters"]["weight"] = 0.3
        defs2 = build_definitions(parse_pipeline(d, base_dir=tmp_path), resources=resources)
        assert dg.materialize(list(defs2.assets), resources=resources, instance=inst,
                              selection=[dg.AssetKey(["merged", PIPE, "m"])]).success
        stale = dg.materialize([*assets, *checks], resources=resources, instance=inst, raise_on_error=False,
                               selection=[dg.AssetKey(["published", PIPE, "m"])])
        assert not stale.success
        failure = next(e for e in stale.all_events if e.event_type_value == "STEP_FAILURE")
        new_dv = inst.get_latest_materialization_event(dg.AssetKey(["merged", PIPE, "m"])).asset_materialization \
            .tags["dagster/data_version"]
        assert failure.step_failure_data.user_failure_data.description == (
            f"merges.m.publish: eval 'quality' scored an older version of merged/pub/m (data version "
            f"{merged.tags['dagster/data_version'][:12]}, now {new_dv[:12]}); re-run the eval before publishing")
        assert len(repo.commits) == n_commits


def test_publish_folder_to_a_new_branch(tmp_path):
    if _offline_client():
        pytest.skip("HF_HUB_OFFLINE is set in this environment")
    from huggingface_hub import snapshot_download

    folder = tmp_path / "f"
    (folder / "sub").mkdir(parents=True)
    (folder / "README.md").write_text("---\nlicense: mit\n---\n# x\n")
    (folder / "sub" / "w.bin").write_bytes(bytes(range(256)) * 9)
    with FakeHub(TOKEN) as hub:
        res = HubResource(endpoint=hub.url, token=TOKEN).publish_folder(folder, "acme/b", private=False,
                                                                        revision="dev", commit_message="to dev")
        repo = hub.repos[("model", "acme/b")]
        assert not repo.private and res["revision"] == "dev" and res["url"] == f"{hub.url}/acme/b/tree/dev"
        assert repo.refs["dev"] == res["commit_sha"] != repo.refs["main"]
        assert repo.commits[res["commit_sha"]].message == "to dev"
        assert sorted(hub.files("acme/b", "main")) == [".gitattributes"]  # main untouched
        assert res["files"] == ["README.md", "sub/w.bin"]
        snap = Path(snapshot_download("acme/b", revision="dev", endpoint=hub.url, token=TOKEN,
                                      cache_dir=str(tmp_path / "c")))
        assert (snap / "sub" / "w.bin").read_bytes() == (folder / "sub" / "w.bin").read_bytes()


def stand_in_gguf_export(name: str, model: str, store: Path) -> dg.AssetsDefinition:
    """An export-shaped asset (the export branch builds the real one): a real GGUF file (gguf's writer) in an
    artifact folder next to a log file that must not be published."""
    key = dg.AssetKey(["export", PIPE, name])

    @dg.asset(key=key, deps=[dg.AssetKey(["merged", PIPE, model])], group_name=PIPE)
    def _export() -> dg.MaterializeResult:
        import gguf
        import numpy as np

        out = store / "export" / name
        out.mkdir(parents=True, exist_ok=True)
        w = gguf.GGUFWriter(str(out / f"{model}-q8_0.gguf"), "llama")
        w.add_block_count(2)
        w.add_tensor("token_embd.weight", np.linspace(-1, 1, 128 * 32, dtype=np.float32).reshape(128, 32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        (out / "convert.log").write_text("converted\n")
        return dg.MaterializeResult(metadata={"path": dg.MetadataValue.path(str(out))},
                                    data_version=dg.DataVersion("e" * 64))

    return _export


def test_publish_a_gguf_export_of_a_published_merge(hub_env):
    hub, sha, tmp_path = hub_env
    hub_res = HubResource(endpoint=hub.url, token=TOKEN, cache_dir=str(tmp_path / "hf-cache"))
    d = _pipeline(sha, tmp_path, evals=False)
    d["exports"] = {"q": {"model": "m", "type": "gguf", "push_to_hub": "acme/tiny-merge-gguf"}}
    defs = build_definitions(parse_pipeline(d, base_dir=tmp_path), resources={
        "model_store": ModelStoreResource(root=str(tmp_path / "store")), "hub": hub_res})
    export_key = dg.AssetKey(["export", PIPE, "q"])
    assets = [a for a in defs.assets if export_key not in getattr(a, "keys", ())]
    assets.append(stand_in_gguf_export("q", "m", tmp_path / "art"))
    with _instance(tmp_path) as inst:
        assert dg.materialize(assets, resources=defs.resources, instance=inst).success
        pub = inst.get_latest_materialization_event(dg.AssetKey(["published", PIPE, "q"])).asset_materialization
        meta = {k: getattr(v, "value", v) for k, v in pub.metadata.items()}
    assert meta["files"] == ["README.md", "m-q8_0.gguf"]
    front = meta["card_front_matter"]
    assert front["base_model"] == [REPO]  # the merge is published too: the export points at its repo
    assert front["base_model_relation"] == "quantized" and front["library_name"] == "gguf"
    assert front["tags"] == ["mergeline", "gguf", "q8_0"] and front["license"] == "apache-2.0"
    assert "model-index" not in front
    from huggingface_hub import snapshot_download
    import gguf

    snap = Path(snapshot_download("acme/tiny-merge-gguf", endpoint=hub.url, token=TOKEN,
                                  cache_dir=str(tmp_path / "dl-cache")))
    assert sorted(f.name for f in snap.iterdir()) == [".gitattributes", "README.md", "m-q8_0.gguf"]
    assert (snap / "m-q8_0.gguf").read_bytes() == (tmp_path / "art" / "export" / "q" / "m-q8_0.gguf").read_bytes()
    assert [t.name for t in gguf.GGUFReader(str(snap / "m-q8_0.gguf")).tensors] == ["token_embd.weight"]
    assert read_front_matter((snap / "README.md").read_text()) == front


def test_wrong_token_fails_clearly_without_leaking_it(hub_env):
    hub, sha, tmp_path = hub_env
    secret = "hf_wrong_token_0c1d"
    hub_res = HubResource(endpoint=hub.url, token=secret, cache_dir=str(tmp_path / "hf-cache"))
    with pytest.raises(HubError) as ei:  # the resource alone
        hub_res.publish_folder(tmp_path / "models" / "other", "acme/x")
    assert secret not in str(ei.value) and secret not in repr(hub_res)
    assert "the Hub rejected the token" in str(ei.value)
    n = len(hub.requests)
    with pytest.raises(HubError, match=r"no Hub token; set \$MERGELINE_UNSET_TOKEN_VAR"):
        HubResource(endpoint=hub.url, token_env_var="MERGELINE_UNSET_TOKEN_VAR").publish_folder(
            tmp_path / "models" / "other", "acme/x")
    with pytest.raises(HubError, match="the Hub resource is offline"):
        HubResource(endpoint=hub.url, token=TOKEN, offline=True).publish_folder(tmp_path / "models" / "other",
                                                                                "acme/x")
    assert len(hub.requests) == n  # both refused before any request
    # downloads use the right token here; only the publish step sees the wrong one
    good = HubResource(endpoint=hub.url, token=TOKEN, cache_dir=str(tmp_path / "hf-cache"))
    assets, checks, resources = _defs(sha, tmp_path, good, score=None)
    with _instance(tmp_path) as inst:
        assert dg.materialize([a for a in assets if dg.AssetKey(["published", PIPE, "m"]) not in getattr(a, "keys", {a.key})],
                              resources=resources, instance=inst).success
        res = dg.materialize([*assets, *checks], resources={**resources, "hub": hub_res}, instance=inst,
                             selection=[dg.AssetKey(["published", PIPE, "m"])], raise_on_error=False)
        assert not res.success
        failures = [e for e in res.all_events if e.event_type_value == "STEP_FAILURE"]
        assert len(failures) == 1  # not retried: a bad token is not transient
        msg = failures[0].step_failure_data.user_failure_data.description
        assert msg == (f"merges.m.publish: publish to Hub repo '{REPO}': the Hub rejected the token while creating "
                       f"the repository (401 Unauthorized); set $HF_TOKEN to a valid token with write access")
        assert secret not in _events_text(res)
        assert ("model", REPO) not in hub.repos
        assert any(p == "/api/repos/create" and not ok for _, p, ok in hub.requests)  # the token was sent, refused
        assert inst.get_latest_materialization_event(dg.AssetKey(["published", PIPE, "m"])) is None


def test_a_failing_blocking_eval_check_prevents_publishing(hub_env):
    hub, sha, tmp_path = hub_env
    hub_res = HubResource(endpoint=hub.url, token=TOKEN, cache_dir=str(tmp_path / "hf-cache"))
    assets, checks, resources = _defs(sha, tmp_path, hub_res, score=0.2)
    published = dg.AssetKey(["published", PIPE, "m"])
    eval_key = dg.AssetKey(["eval", PIPE, "quality"])
    with _instance(tmp_path) as inst:
        # a run launched from a code location knows the declared checks: one that never ran also blocks publishing
        from types import SimpleNamespace

        from assets.publish import blocking_check_problems

        repo_def = dg.Definitions(assets=assets, asset_checks=checks, resources=resources).get_repository_def()
        ctx = SimpleNamespace(repository_def=repo_def, instance=inst)
        assert blocking_check_problems(ctx, [eval_key, dg.AssetKey(["merged", PIPE, "m"])]) == [
            "eval/pub/quality:threshold_arith has not run yet (materialize eval/pub/quality first)"]

        # same run: the eval's blocking check fails, Dagster never starts the publish step
        res = dg.materialize([*assets, *checks], resources=resources, instance=inst, raise_on_error=False)
        assert not res.success
        # what the run's log in the UI shows for the publish step: it never started, because the eval failed
        logs = [e for e in inst.all_logs(res.run_id) if e.step_key == "published__pub__m"]
        assert logs and all(e.dagster_event is None or e.dagster_event.event_type_value != "STEP_START" for e in logs)
        assert any("Dependencies for step published__pub__m failed: ['eval__pub__quality']. Not executing."
                   in (e.user_message or e.message or "") for e in logs), [e.user_message for e in logs]
        evals = [e.event_specific_data for e in res.all_events if e.event_type_value == "ASSET_CHECK_EVALUATION"
                 and e.event_specific_data.asset_key.path[0] == "eval"]
        assert [(c.check_name, c.passed, c.description) for c in evals] == \
               [("threshold_arith", False, "arith acc,none = 0.2 < threshold 0.5")]
        fail = next(e for e in res.all_events if e.event_type_value == "STEP_FAILURE")
        assert "blocking asset check failed" in fail.step_failure_data.error.message
        assert "eval/pub/quality: threshold_arith" in fail.step_failure_data.error.message
        assert inst.get_latest_materialization_event(published) is None
        assert ("model", REPO) not in hub.repos and not any(p.startswith("/api/repos") for _, p, _ in hub.requests)

        # a later run of the publish step alone: the step itself refuses, with the failed check and its reason
        res = dg.materialize([*assets, *checks], resources=resources, instance=inst, selection=[published],
                             raise_on_error=False)
        assert not res.success
        failures = [e for e in res.all_events if e.event_type_value == "STEP_FAILURE"]
        assert len(failures) == 1
        data = failures[0].step_failure_data.user_failure_data
        assert data.description == (f"merges.m.publish: not publishing '{REPO}': blocking checks did not pass:\n"
                                     f"  eval/pub/quality:threshold_arith failed: arith acc,none = 0.2 < threshold 0.5")
        assert json.loads(json.dumps(data.metadata["failed_checks"].value)) == [
            "eval/pub/quality:threshold_arith failed: arith acc,none = 0.2 < threshold 0.5"]
        assert ("model", REPO) not in hub.repos
        assert blocking_check_problems(ctx, [eval_key]) == [
            "eval/pub/quality:threshold_arith failed: arith acc,none = 0.2 < threshold 0.5"]
