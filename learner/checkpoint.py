"""Checkpoint directories: written whole or not at all, found again on resume, pruned.

A checkpoint is `run_dir/checkpoints/step_NNNNNN/` holding the model, the optimizer and
scheduler state (`learner.pt`) and the driver's state (`driver.json`, a `RunState`). It is written under a
temporary name and renamed into place, so a crash mid-save never damages the last good one.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import re
import shutil
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from common.errors import RunError
from common.types import RunState

_NAME = re.compile(r"step_(\d{6,})")
FILES = ("model/model.safetensors", "model/config.json", "learner.pt", "driver.json")
SHARDED_FILES = ("sharded/.metadata", "learner.pt", "driver.json")
"""A learner of several ranks saves its model and optimizer with torch.distributed.checkpoint."""


class CheckpointError(RunError):
    """A checkpoint that is missing or cannot be read; one line."""


def root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def path_for(run_dir: str | Path, step: int) -> Path:
    return root(run_dir) / f"step_{step:06d}"


def complete(run_dir: str | Path) -> list[Path]:
    """Finished checkpoints, oldest first (temporary directories are not finished)."""
    if not root(run_dir).is_dir():
        return []
    found = [p for p in root(run_dir).iterdir() if p.is_dir() and _NAME.fullmatch(p.name)]
    return sorted(found, key=step_of)


def step_of(directory: Path) -> int:
    """The learner step a checkpoint directory holds."""
    return int(_NAME.fullmatch(directory.name).group(1))


def latest(run_dir: str | Path) -> Path:
    """The newest finished checkpoint, checked for the files a resume reads."""
    found = complete(run_dir)
    if not found:
        raise CheckpointError(f"no checkpoint to resume from in {root(run_dir)}")
    try:
        check_whole(found[-1])
    except CheckpointError as damaged:
        intact = next((older for older in reversed(found[:-1]) if _is_whole(older)), None)
        if intact is None:
            raise
        raise CheckpointError(f"{damaged}; the one before it, {intact.name}, is whole: move "
                              f"{found[-1]} out of {root(run_dir)} to resume from step "
                              f"{step_of(intact)}") from None
    return found[-1]


def check_whole(directory: Path) -> None:
    """Every file a resume reads is there and readable."""
    expected = SHARDED_FILES if (directory / "sharded").is_dir() else FILES
    missing = [f for f in expected if not (directory / f).is_file()]
    if missing:
        raise CheckpointError(f"checkpoint {directory} is damaged: missing {', '.join(missing)}")
    check_readable(directory)


def _is_whole(directory: Path) -> bool:
    try:
        check_whole(directory)
        return True
    except CheckpointError:
        return False


def check_readable(directory: Path) -> None:
    """Cheap checks that catch a truncated or overwritten file before a cluster is started:
    the safetensors header and its data length, the optimizer archive, the driver's JSON."""
    from safetensors import SafetensorError, safe_open

    try:
        if not (directory / "sharded").is_dir():
            with safe_open(directory / "model" / "model.safetensors", "pt") as f:
                f.keys()
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"checkpoint {directory} is damaged: model.safetensors: {e}") from None
    if not zipfile.is_zipfile(directory / "learner.pt"):
        raise CheckpointError(f"checkpoint {directory} is damaged: learner.pt is not a torch archive")
    read_state(directory / "driver.json")


@contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yields a temporary directory to fill; renames it to `final` only if the block succeeds."""
    tmp = staging(final)
    try:
        with full_disk_said(final):
            yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    commit(tmp, final)


@contextmanager
def full_disk_said(path: Path) -> Iterator[None]:
    """A write into `path` that failed on a full disk raises OSError(ENOSPC) naming `path`:
    torch.save's zip writer reports it as a RuntimeError ("unexpected pos") and safetensors as
    its own error, neither with the OS's reason, so the run could not tell it from a bug."""
    try:
        yield
    except OSError:
        raise
    except Exception as e:
        if _room(path) >= 1 << 20:
            raise
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from e


def _room(path: Path) -> int:
    """Free bytes on the file system that holds `path` (or the nearest directory above it)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def staging_path(final: Path) -> Path:
    """Where `final` is filled before `commit` puts it in place."""
    return final.with_name(final.name + ".tmp")


def staging(final: Path) -> Path:
    """An empty temporary directory beside `final`, to fill and then `commit`."""
    tmp = staging_path(final)
    shutil.rmtree(tmp, ignore_errors=True)  # left by a crash during an earlier save
    tmp.mkdir(parents=True)
    return tmp


def commit(tmp: Path, final: Path) -> None:
    """Put a filled temporary directory in `final`'s place, in one rename."""
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_dir(final.parent)


def prune(run_dir: str | Path, keep: int) -> None:
    for old in complete(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def write_state(path: Path, state: RunState) -> None:
    path.write_text(json.dumps(dataclasses.asdict(state), indent=2))


def read_state(path: Path) -> RunState:
    try:
        return RunState(**json.loads(path.read_text()))
    except (OSError, json.JSONDecodeError, TypeError) as e:  # TypeError: fields that do not fit
        raise CheckpointError(f"cannot read {path}: {e}") from None


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
