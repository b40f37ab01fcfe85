"""``eval/<pipeline>/<name>``: lm-eval tasks run on a model and on the models it is compared with, plus asset checks.

One step (on the GPU pool, like merges) evaluates the eval's ``model`` and every ``compare_to`` model on the same
tasks (fine-tunes and adapters as their base + LoRA, see :func:`assets.merges.split_ref`), writes a report into the
model store (``results.json``, ``README.md``, ``scores.png``) and returns:

* metadata ``results`` = ``{"model": <evaluated node>, "scores": {node: {task: {metric: value}}}}`` (the shape the
  model-card writer reads), a table and a markdown summary (tasks x models), and the plot;
* one ``AssetCheckResult`` per check of the spec (``checks:``, ``thresholds:``, a task's ``threshold:``), with the
  observed value, the bound, the best parent and the reason in its description and metadata. Blocking checks that fail
  stop downstream assets of the same run (e.g. an export or a Hub upload of the evaluated model).

The data version is the content hash of the report directory, whose files are a function of the scores alone
(timings and library versions go to the excluded ``mergeline.json``): the same scores give the same data version.
"""


import io
import json
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dagster as dg

from pipelines.spec import EvalCheckSpec, EvalSpec, PipelineSpec
from resources.evaluator import EvaluatorResource
from resources.model_store import ModelStoreResource

from .common import BuildContext, artifact_metadata, canonical_json, dir_content_hash, md_png, node_config, sha256_text
from .common import upstream as upstream_of
from .merges import split_ref

RESULTS_FILE = "results.json"
REPORT_FILE = "README.md"
PLOT_FILE = "scores.png"
MANIFEST = "mergeline.json"

Scores = dict[str, dict[str, dict[str, float]]]  # node -> task -> metric -> value


# -- pure helpers (no Dagster state) ----------------------------------------------------------------------------------


def eval_models(node: EvalSpec) -> list[str]:
    """The evaluated model first, then the models it is compared with."""
    return list(dict.fromkeys([node.model, *node.compare_to]))


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


def task_metric(node: EvalSpec, task: str, scores: dict[str, dict[str, float]] | None,
                preferred: str | None = None) -> str | None:
    """The metric a check or a summary uses: the check's, else the task spec's, else the first one lm-eval reported."""
    m = preferred or node.task_metric(task)
    if m is not None:
        return m
    return next(iter((scores or {}).get(task, {})), None)


def _fmt(v: float | None) -> str:
    if v is None:
        return "–"
    if isinstance(v, float) and math.isnan(v):
        return "NaN"
    return f"{v:.4g}" if abs(v) >= 1000 or (v != 0 and abs(v) < 0.001) else f"{v:.4f}".rstrip("0").rstrip(".") or "0"


@dataclass
class CheckOutcome:
    name: str
    passed: bool
    blocking: bool
    description: str
    metadata: dict[str, Any]


def run_check(check: EvalCheckSpec, node: EvalSpec, scores: Scores) -> CheckOutcome:
    """Judge one check against the scores; the description says why it passed or failed, with numbers."""
    model = node.model
    parents = [m for m in eval_models(node) if m != model]
    own = scores.get(model, {})
    metric = task_metric(node, check.task, own, check.metric)
    meta: dict[str, Any] = {"task": check.task, "metric": metric or "n/a", "model": model,
                            "blocking": check.blocking}
    name = check.check_name()
    observed = own.get(check.task, {}).get(metric) if metric else None
    if observed is None:
        reported = ", ".join(sorted(own.get(check.task, {}))) or "none"
        return CheckOutcome(name, False, check.blocking,
                            f"FAILED: task '{check.task}' reported no metric '{metric}' for '{model}' (reported: "
                            f"{reported}); set the check's 'metric:'", meta)
    meta["observed"] = float(observed)
    reasons: list[str] = []
    ok = not math.isnan(observed)
    if not ok:
        reasons.append(f"{metric} is NaN")
    if check.min is not None:
        meta["min"] = check.min
        good = observed >= check.min
        ok &= good
        reasons.append(f"{_fmt(observed)} {'>=' if good else '<'} min {_fmt(check.min)}")
    if check.max is not None:
        meta["max"] = check.max
        good = observed <= check.max
        ok &= good
        reasons.append(f"{_fmt(observed)} {'<=' if good else '>'} max {_fmt(check.max)}")
    for key, pick, cmp in (("min_ratio_of_best_parent", max, ">="), ("max_ratio_of_best_parent", min, "<=")):
        ratio = getattr(check, key)
        if ratio is None:
            continue
        vals = {p: scores.get(p, {}).get(check.task, {}).get(metric) for p in parents}
        vals = {p: v for p, v in vals.items() if v is not None and not math.isnan(v)}
        if not vals:
            ok = False
            reasons.append(f"no parent reported {metric} on {check.task}")
            continue
        best = pick(vals, key=vals.get)
        bound = ratio * vals[best]
        good = observed >= bound if cmp == ">=" else observed <= bound
        ok &= good
        meta.update({"best_parent": best, "best_parent_value": vals[best], key: ratio, "threshold": bound,
                     "parent_values": dg.MetadataValue.json(vals)})
        reasons.append(f"{_fmt(observed)} {cmp if good else ('<' if cmp == '>=' else '>')} {ratio:g} x best parent "
                       f"'{best}' ({_fmt(vals[best])}) = {_fmt(bound)}")
    verdict = "PASSED" if ok else "FAILED"
    desc = f"{verdict}: '{model}' {metric} on {check.task}: " + "; ".join(reasons)
    if not ok and check.blocking:
        desc += " (blocking: downstream assets of this run are skipped)"
    return CheckOutcome(name, bool(ok), check.blocking, desc, meta)


