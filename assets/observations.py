"""Observing inputs mergeline does not produce: a local adapter or model directory another tool writes, a Hub repo
that gets new revisions.

Each such node gets an observable source asset ``source/<pipeline>/<name>`` upstream of its ``lora/…`` or
``base_model/…`` asset. An observation reports a *data version*: for a local directory the sha256 over its files'
(relative path, sha256) pairs (file hashes cached by path/size/mtime/inode, so an unchanged multi-GB directory costs a
few ``stat`` calls), for a Hub repo the commit sha its revision resolves to. The automation condition
(:mod:`assets.automation`) re-materializes what depends on it only when that version changes.

An input that disappears or cannot be read is *reported*, never acted on: the observation keeps the last good data
version (so nothing downstream is requested, and nothing is deleted: the last good merge stays the latest
materialization) and carries ``status`` (``missing`` / ``unreadable`` / ``offline`` / ``error``) and ``reason``
metadata, which the UI shows on the source asset; the observation sensor's tick log says it too.
"""


import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dagster as dg

from pipelines.spec import AdapterSpec, BaseModelSpec, ObserveSpec
from resources.hub import HubResource

from .common import BuildContext

DATA_VERSION_TAG = "dagster/data_version"
COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")
#: the observation interval when the spec does not give one
DEFAULT_OBSERVE = ObserveSpec()


# -- what is observed --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ObservedInput:
    """One external input of a pipeline: the node, its source asset key and the asset it feeds."""

    section: str  # "adapters" or "base_models"
    name: str
    node: AdapterSpec | BaseModelSpec
    key: dg.AssetKey  # source/<pipeline>/<name>
    feeds: dg.AssetKey  # lora/<pipeline>/<name> or base_model/<pipeline>/<name>
    path: Path | None  # local directory, or None for a Hub repo
    observe: ObserveSpec

    @property
    def label(self) -> str:
        return f"{self.section}.{self.name}"


def source_key(bc: BuildContext, name: str) -> dg.AssetKey:
    return bc.key("source", name)


def observed_inputs(bc: BuildContext) -> list[ObservedInput]:
    """Every adapter (``path``/``hub``) and base model (``path``/``hub``) of the pipeline; ``observe: false`` ones
    still get a source asset (observable on demand), but no sensor ticks for them."""
    spec = bc.spec
    out: list[ObservedInput] = []
    for name, a in spec.adapters.items():
        if a.folder is not None:
            continue  # a folder of adapters is discovered by its own sensor (assets/adapter_folders.py)
        out.append(ObservedInput("adapters", name, a, source_key(bc, name), bc.key("lora", name),
                                 spec.resolve_path(a.path) if a.path is not None else None, a.observe or DEFAULT_OBSERVE))
    for name, b in spec.base_models.items():
        if b.toy is not None:
            continue
        out.append(ObservedInput("base_models", name, b, source_key(bc, name), bc.key("base_model", name),
                                 spec.resolve_path(b.path) if b.path is not None else None, b.observe or DEFAULT_OBSERVE))
    return out


# -- one observation ---------------------------------------------------------------------------------------------------


@dataclass
class Observation:
    """``version`` is the content fingerprint / commit sha, or None when it could not be computed (then ``status``
    and ``reason`` say why)."""

    status: str  # ok | missing | unreadable | offline | error
    version: str | None
    reason: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def directory_fingerprint(path: Path) -> tuple[str, dict[str, str]]:
    """sha256 over the sorted (relative path, file sha256) pairs of a directory, hidden files and folders left out.
    File hashes come from the engine's cache (keyed by path, size, mtime and inode), so re-observing an unchanged
    directory reads no file contents."""
    from merge_ops.hashing import sha256_file

    files: dict[str, str] = {}
    for f in sorted(Path(path).rglob("*")):
        rel = f.relative_to(path)
        if any(part.startswith(".") for part in rel.parts) or not f.is_file():
            continue
        files[rel.as_posix()] = sha256_file(f)
    h = hashlib.sha256()
    for rel in sorted(files):
        h.update(f"{rel}\0{files[rel]}\n".encode())
    return h.hexdigest(), files


def observe_local(path: Path, *, marker: str) -> Observation:
    """Observe a local adapter (``marker`` = ``adapter_config.json``) or model (``config.json``) directory."""
    path = Path(path)
    if not path.exists():
        return Observation("missing", None, f"'{path}' does not exist (deleted or not yet written)")
    if not path.is_dir():
        return Observation("unreadable", None, f"'{path}' is not a directory")
    if not (path / marker).is_file():
        return Observation("unreadable", None, f"'{path}' has no {marker} (a partial write, or not a "
                                               f"{'PEFT adapter' if marker == 'adapter_config.json' else 'model'} "
                                               f"directory)")
    try:
        json.loads((path / marker).read_text())
        version, files = directory_fingerprint(path)
    except (OSError, ValueError) as e:
        return Observation("unreadable", None, f"'{path}': {type(e).__name__}: {e}")
    size = sum((path / rel).stat().st_size for rel in files if (path / rel).exists())
    return Observation("ok", version, "", {"files": len(files), "size_bytes": size,
                                           "file_sha256": dg.MetadataValue.json(files)})


