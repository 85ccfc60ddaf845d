"""Files kept outside the run directory: what a killed process held is swept, a live one's never."""

from __future__ import annotations

import multiprocessing as mp
import os

import torch

from common.held import held_dir, remove_unheld
from common.weight_sync import SharedMemoryChannel, specs_of


def _hold_and_wait(pattern: str, ready) -> None:
    specs = specs_of([("w", torch.zeros(4))])
    SharedMemoryChannel(pattern.format("killed") + ".weights", specs, owner=True)
    made = held_dir(pattern.format("killed-dir-"))
    open(os.path.join(made, "vllm_dist_x"), "w").close()  # what vLLM leaves inside
    ready.put(made)
    import time

    time.sleep(600)  # until killed


def test_what_a_killed_process_held_is_removed_and_a_live_ones_kept(tmp_path):
    """A learner or engine SIGKILLed leaves its files (a model-sized one in RAM); the next sweep
    removes them, and never those of a process that lives (a concurrent run's)."""
    pattern = str(tmp_path / "grpo-ray-{}")
    live = SharedMemoryChannel(pattern.format("live") + ".weights", specs_of([("w", torch.zeros(4))]),
                               owner=True)
    live_dir = held_dir(pattern.format("live-dir-"))
    ctx = mp.get_context("spawn")
    ready = ctx.Queue()
    killed = ctx.Process(target=_hold_and_wait, args=(pattern, ready))
    killed.start()
    killed_dir = ready.get(timeout=60)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([
        "grpo-ray-live.weights", "grpo-ray-killed.weights",
        os.path.basename(live_dir), os.path.basename(killed_dir)])
    assert remove_unheld(pattern.format("*")) == []  # all held
    killed.kill()
    killed.join(30)
    assert sorted(remove_unheld(pattern.format("*"))) == sorted(
        [pattern.format("killed") + ".weights", killed_dir])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["grpo-ray-live.weights", os.path.basename(live_dir)])
    live.close()
    assert [p.name for p in tmp_path.iterdir()] == [os.path.basename(live_dir)]
