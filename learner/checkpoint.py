"""Checkpoint directories: written whole or not at all, found again on resume, pruned.

A checkpoint is `run_dir/checkpoints/step_NNNNNN/` holding the model (or, training LoRA, the
adapter alone, in peft's format), the optimizer and scheduler state (`learner.pt`) and the
driver's state (`driver.json`, a `RunState`). It is written under a
temporary name and renamed into place, so a crash mid-save never damages the last good one.

`save_learner` and `load_learner` import torch where they run: the driver reads checkpoint
directories (to resume, or to name the last one) without it.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import pickle
import re
import shutil
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from common import lora
from common.errors import RunError, one_line
from common.types import RunState

if TYPE_CHECKING:
    from learner.learner import Learner

_NAME = re.compile(r"step_(\d{6,})")
FILES = ("model/model.safetensors", "model/config.json", "learner.pt", "driver.json")
SHARDED_FILES = ("sharded/.metadata", "learner.pt", "driver.json")
"""A learner of several ranks saves its model and optimizer with torch.distributed.checkpoint."""
ADAPTER_FILES = (f"{lora.ADAPTER_DIR}/adapter_model.safetensors", f"{lora.ADAPTER_DIR}/adapter_config.json",
                 "learner.pt", "driver.json")
"""A LoRA learner saves its adapter (the model under it never changes)."""


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
    expected = _layout(directory)
    missing = [f for f in expected if not (directory / f).is_file()]
    if missing:
        raise CheckpointError(f"checkpoint {directory} is damaged: missing {', '.join(missing)}")
    check_readable(directory)


def _layout(directory: Path) -> tuple[str, ...]:
    """The files a checkpoint of its kind holds."""
    if (directory / "sharded").is_dir():
        return SHARDED_FILES
    return ADAPTER_FILES if (directory / lora.ADAPTER_DIR).is_dir() else FILES


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

    weights = next((f for f in _layout(directory) if f.endswith(".safetensors")), None)
    try:
        if weights is not None:
            with safe_open(directory / weights, "pt") as f:
                f.keys()
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"checkpoint {directory} is damaged: {Path(weights).name}: {e}") from None
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


# ----- the learner's state -----


def save_learner(learner: Learner, run_dir: str | Path, state: RunState) -> Path:
    """Model, optimizer, scheduler, loss scaler and RNG, plus the driver's `state`, as one atomic
    checkpoint of `learner.version`: the model in safetensors (one rank; with LoRA the adapter
    alone) or with torch.distributed.checkpoint (its shards, every rank calling this)."""
    final = path_for(run_dir, learner.version)
    if learner.sharded:
        _save_sharded(learner, final, state)
    else:
        with atomic_dir(final) as tmp:
            # A peft model saves its adapter alone, in float32 as it trains.
            learner.model.save_pretrained(tmp / (lora.ADAPTER_DIR if learner.lora else "model"))
            _save_rest(learner, tmp, state, [_rng(learner.device)])
    return final


def _save_sharded(learner: Learner, final: Path, state: RunState) -> None:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    tmp = staging(final) if learner.rank == 0 else staging_path(final)
    dist.barrier()  # rank 0 has made the directory
    model, optimizer = get_state_dict(learner.model, learner.optimizer)
    dcp.save({"model": model, "optimizer": optimizer}, checkpoint_id=str(tmp / "sharded"))
    rngs = [None] * learner.cfg.learner.num_ranks
    dist.all_gather_object(rngs, _rng(learner.device))
    if learner.rank == 0:
        _save_rest(learner, tmp, state, rngs)
        commit(tmp, final)
    dist.barrier()  # nobody goes on before the checkpoint is whole


def _rng(device: str) -> dict:
    import torch

    return {"cpu": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if device == "cuda" else []}


def _save_rest(learner: Learner, directory: Path, state: RunState, rngs: list[dict]) -> None:
    """What every layout has: scheduler, loss scaler, version, each rank's RNG, and the
    driver's state (and, with one rank, the optimizer)."""
    import torch

    torch.save({"optimizer": None if learner.sharded else learner.optimizer.state_dict(),
                "scheduler": learner.scheduler.state_dict(), "scaler": learner.scaler.state_dict(),
                "version": learner.version, "rngs": rngs}, directory / "learner.pt")
    write_state(directory / "driver.json", state)


