"""The ``eval`` step: lm-eval tasks run on a model and on the models it is compared with, a report published into the
store, and one asset-check result per check of the spec.

Dagster-free (see :mod:`resources.pipes_steps`): ``assets/evals.py`` builds the request and a launcher runs this
function in the step process, in a local subprocess or in a Kubernetes pod (Dagster Pipes), so every path writes the
same report and reports the same metadata and check results. The pure helpers (check judging, tables, summary, plot)
live here too; ``assets/evals.py`` re-exports them.

Request keys: ``name``, ``plan`` (:class:`EvalPlan` fields: the evaluated ``model``, ``compare_to``, the task names
and the metric each is judged by), ``checks`` (:class:`CheckRule` fields), ``tasks`` (``EvalTask`` fields, paths
resolved), ``include`` (folders of task YAMLs), ``parts`` (``{node: {"model": ref, "adapter": ref | None}}``, refs
being upstream ``path`` metadata), ``inputs`` (upstream data versions), ``node_config`` and ``options``
(``EvalOptions`` fields with the *unresolved* device: resolved here, on the machine that runs the models).
"""

from __future__ import annotations

import base64
import io
import json
import math
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from .artifact_files import canonical_json, dir_content_hash, sha256_text
from .object_store import ArtifactStore, StoreError
from .pipes_steps import CheckOutput, StepInputError, StepOutput, artifact_metadata, mv, register_step

RESULTS_FILE = "results.json"
REPORT_FILE = "README.md"
PLOT_FILE = "scores.png"
MANIFEST = "mergeline.json"

Scores = dict[str, dict[str, dict[str, float]]]  # node -> task -> metric -> value


@dataclass
class EvalPlan:
    """What the helpers need of an eval node (``pipelines.spec.EvalSpec`` has the same attributes, so either works)."""

    model: str
    compare_to: list[str] = field(default_factory=list)
    tasks: list[str] = field(default_factory=list)
    metrics: dict[str, str | None] = field(default_factory=dict)

    @classmethod
    def of(cls, node: Any) -> "EvalPlan":
        names = node.task_names()
        return cls(model=node.model, compare_to=list(node.compare_to), tasks=list(names),
                   metrics={t: node.task_metric(t) for t in names})

    def task_names(self) -> list[str]:
        return list(self.tasks)

    def task_metric(self, task: str) -> str | None:
        return self.metrics.get(task)


@dataclass
class CheckRule:
    """One asset check of an eval (the fields of ``pipelines.spec.EvalCheckSpec`` the judging needs, name resolved)."""

    name: str
    task: str
    metric: str | None = None
    min: float | None = None
    max: float | None = None
    min_ratio_of_best_parent: float | None = None
    max_ratio_of_best_parent: float | None = None
    blocking: bool = True

    @classmethod
    def of(cls, check: Any) -> "CheckRule":
        return cls(name=check.check_name(), task=check.task, metric=check.metric, min=check.min, max=check.max,
                   min_ratio_of_best_parent=check.min_ratio_of_best_parent,
                   max_ratio_of_best_parent=check.max_ratio_of_best_parent, blocking=check.blocking)

    def check_name(self) -> str:
        return self.name


def eval_models(node: EvalSpec) -> list[str]:
    """The evaluated model first, then the models it is compared with."""
    return list(dict.fromkeys([node.model, *node.compare_to]))


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
                     "parent_values": vals})
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


def md_png(png: bytes, alt: str) -> dict[str, Any]:
    """A PNG as markdown metadata (the Dagster UI renders data-URI images in markdown)."""
    return mv(f"![{alt}](data:image/png;base64,{base64.b64encode(png).decode()})", "md")


def check_output(o: CheckOutcome) -> CheckOutput:
    """A judged check in the Pipes wire format: ERROR severity when blocking, WARN otherwise; the reason is both the
    description and the ``reason`` metadata."""
    meta = {k: mv(v, "json") if k == "parent_values" else mv(v) for k, v in o.metadata.items()}
    meta["reason"] = mv(o.description)
    return CheckOutput(o.name, passed=o.passed, severity="ERROR" if o.blocking else "WARN", metadata=meta,
                       description=o.description)


def scores_table(node: Any, scores: Scores) -> dict[str, Any]:
    """Tasks x models as Dagster table metadata (wire format)."""
    models = eval_models(node)
    records = [{"task": t, "metric": m, **{x: (None if v is None or math.isnan(v) else v) for x, v in vals.items()}}
               for t, m, vals in rows(node, scores)]
    schema = [{"name": "task", "type": "string"}, {"name": "metric", "type": "string"}] + \
             [{"name": x, "type": "float"} for x in models]
    return mv({"records": records, "schema": schema}, "table")


