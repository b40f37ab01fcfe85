"""The model store on S3, against a real S3-compatible server (moto's server mode on loopback): upload, atomic
publish (a killed upload leaves no visible artifact), hash verification on fetch, and the demo pipeline whose inputs
and outputs all live in the bucket (the merge step run again with an empty cache, as on another machine)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
from contextlib import contextmanager
from pathlib import Path

import dagster as dg
import pytest

from assets.common import dir_content_hash
from resources.model_store import ModelStoreResource
from resources.object_store import COMMIT_MARKER, ArtifactStore, S3Settings, StoreError

REPO = Path(__file__).resolve().parent.parent


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def make_store(s3_server, bucket: str, cache: Path, prefix: str = "store", chunk: int = 5 * 2**20) -> ArtifactStore:
    return ArtifactStore(f"s3://{bucket}/{prefix}", cache_dir=cache,
                         s3=S3Settings(endpoint_url=s3_server.url, addressing_style="path",
                                       multipart_chunk_bytes=chunk))


@contextmanager
def stage_files(store: ArtifactStore, files: dict[str, bytes], kind="merged", name="m"):
    """A staging directory holding ``files``: yields (staged path, content hash)."""
    with store.staging(kind, name) as staged:
        staged.mkdir(parents=True)
        for rel, data in files.items():
            (staged / rel).parent.mkdir(parents=True, exist_ok=True)
            (staged / rel).write_bytes(data)
        yield staged, dir_content_hash(staged)[0]


def test_upload_layout_streaming_hashes_and_fetch(s3_server, tmp_path, monkeypatch):
    import resources.object_store as osm

    bucket = s3_server.bucket()
    store = make_store(s3_server, bucket, tmp_path / "cacheA")
    big = os.urandom(11 * 2**20 + 123)  # > 2 multipart chunks of 5 MiB
    files = {"config.json": b'{"a": 1}\n', "model-00001-of-00001.safetensors": big, "sub/tok.txt": b"hello",
             "empty.json": b""}

    opened: list[tuple[str, str]] = []
    real_open = open

    def counting_open(path, mode="r", *a, **kw):
        opened.append((str(path), mode))
        return real_open(path, mode, *a, **kw)

    with stage_files(store, files) as (staged, h):
        monkeypatch.setattr(osm, "open", counting_open, raising=False)
        final = store.publish(staged, "merged", "m", h)
        monkeypatch.delattr(osm, "open")
    # each staged file was read exactly once: its hash came from the uploaded stream
    reads = sorted(Path(p).name for p, m in opened if "r" in m)
    assert reads == sorted(Path(r).name for r in files)

    uri = f"s3://{bucket}/store/merged/m/{h[:16]}"
    assert final.store_uri == uri and final == tmp_path / "cacheA" / "merged" / "m" / h[:16]
    assert {p.relative_to(final).as_posix(): p.read_bytes() for p in final.rglob("*") if p.is_file()} == files
    keys = s3_server.client().list_objects_v2(Bucket=bucket, Prefix="store/")["Contents"]
    marker_key = f"store/merged/m/{h[:16]}/{COMMIT_MARKER}"
    marker = json.loads(s3_server.client().get_object(Bucket=bucket, Key=marker_key)["Body"].read())
    assert marker["content_sha256"] == h and marker["kind"] == "merged" and marker["name"] == "m"
    assert marker["files"] == {rel: {"size": len(b), "sha256": sha(b)} for rel, b in files.items()}
    assert sorted(k["Key"] for k in keys) == sorted(
        [marker_key] + [f"store/merged/m/{h[:16]}/{marker['upload']}/{rel}" for rel in files])
    assert store.exists("merged", "m", h) and not store.exists("merged", "m", "0" * 64)

    # publishing the same content again uploads nothing new
    with stage_files(store, files) as (staged, h2):
        assert h2 == h
        store.publish(staged, "merged", "m", h)
    assert len(s3_server.client().list_objects_v2(Bucket=bucket, Prefix="store/")["Contents"]) == len(keys)

    # another machine (empty cache) fetches it through the bucket, verified while streaming (no re-read)
    other = make_store(s3_server, bucket, tmp_path / "cacheB")
    opened.clear()
    monkeypatch.setattr(osm, "open", counting_open, raising=False)
    got = other.resolve(uri)
    monkeypatch.delattr(osm, "open")
    assert all("w" in m for _, m in opened) and len(opened) == len(files)
    assert got == tmp_path / "cacheB" / "merged" / "m" / h[:16] and got.store_uri == uri
    assert {p.relative_to(got).as_posix(): p.read_bytes() for p in got.rglob("*") if p.is_file()} == files
    assert dir_content_hash(got)[0] == h
    assert list((tmp_path / "cacheB" / ".staging").iterdir()) == []


def test_resource_wraps_the_same_store(s3_server, tmp_path):
    bucket = s3_server.bucket()
    res = ModelStoreResource(root=f"s3://{bucket}/p", cache_dir=str(tmp_path / "c"), **s3_server.store_kwargs())
    assert res.is_remote and res.root_path == tmp_path / "c"
    with res.staging("dataset", "d") as staged:
        assert staged.parent == tmp_path / "c" / ".staging"
        staged.mkdir()
        (staged / "data.jsonl").write_text('{"text": "x"}\n')
        h, _ = dir_content_hash(staged)
        final = res.publish(staged, "dataset", "d", h)
    assert res.exists("dataset", "d", h)
    assert res.uri_for("dataset", "d", h) == final.store_uri == f"s3://{bucket}/p/dataset/d/{h[:16]}"
    cfg = res.client_config()
    assert cfg["root"] == f"s3://{bucket}/p" and cfg["s3_endpoint_url"] == s3_server.url
    assert not any("secret" in str(v).lower() for v in cfg.values())  # credentials never travel in config
    with pytest.raises(StoreError, match="never completely published"):
        res.resolve(f"s3://{bucket}/p/dataset/d/{'0' * 16}")
    with pytest.raises(StoreError, match="bucket 'no-such-bucket-x' does not exist"):
        ModelStoreResource(root="s3://no-such-bucket-x/p", cache_dir=str(tmp_path / "c2"),
                           **s3_server.store_kwargs()).resolve(f"s3://no-such-bucket-x/p/dataset/d/{'0' * 16}")


_KILL_SCRIPT = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from resources.object_store import ArtifactStore, S3Bucket, S3Settings
    from assets.common import dir_content_hash

    url, bucket, cache = sys.argv[1:4]
    store = ArtifactStore(f"s3://{bucket}/store", cache_dir=cache, s3=S3Settings(endpoint_url=url, addressing_style="path"))
    real = S3Bucket.put_file
    def slow_put(self, path, key):
        out = real(self, path, key)
        print("UPLOADED", key, flush=True)
        time.sleep(600)   # killed here, between two files
        return out
    S3Bucket.put_file = slow_put
    with store.staging("merged", "m") as staged:
        staged.mkdir()
        for i in range(3):
            (staged / f"part{i}.bin").write_bytes(bytes([i]) * 1000)
        h, _ = dir_content_hash(staged)
        print("HASH", h, flush=True)
        store.publish(staged, "merged", "m", h)
""")


