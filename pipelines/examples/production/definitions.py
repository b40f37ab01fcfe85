"""The production code location: the shipped ``pipelines.definitions`` (pipelines from ``MERGELINE_PIPELINES``,
resources from ``MERGELINE_RESOURCES``), plus the step executor chosen by ``MERGELINE_EXECUTOR``:

- ``multiprocess`` (default): steps run in the run pod; GPU steps go to their own pods through the ``launcher``
  resource (``mode: k8s``, resources.yaml);
- ``k8s``: every step in its own pod (``dagster_k8s.k8s_job_executor``); GPU steps request their GPU through the
  ``dagster-k8s/config`` op tag (resources-k8s-executor.yaml).

Served by ``dagster api grpc -f /opt/mergeline/app/pipelines/examples/production/definitions.py -a defs``.
"""

from __future__ import annotations

import os

import dagster as dg

from pipelines.definitions import defs as pipeline_defs

EXECUTOR = os.environ.get("MERGELINE_EXECUTOR", "multiprocess")
if EXECUTOR not in ("multiprocess", "k8s"):
    raise ValueError(f"MERGELINE_EXECUTOR='{EXECUTOR}': expected multiprocess or k8s")

if EXECUTOR == "k8s":
    from dagster_k8s import k8s_job_executor

    defs = dg.Definitions.merge(pipeline_defs, dg.Definitions(executor=k8s_job_executor))
else:
    defs = pipeline_defs
