"""Shared fixtures: tiny models generated once per test session (nothing downloaded)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# keep the sha256 cache of the engine inside the test session, not in the user's home
os.environ.setdefault("MERGELINE_CACHE", str(Path(os.environ.get("PYTEST_TMPDIR", "/tmp")) / f"mergeline-test-cache-{os.getpid()}"))


@pytest.fixture(scope="session")
def tiny_family(tmp_path_factory) -> dict[str, Path]:
    """A bf16 base, two fine-tunes and a LoRA adapter of it."""
    from tests.tiny_models import save_tiny_llama, save_variant
    from pipelines.toy_models import save_lora_adapter

    root = tmp_path_factory.mktemp("family")
    base = save_tiny_llama(root / "base", seed=0, dtype=torch.bfloat16, num_layers=2, hidden=32, vocab=128)
    return {
        "base": base,
        "ft1": save_variant(base, root / "ft1", seed=1),
        "ft2": save_variant(base, root / "ft2", seed=2),
        "lora": save_lora_adapter(base, root / "lora", seed=3, r=4, alpha=8),
    }


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-compatible server (moto's server mode) on a free loopback port, started once per test session, with
    dummy credentials in the environment (inherited by subprocesses). ``.bucket()`` creates a fresh bucket."""
    from tests.s3_server import start_s3_server

    server = start_s3_server()
    yield server
    server.stop()
