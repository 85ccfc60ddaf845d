"""Rollout buffer: whole groups in prompt-stream order, staleness drops, back-pressure,
timeouts, accounting."""

from __future__ import annotations

import asyncio
import itertools

import pytest

from common.buffer import RolloutBuffer
from common.types import Prompt, RolloutGroup


def group(index: int, version: int = 0, g: int = 2) -> RolloutGroup:
    """A group of `g` completions of prompt `index` (the stream's `index`-th prompt), generated
    by policy `version`."""
    return RolloutGroup(
        prompt=Prompt(index=index, text=f"p{index}", token_ids=[index], position=index),
        completions=["x"] * g, completion_ids=[[1]] * g, logprobs=[[-0.5]] * g,
        token_versions=[[version]] * g,
        finish_reasons=["stop"] * g, rewards=[0.0] * g, reward_parts={},
        policy_version=version,
    )


def indices(groups: list[RolloutGroup]) -> list[int]:
    return [g.prompt.index for g in groups]


def test_get_returns_whole_groups_in_stream_order():
    async def main():
        buf = RolloutBuffer(capacity=4, max_policy_lag=0)
        await buf.put([group(0), group(1), group(2)])
        first = await buf.get(2, current_version=0, first=0)
        await buf.put([group(3)])
        second = await buf.get(2, current_version=0, first=0)
        return first, second, buf.stats()

    first, second, stats = asyncio.run(main())
    assert indices(first) == [0, 1]
    assert indices(second) == [2, 3]
    # each group arrives whole, with all of its completions
    assert [len(g.completion_ids) for g in first + second] == [2, 2, 2, 2]
    assert (stats["size"], stats["produced"], stats["consumed"]) == (0, 4, 4)


def test_get_drops_groups_older_than_the_lag_bound():
    async def main():
        buf = RolloutBuffer(capacity=5, max_policy_lag=1)
        # versions 1 and 2 are too old for current version 4 with lag 1 (oldest allowed: 3)
        await buf.put([group(0, version=1), group(1, version=2), group(2, version=3),
                       group(3, version=4), group(4, version=4)])
        batch = await buf.get(2, current_version=4, first=0)
        return batch, buf.stats()

    batch, stats = asyncio.run(main())
    assert indices(batch) == [2, 3]
    assert stats["dropped_stale"] == 2
    assert stats["size"] == 1


def test_a_stale_group_behind_a_fresh_one_is_dropped_too():
    async def main():
        # Two workers of unequal speed: version 3's group arrived before version 1's.
        buf = RolloutBuffer(capacity=4, max_policy_lag=1)
        await buf.put([group(0, version=3), group(1, version=1)])
        getting = asyncio.create_task(buf.get(2, current_version=3, first=0))
        await asyncio.sleep(0)
        assert not getting.done()  # one fresh group is not two
        await buf.put([group(2, version=2)])
        return await getting, buf.stats()

    batch, stats = asyncio.run(main())
    assert indices(batch) == [0, 2]  # lags 0 and 1; the group of lag 2 never reaches the learner
    assert (stats["dropped_stale"], stats["consumed"], stats["size"]) == (1, 2, 0)


def test_get_waits_for_a_fresh_group_when_the_stale_ones_are_dropped():
    async def main():
        buf = RolloutBuffer(capacity=2, max_policy_lag=0)
        await buf.put([group(0, version=0)])
        getting = asyncio.create_task(buf.get(1, current_version=1, first=0))
        await asyncio.sleep(0)
        dropped_while_waiting = buf.dropped_stale
        await buf.put([group(1, version=1)])
        return dropped_while_waiting, await getting

    dropped, batch = asyncio.run(main())
    assert dropped == 1
    assert indices(batch) == [1]


def test_put_blocks_when_full_until_a_get_makes_room():
    async def main():
        buf = RolloutBuffer(capacity=2, max_policy_lag=0)
        events: list[str] = []
        await buf.put([group(0), group(1)])

        async def producer():
            events.append("put start")
            await buf.put([group(2), group(3)])
            events.append("put done")

        async def consumer():
            await asyncio.sleep(0)  # let the producer run first and find the buffer full
            await asyncio.sleep(0)
            events.append(f"size {buf.stats()['size']} before get")
            batch = await buf.get(2, current_version=0, first=0)
            events.append("got " + ",".join(map(str, indices(batch))))

        await asyncio.gather(producer(), consumer())
        rest = await buf.get(2, current_version=0, first=0)
        return events, indices(rest)

    events, rest = asyncio.run(main())
    assert events == ["put start", "size 2 before get", "got 0,1", "put done"]
    assert rest == [2, 3]


