"""Shared fixtures: tiny models generated once per test session (nothing downloaded)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

# keep the sha256 cache of the engine inside the test session, not in the user's home
os.environ.setdefault("MERGELINE_CACHE", str(Path(os.environ.get("PYTEST_TMPDIR", "/tmp")) / f"mergeline-test-cache-{os.getpid()}"))


# Directories that session-scoped fixtures create under the base temp dir start with this prefix, so the per-module
# cleanup below leaves them alone.
SESSION_PREFIX = "session-"


@pytest.fixture(scope="module", autouse=True)
def _free_module_temp_dirs(request, tmp_path_factory):
    """Delete what this test module left under pytest's base temp dir once the module is done.

    Why: pytest keeps every ``tmp_path`` and ``tmp_path_factory.mktemp`` directory until the session ends, so the
    suite's generated models pile up to many GB and a CI machine with a small free disk fills up (seen: ENOSPC in
    test_memory after ~9 minutes). Function-scoped dirs of passing tests are already removed at once
    (``tmp_path_retention_policy = "failed"`` in pyproject.toml); this removes the module-scoped ones. Directories are
    kept when a test of the module failed (to debug) or when MERGELINE_KEEP_TEST_TMP=1.
    """
    base = tmp_path_factory.getbasetemp()
    before = {p.name for p in base.iterdir()}
    failed_before = request.session.testsfailed
    yield
    if os.environ.get("MERGELINE_KEEP_TEST_TMP") == "1" or request.session.testsfailed > failed_before:
        return
    for p in base.iterdir():
        if p.name not in before and not p.name.startswith(SESSION_PREFIX):
            shutil.rmtree(p, ignore_errors=True)


@pytest.fixture(params=[None, 1], ids=["resident-default", "resident-1"])
def resident_modules(request, monkeypatch) -> int:
    """Runs a test twice: with the default number of LoRA adapter modules kept in memory, and with one, so every
    module's matrices (tied-embedding ones derived from the head's included) are dropped and read again from the
    file as the merge moves on; results must not change. Returns the number in effect."""
    import merge_ops.lora as lora_mod

    if request.param:
        monkeypatch.setattr(lora_mod, "RESIDENT_MODULES", request.param)
    return lora_mod.RESIDENT_MODULES


@pytest.fixture(scope="session")
def tiny_family(tmp_path_factory) -> dict[str, Path]:
    """A bf16 base, two fine-tunes and a LoRA adapter of it."""
    from tests.tiny_models import save_tiny_llama, save_variant
    from pipelines.toy_models import save_lora_adapter

    root = tmp_path_factory.mktemp(SESSION_PREFIX + "family")
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
