"""Files a run keeps outside its run directory, held by the process that made them.

The process holds a lock on each for as long as it lives; the kernel drops the lock when the
process ends, however it ends (SIGKILL included). A sweep removes what no live process holds,
so what a killed process leaves is removed by the next run, and a concurrent run's files are
never touched.
"""

from __future__ import annotations

import fcntl
import glob
import os
import shutil
import tempfile


def create_held(path: str) -> int:
    """Create the file at `path`, held by this process; returns the descriptor holding it (close
    it to let go). It is made under a name no sweep matches and renamed once held, so a sweep
    never finds it unheld (`held_dir` likewise)."""
    made = f"{path}.{os.getpid()}.new"
    fd = os.open(made, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)  # this user's only
    fcntl.flock(fd, fcntl.LOCK_SH)
    os.rename(made, path)
    return fd


def held_dir(prefix: str) -> str:
    """A new directory `prefix` + a random suffix, held by this process until it ends."""
    parent, name = os.path.split(prefix)
    made = tempfile.mkdtemp(prefix=f".{name}", dir=parent)  # hidden: no sweep matches it
    fd = os.open(made, os.O_RDONLY)  # never closed: the lock lives as long as the process
    fcntl.flock(fd, fcntl.LOCK_SH)
    path = os.path.join(parent, os.path.basename(made)[1:])
    os.rename(made, path)
    return path


def remove_unheld(pattern: str) -> list[str]:
    """Remove the files and directories matching the glob `pattern` that no live process
    holds. Returns the paths removed."""
    removed = []
    for path in glob.glob(pattern):
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            continue  # its process lives
        else:
            if os.path.isdir(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                os.unlink(path)
            removed.append(path)
        finally:
            os.close(fd)
    return removed
