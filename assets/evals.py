"""``eval/<pipeline>/<name>``: lm-eval tasks run on a model and on the models it is compared with, plus asset checks.

One step (on the GPU pool, like merges, through the ``launcher`` resource: in process, a subprocess or a pod via
Dagster Pipes; the work is :mod:`resources.eval_step`) evaluates the eval's ``model`` and every ``compare_to``
model on the same tasks (fine-tunes and adapters as their base + LoRA, see :func:`assets.merges.split_ref`), writes a report into the
model store (``results.json``, ``README.md``, ``scores.png``) and returns:

* metadata ``results`` = ``{"model": <evaluated node>, "scores": {node: {task: {metric: value}}}}`` (the shape the
  model-card writer reads), a table and a markdown summary (tasks x models), and the plot;
* one ``AssetCheckResult`` per check of the spec (``checks:``, ``thresholds:``, a task's ``threshold:``), with the
  observed value, the bound, the best parent and the reason in its description and metadata. Blocking checks that fail
  stop downstream assets of the same run (e.g. an export or a Hub upload of the evaluated model).

The data version is the content hash of the report directory, whose files are a function of the scores alone
(timings and library versions go to the excluded ``mergeline.json``): the same scores give the same data version.
"""

from dataclasses import asdict

import dagster as dg

from pipelines.spec import EvalCheckSpec, EvalSpec, PipelineSpec
from resources.eval_step import (  # noqa: F401  (the pure helpers live with the step; re-exported here)
    MANIFEST,
    PLOT_FILE,
    REPORT_FILE,
    RESULTS_FILE,
    CheckOutcome,
    CheckRule,
    EvalPlan,
    Scores,
    _fmt,
    eval_models,
    markdown_table,
    rows,
    run_check,
    scores_plot_png,
    summary,
    task_metric,
)
from resources.device import GpuResource
from resources.evaluator import EvaluatorResource
from resources.launcher import StepLauncherResource
from resources.model_store import ModelStoreResource

from .common import BuildContext, dir_content_hash, node_config
from .common import upstream as upstream_of
from .merges import split_ref


# -- graph helpers ----------------------------------------------------------------------------------------------------------


def model_dep_keys(bc: BuildContext, models: list[str]) -> dict[str, tuple[dg.AssetKey, dg.AssetKey | None]]:
    """node -> (asset holding its full weights, asset holding its LoRA or None)."""
    out = {}
    for m in models:
        full, adapter = split_ref(bc.spec, m)
        out[m] = (bc.model_key(full), bc.model_key(adapter) if adapter else None)
    return out


def eval_keys_for_model(bc: BuildContext, model: str) -> list[dg.AssetKey]:
    """Keys of the evals of ``model``: an export/publish asset of ``model`` that lists them as deps is gated by their
    blocking checks."""
    return [bc.key("eval", n) for n, e in bc.spec.evals.items() if e.model == model]


def backend_tasks(spec: PipelineSpec, node: EvalSpec):
    """The spec's tasks as :class:`resources.eval_backend.EvalTask` s (paths resolved) and the include folders."""
    from resources.eval_backend import EvalTask

    tasks = []
    for t in node.task_specs():
        tasks.append(EvalTask(
            name=t.name,
            path=spec.resolve_path(t.path) if t.path else None,
            text_file=spec.resolve_path(t.perplexity) if t.perplexity else None,
            text_field=t.text_field or "text",
        ))
    return tasks, [spec.resolve_path(p) for p in node.include]


def task_files_fingerprint(spec: PipelineSpec, node: EvalSpec) -> dict[str, str]:
    """Content hashes of the local task files (YAMLs, data, text): editing them makes the eval stale."""
    tasks, include = backend_tasks(spec, node)
    paths = [*include, *[t.path for t in tasks if t.path], *[t.text_file for t in tasks if t.text_file]]
    out = {}
    for p in paths:
        if p.exists():
            out[str(p.relative_to(spec.base_dir)) if p.is_relative_to(spec.base_dir) else str(p)] = \
                dir_content_hash(p)[0]
    return out


