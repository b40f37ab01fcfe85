"""The external side of mergeline's Dagster Pipes steps: ``python -m resources.pipes_entry``.

Depends on ``dagster-pipes`` and the ML libraries only (never on ``dagster``; a test runs it with ``dagster``
import-blocked), so it can run in a slim GPU image. Dagster (``PipesSubprocessClient`` locally, ``PipesK8sClient`` in
a cluster) passes three extras:

- ``mergeline_step``: the registered step kind (``merge``, …; see :mod:`resources.pipes_steps`);
- ``mergeline_request``: the step's JSON request;
- ``mergeline_store``: the model store configuration (root, cache dir, S3 endpoint — never credentials: those come
  from this process's environment, a Kubernetes secret or the pod's IAM role).

It reports back the asset checks, then the materialization (metadata + data version). Bad input is reported as a
custom message ``{"mergeline_error": "input", "message": ...}`` and the process exits 0, so that the orchestrator
fails the step *without* retries; any other exception propagates (non-zero exit: Dagster's retry policy applies).
"""

from __future__ import annotations

import sys


def main() -> int:
    from dagster_pipes import open_dagster_pipes

    from resources.object_store import ArtifactStore
    from resources.pipes_steps import CHECK_DESCRIPTION_KEY, StepInputError, run_step

    with open_dagster_pipes() as pipes:
        kind = pipes.get_extra("mergeline_step")
        request = pipes.get_extra("mergeline_request")
        store = ArtifactStore.from_config(pipes.get_extra("mergeline_store"))
        try:
            out = run_step(kind, request, store, log=pipes.log.info)
        except StepInputError as e:
            pipes.log.error(str(e))
            pipes.report_custom_message({"mergeline_error": "input", "message": str(e)})
            return 0
        for o in out.all():
            for check in o.checks:
                meta = dict(check.metadata)
                if check.description is not None:
                    meta[CHECK_DESCRIPTION_KEY] = {"raw_value": check.description, "type": "text"}
                pipes.report_asset_check(check.name, check.passed, severity=check.severity, metadata=meta,
                                         asset_key=o.asset_key)
            pipes.report_asset_materialization(metadata=o.metadata, data_version=o.data_version,
                                               asset_key=o.asset_key)
    return 0


if __name__ == "__main__":
    sys.exit(main())
