"""Offline lm-eval runs on local models: the framework-light half of the evaluator (no Dagster import).

One entry point, :func:`evaluate`, takes a model directory (optionally plus a PEFT adapter directory, for the
fine-tunes and adapters a merge is compared with), a list of :class:`EvalTask` s and :class:`EvalOptions`, and returns
plain dicts ``{task: {metric: value}}``.

Why it is built this way:

* The model is loaded once with transformers (an adapter is applied with PEFT and merged into the weights, so the
  evaluated model is exactly ``base + adapter``) and handed to lm-eval's ``HFLM`` as an object: lm-eval never resolves
  a model name, so nothing can be downloaded.
* Tasks come from local YAML files (a ``TaskManager`` over the task folders; ``include_defaults=False`` unless asked,
  because indexing lm-eval's ~10k built-in task files takes ~17 s) or are generated here: a perplexity task is an
  lm-eval ``loglikelihood_rolling`` task over a held-out text file.
* Relative ``data_files`` in a local task YAML are taken from the YAML's folder (lm-eval and ``datasets`` would take
  them from the working directory, which differs between a test, ``dagster dev`` and a run worker), so task folders
  can ship with their data and be moved as a whole.
* Results are flattened from lm-eval's ``"acc,none"`` keys to ``"acc"`` (other filters keep their name:
  ``"exact_match,flexible-extract"``); standard errors and aliases are dropped.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

#: metrics of a perplexity task, first = the one checks use unless they name another
PERPLEXITY_METRICS = ("word_perplexity", "byte_perplexity", "bits_per_byte")
PERPLEXITY_AGGREGATIONS = ("weighted_perplexity", "weighted_perplexity", "bits_per_byte")
TEXT_SUFFIXES = (".txt", ".md", ".jsonl")


class EvalError(ValueError):
    """Bad eval input (a task that does not exist, an unreadable text file, a model directory without weights)."""


@dataclass(frozen=True)
class EvalTask:
    """One task to run.

    * ``path`` None, ``text_file`` None: an lm-eval task (or group) found in ``include`` folders (or, with
      ``include_defaults``, among lm-eval's built-in tasks: their data must be available locally).
    * ``path``: a local lm-eval YAML file or a folder of them that defines task ``name``.
    * ``text_file``: a perplexity task named ``name`` over a held-out text file (``.txt``/``.md``: one document per
      blank-line-separated paragraph; ``.jsonl``: one document per record, field ``text_field``).
    """

    name: str
    path: Path | None = None
    text_file: Path | None = None
    text_field: str = "text"

    @property
    def is_perplexity(self) -> bool:
        return self.text_file is not None


@dataclass(frozen=True)
class EvalOptions:
    device: str = "cpu"
    batch_size: int = 8
    limit: int | None = None
    include_defaults: bool = False
    add_bos_token: bool | None = None
    dtype: str = "auto"
    num_fewshot: int | None = None


@dataclass
class EvalRun:
    """What one model scored: ``scores[task][metric]``, plus what lm-eval says about the metrics."""

    scores: dict[str, dict[str, float]]
    higher_is_better: dict[str, dict[str, bool]]
    samples: dict[str, int]
    versions: dict[str, Any]
    seconds: float
    device: str


# -- model -----------------------------------------------------------------------------------------------------------


def load_model(model_dir: Path | str, adapter_dir: Path | str | None = None, *, device: str = "cpu",
               dtype: str = "auto", add_bos_token: bool | None = None):
    """(model, tokenizer) in eval mode on ``device``. With ``adapter_dir``, the PEFT adapter is applied to the model
    and merged into its weights (``merge_and_unload``): lm-eval then sees a plain ``PreTrainedModel``.

    ``add_bos_token=True`` makes the tokenizer prepend BOS itself (mergeline's trainer prepends BOS when a tokenizer
    has one and does not add it; evaluating such a model without it would measure something else)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise EvalError(f"{model_dir}: not a model directory (no config.json)")
    if adapter_dir is not None and not (Path(adapter_dir) / "adapter_config.json").is_file():
        raise EvalError(f"{adapter_dir}: not a PEFT adapter directory (no adapter_config.json)")
    tok_kw = {} if add_bos_token is None else {"add_bos_token": add_bos_token}
    try:
        tok = AutoTokenizer.from_pretrained(str(model_dir), **tok_kw)
    except Exception as e:  # noqa: BLE001 - the message names the folder and the cause
        raise EvalError(f"{model_dir}: cannot load its tokenizer ({type(e).__name__}: {e})") from e
    torch_dtype = dtype if dtype == "auto" else getattr(torch, dtype)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch_dtype)
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    model.to(device)
    model.eval()
    return model, tok


# -- tasks -----------------------------------------------------------------------------------------------------------


