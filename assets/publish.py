"""``published/<pipeline>/<name>``: a merge or export pushed to a Hugging Face model repo with a model card.

The asset depends on the artifact (``merged/…`` or ``export/…``) and on every eval of the same model
(``eval/<pipeline>/<e>`` for evals whose ``model`` is the merge, or the export's model). Two gates keep a model that
failed its checks off the Hub:

1. in the run: a failing *blocking* asset check of an upstream asset (the eval thresholds) fails that step, and
   Dagster skips this one (it never starts);
2. in this step: the latest evaluation of every blocking check of those upstream assets must have passed, and each
   eval must have scored the model's current data version, else the step fails without retries, naming the check
   and its description (or the stale eval) — this covers publishing in a later run, after the evals ran in another
   one.

The upload goes through :meth:`resources.hub.HubResource.publish_folder`; the folder is staged in the model store
(hard links to the artifact's files, the published ``README.md`` written fresh) and removed afterwards. The engine's
``mergeline.json`` is not published: it records local paths of the inputs.
"""

import os
import shutil
import time
from pathlib import Path
from typing import Any, Iterable

import dagster as dg

from pipelines.spec import ExportSpec, MergeSpec, PipelineSpec
from resources.hub import HubError, HubResource
from resources.model_store import ModelStoreResource

from .common import BuildContext, dir_content_hash, md_json, node_config, upstream
from .model_card import build_model_card, default_license, eval_rows

#: network hiccups get two more tries; bad tokens, missing rights and failed checks fail at once
PUBLISH_RETRY = dg.RetryPolicy(max_retries=2, delay=15, backoff=dg.Backoff.EXPONENTIAL)
#: files of an artifact that are never published
UNPUBLISHED = {"mergeline.json", "README.md"}


def publish_targets(spec: PipelineSpec) -> list[tuple[str, str, MergeSpec | ExportSpec]]:
    """(section, name, node) of every merge and export with a ``publish`` option (or ``push_to_hub``)."""
    out: list[tuple[str, str, Any]] = []
    for sec in ("merges", "exports"):
        for name, node in getattr(spec, sec).items():
            if getattr(node, "publish", None) is not None:
                out.append((sec, name, node))
    return out


def published_model(spec: PipelineSpec, section: str, name: str) -> str:
    """The model node whose evals gate publishing: the merge itself, or the model an export converts."""
    return name if section == "merges" else spec.exports[name].model


def gating_evals(spec: PipelineSpec, section: str, name: str) -> list[str]:
    model = published_model(spec, section, name)
    return [e for e, ev in spec.evals.items() if ev.model == model]


def hub_id(spec: PipelineSpec, node: str) -> str:
    """How a model node is named in ``base_model``: its Hub repo when it has one (a Hub base model or adapter, or a
    merge that is itself published), else the node name."""
    if node in spec.base_models and spec.base_models[node].hub:
        return spec.base_models[node].hub
    if node in spec.adapters and spec.adapters[node].hub:
        return spec.adapters[node].hub
    if node in spec.merges and spec.merges[node].publish is not None:
        return spec.merges[node].publish.repo
    return node


def card_base_models(spec: PipelineSpec, section: str, name: str) -> list[str]:
    from .merges import split_ref

    if section == "exports":
        return [hub_id(spec, spec.exports[name].model)]
    out = []
    for _, ref in spec.merges[name].references():
        model, adapter = split_ref(spec, ref)
        out.append(hub_id(spec, adapter or model))
    return list(dict.fromkeys(out))


def root_base_models(spec: PipelineSpec, node: str, seen: set[str] | None = None) -> list[str]:
    """The base-model nodes a model node is ultimately built from (their cards give the default license)."""
    from .merges import split_ref

    seen = seen if seen is not None else set()
    if node in seen:
        return []
    seen.add(node)
    if node in spec.base_models:
        return [node]
    if node in spec.finetunes or node in spec.adapters:
        return root_base_models(spec, (spec.finetunes.get(node) or spec.adapters.get(node)).base, seen)
    if node in spec.merges:
        out: list[str] = []
        for _, ref in spec.merges[node].references():
            for part in split_ref(spec, ref):
                if part:
                    out += root_base_models(spec, part, seen)
        return list(dict.fromkeys(out))
    return []


def stage_files(artifact: Path, dest: Path, *, only_suffix: str | None = None) -> list[str]:
    """Hard-link (copy across filesystems) the artifact's publishable files into ``dest``: everything but hidden
    files, ``mergeline.json`` and the engine's ``README.md``; with ``only_suffix`` (``.gguf``) just those files."""
    dest.mkdir(parents=True)
    files = [artifact] if artifact.is_file() else sorted(f for f in artifact.rglob("*") if f.is_file())
    out = []
    for f in files:
        rel = Path(f.name) if artifact.is_file() else f.relative_to(artifact)
        if any(p.startswith(".") for p in rel.parts) or rel.as_posix() in UNPUBLISHED:
            continue
        if only_suffix and f.suffix.lower() != only_suffix:
            continue
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(f, target)
        except OSError:
            shutil.copy2(f, target)
        out.append(rel.as_posix())
    if not out:
        raise dg.Failure(description=f"nothing to publish in {artifact}" + (f" (no *{only_suffix} file)"
                                                                            if only_suffix else ""),
                         allow_retries=False)
    return out