def resolve_hub_revision(hub: HubResource, repo_id: str, revision: str | None, *, repo_type: str = "model") -> str:
    """The commit sha ``revision`` (a branch, tag or sha) of a Hub repo points at now.

    A full commit sha is returned as is (it cannot move). Offline (``offline: true`` or ``HF_HUB_OFFLINE=1``) the
    local Hugging Face cache's ``refs/<revision>`` answers; online the Hub API does. Raises ``HubError`` with a
    message the user can act on; the token is never part of it."""
    from resources.hub import HubError

    rev = revision or "main"
    if COMMIT_RE.match(rev):
        return rev
    if hub.is_offline():
        sha = _cached_ref(hub, repo_id, rev, repo_type)
        if sha:
            return sha
        raise HubError(f"{repo_type} '{repo_id}' revision '{rev}': offline and not in the local Hugging Face cache; "
                       f"cannot tell which commit it points at")
    try:
        from huggingface_hub import HfApi
        from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError
    except ImportError:  # pragma: no cover
        raise HubError("huggingface_hub is not installed") from None
    try:
        info = HfApi(endpoint=hub.endpoint, token=hub._token()).repo_info(repo_id, revision=rev, repo_type=repo_type)
    except RevisionNotFoundError:
        raise HubError(f"{repo_type} '{repo_id}': revision '{rev}' does not exist") from None
    except RepositoryNotFoundError:
        raise HubError(f"{repo_type} '{repo_id}': repository not found (or private: set ${hub.token_env_var})") from None
    except Exception as e:  # network and server errors; never include the token
        raise HubError(f"{repo_type} '{repo_id}' revision '{rev}': {type(e).__name__}: {e}") from None
    sha = getattr(info, "sha", None)
    if not sha:
        raise HubError(f"{repo_type} '{repo_id}' revision '{rev}': the Hub answered without a commit sha")
    return sha


def _cached_ref(hub: HubResource, repo_id: str, rev: str, repo_type: str) -> str | None:
    try:
        from huggingface_hub import constants
    except ImportError:  # pragma: no cover
        return None
    root = Path(hub.cache_dir or constants.HF_HUB_CACHE).expanduser()
    folder = root / f"{repo_type}s--{repo_id.replace('/', '--')}" / "refs" / rev
    try:
        sha = folder.read_text().strip()
    except OSError:
        return None
    return sha if COMMIT_RE.match(sha) else None


def observe_hub(hub: HubResource, repo_id: str, revision: str | None) -> Observation:
    from resources.hub import HubError

    try:
        sha = resolve_hub_revision(hub, repo_id, revision)
    except HubError as e:
        status = "offline" if hub.is_offline() else "error"
        return Observation(status, None, str(e))
    return Observation("ok", sha, "", {"hub_repo": repo_id, "hub_revision": revision or "main", "hub_commit": sha})


def observe_input(inp: ObservedInput, hub: HubResource) -> Observation:
    node = inp.node
    if inp.path is not None:
        marker = "adapter_config.json" if inp.section == "adapters" else "config.json"
        obs = observe_local(inp.path, marker=marker)
        obs.metadata["path"] = dg.MetadataValue.path(str(inp.path))
        return obs
    return observe_hub(hub, node.hub, node.revision)


def last_observed(instance: dg.DagsterInstance, key: dg.AssetKey) -> tuple[str | None, str | None]:
    """(data version, status) of the latest observation of ``key``; (None, None) if it was never observed."""
    recs = instance.fetch_observations(dg.AssetRecordsFilter(asset_key=key), limit=1).records
    if not recs:
        return None, None
    obs = recs[0].asset_observation
    if obs is None:
        return None, None
    status = obs.metadata.get("status")
    return (obs.tags or {}).get(DATA_VERSION_TAG), getattr(status, "value", status)


def observation_event(inp: ObservedInput, obs: Observation, previous_version: str | None) -> dg.AssetObservation:
    """The event to record. A failed observation keeps ``previous_version`` (the last good one): nothing downstream is
    requested and the last good merge stays current; ``status``/``reason`` say what is wrong."""
    version = obs.version if obs.ok else previous_version
    meta = {"status": obs.status, "reason": obs.reason or "-", **obs.metadata}
    if not obs.ok:
        meta["kept_data_version"] = previous_version or "-"
    tags = {DATA_VERSION_TAG: version} if version else None
    return dg.AssetObservation(asset_key=inp.key, metadata=meta, tags=tags,
                               description=None if obs.ok else f"{inp.label}: {obs.status}: {obs.reason}")


# -- assets ------------------------------------------------------------------------------------------------------------


