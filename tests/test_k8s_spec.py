"""The Kubernetes launcher without a cluster: the pod ``PipesK8sClient`` would submit (GPU request, node selector,
tolerations, image, command, env), built by dagster-k8s's own ``build_pod_body``; and a merge materialized through
the real ``PipesK8sClient`` against a stand-in Kubernetes API that runs the submitted container locally."""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest

from resources.device import GpuResource
from resources.launcher import StepLauncherResource

REPO = Path(__file__).resolve().parent.parent
TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}


def gpu_and_launcher() -> tuple[GpuResource, StepLauncherResource]:
    gpu = GpuResource(device="cuda", k8s_gpus=2, k8s_node_selector={"cloud.google.com/gke-accelerator": "nvidia-h100"},
                      k8s_tolerations=[TOLERATION])
    launcher = StepLauncherResource(mode="k8s", k8s_image="registry.example.com/mergeline:1.2.3",
                                    k8s_namespace="ml", k8s_service_account="mergeline-steps",
                                    k8s_env_from_secrets=["mergeline-s3", "hf-token"],
                                    k8s_resources={"requests": {"memory": "48Gi", "cpu": "8"}},
                                    k8s_image_pull_policy="IfNotPresent", env={"HF_HUB_OFFLINE": "1"})
    return gpu, launcher


def test_pod_spec_requests_the_gpu_and_runs_the_entry_point():
    from dagster_k8s.pipes import build_pod_body

    gpu, launcher = gpu_and_launcher()
    args = launcher.k8s_pod_args(gpu)
    bootstrap = {"DAGSTER_PIPES_CONTEXT": "ctx", "DAGSTER_PIPES_MESSAGES": "msgs"}  # what open_pipes_session adds
    pod = build_pod_body(pod_name="dagster-abc-merge", image=args["image"], command=args["command"],
                         env_vars={**bootstrap, **args["env"]}, base_pod_meta=args["base_pod_meta"],
                         base_pod_spec=args["base_pod_spec"])
    (c,) = pod.spec.containers
    assert c.image == "registry.example.com/mergeline:1.2.3"
    assert c.command == ["python", "-m", "resources.pipes_entry"]
    assert c.resources.limits == {"nvidia.com/gpu": "2"}
    assert c.resources.requests == {"nvidia.com/gpu": "2", "memory": "48Gi", "cpu": "8"}
    env = {e.name: e.value for e in c.env}
    assert env == {"DAGSTER_PIPES_CONTEXT": "ctx", "DAGSTER_PIPES_MESSAGES": "msgs", "MERGELINE_DEVICE": "cuda",
                   "HF_HUB_OFFLINE": "1"}
    assert [e.secret_ref.name for e in c.env_from] == ["mergeline-s3", "hf-token"]
    assert c.image_pull_policy == "IfNotPresent"
    assert pod.spec.node_selector == {"cloud.google.com/gke-accelerator": "nvidia-h100"}
    assert [(t.key, t.operator, t.effect) for t in pod.spec.tolerations] == [("nvidia.com/gpu", "Exists", "NoSchedule")]
    assert pod.spec.restart_policy == "Never" and pod.spec.service_account_name == "mergeline-steps"
    assert pod.metadata.labels["app.kubernetes.io/part-of"] == "mergeline"
    assert args["namespace"] == "ml"

    # the same GPU resource also yields the dagster-k8s/config op tag used by the k8s run launcher / executor
    tag = gpu.op_tags()["dagster-k8s/config"]
    assert tag["container_config"]["resources"]["limits"] == {"nvidia.com/gpu": "2"}
    assert tag["pod_spec_config"] == {"node_selector": {"cloud.google.com/gke-accelerator": "nvidia-h100"},
                                      "tolerations": [TOLERATION]}

    # CPU pods (k8s_gpus = 0) request no GPU and land on any node
    cpu_args = launcher.k8s_pod_args(GpuResource(device="cpu"))
    assert cpu_args["base_pod_spec"]["containers"][0]["resources"] == {"requests": {"memory": "48Gi", "cpu": "8"}}
    assert "node_selector" not in cpu_args["base_pod_spec"] and "tolerations" not in cpu_args["base_pod_spec"]
    with pytest.raises(dg.Failure, match="needs k8s_image"):
        StepLauncherResource(mode="k8s").k8s_pod_args(gpu)


