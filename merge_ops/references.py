"""Model reference strings (``path_or_repo``, ``repo@revision``, ``base+adapter``) and where they live on disk.

Local directories win. A Hugging Face repo id is looked up in the local Hub cache; it is only downloaded when the
caller allows it (``download=True``), so a merge never touches the network by surprise.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from .errors import InputError

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
WEIGHT_PATTERNS = ["*.safetensors", "*.json", "tokenizer.model", "*.txt", "*.jinja"]


@dataclass(frozen=True)
class ModelRef:
    raw: str
    model: str
    revision: str | None = None
    adapter: str | None = None
    adapter_revision: str | None = None


def _split_revision(s: str) -> tuple[str, str | None]:
    if Path(s).expanduser().exists() or "@" not in s:
        return s, None
    name, _, rev = s.rpartition("@")
    return name, rev or None


def parse_ref(raw: str) -> ModelRef:
    raw = raw.strip()
    if not raw:
        raise InputError("empty model reference")
    if Path(raw).expanduser().exists():
        return ModelRef(raw, raw)
    model, adapter = raw, None
    if "+" in raw:
        model, _, adapter = raw.partition("+")
        if not model or not adapter or "+" in adapter:
            raise InputError(f"model reference '{raw}': expected 'model+adapter' with exactly one '+'")
    m, rev = _split_revision(model)
    a, arev = _split_revision(adapter) if adapter else (None, None)
    return ModelRef(raw, m, rev, a, arev)


def resolve_path(name: str, revision: str | None, *, label: str, download: bool = False,
                 kind: str = "model") -> Path:
    """A local directory for a model or adapter name (path, or Hub repo id from the local cache)."""
    p = Path(name).expanduser()
    if p.exists():
        return p
    if not _REPO_ID.match(name) or name.startswith((".", "/", "~")):
        raise InputError(f"{label}: {kind} directory '{name}' does not exist")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise InputError(f"{label}: '{name}' is not a local directory and huggingface_hub is not installed") from None
    try:
        return Path(snapshot_download(name, revision=revision, allow_patterns=WEIGHT_PATTERNS,
                                      local_files_only=not download))
    except Exception as e:  # LocalEntryNotFoundError, RevisionNotFoundError, RepositoryNotFoundError, network errors
        how = "" if download else " (not in the local Hugging Face cache; pass --download to fetch it)"
        raise InputError(f"{label}: cannot resolve Hub {kind} '{name}'"
                         + (f" at revision '{revision}'" if revision else "") + f"{how}: {type(e).__name__}: {e}") from e