def build_source_asset(bc: BuildContext, inp: ObservedInput):
    """``source/<pipeline>/<name>``: observable on demand (UI "Observe sources", or any job selecting it) and by the
    observation sensor."""
    node = inp.node
    what = f"local directory `{inp.path}`" if inp.path is not None else f"Hub repo `{node.hub}` at `{node.revision}`"

    @dg.observable_source_asset(
        key=inp.key,
        group_name=bc.group,
        description=(f"What {inp.label} is made from: {what}. An observation reports its content hash (local) or "
                     f"resolved commit sha (Hub) as the data version; `{inp.feeds.to_user_string()}` and everything "
                     f"after it are re-built only when that changes. A missing or unreadable input is reported "
                     f"(metadata `status`, `reason`) and keeps the last good version."),
        required_resource_keys={"hub"},
        tags={"mergeline/pipeline": bc.spec.name, "mergeline/node_kind": "source"},
        metadata={"observe_interval_seconds": inp.observe.interval_seconds if inp.observe.enabled else 0},
    )
    def _source(context) -> dg.ObserveResult:
        obs = observe_input(inp, context.resources.hub)
        prev, _ = last_observed(context.instance, inp.key)
        ev = observation_event(inp, obs, prev)
        if not obs.ok:
            context.log.warning(f"{inp.label}: {obs.status}: {obs.reason}; keeping data version {prev}")
        version = (ev.tags or {}).get(DATA_VERSION_TAG)
        return dg.ObserveResult(data_version=dg.DataVersion(version) if version else None, metadata=ev.metadata)

    return _source


CHECK_NAME = "input_available"


def check_evaluation(inp: ObservedInput, obs: Observation) -> dg.AssetCheckEvaluation:
    """The ``input_available`` check result on the asset the input feeds: the red/yellow badge the lineage graph
    shows on ``lora/…`` / ``base_model/…`` when its input vanished or cannot be read."""
    return dg.AssetCheckEvaluation(
        asset_key=inp.feeds, check_name=CHECK_NAME, passed=obs.ok, severity=dg.AssetCheckSeverity.WARN,
        metadata={"status": obs.status, "reason": obs.reason or "-", "observed": inp.key.to_user_string()},
        description=None if obs.ok else f"{inp.label}: {obs.status}: {obs.reason}")


def build_input_check(inp: ObservedInput) -> dg.AssetChecksDefinition:
    """Non-blocking (a vanished input keeps its last good version, so nothing downstream is requested anyway);
    evaluated by the observation sensor and whenever the asset is materialized."""

    @dg.asset_check(asset=inp.feeds, name=CHECK_NAME, required_resource_keys={"hub"}, blocking=False,
                    description=f"Is {inp.label} (observed as {inp.key.to_user_string()}) present and readable?")
    def _check(context) -> dg.AssetCheckResult:
        obs = observe_input(inp, context.resources.hub)
        ev = check_evaluation(inp, obs)
        return dg.AssetCheckResult(passed=ev.passed, severity=ev.severity, metadata=ev.metadata,
                                   description=ev.description)

    return _check


# -- the sensor --------------------------------------------------------------------------------------------------------


def observation_sensor_name(bc: BuildContext) -> str:
    return f"{bc.spec.name}__observe"


def build_observation_sensor(bc: BuildContext, inputs: list[ObservedInput]) -> dg.SensorDefinition | None:
    """One sensor per pipeline, running by default: each tick observes the inputs that are due (per-node interval) and
    records an observation when the version or status differs from the last one recorded (no event flood while
    nothing changes; the tick log lists what was checked). No run is launched: observing is a few ``stat`` calls or
    one Hub API request."""
    due = [i for i in inputs if i.observe.enabled]
    if not due:
        return None
    interval = min(i.observe.interval_seconds for i in due)

    @dg.sensor(
        name=observation_sensor_name(bc),
        minimum_interval_seconds=interval,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description=(f"Observes the inputs of pipeline '{bc.spec.name}' that mergeline does not produce "
                     f"({', '.join(i.label for i in due)}) and records a new data version when one changes."),
        asset_selection=dg.AssetSelection.assets(*[i.key for i in due]),
    )
    def _observe(context: dg.SensorEvaluationContext, hub: HubResource) -> dg.SensorResult:
        import time

        now = time.time()
        try:
            last_checked: dict[str, float] = json.loads(context.cursor) if context.cursor else {}
        except ValueError:
            last_checked = {}
        events: list[dg.AssetObservation | dg.AssetCheckEvaluation] = []
        notes: list[str] = []
        for inp in due:
            k = inp.key.to_user_string()
            if now - last_checked.get(k, 0.0) < inp.observe.interval_seconds - 0.5:
                continue
            last_checked[k] = now
            obs = observe_input(inp, hub)
            prev_version, prev_status = last_observed(context.instance, inp.key)
            version = obs.version if obs.ok else prev_version
            if (version, obs.status) == (prev_version, prev_status):
                notes.append(f"{inp.label}: unchanged ({obs.status})")
                continue
            events.append(observation_event(inp, obs, prev_version))
            events.append(check_evaluation(inp, obs))
            if obs.ok:
                notes.append(f"{inp.label}: new data version {str(version)[:12]}")
            else:
                notes.append(f"{inp.label}: {obs.status}: {obs.reason} (keeping {str(prev_version)[:12]})")
                context.log.warning(notes[-1])
        for n in notes:
            context.log.info(n)
        return dg.SensorResult(asset_events=events, cursor=json.dumps(last_checked),
                               skip_reason=None if events else ("; ".join(notes) or "nothing due"))

    return _observe