def load_learner(learner: Learner, run_dir: str | Path) -> RunState:
    """Restore `learner` from the newest checkpoint in `run_dir`, saved by as many ranks as it
    has: weights, optimizer, scheduler, loss scaler, version and this rank's RNG. Returns the
    driver's state saved with it."""
    import torch
    from transformers import AutoModelForCausalLM

    directory = latest(run_dir)
    with _unreadable_said(directory, learner.sharded):
        if learner.sharded:
            sharded = _read_sharded(learner, directory)
        elif learner.lora:
            from safetensors.torch import load_file

            saved = load_file(directory / ADAPTER_FILES[0])
        else:
            # Through from_pretrained: saved files use the checkpoint names (embed_out), the
            # module uses its own (lm_head), and transformers maps one to the other.
            saved = AutoModelForCausalLM.from_pretrained(directory / "model", dtype=torch.float32)
        state = torch.load(directory / "learner.pt", weights_only=True)  # never unpickle code
    if learner.sharded:  # on every rank, as FSDP's collectives pair up
        from torch.distributed.checkpoint.state_dict import set_state_dict

        set_state_dict(learner.model, learner.optimizer, model_state_dict=sharded["model"],
                       optim_state_dict=sharded["optimizer"])
    else:
        if learner.lora:
            from peft import set_peft_model_state_dict

            set_peft_model_state_dict(learner.model, saved)
        else:
            learner.model.load_state_dict(saved.state_dict())
        learner.optimizer.load_state_dict(state["optimizer"])
    learner.scheduler.load_state_dict(state["scheduler"])
    learner.scaler.load_state_dict(state["scaler"])
    if learner.rank >= len(state["rngs"]):
        raise CheckpointError(f"checkpoint {directory} was saved by {len(state['rngs'])} learner "
                              f"ranks, not {learner.cfg.learner.num_ranks}")
    rng = state["rngs"][learner.rank]
    learner.version = state["version"]
    torch.set_rng_state(rng["cpu"])
    if rng["cuda"]:
        torch.cuda.set_rng_state_all(rng["cuda"])
    return read_state(directory / "driver.json")


def _read_sharded(learner: Learner, directory: Path) -> dict:
    """This rank's shards of the saved model and optimizer, laid out as `learner`'s."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model, optimizer = get_state_dict(learner.model, learner.optimizer)
    loaded = {"model": model, "optimizer": optimizer}
    dcp.load(loaded, checkpoint_id=str(directory / "sharded"))
    return loaded


@contextmanager
def _unreadable_said(directory: Path, sharded: bool) -> Iterator[None]:
    """A checkpoint file that cannot be read, as one CheckpointError. Only errors that mean the
    files are missing, truncated or not what their name says: any other error while loading is
    a bug, and keeps its traceback."""
    from safetensors import SafetensorError

    # torch.load raises RuntimeError on a truncated archive, EOFError on an empty one, and
    # UnpicklingError on what weights_only refuses; transformers raises OSError on a missing or
    # malformed file.
    unreadable: tuple[type[BaseException], ...] = (OSError, EOFError, RuntimeError,
                                                  SafetensorError, pickle.UnpicklingError)
    if sharded:  # torch.distributed.checkpoint gathers every rank's failure into one
        from torch.distributed.checkpoint.api import CheckpointException

        unreadable += (CheckpointException,)
    try:
        yield
    except unreadable as e:
        raise CheckpointError(f"checkpoint {directory} is damaged, or of another "
                              f"learner.num_ranks: {one_line(str(e), 300)}") from None
