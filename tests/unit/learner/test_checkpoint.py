"""Checkpoint directories: atomic writes, finding the newest finished one, pruning, JSON errors."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from learner import checkpoint
from common.types import RunState
from learner.checkpoint import CheckpointError, atomic_dir, complete, latest, path_for, prune, read_state


def make(run_dir, step: int, files=checkpoint.FILES):
    """A finished checkpoint directory holding `files`, each small but readable as its kind."""
    d = path_for(run_dir, step)
    for f in files:
        (d / f).parent.mkdir(parents=True, exist_ok=True)
        if f.endswith(".safetensors"):
            save_file({"w": torch.zeros(2)}, d / f)
        elif f.endswith(".pt"):
            torch.save({"version": step}, d / f)
        else:
            (d / f).write_text("{}")
    return d


def names(paths) -> list[str]:
    return [p.name for p in paths]


# ----- atomic_dir -----


def test_atomic_dir_renames_on_success(tmp_path):
    final = tmp_path / "checkpoints" / "step_000001"
    with atomic_dir(final) as tmp:
        assert tmp.name == "step_000001.tmp"
        assert not final.exists()
        (tmp / "learner.pt").write_text("state")
    assert (final / "learner.pt").read_text() == "state"
    assert not tmp.exists()


def test_atomic_dir_on_exception_leaves_nothing(tmp_path):
    final = tmp_path / "step_000001"
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_dir(final) as tmp:
            (tmp / "half").write_text("written")
            raise RuntimeError("disk full")
    assert not final.exists()
    assert not tmp.exists()


def test_atomic_dir_replaces_a_leftover_tmp(tmp_path):
    final = tmp_path / "step_000001"
    leftover = tmp_path / "step_000001.tmp"
    leftover.mkdir()
    (leftover / "stale").write_text("from a crash")
    with atomic_dir(final) as tmp:
        assert list(tmp.iterdir()) == []
        (tmp / "fresh").write_text("new")
    assert sorted(p.name for p in final.iterdir()) == ["fresh"]


def test_atomic_dir_replaces_an_existing_final(tmp_path):
    final = tmp_path / "step_000001"
    final.mkdir()
    (final / "old").write_text("old")
    with atomic_dir(final) as tmp:
        (tmp / "new").write_text("new")
    assert sorted(p.name for p in final.iterdir()) == ["new"]


# ----- complete / latest -----


def test_complete_ignores_tmp_and_sorts_numerically(tmp_path):
    make(tmp_path, 10)
    make(tmp_path, 2)
    make(tmp_path, 1_000_000)  # seven digits still matches and sorts last
    (checkpoint.root(tmp_path) / "step_000011.tmp").mkdir()
    (checkpoint.root(tmp_path) / "notes").mkdir()
    assert names(complete(tmp_path)) == ["step_000002", "step_000010", "step_1000000"]


def test_complete_without_a_checkpoint_dir_is_empty(tmp_path):
    assert complete(tmp_path) == []


def test_latest_returns_the_newest(tmp_path):
    make(tmp_path, 2)
    newest = make(tmp_path, 10)
    assert latest(tmp_path) == newest


@pytest.mark.parametrize("damage, message", [
    ("model/model.safetensors", "model.safetensors"),
    ("learner.pt", "learner.pt is not a torch archive"),
    ("driver.json", "cannot read"),
])
def test_latest_refuses_a_truncated_file(tmp_path, damage, message):
    path = make(tmp_path, 4) / damage
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=message):
        latest(tmp_path)


def test_latest_without_checkpoints_raises(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint to resume from"):
        latest(tmp_path)


def test_latest_names_the_missing_file(tmp_path):
    make(tmp_path, 3, files=("model/model.safetensors", "model/config.json", "driver.json"))
    with pytest.raises(CheckpointError, match=r"step_000003 is damaged: missing learner\.pt$"):
        latest(tmp_path)


def test_a_damaged_newest_checkpoint_names_the_whole_one_before_it(tmp_path):
    make(tmp_path, 2)
    make(tmp_path, 3)
    newest = make(tmp_path, 4, files=("model/model.safetensors", "model/config.json", "driver.json"))
    with pytest.raises(CheckpointError) as refused:
        latest(tmp_path)
    assert str(refused.value) == (
        f"checkpoint {newest} is damaged: missing learner.pt; the one before it, step_000003, is "
        f"whole: move {newest} out of {tmp_path / 'checkpoints'} to resume from step 3")


# ----- prune / read_state -----


def test_prune_keeps_the_newest_k(tmp_path):
    for step in (1, 2, 10, 3):
        make(tmp_path, step)
    prune(tmp_path, keep=2)
    assert names(complete(tmp_path)) == ["step_000003", "step_000010"]


def test_run_state_round_trips_and_a_corrupt_one_is_one_line(tmp_path):
    path = tmp_path / "driver.json"
    state = RunState(step=4, lost_groups=2, worker_restarts=1, eval_before=-0.25, elapsed_s=12.5)
    checkpoint.write_state(path, state)
    assert read_state(path) == state
    path.write_text('{"step": 4,')
    with pytest.raises(CheckpointError, match=r"cannot read .*driver\.json"):
        read_state(path)
    path.write_text('{"step": 4, "seen": [1, 2]}')  # fields of another shape
    with pytest.raises(CheckpointError, match=r"cannot read .*driver\.json.*seen"):
        read_state(path)


def test_read_state_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="cannot read"):
        read_state(tmp_path / "absent.json")
