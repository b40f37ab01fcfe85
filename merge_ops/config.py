"""MergeKit-style merge configs as strict pydantic models.

Strict on purpose: MergeKit silently ignores many typos (``desnity: 0.5`` merges with the default density). Here an
unknown key, method or parameter is an error at parse time, with the YAML path and the closest valid spelling, before
any model is opened.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import ConfigError

DTYPE_ALIASES = {
    "float32": "float32", "fp32": "float32", "f32": "float32",
    "float16": "float16", "fp16": "float16", "f16": "float16", "half": "float16",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
    "float64": "float64", "fp64": "float64", "f64": "float64",
}


def normalize_dtype(v: str | None) -> str | None:
    """Canonical dtype name (float32, float16, bfloat16, float64) from MergeKit's spellings; shared with the
    pipeline spec's merge nodes."""
    if v is None:
        return v
    key = str(v).lower().replace("torch.", "")
    if key not in DTYPE_ALIASES:
        raise ValueError(f"unknown dtype '{v}'; use one of float32, float16, bfloat16, float64")
    return DTYPE_ALIASES[key]


def check_models_or_slices(models: list | None, slices: list | None) -> None:
    """A merge lists its inputs either under ``models`` or under ``slices``, never both, never empty."""
    if (models is None) == (slices is None):
        raise ValueError("give exactly one of 'models' or 'slices'")
    if models is not None and not models:
        raise ValueError("'models' is empty")
    if slices is not None and not slices:
        raise ValueError("'slices' is empty")


class FilteredValue(BaseModel):
    """One entry of a ``[{filter, value}]`` parameter list: applies to tensors whose name contains ``filter``."""

    model_config = ConfigDict(extra="forbid")
    filter: str | None = None
    value: Union[float, list[float]]

    @field_validator("value")
    @classmethod
    def _non_empty(cls, v):
        if isinstance(v, list) and not v:
            raise ValueError("a gradient list needs at least one value")
        return v


ParamValue = Union[bool, float, str, list[float], list[FilteredValue]]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


def _model_ref(v: str | None) -> str | None:
    if v is not None and not v.strip():
        raise ValueError("model reference is empty; give a directory, a Hub repo id or 'model+adapter'")
    return v


class ModelEntry(_Strict):
    model: str
    parameters: dict[str, ParamValue] = Field(default_factory=dict)

    _ref = field_validator("model")(classmethod(lambda cls, v: _model_ref(v)))


class SliceSource(_Strict):
    model: str
    layer_range: tuple[int, int]
    parameters: dict[str, ParamValue] = Field(default_factory=dict)

    _ref = field_validator("model")(classmethod(lambda cls, v: _model_ref(v)))

    @field_validator("layer_range", mode="before")
    @classmethod
    def _pair(cls, v):
        if not isinstance(v, (list, tuple)) or len(v) != 2 or not all(type(x) is int for x in v):
            raise ValueError(f"layer_range must be [start, end]: two integers, got {v!r}")
        return v

    @field_validator("layer_range")
    @classmethod
    def _range(cls, v):
        if v[0] < 0 or v[1] <= v[0]:
            raise ValueError(f"layer_range {list(v)} must be [start, end) with 0 <= start < end")
        return v


class SliceSpec(_Strict):
    sources: list[SliceSource]
    parameters: dict[str, ParamValue] = Field(default_factory=dict)
    base_model: str | None = None

    @field_validator("sources")
    @classmethod
    def _non_empty(cls, v):
        if not v:
            raise ValueError("a slice needs at least one source")
        lengths = {s.layer_range[1] - s.layer_range[0] for s in v}
        if len(lengths) > 1:
            raise ValueError(f"all sources of a slice must span the same number of layers, got {sorted(lengths)}")
        return v


class TokenizerSpec(_Strict):
    source: str = "base"