def test_killed_upload_leaves_no_visible_artifact(s3_server, tmp_path):
    bucket = s3_server.bucket()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", _KILL_SCRIPT, s3_server.url, bucket, str(tmp_path / "cache")],
                            stdout=subprocess.PIPE, text=True, env=env, cwd=REPO)
    try:
        h = proc.stdout.readline().split()[1]
        uploaded = proc.stdout.readline().split()[1]
        os.kill(proc.pid, signal.SIGKILL)  # mid-publish: one of three files is in the bucket
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    client = s3_server.client()
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=bucket).get("Contents", [])]
    assert keys == [uploaded] and "/u-" in uploaded  # the orphan sits under its own upload prefix ...
    store = make_store(s3_server, bucket, tmp_path / "reader-cache")
    uri = f"s3://{bucket}/store/merged/m/{h[:16]}"
    assert not store.exists("merged", "m", h)  # ... and is not an artifact: no commit marker
    with pytest.raises(StoreError, match="no commit marker"):
        store.resolve(uri)
    assert not (tmp_path / "reader-cache" / "merged").exists()

    # a retry publishes the same content completely
    with stage_files(store, {f"part{i}.bin": bytes([i]) * 1000 for i in range(3)}) as (staged, h2):
        assert h2 == h
        store.publish(staged, "merged", "m", h)
    fresh = make_store(s3_server, bucket, tmp_path / "cache3")
    assert sorted(p.name for p in fresh.resolve(uri).iterdir()) == ["part0.bin", "part1.bin", "part2.bin"]


