"""Atomic file and directory writes: a reader, or the next start after a crash, sees the old version or the
new one, never a mix or a partial file.

Each write goes to a temporary sibling with a unique name (mkstemp/mkdtemp in the target's directory, so
threads and processes writing one path never share a temporary), is fsynced, renamed over the target
(os.replace), and the directory is fsynced so the rename itself survives a power cut. Modes are set on the
result itself (fchmod), never through os.umask, which is process-wide: reading it means setting it, and
another thread creating a file meanwhile would get the wrong mode.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

FILE_MODE, DIR_MODE = 0o644, 0o755  # mkstemp/mkdtemp make private entries; the results are ordinary ones


def _sync(path: Path, mode: int | None = None) -> None:
    """fsync a file or directory (and set its mode first)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        if mode is not None:
            os.fchmod(fd, mode)
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_file(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call write(tmp) to write the file at the path tmp, then rename it to `path` (mode 0644)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)  # only the unique name is needed: writers (safetensors) open the path themselves
    tmp = Path(name)
    try:
        write(tmp)
        _sync(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _sync(path.parent)
    return path


def atomic_write_json(path: str | os.PathLike, doc) -> Path:
    return atomic_write_file(path, lambda tmp: tmp.write_text(json.dumps(doc, indent=1)))


def atomic_write_dir(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call write(tmp) to fill the directory tmp, then move it to `path` (mode 0755) in one rename."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        write(tmp)
        for root, _, files in os.walk(tmp):
            for f in files:
                _sync(Path(root, f))
        _sync(tmp, DIR_MODE)
        if out.exists():  # replace: move the old one aside first so the swap is two renames, never a mix
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
            os.replace(out, old / "x")
            os.replace(tmp, out)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _sync(out.parent)
    return out