class MergeConfig(_Strict):
    merge_method: str
    base_model: str | None = None
    models: list[ModelEntry] | None = None
    slices: list[SliceSpec] | None = None
    parameters: dict[str, ParamValue] = Field(default_factory=dict)
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: str | None = None
    tokenizer: TokenizerSpec | None = None
    chat_template: str | None = None

    @field_validator("dtype", "out_dtype")
    @classmethod
    def _dtype(cls, v):
        return normalize_dtype(v)

    _ref = field_validator("base_model")(classmethod(lambda cls, v: _model_ref(v)))

    @field_validator("chat_template")
    @classmethod
    def _template(cls, v):
        """Checked here, at parse time: the template is written after the merge, too late to fail cheaply."""
        if v is None or v in ("chatml", "auto", "base"):
            return v
        if "{" not in v:
            raise ValueError(f"'{v}' is neither a known template name (chatml, auto) nor a Jinja template")
        try:
            import jinja2
        except ImportError:  # pragma: no cover - jinja2 comes with transformers
            return v
        try:
            jinja2.Environment().parse(v)
        except jinja2.TemplateSyntaxError as e:
            raise ValueError(f"the Jinja template does not parse (template line {e.lineno}: {e.message})") from None
        return v

    @model_validator(mode="after")
    def _shape(self):
        check_models_or_slices(self.models, self.slices)
        if self.tokenizer_source and self.tokenizer:
            raise ValueError("give 'tokenizer_source' or 'tokenizer', not both")
        return self

    @property
    def tokenizer_from(self) -> str:
        if self.tokenizer is not None:
            return self.tokenizer.source
        return self.tokenizer_source or "base"

    def all_model_refs(self) -> list[str]:
        """Every model reference in order of first appearance (base first)."""
        refs: list[str] = []
        if self.base_model:
            refs.append(self.base_model)
        for m in self.models or []:
            refs.append(m.model)
        for s in self.slices or []:
            if s.base_model:
                refs.append(s.base_model)
            for src in s.sources:
                refs.append(src.model)
        seen: dict[str, None] = {}
        for r in refs:
            seen.setdefault(r, None)
        return list(seen)


def _loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("function-after[_non_empty(), list[FilteredValue]]",) or "function" in str(part):
            continue
        else:
            out += ("." if out else "") + str(part)
    return out or "<top level>"


_TOP_KEYS = list(MergeConfig.model_fields) + ["tokenizer"]


