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


@contextmanager
def atomic_output_dir(target: str | Path, overwrite: bool = True) -> Iterator[Path]:
    target = Path(target).absolute()
    if target.exists() and not target.is_dir():
        raise InputError(f"output '{target}' exists and is not a directory")
    if target.exists() and not overwrite:
        raise InputError(f"output '{target}' already exists")
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(target)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()
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