def test_failed_upload_removes_its_objects_and_commits_nothing(s3_server, tmp_path, monkeypatch):
    from resources.object_store import S3Bucket

    bucket = s3_server.bucket()
    store = make_store(s3_server, bucket, tmp_path / "cache")
    real = S3Bucket.put_file
    calls = []

    def flaky(self, path, key):
        calls.append(key)
        if len(calls) == 2:
            raise ConnectionError("network went away")
        return real(self, path, key)

    monkeypatch.setattr(S3Bucket, "put_file", flaky)
    with pytest.raises(ConnectionError):
        with stage_files(store, {"a.bin": b"a" * 10, "b.bin": b"b" * 10, "c.bin": b"c" * 10}) as (staged, h):
            store.publish(staged, "merged", "m", h)
    assert s3_server.client().list_objects_v2(Bucket=bucket).get("Contents", []) == []
    assert not store.exists("merged", "m", h) and not (tmp_path / "cache" / "merged").exists()


def test_fetch_verifies_hashes(s3_server, tmp_path):
    bucket = s3_server.bucket()
    store = make_store(s3_server, bucket, tmp_path / "w")
    files = {"model.safetensors": b"\x01" * 4096, "config.json": b"{}"}
    with stage_files(store, files) as (staged, h):
        final = store.publish(staged, "merged", "m", h)
    marker = store.read_commit("merged", "m", h)
    key = f"store/merged/m/{h[:16]}/{marker['upload']}/model.safetensors"
    # same size, one flipped byte: only a hash notices
    s3_server.client().put_object(Bucket=bucket, Key=key, Body=b"\x01" * 4095 + b"\x02")
    reader = make_store(s3_server, bucket, tmp_path / "r")
    with pytest.raises(StoreError, match=r"model\.safetensors' does not match its commit marker"):
        reader.resolve(final.store_uri)
    assert not (tmp_path / "r" / "merged").exists()  # nothing half-verified is left in the cache
    assert list((tmp_path / "r" / ".staging").iterdir()) == []


def test_single_file_artifacts_keep_their_shape(s3_server, tmp_path):
    bucket = s3_server.bucket()
    store = make_store(s3_server, bucket, tmp_path / "w")
    with store.staging("export", "gguf") as staged:
        staged.write_bytes(b"GGUF" + b"\0" * 60)
        h, _ = dir_content_hash(staged)
        final = store.publish(staged, "export", "gguf", h)
    assert final.is_file()
    got = make_store(s3_server, bucket, tmp_path / "r").resolve(final.store_uri)
    assert got.is_file() and got.read_bytes() == b"GGUF" + b"\0" * 60


# -- the demo pipeline in the bucket -----------------------------------------------------------------------------------