def test_put_timeout_names_what_it_waited_for():
    async def main():
        buf = RolloutBuffer(capacity=1, max_policy_lag=0)
        await buf.put([group(0)])
        await buf.put([group(1)], timeout_s=0.05)

    with pytest.raises(TimeoutError, match=r"room in the rollout buffer \(full at 1 groups"):
        asyncio.run(main())


def test_get_timeout_names_what_it_waited_for():
    async def main():
        buf = RolloutBuffer(capacity=4, max_policy_lag=0)
        await buf.put([group(0)])
        await buf.get(3, current_version=0, first=0, timeout_s=0.05)

    with pytest.raises(TimeoutError, match=r"for 3 rollout groups \(have 1;"):
        asyncio.run(main())


def test_accounting_invariant_after_a_mixed_sequence():
    async def main():
        buf = RolloutBuffer(capacity=6, max_policy_lag=1)
        await buf.put([group(i, version=0) for i in range(4)])
        await buf.get(1, current_version=0, first=0)  # consumes 1
        await buf.put([group(4, version=2), group(5, version=2)])
        await buf.get(1, current_version=2, first=0)  # drops 3 (version 0 < 1), consumes 1
        await buf.put([group(6, version=3)])
        return buf.stats()

    s = asyncio.run(main())
    assert (s["produced"], s["consumed"], s["dropped_stale"], s["size"]) == (7, 2, 3, 2)
    assert s["produced"] == s["consumed"] + s["dropped_stale"] + s["size"]


def test_get_more_than_capacity_raises():
    buf = RolloutBuffer(capacity=2, max_policy_lag=0)
    with pytest.raises(ValueError, match="cannot get 3 groups from a buffer of capacity 2"):
        asyncio.run(buf.get(3, current_version=0, first=0))


def test_capacity_below_one_raises():
    with pytest.raises(ValueError, match=r"capacity must be >= 1 group \(got 0\)"):
        RolloutBuffer(capacity=0, max_policy_lag=0)


def test_dynamic_sampling_leaves_out_groups_whose_rewards_are_all_equal():
    async def main():
        buf = RolloutBuffer(capacity=4, max_policy_lag=0, drop_zero_std=True)
        flat, signal, unscored_but_one = group(0), group(1), group(2, g=3)
        flat.rewards = [0.5, 0.5]
        signal.rewards = [0.0, 1.0]
        unscored_but_one.rewards = [float("nan"), 0.3, float("nan")]  # one scored: no spread
        await buf.put([flat, signal, unscored_but_one])
        return await buf.get(1, current_version=0, first=0), buf.stats()

    batch, s = asyncio.run(main())
    assert indices(batch) == [1]
    assert (s["produced"], s["dropped_zero_std"], s["consumed"], s["size"]) == (3, 2, 1, 0)


def test_short_counts_what_the_waiting_get_lacks_and_nothing_once_it_returned():
    """Dynamic sampling asks for another round while the batch is short. Read from the size, a
    batch just taken would look like a shortage (the size drops to the leftovers) and start a
    round nobody needs, more or less often depending on timing."""
    async def main():
        buf = RolloutBuffer(capacity=8, max_policy_lag=0)
        seen = [buf.short()]  # no get waiting
        getting = asyncio.ensure_future(buf.get(3, current_version=0, first=0))
        await asyncio.sleep(0)
        seen.append(buf.short())
        await buf.put([group(0, version=0), group(1, version=0)])
        await asyncio.sleep(0)
        seen.append(buf.short())
        await buf.put([group(2), group(3), group(4)])  # a surplus: two left over
        await getting
        return seen + [buf.short()], buf.stats()["size"]

    seen, left = asyncio.run(main())
    assert seen == [0, 3, 1, 0] and left == 2  # the precondition: size alone reads short


def test_short_counts_groups_put_before_the_waiting_get_woke_up():
    """The driver asks the moment the last share is stored; the waiting get may not have run
    since the puts that woke it. A count it kept would still read short, and start an extra
    round (a different prompt stream from then on) depending on timing."""
    async def main():
        buf = RolloutBuffer(capacity=8, max_policy_lag=0)
        getting = asyncio.ensure_future(buf.get(3, current_version=0, first=0))
        await asyncio.sleep(0)
        await buf.put([group(0), group(1), group(2)])
        short = buf.short()  # no yield between the put and the question
        await getting
        return short

    assert asyncio.run(main()) == 0


