"""sha256 of input files, cached by (path, size, mtime, inode).

Why a cache: hashing runs at ~1.3 GB/s here, so hashing three 1 GB inputs on every merge would cost more than a
linear merge itself. Files in a Hugging Face cache are named by their sha256 already and are never re-read.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
from pathlib import Path

_LOCK = threading.Lock()
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def cache_path() -> Path:
    root = os.environ.get("MERGELINE_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "mergeline")
    return Path(root).expanduser() / "sha256.json"


def _load() -> dict:
    try:
        return json.loads(cache_path().read_text())
    except (OSError, ValueError):
        return {}


def _store(entries: dict) -> None:
    p = cache_path()
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_suffix(f".tmp-{os.getpid()}-{threading.get_ident()}")
        tmp.write_text(json.dumps(entries))
        os.replace(tmp, p)
    except OSError:
        pass  # a read-only home must not break merges


def sha256_file(path: Path, *, use_cache: bool = True) -> str:
    path = Path(path)
    real = path.resolve()
    if _HEX64.match(real.name) and real.parent.name == "blobs":
        return real.name  # Hugging Face cache blob: its name is its sha256
    st = real.stat()
    key = f"{real}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}"
    if use_cache:
        with _LOCK:
            hit = _load().get(key)
        if hit:
            return hit
    h = hashlib.sha256()
    with open(real, "rb", buffering=0) as f:
        while True:
            block = f.read(8 * 1024 * 1024)
            if not block:
                break
            h.update(block)
    digest = h.hexdigest()
    if use_cache:
        with _LOCK:
            entries = _load()
            entries[key] = digest
            _store(entries)
    return digest


def sha256_files(paths: list[Path]) -> dict[str, str]:
    return {str(p): sha256_file(p) for p in paths}
