"""A small real pipeline for the automation tests: a local base model directory (tiny Llama with its BPE tokenizer) and
two local PEFT adapters written by "another tool" (this module), three merges (one per adapter and one of both), a
real lm-eval eval of ``m_a`` and of ``m_b`` (``eval/auto/<merge>_eval``: the demo's held-out ``arithmetic_choice``
multiple-choice task, 4 samples, with one blocking ``min`` check) and a real safetensors float16 export of each
(``export/auto/<merge>_st``, which depends on the eval of the same model and is gated by its blocking check).

The test controls the eval's blocking check through the threshold in the spec (:attr:`World.eval_min`):
:data:`GATE_PASS` (accuracy >= 0: passes for every model) or :data:`GATE_FAIL` (accuracy >= 1.01: fails for every
model). The threshold is part of the eval's YAML node, so changing it changes the eval's code version — the eval is
re-requested for that reason, and the test says so.

Everything lives in a temp directory with a SQLite ``DagsterInstance`` (``local_temp``), and every materialization is
real (safetensors written by the merge engine, lm-eval runs, content-hash data versions).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import dagster as dg
import torch

from assets.observations import build_observation_sensor, observed_inputs
from pipelines.builder import build_definitions
from resources.device import GpuResource
from resources.evaluator import EvaluatorResource
from resources.hub import HubResource
from resources.launcher import StepLauncherResource
from resources.model_store import ModelStoreResource

P = "auto"
#: the demo's held-out multiple-choice arithmetic task (its data file sits next to it)
TASK_YAML = Path(__file__).resolve().parents[1] / "pipelines" / "examples" / "demo" / "tasks" / "arithmetic_choice.yaml"
GATE_PASS = 0.0  # accuracy is >= 0 for every model
GATE_FAIL = 1.01  # accuracy is <= 1 for every model: no model can pass
EVALUATED = ("m_a", "m_b")  # merges with an eval and an export
GATE_CHECK = "arithmetic_choice_acc_min"  # the check's name, derived from task, metric and bound (not the value)


def K(kind: str, name: str) -> dg.AssetKey:
    return dg.AssetKey([kind, P, name])


def write_adapter(base: Path, out: Path, seed: int) -> Path:
    """A real PEFT adapter (random non-zero A and B) for ``base``, written like a training tool would."""
    from pipelines.toy_models import save_lora_adapter

    return save_lora_adapter(base, out, seed=seed, r=4, alpha=8, targets=("q_proj", "v_proj"))


def spec_dict(root: Path, *, merge_code_versions: dict[str, str] | None = None,
              eval_min: dict[str, float] | None = None, observe_interval: int = 1, automation_interval: int = 1) -> dict:
    cv = merge_code_versions or {}
    gates = eval_min or {}

    def merge(models: list[tuple[str, float]], name: str) -> dict:
        m = {"method": "task_arithmetic", "base_model": "base", "dtype": "float32",
             "models": [{"model": n, "parameters": {"weight": w}} for n, w in models]}
        if name in cv:
            m["code_version"] = cv[name]
        return m

    return {
        "name": P,
        "automation": {"interval_seconds": automation_interval},
        "base_models": {"base": {"path": str(root / "base"), "observe": {"interval_seconds": observe_interval}}},
        "adapters": {
            "a": {"base": "base", "path": str(root / "adapters" / "a"), "observe": {"interval_seconds": observe_interval}},
            "b": {"base": "base", "path": str(root / "adapters" / "b"), "observe": {"interval_seconds": observe_interval}},
            # "merge every adapter in this folder into the base": one dynamic partition per subdirectory
            "community": {"base": "base", "folder": str(root / "community"),
                          "observe": {"interval_seconds": observe_interval}},
        },
        "merges": {
            "m_a": merge([("a", 1.0)], "m_a"),
            "m_b": merge([("b", 1.0)], "m_b"),
            "m_ab": merge([("a", 0.5), ("b", 0.5)], "m_ab"),
        },
        # evals before exports: each export depends on the evals of its model (and is gated by their blocking checks)
        "evals": {
            f"{m}_eval": {
                "model": m,
                "tasks": [{"name": "arithmetic_choice", "path": str(TASK_YAML)}],
                "limit": 4,
                "batch_size": 4,
                "checks": [{"task": "arithmetic_choice", "metric": "acc", "min": gates.get(m, GATE_PASS),
                            "blocking": True}],
            } for m in EVALUATED
        },
        "exports": {f"{m}_st": {"model": m, "type": "safetensors", "quant": "float16", "fidelity": False}
                    for m in EVALUATED},
    }


@dataclass
class World:
    root: Path
    instance: dg.DagsterInstance
    merge_code_versions: dict[str, str] = field(default_factory=dict)
    #: merge -> the ``min`` of its eval's blocking check (default :data:`GATE_PASS`)
    eval_min: dict[str, float] = field(default_factory=dict)
    cursor: object = None
    eager_cursor: object = None
    last_checks: list = field(default_factory=list)

    # -- definitions ------------------------------------------------------------------------------------------------
    def resources(self) -> dict:
        return {"gpu": GpuResource(device="cpu"), "model_store": ModelStoreResource(root=str(self.root / "store")),
                "hub": HubResource(offline=True), "evaluator": EvaluatorResource(device="cpu"),
                "launcher": StepLauncherResource(mode="in_process")}

    def spec(self) -> dict:
        return spec_dict(self.root, merge_code_versions=self.merge_code_versions, eval_min=self.eval_min)

    def defs(self, eager: bool = False) -> dg.Definitions:
        """The pipeline's definitions; ``eager=True``: the same graph with plain ``AutomationCondition.eager()`` on the
        derived assets (the behaviour this project replaces), for contrast. Cached per code-version state."""
        ck = (eager, tuple(sorted(self.merge_code_versions.items())), tuple(sorted(self.eval_min.items())))
        cache = self.__dict__.setdefault("_defs_cache", {})
        if ck not in cache:
            cache[ck] = self._build_defs(eager)
        return cache[ck]

    def _build_defs(self, eager: bool) -> dg.Definitions:
        defs = build_definitions(self.spec(), resources=self.resources())
        if eager:
            eager_cond = dg.AutomationCondition.eager()
            defs = dg.Definitions(
                assets=[dg.map_asset_specs(lambda s: s.replace_attributes(automation_condition=eager_cond)
                                           if s.automation_condition is not None else s, [a])[0]
                        if isinstance(a, dg.AssetsDefinition) and a.is_executable else a for a in defs.assets],
                asset_checks=defs.asset_checks, resources=defs.resources)
        return defs

    # -- actions ----------------------------------------------------------------------------------------------------
    def materialize(self, *keys: dg.AssetKey, expect_success: bool = True, partition: str | None = None
                    ) -> dg.ExecuteInJobResult:
        defs = self.defs()
        graph = defs.resolve_asset_graph()
        assets = [a for a in defs.assets if isinstance(a, dg.AssetsDefinition) and a.is_executable]
        sel = dg.AssetSelection.assets(*keys) if keys else dg.AssetSelection.all() - dg.AssetSelection.assets(
            *[k for k in graph.get_all_asset_keys() if k.path[0] == "source" or graph.get(k).partitions_def])
        if partition is not None:
            assets = [a for a in assets if a.partitions_def is not None]
        elif keys:
            assets = [a for a in assets if a.partitions_def is None]
        res = dg.materialize([*assets, *defs.asset_checks], resources=defs.resources, instance=self.instance,
                             selection=sel, raise_on_error=False, partition_key=partition)
        assert res.success == expect_success, [e.message for e in res.all_events if e.is_failure]
        return res

    def observe_job(self) -> None:
        """On-demand observation (what the UI's "Observe sources" runs)."""
        job = self.defs().resolve_job_def(f"{P}__observe")
        assert job.execute_in_process(instance=self.instance).success

    def observation_tick(self) -> list[dg.AssetObservation]:
        """One tick of the observation sensor; its events are recorded as the sensor daemon would."""
        from assets.common import BuildContext
        from pipelines.spec import parse_pipeline

        spec = parse_pipeline(self.spec())
        sensor = build_observation_sensor(BuildContext(spec), observed_inputs(BuildContext(spec)))
        # cursor None: every input is due (the cursor only records when each was last checked)
        ctx = dg.build_sensor_context(instance=self.instance, cursor=None, resources={"hub": HubResource(offline=True)})
        result = sensor(ctx)
        for ev in result.asset_events or []:
            self.instance.report_runless_asset_event(ev)
        self.last_checks = [e for e in result.asset_events or [] if isinstance(e, dg.AssetCheckEvaluation)]
        return [e for e in result.asset_events or [] if isinstance(e, dg.AssetObservation)]

    def evaluate(self) -> set[dg.AssetKey]:
        """One automation tick over the current definitions; returns the requested asset keys."""
        res = dg.evaluate_automation_conditions(defs=self.defs(), instance=self.instance, cursor=self.cursor)
        self.cursor = res.cursor
        return {r.key for r in res.results if r.true_subset.size > 0}

    def evaluate_eager(self) -> set[dg.AssetKey]:
        """The same tick with plain ``eager()`` conditions (own cursor): what this project fixes."""
        res = dg.evaluate_automation_conditions(defs=self.defs(eager=True), instance=self.instance,
                                                cursor=self.eager_cursor)
        self.eager_cursor = res.cursor
        return {r.key for r in res.results if r.true_subset.size > 0}

    def evaluate_partitions(self) -> dict[dg.AssetKey, set[str]]:
        """Like :meth:`evaluate`, with the requested partition keys of partitioned assets."""
        res = dg.evaluate_automation_conditions(defs=self.defs(), instance=self.instance, cursor=self.cursor)
        self.cursor = res.cursor
        return {r.key: set(res.get_requested_partitions(r.key)) for r in res.results if r.true_subset.size > 0}

    def latest_gate(self, merge: str) -> dg.AssetCheckEvaluation:
        """The latest evaluation of the blocking check of ``merge``'s eval (from the instance, not from a run)."""
        key = dg.AssetCheckKey(K("eval", f"{merge}_eval"), GATE_CHECK)
        [rec] = self.instance.event_log_storage.get_asset_check_execution_history(key, limit=1)
        return rec.event.dagster_event.event_specific_data

    def latest_version(self, key: dg.AssetKey) -> str | None:
        ev = self.instance.get_latest_materialization_event(key)
        return (ev.asset_materialization.tags or {}).get("dagster/data_version") if ev else None


def make_world(root: Path) -> World:
    """Base + adapters on disk, everything materialized, sources observed, one settling evaluation done."""
    from pipelines.toy_models import save_tiny_llama

    torch.manual_seed(0)
    save_tiny_llama(root / "base", seed=0, num_layers=1, hidden=32, vocab=128)
    write_adapter(root / "base", root / "adapters" / "a", seed=1)
    write_adapter(root / "base", root / "adapters" / "b", seed=2)
    (root / "home").mkdir()
    inst = dg.DagsterInstance.local_temp(str(root / "home"), overrides={"telemetry": {"enabled": False}})
    w = World(root, inst)
    w.observe_job()
    w.materialize()
    first = w.evaluate()
    assert first == set(), f"the first evaluation requested {first}"
    return w
