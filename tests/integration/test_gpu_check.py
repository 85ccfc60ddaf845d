"""`python -m deploy.gpu_check`, the first thing to run on GPUs: every check passes, one line each.
On a CUDA machine (marked `gpu`) with NCCL and the reference model; everywhere, the same checks on
the CPU with gloo and the tiny preset, so the check itself is known to work before a GPU is lent."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from deploy.gpu_check import CHECKS

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


def gpu_check(*args: str) -> list[str]:
    proc = subprocess.run([sys.executable, "-m", "deploy.gpu_check", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(("ok", "FAIL", "skip"))]
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return lines


def assert_every_check_passed(lines: list[str], skip: tuple[str, ...] = ()) -> None:
    assert [line.split()[:2] for line in lines] == [
        ["skip" if name in skip else "ok", name] for name in CHECKS], lines


def test_the_checks_pass_on_the_cpu():
    lines = gpu_check("--cluster.device", "cpu", "--model.name", "tiny", "--rollout.kv-cache-gib", "0.5")
    assert_every_check_passed(lines)
    assert "gloo" in lines[1] or "broadcast" in lines[1]
    assert "changed the engine's greedy output" in lines[1]  # the precondition: the check meant something


def test_the_checks_pass_on_the_cpu_with_a_sharded_learner():
    """Two learner ranks (FSDP2 over gloo): the weights the engine gets from the sharded model
    give the learner's greedy choices and log-probs, and a step of it reaches the engine. The
    short run is skipped: runs of two ranks are test_train's."""
    lines = gpu_check("--cluster.device", "cpu", "--model.name", "tiny", "--rollout.kv-cache-gib", "0.5",
                      "--learner.num-ranks", "2", "--skip", "run")
    assert_every_check_passed(lines, skip=("run",))
    assert "greedy tokens is the learner's first choice" in lines[1]


@pytest.mark.gpu
def test_the_checks_pass_on_a_gpu():
    assert_every_check_passed(gpu_check("--cluster.device", "gpu"))
