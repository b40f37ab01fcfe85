"""Resolving MergeKit parameter values for one tensor.

A value is a scalar, a gradient (list of numbers sampled along the layer stack) or a list of ``{filter, value}``
(first entry whose filter is a substring of the tensor name wins; an entry without filter matches everything).
Precedence: per-model (source) > slice > global > method default; a filtered list with no matching entry falls
through to the next level.
"""

from __future__ import annotations

from typing import Any, Sequence

from .config import FilteredValue
from .errors import ConfigError
from .methods.base import MergeMethod, ParamSpec

_UNSET = object()


def sample_gradient(values: Sequence[float], t: float) -> float:
    """Sample a gradient list at t ∈ [0, 1] with linear interpolation (position t·(K−1))."""
    k = len(values)
    if k == 1:
        return float(values[0])
    pos = max(0.0, min(1.0, t)) * (k - 1)
    lo = int(pos)
    if lo >= k - 1:
        return float(values[-1])
    frac = pos - lo
    return float(values[lo]) * (1.0 - frac) + float(values[lo + 1]) * frac


def resolve_value(value: Any, tensor_name: str, t: float) -> Any:
    """The concrete value of one parameter setting for a tensor at layer position t, or _UNSET if a filter list
    has no matching entry."""
    if isinstance(value, list):
        if value and isinstance(value[0], FilteredValue):
            for entry in value:
                if entry.filter is None or entry.filter in tensor_name:
                    return resolve_value(entry.value, tensor_name, t)
            return _UNSET
        return sample_gradient(value, t)
    return value


def check_settings(method: type[MergeMethod], settings: dict[str, Any], where: str, level: str) -> None:
    """Reject unknown parameters and parameters set at a level where they are not allowed (before any math)."""
    import difflib

    names = [p.name for p in method.params]
    for key, value in settings.items():
        spec = method.spec(key)
        if spec is None:
            hint = difflib.get_close_matches(key, names, n=1)
            raise ConfigError(
                f"{where}.{key}: merge_method '{method.name}' has no parameter '{key}'"
                + (f" (did you mean '{hint[0]}'?)" if hint else "")
                + f"; its parameters: {', '.join(names) or 'none'}"
            )
        if level == "model" and spec.scope == "global":
            raise ConfigError(f"{where}.{key}: '{key}' applies to the whole merge; set it under the top-level 'parameters'")
        if spec.kind in ("bool", "choice", "int") and isinstance(value, list):
            raise ConfigError(f"{where}.{key}: '{key}' takes a single value, not a list")
        # range-check every number that can appear (scalar, gradient points, filtered values)
        for v in _all_values(value):
            spec.check(v, f"{where}.{key}")


def check_merge_settings(method: type[MergeMethod], parameters: dict[str, Any], models: list | None,
                         slices: list | None, prefix: str = "") -> None:
    """Check every parameter setting of a merge (global, per model, per slice, per slice source); ``prefix`` is
    the YAML path of the merge (e.g. ``merges.soup.``) for error messages."""
    check_settings(method, parameters, f"{prefix}parameters", "global")
    for i, m in enumerate(models or []):
        check_settings(method, m.parameters, f"{prefix}models[{i}].parameters", "model")
    for k, s in enumerate(slices or []):
        check_settings(method, s.parameters, f"{prefix}slices[{k}].parameters", "slice")
        for j, src in enumerate(s.sources):
            check_settings(method, src.parameters, f"{prefix}slices[{k}].sources[{j}].parameters", "model")


def _all_values(value: Any) -> list[Any]:
    if isinstance(value, list):
        out: list[Any] = []
        for v in value:
            out.extend(_all_values(v.value) if isinstance(v, FilteredValue) else [v])
        return out
    return [value]


def resolve_param(spec: ParamSpec, levels: Sequence[tuple[str, dict[str, Any]]], tensor_name: str, t: float,
                  who: str) -> Any:
    """Resolve one parameter for one tensor from the levels (most specific first)."""
    for _where, settings in levels:
        if spec.name in settings:
            v = resolve_value(settings[spec.name], tensor_name, t)
            if v is not _UNSET:
                return spec.check(v, f"{who}, tensor '{tensor_name}'")
    if spec.required:
        where = "the top-level 'parameters'" if spec.scope == "global" else \
            "the model's 'parameters' or the top-level 'parameters'"
        raise ConfigError(
            f"{who}: parameter '{spec.name}' is required by this merge method (no value for tensor '{tensor_name}'); "
            f"set it under {where}"
        )
    return spec.default
