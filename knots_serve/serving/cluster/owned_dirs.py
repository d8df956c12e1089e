"""Directories a process owns for its life, in a root that other processes share: each named knots-<pid>-<id> and
holding a flock-ed LOCK file while its owner lives. A start removes the dead owners' directories and never a live
one's. Used for each server's merge cache (adapter_cache.py: two servers on one host never delete each other's
merges) and for the meeting place of several API servers (launch.py, group.py).
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import tempfile
import uuid
from pathlib import Path

OWNED = re.compile(r"^knots-\d+-[0-9a-f]{12}$")
LOCK = "lock"


def claim(root: Path) -> tuple[Path, int]:
    """A new directory in root and the fd of its lock, held. The lock is taken under a temporary
    name and renamed to LOCK, so a LOCK another start finds is held by its live owner or by nobody."""
    path = root / f"knots-{os.getpid()}-{uuid.uuid4().hex[:12]}"
    path.mkdir(parents=True)
    fd, tmp = tempfile.mkstemp(prefix=".lock.", dir=path)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.rename(tmp, path / LOCK)
    return path, fd


def remove_dead(root: Path, own: Path) -> None:
    """Remove the directories in root whose lock is free (their owner is gone). A live owner's, one still
    starting (no LOCK yet) and whatever else root holds are left alone."""
    for path in root.iterdir():
        if path == own or not OWNED.match(path.name):
            continue
        try:
            fd = os.open(path / LOCK, os.O_RDONLY)
        except OSError:  # starting, not a directory, or removed by another start just now
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # held: a live owner
            os.close(fd)
            continue
        shutil.rmtree(path, ignore_errors=True)
        os.close(fd)


def release(path: Path, fd: int, pid: int) -> None:
    if os.getpid() == pid:  # not in a forked child, which inherited the fd but owns nothing
        shutil.rmtree(path, ignore_errors=True)
        os.close(fd)
