"""The Hugging Face Hub resource: snapshot downloads at pinned revisions, with offline mode and clear errors.

The token is read from the environment variable named by ``token_env_var`` when a download runs, or given as
``token=dg.EnvVar("HF_TOKEN")`` (resolved in the step, shown as the variable's name in the UI); it is never put in
metadata, logs or error messages. :meth:`HubResource.publish_folder` pushes a folder to a model repo (publishing).
"""

from __future__ import annotations

import os
from pathlib import Path

import dagster as dg
from pydantic import Field


class HubError(RuntimeError):
    """A Hub download failed for a reason the user can act on (missing revision, offline cache miss, ...)."""


class HubResource(dg.ConfigurableResource):
    token_env_var: str = Field("HF_TOKEN", description="name of the environment variable holding the Hub token")
    endpoint: str | None = Field(None, description="Hub endpoint (default https://huggingface.co or $HF_ENDPOINT)")
    offline: bool = Field(False, description="never touch the network; only the local Hugging Face cache")
    cache_dir: str | None = Field(None, description="Hugging Face cache directory (default: HF_HOME's)")
    token: str | None = Field(None, repr=False, description="Hub token; give it as dg.EnvVar('HF_TOKEN') so that "
                                                            "the value never appears in the run config (default: "
                                                            "the variable named by token_env_var)")

    def _token(self) -> str | None:
        return self.token or os.environ.get(self.token_env_var) or None

    def publish_folder(self, folder: str | Path, repo_id: str, *, private: bool = True, revision: str = "main",
                       commit_message: str | None = None) -> dict:
        """Create ``repo_id`` (a model repo) if needed and upload every file of ``folder`` to branch ``revision``
        (created from ``main`` if missing) in one commit. Returns ``{repo_id, commit_sha, url, files, private}``.
        Errors are :class:`HubError` naming the repo and what to do, never containing the token."""
        from .hub_publish import publish_folder

        return publish_folder(self, Path(folder), repo_id, private=private, revision=revision,
                              commit_message=commit_message)

    def is_offline(self) -> bool:
        env = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
        return self.offline or env

    def snapshot(self, repo_id: str, revision: str | None, *, repo_type: str = "model",
                 allow_patterns: list[str] | None = None) -> Path:
        """``snapshot_download`` at ``revision`` into the Hugging Face cache; returns the snapshot directory.
        Offline (``offline: true`` or ``HF_HUB_OFFLINE=1``) only the cache is consulted."""
        try:
            from huggingface_hub import snapshot_download
            from huggingface_hub.errors import (
                GatedRepoError,
                LocalEntryNotFoundError,
                RepositoryNotFoundError,
                RevisionNotFoundError,
            )
        except ImportError:  # pragma: no cover - the hub extra is part of the install
            raise HubError("huggingface_hub is not installed (pip install 'mergeline[hub]')") from None
        what = f"{repo_type} '{repo_id}'" + (f" at revision '{revision}'" if revision else "")
        offline = self.is_offline()
        try:
            p = snapshot_download(
                repo_id, revision=revision, repo_type=repo_type, allow_patterns=allow_patterns,
                cache_dir=self.cache_dir, endpoint=self.endpoint, token=self._token(), local_files_only=offline,
            )
        except RevisionNotFoundError:
            raise HubError(f"{what}: the revision does not exist in the repository (pin an existing commit sha, "
                           f"branch or tag)") from None
        except GatedRepoError:
            raise HubError(f"{what}: the repository is gated; accept its terms on the Hub and set "
                           f"${self.token_env_var} to a token that has access") from None
        except RepositoryNotFoundError:
            raise HubError(f"{what}: repository not found (or private: set ${self.token_env_var})") from None
        except LocalEntryNotFoundError:
            if offline:
                raise HubError(f"{what}: not in the local Hugging Face cache and the Hub resource is offline "
                               f"(offline: true or HF_HUB_OFFLINE=1); download it once online, or turn offline "
                               f"mode off") from None
            raise HubError(f"{what}: could not be downloaded (network unreachable?) and is not cached") from None
        except Exception as e:  # network errors etc.; never include the token
            raise HubError(f"{what}: download failed: {type(e).__name__}: {e}") from None
        return Path(p)


def copy_snapshot(src: Path, dest: Path) -> Path:
    """Copy a snapshot directory (whose files are symlinks into the cache's blobs) to ``dest`` as plain files:
    hard links where the filesystem allows, copies otherwise."""
    import shutil

    dest.mkdir(parents=True)
    for f in sorted(src.rglob("*")):
        if f.is_dir():
            continue
        rel = f.relative_to(src)
        if rel.parts[0] == ".cache":
            continue
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        real = f.resolve()
        try:
            os.link(real, target)
        except OSError:
            shutil.copy2(real, target)
    return dest
