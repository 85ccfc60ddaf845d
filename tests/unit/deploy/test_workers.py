"""Telling who a rollout worker is while Ray restarts it, with Ray's own exceptions but no Ray:
a restart is seen and counted, a restart that never ends times out, and a worker Ray gave up on
ends the run in one line."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import ray.exceptions

from common.config import Config
from common.errors import RunError, WaitTimeout
from deploy import workers as workers_module
from deploy.workers import RolloutWorkers

UNAVAILABLE = ray.exceptions.ActorUnavailableError("restarting", None)


def workers(answers: list, call_timeout_s: float = 60.0, max_restarts: int = 3, monkeypatch=None):
    """Two workers known as incarnations "a" and "b"; worker 1's `ready` gives `answers` in turn
    (an exception is raised, a string is its new incarnation)."""
    cfg = Config()
    cfg.cluster.call_timeout_s, cfg.cluster.max_worker_restarts = call_timeout_s, max_restarts
    handles = [SimpleNamespace(ready=SimpleNamespace(remote=lambda i=i: i)) for i in range(2)]
    pool = RolloutWorkers(handles, cfg)
    pool.incarnations = ["a", "b"]
    pending = list(answers)

    def get(ref, timeout_s, what, actor=""):
        if ref == 0:
            return ("a", 0)
        answer = pending.pop(0) if len(pending) > 1 else pending[0]
        if isinstance(answer, BaseException):
            raise answer
        return (answer, 0)

    monkeypatch.setattr(workers_module, "get", get)
    monkeypatch.setattr(workers_module, "RESTART_POLL_S", 0.01)
    return pool


def test_a_restarted_worker_is_seen_waited_for_and_counted(monkeypatch):
    pool = workers([UNAVAILABLE, UNAVAILABLE, "b2"], monkeypatch=monkeypatch)
    assert pool.restarted() == [1]  # asked while Ray restarts it: waited for, not an error
    assert pool.await_restart([1]) == 1
    assert pool.incarnations == ["a", "b2"]
    assert pool.await_restart([1]) == 0  # the same incarnation again is not a new restart


def test_a_restart_that_never_ends_times_out_naming_the_worker(monkeypatch):
    pool = workers([UNAVAILABLE], call_timeout_s=0.05, monkeypatch=monkeypatch)
    with pytest.raises(WaitTimeout, match="waited 0 s for rollout worker 1 to restart"):
        pool.await_restart([1])


def test_a_worker_ray_gave_up_on_ends_the_run_in_one_line(monkeypatch):
    pool = workers([UNAVAILABLE, ray.exceptions.ActorDiedError()], max_restarts=2,
                   monkeypatch=monkeypatch)
    with pytest.raises(RunError, match=r"rollout worker 1 died and Ray could not restart it "
                                       r"\(cluster.max_worker_restarts=2\)"):
        pool.await_restart([1])


def test_every_engine_joins_the_weight_group_at_its_own_ranks():
    """The learner is rank 0; worker i's tensor-parallel ranks start at 1 + i x their number."""
    cfg = Config()
    cfg.rollout.tensor_parallel_size = 2
    joined = []
    handles = [SimpleNamespace(join_weight_group=SimpleNamespace(
        remote=lambda *args, i=i: joined.append((i, args)) or i)) for i in range(3)]
    refs = RolloutWorkers(handles, cfg).join_weight_group("10.0.0.1", 4321, 7, [], [[0]], 30.0, "s")
    assert refs == {0: 0, 1: 1, 2: 2}
    assert [(i, args[2]) for i, args in joined] == [(0, 1), (1, 3), (2, 5)]
    assert all(args[:2] == ("10.0.0.1", 4321) and args[3] == 7 and args[7] == "s" for _, args in joined)
