"""The pipeline spec: one YAML file declares base models, datasets, fine-tunes, adapters, merges, exports, evals and
schedules; :func:`load_pipeline` validates all of it before anything runs.

Validation is in two layers, and every message starts with the YAML path it is about
(``merges.math_code.models[1].model: no base model, adapter, fine-tune or merge named 'cod' (did you mean 'code'?)``):

1. structure (pydantic, strict): unknown keys (with the closest valid spelling), wrong types, out-of-range numbers,
   a node with zero or two sources, ...;
2. meaning: names that point nowhere (with did-you-mean), cycles, merge methods that do not exist, parameters a method
   does not take, wrong arity, merges of models with different architectures or hidden sizes (when knowable without a
   download: toy specs, local ``config.json``, the local Hugging Face cache or an explicit ``architecture:``), adapters
   or fine-tunes applied to a base other than the merge's base, unknown export quant types, bad crons, ...

All errors are collected and raised together as :class:`PipelineSpecError`. This module never imports Dagster (the
``mergeline validate`` command uses it alone); it imports the merge engine's method registry for method checks.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    PrivateAttr,
    Tag,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from merge_ops.config import ModelEntry, ParamValue, SliceSpec, check_models_or_slices, normalize_dtype

NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
TAG_KEY_RE = re.compile(r"^([A-Za-z0-9_.\-]{1,63}/)?[A-Za-z0-9_.\-]{1,63}$")
TAG_VALUE_RE = re.compile(r"^[A-Za-z0-9_.\-]{0,63}$")
OWNER_RE = re.compile(r"^(team:[A-Za-z0-9_.\-]+|[^@\s]+@[^@\s]+\.[^@\s]+)$")
HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")

#: section name -> what a node of it is called in messages
SECTIONS = {
    "base_models": "base model",
    "datasets": "dataset",
    "finetunes": "fine-tune",
    "adapters": "adapter",
    "merges": "merge",
    "exports": "export",
    "evals": "eval",
    "schedules": "schedule",
}
#: sections whose nodes are models that merges, fine-tunes, exports and evals may name (one shared namespace)
MODEL_SECTIONS = ("base_models", "adapters", "finetunes", "merges")

GGUF_QUANTS = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1",
               "q2_k", "q3_k_s", "q3_k_m", "q3_k_l", "q4_k_s", "q4_k_m", "q5_k_s", "q5_k_m", "q6_k")
BNB_QUANTS = ("nf4", "fp4", "int8")
DEFAULT_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class PipelineSpecError(ValueError):
    """The pipeline file is invalid. ``errors`` holds one message per problem, each starting with its YAML path."""

    def __init__(self, errors: list[str], source: str = "<pipeline>"):
        self.errors = list(errors)
        self.source = source
        super().__init__(f"{source}: {len(self.errors)} error(s) in the pipeline:\n  " + "\n  ".join(self.errors))


# -- structure -----------------------------------------------------------------------------------------------------


def _coerce_str(v: Any) -> Any:
    """YAML (and Dagster's Jinja templating) turn ``2`` / ``"2"`` into an int; code versions and revisions must stay
    strings."""
    if isinstance(v, bool) or v is None:
        return v
    if isinstance(v, (int, float)):
        return str(v)
    return v


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class _Labelled(_Strict):
    """Shared by nodes and the pipeline: YAML may give code versions and tag values as numbers; keep them strings."""

    @field_validator("code_version", mode="before", check_fields=False)
    @classmethod
    def _cv(cls, v):
        return _coerce_str(v)

    @field_validator("tags", mode="before", check_fields=False)
    @classmethod
    def _tag_values(cls, v):
        if isinstance(v, dict):
            return {k: _coerce_str(x) for k, x in v.items()}
        return v


class _Node(_Labelled):
    """Fields every node accepts."""

    description: str | None = None
    owners: list[str] = Field(default_factory=list)
    tags: dict[str, str] = Field(default_factory=dict)
    code_version: str | None = None


class ToyModelSpec(_Strict):
    """A small randomly initialised Llama plus a BPE tokenizer, built locally (no download)."""

    seed: int = 0
    num_layers: int = Field(2, ge=1, le=64)
    hidden: int = Field(64, ge=8, le=4096)
    vocab: int = Field(256, ge=128, le=65536)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    tie: bool = False

    @field_validator("hidden")
    @classmethod
    def _heads(cls, v):
        if v % 4:
            raise ValueError("hidden must be a multiple of 4 (the toy model has 4 attention heads)")
        return v


class ObserveSpec(_Strict):
    """How often mergeline observes an input it does not produce (a local directory another tool writes, a Hub repo
    that gets new revisions). ``observe: false`` turns observation off, ``observe: 30`` sets the interval."""

    enabled: bool = True
    interval_seconds: int = Field(60, ge=1, le=7 * 86400)


def _observe_shorthand(v: Any) -> Any:
    if isinstance(v, bool):
        return {"enabled": v}
    if isinstance(v, int):
        return {"interval_seconds": v}
    return v


class AutomationSpec(_Strict):
    """Pipeline-wide automation: ``enabled`` attaches the re-merge-on-change condition to derived assets and ships
    the automation sensor running; ``interval_seconds`` is that sensor's tick interval."""

    enabled: bool = True
    interval_seconds: int = Field(30, ge=1, le=86400)


class _ExternalSource(_Node):
    """What base models and adapters share: a local ``path`` or a ``hub`` repo at a ``revision``, watched by an
    observable source asset (``observe``)."""

    path: str | None = None
    hub: str | None = None
    revision: str | None = None
    observe: ObserveSpec | None = None

    @field_validator("observe", mode="before")
    @classmethod
    def _observe(cls, v):
        return _observe_shorthand(v)

    @field_validator("revision", mode="before")
    @classmethod
    def _rev(cls, v):
        return _coerce_str(v)


class BaseModelSpec(_ExternalSource):
    """Exactly one of ``toy``, ``path`` (a local model directory) or ``hub`` (a repo id, with ``revision``)."""

    toy: ToyModelSpec | None = None
    allow_patterns: list[str] | None = None
    architecture: str | None = Field(None, description="declared architecture, e.g. LlamaForCausalLM (hub models)")

    @model_validator(mode="after")
    def _one_source(self):
        if self.toy is not None and self.observe is not None:
            raise ValueError("'observe' only applies to 'path' and 'hub' models (a toy model is built by mergeline)")
        given = [k for k in ("toy", "path", "hub") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of 'toy', 'path' or 'hub'" + (f" (got {', '.join(given)})" if given else ""))
        if self.hub is None and self.revision is not None:
            raise ValueError("'revision' only applies to 'hub' models")
        return self


class GeneratedDatasetSpec(_Strict):
    """A deterministic toy skill dataset (prompt/completion pairs)."""

    kind: Literal["arithmetic", "reverse", "uppercase", "add_digits", "reverse_letters"]
    n: int = Field(300, ge=1, le=1_000_000)
    seed: int = 0


class DatasetSpec(_Node):
    """Exactly one of ``path`` (jsonl/json/parquet files, relative to the pipeline file), ``hub`` (a dataset repo
    id with ``revision``), ``generated`` or ``inline`` (a list of records)."""

    path: Union[str, list[str], None] = None
    hub: str | None = None
    revision: str | None = None
    files: list[str] | None = Field(None, description="glob patterns of the files to use from a Hub dataset")
    generated: GeneratedDatasetSpec | None = None
    inline: list[dict[str, Any]] | None = None
    text_field: str | None = None
    prompt_field: str | None = None
    completion_field: str | None = None
    limit: int | None = Field(None, ge=1)

    @field_validator("revision", mode="before")
    @classmethod
    def _rev(cls, v):
        return _coerce_str(v)

    @model_validator(mode="after")
    def _one_source(self):
        given = [k for k in ("path", "hub", "generated", "inline") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of 'path', 'hub', 'generated' or 'inline'"
                             + (f" (got {', '.join(given)})" if given else ""))
        if self.hub is None and (self.revision is not None or self.files is not None):
            raise ValueError("'revision' and 'files' only apply to 'hub' datasets")
        if self.inline is not None and not self.inline:
            raise ValueError("'inline' is empty")
        if (self.prompt_field is None) != (self.completion_field is None):
            raise ValueError("give both 'prompt_field' and 'completion_field', or neither")
        if self.text_field and self.prompt_field:
            raise ValueError("give 'text_field' or 'prompt_field'/'completion_field', not both")
        return self

    @property
    def paths(self) -> list[str]:
        if self.path is None:
            return []
        return [self.path] if isinstance(self.path, str) else list(self.path)


class FinetuneSpec(_Node):
    """A LoRA fine-tune of ``base`` (a base model or a merge) on one or more datasets. Unset hyper-parameters take
    the trainer resource's defaults."""

    base: str
    dataset: Union[str, list[str]]
    r: int | None = Field(None, ge=1, le=1024)
    alpha: int | None = Field(None, ge=1)
    dropout: float | None = Field(None, ge=0.0, lt=1.0)
    target_modules: list[str] | None = None
    use_rslora: bool | None = None
    use_dora: bool | None = None
    epochs: float | None = Field(None, gt=0)
    max_steps: int | None = Field(None, ge=1)
    learning_rate: float | None = Field(None, gt=0, lt=1)
    batch_size: int | None = Field(None, ge=1)
    max_seq_len: int | None = Field(None, ge=8)
    seed: int | None = None
    backend: Literal["auto", "unsloth", "peft"] | None = None
    load_in_4bit: bool | None = None

    @field_validator("target_modules")
    @classmethod
    def _targets(cls, v):
        if v is not None and not v:
            raise ValueError("target_modules is empty")
        return v

    @property
    def datasets(self) -> list[str]:
        return [self.dataset] if isinstance(self.dataset, str) else list(self.dataset)

    def train_overrides(self) -> dict[str, Any]:
        """The hyper-parameters set in the YAML (``LoraTrainConfig`` field names)."""
        keys = ("r", "alpha", "dropout", "target_modules", "use_rslora", "use_dora", "epochs", "max_steps",
                "learning_rate", "batch_size", "max_seq_len", "seed", "backend", "load_in_4bit")
        return {k: getattr(self, k) for k in keys if getattr(self, k) is not None}


class AdapterSpec(_ExternalSource):
    """A LoRA adapter produced elsewhere: a local PEFT adapter directory or a Hub repo at a pinned revision. ``base``
    names the base model (or merge) it was trained on."""

    base: str
    folder: str | None = Field(None, description="a directory of adapters: one dynamic partition per subdirectory")

    @model_validator(mode="after")
    def _one_source(self):
        given = [k for k in ("path", "hub", "folder") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of 'path', 'hub' or 'folder'" + (f" (got {', '.join(given)})" if given else ""))
        if self.hub is None and self.revision is not None:
            raise ValueError("'revision' only applies to 'hub' adapters")
        return self


#: license identifiers the Hugging Face Hub accepts in a model card (anything else: ``other`` + ``license_name``)
HUB_LICENSES = (
    "apache-2.0", "mit", "openrail", "bigscience-openrail-m", "creativeml-openrail-m", "bigscience-bloom-rail-1.0",
    "bigcode-openrail-m", "afl-3.0", "artistic-2.0", "bsl-1.0", "bsd", "bsd-2-clause", "bsd-3-clause",
    "bsd-3-clause-clear", "c-uda", "cc", "cc0-1.0", "cc-by-2.0", "cc-by-2.5", "cc-by-3.0", "cc-by-4.0",
    "cc-by-sa-3.0", "cc-by-sa-4.0", "cc-by-nc-2.0", "cc-by-nc-3.0", "cc-by-nc-4.0", "cc-by-nd-4.0",
    "cc-by-nc-nd-3.0", "cc-by-nc-nd-4.0", "cc-by-nc-sa-2.0", "cc-by-nc-sa-3.0", "cc-by-nc-sa-4.0",
    "cdla-sharing-1.0", "cdla-permissive-1.0", "cdla-permissive-2.0", "wtfpl", "ecl-2.0", "epl-1.0", "epl-2.0",
    "etalab-2.0", "eupl-1.1", "eupl-1.2", "agpl-3.0", "gfdl", "gpl", "gpl-2.0", "gpl-3.0", "lgpl", "lgpl-2.1",
    "lgpl-3.0", "isc", "h-research", "intel-research", "lppl-1.3c", "ms-pl", "apple-ascl", "apple-amlr", "mpl-2.0",
    "odc-by", "odbl", "openrail++", "osl-3.0", "postgresql", "ofl-1.1", "ncsa", "unlicense", "zlib", "pddl",
    "lgpl-lr", "deepfloyd-if-license", "fair-noncommercial-research-license", "llama2", "llama3", "llama3.1",
    "llama3.2", "llama3.3", "llama4", "gemma", "unknown", "other",
)
HUB_TAG_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:+\-]{0,99}$")
GIT_BRANCH_RE = re.compile(r"^(?!-)(?!.*\.\.)(?!.*//)[A-Za-z0-9._\-/]{1,200}(?<![/.])$")


class PublishSpec(_Strict):
    """Push the artifact to a Hugging Face model repo (``create_repo`` + ``upload_folder``) with a model card, after
    every blocking check upstream (eval thresholds) passed."""

    repo: str = Field(description="owner/name of the model repo")
    private: bool = True
    license: str | None = Field(None, description="Hub license id; default: the inputs' common license, or 'other'")
    license_name: str | None = None
    license_link: str | None = None
    branch: str = "main"
    tags: list[str] = Field(default_factory=list)
    commit_message: str | None = None

    @field_validator("repo")
    @classmethod
    def _repo(cls, v):
        if not HUB_ID_RE.match(v):
            raise ValueError(f"'{v}' is not a Hub repo id (owner/name)")
        return v

    @field_validator("license")
    @classmethod
    def _license(cls, v):
        if v is not None and v not in HUB_LICENSES:
            hint = difflib.get_close_matches(v.lower(), HUB_LICENSES, n=1)
            raise ValueError(f"'{v}' is not a license id the Hub accepts" + (f" (did you mean '{hint[0]}'?)" if hint
                                                                              else "")
                             + "; use 'other' with license_name/license_link for a custom license")
        return v

    @field_validator("branch", mode="before")
    @classmethod
    def _branch(cls, v):
        v = _coerce_str(v)
        if isinstance(v, str) and (not GIT_BRANCH_RE.match(v) or v.startswith("refs/")):
            raise ValueError(f"'{v}' is not a valid branch name")
        return v

    @field_validator("tags")
    @classmethod
    def _tags(cls, v):
        for t in v:
            if not HUB_TAG_RE.match(t):
                raise ValueError(f"tag '{t}' must be 1-100 letters, digits, '_', '.', ':', '+', '-' (no spaces)")
        return list(dict.fromkeys(v))

    @model_validator(mode="after")
    def _custom_license(self):
        if (self.license_name or self.license_link) and self.license not in (None, "other"):
            raise ValueError("license_name/license_link only apply to license: other")
        return self


class MergeSpec(_Node):
    """A merge in MergeKit vocabulary. Model references are node names: a base model, a merge, a fine-tune or an
    adapter (applied to the base it was trained on), or ``model+adapter`` to apply an adapter/fine-tune's LoRA to
    another model explicitly."""

    method: str = Field(validation_alias=AliasChoices("method", "merge_method"))
    base_model: str | None = None
    models: list[ModelEntry] | None = None
    slices: list[SliceSpec] | None = None
    parameters: dict[str, ParamValue] = Field(default_factory=dict)
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: str | None = None
    chat_template: str | None = None
    seed: int = 0
    publish: PublishSpec | None = None

    @field_validator("dtype", "out_dtype")
    @classmethod
    def _dtype(cls, v):
        return normalize_dtype(v)

    @model_validator(mode="after")
    def _shape(self):
        check_models_or_slices(self.models, self.slices)
        return self

    def references(self) -> list[tuple[str, str]]:
        """(YAML path relative to the merge, reference) for every model reference, in order."""
        out: list[tuple[str, str]] = []
        if self.base_model:
            out.append(("base_model", self.base_model))
        for i, m in enumerate(self.models or []):
            out.append((f"models[{i}].model", m.model))
        for k, s in enumerate(self.slices or []):
            if s.base_model:
                out.append((f"slices[{k}].base_model", s.base_model))
            for j, src in enumerate(s.sources):
                out.append((f"slices[{k}].sources[{j}].model", src.model))
        return out


class ExportSpec(_Node):
    """A quantized or re-cast copy of a model (``export/<pipeline>/<name>``): GGUF (llama.cpp), bitsandbytes 4-bit, or
    safetensors in another dtype; gated by the blocking checks of the model's evals."""

    model: str
    type: Literal["gguf", "bnb", "safetensors"]
    quant: str | None = None
    push_to_hub: str | None = None
    publish: PublishSpec | None = None
    fidelity: bool = Field(True, description="measure logit fidelity against the unquantized model on a fixed "
                                              "prompt set (loads both models whole: turn off for very large models)")

    @field_validator("quant")
    @classmethod
    def _quant(cls, v, info: ValidationInfo):
        typ = info.data.get("type")
        if v is None or typ is None:
            return v
        allowed = {"gguf": GGUF_QUANTS, "bnb": BNB_QUANTS, "safetensors": ("float32", "float16", "bfloat16")}[typ]
        if v.lower() not in allowed:
            hint = difflib.get_close_matches(v.lower(), allowed, n=1)
            raise ValueError(f"unknown {typ} quant type '{v}'" + (f" (did you mean '{hint[0]}'?)" if hint else "")
                             + f"; one of {', '.join(allowed)}")
        return v.lower()

    @field_validator("push_to_hub")
    @classmethod
    def _repo(cls, v):
        if v is not None and not HUB_ID_RE.match(v):
            raise ValueError(f"'{v}' is not a Hub repo id (owner/name)")
        return v

    @model_validator(mode="after")
    def _push_to_hub_shorthand(self):
        """``push_to_hub: owner/name`` is short for ``publish: {repo: owner/name}``."""
        if self.push_to_hub is not None:
            if self.publish is not None:
                raise ValueError("give 'publish' or its shorthand 'push_to_hub', not both")
            self.publish = PublishSpec(repo=self.push_to_hub)
        return self

    @model_validator(mode="after")
    def _default_quant(self):
        if self.quant is None:
            self.quant = {"gguf": "q8_0", "bnb": "nf4", "safetensors": "bfloat16"}[self.type]
        return self


#: metrics of a perplexity task (lm-eval ``loglikelihood_rolling``); the first is what checks use by default
PERPLEXITY_METRICS = ("word_perplexity", "byte_perplexity", "bits_per_byte")
PERPLEXITY_SUFFIXES = (".txt", ".md", ".jsonl")


class EvalTaskSpec(_Strict):
    """One eval task: an lm-eval task by ``name`` (found in the eval's ``include`` folders, in ``path``, or among
    lm-eval's built-in tasks when the evaluator resource has ``include_defaults``), or with ``perplexity:`` a
    perplexity task named ``name`` over a held-out text file."""

    name: str
    path: str | None = Field(None, description="a local lm-eval task YAML file, or a folder of them, defining 'name'")
    metric: str | None = Field(None, description="the metric checks and summaries use (default: the task's first)")
    threshold: float | None = Field(None, description="shorthand for a blocking check 'metric >= threshold'")
    perplexity: str | None = Field(None, description="a held-out text file (.txt/.md paragraphs, or .jsonl)")
    text_field: str | None = Field(None, description="the text field of a .jsonl perplexity file (default 'text')")

    @model_validator(mode="after")
    def _kind(self):
        if self.path is not None and self.perplexity is not None:
            raise ValueError("give 'path' (an lm-eval task YAML or folder) or 'perplexity' (a text file), not both")
        if self.path is not None and Path(self.path).suffix.lower() in (".jsonl", ".json", ".txt", ".md"):
            raise ValueError(f"'path: {self.path}' must be an lm-eval task YAML or a folder of them; for perplexity "
                             f"on a text file write 'perplexity: {self.path}'")
        if self.perplexity is not None and Path(self.perplexity).suffix.lower() not in PERPLEXITY_SUFFIXES:
            raise ValueError(f"perplexity file '{self.perplexity}' must be .txt, .md (one document per paragraph) or "
                             f".jsonl (one document per record)")
        if self.text_field is not None and not (self.perplexity or "").lower().endswith(".jsonl"):
            raise ValueError("'text_field' only applies to a .jsonl 'perplexity' file")
        if self.perplexity is not None and self.metric is not None and self.metric not in PERPLEXITY_METRICS:
            raise ValueError(f"a perplexity task reports {', '.join(PERPLEXITY_METRICS)}, not '{self.metric}'")
        return self


class EvalCheckSpec(_Strict):
    """A Dagster asset check on an eval: each bound given must hold for the evaluated model's score on ``task``
    (``metric``, default: the task's metric). ``min_ratio_of_best_parent: 0.95``: score >= 0.95 x the best
    ``compare_to`` model's score (best = highest); ``max_ratio_of_best_parent: 1.1``: score <= 1.1 x the best (lowest)
    parent score, for lower-is-better metrics such as perplexity. ``blocking`` checks that fail stop downstream
    assets in the same run."""

    task: str
    metric: str | None = None
    min: float | None = None
    max: float | None = None
    min_ratio_of_best_parent: float | None = Field(None, gt=0)
    max_ratio_of_best_parent: float | None = Field(None, gt=0)
    blocking: bool = True
    name: str | None = Field(None, description="the asset check's name (default: derived from task and bounds)")
    description: str | None = None

    @model_validator(mode="after")
    def _bounds(self):
        if all(getattr(self, k) is None for k in ("min", "max", "min_ratio_of_best_parent",
                                                  "max_ratio_of_best_parent")):
            raise ValueError("give at least one of 'min', 'max', 'min_ratio_of_best_parent', "
                             "'max_ratio_of_best_parent'")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min {self.min} is above max {self.max}: no score can pass")
        if self.name is not None and not NAME_RE.match(self.name):
            raise ValueError(f"check name '{self.name}' must be letters, digits and underscores")
        return self

    @property
    def uses_parents(self) -> bool:
        return self.min_ratio_of_best_parent is not None or self.max_ratio_of_best_parent is not None

    def check_name(self) -> str:
        if self.name:
            return self.name
        parts = [self.task] + ([self.metric] if self.metric else [])
        for k, label in (("min", "min"), ("max", "max"), ("min_ratio_of_best_parent", "vs_best_parent"),
                         ("max_ratio_of_best_parent", "vs_best_parent")):
            if getattr(self, k) is not None and label not in parts:
                parts.append(label)
        return re.sub(r"[^A-Za-z0-9_]", "_", "_".join(parts))


def _task_ref_kind(v: Any) -> str:
    return "str" if isinstance(v, str) else "EvalTaskSpec"


#: a task is a name or a mapping; the discriminator keeps a bad mapping from also reporting "not a valid string"
_EvalTaskRef = Annotated[Union[Annotated[str, Tag("str")], Annotated[EvalTaskSpec, Tag("EvalTaskSpec")]],
                         Discriminator(_task_ref_kind)]


class EvalSpec(_Node):
    """lm-eval tasks run on ``model`` and on each ``compare_to`` model (fine-tunes and adapters are evaluated as their
    base + LoRA), with asset checks (``checks``, ``thresholds``) that can block downstream assets."""

    model: str
    tasks: list[_EvalTaskRef]
    thresholds: dict[str, float] = Field(default_factory=dict)
    compare_to: list[str] = Field(default_factory=list)
    limit: int | None = Field(None, ge=1)
    batch_size: int = Field(8, ge=1)
    include: list[str] = Field(default_factory=list,
                               description="folders (or files) of local lm-eval task YAMLs, relative to the pipeline")
    checks: list[EvalCheckSpec] = Field(default_factory=list)
    add_bos_token: bool | None = Field(
        None, description="make the tokenizer prepend BOS (models trained by mergeline saw BOS first)")
    num_fewshot: int | None = Field(None, ge=0)

    @field_validator("tasks")
    @classmethod
    def _tasks(cls, v):
        if not v:
            raise ValueError("'tasks' is empty")
        names = [t if isinstance(t, str) else t.name for t in v]
        if len(set(names)) != len(names):
            raise ValueError("task names must be unique")
        return v

    @field_validator("thresholds")
    @classmethod
    def _thresholds(cls, v, info: ValidationInfo):
        tasks = info.data.get("tasks")
        if tasks is None:
            return v
        names = [t if isinstance(t, str) else t.name for t in tasks]
        for k in v:
            if k not in names:
                hint = difflib.get_close_matches(k, names, n=1)
                raise ValueError(f"'{k}' is not one of the tasks" + (f" (did you mean '{hint[0]}'?)" if hint else "")
                                 + f"; tasks: {', '.join(names)}")
        return v

    def task_names(self) -> list[str]:
        return [t if isinstance(t, str) else t.name for t in self.tasks]

    def task_specs(self) -> list[EvalTaskSpec]:
        """Every task as an :class:`EvalTaskSpec` (a bare name becomes ``EvalTaskSpec(name=...)``)."""
        return [EvalTaskSpec(name=t) if isinstance(t, str) else t for t in self.tasks]

    def task_metric(self, task: str) -> str | None:
        """The metric a task is judged by when a check names none (None: the first metric lm-eval reports)."""
        for t in self.task_specs():
            if t.name == task:
                return t.metric or (PERPLEXITY_METRICS[0] if t.perplexity else None)
        return None

    def all_checks(self) -> list[EvalCheckSpec]:
        """``checks`` plus the shorthands: ``thresholds: {task: x}`` and a task's ``threshold: x`` are blocking
        ``min: x`` checks on the task's metric."""
        out = list(self.checks)
        for t in self.task_specs():
            if t.threshold is not None:
                out.append(EvalCheckSpec(task=t.name, min=t.threshold))
        for task, x in self.thresholds.items():
            out.append(EvalCheckSpec(task=task, min=x))
        return out


class ScheduleSpec(_Strict):
    cron: str
    target: Union[str, list[str]] = "*"
    upstream: bool = True
    timezone: str = "UTC"
    tags: dict[str, str] = Field(default_factory=dict)
    description: str | None = None
    enabled: bool = Field(True, description="ship the schedule running (false: stopped until turned on in the UI)")

    @field_validator("tags", mode="before")
    @classmethod
    def _tag_values(cls, v):
        if isinstance(v, dict):
            return {k: _coerce_str(x) for k, x in v.items()}
        return v

    @field_validator("cron")
    @classmethod
    def _cron(cls, v):
        msg = check_cron(v)
        if msg:
            raise ValueError(msg)
        return v

    @field_validator("timezone")
    @classmethod
    def _tz(cls, v):
        from zoneinfo import ZoneInfo

        try:
            ZoneInfo(v)
        except Exception:
            raise ValueError(f"unknown timezone '{v}' (use an IANA name such as UTC or Europe/Berlin)") from None
        return v

    @property
    def targets(self) -> list[str]:
        return [self.target] if isinstance(self.target, str) else list(self.target)


class PipelineSpec(_Labelled):
    name: str
    description: str | None = None
    owners: list[str] = Field(default_factory=list)
    tags: dict[str, str] = Field(default_factory=dict)
    code_version: str | None = None
    base_models: dict[str, BaseModelSpec] = Field(default_factory=dict)
    datasets: dict[str, DatasetSpec] = Field(default_factory=dict)
    finetunes: dict[str, FinetuneSpec] = Field(default_factory=dict)
    adapters: dict[str, AdapterSpec] = Field(default_factory=dict)
    merges: dict[str, MergeSpec] = Field(default_factory=dict)
    exports: dict[str, ExportSpec] = Field(default_factory=dict)
    evals: dict[str, EvalSpec] = Field(default_factory=dict)
    schedules: dict[str, ScheduleSpec] = Field(default_factory=dict)
    automation: AutomationSpec = Field(default_factory=AutomationSpec)

    _source: str = PrivateAttr("<pipeline>")
    _base_dir: Path = PrivateAttr(default_factory=Path.cwd)
    _warnings: list[str] = PrivateAttr(default_factory=list)


    @field_validator("base_models", "datasets", "finetunes", "adapters", "merges", "exports", "evals", "schedules",
                     mode="before")
    @classmethod
    def _none_is_empty(cls, v):
        return {} if v is None else v

    @field_validator("automation", mode="before")
    @classmethod
    def _automation_shorthand(cls, v):
        if v is None:
            return {}
        return {"enabled": v} if isinstance(v, bool) else v

    # -- accessors ---------------------------------------------------------------------------------------------------
    @property
    def source(self) -> str:
        return self._source

    @property
    def base_dir(self) -> Path:
        return self._base_dir

    @property
    def warnings(self) -> list[str]:
        return list(self._warnings)

    def resolve_path(self, p: str) -> Path:
        """A path from the YAML: ``~`` and ``$VARS`` expanded, relative paths taken from the pipeline file's folder."""
        q = Path(os.path.expandvars(os.path.expanduser(p)))
        return q if q.is_absolute() else (self._base_dir / q)

    def section_of(self, name: str) -> str | None:
        for sec in MODEL_SECTIONS:
            if name in getattr(self, sec):
                return sec
        return None

    def node(self, section: str, name: str) -> Any:
        return getattr(self, section)[name]

    def fingerprint(self) -> str:
        """sha256 of the validated spec (what a code location serves)."""
        return hashlib.sha256(json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()

    def summary(self) -> str:
        parts = []
        for sec, label in SECTIONS.items():
            n = len(getattr(self, sec))
            if n:
                parts.append(f"{n} {label}" + ("" if n == 1 else "s"))
        return f"pipeline '{self.name}': " + (", ".join(parts) if parts else "empty")


# -- helpers ---------------------------------------------------------------------------------------------------------

_CRON_ALIASES = {"@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly"}
_CRON_FIELD = re.compile(r"^(\*|\?|[0-9A-Za-z]+(-[0-9A-Za-z]+)?)(/[0-9]+)?(,(\*|[0-9A-Za-z]+(-[0-9A-Za-z]+)?)(/[0-9]+)?)*$")


def check_cron(v: str) -> str | None:
    v = v.strip()
    if v in _CRON_ALIASES:
        return None
    fields = v.split()
    if len(fields) != 5:
        return f"cron '{v}' must have 5 fields (minute hour day-of-month month day-of-week) or be one of " \
               f"{', '.join(sorted(_CRON_ALIASES))}"
    ranges = [(0, 59), (0, 23), (1, 31), (1, 12), (0, 7)]
    names = ["minute", "hour", "day-of-month", "month", "day-of-week"]
    for f, (lo, hi), n in zip(fields, ranges, names):
        if not _CRON_FIELD.match(f):
            return f"cron '{v}': bad {n} field '{f}'"
        for num in re.findall(r"(?<![/0-9])([0-9]+)", f):
            if not lo <= int(num) <= hi:
                return f"cron '{v}': {n} value {num} is out of range {lo}-{hi}"
    return None


def _did_you_mean(name: str, candidates: list[str]) -> str:
    hint = difflib.get_close_matches(name, candidates, n=1)
    return f" (did you mean '{hint[0]}'?)" if hint else ""


def _fmt_loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
            continue
        s = str(part)
        # pydantic adds union-branch / validator labels to locations; they are not YAML keys
        if "[" in s or "(" in s or s in ("str", "int", "float", "bool", "list", "dict", "ToyModelSpec",
                                         "GeneratedDatasetSpec", "EvalTaskSpec", "FilteredValue",
                                         "ObserveSpec", "AutomationSpec"):
            continue
        out += ("." if out else "") + s
    return out or "<top level>"


def _allowed_keys(loc: tuple[Any, ...]) -> list[str]:
    """The keys valid at the mapping that holds ``loc[-1]``."""
    model: Any = PipelineSpec
    parts = list(loc[:-1])
    i = 0
    section_models = {"base_models": BaseModelSpec, "datasets": DatasetSpec, "finetunes": FinetuneSpec,
                      "adapters": AdapterSpec, "merges": MergeSpec, "exports": ExportSpec, "evals": EvalSpec,
                      "schedules": ScheduleSpec}
    nested = {"toy": ToyModelSpec, "generated": GeneratedDatasetSpec, "models": ModelEntry, "slices": SliceSpec,
              "tasks": EvalTaskSpec, "checks": EvalCheckSpec, "observe": ObserveSpec,
              "automation": AutomationSpec}
    nested["publish"] = PublishSpec
    from merge_ops.config import SliceSource

    nested_in_slice = {"sources": SliceSource}
    while i < len(parts):
        p = parts[i]
        if isinstance(p, int):
            i += 1
            continue
        if model is PipelineSpec and p == "automation":
            model = AutomationSpec
            i += 1
            continue
        if model is PipelineSpec and p in section_models:
            model = section_models[p]
            i += 2  # skip the node name
            continue
        if p == "parameters" or p == "tags" or p == "inline":
            return []
        nxt = nested.get(p) or (nested_in_slice.get(p) if model is SliceSpec else None)
        if nxt is None:
            return []
        model = nxt
        i += 1
    names = []
    for fname, f in model.model_fields.items():
        alias = f.validation_alias
        if isinstance(alias, AliasChoices):
            names.extend(str(c) for c in alias.choices)
        else:
            names.append(fname)
    return names


def _structure_errors(e: ValidationError) -> list[str]:
    msgs: list[str] = []
    for err in e.errors():
        loc = _fmt_loc(err["loc"])
        if err["type"] == "extra_forbidden":
            key = str(err["loc"][-1])
            allowed = _allowed_keys(err["loc"])
            msgs.append(f"{loc}: unknown key '{key}'" + _did_you_mean(key, allowed)
                        + (f"; allowed here: {', '.join(allowed)}" if allowed else ""))
        elif err["type"] == "missing":
            msgs.append(f"{loc}: required key is missing")
        else:
            msg = err["msg"]
            if msg.startswith("Value error, "):
                msg = msg[len("Value error, "):]
            msgs.append(f"{loc}: {msg}")
    return list(dict.fromkeys(msgs))


class _UniqueKeyLoader(yaml.SafeLoader):
    pass


def _construct_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False):
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key '{key}' (first at line {seen[key] + 1})", key_node.start_mark)
        seen[key] = key_node.start_mark.line
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def read_yaml(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise PipelineSpecError(["file does not exist"], str(path))
    try:
        return yaml.load(path.read_text(), Loader=_UniqueKeyLoader)
    except yaml.YAMLError as e:
        raise PipelineSpecError([f"not valid YAML: {e}"], str(path)) from None


# -- entry points ----------------------------------------------------------------------------------------------------


def load_pipeline(path: str | Path) -> PipelineSpec:
    """Read and validate a pipeline YAML file; relative paths in it are taken from the file's folder."""
    path = Path(path)
    data = read_yaml(path)
    return parse_pipeline(data, source=str(path), base_dir=path.absolute().parent)


def parse_pipeline(data: Any, source: str = "<pipeline>", base_dir: str | Path | None = None,
                   *, check_files: bool = True) -> PipelineSpec:
    """Validate a pipeline mapping. Raises :class:`PipelineSpecError` listing every problem found."""
    if not isinstance(data, dict):
        raise PipelineSpecError([f"<top level>: a pipeline must be a YAML mapping, got {type(data).__name__}"], source)
    try:
        spec = PipelineSpec.model_validate(data)
    except ValidationError as e:
        raise PipelineSpecError(_structure_errors(e), source) from None
    spec._source = source
    spec._base_dir = Path(base_dir).absolute() if base_dir is not None else Path.cwd()
    errors, warnings = _Checker(spec, check_files=check_files).run()
    spec._warnings = warnings
    if errors:
        raise PipelineSpecError(errors, source)
    return spec


def as_spec(spec_or_path: "PipelineSpec | str | Path | dict") -> PipelineSpec:
    if isinstance(spec_or_path, PipelineSpec):
        return spec_or_path
    if isinstance(spec_or_path, dict):
        return parse_pipeline(spec_or_path)
    return load_pipeline(spec_or_path)


# -- meaning ---------------------------------------------------------------------------------------------------------


class ModelInfo:
    """What validation can know about a model node without downloading anything."""

    def __init__(self, architecture: str | None = None, hidden: int | None = None, root: str | None = None,
                 adapter_of: str | None = None):
        self.architecture = architecture
        self.hidden = hidden
        self.root = root  # the full model (base model or merge) this node's weights start from
        self.adapter_of = adapter_of  # for adapters and fine-tunes: the model their LoRA was trained on


class _Checker:
    def __init__(self, spec: PipelineSpec, check_files: bool = True):
        self.s = spec
        self.check_files = check_files
        self.errors: list[str] = []
        self.warnings: list[str] = []
        self._info: dict[str, ModelInfo] = {}

    def err(self, msg: str) -> None:
        self.errors.append(msg)

    def run(self) -> tuple[list[str], list[str]]:
        s = self.s
        self._names()
        self._metadata()
        self._sources()
        self._references()
        self._cycles()
        for name in s.merges:
            self._merge(name)
        self._schedules()
        for name in s.evals:
            self._eval(name)
        self._publish()
        self._folders()
        return self.errors, self.warnings

    def _folders(self) -> None:
        """A ``folder:`` adapter stands for many adapters (one partition each) and gets its own per-adapter merge
        into its base, ``merged/<pipeline>/<name>``; no other node can consume it as one model."""
        s = self.s
        folders = {n for n, a in s.adapters.items() if a.folder is not None}
        if not folders:
            return
        for name, m in s.merges.items():
            for path, ref in m.references():
                for part in ref.split("+"):
                    if part in folders:
                        self.err(f"merges.{name}.{path}: adapter '{part}' is a folder of adapters (one partition "
                                 f"each); it is merged into its base per adapter as merged/{s.name}/{part} and cannot "
                                 f"be an input of another merge")
        for name in folders:
            if name in s.merges:
                continue  # already reported as a duplicate name
            a = s.adapters[name]
            if a.observe is not None and not a.observe.enabled:
                self.err(f"adapters.{name}.observe: a folder of adapters is discovered by observing it; it cannot "
                         f"be turned off")

    # names, owners, tags ------------------------------------------------------------------------------------------
    def _names(self) -> None:
        s = self.s
        if not NAME_RE.match(s.name):
            self.err(f"name: '{s.name}' must be letters, digits and underscores (it becomes the Dagster group name)")
        seen: dict[str, str] = {}
        for sec in SECTIONS:
            for name in getattr(s, sec):
                if not NAME_RE.match(name):
                    self.err(f"{sec}.{name}: node names must be letters, digits and underscores, not starting with a "
                             f"digit (they become asset keys and op names)")
                if sec in MODEL_SECTIONS:
                    if name in seen:
                        self.err(f"{sec}.{name}: the name is also used in {seen[name]}.{name}; base models, adapters, "
                                 f"fine-tunes and merges share one namespace")
                    seen[name] = sec

    def _owners_tags(self, where: str, owners: list[str], tags: dict[str, str]) -> None:
        for i, o in enumerate(owners):
            if not OWNER_RE.match(o):
                self.err(f"{where}owners[{i}]: '{o}' must be an email address or 'team:NAME'")
        for k, v in tags.items():
            if not TAG_KEY_RE.match(k) or k.startswith("dagster/"):
                self.err(f"{where}tags.{k}: tag keys are up to 63 letters, digits, '_', '-', '.' (optionally with one "
                         f"'prefix/'), not under 'dagster/'")
            if not TAG_VALUE_RE.match(str(v)):
                self.err(f"{where}tags.{k}: tag values are up to 63 letters, digits, '_', '-', '.', got {v!r}")

    def _metadata(self) -> None:
        s = self.s
        self._owners_tags("", s.owners, s.tags)
        for sec in SECTIONS:
            for name, node in getattr(s, sec).items():
                if isinstance(node, _Node):
                    self._owners_tags(f"{sec}.{name}.", node.owners, node.tags)
                elif isinstance(node, ScheduleSpec):
                    self._owners_tags(f"{sec}.{name}.", [], node.tags)

    # sources (files, hub ids) --------------------------------------------------------------------------------------
    def _hub_id(self, where: str, repo: str, revision: str | None) -> None:
        if not HUB_ID_RE.match(repo):
            self.err(f"{where}.hub: '{repo}' is not a Hub repo id (owner/name)")
        if revision is None:
            self.err(f"{where}.revision: pin a revision for '{repo}' (a commit sha; a branch or tag is accepted with a "
                     f"warning) so that runs are reproducible")
        elif not COMMIT_RE.match(revision):
            self.warnings.append(f"{where}.revision: '{revision}' is not a commit sha; the content behind it can "
                                 f"change between runs")

    def _sources(self) -> None:
        s = self.s
        for name, b in s.base_models.items():
            where = f"base_models.{name}"
            if b.hub is not None:
                self._hub_id(where, b.hub, b.revision)
            if b.path is not None and self.check_files:
                p = s.resolve_path(b.path)
                if not p.is_dir():
                    self.err(f"{where}.path: model directory '{p}' does not exist")
                elif not (p / "config.json").is_file():
                    self.err(f"{where}.path: '{p}' has no config.json (expected a Hugging Face model directory)")
        for name, a in s.adapters.items():
            where = f"adapters.{name}"
            if a.hub is not None:
                self._hub_id(where, a.hub, a.revision)
            if a.path is not None and self.check_files:
                p = s.resolve_path(a.path)
                if not (p / "adapter_config.json").is_file():
                    msg = f"{where}.path: '{p}' is not a PEFT adapter directory (no adapter_config.json)"
                    if a.observe is None or a.observe.enabled:
                        # observed: the pipeline still loads; the observation reports the adapter missing and the
                        # last good merge stays (an error here would take the whole code location down)
                        self.warnings.append(msg + "; it is observed, so the pipeline loads and the observation "
                                                   "reports it missing")
                    else:
                        self.err(msg)
            if a.folder is not None and self.check_files:
                p = s.resolve_path(a.folder)
                if not p.is_dir():
                    self.warnings.append(f"{where}.folder: '{p}' does not exist (yet); its adapters appear as "
                                         f"partitions once it does")
        for name, d in s.datasets.items():
            where = f"datasets.{name}"
            if d.hub is not None:
                self._hub_id(where, d.hub, d.revision)
            for i, p in enumerate(d.paths):
                suffix = "" if isinstance(d.path, str) else f"[{i}]"
                rp = s.resolve_path(p)
                if rp.suffix.lower() not in (".jsonl", ".json", ".parquet"):
                    self.err(f"{where}.path{suffix}: '{p}' must be a .jsonl, .json or .parquet file")
                elif self.check_files and not rp.is_file():
                    self.err(f"{where}.path{suffix}: file '{rp}' does not exist")
            if d.inline is not None:
                for i, rec in enumerate(d.inline):
                    if not (isinstance(rec.get("text"), str) or (isinstance(rec.get("prompt"), str)
                                                                 and isinstance(rec.get("completion"), str))):
                        self.err(f"{where}.inline[{i}]: each record needs 'text', or 'prompt' and 'completion' "
                                 f"(strings)")
                        break

    # references ---------------------------------------------------------------------------------------------------
    def _model_names(self, sections: tuple[str, ...]) -> list[str]:
        return [n for sec in sections for n in getattr(self.s, sec)]

    def _expect(self, where: str, name: str, sections: tuple[str, ...]) -> bool:
        if any(name in getattr(self.s, sec) for sec in sections):
            return True
        what = " or ".join(", ".join(SECTIONS[x] for x in sections).rsplit(", ", 1))
        other = self.s.section_of(name)
        if other is not None:
            self.err(f"{where}: '{name}' is a {SECTIONS[other]}, but this needs a {what}")
        elif name in self.s.datasets and "datasets" not in sections:
            self.err(f"{where}: '{name}' is a dataset, but this needs a {what}")
        else:
            self.err(f"{where}: no {what} named '{name}'" + _did_you_mean(name, self._model_names(sections)
                                                                            if "datasets" not in sections
                                                                            else list(self.s.datasets)))
        return False

    def _merge_ref(self, where: str, ref: str) -> bool:
        """A merge input: NAME, or MODEL+ADAPTER where ADAPTER is an adapter or fine-tune."""
        if "+" in ref:
            model, _, adapter = ref.partition("+")
            ok = self._expect(f"{where} (before '+')", model, ("base_models", "merges"))
            ok = self._expect(f"{where} (after '+')", adapter, ("adapters", "finetunes")) and ok
            return ok
        return self._expect(where, ref, MODEL_SECTIONS)

    def _references(self) -> None:
        s = self.s
        for name, f in s.finetunes.items():
            self._expect(f"finetunes.{name}.base", f.base, ("base_models", "merges"))
            for i, d in enumerate(f.datasets):
                where = f"finetunes.{name}.dataset" + ("" if isinstance(f.dataset, str) else f"[{i}]")
                if d not in s.datasets:
                    other = s.section_of(d)
                    self.err(f"{where}: " + (f"'{d}' is a {SECTIONS[other]}, not a dataset" if other else
                                             f"no dataset named '{d}'" + _did_you_mean(d, list(s.datasets))))
        for name, a in s.adapters.items():
            self._expect(f"adapters.{name}.base", a.base, ("base_models", "merges"))
        for name, m in s.merges.items():
            for path, ref in m.references():
                self._merge_ref(f"merges.{name}.{path}", ref)
            ts = m.tokenizer_source
            if ts is not None and ts not in ("base", "union") and s.section_of(ts) is None:
                self.err(f"merges.{name}.tokenizer_source: no model named '{ts}' (use 'base' or a model name)"
                         + _did_you_mean(ts, self._model_names(MODEL_SECTIONS)))
        for name, x in s.exports.items():
            self._expect(f"exports.{name}.model", x.model, ("base_models", "finetunes", "merges"))
        for name, e in s.evals.items():
            if e.model not in s.adapters:
                self._expect(f"evals.{name}.model", e.model, ("base_models", "finetunes", "merges"))
            for i, c in enumerate(e.compare_to):
                if c not in s.adapters:
                    self._expect(f"evals.{name}.compare_to[{i}]", c, ("base_models", "finetunes", "merges"))
            for i, t in enumerate(e.tasks):
                if isinstance(t, EvalTaskSpec) and t.path is not None and self.check_files:
                    p = s.resolve_path(t.path)
                    if not p.exists():
                        self.err(f"evals.{name}.tasks[{i}].path: '{p}' does not exist")

    def deps(self, name: str) -> list[tuple[str, str]]:
        """(YAML path, model name) of the model nodes a model node is built from."""
        s = self.s
        sec = s.section_of(name)
        if sec == "finetunes":
            return [(f"finetunes.{name}.base", s.finetunes[name].base)]
        if sec == "adapters":
            return [(f"adapters.{name}.base", s.adapters[name].base)]
        if sec == "merges":
            out = []
            for path, ref in s.merges[name].references():
                for part in ref.split("+"):
                    out.append((f"merges.{name}.{path}", part))
            return out
        return []

    def _cycles(self) -> None:
        state: dict[str, int] = {}
        reported: set[frozenset] = set()

        def visit(n: str, stack: list[tuple[str, str]]) -> None:
            state[n] = 1
            for where, d in self.deps(n):
                if state.get(d) == 1:
                    names = [x for _, x in stack] + [n]
                    cyc = names[names.index(d):] + [d]
                    key = frozenset(cyc)
                    if key not in reported:
                        reported.add(key)
                        self.err(f"{where}: cycle: {' -> '.join(cyc)}")
                elif state.get(d) is None and self.s.section_of(d):
                    visit(d, stack + [(where, n)])
            state[n] = 2

        for sec in MODEL_SECTIONS:
            for n in getattr(self.s, sec):
                if state.get(n) is None:
                    visit(n, [])

    # model knowledge -----------------------------------------------------------------------------------------------
    def info(self, name: str) -> ModelInfo:
        if name in self._info:
            return self._info[name]
        self._info[name] = ModelInfo()  # guards recursion (cycles are rejected before this runs)
        s = self.s
        if "+" in name:
            model, _, adapter = name.partition("+")
            mi = self.info(model)
            info = ModelInfo(mi.architecture, mi.hidden, mi.root)
        elif name in s.base_models:
            b = s.base_models[name]
            arch, hidden = b.architecture, None
            if b.toy is not None:
                arch, hidden = "LlamaForCausalLM", b.toy.hidden
            elif b.path is not None:
                arch, hidden = _config_facts(s.resolve_path(b.path) / "config.json", arch)
            elif b.hub is not None:
                cfg = _cached_hub_config(b.hub, b.revision)
                if cfg is not None:
                    arch, hidden = _config_facts(cfg, arch)
            info = ModelInfo(arch, hidden, name)
        elif name in s.finetunes or name in s.adapters:
            base = (s.finetunes.get(name) or s.adapters.get(name)).base
            bi = self.info(base)
            info = ModelInfo(bi.architecture, bi.hidden, base, adapter_of=base)
        elif name in s.merges:
            m = s.merges[name]
            first = next((self.info(r) for _, r in m.references() if self.info(r).architecture), None)
            info = ModelInfo(first.architecture if first else None, first.hidden if first else None, name)
        else:
            info = ModelInfo()
        self._info[name] = info
        return info

    def _merge(self, name: str) -> None:
        from merge_ops.errors import ConfigError
        from merge_ops.methods import get_method
        from merge_ops.params import check_merge_settings

        s = self.s
        m = s.merges[name]
        where = f"merges.{name}"
        try:
            method = get_method(m.method)
        except ConfigError as e:
            self.err(f"{where}.method: {str(e).split(': ', 1)[1]}")
            return
        try:
            check_merge_settings(method, m.parameters, m.models, m.slices, f"{where}.")
        except ConfigError as e:
            self.err(str(e))
        for p in method.params:
            if p.required and p.scope == "global" and p.name not in m.parameters and not (
                    m.slices and all(p.name in sl.parameters for sl in m.slices)):
                self.err(f"{where}.parameters.{p.name}: required by merge_method '{method.name}' but not set")
            if p.required and p.scope == "model":
                entries = [(f"models[{i}]", e.parameters) for i, e in enumerate(m.models or [])
                           if not (method.base != "none" and e.model == m.base_model)]
                for k, sl in enumerate(m.slices or []):
                    entries += [(f"slices[{k}].sources[{j}]", {**sl.parameters, **src.parameters})
                                for j, src in enumerate(sl.sources)
                                if not (method.base != "none" and src.model == (sl.base_model or m.base_model))]
                for loc, params in entries:
                    if p.name not in params and p.name not in m.parameters:
                        self.err(f"{where}.{loc}.parameters: parameter '{p.name}' is required by merge_method "
                                 f"'{method.name}' (set it here or under {where}.parameters)")
        # arity, as the engine counts it
        if m.models is not None:
            has_base = bool(m.base_model) and method.base != "none"
            nb = [e for e in m.models if not (has_base and e.model == m.base_model)]
            msg = method.check_arity(len(nb), has_base)
            if msg:
                self.err(f"{where}.models: {msg}")
        for k, sl in enumerate(m.slices or []):
            base_ref = sl.base_model or m.base_model
            has_base = bool(base_ref) and method.base != "none"
            nb = [x for x in sl.sources if not (has_base and x.model == base_ref)]
            msg = method.check_arity(len(nb), has_base)
            if msg:
                self.err(f"{where}.slices[{k}].sources: {msg}")
        if method.base == "none" and m.base_model:
            self.warnings.append(f"{where}.base_model: merge_method '{method.name}' does not use a base model; it only "
                                 f"donates config and tokenizer")

        # architectures and hidden sizes
        refs = m.references()
        known = [(path, ref, self.info(ref)) for path, ref in refs]
        anchor = next(((p, r, i) for p, r, i in known if i.architecture), None)
        if anchor is not None:
            for path, ref, i in known:
                if i.architecture and i.architecture != anchor[2].architecture:
                    self.err(f"{where}.{path}: '{ref}' is a {i.architecture} but '{anchor[1]}' ({anchor[0]}) is a "
                             f"{anchor[2].architecture}; only models of one architecture can be merged")
        if m.slices is None:
            anchor = next(((p, r, i) for p, r, i in known if i.hidden), None)
            if anchor is not None:
                for path, ref, i in known:
                    if i.hidden and i.hidden != anchor[2].hidden:
                        self.err(f"{where}.{path}: '{ref}' has hidden size {i.hidden} but '{anchor[1]}' ({anchor[0]}) "
                                 f"has {anchor[2].hidden}; their tensors cannot be merged")

        # adapters / fine-tunes must sit on the merge's base
        if m.base_model and method.base != "none":
            bi = self.info(m.base_model)
            target = bi.adapter_of or bi.root or m.base_model
            for path, ref in refs:
                if "+" in ref or ref == m.base_model:
                    continue
                sec = s.section_of(ref)
                if sec in ("adapters", "finetunes"):
                    own = (s.adapters.get(ref) or s.finetunes.get(ref)).base
                    if own != target:
                        kind = SECTIONS[sec]
                        self.err(f"{where}.{path}: {kind} '{ref}' was trained on '{own}' but this merge's base is "
                                 f"'{target}'; merge it onto '{own}', or write '{target}+{ref}' to apply its LoRA to "
                                 f"'{target}' on purpose")

    def _eval(self, name: str) -> None:
        """Task files, include folders, checks: everything an eval run would trip over, before it runs."""
        s, e, where = self.s, self.s.evals[name], f"evals.{name}"
        for i, c in enumerate(e.compare_to):
            if c == e.model:
                self.err(f"{where}.compare_to[{i}]: '{c}' is the evaluated model itself")
            elif c in e.compare_to[:i]:
                self.err(f"{where}.compare_to[{i}]: '{c}' is listed twice")
        defined: set[str] = set()
        for i, inc in enumerate(e.include):
            p = s.resolve_path(inc)
            if self.check_files and not p.exists():
                self.err(f"{where}.include[{i}]: '{p}' does not exist (a folder of lm-eval task YAMLs, relative to "
                         f"the pipeline file)")
            elif p.exists():
                defined |= _lm_eval_task_names(p)
        for i, t in enumerate(e.tasks):
            if isinstance(t, str):
                if e.include and t not in defined and self.check_files:
                    self.warnings.append(f"{where}.tasks[{i}]: '{t}' is not defined in {where}.include; it must be a "
                                         f"built-in lm-eval task with local data (evaluator include_defaults: true)"
                                         + _did_you_mean(t, sorted(defined)))
                continue
            if t.path is not None and self.check_files:
                p = s.resolve_path(t.path)
                names = _lm_eval_task_names(p) if p.exists() else set()
                if p.exists() and not p.is_dir() and p.suffix.lower() not in (".yaml", ".yml"):
                    self.err(f"{where}.tasks[{i}].path: '{p}' is not a YAML file or a folder")
                elif p.exists() and t.name not in names:
                    self.err(f"{where}.tasks[{i}].path: '{p}' defines no lm-eval task '{t.name}'"
                             + _did_you_mean(t.name, sorted(names))
                             + (f"; it defines {', '.join(sorted(names))}" if names else ""))
            if t.perplexity is not None and self.check_files:
                p = s.resolve_path(t.perplexity)
                if not p.is_file():
                    self.err(f"{where}.tasks[{i}].perplexity: file '{p}' does not exist")
        names = e.task_names()
        seen: dict[str, int] = {}
        for i, c in enumerate(e.checks):
            cw = f"{where}.checks[{i}]"
            if c.task not in names:
                self.err(f"{cw}.task: '{c.task}' is not one of the tasks" + _did_you_mean(c.task, names)
                         + f"; tasks: {', '.join(names)}")
                continue
            ts = next(t for t in e.task_specs() if t.name == c.task)
            if ts.perplexity is not None and c.metric is not None and c.metric not in PERPLEXITY_METRICS:
                self.err(f"{cw}.metric: a perplexity task reports {', '.join(PERPLEXITY_METRICS)}, not '{c.metric}'"
                         + _did_you_mean(c.metric, list(PERPLEXITY_METRICS)))
            if c.uses_parents and not e.compare_to:
                self.err(f"{cw}: a ratio-of-best-parent check needs models to compare with; list them in "
                         f"{where}.compare_to")
        for j, c in enumerate(e.all_checks()):
            n = c.check_name()
            if n in seen:
                self.err(f"{where}.checks: two checks are named '{n}'; give one a distinct 'name:'")
            seen[n] = j

    def _schedules(self) -> None:
        s = self.s
        all_nodes = {f"{sec}.{n}": (sec, n) for sec in SECTIONS if sec not in ("schedules", "exports", "evals")
                     for n in getattr(s, sec)}
        for name, sc in s.schedules.items():
            for i, t in enumerate(sc.targets):
                where = f"schedules.{name}.target" + ("" if isinstance(sc.target, str) else f"[{i}]")
                if t == "*":
                    continue
                if t in all_nodes:
                    continue
                if "." not in t and s.section_of(t) and t in s.datasets:
                    self.err(f"{where}: '{t}' names both a dataset and a {SECTIONS[s.section_of(t)]}; write "
                             f"'datasets.{t}' or '{s.section_of(t)}.{t}'")
                    continue
                if "." not in t and (s.section_of(t) or t in s.datasets):
                    continue
                if t in s.evals or (t.startswith("evals.") and t.partition(".")[2] in s.evals):
                    continue  # evals have assets (eval/<pipeline>/<name>)
                if t in s.exports or (t.startswith("exports.") and t.partition(".")[2] in s.exports):
                    continue  # exports have assets (export/<pipeline>/<name>)
                self.err(f"{where}: no node named '{t}' (use NAME, SECTION.NAME or '*')"
                         + _did_you_mean(t, list(all_nodes) + self._model_names(MODEL_SECTIONS) + list(s.datasets)))


def _publish_check(checker: "_Checker") -> None:
    """Two nodes must not publish to the same repo and branch (the second upload would silently replace the first)."""
    seen: dict[tuple[str, str], str] = {}
    for sec in ("merges", "exports"):
        for name, node in getattr(checker.s, sec).items():
            pub = getattr(node, "publish", None)
            if pub is None:
                continue
            where = f"{sec}.{name}." + ("push_to_hub" if getattr(node, "push_to_hub", None) else "publish.repo")
            key = (pub.repo.lower(), pub.branch)
            if key in seen:
                checker.err(f"{where}: '{pub.repo}' (branch '{pub.branch}') is also published by {seen[key]}; "
                            f"publish each model to its own repo or branch")
            else:
                seen[key] = f"{sec}.{name}"


_Checker._publish = _publish_check  # type: ignore[attr-defined]


class _TolerantYamlLoader(yaml.SafeLoader):
    """Reads lm-eval task YAMLs without running anything: ``!function`` and other tags load as None."""


_TolerantYamlLoader.add_multi_constructor("!", lambda loader, suffix, node: None)


def _lm_eval_task_names(path: Path) -> set[str]:
    """Task and group names defined by an lm-eval YAML file or the YAML files under a folder."""
    files = [path] if path.is_file() else sorted(path.rglob("*.yaml")) if path.is_dir() else []
    names: set[str] = set()
    for f in files:
        try:
            data = yaml.load(f.read_text(), Loader=_TolerantYamlLoader)
        except (OSError, yaml.YAMLError):
            continue
        if isinstance(data, dict):
            for k in ("task", "group"):
                if isinstance(data.get(k), str):
                    names.add(data[k])
    return names


def _config_facts(cfg: Path | dict, arch: str | None) -> tuple[str | None, int | None]:
    try:
        conf = cfg if isinstance(cfg, dict) else json.loads(Path(cfg).read_text())
    except (OSError, ValueError):
        return arch, None
    archs = conf.get("architectures")
    found = archs[0] if isinstance(archs, list) and archs else None
    hidden = conf.get("hidden_size") or conf.get("n_embd") or conf.get("d_model")
    return arch or found, hidden if isinstance(hidden, int) else None


def _cached_hub_config(repo: str, revision: str | None) -> dict | None:
    """config.json of a Hub model if it is in the local Hugging Face cache (never downloads)."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    try:
        p = try_to_load_from_cache(repo, "config.json", revision=revision)
    except Exception:
        return None
    if isinstance(p, (str, Path)) and Path(p).is_file():
        try:
            return json.loads(Path(p).read_text())
        except (OSError, ValueError):
            return None
    return None


def resolve_schedule_targets(spec: PipelineSpec, sc: ScheduleSpec) -> list[tuple[str, str]] | None:
    """(section, name) of the nodes a schedule targets; None means the whole pipeline."""
    if "*" in sc.targets:
        return None
    out = []
    for t in sc.targets:
        if "." in t:
            sec, _, n = t.partition(".")
            out.append((sec, n))
        elif t in spec.datasets:
            out.append(("datasets", t))
        elif t in spec.evals and spec.section_of(t) is None:
            out.append(("evals", t))
        elif t in spec.exports and spec.section_of(t) is None:
            out.append(("exports", t))
        else:
            out.append((spec.section_of(t), t))
    return out


def pipeline_outline(spec: PipelineSpec) -> list[str]:
    """Human-readable lines: every node, what it is built from, and the asset keys it becomes."""
    p = spec.name
    out: list[str] = []
    for name, b in spec.base_models.items():
        src = f"toy Llama {b.toy.num_layers}x{b.toy.hidden}" if b.toy else (f"hub {b.hub}@{b.revision}" if b.hub
                                                                            else f"local {b.path}")
        out.append(f"base_model/{p}/{name}  <- {src}")
    for name, d in spec.datasets.items():
        src = (f"generated {d.generated.kind} x{d.generated.n}" if d.generated else
               f"hub {d.hub}@{d.revision}" if d.hub else f"{len(d.inline)} inline records" if d.inline
               else ", ".join(d.paths))
        out.append(f"dataset/{p}/{name}  <- {src}")
    for name, a in spec.adapters.items():
        if a.folder is not None:
            out.append(f"lora/{p}/{name} + merged/{p}/{name}  <- every adapter in folder {a.folder} (one partition "
                       f"each), merged into {a.base}")
            continue
        src = f"hub {a.hub}@{a.revision}" if a.hub else f"local {a.path}"
        out.append(f"lora/{p}/{name}  <- {src} (for {a.base})")
    for name, f in spec.finetunes.items():
        out.append(f"finetune/{p}/{name} + lora/{p}/{name}  <- LoRA on {f.base} with {', '.join(f.datasets)}")
    for name, m in spec.merges.items():
        refs = list(dict.fromkeys(r for _, r in m.references()))
        out.append(f"merged/{p}/{name}  <- {m.method}({', '.join(refs)})")
    for name, x in spec.exports.items():
        out.append(f"export/{p}/{name}  <- {x.type} {x.quant} of {x.model}")
    for name, e in spec.evals.items():
        out.append(f"eval/{p}/{name}  <- {', '.join(e.task_names())} on {e.model}"
                   + (f" vs {', '.join(e.compare_to)}" if e.compare_to else "")
                   + (f"; {len(e.all_checks())} check(s)" if e.all_checks() else ""))
    for sec in ("merges", "exports"):
        for name, node in getattr(spec, sec).items():
            pub = getattr(node, "publish", None)
            if pub is not None:
                gates = [e for e, ev in spec.evals.items() if ev.model == (name if sec == "merges" else node.model)]
                out.append(f"published/{p}/{name}  <- Hub repo {pub.repo} (branch {pub.branch}, "
                           f"{'private' if pub.private else 'public'})"
                           + (f", gated by evals {', '.join(gates)}" if gates else ""))
    for name, sc in spec.schedules.items():
        out.append(f"schedule {name}: '{sc.cron}' ({sc.timezone}) -> {', '.join(sc.targets)}"
                   + (" and upstream" if sc.upstream and "*" not in sc.targets else ""))
    return out