def parse_config(data: Any, source: str = "<config>") -> MergeConfig:
    """Validate a config mapping; errors name the source file, the YAML path, and suggest a fix."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: a merge config must be a YAML mapping, got {type(data).__name__}")
    try:
        return MergeConfig.model_validate(data)
    except ValidationError as e:
        msgs = []
        for err in e.errors():
            loc = _loc(err["loc"])
            ploc = _param_loc(err["loc"])
            value = _value_at(data, ploc) if ploc is not None else None
            if ploc is not None and isinstance(value, list) and any(isinstance(v, dict) for v in value):
                # meant as a {filter, value} list: only that branch's complaints are useful
                if err["loc"][len(ploc)] == "list[FilteredValue]":
                    rest = tuple(p for p in err["loc"][len(ploc) + 1:] if not str(p).startswith("function-"))
                    text = "required key is missing" if err["type"] == "missing" else \
                        err["msg"].removeprefix("Value error, ")
                    if err["type"] == "extra_forbidden":
                        text = f"unknown key '{rest[-1]}' in a {{filter, value}} entry (allowed: filter, value)"
                    elif "value" in rest and rest[-1] != "value":  # the value's own union (number | list)
                        rest = rest[: rest.index("value") + 1]
                        text = (f"expected a number or a list of numbers, got "
                                f"{_describe(_value_at(data, ploc + rest))}")
                    msgs.append(f"{_loc(ploc + rest)}: {text}")
            elif ploc is not None:  # a parameter value matched none of the union's shapes: one message, not five
                msgs.append(f"{_loc(ploc)}: expected a number, true/false, a list of numbers (a gradient) or a list of "
                            f"{{filter, value}} entries, got {_describe(_value_at(data, ploc))}")
            elif err["type"] == "extra_forbidden":
                key = str(err["loc"][-1])
                allowed = _allowed_keys_at(err["loc"])
                hint = difflib.get_close_matches(key, allowed, n=1)
                msgs.append(f"{loc}: unknown key '{key}'" + (f" (did you mean '{hint[0]}'?)" if hint else "")
                            + (f"; allowed here: {', '.join(allowed)}" if allowed else ""))
            elif err["type"] == "missing":
                msgs.append(f"{loc}: required key is missing")
            else:
                msgs.append(f"{loc}: {err['msg'].removeprefix('Value error, ')}")
        # pydantic reports each union branch separately for parameter values; keep messages unique and readable
        uniq = list(dict.fromkeys(msgs))
        raise ConfigError(f"{source}: invalid merge config:\n  " + "\n  ".join(uniq)) from None


_UNION_TAGS = ("bool", "float", "str", "list[float]", "list[FilteredValue]")


def _param_loc(loc: tuple[Any, ...]) -> tuple[Any, ...] | None:
    """For an error inside a parameter value (``...parameters.<name>.<union branch>...``), the location of the
    value itself; else None."""
    for i, part in enumerate(loc[:-1]):
        if part == "parameters" and i + 2 < len(loc) and loc[i + 2] in _UNION_TAGS:
            return loc[:i + 2]
    return None


def _value_at(data: Any, loc: tuple[Any, ...]) -> Any:
    for part in loc:
        try:
            data = data[part]
        except (KeyError, IndexError, TypeError):
            return None
    return data


def _describe(v: Any) -> str:
    text = repr(v)
    return f"{type(v).__name__} {text if len(text) <= 60 else text[:57] + '...'}" if v is not None else "null"


def _allowed_keys_at(loc: tuple[Any, ...]) -> list[str]:
    parts = [p for p in loc[:-1] if not isinstance(p, int)]
    model: type[BaseModel] = MergeConfig
    mapping = {"models": ModelEntry, "slices": SliceSpec, "sources": SliceSource, "tokenizer": TokenizerSpec}
    for p in parts:
        if p in mapping:
            model = mapping[p]
        elif p == "parameters":
            return []
    return list(model.model_fields)


class _StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses duplicate mapping keys. PyYAML silently keeps the last of two equal keys, so
    a config with ``weight:`` set twice would merge with whichever came last; here it is an error naming the key and
    both lines. YAML merge keys (``<<: *anchor``) are not duplicates: explicit keys override merged ones as usual."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict[Any, yaml.Node] = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node, deep=True)
        try:
            first = seen.get(key)
        except TypeError:  # an unhashable key: the base constructor reports it
            continue
        if first is not None:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key '{key}' (first set on line {first.start_mark.line + 1}); remove one of them",
                key_node.start_mark)
        seen[key] = key_node
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def load_yaml(path: Path, what: str = "config") -> Any:
    """Read a YAML file with duplicate keys refused; errors name the file and line."""
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the {what} file ({e.strerror})") from e
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: the {what} file is not UTF-8 text ({e})") from e
    try:
        data = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except RecursionError:
        raise ConfigError(f"{path}: the {what} is nested too deeply to be a merge config") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        detail = "; ".join(str(x) for x in (getattr(e, "context", None), getattr(e, "problem", None)) if x) or str(e)
        raise ConfigError(f"{where}: not valid YAML (line {mark.line + 1 if mark else '?'}): {detail}") from None
    if _expanded_size(data, {}) > MAX_YAML_VALUES:
        raise ConfigError(f"{path}: the {what} expands to more than {MAX_YAML_VALUES} values through YAML aliases "
                          f"(an alias bomb?); write it out without nested aliases")
    return data


#: a merge config is small; anchors/aliases that expand beyond this are an attack on the validator, not a config
MAX_YAML_VALUES = 100_000


def _expanded_size(obj: Any, memo: dict[int, int]) -> int:
    """Number of values ``obj`` has once aliases are expanded (what validation would walk), computed without
    expanding: shared sub-objects are counted once per reference via ``memo``."""
    if not isinstance(obj, (dict, list)):
        return 1
    if id(obj) in memo:
        return memo[id(obj)]
    memo[id(obj)] = 1  # a self-referencing alias ends here
    items = list(obj.items()) if isinstance(obj, dict) else [(None, v) for v in obj]
    n = 1 + sum(_expanded_size(v, memo) for _, v in items)
    memo[id(obj)] = n
    return n


def load_config(path: str | Path) -> MergeConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file does not exist" if not path.exists() else
                          f"{path}: is not a file; give the path of a YAML merge config")
    data = load_yaml(path)
    if data is None:
        raise ConfigError(f"{path}: the config file is empty; it needs at least merge_method and models (or slices)")
    return parse_config(data, str(path))
