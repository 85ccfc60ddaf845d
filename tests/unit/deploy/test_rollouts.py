"""The driver's rollout logic with fake workers and a fake transport (no Ray, no vLLM): rounds split
over the workers, and recovery when a worker dies during generation, during a weight push, twice in
a row, or for good."""

from __future__ import annotations

import pytest

from common.config import Config
from common.data import PromptSampler
from common.errors import RunError
from common.types import GenerationStats, Prompt, RunState
from deploy.rollouts import Rollouts, split
from deploy.workers import Share, TransferFailed


def test_split_sizes_differ_by_at_most_one_larger_first():
    assert split(list(range(10)), 3) == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]


def test_split_fewer_items_than_parts_leaves_empty_tails():
    assert split(["a", "b"], 3) == [["a"], ["b"], []]


def test_split_even_and_single():
    assert split([1, 2, 3, 4], 2) == [[1, 2], [3, 4]]
    assert split([1, 2, 3], 1) == [[1, 2, 3]]
    assert split([], 2) == [[], []]


# ----- fakes -----


class FakeWorkers:
    """Workers that generate at once; `die(i)` kills worker i (its shares in flight are lost and
    Ray restarts it), `gone` holds workers Ray gives up on."""

    def __init__(self, n: int):
        self.n = n
        self.launched: list[Share] = []
        self.dead: set[int] = set()       # died, restart not yet seen by the driver
        self.gone: set[int] = set()
        self.waited: set[int] = set()  # shares (by id) the driver waited on

    def __len__(self) -> int:
        return self.n

    def die(self, worker: int) -> None:
        self.dead.add(worker)

    def stream(self, worker: int, prompts: list[Prompt], round_: int) -> Share:
        share = Share(round_, worker, prompts, done=None)
        self.launched.append(share)
        return share

    def finished(self, shares, wait_s=0.0):
        if wait_s:
            self.waited.update(id(s) for s in shares)
        lost = [s for s in shares if s.worker in self.dead]
        stored = [(s, GenerationStats(tokens=0, seconds=1.0)) for s in shares
                  if s not in lost]
        return stored, lost

    def restarted(self) -> list[int]:
        return sorted(self.dead)

    def await_restart(self, workers) -> int:
        restarted = 0
        for i in workers:
            if i in self.gone:
                raise RunError(f"rollout worker {i} died and Ray could not restart it")
            if i in self.dead:
                self.dead.discard(i)
                restarted += 1
        return restarted


class FakeBuffer:
    """Holds every group launched, less `rejected` (groups left out for equal rewards)."""

    def __init__(self, workers: FakeWorkers):
        self.workers, self.rejected = workers, 0

    def short(self) -> int:
        """Groups the batch of 4 being waited for lacks."""
        return max(0, 4 - (sum(len(s.prompts) for s in self.workers.launched) - self.rejected))


class FakeCall:
    """A call that takes one poll interval."""

    def __init__(self, what: str):
        self.what, self.polled = what, False

    def done(self, wait_s: float) -> bool:
        done, self.polled = self.polled, True
        return done

    def result(self):
        return self.what


class FakeTransport:
    """Records every push and revive; `deaths` is a list, one entry per call, of the workers that
    die during that call (an empty list: nobody)."""

    def __init__(self, workers: FakeWorkers, deaths: list[list[int]] = ()):
        self.workers, self.deaths, self.calls = workers, list(deaths), []

    def _maybe_die(self) -> None:
        dying = self.deaths.pop(0) if self.deaths else []
        if dying == "broken":  # a member's load raised: every side fails, nobody died
            raise TransferFailed([], cause=RuntimeError("load failed part-way"))
        for i in dying:
            self.workers.die(i)
        if dying:
            raise TransferFailed(dying)

    def push(self, version: int) -> None:
        self.calls.append(("push", version))
        if self.workers.restarted():  # as both transports find out, before or during the push
            raise TransferFailed(self.workers.restarted())
        self._maybe_die()

    def revive(self, workers: list[int], version: int) -> None:
        self.calls.append(("revive", workers, version))
        self._maybe_die()


def rollouts(workers: int = 2, deaths: list[list[int]] = (), **cfg_changes) -> Rollouts:
    cfg = Config()
    cfg.grpo.group_size, cfg.grpo.batch_size = 2, 8  # 4 prompts per round
    cfg.cluster.max_worker_restarts = 3
    for key, value in cfg_changes.items():
        section, name = key.split("__")
        setattr(getattr(cfg, section), name, value)
    prompts = [Prompt(i, f"p{i}", [i]) for i in range(20)]
    fake = FakeWorkers(workers)
    return Rollouts(cfg, fake, FakeBuffer(fake), FakeTransport(fake, deaths),
                    PromptSampler(prompts, seed=0), RunState())


# ----- generation -----


def test_a_round_is_split_over_the_workers_and_generation_runs_lag_rounds_ahead():
    r = rollouts(buffer__max_policy_lag=1)
    r.generate_ahead(0)
    assert [(s.round, s.worker, len(s.prompts)) for s in r.workers.launched] == [
        (0, 0, 2), (0, 1, 2), (1, 0, 2), (1, 1, 2)]
    r.generate_ahead(0)  # already ahead: nothing more
    assert len(r.workers.launched) == 4
    r.poll()
    assert r.pending == [] and len(r.take_stats()) == 4