class FakeKubernetes:
    """The parts of the Kubernetes API ``PipesK8sClient`` calls. Creating a pod runs its first container's command
    here (the image's ``python`` is this interpreter) with exactly the pod's environment plus PATH/PYTHONPATH; its
    output becomes the pod log, with kubelet-style timestamps."""

    def __init__(self, extra_env: dict[str, str], secrets: dict[str, dict[str, str]] | None = None):
        self.secrets = secrets or {}
        self.pods: list = []
        self.deleted: list[str] = []
        self.extra_env = extra_env
        self.log_lines: list[str] = []
        self.returncode = None
        self.core_api = self

    # DagsterKubernetesClient
    def wait_for_pod(self, pod_name, namespace, **kw):
        if self.returncode not in (None, 0):
            raise RuntimeError(f"pod {pod_name} failed with exit code {self.returncode}")

    # CoreV1Api
    def create_namespaced_pod(self, namespace, body):
        self.pods.append((namespace, body))
        c = body.spec.containers[0]
        cmd = [sys.executable if c.command[0] == "python" else c.command[0], *c.command[1:]]
        from_secrets = {k: v for ref in (c.env_from or []) for k, v in self.secrets[ref.secret_ref.name].items()}
        env = {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/tmp"),
               "PYTHONPATH": str(REPO), **self.extra_env, **from_secrets, **{e.name: e.value for e in c.env}}
        p = subprocess.run(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           timeout=300)
        self.returncode = p.returncode
        self.log_lines = p.stdout.splitlines()

    def read_namespaced_pod_log(self, name, namespace, **kw):
        t0 = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
        return iter([f"{(t0 + dt.timedelta(microseconds=i)).strftime('%Y-%m-%dT%H:%M:%S.%fZ')} {line}\n".encode()
                     for i, line in enumerate(self.log_lines)])

    def delete_namespaced_pod(self, name, namespace):
        self.deleted.append(name)