def with_signal(index: int) -> RolloutGroup:
    g = group(index)
    g.rewards = [0.0, 1.0]
    return g


ROUND = [with_signal(10), group(11), with_signal(12), group(13), with_signal(14), with_signal(15)]
"""One round of 6 groups at stream positions 10..15, 11 and 13 without signal."""


def test_a_batch_is_the_same_whichever_group_arrives_first():
    """Dynamic sampling keeps the first groups with signal. Taken as they arrive, which ones
    depends on timing (Ray keeps no order between an async actor's calls, and several workers
    race); taken in prompt-stream order, once every earlier group is in, it does not."""
    async def main(order):
        buf = RolloutBuffer(capacity=4, max_policy_lag=0, drop_zero_std=True)
        getting = asyncio.ensure_future(buf.get(3, current_version=0, first=10))
        for g in order:
            await buf.put([g])
            await asyncio.sleep(0)
        return tuple(indices(await getting))

    orders = list(itertools.permutations(ROUND))
    first_to_arrive = {tuple(sorted([g.prompt.index for g in order if not g.zero_std][:3]))
                       for order in orders}
    assert len(first_to_arrive) > 1  # the precondition
    assert {asyncio.run(main(order)) for order in orders} == {(10, 12, 14)}


def test_one_step_ahead_the_surplus_of_a_batch_serves_the_next():
    """Step 0's round is 0..2, step 1's 3..5. Step 0's batch took 0, 2 and 3 (1 had no signal):
    step 1's begins at 4, skipping 3, and ends in step 2's round, at 6, the same whichever of
    those groups arrive first."""
    async def main(order):
        buf = RolloutBuffer(capacity=8, max_policy_lag=1, drop_zero_std=True)
        await buf.put([with_signal(0), group(1), with_signal(2), with_signal(3)])
        assert indices(await buf.get(3, current_version=0, first=0)) == [0, 2, 3]
        getting = asyncio.ensure_future(buf.get(3, current_version=1, first=3))
        for g in order:
            await buf.put([g])
            await asyncio.sleep(0)
        return tuple(indices(await getting))

    orders = list(itertools.permutations(with_signal(i) for i in range(4, 9)))
    first_to_arrive = {tuple(sorted(g.prompt.index for g in order[:3])) for order in orders}
    assert len(first_to_arrive) > 1  # the precondition
    assert {asyncio.run(main(order)) for order in orders} == {(4, 5, 6)}


def test_an_in_order_get_waits_for_a_gap_even_when_the_buffer_is_full():
    """Positions 1 and 2 arrived before 0, and fill the buffer; 0 must still get in (the get
    cannot take 1 and 2 before it), and the batch is the first two in stream order."""
    async def main():
        buf = RolloutBuffer(capacity=2, max_policy_lag=0)
        getting = asyncio.ensure_future(buf.get(2, current_version=0, first=0))
        await buf.put([group(1), group(2)])
        await asyncio.sleep(0)
        assert not getting.done()
        await buf.put([group(0)], timeout_s=1)
        return indices(await getting), indices(list(buf._groups))

    assert asyncio.run(main()) == ([0, 1], [2])


def test_an_in_order_get_skips_what_came_before_its_first_position():
    async def main():
        buf = RolloutBuffer(capacity=4, max_policy_lag=0)
        await buf.put([group(3), group(5), group(4)])  # 3: a surplus group of an earlier step
        return indices(await buf.get(2, current_version=0, first=4))

    assert asyncio.run(main()) == [4, 5]


def test_a_resumed_buffer_counts_on_from_the_run_it_continues():
    async def main():
        buf = RolloutBuffer(capacity=4, max_policy_lag=0)
        buf.carry_on({"produced": 40, "consumed": 36, "dropped_stale": 3, "dropped_zero_std": 1})
        await buf.put([group(0), group(1)])
        await buf.get(1, current_version=0, first=0)
        return buf.stats()

    s = asyncio.run(main())
    assert (s["produced"], s["consumed"], s["dropped_stale"], s["dropped_zero_std"], s["size"]) == (42, 37, 3, 1, 1)
    assert s["produced"] == s["consumed"] + s["dropped_stale"] + s["dropped_zero_std"] + s["size"]
