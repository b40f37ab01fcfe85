"""Artifact files without Dagster: content hashes, sizes, safetensors header statistics, model cards.

Asset factories (``assets/common.py`` re-exports these names) and external step processes launched through Dagster
Pipes (``resources/pipes_entry.py``, which may only depend on ``dagster-pipes`` and the ML libraries) share this one
implementation, so a data version or a metadata value cannot differ between the two execution paths.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path
from typing import Any, Iterable

#: files whose bytes change from run to run without the artifact changing (timings, library versions)
VOLATILE_FILES = {"mergeline.json"}


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(8 * 1024 * 1024), b""):
            h.update(block)
    return h.hexdigest()


TEXT_SUFFIXES = {".json", ".md", ".txt", ".yaml", ".yml", ".jinja"}
STORE_PLACEHOLDER = b"<mergeline-store>"


def _normalised_sha256(path: Path, replace: bytes | None) -> str:
    """sha256 of a file; in small text files the model store's root is replaced by a placeholder first (configs and
    model cards name their inputs by path), so a data version does not depend on where the store lives."""
    if replace and path.suffix.lower() in TEXT_SUFFIXES and path.stat().st_size < 64 * 2**20:
        return hashlib.sha256(path.read_bytes().replace(replace, STORE_PLACEHOLDER)).hexdigest()
    return file_sha256(path)


def dir_content_hash(path: Path, *, known: dict[str, str] | None = None, exclude: Iterable[str] = VOLATILE_FILES,
                     store_root: Path | str | None = None) -> tuple[str, dict[str, str]]:
    """sha256 over the sorted (relative path, file sha256) pairs of a directory (or of one file).

    ``known`` maps relative paths to hashes computed elsewhere (the merge engine hashes shards while writing them);
    ``exclude`` names files left out (a manifest with timings); ``store_root``: occurrences of this path in text
    files are normalised (see :func:`_normalised_sha256`)."""
    path = Path(path)
    known = known or {}
    skip = set(exclude)
    replace = str(store_root).encode() if store_root else None
    files: dict[str, str] = {}
    if path.is_file():
        files[path.name] = _normalised_sha256(path, replace)
    else:
        for f in sorted(path.rglob("*")):
            if not f.is_file():
                continue
            rel = f.relative_to(path).as_posix()
            if rel in skip or any(part.startswith(".") for part in f.relative_to(path).parts):
                continue
            files[rel] = known.get(rel) or _normalised_sha256(f, replace)
    h = hashlib.sha256()
    for rel in sorted(files):
        h.update(f"{rel}\0{files[rel]}\n".encode())
    return h.hexdigest(), files


def tree_size(path: Path) -> int:
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def human_size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"


def safetensors_stats(path: Path) -> tuple[int, dict[str, int]]:
    """(parameter count, {dtype: parameters}) from the safetensors headers of a directory (no tensor is read)."""
    total = 0
    by_dtype: dict[str, int] = {}
    files = [path] if Path(path).is_file() else sorted(Path(path).glob("*.safetensors"))
    for f in files:
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        for name, info in header.items():
            if name == "__metadata__":
                continue
            count = 1
            for d in info["shape"]:
                count *= d
            total += count
            by_dtype[info["dtype"]] = by_dtype.get(info["dtype"], 0) + count
    return total, by_dtype


def main_dtype(by_dtype: dict[str, int]) -> str | None:
    names = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64", "I8": "int8", "U8": "uint8"}
    if not by_dtype:
        return None
    top = max(by_dtype, key=by_dtype.get)
    return names.get(top, top.lower())


def read_model_card(path: Path, limit: int = 20000) -> str | None:
    f = Path(path) / "README.md"
    if not f.is_file():
        return None
    text = f.read_text(errors="replace")
    return text if len(text) <= limit else text[:limit] + "\n\n…(truncated)"


def loss_plot_png(losses: list[tuple[int, float]], title: str) -> bytes:
    """The training-loss curve as PNG bytes (matplotlib's Agg backend: the same bytes in any process)."""
    import io

    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=100)
    if losses:
        ax.plot([s for s, _ in losses], [v for _, v in losses], marker="." if len(losses) < 60 else None)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()