def rows(node: EvalSpec, scores: Scores) -> list[tuple[str, str, dict[str, float | None]]]:
    """(task, metric, {model: value}) for every task and metric the evaluated model reported, declared tasks first."""
    models = eval_models(node)
    own = scores.get(node.model, {})
    tasks = [t for t in node.task_names() if t in own] + sorted(t for t in own if t not in node.task_names())
    out = []
    for t in tasks:
        for m in own[t]:
            out.append((t, m, {x: scores.get(x, {}).get(t, {}).get(m) for x in models}))
    return out


def markdown_table(node: EvalSpec, scores: Scores, higher: dict[str, dict[str, bool]]) -> str:
    models = eval_models(node)
    head = "| task | metric | " + " | ".join(f"`{m}`" + (" (evaluated)" if m == node.model else "") for m in models)
    lines = [head + " |", "|---|---|" + "---:|" * len(models)]
    for t, m, vals in rows(node, scores):
        present = {k: v for k, v in vals.items() if v is not None and not math.isnan(v)}
        hib = higher.get(t, {}).get(m, True)
        best = (max if hib else min)(present.values()) if present else None
        cells = [(f"**{_fmt(v)}**" if v is not None and v == best and len(present) > 1 else _fmt(v))
                 for v in vals.values()]
        lines.append(f"| {t} | {m} {'↑' if hib else '↓'} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summary(node: EvalSpec, scores: Scores, higher: dict[str, dict[str, bool]],
            outcomes: list[CheckOutcome]) -> str:
    """Per task: the evaluated model's score next to its parents' and the best parent; then every check's verdict."""
    model = node.model
    parents = [m for m in eval_models(node) if m != model]
    out = [f"**`{model}`** on {len(node.task_names())} task(s)"
           + (f", compared with {', '.join(f'`{p}`' for p in parents)}" if parents else "") + ":", ""]
    for t in node.task_names():
        own = scores.get(model, {}).get(t, {})
        m = task_metric(node, t, scores.get(model, {}))
        if m is None or m not in own:
            out.append(f"- **{t}**: no score")
            continue
        hib = higher.get(t, {}).get(m, True)
        line = f"- **{t}** ({m}, {'higher' if hib else 'lower'} is better): `{model}` {_fmt(own[m])}"
        pv = {p: scores.get(p, {}).get(t, {}).get(m) for p in parents}
        pv = {p: v for p, v in pv.items() if v is not None}
        if pv:
            best = (max if hib else min)(pv, key=pv.get)
            line += "; " + ", ".join(f"`{p}` {_fmt(v)}" for p, v in pv.items())
            if pv[best] and not math.isnan(pv[best]):
                line += f" — {100 * own[m] / pv[best]:.0f}% of the best parent (`{best}`)"
        out.append(line)
    if outcomes:
        out += ["", "Checks:", ""]
        for o in outcomes:
            out.append(f"- {'✅' if o.passed else ('⛔' if o.blocking else '⚠️')} `{o.name}`"
                       f"{' (blocking)' if o.blocking else ''}: {o.description}")
    return "\n".join(out)


