"""mergeline as Dagster Components: write a pipeline as a ``defs.yaml`` inside your own Dagster project.

.. code-block:: yaml

    # defs/mergeline_resources/defs.yaml  -- once per code location (binds gpu, model_store, hub, trainer)
    type: pipelines.component.MergelineResources
    attributes:
      store_root: /data/mergeline-store
      device: auto

    # defs/my_merge/defs.yaml  -- one per pipeline; the attributes are the pipeline YAML itself ...
    type: pipelines.component.MergelinePipeline
    attributes:
      name: my_merge
      base_models: {base: {hub: meta-llama/Llama-3.2-1B, revision: 4e20de362430cd3b72f300e6b0f18e50e7166e08}}
      ...

    # ... or point at a pipeline file (relative to the defs.yaml folder)
    type: pipelines.component.MergelinePipeline
    attributes:
      pipeline_file: pipeline.yaml

Both components are registered for ``dg list components`` through the ``dagster_dg_cli.registry_modules`` entry
point (this module). ``MergelinePipeline`` builds its definitions with :func:`pipelines.builder.build_pipeline_defs`,
the same code path as ``build_definitions`` and the shipped code location, and binds no resources: two components
binding the same resource key would not load, so resources come from one ``MergelineResources`` per code location.

Pipeline sections are taken verbatim (no Jinja templating: Dagster's native templating would turn ``"2"`` into ``2``);
``code_version`` is coerced to a string by a resolver with ``inject_before_resolve=False`` (no templating).
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Optional

import dagster as dg

from pipelines.spec import PipelineSpecError, parse_pipeline, read_yaml

SECTION_FIELDS = ("base_models", "datasets", "finetunes", "adapters", "merges", "exports", "evals", "schedules")


def _as_str(context: dg.ResolutionContext, value: Any) -> Optional[str]:
    """Code versions must stay strings (YAML/Jinja turn "2" into 2)."""
    return None if value is None else str(value)


def _raw(context: dg.ResolutionContext, value: Any) -> Any:
    return value


CodeVersion = Annotated[
    Optional[str],
    dg.Resolver(_as_str, inject_before_resolve=False, model_field_type=Optional[str | int | float],
                description="prepended to every asset's code version; bump it to mark all assets stale"),
]
Section = Annotated[
    Optional[dict[str, Any]],
    dg.Resolver(_raw, inject_before_resolve=False, model_field_type=Optional[dict[str, Any]],
                description="a pipeline section, exactly as in a pipeline YAML file"),
]


@dataclass
class MergelinePipeline(dg.Component, dg.Resolvable):
    """A mergeline pipeline (base models → datasets → fine-tunes → LoRA checkpoints → merges) as Dagster assets.

    Give the pipeline inline (``name`` plus sections) or as ``pipeline_file`` (relative to this ``defs.yaml``)."""

    pipeline_file: Optional[str] = None
    name: Optional[str] = None
    description: Optional[str] = None
    owners: Annotated[Optional[list[str]], dg.Resolver(_raw, inject_before_resolve=False,
                                                       model_field_type=Optional[list[str]])] = None
    tags: Section = None
    code_version: CodeVersion = None
    base_models: Section = None
    datasets: Section = None
    finetunes: Section = None
    adapters: Section = None
    merges: Section = None
    exports: Section = None
    evals: Section = None
    schedules: Section = None
    gpu_pool: str = "gpu"
    k8s_gpus: int = 0

    def spec_data(self, base_dir: Path) -> tuple[dict[str, Any], str, Path]:
        """(pipeline mapping, source label, folder that relative paths start from)."""
        inline = {k: getattr(self, k) for k in ("name", "description", "owners", "tags", *SECTION_FIELDS)
                  if getattr(self, k) is not None}
        if self.pipeline_file:
            if inline:
                raise PipelineSpecError([f"pipeline_file: give either 'pipeline_file' or an inline pipeline, not both "
                                         f"(inline keys: {', '.join(inline)})"], str(base_dir / "defs.yaml"))
            path = Path(self.pipeline_file)
            path = path if path.is_absolute() else base_dir / path
            return read_yaml(path), str(path), path.absolute().parent
        if "name" not in inline:
            raise PipelineSpecError(["name: required key is missing (or give 'pipeline_file')"],
                                    str(base_dir / "defs.yaml"))
        return inline, str(base_dir / "defs.yaml"), base_dir

    def build_spec(self, base_dir: Path):
        data, source, root = self.spec_data(base_dir)
        return parse_pipeline(data, source=source, base_dir=root)

    def build_defs(self, context: dg.ComponentLoadContext) -> dg.Definitions:
        from pipelines.builder import build_pipeline_defs
        from resources.device import GpuResource

        base_dir = context.path if context.path.is_dir() else context.path.parent
        spec = self.build_spec(base_dir)
        return build_pipeline_defs(spec, gpu=GpuResource(pool=self.gpu_pool, k8s_gpus=self.k8s_gpus),
                                   code_version=self.code_version)


@dataclass
class MergelineResources(dg.Component, dg.Resolvable):
    """Binds mergeline's resources (``gpu``, ``model_store``, ``hub``, ``trainer``) once for the code location."""

    store_root: Optional[str] = None
    device: str = "auto"
    dtype: Optional[str] = None
    memory_budget: Optional[str] = None
    gpu_pool: str = "gpu"
    k8s_gpus: int = 0
    hub_token_env_var: str = "HF_TOKEN"
    hub_endpoint: Optional[str] = None
    hub_offline: bool = False
    train_backend: str = "auto"
    eval_batch_size: Optional[int] = None
    eval_limit: Optional[int] = None
    eval_include_defaults: bool = False
    #: StepLauncherResource fields, e.g. {mode: k8s, k8s_image: ...} (resources/launcher.py)
    launcher: Optional[dict[str, Any]] = None
    #: extra ModelStoreResource fields for an s3:// store_root: cache_dir, s3_endpoint_url, s3_region, …
    store_options: Optional[dict[str, Any]] = None

    def build_defs(self, context: dg.ComponentLoadContext) -> dg.Definitions:
        from resources.bundle import default_resources
        from resources.launcher import StepLauncherResource
        from resources.device import GpuResource
        from resources.hub import HubResource
        from resources.model_store import ModelStoreResource
        from resources.trainer import TrainerResource

        return dg.Definitions(resources=default_resources(
            gpu=GpuResource(device=self.device, dtype=self.dtype, memory_budget=self.memory_budget,
                            pool=self.gpu_pool, k8s_gpus=self.k8s_gpus),
            model_store=ModelStoreResource(root=self.store_root, **(self.store_options or {})),
            hub=HubResource(token_env_var=self.hub_token_env_var, endpoint=self.hub_endpoint,
                            offline=self.hub_offline),
            trainer=TrainerResource(backend=self.train_backend),
            evaluator=self._evaluator(),
            **({"launcher": StepLauncherResource(**self.launcher)} if self.launcher else {}),
        ))

    def _evaluator(self):
        from resources.evaluator import EvaluatorResource

        return EvaluatorResource(device=self.device, batch_size=self.eval_batch_size, limit=self.eval_limit,
                                 include_defaults=self.eval_include_defaults)


__all__ = ["MergelinePipeline", "MergelineResources"]