@pytest.mark.heavy
def test_merge_through_the_k8s_launcher_against_a_stand_in_cluster(tmp_path, monkeypatch, s3_server):
    """The real PipesK8sClient submits the pod; the stand-in API runs it as a process that shares nothing with the
    orchestrator but the S3 bucket (its own cache dir, credentials only from the pod's secret)."""
    import dagster_k8s.pipes as k8s_pipes

    from pipelines.builder import build_definitions
    from pipelines.spec import parse_pipeline
    from pipelines.toy_models import save_lora_adapter, save_tiny_llama
    from resources.model_store import ModelStoreResource
    from tests.s3_server import CREDENTIALS

    base = save_tiny_llama(tmp_path / "models" / "base", seed=0, hidden=32, vocab=128)
    save_lora_adapter(base, tmp_path / "adapters" / "chat", seed=1, r=4, alpha=8)
    spec = parse_pipeline({
        "name": "k8s", "base_models": {"base": {"path": "models/base"}},
        "adapters": {"chat": {"path": "adapters/chat", "base": "base"}},
        "merges": {"m": {"method": "task_arithmetic", "base_model": "base",
                         "models": [{"model": "chat", "parameters": {"weight": 0.5}}]}},
    }, base_dir=tmp_path)
    fake = FakeKubernetes({"OMP_NUM_THREADS": "1", "MERGELINE_CACHE": str(tmp_path / "engine-cache")},
                          secrets={"mergeline-s3": dict(CREDENTIALS)})
    monkeypatch.setattr(k8s_pipes.PipesK8sClient, "_load_k8s_config", lambda self: None)
    monkeypatch.setattr(k8s_pipes.DagsterKubernetesClient, "production_client", staticmethod(lambda *a, **k: fake))
    gpu = GpuResource(device="cpu", k8s_gpus=1, k8s_tolerations=[TOLERATION])
    launcher = StepLauncherResource(mode="k8s", k8s_image="mergeline:test", k8s_namespace="ml", k8s_poll_interval=0.1,
                                    k8s_env_from_secrets=["mergeline-s3"], k8s_cache_dir=str(tmp_path / "pod-cache"))
    bucket = s3_server.bucket()
    store = ModelStoreResource(root=f"s3://{bucket}/ml", cache_dir=str(tmp_path / "orchestrator-cache"),
                               **s3_server.store_kwargs())
    defs = build_definitions(spec, resources={"model_store": store, "gpu": gpu, "launcher": launcher})
    inst = dg.DagsterInstance.ephemeral()
    res = dg.materialize(list(defs.assets), resources=defs.resources, instance=inst)
    assert res.success

    (namespace, pod), = fake.pods
    c = pod.spec.containers[0]
    assert namespace == "ml" and c.image == "mergeline:test" and c.resources.limits == {"nvidia.com/gpu": "1"}
    assert not any(e.name.startswith("AWS_") for e in c.env)  # credentials come from the secret, not the spec
    assert fake.deleted == [pod.metadata.name]
    for k in (("base_model", "k8s", "base"), ("lora", "k8s", "chat")):  # local inputs were copied into the bucket
        m = inst.get_latest_materialization_event(dg.AssetKey(list(k))).asset_materialization
        assert m.metadata["path"].value.startswith(f"s3://{bucket}/ml/{k[0]}/{k[2]}/")
    mat = inst.get_latest_materialization_event(dg.AssetKey(["merged", "k8s", "m"])).asset_materialization
    dv = mat.tags["dagster/data_version"]
    assert mat.metadata["path"].value == f"s3://{bucket}/ml/merged/m/{dv[:16]}"
    assert mat.metadata["device"].value.startswith("cpu") and mat.metadata["tensors"].value > 0
    # the pod fetched its inputs into its own cache and published from there; the orchestrator fetched nothing
    assert sorted(p.relative_to(tmp_path / "pod-cache").as_posix()
                  for p in (tmp_path / "pod-cache").glob("*/*/*")) == sorted(
        [f"base_model/base/{inst.get_latest_materialization_event(dg.AssetKey(['base_model', 'k8s', 'base'])).asset_materialization.tags['dagster/data_version'][:16]}",
         f"lora/chat/{inst.get_latest_materialization_event(dg.AssetKey(['lora', 'k8s', 'chat'])).asset_materialization.tags['dagster/data_version'][:16]}",
         f"merged/m/{dv[:16]}"])
    assert not (tmp_path / "orchestrator-cache" / "merged").exists()
    (check,) = res.get_asset_check_evaluations()
    assert check.passed and check.metadata["verified"].value == "size + sha256 of the uploaded stream"

    # the same merge in process on a local store (base and adapter used in place): the same weights, byte for byte
    # (the data version differs: the model card names the inputs' paths, in place here, in the cache above)
    store2 = ModelStoreResource(root=str(tmp_path / "store2"))
    defs2 = build_definitions(spec, resources={"model_store": store2, "gpu": GpuResource(device="cpu")})
    inst2 = dg.DagsterInstance.ephemeral()
    assert dg.materialize(list(defs2.assets), resources=defs2.resources, instance=inst2).success
    mat2 = inst2.get_latest_materialization_event(dg.AssetKey(["merged", "k8s", "m"])).asset_materialization
    assert mat2.metadata["output_shards"].value == mat.metadata["output_shards"].value


# -- the shipped production configuration ------------------------------------------------------------------------------

PROD = REPO / "pipelines" / "examples" / "production"


def test_production_dagster_yaml_validates_against_dagster_schemas(tmp_path, monkeypatch):
    import shutil

    import yaml
    from dagster._config import process_config
    from dagster._core.instance.config import dagster_instance_config
    from dagster_aws.s3.compute_log_manager import S3ComputeLogManager
    from dagster_k8s import K8sRunLauncher
    from dagster_postgres import DagsterPostgresStorage

    for var in ("DAGSTER_PG_HOST", "DAGSTER_PG_USER", "DAGSTER_PG_PASSWORD", "DAGSTER_PG_DB", "MERGELINE_LOG_BUCKET"):
        monkeypatch.setenv(var, "x")
    shutil.copy(PROD / "dagster.yaml", tmp_path / "dagster.yaml")
    cfg, _ = dagster_instance_config(str(tmp_path))  # the instance schema (raises on unknown or mistyped keys)
    raw = yaml.safe_load((PROD / "dagster.yaml").read_text())
    for cls, section in ((DagsterPostgresStorage, raw["storage"]["postgres"]),
                         (K8sRunLauncher, raw["run_launcher"]["config"]),
                         (S3ComputeLogManager, raw["compute_logs"]["config"])):
        result = process_config(cls.config_type(), section)
        assert result.success, (cls.__name__, result.errors)
    assert raw["run_launcher"]["class"] == "K8sRunLauncher" and cfg["concurrency"]["pools"]["default_limit"] == 1
    helm = yaml.safe_load((PROD / "helm-values.yaml").read_text())
    assert helm["runLauncher"]["type"] == "K8sRunLauncher" and helm["concurrency"]["pools"]["defaultLimit"] == 1
    assert helm["postgresql"]["enabled"] is False