@pytest.mark.heavy
def test_demo_pipeline_lives_in_the_bucket(s3_server, tmp_path):
    """Every artifact of the demo (tiny settings) is published to S3 and referenced by s3:// URI; the merge step then
    runs again as an external Pipes process with an empty cache (another machine): it finds its inputs through the
    bucket and produces the same data version and bytes."""
    from pipelines.builder import build_definitions
    from pipelines.spec import parse_pipeline
    from resources.device import GpuResource
    from resources.launcher import StepLauncherResource
    from tests.test_pipeline_assets import DEMO, tiny

    bucket = s3_server.bucket()
    spec = parse_pipeline(tiny(DEMO), base_dir=DEMO.parent)
    store_a = ModelStoreResource(root=f"s3://{bucket}/ml", cache_dir=str(tmp_path / "cacheA"),
                                 **s3_server.store_kwargs())
    defs = build_definitions(spec, resources={"model_store": store_a, "gpu": GpuResource(device="cpu")})
    inst = dg.DagsterInstance.ephemeral()
    assert dg.materialize(list(defs.assets), resources=defs.resources, instance=inst).success
    client = s3_server.client()
    mats = {}
    for k in defs.resolve_asset_graph().get_all_asset_keys():
        m = inst.get_latest_materialization_event(k).asset_materialization
        mats[k.to_user_string()] = m
        kind, _, name = k.path
        dv = m.tags["dagster/data_version"]
        path = m.metadata["path"].value
        assert path == f"s3://{bucket}/ml/{kind}/{name}/{dv[:16]}", k
        assert m.metadata["dagster/uri"].value == path
        marker = json.loads(client.get_object(Bucket=bucket, Key=f"ml/{kind}/{name}/{dv[:16]}/{COMMIT_MARKER}")
                            ["Body"].read())
        assert marker["content_sha256"] == dv
    merged_key = dg.AssetKey(["merged", "demo", "math_reverse"])
    first = mats["merged/demo/math_reverse"]
    assert first.metadata["engine_inputs"].value["math"]["adapter"].startswith(f"s3://{bucket}/ml/lora/math/")

    # "another machine": an empty cache, the merge alone, run by the Pipes entry point in a subprocess
    store_b = ModelStoreResource(root=f"s3://{bucket}/ml", cache_dir=str(tmp_path / "cacheB"),
                                 **s3_server.store_kwargs())
    defs_b = build_definitions(spec, resources={"model_store": store_b, "gpu": GpuResource(device="cpu"),
                                                "launcher": StepLauncherResource(mode="subprocess")})
    res = dg.materialize(list(defs_b.assets), resources=defs_b.resources, instance=inst, selection=[merged_key])
    assert res.success
    second = inst.get_latest_materialization_event(merged_key).asset_materialization
    assert second.tags["dagster/data_version"] == first.tags["dagster/data_version"]
    assert second.metadata["path"].value == first.metadata["path"].value
    fetched = sorted(p.relative_to(tmp_path / "cacheB").parts[:2] for p in (tmp_path / "cacheB").glob("*/*/*"))
    assert fetched == [("base_model", "tiny_llama"), ("lora", "math"), ("lora", "reverse_skill"),
                       ("merged", "math_reverse")]
    dv = first.tags["dagster/data_version"]
    out_a = tmp_path / "cacheA" / "merged" / "math_reverse" / dv[:16]
    out_b = tmp_path / "cacheB" / "merged" / "math_reverse" / dv[:16]
    for f in sorted(out_a.rglob("*")):
        if f.is_file() and f.name != "mergeline.json":
            assert (out_b / f.relative_to(out_a)).read_bytes().replace(
                str(tmp_path / "cacheB").encode(), str(tmp_path / "cacheA").encode()) == f.read_bytes(), f.name
    # a fine-tune on a third machine (empty cache, in process): upstream() fetches base and dataset from the bucket
    ft_key = dg.AssetKey(["finetune", "demo", "math"])
    store_c = ModelStoreResource(root=f"s3://{bucket}/ml", cache_dir=str(tmp_path / "cacheC"),
                                 **s3_server.store_kwargs())
    defs_c = build_definitions(spec, resources={"model_store": store_c, "gpu": GpuResource(device="cpu")})
    ft_keys = [ft_key, dg.AssetKey(["lora", "demo", "math"])]  # one multi-asset step
    assert dg.materialize(list(defs_c.assets), resources=defs_c.resources, instance=inst, selection=ft_keys).success
    for k in ft_keys:
        again = inst.get_latest_materialization_event(k).asset_materialization
        assert again.tags["dagster/data_version"] == mats[k.to_user_string()].tags["dagster/data_version"], k
    assert {p.parent.name for p in (tmp_path / "cacheC").glob("*/*/*")} >= {"tiny_llama", "arithmetic"}

    (check,) = res.get_asset_check_evaluations()
    assert check.passed, check.metadata["problems"].value
    assert check.metadata["verified"].value == "size + sha256 of the uploaded stream"


def test_sweep_removes_only_uncommitted_uploads(s3_server, tmp_path):
    bucket = s3_server.bucket()
    store = make_store(s3_server, bucket, tmp_path / "c")
    with stage_files(store, {"a.bin": b"a"}) as (staged, h):
        store.publish(staged, "merged", "m", h)
    committed = store.read_commit("merged", "m", h)["upload"]
    orphan = f"store/merged/m/{h[:16]}/u-19700101T000000-dead/a.bin"  # a killed publisher's leftovers
    s3_server.client().put_object(Bucket=bucket, Key=orphan, Body=b"a")
    assert store.sweep_uploads(older_than_s=3600) == []  # too young: may be an upload in progress
    assert store.sweep_uploads(older_than_s=-1, dry_run=True) == [orphan]
    assert store.sweep_uploads(older_than_s=-1) == [orphan]
    keys = sorted(o["Key"] for o in s3_server.client().list_objects_v2(Bucket=bucket)["Contents"])
    assert keys == sorted([f"store/merged/m/{h[:16]}/{COMMIT_MARKER}", f"store/merged/m/{h[:16]}/{committed}/a.bin"])
    assert make_store(s3_server, bucket, tmp_path / "r").resolve(f"s3://{bucket}/store/merged/m/{h[:16]}").is_dir()