# -- gating ----------------------------------------------------------------------------------------------------------


def _graph_blocking_checks(context: dg.AssetExecutionContext, keys: set) -> set:
    """Blocking checks of ``keys`` declared in the code location (only known when the run has a repository: runs
    launched from the UI, schedules, sensors; ``dagster.materialize`` has none)."""
    try:
        graph = context.repository_def.asset_graph
    except Exception:
        return set()
    return {ck for ck in graph.get_check_keys_for_assets(keys) if graph.get_check_spec(ck).blocking}


def _evaluated_blocking_checks(context: dg.AssetExecutionContext, key: dg.AssetKey) -> set:
    """Blocking checks that were evaluated in the run of ``key``'s latest materialization."""
    ev = context.instance.get_latest_materialization_event(key)
    if ev is None:
        return set()
    out = set()
    conn = context.instance.get_records_for_run(ev.run_id, of_type=dg.DagsterEventType.ASSET_CHECK_EVALUATION,
                                                limit=10_000)
    for rec in conn.records:
        data = rec.event_log_entry.dagster_event.event_specific_data if rec.event_log_entry.dagster_event else None
        if data is not None and data.asset_key == key and data.blocking:
            out.add(dg.AssetCheckKey(key, data.check_name))
    return out


def blocking_check_problems(context: dg.AssetExecutionContext, keys: Iterable[dg.AssetKey]) -> list[str]:
    """One line per blocking check of ``keys`` whose latest execution did not pass (or that never ran). The checks
    are those the code location declares, plus those evaluated with each key's latest materialization."""
    from dagster._core.storage.asset_check_execution_record import AssetCheckExecutionRecordStatus

    keys = set(keys)
    check_keys = _graph_blocking_checks(context, keys)
    for k in keys:
        check_keys |= _evaluated_blocking_checks(context, k)
    if not check_keys:
        return []
    ordered = sorted(check_keys, key=lambda c: (c.asset_key.to_user_string(), c.name))
    records = context.instance.event_log_storage.get_latest_asset_check_execution_by_key(ordered)
    problems = []
    for ck in ordered:
        rec = records.get(ck)
        name = f"{ck.asset_key.to_user_string()}:{ck.name}"
        if rec is None or rec.status == AssetCheckExecutionRecordStatus.PLANNED:
            problems.append(f"{name} has not run yet (materialize {ck.asset_key.to_user_string()} first)")
        elif rec.status != AssetCheckExecutionRecordStatus.SUCCEEDED:
            ev = rec.event.dagster_event.event_specific_data if rec.event and rec.event.dagster_event else None
            desc = getattr(ev, "description", None)
            problems.append(f"{name} failed" + (f": {desc}" if desc else ""))
    return problems


def _data_version(context: dg.AssetExecutionContext, key: dg.AssetKey) -> str | None:
    ev = context.instance.get_latest_materialization_event(key)
    mat = ev.asset_materialization if ev else None
    return (mat.tags or {}).get("dagster/data_version") if mat else None


# -- the asset -------------------------------------------------------------------------------------------------------


