"""Pushing a folder to a Hugging Face model repo (``create_repo`` + ``upload_folder``) with the unmodified client.

Kept apart from :mod:`resources.hub` (downloads) so that module stays small. The endpoint is passed to ``HfApi``
explicitly (``HubResource.endpoint``), so nothing depends on ``HF_ENDPOINT`` being set before ``huggingface_hub``
is imported. The token goes to the client only; every error message is scrubbed of it before it is raised.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from .hub import HubResource


def _scrub(text: str, token: str | None) -> str:
    return text.replace(token, "***") if token else text


def _transient(e: Exception) -> Exception:
    """Mark an error worth retrying (server errors, network); auth, rights and bad input are not."""
    e.transient = True  # type: ignore[attr-defined]
    return e


def _offline(hub: "HubResource") -> bool:
    if hub.is_offline():
        return True
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)  # read by the client at import time
    except ImportError:  # pragma: no cover
        return False


def publish_folder(hub: "HubResource", folder: Path, repo_id: str, *, private: bool = True, revision: str = "main",
                   commit_message: str | None = None) -> dict[str, Any]:
    from .hub import HubError

    what = f"publish to Hub repo '{repo_id}'" + (f" (branch '{revision}')" if revision != "main" else "")
    if not folder.is_dir() or not any(f.is_file() for f in folder.rglob("*")):
        raise HubError(f"{what}: '{folder}' is not a folder with files to upload")
    if _offline(hub):
        raise HubError(f"{what}: the Hub resource is offline (offline: true or HF_HUB_OFFLINE=1); publishing needs "
                       f"the network; turn offline mode off for this run")
    token = hub._token()
    if not token:
        raise HubError(f"{what}: no Hub token; set ${hub.token_env_var} (or the hub resource's token, e.g. "
                       f"dg.EnvVar('HF_TOKEN')) to a token with write access")
    try:
        from huggingface_hub import HfApi
        from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError
    except ImportError:  # pragma: no cover - the hub extra is part of the install
        raise HubError("huggingface_hub is not installed (pip install 'mergeline[hub]')") from None

    api = HfApi(endpoint=hub.endpoint, token=token)
    files = sorted(f.relative_to(folder).as_posix() for f in folder.rglob("*") if f.is_file())
    step = "creating the repository"
    try:
        repo_url = api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True, token=token)
        if revision != "main":
            step = f"creating branch '{revision}'"
            api.create_branch(repo_id, branch=revision, repo_type="model", exist_ok=True, token=token)
        step = "uploading"
        info = api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model", revision=revision,
                                 commit_message=commit_message or f"Publish {repo_id} with mergeline", token=token)
    except HfHubHTTPError as e:
        status = getattr(getattr(e, "response", None), "status_code", None)
        if status == 401:
            raise HubError(f"{what}: the Hub rejected the token while {step} (401 Unauthorized); set "
                           f"${hub.token_env_var} to a valid token with write access") from None
        if status == 403:
            raise HubError(f"{what}: the token may not write to '{repo_id}' while {step} (403 Forbidden); use a "
                           f"write token of a member of '{repo_id.split('/')[0]}'") from None
        if isinstance(e, RevisionNotFoundError):
            raise HubError(f"{what}: branch '{revision}' does not exist and could not be created") from None
        if isinstance(e, RepositoryNotFoundError):
            raise HubError(f"{what}: repository not found while {step} (wrong owner, or no write access)") from None
        raise _transient(HubError(_scrub(f"{what}: failed while {step}: {type(e).__name__}: {e}", token))) from None
    except Exception as e:  # network errors etc.; never include the token
        raise _transient(HubError(_scrub(f"{what}: failed while {step}: {type(e).__name__}: {e}", token))) from None
    endpoint = (hub.endpoint or os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")
    return {
        "repo_id": repo_id,
        "commit_sha": info.oid,
        "commit_url": info.commit_url,
        "url": (str(repo_url) or f"{endpoint}/{repo_id}")
               + ("" if revision == "main" else f"/tree/{revision}"),
        "revision": revision,
        "private": private,
        "files": files,
    }
