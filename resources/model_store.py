"""The model store: where every artifact (base models, datasets, adapters, merges, run records) lives.

Layout: ``<root>/<kind>/<name>/<hash16>/`` where ``hash16`` is the first 16 hex digits of the artifact's content hash
(the same sha256 the asset reports as its data version). Two pipelines, or two versions of one node, can therefore
never overwrite each other, and identical results share one directory. Publishing is atomic: an artifact is written
into ``<root>/.staging/…`` and renamed into place only when complete (a rename within one filesystem).
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import dagster as dg
from pydantic import Field

_PART = re.compile(r"^[A-Za-z0-9_.\-]+$")
_HEX = re.compile(r"^[0-9a-f]{16,64}$")


def default_store_root() -> Path:
    home = os.environ.get("DAGSTER_HOME")
    if home:
        return Path(home) / "mergeline-store"
    return Path(".mergeline") / "store"


class ModelStoreResource(dg.ConfigurableResource):
    """A local directory tree (default ``$DAGSTER_HOME/mergeline-store``, or ``.mergeline/store`` without
    ``DAGSTER_HOME``)."""

    root: str | None = Field(None, description="store root directory (default $DAGSTER_HOME/mergeline-store)")

    @property
    def root_path(self) -> Path:
        return Path(os.path.expanduser(self.root)).absolute() if self.root else default_store_root().absolute()

    def path_for(self, kind: str, name: str, content_hash: str) -> Path:
        for part in (kind, name):
            if not _PART.match(part):
                raise ValueError(f"model store: invalid path component '{part}'")
        if not _HEX.match(content_hash):
            raise ValueError(f"model store: '{content_hash}' is not a hex content hash")
        return self.root_path / kind / name / content_hash[:16]

    @contextmanager
    def staging(self, kind: str, name: str) -> Iterator[Path]:
        """A fresh, not-yet-existing path under ``<root>/.staging``; whatever is left there is removed on exit."""
        base = self.root_path / ".staging"
        base.mkdir(parents=True, exist_ok=True)
        path = base / f"{kind}-{name}-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            yield path
        finally:
            if path.exists():
                shutil.rmtree(path, ignore_errors=True)

    def publish(self, staged: Path, kind: str, name: str, content_hash: str) -> Path:
        """Move a complete artifact directory into its content-addressed place; if that place already holds the same
        content, keep it and drop the staged copy. Returns the final path."""
        dest = self.path_for(kind, name, content_hash)
        dest.parent.mkdir(parents=True, exist_ok=True)
        if dest.exists():
            shutil.rmtree(staged, ignore_errors=True)
            return dest
        try:
            os.rename(staged, dest)
        except OSError:
            if dest.exists():  # another run published the same content first
                shutil.rmtree(staged, ignore_errors=True)
                return dest
            raise
        return dest