def build_publish_asset(bc: BuildContext, section: str, name: str, node: MergeSpec | ExportSpec,
                        retry_policy: dg.RetryPolicy = PUBLISH_RETRY) -> dg.AssetsDefinition:
    spec = bc.spec
    pub = node.publish
    assert pub is not None
    key = bc.key("published", name)
    artifact_key = bc.key("merged", name) if section == "merges" else bc.key("export", name)
    evals = gating_evals(spec, section, name)
    eval_keys = [bc.key("eval", e) for e in evals]
    model_key = bc.model_key(published_model(spec, section, name))  # what the evals scored
    relation = "merge" if section == "merges" else "quantized"
    cfg = {"publish": pub.model_dump(mode="json", exclude_none=True), "artifact": artifact_key.to_user_string(),
           "evals": evals}

    @dg.asset(
        key=key,
        deps=[artifact_key, *eval_keys],
        group_name=bc.group,
        description=bc.description(node, f"Publish {section[:-1]} '{name}' to the Hugging Face Hub as `{pub.repo}`"
                                         f" (branch `{pub.branch}`, {'private' if pub.private else 'public'})"
                                         + (f", gated by evals {', '.join(f'`{e}`' for e in evals)}" if evals
                                            else "") + "."),
        kinds={"mergeline", "huggingface"},
        owners=bc.owners(node) or None,
        tags={**bc.tags(node, "published")},
        code_version=bc.code_version("published", cfg, node),
        retry_policy=retry_policy,
    )
    def _publish(context: dg.AssetExecutionContext, hub: HubResource,
                 model_store: ModelStoreResource) -> dg.MaterializeResult:
        t0 = time.perf_counter()
        where = f"{section}.{name}.publish"
        problems = blocking_check_problems(context, [artifact_key, *eval_keys])
        if problems:
            raise dg.Failure(
                description=f"{where}: not publishing '{pub.repo}': blocking checks did not pass:\n  "
                            + "\n  ".join(problems),
                metadata={"failed_checks": dg.MetadataValue.json(problems)}, allow_retries=False)
        art = upstream(context, artifact_key)
        rows: list[dict[str, Any]] = []
        for e, ek in zip(evals, eval_keys):
            ev = context.instance.get_latest_materialization_event(ek)
            mat = ev.asset_materialization if ev else None
            if mat is None:
                raise dg.Failure(description=f"{where}: eval '{e}' ({ek.to_user_string()}) has never run; "
                                             f"materialize it first (its checks gate publishing)",
                                 allow_retries=False)
            scored = (mat.tags or {}).get(f"dagster/input_data_version/{model_key.to_user_string()}")
            current = _data_version(context, model_key)
            if scored and current and scored != current:
                raise dg.Failure(description=f"{where}: eval '{e}' scored an older version of "
                                             f"{model_key.to_user_string()} (data version {scored[:12]}, now "
                                             f"{current[:12]}); re-run the eval before publishing",
                                 allow_retries=False)
            results = mat.metadata.get("results")
            results = getattr(results, "value", results) or {}
            rows += eval_rows(results, e)
        roots = root_base_models(spec, published_model(spec, section, name))
        cards = []
        for r in roots:
            ev = context.instance.get_latest_materialization_event(bc.key("base_model", r))
            p = ev.asset_materialization.metadata.get("path") if ev and ev.asset_materialization else None
            if p is not None:
                cards.append(Path(str(getattr(p, "value", p))))
        license = pub.license or default_license(cards)
        bases = card_base_models(spec, section, name)
        if section == "merges":
            from .merges import engine_config

            config, title = engine_config(node), "Merge configuration"
            tags = [node.method, *pub.tags]
            summary = f"A `{node.method}` merge of " + ", ".join(f"`{b}`" for b in bases) + "."
        else:
            config, title = node_config(node), "Export configuration"
            tags = [node.type, node.quant, *pub.tags]
            summary = f"A {node.type} ({node.quant}) export of `{bases[0]}`."
        text, front = build_model_card(
            repo_id=pub.repo, relation=relation, base_models=bases, license=license,
            license_name=pub.license_name, license_link=pub.license_link, tags=tags, config=config,
            config_title=title, summary=summary, eval_rows_=rows, pipeline=spec.name, node=name,
            content_sha256=art.data_version,
            library_name="gguf" if getattr(node, "type", None) == "gguf" else "transformers",
        )
        local = [b for b in front.get("base_model") or [] if "/" not in b]
        if local:
            context.log.warning(f"{where}: base_model lists local node(s) {', '.join(local)} (no Hub repo known); the "
                                f"Hub expects repo ids there: use Hub base models or publish those merges too")
        with model_store.staging("published", name) as staged:
            only = ".gguf" if getattr(node, "type", None) == "gguf" else None
            stage_files(art.path, staged, only_suffix=only)
            (staged / "README.md").write_text(text)
            content, file_hashes = dir_content_hash(staged, exclude=())
            try:
                res = hub.publish_folder(staged, pub.repo, private=pub.private, revision=pub.branch,
                                         commit_message=pub.commit_message or
                                         f"mergeline: publish {spec.name}/{name} ({(art.data_version or '')[:12]})")
            except HubError as e:
                raise dg.Failure(description=f"{where}: {e}", allow_retries=getattr(e, "transient", False)) from None
        context.log.info(f"published {section[:-1]} '{name}' to {res['url']} at commit {res['commit_sha']}")
        meta = {
            "repo_id": res["repo_id"],
            "commit_sha": res["commit_sha"],
            "revision": res["revision"],
            "private": res["private"],
            "url": dg.MetadataValue.url(res["url"]),
            "commit_url": dg.MetadataValue.url(res["commit_url"]),
            "dagster/uri": dg.MetadataValue.url(res["url"]),
            "files": dg.MetadataValue.json(res["files"]),
            "file_sha256": dg.MetadataValue.json(file_hashes),
            "card_front_matter": dg.MetadataValue.json(front),
            "model_card": dg.MetadataValue.md(text),
            "eval_results": dg.MetadataValue.json(rows),
            "artifact": art.key.to_user_string(),
            "artifact_data_version": art.data_version or "",
            "license": license,
            "duration_s": round(time.perf_counter() - t0, 3),
            "config": md_json(cfg),
        }
        return dg.MaterializeResult(metadata=meta, data_version=dg.DataVersion(content))

    return _publish

