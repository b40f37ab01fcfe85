"""The model store without Dagster: a local directory tree (default) or an S3 / S3-compatible bucket.

``ModelStoreResource`` (``resources/model_store.py``) wraps :class:`ArtifactStore` for assets; the Pipes entry point
(``resources/pipes_entry.py``) builds one from the same configuration in the external process, so steps on different
machines find their inputs through the store, never through a shared local filesystem.

Layout (both backends): an artifact is ``<root>/<kind>/<name>/<hash16>`` where ``hash16`` is the first 16 hex digits
of its content hash. Local root: that is a directory, published by an atomic rename from ``<root>/.staging``.

S3 root (``s3://bucket/prefix``): object stores have no rename and no multi-object transaction, so an artifact is
published in two phases:

1. every file is uploaded under a fresh upload prefix ``<artifact>/u-<random>/<file>``; its sha256 and size are
   computed from the very bytes being streamed to the server (never by reading the file a second time);
2. one small object, the commit marker ``<artifact>/_mergeline_commit.json``, is written last. It lists the upload
   prefix and every file's size and sha256.

A reader only ever looks at an artifact through its commit marker, so a killed upload (no marker) is invisible, and
two writers racing on the same content each upload under their own prefix and the last marker wins — both complete.
Files are fetched into a local cache, ``<cache>/<kind>/<name>/<hash16>`` (content-addressed, so it does not matter
which bucket a URI names), verifying each file's sha256 while it streams; the directory is renamed into place only
when every file matched. Credentials come from boto3's usual chain (environment, profile, IRSA / instance role) and
never from the configuration passed between processes.

Why boto3 and not s3fs/fsspec: the environment's s3fs is 0.4.2 (it predates aiobotocore-based releases) and a modern
s3fs pins aiobotocore, which pins botocore to a range that conflicts with boto3's. The store needs five operations
(put stream, get stream, head, list, delete), so a small interface over boto3 (:class:`S3Bucket`) is less
dependency risk than a second S3 stack; a ``file://`` or plain path root keeps the local backend.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO, Callable, Iterator

_PART = re.compile(r"^[A-Za-z0-9_.\-]+$")
_HEX = re.compile(r"^[0-9a-f]{16,64}$")
COMMIT_MARKER = "_mergeline_commit.json"
COMMIT_FORMAT = 1
CHUNK = 8 * 1024 * 1024


class StoreError(RuntimeError):
    """A store operation failed for a reason a person must act on (missing artifact, hash mismatch, no bucket)."""


class StoredArtifact(type(Path())):  # type: ignore[misc]
    """A local directory holding a published artifact, plus the URI the store knows it by (``store_uri``).

    For a local store the URI is the path itself; for S3 the directory is the local cache copy and ``store_uri`` the
    ``s3://`` address that downstream steps (on other machines) use. Metadata reports the URI."""

    store_uri: str | None = None

    @classmethod
    def make(cls, path: Path | str, uri: str | None) -> "StoredArtifact":
        p = cls(path)
        p.store_uri = uri
        return p


def default_store_root() -> Path:
    home = os.environ.get("DAGSTER_HOME")
    if home:
        return Path(home) / "mergeline-store"
    return Path(".mergeline") / "store"


def default_cache_dir() -> Path:
    """Where fetched S3 artifacts are kept: ``$MERGELINE_STORE_CACHE``, else ``$DAGSTER_HOME/mergeline-cache``, else
    ``~/.cache/mergeline/store``."""
    env = os.environ.get("MERGELINE_STORE_CACHE")
    if env:
        return Path(env)
    home = os.environ.get("DAGSTER_HOME")
    if home:
        return Path(home) / "mergeline-cache"
    return Path.home() / ".cache" / "mergeline" / "store"


def is_remote_uri(ref: str) -> bool:
    return ref.startswith("s3://")


def check_parts(kind: str, name: str, content_hash: str) -> None:
    for part in (kind, name):
        if not _PART.match(part):
            raise ValueError(f"model store: invalid path component '{part}'")
    if not _HEX.match(content_hash):
        raise ValueError(f"model store: '{content_hash}' is not a hex content hash")