def read_documents(path: Path, text_field: str = "text") -> list[str]:
    """The documents of a held-out text file (see :class:`EvalTask`)."""
    path = Path(path)
    if not path.is_file():
        raise EvalError(f"perplexity text file '{path}' does not exist")
    if path.suffix.lower() not in TEXT_SUFFIXES:
        raise EvalError(f"perplexity text file '{path}': use .txt, .md (paragraphs) or .jsonl (field "
                        f"'{text_field}')")
    docs: list[str] = []
    if path.suffix.lower() == ".jsonl":
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise EvalError(f"{path}:{i}: not valid JSON ({e})") from None
            if not isinstance(rec, dict) or not isinstance(rec.get(text_field), str):
                raise EvalError(f"{path}:{i}: needs a string field '{text_field}'")
            if rec[text_field].strip():
                docs.append(rec[text_field])
    else:
        docs = [p.strip() for p in path.read_text().split("\n\n") if p.strip()]
    if not docs:
        raise EvalError(f"perplexity text file '{path}' has no text")
    return docs


def perplexity_task_config(name: str, docs_file: Path, cache_dir: Path | None = None) -> dict[str, Any]:
    """An lm-eval ``loglikelihood_rolling`` task over a jsonl of ``{"text": ...}`` documents."""
    kwargs: dict[str, Any] = {"data_files": {"test": str(Path(docs_file).absolute())}}
    if cache_dir is not None:
        kwargs["cache_dir"] = str(cache_dir)
    return {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": kwargs,
        "test_split": "test",
        "output_type": "loglikelihood_rolling",
        "doc_to_text": "",
        "doc_to_target": "{{text}}",
        "metric_list": [{"metric": m, "aggregation": agg, "higher_is_better": False}
                        for m, agg in zip(PERPLEXITY_METRICS, PERPLEXITY_AGGREGATIONS)],
        "metadata": {"version": 1.0},
    }


def _absolute_data_files(value: Any, base: Path) -> Any:
    if isinstance(value, str):
        if "://" in value or Path(value).is_absolute():
            return value
        return str((base / value).absolute())
    if isinstance(value, list):
        return [_absolute_data_files(v, base) for v in value]
    if isinstance(value, dict):
        return {k: _absolute_data_files(v, base) for k, v in value.items()}
    return value


def _include_dir(p: Path) -> Path:
    return p if p.is_dir() else p.parent


def task_manager(include: Iterable[Path], include_defaults: bool):
    from lm_eval.tasks import TaskManager

    dirs = list(dict.fromkeys(str(_include_dir(Path(p)).absolute()) for p in include))
    return TaskManager(include_path=dirs or None, include_defaults=include_defaults)


def resolve_tasks(tasks: list[EvalTask], include: Iterable[Path], include_defaults: bool, workdir: Path):
    """(TaskManager, specs for ``simple_evaluate``). Raises :class:`EvalError` naming every task that cannot be found
    before any model is loaded."""
    from lm_eval.tasks._yaml_loader import load_yaml

    include = [Path(p) for p in include] + [t.path for t in tasks if t.path is not None]
    for p in include:
        if not p.exists():
            raise EvalError(f"task path '{p}' does not exist")
    tm = task_manager(include, include_defaults)
    specs: list[Any] = []
    missing: list[str] = []
    for t in tasks:
        if t.is_perplexity:
            docs = read_documents(t.text_file, t.text_field)
            f = workdir / f"ppl-{t.name}.jsonl"
            f.write_text("".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs))
            specs.append(perplexity_task_config(t.name, f, workdir / "datasets-cache"))
            continue
        entry = tm.task_index.get(t.name)
        if entry is None:
            missing.append(t.name)
            continue
        yaml_path = getattr(entry, "yaml_path", None)
        kind = str(getattr(entry, "kind", ""))
        if yaml_path is not None and "GROUP" not in kind.upper() and "TAG" not in kind.upper():
            cfg = copy.deepcopy(load_yaml(Path(yaml_path), resolve_func=True))
            dk = cfg.get("dataset_kwargs") or {}
            base = Path(yaml_path).parent
            if "data_files" in dk or "data_dir" in dk:
                dk = dict(dk)
                for k in ("data_files", "data_dir"):
                    if k in dk:
                        dk[k] = _absolute_data_files(dk[k], base)
                cfg["dataset_kwargs"] = dk
                cfg.pop("group", None)
                specs.append(cfg)
                continue
        specs.append(t.name)
    if missing:
        where = ", ".join(str(p) for p in include) or "no task folders"
        hint = ("" if include_defaults else " (lm-eval's built-in tasks were not searched: set the evaluator "
                "resource's include_defaults: true for those; their data must be available locally)")
        raise EvalError(f"task(s) {', '.join(repr(m) for m in missing)} not found in {where}{hint}")
    return tm, specs


# -- results ---------------------------------------------------------------------------------------------------------


def flatten_results(results: dict[str, Any]) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, bool]]]:
    """``{task: {metric: value}}`` and ``{task: {metric: higher_is_better}}`` from ``simple_evaluate``'s output."""
    scores: dict[str, dict[str, float]] = {}
    hib: dict[str, dict[str, bool]] = {}
    for task, metrics in results.get("results", {}).items():
        row: dict[str, float] = {}
        for key, value in metrics.items():
            if key == "alias" or "," not in key:
                continue
            metric, _, filt = key.partition(",")
            if metric.endswith("_stderr") or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            row[metric if filt == "none" else f"{metric},{filt}"] = float(value)
        if row:
            scores[task] = row
            hb = results.get("higher_is_better", {}).get(task, {})
            hib[task] = {m: bool(hb.get(m.partition(",")[0], True)) for m in row}
    return scores, hib