def scores_plot_png(node: EvalSpec, scores: Scores, higher: dict[str, dict[str, bool]]) -> bytes:
    """One small bar chart per task (its metric, one bar per model): tasks with different scales stay readable."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    models = eval_models(node)
    tasks = [t for t in node.task_names() if t in scores.get(node.model, {})]
    n = max(1, len(tasks))
    fig, axes = plt.subplots(1, n, figsize=(max(4.0, 2.6 * n), 3.4), dpi=100, squeeze=False)
    colors = ["#d62728"] + ["#1f77b4", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22"] * 4
    for ax, t in zip(axes[0], tasks):
        m = task_metric(node, t, scores.get(node.model, {}))
        vals = [scores.get(x, {}).get(t, {}).get(m, float("nan")) for x in models]
        ax.bar(range(len(models)), vals, color=colors[:len(models)])
        ax.set_xticks(range(len(models)))
        ax.set_xticklabels(models, rotation=35, ha="right", fontsize=7)
        hib = higher.get(t, {}).get(m, True)
        ax.set_title(f"{t}\n{m} {'↑' if hib else '↓'}", fontsize=8)
        ax.tick_params(axis="y", labelsize=7)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"{node.model} (red) vs its parents", fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()


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
    def _eval(context: dg.AssetExecutionContext, evaluator: EvaluatorResource,
              model_store: ModelStoreResource) -> dg.MaterializeResult:
        from resources.eval_backend import EvalError, evaluate_model, prepare_tasks

        t0 = time.perf_counter()
        ups = {k: upstream_of(context, k) for k in dep_keys}
        inputs = {k.to_user_string(): u.data_version for k, u in ups.items()}
        try:
            options = evaluator.options(batch_size=node.batch_size, limit=node.limit,
                                        add_bos_token=node.add_bos_token, num_fewshot=node.num_fewshot)
        except Exception as e:  # noqa: BLE001 - a device that is not there: not transient
            raise dg.Failure(f"evals.{name}: {e}", allow_retries=False) from None
        tasks, include = backend_tasks(spec, node)
        scores: Scores = {}
        higher: dict[str, dict[str, bool]] = {}
        per_model: dict[str, dict[str, Any]] = {}
        versions: dict[str, Any] = {}
        try:
            with tempfile.TemporaryDirectory(prefix=f"mergeline-eval-{name}-") as tmp:
                prepared = prepare_tasks(tasks, Path(tmp), include=include,
                                         include_defaults=options.include_defaults)
                for m in models:
                    full, ad = parts[m]
                    mpath, apath = ups[full].path, (ups[ad].path if ad else None)
                    context.log.info(f"eval '{name}': evaluating '{m}' ({mpath}{' + ' + str(apath) if apath else ''})"
                                     f" on {options.device}")
                    run = evaluate_model(mpath, prepared, options, adapter_dir=apath, log=context.log.warning)
                    scores[m] = run.scores
                    for t, hb in run.higher_is_better.items():
                        higher.setdefault(t, {}).update(hb)
                    per_model[m] = {"seconds": round(run.seconds, 3), "samples": run.samples,
                                    "model": str(mpath), "adapter": str(apath) if apath else None}
                    versions = run.versions
        except EvalError as e:
            raise dg.Failure(f"evals.{name}: {e}", allow_retries=False) from None

        results = {"model": node.model, "scores": scores}
        outcomes = [run_check(c, node, scores) for c in checks]
        table_md = markdown_table(node, scores, higher)
        summary_md = summary(node, scores, higher, outcomes)
        png = scores_plot_png(node, scores, higher)
        with model_store.staging("eval", name) as staged:
            staged.mkdir(parents=True)
            (staged / RESULTS_FILE).write_text(json.dumps(
                {**results, "higher_is_better": higher,
                 "checks": [{"name": o.name, "passed": o.passed, "blocking": o.blocking, "description": o.description}
                            for o in outcomes]}, indent=1, sort_keys=True) + "\n")
            (staged / REPORT_FILE).write_text(f"# Eval `{name}`\n\n{summary_md}\n\n## Scores\n\n{table_md}\n")
            (staged / PLOT_FILE).write_bytes(png)
            (staged / MANIFEST).write_text(json.dumps(
                {"device": options.device, "batch_size": options.batch_size, "limit": options.limit,
                 "per_model": per_model, "task_versions": versions,
                 "seconds": round(time.perf_counter() - t0, 3)}, indent=1, sort_keys=True, default=str) + "\n")
            content, _ = dir_content_hash(staged, store_root=model_store.root_path)
            final = model_store.publish(staged, "eval", name, content)

        table = dg.MetadataValue.table(
            records=[dg.TableRecord({"task": t, "metric": m, **{x: (None if v is None or math.isnan(v) else v)
                                                                 for x, v in vals.items()}})
                     for t, m, vals in rows(node, scores)],
            schema=dg.TableSchema(columns=[dg.TableColumn("task", "string"), dg.TableColumn("metric", "string")]
                                  + [dg.TableColumn(x, "float") for x in models]),
        )
        meta = artifact_metadata(
            final, content, duration_s=time.perf_counter() - t0, config=cfg, inputs=inputs, weights=False,
            extra={
                "results": dg.MetadataValue.json(results),
                "results_sha256": sha256_text(canonical_json(results)),
                "scores": table,
                "scores_table": dg.MetadataValue.md(table_md),
                "summary": dg.MetadataValue.md(summary_md),
                "scores_plot": md_png(png, f"scores of {node.model} vs its parents"),
                "device": options.device,
                "limit": options.limit if options.limit is not None else "none",
                "models_evaluated": dg.MetadataValue.json(per_model),
                "checks_failed": [o.name for o in outcomes if not o.passed],
            },
        )
        meta.pop("model_card", None)  # the report is in 'summary' already
        check_results = [
            dg.AssetCheckResult(
                check_name=o.name, passed=o.passed, description=o.description,
                severity=dg.AssetCheckSeverity.ERROR if o.blocking else dg.AssetCheckSeverity.WARN,
                metadata={**o.metadata, "reason": o.description},
            ) for o in outcomes
        ]
        for o in outcomes:
            (context.log.info if o.passed else context.log.warning)(f"eval '{name}' check {o.name}: {o.description}")
        return dg.MaterializeResult(metadata=meta, data_version=dg.DataVersion(content),
                                    check_results=check_results or None)

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