# -- the asset -------------------------------------------------------------------------------------------------------


def build_eval_asset(bc: BuildContext, name: str, node: EvalSpec) -> dg.AssetsDefinition:
    spec = bc.spec
    key = bc.key("eval", name)
    models = eval_models(node)
    parts = model_dep_keys(bc, models)
    dep_keys = list(dict.fromkeys(k for full, ad in parts.values() for k in (full, ad) if k is not None))
    checks = node.all_checks()
    check_specs = [
        dg.AssetCheckSpec(
            c.check_name(), asset=key, blocking=c.blocking,
            description=c.description or _check_text(c, node),
        ) for c in checks
    ]
    cfg = node_config(node)
    cfg["task_files_sha256"] = task_files_fingerprint(spec, node)
    desc = (f"Eval '{name}': lm-eval tasks {', '.join(f'`{t}`' for t in node.task_names())} on `{node.model}`"
            + (f", compared with {', '.join(f'`{m}`' for m in node.compare_to)}" if node.compare_to else "") + ".")
    plan = EvalPlan.of(node)
    rules = [CheckRule.of(c) for c in checks]

    @dg.asset(
        key=key,
        deps=dep_keys,
        group_name=bc.group,
        description=bc.description(node, desc),
        kinds={"mergeline", "lm-eval"},
        owners=bc.owners(node) or None,
        tags=bc.tags(node, "eval"),
        code_version=bc.code_version("eval", cfg, node),
        pool=bc.gpu_pool,
        op_tags=bc.gpu_op_tags or None,
        check_specs=check_specs or None,
    )
    def _eval(context: dg.AssetExecutionContext, evaluator: EvaluatorResource, model_store: ModelStoreResource,
              launcher: StepLauncherResource, gpu: GpuResource) -> dg.MaterializeResult:
        # thin: the inputs' store references (no download) go to the launcher, which runs resources/eval_step.py
        # here, in a subprocess or in a GPU pod (Dagster Pipes); check results come back with the materialization
        ups = {k: upstream_of(context, k, fetch=False) for k in dep_keys}
        tasks, include = backend_tasks(spec, node)
        request = {
            "name": name,
            "plan": asdict(plan),
            "checks": [asdict(r) for r in rules],
            "tasks": [{"name": t.name, "path": str(t.path) if t.path else None,
                       "text_file": str(t.text_file) if t.text_file else None, "text_field": t.text_field}
                      for t in tasks],
            "include": [str(p) for p in include],
            "parts": {m: {"model": ups[full].ref, "adapter": ups[ad].ref if ad else None}
                      for m, (full, ad) in parts.items()},
            "inputs": {k.to_user_string(): u.data_version for k, u in ups.items()},
            "node_config": cfg,
            "options": evaluator.request_options(batch_size=node.batch_size, limit=node.limit,
                                                 add_bos_token=node.add_bos_token, num_fewshot=node.num_fewshot),
        }
        # gpu: the pod's GPU request in k8s mode (the evaluator's device decides where lm-eval runs)
        return launcher.run(context, "eval", request, model_store=model_store, gpu=gpu)

    return _eval


def _check_text(c: EvalCheckSpec, node: EvalSpec) -> str:
    metric = c.metric or node.task_metric(c.task) or "its first metric"
    parts = []
    if c.min is not None:
        parts.append(f">= {c.min:g}")
    if c.max is not None:
        parts.append(f"<= {c.max:g}")
    if c.min_ratio_of_best_parent is not None:
        parts.append(f">= {c.min_ratio_of_best_parent:g} x the best compared model")
    if c.max_ratio_of_best_parent is not None:
        parts.append(f"<= {c.max_ratio_of_best_parent:g} x the best (lowest) compared model")
    return (f"`{node.model}` {metric} on {c.task} {' and '.join(parts)}"
            + (" (blocking: a failure skips downstream assets)" if c.blocking else " (warning only)"))
