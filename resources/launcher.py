"""Where the heavy part of a step runs: in the Dagster step process (default), in a local subprocess through Dagster
Pipes (``PipesSubprocessClient``), or in its own Kubernetes pod through Pipes (``PipesK8sClient``, with the GPU
request, node selector and tolerations of the ``gpu`` resource).

The choice is configuration (``launcher: {mode: ...}`` / ``MERGELINE_LAUNCHER``), not code: the asset builds a JSON
request and calls :meth:`StepLauncherResource.run`; every mode runs the same registered step function
(:mod:`resources.pipes_steps`), so artifacts, data versions, metadata and check results are the same.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Literal

import dagster as dg
from pydantic import Field

from .device import GpuResource
from .model_store import ModelStoreResource

ENTRY_MODULE = "resources.pipes_entry"
#: the directory holding the ``resources`` package (put on the subprocess's PYTHONPATH)
CODE_ROOT = Path(__file__).resolve().parent.parent


def to_dagster_metadata(raw: dict[str, dict[str, Any]]) -> dict[str, dg.MetadataValue]:
    """Pipes wire-format metadata → Dagster values, with the converter Dagster itself applies to Pipes messages."""
    from dagster._core.definitions.metadata.external_metadata import metadata_map_from_external

    return dict(metadata_map_from_external(raw))


class StepLauncherResource(dg.ConfigurableResource):
    """How GPU-bound steps (merges; more step kinds can be registered) execute."""

    mode: Literal["in_process", "subprocess", "k8s"] = Field(
        "in_process", description="in_process (laptop default), subprocess (Pipes, local) or k8s (Pipes, one pod per "
                                  "step)")
    python: str | None = Field(None, description="subprocess mode: interpreter running the entry point (default: "
                                                 "this one)")
    env: dict[str, str] = Field(default_factory=dict, description="extra environment of the external process (no "
                                                                   "secrets: use k8s_env_from_secrets)")
    k8s_image: str | None = Field(None, description="k8s mode: image with mergeline + dagster-pipes + ML libraries")
    k8s_namespace: str | None = Field(None, description="k8s mode: namespace (default: the current one)")
    k8s_python: str = Field("python", description="k8s mode: interpreter inside the image")
    k8s_service_account: str | None = Field(None, description="k8s mode: service account (e.g. with an IAM role for "
                                                              "the S3 store)")
    k8s_image_pull_policy: str | None = Field(None, description="k8s mode: IfNotPresent, Always, …")
    k8s_env_from_secrets: list[str] = Field(default_factory=list, description="k8s mode: secrets exposed as "
                                                                              "environment (AWS keys, HF token)")
    k8s_resources: dict[str, dict[str, str]] = Field(
        default_factory=dict, description="k8s mode: extra container requests/limits, e.g. {requests: {memory: 32Gi}}")
    k8s_labels: dict[str, str] = Field(default_factory=dict, description="k8s mode: pod labels")
    k8s_cache_dir: str = Field("/tmp/mergeline-cache", description="k8s mode: the pod's cache of fetched S3 artifacts")
    k8s_load_incluster_config: bool | None = Field(None, description="k8s mode: None = detect")
    k8s_kubeconfig_file: str | None = None
    k8s_context: str | None = None
    k8s_poll_interval: float = Field(5.0, description="k8s mode: seconds between pod status polls")
    k8s_pod_wait_timeout: float = Field(24 * 3600.0, description="k8s mode: give up on a pod after this many seconds")

    # -- what the external process gets ------------------------------------------------------------------------------
    def command(self) -> list[str]:
        py = self.k8s_python if self.mode == "k8s" else (self.python or sys.executable)
        return [py, "-m", ENTRY_MODULE]

    def store_config(self, model_store: ModelStoreResource) -> dict[str, Any]:
        cfg = model_store.client_config()
        if self.mode == "k8s" and cfg.get("cache_dir"):
            cfg["cache_dir"] = self.k8s_cache_dir
        return cfg

    def extras(self, step: str, request: dict[str, Any], model_store: ModelStoreResource) -> dict[str, Any]:
        return {"mergeline_step": step, "mergeline_request": request,
                "mergeline_store": self.store_config(model_store)}

    def k8s_pod_args(self, gpu: GpuResource | None = None) -> dict[str, Any]:
        """The ``PipesK8sClient.run`` arguments (image, command, env, namespace, pod meta and spec) of a step pod; the
        GPU request, node selector and tolerations come from the ``gpu`` resource."""
        if not self.k8s_image:
            raise dg.Failure("launcher: mode 'k8s' needs k8s_image (an image with mergeline, dagster-pipes and the ML "
                             "libraries)", allow_retries=False)
        gpu = gpu or GpuResource()
        limits: dict[str, str] = dict(self.k8s_resources.get("limits", {}))
        requests: dict[str, str] = dict(self.k8s_resources.get("requests", {}))
        if gpu.k8s_gpus > 0:
            limits[gpu.k8s_gpu_resource] = str(gpu.k8s_gpus)
            requests[gpu.k8s_gpu_resource] = str(gpu.k8s_gpus)
        container: dict[str, Any] = {}
        if limits or requests:
            container["resources"] = {k: v for k, v in (("limits", limits), ("requests", requests)) if v}
        if self.k8s_env_from_secrets:
            container["env_from"] = [{"secret_ref": {"name": s}} for s in self.k8s_env_from_secrets]
        if self.k8s_image_pull_policy:
            container["image_pull_policy"] = self.k8s_image_pull_policy
        spec: dict[str, Any] = {"containers": [container], "restart_policy": "Never"}
        if gpu.k8s_gpus > 0 and gpu.k8s_node_selector:
            spec["node_selector"] = dict(gpu.k8s_node_selector)
        if gpu.k8s_gpus > 0 and gpu.k8s_tolerations:
            spec["tolerations"] = [dict(t) for t in gpu.k8s_tolerations]
        if self.k8s_service_account:
            spec["service_account_name"] = self.k8s_service_account
        env = {"MERGELINE_DEVICE": gpu.device, **self.env}
        return {"image": self.k8s_image, "command": self.command(), "env": env, "namespace": self.k8s_namespace,
                "base_pod_meta": {"labels": {"app.kubernetes.io/part-of": "mergeline", **self.k8s_labels}},
                "base_pod_spec": spec}

    def k8s_client(self):
        from dagster_k8s import PipesK8sClient

        return PipesK8sClient(load_incluster_config=self.k8s_load_incluster_config,
                              kubeconfig_file=self.k8s_kubeconfig_file, kube_context=self.k8s_context,
                              poll_interval=self.k8s_poll_interval)

    # -- running -----------------------------------------------------------------------------------------------------
    def run(self, context: dg.AssetExecutionContext, step: str, request: dict[str, Any], *,
            model_store: ModelStoreResource, gpu: GpuResource | None = None) -> dg.MaterializeResult:
        """Run step ``step`` on ``request`` and return its result for the asset (metadata, data version, checks).
        Bad input fails the step without retries in every mode."""
        results = self.run_all(context, step, request, model_store=model_store, gpu=gpu)
        if len(results) != 1:
            raise dg.Failure(f"launcher: step '{step}' reported {len(results)} materializations, expected 1")
        return results[0]

    def run_all(self, context: dg.AssetExecutionContext, step: str, request: dict[str, Any], *,
                model_store: ModelStoreResource, gpu: GpuResource | None = None) -> list[dg.MaterializeResult]:
        """Like :meth:`run` for steps that materialize several assets (a multi-asset yields each result)."""
        if self.mode == "in_process":
            return self._in_process(context, step, request, model_store)
        extras = self.extras(step, request, model_store)
        if self.mode == "subprocess":
            from dagster import PipesSubprocessClient

            path = os.pathsep.join([str(CODE_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
            client = PipesSubprocessClient(env={"PYTHONPATH": path, **self.env})
            invocation = client.run(context=context, command=self.command(), extras=extras)
        else:
            if not model_store.is_remote:
                context.log.warning("launcher: k8s mode with a local model store: every pod must mount the store "
                                    f"at {model_store.root_path}; an s3:// store needs no shared volume")
            args = self.k8s_pod_args(gpu)
            invocation = self.k8s_client().run(context=context, extras=extras,
                                               pod_wait_timeout=self.k8s_pod_wait_timeout, **args)
        return self._collect(invocation)

    def _in_process(self, context, step: str, request: dict[str, Any],
                    model_store: ModelStoreResource) -> list[dg.MaterializeResult]:
        from .pipes_steps import StepInputError, run_step

        try:
            out = run_step(step, request, model_store.store, log=context.log.info)
        except StepInputError as e:
            raise dg.Failure(str(e), allow_retries=False) from None
        results = []
        for o in out.all():
            key = dg.AssetKey.from_user_string(o.asset_key) if o.asset_key else None
            checks = [dg.AssetCheckResult(check_name=c.name, passed=c.passed,
                                          severity=dg.AssetCheckSeverity(c.severity),
                                          metadata=to_dagster_metadata(c.metadata), asset_key=key,
                                          description=c.description)
                      for c in o.checks]
            results.append(dg.MaterializeResult(asset_key=key, metadata=to_dagster_metadata(o.metadata),
                                                data_version=dg.DataVersion(o.data_version),
                                                check_results=checks or None))
        return results

    @staticmethod
    def _collect(invocation) -> list[dg.MaterializeResult]:
        for m in invocation.get_custom_messages():
            if isinstance(m, dict) and m.get("mergeline_error"):
                raise dg.Failure(str(m.get("message")), allow_retries=False)
        results = list(invocation.get_results())
        mats = [r for r in results if isinstance(r, dg.MaterializeResult)]
        if not mats:
            raise dg.Failure("launcher: the external step reported 0 materializations")
        out = []
        for m in mats:
            checks = [_with_description(r) for r in results if isinstance(r, dg.AssetCheckResult)
                      and (len(mats) == 1 or r.asset_key == m.asset_key)]
            out.append(dg.MaterializeResult(asset_key=m.asset_key, metadata=m.metadata, data_version=m.data_version,
                                            check_results=checks or None))
        return out


def _with_description(r: dg.AssetCheckResult) -> dg.AssetCheckResult:
    """A check result from Pipes with its description moved back out of the reserved metadata key (Pipes'
    ``report_asset_check`` has no description field)."""
    from .pipes_steps import CHECK_DESCRIPTION_KEY

    if CHECK_DESCRIPTION_KEY not in (r.metadata or {}):
        return r
    meta = dict(r.metadata)
    desc = meta.pop(CHECK_DESCRIPTION_KEY)
    return dg.AssetCheckResult(check_name=r.check_name, passed=r.passed, severity=r.severity, metadata=meta,
                               asset_key=r.asset_key, description=str(getattr(desc, "value", desc)))