def eval_options(options: dict[str, Any]):
    """``EvalOptions`` from the request, the device resolved on this machine (a missing GPU is bad input)."""
    from merge_ops.device import resolve_device

    from .eval_backend import EvalOptions

    try:
        dev = resolve_device(options.get("device", "auto"))
    except Exception as e:  # noqa: BLE001 - a device that is not there: not transient
        raise StepInputError(str(e)) from None
    device = "cpu" if dev.type == "cpu" else f"cuda:{dev.index or 0}"
    return EvalOptions(**{**options, "device": device})


@register_step("eval")
def eval_step(request: dict[str, Any], store: ArtifactStore, log: Callable[[str], None]) -> StepOutput:
    from .eval_backend import EvalError, EvalTask, evaluate_model, prepare_tasks

    t0 = time.perf_counter()
    name = request["name"]
    node = EvalPlan(**request["plan"])
    checks = [CheckRule(**c) for c in request["checks"]]
    models = eval_models(node)
    try:
        options = eval_options(request["options"])
    except StepInputError as e:
        raise StepInputError(f"evals.{name}: {e}") from None
    try:  # inputs first: a missing one is reported before any model is loaded
        local = {m: (store.resolve(p["model"]), store.resolve(p["adapter"]) if p.get("adapter") else None)
                 for m, p in request["parts"].items()}
    except StoreError as e:
        raise StepInputError(f"evals.{name}: {e}") from None
    tasks = [EvalTask(name=t["name"], path=Path(t["path"]) if t.get("path") else None,
                      text_file=Path(t["text_file"]) if t.get("text_file") else None,
                      text_field=t.get("text_field") or "text") for t in request["tasks"]]
    include = [Path(p) for p in request.get("include", [])]
    scores: Scores = {}
    higher: dict[str, dict[str, bool]] = {}
    per_model: dict[str, dict[str, Any]] = {}
    versions: dict[str, Any] = {}
    try:
        with tempfile.TemporaryDirectory(prefix=f"mergeline-eval-{name}-") as tmp:
            prepared = prepare_tasks(tasks, Path(tmp), include=include, include_defaults=options.include_defaults)
            for m in models:
                mpath, apath = local[m]
                log(f"eval '{name}': evaluating '{m}' ({mpath}{' + ' + str(apath) if apath else ''}) on "
                    f"{options.device}")
                run = evaluate_model(mpath, prepared, options, adapter_dir=apath, log=log)
                scores[m] = run.scores
                for t, hb in run.higher_is_better.items():
                    higher.setdefault(t, {}).update(hb)
                per_model[m] = {"seconds": round(run.seconds, 3), "samples": run.samples,
                                "model": str(mpath), "adapter": str(apath) if apath else None}
                versions = run.versions
    except EvalError as e:
        raise StepInputError(f"evals.{name}: {e}") from None

    results = {"model": node.model, "scores": scores}
    outcomes = [run_check(c, node, scores) for c in checks]
    table_md = markdown_table(node, scores, higher)
    summary_md = summary(node, scores, higher, outcomes)
    png = scores_plot_png(node, scores, higher)
    try:
        with store.staging("eval", name) as staged:
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
            content, _ = dir_content_hash(staged, store_root=store.root_path)
            final = store.publish(staged, "eval", name, content)
    except StoreError as e:
        raise StepInputError(f"evals.{name}: {e}") from None

    meta = artifact_metadata(
        final, content, duration_s=time.perf_counter() - t0, config=request["node_config"], inputs=request["inputs"],
        weights=False,
        extra={
            "results": mv(results, "json"),
            "results_sha256": mv(sha256_text(canonical_json(results))),
            "scores": scores_table(node, scores),
            "scores_table": mv(table_md, "md"),
            "summary": mv(summary_md, "md"),
            "scores_plot": md_png(png, f"scores of {node.model} vs its parents"),
            "device": mv(options.device),
            "limit": mv(options.limit if options.limit is not None else "none"),
            "models_evaluated": mv(per_model, "json"),
            "checks_failed": mv([o.name for o in outcomes if not o.passed]),
        },
    )
    meta.pop("model_card", None)  # the report is in 'summary' already
    for o in outcomes:
        log(f"eval '{name}' check {o.name}: {o.description}")
    return StepOutput(metadata=meta, data_version=content, checks=[check_output(o) for o in outcomes])
