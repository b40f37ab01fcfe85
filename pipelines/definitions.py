"""The shipped code location: every example pipeline under ``pipelines/examples/*/pipeline.yaml`` (one asset group
each), with the mergeline resources bound once. ``workspace.yaml`` at the repo root points here.

``MERGELINE_PIPELINES`` (``os.pathsep``-separated pipeline files) replaces the examples, e.g. to serve your own.
"""

from __future__ import annotations

import os
from pathlib import Path

from pipelines.builder import definitions_for

EXAMPLES = Path(__file__).resolve().parent / "examples"


def pipeline_files() -> list[Path]:
    env = os.environ.get("MERGELINE_PIPELINES")
    if env:
        return [Path(p) for p in env.split(os.pathsep) if p]
    return sorted(EXAMPLES.glob("*/pipeline.yaml"))


defs = definitions_for(pipeline_files())