def test_a_worker_that_dies_during_generation_is_revived_and_its_share_generated_again():
    r = rollouts()
    r.push_weights(0)
    r.generate_ahead(0)
    lost = r.workers.launched[1]
    r.workers.die(1)
    r.wait(FakeCall("a batch"), idle_step=0)
    assert r.state.lost_groups == 2 and r.state.worker_restarts == 1
    assert r.transport.calls == [("push", 0), ("revive", [1], 0)]
    again = r.workers.launched[-1]
    assert (again.worker, again.round, again.prompts) == (1, lost.round, lost.prompts)
    assert r.lost == [] and r.engines_version == 0


def test_a_lost_share_waits_while_the_learner_trains():
    r = rollouts()
    r.push_weights(0)
    r.generate_ahead(0)
    r.workers.die(0)
    r.wait(FakeCall("learner step 1"))
    assert len(r.lost) == 1 and r.transport.calls == [("push", 0)]  # no weights to give yet
    r.push_weights(1)  # the next push revives it, then its share runs again
    assert r.transport.calls == [("push", 0), ("push", 1), ("revive", [0], 1)]
    assert r.lost == [] and r.workers.launched[-1].round == 0


def test_a_worker_that_dies_during_a_push_is_revived_with_that_version():
    r = rollouts(deaths=[[1]])
    r.push_weights(5)
    assert r.transport.calls == [("push", 5), ("revive", [1], 5)]
    assert r.state.worker_restarts == 1 and r.engines_version == 5


def test_a_worker_that_dies_twice_in_a_row_is_revived_twice():
    r = rollouts(deaths=[[0], [0]])
    r.push_weights(2)
    assert r.transport.calls == [("push", 2), ("revive", [0], 2), ("revive", [0], 2)]
    assert r.state.worker_restarts == 2 and r.engines_version == 2


def test_a_worker_that_never_comes_back_ends_the_run_in_one_line():
    r = rollouts(deaths=[[1]])
    r.workers.gone.add(1)
    with pytest.raises(RunError, match="rollout worker 1 died and Ray could not restart it"):
        r.push_weights(1)


def test_a_transfer_that_broke_with_everyone_alive_is_made_again_afresh():
    r = rollouts(deaths=["broken"])
    r.push_weights(3)
    assert r.transport.calls == [("push", 3), ("revive", [], 3)]  # revive([]): the group anew
    assert r.state.worker_restarts == 0 and r.engines_version == 3


def test_a_transfer_that_keeps_breaking_ends_the_run_with_its_own_error():
    r = rollouts(deaths=["broken"] * 100, cluster__max_worker_restarts=1)
    with pytest.raises(RuntimeError, match="load failed part-way"):
        r.push_weights(3)
    assert len(r.transport.calls) == 1 + 1 * 2


def test_workers_that_keep_dying_end_the_run_after_a_bounded_number_of_attempts():
    r = rollouts(deaths=[[0]] * 100, cluster__max_worker_restarts=2)
    with pytest.raises(RunError, match=r"kept dying while receiving weights version 4 \(5 attempts\)"):
        r.push_weights(4)
    assert len(r.transport.calls) == 1 + 2 * 2  # each of 2 workers may be restarted twice


# ----- dynamic sampling -----


def test_groups_left_out_for_equal_rewards_are_generated_again_for_that_step():
    r = rollouts(grpo__drop_zero_std_groups=True)
    r.push_weights(0)
    r.generate_ahead(0)
    r.buffer.rejected = 3  # of the round's 4 groups only 1 had rewards that differ
    r.wait(FakeCall("a batch"), idle_step=0)
    extra = r.workers.launched[2:]
    assert [(s.round, len(s.prompts)) for s in extra] == [(0, 2), (0, 2)]  # a whole round more
    assert r.extra_groups == {0: 4} and r.extra_rounds == {0: 1}
    taken = [p.index for s in r.workers.launched for p in s.prompts]
    assert len(set(taken)) == 8  # new prompts, not the same ones again
    assert r.prompts_taken(1) == 8  # a run resumed at step 1 starts where this one stands


def test_dynamic_sampling_stops_the_run_when_the_reward_gives_no_signal():
    r = rollouts(grpo__drop_zero_std_groups=True, grpo__max_extra_rounds=2)
    r.push_weights(0)
    r.generate_ahead(0)
    r.buffer.rejected = 10**6  # nothing ever has signal
    with pytest.raises(RunError, match=r"after 2 extra rounds step 1 still lacks \d+ of 4 groups"):
        for _ in range(10):
            r.wait(FakeCall("a batch"), idle_step=0)


def test_a_synchronous_push_waits_for_the_groups_beyond_the_batch_to_be_stored():
    """A dynamic-sampling round may still be storing groups the batch did not need when the
    learner is done: a synchronous step waits for them, so the buffer's counts at its end do
    not depend on when those puts land (generation ahead of training does not wait)."""
    class StillStoring(FakeWorkers):
        """A share is stored only once the driver has waited on it."""

        def finished(self, shares, wait_s=0.0):
            stored, lost = super().finished(shares, wait_s)
            return [(s, stats) for s, stats in stored if id(s) in self.waited], lost

    for lag, in_flight_after_push in ((0, 0), (1, 4)):
        r = rollouts(buffer__max_policy_lag=lag)
        r.workers = r.buffer.workers = StillStoring(2)
        r.generate_ahead(0)
        r.push_weights(1)
        assert len(r.pending) == in_flight_after_push, lag


def test_without_dynamic_sampling_a_short_buffer_is_left_to_wait():
    r = rollouts()
    r.push_weights(0)
    r.generate_ahead(0)
    r.buffer.rejected = 3
    r.wait(FakeCall("a batch"), idle_step=0)
    assert len(r.workers.launched) == 2 and r.extra_groups == {}
