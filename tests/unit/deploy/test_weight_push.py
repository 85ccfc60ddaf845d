"""The driver's weight transports with a fake learner and fake workers (no Ray): who is sent what,
a partial shared-memory sync, and how a broadcast's failures are told apart."""

from __future__ import annotations

import pytest

from common.config import Config
from common.weight_sync import TensorSpec
from deploy.weight_push import BroadcastPush, SharedMemoryPush
from deploy.workers import Settled, TransferFailed

SPECS = [TensorSpec("w", "float32", (4,)), TensorSpec("b", "float32", (2,))]


class Done:
    """A call that finished at once."""

    def result(self):
        return None


class FakeLearner:
    """A LearnerClient that logs every call."""

    def __init__(self, log: list):
        self.log = log

    def weight_specs(self):
        self.log.append(("weight_specs",))
        return SPECS

    def open_shared_weights(self, path):
        self.log.append(("open_shared_weights", path))

    def send_weights(self):
        self.log.append(("send_weights",))
        return Done()

    def close_weight_sync(self):
        self.log.append(("close_weight_sync",))

    def open_weight_group(self, host, port):
        self.log.append(("open_weight_group", host, port))
        return 4321

    def connect_weight_group(self, world_size, buckets, timeout_s, secret):
        self.log.append(("connect_weight_group", world_size, buckets, timeout_s, secret))
        return Done()


class FakeWorkers:
    """Calls succeed unless `dying` names the worker (its process dies during the call) or
    `failing` does (its call raises without a death); `restarted_now` is what `restarted` says."""

    def __init__(self, n: int, log: list):
        self.log, self.n = log, n
        self.dying: set[int] = set()
        self.failing: set[int] = set()
        self.restarted_now: list[int] = []

    def __len__(self) -> int:
        return self.n

    def _each(self, method: str, only) -> dict:
        chosen = list(range(self.n) if only is None else only)
        self.log.append((method, chosen))
        return {i: (method, i) for i in chosen}

    def receive_weights(self, version, only=None) -> dict:
        return self._each("receive_weights", only)

    def open_shared_weights(self, path, specs, only=None) -> dict:
        return self._each("open_shared_weights", only)

    def join_weight_group(self, host, port, world_size, specs, buckets, timeout_s, secret) -> dict:
        self.log.append(("join_weight_group", host, port, world_size, secret))
        return {i: ("join", i) for i in range(self.n)}

    def settle(self, calls: dict, what: str, others=None) -> Settled:
        out = Settled()
        for i in calls:
            if i in self.dying:
                out.dead.append(i)
            elif i in self.failing:
                out.errors.append(RuntimeError(f"worker {i}: gloo timed out"))
            else:
                out.ok.append(i)
        self.dying, self.failing = set(), set()
        return out

    def restarted(self) -> list[int]:
        return self.restarted_now


def transport(kind, n: int = 3):
    log: list = []
    learner, workers = FakeLearner(log), FakeWorkers(n, log)
    push = SharedMemoryPush(Config(), learner, workers, "test") if kind == "shm" \
        else BroadcastPush(Config(), learner, workers, "127.0.0.1")
    log.clear()
    return push, workers, log


def test_shared_memory_writes_each_version_once_and_every_engine_loads_it():
    push, _, log = transport("shm")
    push.push(1)
    assert log == [("send_weights",), ("receive_weights", [0, 1, 2])]


def test_a_partial_shared_memory_sync_revives_only_the_worker_that_missed_it():
    push, workers, log = transport("shm")
    workers.dying = {2}
    with pytest.raises(TransferFailed) as died:
        push.push(1)
    assert died.value.workers == [2] and push.holds == {0: 1, 1: 1}
    log.clear()
    push.revive([2], 1)
    # The file already holds version 1: no second write; only worker 2 opens it and loads.
    assert log == [("open_shared_weights", [2]), ("receive_weights", [2])]
    assert push.holds == {0: 1, 1: 1, 2: 1}


def test_a_restarted_worker_without_a_channel_is_found_by_asking_who_is_new():
    push, workers, _ = transport("shm")
    workers.failing, workers.restarted_now = {1}, [1]  # its call fails, it did not die in it
    with pytest.raises(TransferFailed) as died:
        push.push(3)
    assert died.value.workers == [1]


def test_a_transfer_that_breaks_with_everyone_alive_fails_naming_no_one():
    push, workers, _ = transport("broadcast")
    workers.failing = {0}
    with pytest.raises(TransferFailed) as failed:
        push.push(3)
    assert failed.value.workers == [] and "worker 0: gloo timed out" in str(failed.value.cause)


def test_a_broadcast_starts_only_when_every_member_is_alive():
    push, workers, log = transport("broadcast")
    workers.restarted_now = [1]
    with pytest.raises(TransferFailed) as died:
        push.push(2)
    assert died.value.workers == [1] and log == []  # nothing was sent


def test_a_broadcast_sends_to_every_engine_at_once():
    push, _, log = transport("broadcast")
    push.push(2)
    assert log == [("send_weights",), ("receive_weights", [0, 1, 2])]


def test_reviving_after_a_broadcast_forms_the_group_again_with_every_member():
    push, workers, log = transport("broadcast", n=2)
    workers.dying = {0}
    with pytest.raises(TransferFailed):
        push.push(2)
    log.clear()
    push.revive([0], 2)
    names = [entry[0] for entry in log]
    assert names == ["open_weight_group", "connect_weight_group", "join_weight_group",
                     "send_weights", "receive_weights"]
    assert log[1][1] == log[2][3] == 3  # the learner and one rank per engine
    assert log[2][2] == 4321  # the port the learner opened
    assert log[1][4] == log[2][4]  # every member was told the same secret
    first = log[1][4]
    push.revive([], 2)
    assert log[-4][4] != first  # a group formed again has a new one
