"""Atomic output directories: write into a hidden temporary sibling, rename into place only when complete.

An interrupted merge (exception, Ctrl-C, SIGTERM) removes its temporary directory; after a SIGKILL the hidden
``.<name>.tmp-<pid>-…`` directory is left and removed by the next run targeting the same output once its process is
gone. An existing output is replaced only by a complete new one (old moved aside, new renamed in, old deleted).
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .errors import InputError


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale(target: Path) -> None:
    for p in target.parent.glob(f".{target.name}.tmp-*"):
        try:
            pid = int(p.name.rsplit(".tmp-", 1)[1].split("-")[0])
        except (ValueError, IndexError):
            continue
        if pid != os.getpid() and not _pid_alive(pid):
            shutil.rmtree(p, ignore_errors=True)


@contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM into KeyboardInterrupt (main thread only) so cleanup code runs."""
    try:
        old = signal.getsignal(signal.SIGTERM)
        signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


#: files that mark a directory as a model (or an earlier output), which a new output may replace as a whole
_MODEL_MARKERS = ("mergeline.json", "config.json")


def check_output_dir(target: str | Path, inputs: list[Path] = ()) -> Path:
    """Refuse an output location that cannot work or would destroy something, before any heavy work.

    * an existing file, or a parent path that is a file;
    * an input directory (a model or adapter of this merge) or a directory containing one: the atomic replace would
      delete the input;
    * an existing non-empty directory that is not a model directory (no mergeline.json / config.json): replacing a
      model output is the documented behaviour, silently deleting e.g. a home directory after a typo is not.

    A missing parent is fine (created, as MergeKit does)."""
    target = Path(target).absolute()
    if target.exists() and not target.is_dir():
        raise InputError(f"output '{target}' exists and is not a directory; choose another OUTPUT_DIR or remove the file")
    real = target.resolve()
    for d in inputs:
        d = Path(d).absolute().resolve()
        if real == d or real in d.parents:
            raise InputError(
                f"output '{target}' is {'the' if real == d else 'a directory above the'} input '{d}'; writing the merge "
                f"there would replace that input. Choose an OUTPUT_DIR outside every input directory")
    anc = target.parent
    while not anc.exists():
        anc = anc.parent
    if not anc.is_dir():
        raise InputError(f"output '{target}': '{anc}' is not a directory, so the output cannot be created under it")
    if target.is_dir() and not any((target / m).exists() for m in _MODEL_MARKERS) and next(target.iterdir(), None):
        raise InputError(
            f"output '{target}' is a non-empty directory but not a model directory (no mergeline.json or config.json); "
            f"refusing to replace it. Choose another OUTPUT_DIR or empty it first")
    return target


@contextmanager
def atomic_output_dir(target: str | Path, overwrite: bool = True) -> Iterator[Path]:
    target = check_output_dir(target)
    if target.exists() and not overwrite:
        raise InputError(f"output '{target}' already exists")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        clean_stale(target)
        tmp = target.parent / f".{target.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
        tmp.mkdir()
    except OSError as e:
        raise InputError(f"output '{target}': cannot create it ({e.strerror}: {e.filename}); check that its parent "
                         f"directory is writable") from e
    ok = False
    try:
        with _terminate_as_interrupt():
            yield tmp
            if target.exists():
                old = target.parent / f".{target.name}.tmp-{os.getpid()}-old-{secrets.token_hex(4)}"
                os.rename(target, old)
                os.rename(tmp, target)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.rename(tmp, target)
            ok = True
    finally:
        if not ok:
            shutil.rmtree(tmp, ignore_errors=True)
