"""Incremental by default: re-build a derived asset exactly when something it is made from changed.

``AutomationCondition.eager()`` re-requests a child whenever a parent is re-materialized, even with identical bytes
(a re-run of the same fine-tune, a re-hash of an unchanged adapter). :func:`derived_asset_condition` instead fires
when

* a dependency's **data version** changed since the previous tick (the content hash every mergeline asset reports,
  or an observed source's fingerprint / Hub commit), ignoring updates made by a run that also targeted this asset;
* the asset's own **code version** changed (its YAML node, or a ``code_version`` bump);
* the asset (or a partition of it) became **missing** (a new dynamic partition, a wiped asset);

and only while no dependency is missing or in progress, the asset is not in progress itself, and every **blocking
asset check** of its dependencies passed (a failed blocking eval check stops the export after it).

:func:`with_automation` is the one hook the builder calls: it applies the condition to every derived asset of a
pipeline (merges, exports, evals — by key prefix, so assets other modules add are covered without further wiring),
adds the observable sources of external inputs (:mod:`assets.observations`) and the folder-of-adapters assets
(:mod:`assets.adapter_folders`), and ships the automation and observation sensors RUNNING.
"""


from typing import Iterable

import dagster as dg

from .common import BuildContext

AC = dg.AutomationCondition

#: asset kinds (first key part) that are derived from others and get :func:`derived_asset_condition`
DERIVED_KINDS = ("merged", "export", "eval")


def any_dep_data_version_changed() -> dg.AutomationCondition:
    """True when a dependency's data version changed since the previous tick — not when it was merely
    re-materialized with the same bytes — unless the run that changed it also targeted this asset."""
    return AC.any_deps_match(
        (AC.data_version_changed() & ~AC.executed_with_root_target()).with_label("data_version_changed_elsewhere")
    ).with_label("any_dep_data_version_changed")


def derived_asset_condition() -> dg.AutomationCondition:
    """The condition on merges, exports, evals (and on the assets fed by observed external inputs)."""
    trigger = (
        AC.newly_missing()
        | any_dep_data_version_changed()
        | AC.code_version_changed().with_label("code_version_changed")
    ).since_last_handled()
    return (
        AC.in_latest_time_window()
        & trigger
        & ~AC.any_deps_missing()
        & ~AC.any_deps_in_progress()
        & ~AC.in_progress()
        & AC.all_deps_blocking_checks_passed()
    ).with_label("mergeline: inputs or code changed")


def automation_sensor_name(bc: BuildContext) -> str:
    return f"{bc.spec.name}__automation"


def build_automation_sensor(bc: BuildContext) -> dg.AutomationConditionSensorDefinition:
    """Evaluates the pipeline's automation conditions every ``automation.interval_seconds`` (30 s by default);
    RUNNING by default, so a fresh ``dagster dev`` keeps merges current without a toggle."""
    return dg.AutomationConditionSensorDefinition(
        automation_sensor_name(bc),
        target=dg.AssetSelection.groups(bc.group),
        default_status=dg.DefaultSensorStatus.RUNNING,
        minimum_interval_seconds=bc.spec.automation.interval_seconds,
        run_tags={"mergeline/pipeline": bc.spec.name, "mergeline/trigger": "automation"},
        description=(f"Re-builds the merges, exports and evals of pipeline '{bc.spec.name}' when an input's data "
                     f"version or the asset's code version changed (not when an input was re-materialized with "
                     f"identical bytes)."),
    )


def apply_conditions(assets: Iterable, *, fed_by_sources: dict[dg.AssetKey, dg.AssetKey] | None = None,
                     condition: dg.AutomationCondition | None = None) -> list:
    """Each AssetsDefinition with ``condition`` on its derived keys (kinds in :data:`DERIVED_KINDS`, plus the assets
    fed by an observed source; a condition set elsewhere is kept) and the source asset added as a dependency of the
    asset it feeds."""
    fed_by_sources = fed_by_sources or {}
    out = []
    for a in assets:
        if not isinstance(a, dg.AssetsDefinition) or not a.is_executable:
            out.append(a)
            continue

        def _derived(k: dg.AssetKey) -> bool:
            return condition is not None and (k.path[0] in DERIVED_KINDS or k in fed_by_sources)

        if not any(_derived(k) or k in fed_by_sources for k in a.keys):
            out.append(a)
            continue

        def _spec(s: dg.AssetSpec) -> dg.AssetSpec:
            attrs = {}
            src = fed_by_sources.get(s.key)
            if src is not None and src not in {d.asset_key for d in s.deps}:
                attrs["deps"] = [*s.deps, dg.AssetDep(src)]
            if _derived(s.key) and s.automation_condition is None:
                attrs["automation_condition"] = condition
            return s.replace_attributes(**attrs) if attrs else s

        out.extend(dg.map_asset_specs(_spec, [a]))
    return out


def with_automation(bc: BuildContext, defs: dg.Definitions) -> dg.Definitions:
    """The builder's hook: ``defs`` (one pipeline's assets, jobs, schedules) plus observation, folder adapters,
    automation conditions and the sensors. With ``automation: false`` in the spec no condition is attached and the
    sensors ship stopped (the source assets stay observable on demand)."""
    from .adapter_folders import build_folder_adapter_defs
    from .observations import build_input_check, build_observation_sensor, build_source_asset, observed_inputs

    on = bc.spec.automation.enabled
    inputs = observed_inputs(bc)
    sources = [build_source_asset(bc, i) for i in inputs]
    folder_assets, folder_sensors = build_folder_adapter_defs(bc, running=on)
    assets = apply_conditions([*(defs.assets or []), *folder_assets], fed_by_sources={i.feeds: i.key for i in inputs},
                              condition=derived_asset_condition() if on else None)
    jobs = list(defs.jobs or [])
    if inputs:
        jobs.append(dg.define_asset_job(
            f"{bc.spec.name}__observe", selection=dg.AssetSelection.assets(*[i.key for i in inputs]),
            description=f"Observe the external inputs of pipeline '{bc.spec.name}' now.",
            tags={"mergeline/pipeline": bc.spec.name}))
    sensors = [*(defs.sensors or []), *folder_sensors]
    if on:
        sensors.append(build_automation_sensor(bc))
        obs_sensor = build_observation_sensor(bc, inputs)
        if obs_sensor is not None:
            sensors.append(obs_sensor)
    checks = [*(defs.asset_checks or []), *[build_input_check(i) for i in inputs]]
    return dg.Definitions(assets=[*assets, *sources], jobs=jobs, schedules=defs.schedules, sensors=sensors,
                          asset_checks=checks, resources=defs.resources)
