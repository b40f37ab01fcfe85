"""The model card (``README.md``) of a published model: Hub front matter plus a human-readable body.

Pure functions, no Dagster import. The front matter is rendered by ``huggingface_hub``'s own ``ModelCardData`` /
``EvalResult`` (so ``model-index`` has exactly the shape the Hub parses) and holds ``base_model``,
``base_model_relation`` (``merge`` / ``quantized`` / ``adapter`` / ``finetune``), ``tags``, ``license``,
``library_name``, a ``mergeline`` block (pipeline, node, config, content hash) and ``model-index`` from eval results.
The body repeats the configuration as a YAML block and the scores as a table.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Iterable, Literal, Mapping

import yaml

Relation = Literal["merge", "quantized", "adapter", "finetune"]
_FRONT = re.compile(r"^---\s*\n(.*?)\n---\s*\n", re.S)


def read_front_matter(card: str | Path) -> dict[str, Any]:
    """The YAML front matter of a model card (text, a README.md path or a model folder); ``{}`` if none."""
    if isinstance(card, Path):
        p = card / "README.md" if card.is_dir() else card
        if not p.is_file():
            return {}
        card = p.read_text(errors="replace")
    m = _FRONT.match(card)
    if not m:
        return {}
    try:
        data = yaml.safe_load(m.group(1))
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def default_license(upstream_cards: Iterable[str | Path]) -> str:
    """The license the upstream models' cards agree on; ``other`` when they disagree or none states one (a merge
    inherits every input's terms, so a single license can only be inferred when all inputs share it)."""
    found = {str(read_front_matter(c).get("license") or "").strip() for c in upstream_cards}
    found.discard("")
    return found.pop() if len(found) == 1 else "other"


def eval_rows(results: Mapping[str, Any], eval_name: str) -> list[dict[str, Any]]:
    """Rows ``{eval, task, metric, value}`` for the evaluated model from an eval asset's ``results`` metadata
    (``{"model": node, "scores": {node: {task: {metric: value}}}}``). Scores of comparison models, standard errors
    (``*_stderr``) and non-numeric values are left out."""
    model = results.get("model")
    scores = (results.get("scores") or {}).get(model) or {}
    rows: list[dict[str, Any]] = []
    for task in sorted(scores):
        metrics = scores[task] or {}
        for metric in sorted(metrics):
            value = metrics[metric]
            if "_stderr" in metric or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if isinstance(value, float) and not math.isfinite(value):
                continue
            rows.append({"eval": eval_name, "task": str(task), "metric": str(metric), "value": float(value)})
    return rows


def _eval_results(rows: list[dict[str, Any]]) -> list[Any]:
    from huggingface_hub import EvalResult

    out = []
    for r in rows:
        metric_type = r["metric"].split(",", 1)[0]  # lm-eval reports "acc,none": metric, filter
        out.append(EvalResult(
            task_type="text-generation", task_name=r["task"], dataset_type=r["task"], dataset_name=r["task"],
            metric_type=metric_type, metric_name=r["metric"], metric_value=r["value"],
        ))
    return out


def build_model_card(*, repo_id: str, relation: Relation, base_models: list[str], license: str,
                     tags: Iterable[str] = (), config: Mapping[str, Any] | None = None, config_title: str =
                     "Configuration", summary: str = "", eval_rows_: list[dict[str, Any]] | None = None,
                     pipeline: str | None = None, node: str | None = None, content_sha256: str | None = None,
                     license_name: str | None = None, license_link: str | None = None,
                     library_name: str | None = "transformers") -> tuple[str, dict[str, Any]]:
    """``(README.md text, front matter dict)``. The front matter dict is what the Hub (and
    ``huggingface_hub.ModelCard.load``) will read back from the text."""
    from huggingface_hub import ModelCard, ModelCardData

    rows = list(eval_rows_ or [])
    fixed = ["mergeline"] + (["merge"] if relation == "merge" else [])
    all_tags = list(dict.fromkeys([*fixed, *[t for t in tags if t]]))
    extra: dict[str, Any] = {"base_model_relation": relation}
    if license_name:
        extra["license_name"] = license_name
    if license_link:
        extra["license_link"] = license_link
    provenance = {k: v for k, v in (("pipeline", pipeline), ("node", node), ("content_sha256", content_sha256))
                  if v}
    if provenance:
        extra["mergeline"] = provenance
    data = ModelCardData(
        base_model=list(dict.fromkeys(base_models)) or None, license=license, library_name=library_name,
        tags=all_tags, model_name=repo_id, eval_results=_eval_results(rows) or None, **extra,
    )
    title = repo_id.split("/", 1)[-1]
    body = [f"# {title}", ""]
    if summary:
        body += [summary, ""]
    body += ["Made with [mergeline](https://pypi.org/project/mergeline/)"
             + (f" (pipeline `{pipeline}`, node `{node}`)." if pipeline and node else "."), ""]
    if config:
        body += [f"## {config_title}", "", "```yaml", yaml.safe_dump(dict(config), sort_keys=False).rstrip(), "```",
                 ""]
    if rows:
        body += ["## Evaluation", "", "| eval | task | metric | value |", "|---|---|---|---:|"]
        body += [f"| {r['eval']} | {r['task']} | {r['metric']} | {r['value']:.4f} |" for r in rows]
        body += [""]
    text = "---\n" + data.to_yaml() + "\n---\n\n" + "\n".join(body)
    front = ModelCard(text).data.to_dict()  # what a reader of the card gets back
    return text, front