def test_production_resources_and_manifests_load():
    import yaml
    from dagster_k8s.models import k8s_model_from_dict, k8s_snake_case_dict
    from kubernetes import client as k8s

    from resources.config_file import resources_from_yaml
    from resources.model_store import ModelStoreResource

    res = resources_from_yaml(PROD / "resources.yaml")
    assert isinstance(res["model_store"], ModelStoreResource) and res["model_store"].is_remote
    assert res["launcher"].mode == "k8s" and res["gpu"].k8s_gpus == 1
    spec = res["launcher"].k8s_pod_args(res["gpu"])["base_pod_spec"]
    assert spec["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert spec["tolerations"] == [TOLERATION] and spec["service_account_name"] == "mergeline-steps"
    alt = resources_from_yaml(PROD / "resources-k8s-executor.yaml")
    assert alt["launcher"].mode == "in_process" and alt["gpu"].op_tags()["dagster-k8s/config"]
    kinds = {"ServiceAccount": k8s.V1ServiceAccount, "Role": k8s.V1Role, "RoleBinding": k8s.V1RoleBinding,
             "Secret": k8s.V1Secret}
    for f in sorted((PROD / "k8s").glob("*.yaml")):
        for doc in yaml.safe_load_all(f.read_text()):
            cls = kinds[doc["kind"]]
            model = k8s_model_from_dict(cls, k8s_snake_case_dict(cls, doc))  # strict: unknown keys raise
            assert model.metadata.namespace == "mergeline"
            if doc["kind"] == "Secret":
                assert all(v.startswith("<") or v == "eu-west-1" for v in doc["stringData"].values())


def test_resources_file_errors_name_the_key(tmp_path):
    from resources.config_file import resources_from_yaml

    f = tmp_path / "r.yaml"
    f.write_text("launcher: {mode: k8s, k8s_imag: x}\n")
    with pytest.raises(ValueError, match=r"launcher: unknown field\(s\) k8s_imag"):
        resources_from_yaml(f)
    f.write_text("gpus: {}\n")
    with pytest.raises(ValueError, match="unknown resource 'gpus'"):
        resources_from_yaml(f)
    f.write_text("launcher: {mode: ssh}\n")
    with pytest.raises(ValueError, match="launcher.mode: Input should be .in_process., .subprocess. or .k8s."):
        resources_from_yaml(f)


def test_production_code_location_loads_with_both_executors(monkeypatch):
    import importlib
    import runpy

    import pipelines.definitions as shipped

    monkeypatch.setenv("MERGELINE_RESOURCES", str(PROD / "resources.yaml"))
    monkeypatch.setenv("MERGELINE_PIPELINES", str(REPO / "pipelines" / "examples" / "demo" / "pipeline.yaml"))
    out = {}
    try:
        importlib.reload(shipped)  # the production file imports its defs, built from the environment above
        for ex in ("multiprocess", "k8s"):
            monkeypatch.setenv("MERGELINE_EXECUTOR", ex)
            defs = runpy.run_path(str(PROD / "definitions.py"))["defs"]
            dg.Definitions.validate_loadable(defs)
            out[ex] = {"executor": defs.resolve_job_def("demo__all").executor_def.name,
                       "launcher": defs.resources["launcher"].mode, "store": defs.resources["model_store"].root}
        monkeypatch.setenv("MERGELINE_EXECUTOR", "ssh")
        with pytest.raises(ValueError, match="expected multiprocess or k8s"):
            runpy.run_path(str(PROD / "definitions.py"))
    finally:
        monkeypatch.undo()
        importlib.reload(shipped)
    assert out["multiprocess"]["executor"] == "multi_or_in_process_executor"
    assert out["k8s"]["executor"] == "k8s"
    assert out["k8s"]["launcher"] == "k8s" and out["k8s"]["store"] == "s3://acme-ml-artifacts/mergeline"