def primary_metric(scores: dict[str, float], preferred: str | None = None) -> str | None:
    """The metric a task is judged by: ``preferred`` if given and present, else the first lm-eval reported."""
    if preferred is not None:
        return preferred if preferred in scores else None
    return next(iter(scores), None)


# -- running ---------------------------------------------------------------------------------------------------------


@dataclass
class PreparedTasks:
    """Tasks resolved once (a TaskManager and ``simple_evaluate`` specs), reused for every model compared."""

    tasks: list[EvalTask]
    manager: Any
    specs: list[Any]


def prepare_tasks(tasks: list[EvalTask], workdir: Path, *, include: Iterable[Path] = (),
                  include_defaults: bool = False) -> PreparedTasks:
    """Find every task (raising :class:`EvalError` before any model is loaded); generated files go to ``workdir``,
    which must live as long as the prepared tasks are used."""
    if not tasks:
        raise EvalError("no tasks to run")
    names = [t.name for t in tasks]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise EvalError(f"task names must be unique: {', '.join(dup)}")
    Path(workdir).mkdir(parents=True, exist_ok=True)
    tm, specs = resolve_tasks(tasks, include, include_defaults, Path(workdir))
    return PreparedTasks(list(tasks), tm, specs)


def evaluate_loaded(model, tokenizer, prepared: PreparedTasks, options: EvalOptions, *,
                    log: Callable[[str], None] | None = None) -> EvalRun:
    """Run prepared tasks on an already loaded model (see :func:`load_model`)."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    t0 = time.perf_counter()
    # With add_bos_token, lm-eval would put BOS into a perplexity document's tokens *and* use BOS as the rolling
    # windows' prefix, scoring log p(BOS | BOS); perplexity tasks therefore run with add_bos_token=False (the prefix
    # is still BOS: each document is scored after exactly one BOS).
    runs: list[tuple[bool | None, list[Any]]] = [(options.add_bos_token, list(prepared.specs))]
    if options.add_bos_token:
        pairs = list(zip(prepared.tasks, prepared.specs))
        runs = [(True, [s for t, s in pairs if not t.is_perplexity]), (False, [s for t, s in pairs if t.is_perplexity])]
    out: dict[str, Any] = {}
    for bos, specs in runs:
        if not specs:
            continue
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=options.batch_size, add_bos_token=bos)
        part = simple_evaluate(model=lm, tasks=specs, task_manager=prepared.manager, limit=options.limit,
                               bootstrap_iters=0, num_fewshot=options.num_fewshot, log_samples=False)
        if part is None:
            raise EvalError("lm-eval returned no results")
        for k in ("results", "higher_is_better", "n-samples", "versions"):
            out.setdefault(k, {}).update(part.get(k, {}))
    scores, hib = flatten_results(out)
    samples = {t: int(v.get("effective", v.get("original", 0))) for t, v in out.get("n-samples", {}).items()}
    for t in prepared.tasks:
        if t.name not in scores:
            raise EvalError(f"task '{t.name}' produced no numeric metric (lm-eval results: "
                            f"{sorted(out.get('results', {}))})")
        bad = [m for m, v in scores[t.name].items() if math.isnan(v)]
        if bad and log:
            log(f"task '{t.name}': metric(s) {', '.join(bad)} are NaN")
    return EvalRun(scores=scores, higher_is_better=hib, samples=samples, versions=dict(out.get("versions", {})),
                   seconds=time.perf_counter() - t0, device=str(model.device))


def evaluate_model(model_dir: Path | str, prepared: PreparedTasks, options: EvalOptions, *,
                   adapter_dir: Path | str | None = None, log: Callable[[str], None] | None = None) -> EvalRun:
    """Load ``model_dir`` (+ ``adapter_dir``), run the prepared tasks, free the model."""
    import gc

    model, tok = load_model(model_dir, adapter_dir, device=options.device, dtype=options.dtype,
                            add_bos_token=options.add_bos_token)
    try:
        return evaluate_loaded(model, tok, prepared, options, log=log)
    finally:
        del model
        gc.collect()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except Exception:  # noqa: BLE001 - cache release is best effort
            pass


def evaluate(model_dir: Path | str, tasks: list[EvalTask], options: EvalOptions, *,
             adapter_dir: Path | str | None = None, include: Iterable[Path] = (),
             log: Callable[[str], None] | None = None) -> EvalRun:
    """One model, one set of tasks: :func:`prepare_tasks` then :func:`evaluate_model`."""
    with tempfile.TemporaryDirectory(prefix="mergeline-eval-") as tmp:
        prepared = prepare_tasks(tasks, Path(tmp), include=include, include_defaults=options.include_defaults)
        return evaluate_model(model_dir, prepared, options, adapter_dir=adapter_dir, log=log)
