"""The model store: where every artifact (base models, datasets, adapters, merges, run records) lives.

Layout: ``<root>/<kind>/<name>/<hash16>/`` where ``hash16`` is the first 16 hex digits of the artifact's content hash
(the same sha256 the asset reports as its data version). Two pipelines, or two versions of one node, can therefore
never overwrite each other, and identical results share one directory. Publishing is atomic: an artifact is written
into ``<root>/.staging/…`` and renamed into place only when complete (a rename within one filesystem).

``root`` may also be an ``s3://bucket/prefix`` URL (AWS S3 or any S3-compatible store: MinIO, Ceph, R2, …): then
artifacts are uploaded with a commit marker written last, read back through a verified local cache, and ``path``
metadata holds ``s3://`` URIs, so steps can run on different machines. The Dagster-free implementation is
:mod:`resources.object_store` (the Pipes entry point uses it directly).
"""

from __future__ import annotations

from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator

import dagster as dg
from pydantic import Field

from .object_store import ArtifactStore, S3Settings, StoreError, default_store_root  # noqa: F401  (re-exported)


@lru_cache(maxsize=32)
def _store(root: str | None, cache_dir: str | None, endpoint: str | None, region: str | None,
           addressing: str) -> ArtifactStore:
    return ArtifactStore(root, cache_dir=cache_dir,
                         s3=S3Settings(endpoint_url=endpoint, region=region, addressing_style=addressing))


class ModelStoreResource(dg.ConfigurableResource):
    """A local directory tree (default ``$DAGSTER_HOME/mergeline-store``, or ``.mergeline/store`` without
    ``DAGSTER_HOME``), or an ``s3://bucket/prefix`` URL."""

    root: str | None = Field(None, description="store root: a directory (default $DAGSTER_HOME/mergeline-store) or "
                                               "s3://bucket/prefix")
    cache_dir: str | None = Field(None, description="S3 stores: local cache of fetched artifacts (default "
                                                    "$MERGELINE_STORE_CACHE, $DAGSTER_HOME/mergeline-cache or "
                                                    "~/.cache/mergeline/store)")
    s3_endpoint_url: str | None = Field(None, description="S3-compatible endpoint (MinIO, Ceph, …); default: AWS, or "
                                                          "$AWS_ENDPOINT_URL")
    s3_region: str | None = Field(None, description="S3 region (default: boto3's configuration)")
    s3_addressing_style: str = Field("auto", description="auto, path (most S3-compatible servers) or virtual")

    @property
    def store(self) -> ArtifactStore:
        if not (self.root or "").startswith("s3://"):  # cheap, and the default root follows DAGSTER_HOME / cwd
            return ArtifactStore(self.root)
        return _store(self.root, self.cache_dir, self.s3_endpoint_url, self.s3_region, self.s3_addressing_style)

    @property
    def is_remote(self) -> bool:
        return self.store.remote

    @property
    def root_path(self) -> Path:
        """Local store: its root. S3 store: the local cache root (where fetched inputs live)."""
        return self.store.root_path

    def path_for(self, kind: str, name: str, content_hash: str) -> Path:
        return self.store.path_for(kind, name, content_hash)

    def uri_for(self, kind: str, name: str, content_hash: str) -> str:
        return self.store.uri_for(kind, name, content_hash)

    @contextmanager
    def staging(self, kind: str, name: str) -> Iterator[Path]:
        """A fresh, not-yet-existing local path under ``<root>/.staging``; whatever is left there is removed on
        exit."""
        with self.store.staging(kind, name) as p:
            yield p

    def publish(self, staged: Path, kind: str, name: str, content_hash: str) -> Path:
        """Move a complete artifact directory into its content-addressed place (S3: upload it, then its commit
        marker); if that place already holds the same content, keep it and drop the staged copy. Returns the final
        local path (with ``.store_uri``, the address metadata reports)."""
        return self.store.publish(staged, kind, name, content_hash)

    def resolve(self, ref: str | Path) -> Path:
        """A local path for an artifact reference from ``path`` metadata (S3 URIs are fetched and verified)."""
        return self.store.resolve(ref)

    def exists(self, kind: str, name: str, content_hash: str) -> bool:
        return self.store.exists(kind, name, content_hash)

    def client_config(self) -> dict[str, Any]:
        """What an external step process needs to open the same store (no credentials)."""
        return self.store.to_config()