def split_s3(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` → (``bucket``, ``a/b``)."""
    if not uri.startswith("s3://"):
        raise ValueError(f"'{uri}' is not an s3:// URL")
    bucket, _, key = uri[5:].partition("/")
    if not bucket:
        raise ValueError(f"'{uri}': no bucket name")
    return bucket, key.strip("/")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink(missing_ok=True)


# -- S3 ---------------------------------------------------------------------------------------------------------------


class _HashingReader:
    """A read-only, non-seekable view of a file that hashes what is read. Being non-seekable makes boto3's transfer
    manager read it exactly once, in order (it buffers each part itself for retries), so the digest is that of the
    uploaded bytes."""

    def __init__(self, f: BinaryIO):
        self._f = f
        self.sha256 = hashlib.sha256()
        self.size = 0

    def read(self, size: int = -1) -> bytes:
        b = self._f.read(size)
        self.sha256.update(b)
        self.size += len(b)
        return b

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False


@dataclass(frozen=True)
class S3Settings:
    endpoint_url: str | None = None
    region: str | None = None
    #: "path" for most S3-compatible servers (MinIO, moto, Ceph); "virtual" / "auto" for AWS
    addressing_style: str = "auto"
    multipart_chunk_bytes: int = 16 * 1024 * 1024


class S3Bucket:
    """The five object operations the store needs, over one boto3 client."""

    def __init__(self, bucket: str, settings: S3Settings):
        import boto3
        from botocore.config import Config

        self.bucket = bucket
        self.settings = settings
        cfg = Config(s3={"addressing_style": settings.addressing_style},
                     retries={"max_attempts": 5, "mode": "standard"})
        self.client = boto3.session.Session().client("s3", endpoint_url=settings.endpoint_url,
                                                     region_name=settings.region, config=cfg)

    def _transfer_config(self):
        from boto3.s3.transfer import TransferConfig

        n = self.settings.multipart_chunk_bytes
        return TransferConfig(multipart_threshold=n, multipart_chunksize=n, max_concurrency=4)

    def put_file(self, path: Path, key: str) -> tuple[int, str]:
        """Upload one file; returns (size, sha256) of the bytes streamed."""
        with open(path, "rb") as f:
            reader = _HashingReader(f)
            self.client.upload_fileobj(reader, self.bucket, key, Config=self._transfer_config())
        return reader.size, reader.sha256.hexdigest()

    def put_bytes(self, data: bytes, key: str, content_type: str = "application/json") -> None:
        self.client.put_object(Bucket=self.bucket, Key=key, Body=data, ContentType=content_type)

    def get_bytes(self, key: str) -> bytes | None:
        from botocore.exceptions import ClientError

        try:
            return self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read()
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("NoSuchKey", "404", "NotFound"):
                return None
            raise self._explain(e) from None

    def get_file(self, key: str, dest: Path) -> tuple[int, str]:
        """Stream one object to ``dest``; returns (size, sha256) of the bytes received."""
        from botocore.exceptions import ClientError

        h = hashlib.sha256()
        n = 0
        try:
            body = self.client.get_object(Bucket=self.bucket, Key=key)["Body"]
        except ClientError as e:
            raise self._explain(e, key) from None
        with open(dest, "wb") as f:
            for block in body.iter_chunks(CHUNK):
                h.update(block)
                n += len(block)
                f.write(block)
        return n, h.hexdigest()

    def list(self, prefix: str) -> list[str]:
        return [k for k, _ in self.list_with_times(prefix)]

    def list_with_times(self, prefix: str) -> list[tuple[str, float]]:
        """(key, last-modified epoch seconds) of every object under ``prefix``."""
        out: list[tuple[str, float]] = []
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
            out.extend((o["Key"], o["LastModified"].timestamp()) for o in page.get("Contents", []))
        return out

    def delete(self, keys: list[str]) -> None:
        for i in range(0, len(keys), 1000):
            self.client.delete_objects(Bucket=self.bucket,
                                       Delete={"Objects": [{"Key": k} for k in keys[i:i + 1000]], "Quiet": True})

    def _explain(self, e: Exception, key: str | None = None) -> StoreError:
        code = getattr(e, "response", {}).get("Error", {}).get("Code", "")
        where = f"s3://{self.bucket}/{key}" if key else f"s3://{self.bucket}"
        if code == "NoSuchBucket":
            return StoreError(f"model store: bucket '{self.bucket}' does not exist (create it, or fix model_store.root)")
        if code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            return StoreError(f"model store: access to {where} denied ({code}); check the AWS credentials of this "
                              f"process (environment, profile or role)")
        if code in ("NoSuchKey", "404", "NotFound"):
            return StoreError(f"model store: {where} does not exist")
        return StoreError(f"model store: {where}: {e}")


# -- the store --------------------------------------------------------------------------------------------------------


class ArtifactStore:
    """A content-addressed artifact store rooted at a local directory or an ``s3://bucket/prefix`` URL."""

    def __init__(self, root: str | Path | None = None, *, cache_dir: str | Path | None = None,
                 s3: S3Settings | None = None):
        root_s = str(root) if root else ""
        if root_s.startswith("file://"):
            root_s = root_s[len("file://"):]
        self.remote = is_remote_uri(root_s)
        self.s3_settings = s3 or S3Settings()
        if self.remote:
            self.bucket_name, self.prefix = split_s3(root_s)
            self.uri_root = f"s3://{self.bucket_name}" + (f"/{self.prefix}" if self.prefix else "")
            self.local_root = Path(os.path.expanduser(str(cache_dir))).absolute() if cache_dir else \
                default_cache_dir().absolute()
        else:
            if "://" in root_s:
                raise ValueError(f"model store root '{root_s}': only local paths, file:// and s3:// are supported")
            self.local_root = Path(os.path.expanduser(root_s)).absolute() if root_s else \
                default_store_root().absolute()
            self.uri_root = str(self.local_root)
        self._bucket: S3Bucket | None = None

    # -- configuration that travels to another process (no secrets: credentials come from that process's env) -----
    def to_config(self) -> dict[str, Any]:
        return {"root": self.uri_root, "cache_dir": str(self.local_root) if self.remote else None,
                "s3_endpoint_url": self.s3_settings.endpoint_url, "s3_region": self.s3_settings.region,
                "s3_addressing_style": self.s3_settings.addressing_style}

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> "ArtifactStore":
        return cls(cfg.get("root"), cache_dir=cfg.get("cache_dir"),
                   s3=S3Settings(endpoint_url=cfg.get("s3_endpoint_url"), region=cfg.get("s3_region"),
                                 addressing_style=cfg.get("s3_addressing_style") or "auto"))

    @property
    def bucket(self) -> S3Bucket:
        if self._bucket is None:
            self._bucket = S3Bucket(self.bucket_name, self.s3_settings)
        return self._bucket

    # -- layout ------------------------------------------------------------------------------------------------------
    @property
    def root_path(self) -> Path:
        """The local directory artifacts are read from: the store itself, or the cache of an S3 store. Text files
        that name it are normalised when hashing (``dir_content_hash(store_root=...)``), so a data version does not
        depend on where the store or the cache lives."""
        return self.local_root

    def path_for(self, kind: str, name: str, content_hash: str) -> Path:
        check_parts(kind, name, content_hash)
        return self.local_root / kind / name / content_hash[:16]

    def uri_for(self, kind: str, name: str, content_hash: str) -> str:
        check_parts(kind, name, content_hash)
        if not self.remote:
            return str(self.path_for(kind, name, content_hash))
        return f"{self.uri_root}/{kind}/{name}/{content_hash[:16]}"

    def _key(self, kind: str, name: str, content_hash: str) -> str:
        return "/".join(p for p in (self.prefix, kind, name, content_hash[:16]) if p)

    @contextmanager
    def staging(self, kind: str, name: str) -> Iterator[Path]:
        """A fresh, not-yet-existing local path under ``<root>/.staging`` (S3: under the cache, so publishing can
        keep the written copy as the cache entry with a rename); whatever is left there is removed on exit."""
        base = self.local_root / ".staging"
        base.mkdir(parents=True, exist_ok=True)
        path = base / f"{kind}-{name}-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            yield path
        finally:
            _remove(path)

    # -- publish -----------------------------------------------------------------------------------------------------
    def publish(self, staged: Path, kind: str, name: str, content_hash: str) -> Path:
        """Make a complete artifact directory (or single file) visible at its content-addressed place, atomically;
        identical content already published is kept and the staged copy dropped. Returns the local directory (a
        :class:`StoredArtifact` whose ``store_uri`` is the artifact's address)."""
        dest = self.path_for(kind, name, content_hash)
        if self.remote:
            self._publish_s3(Path(staged), kind, name, content_hash)
        self._rename_into(Path(staged), dest)
        return StoredArtifact.make(dest, self.uri_for(kind, name, content_hash))

    @staticmethod
    def _rename_into(staged: Path, dest: Path) -> None:
        dest.parent.mkdir(parents=True, exist_ok=True)
        if dest.exists():
            _remove(staged)
            return
        try:
            os.rename(staged, dest)
        except OSError:
            if dest.exists():  # another run published the same content first
                _remove(staged)
                return
            raise

    def _files(self, staged: Path) -> list[tuple[str, Path]]:
        if staged.is_file():
            return [(staged.name, staged)]
        return [(f.relative_to(staged).as_posix(), f) for f in sorted(staged.rglob("*")) if f.is_file()]

    def read_commit(self, kind: str, name: str, content_hash: str) -> dict[str, Any] | None:
        """The commit marker of an S3 artifact, or None when it was never (completely) published."""
        raw = self.bucket.get_bytes(f"{self._key(kind, name, content_hash)}/{COMMIT_MARKER}")
        return None if raw is None else json.loads(raw)

    def exists(self, kind: str, name: str, content_hash: str) -> bool:
        if not self.remote:
            return self.path_for(kind, name, content_hash).exists()
        return self.read_commit(kind, name, content_hash) is not None

    def _publish_s3(self, staged: Path, kind: str, name: str, content_hash: str,
                    on_file: Callable[[str], None] | None = None) -> dict[str, Any]:
        existing = self.read_commit(kind, name, content_hash)
        if existing is not None:
            if existing.get("content_sha256") != content_hash:
                raise StoreError(f"model store: {self.uri_for(kind, name, content_hash)} holds content "
                                 f"{existing.get('content_sha256')}, not {content_hash} (a 64-bit prefix collision)")
            return existing
        art = self._key(kind, name, content_hash)
        upload = f"u-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{secrets.token_hex(6)}"
        files: dict[str, dict[str, Any]] = {}
        done: list[str] = []
        try:
            for rel, path in self._files(staged):
                key = f"{art}/{upload}/{rel}"
                size, sha = self.bucket.put_file(path, key)
                done.append(key)
                files[rel] = {"size": size, "sha256": sha}
                if on_file:
                    on_file(rel)
            marker = {"format": COMMIT_FORMAT, "kind": kind, "name": name, "content_sha256": content_hash,
                      "upload": upload, "files": files, "single_file": staged.is_file(),
                      "committed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            # the commit point: one PUT of one small object
            self.bucket.put_bytes(json.dumps(marker, indent=1, sort_keys=True).encode(), f"{art}/{COMMIT_MARKER}")
        except BaseException:
            try:  # best effort: a killed process leaves its upload prefix behind, invisible without a marker
                self.bucket.delete(done)
            except Exception:
                pass
            raise
        return marker

    def sweep_uploads(self, older_than_s: float = 24 * 3600, *, dry_run: bool = False) -> list[str]:
        """Delete the objects of uploads no commit marker points to (publishers killed mid-upload, losers of a
        publish race) once they are older than ``older_than_s`` (younger ones may belong to an upload in progress).
        Returns the keys deleted (or, with ``dry_run``, that would be)."""
        if not self.remote:
            return []
        objects = self.bucket.list_with_times(f"{self.prefix}/" if self.prefix else "")
        markers: dict[str, str | None] = {}
        for key, _ in objects:
            if key.endswith("/" + COMMIT_MARKER):
                art = key[: -len(COMMIT_MARKER) - 1]
                raw = self.bucket.get_bytes(key)
                markers[art] = json.loads(raw).get("upload") if raw else None
        cutoff = time.time() - older_than_s
        stale: list[str] = []
        for key, mtime in objects:
            m = re.match(r"^(.*)/(u-[^/]+)/", key)
            if m and markers.get(m.group(1)) != m.group(2) and mtime < cutoff:
                stale.append(key)
        if stale and not dry_run:
            self.bucket.delete(stale)
        return stale

    # -- read --------------------------------------------------------------------------------------------------------
    def resolve(self, ref: str | Path) -> Path:
        """A local directory (or file) for an artifact reference as found in ``path`` metadata: a local path is
        returned as it is (it must exist); an ``s3://`` artifact URI is fetched into the local cache (verified) unless
        it is there already."""
        ref_s = str(ref)
        if not is_remote_uri(ref_s):
            p = Path(ref_s)
            if not p.exists():
                raise StoreError(f"model store: the artifact at {p} is gone; re-materialize it")
            return p
        if not self.remote:
            raise StoreError(f"model store: '{ref_s}' is in S3 but this store is local ({self.uri_root}); configure "
                             f"model_store.root as an s3:// URL to read it")
        return self.fetch(ref_s)

    def parse_uri(self, uri: str) -> tuple[str, str, str, str, str]:
        """(bucket, artifact key, kind, name, hash16) of an artifact URI ``s3://bucket/[prefix/]kind/name/hash16``."""
        bucket, key = split_s3(uri)
        parts = PurePosixPath(key).parts
        if len(parts) < 3 or not re.match(r"^[0-9a-f]{16}$", parts[-1]):
            raise StoreError(f"model store: '{uri}' is not an artifact URI (…/<kind>/<name>/<16 hex digits>)")
        return bucket, key, parts[-3], parts[-2], parts[-1]

    def fetch(self, uri: str) -> Path:
        bucket_name, key, kind, name, h16 = self.parse_uri(uri)
        dest = self.local_root / kind / name / h16
        if dest.exists():
            return StoredArtifact.make(dest, uri)
        b = self.bucket if bucket_name == self.bucket_name else S3Bucket(bucket_name, self.s3_settings)
        raw = b.get_bytes(f"{key}/{COMMIT_MARKER}")
        if raw is None:
            raise StoreError(f"model store: {uri} has no commit marker: it was never completely published (or was "
                             f"deleted); re-materialize it")
        marker = json.loads(raw)
        with self.staging(kind, name) as tmp:
            tmp.mkdir(parents=True)
            for rel, info in sorted(marker["files"].items()):
                target = tmp / rel
                if not target.resolve().is_relative_to(tmp.resolve()):
                    raise StoreError(f"model store: {uri}: file name '{rel}' escapes the artifact directory")
                target.parent.mkdir(parents=True, exist_ok=True)
                size, sha = b.get_file(f"{key}/{marker['upload']}/{rel}", target)
                if sha != info["sha256"] or size != info["size"]:
                    raise StoreError(f"model store: {uri}: file '{rel}' does not match its commit marker (sha256 "
                                     f"{sha[:12]}…, {size} bytes; expected {info['sha256'][:12]}…, {info['size']} "
                                     f"bytes): the object was altered or corrupted; re-materialize the artifact")
            if marker.get("single_file"):  # published from one file, not a directory: keep that shape
                (only,) = marker["files"]
                self._rename_into(tmp / only, dest)
            else:
                self._rename_into(tmp, dest)
        return StoredArtifact.make(dest, uri)
