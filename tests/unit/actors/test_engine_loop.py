"""The engine's loop with a fake engine (no vLLM): requests admitted up to the limit and refilled as
others finish, calls run between two steps (or once idle), a crash reaching every waiter, and the
generation spans it records."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import pytest

from actors.engine_loop import EngineLoop
from common.spans import Spans

TIMEOUT = 10


class FakeEngine:
    """Each request takes `steps` engine steps (its prompt's first token); every step is logged
    with the requests it ran and whatever the loop did between steps."""

    def __init__(self, fail_at_step: int | None = None):
        self.running: dict[str, int] = {}
        self.log: list = []
        self.steps = 0
        self.fail_at_step = fail_at_step

    def add_request(self, request_id, prompt, params, lora_request=None):
        self.running[request_id] = prompt["prompt_token_ids"][0]

    def step(self):
        self.steps += 1
        if self.steps == self.fail_at_step:
            raise RuntimeError("engine crashed")
        self.log.append(("step", sorted(self.running)))
        time.sleep(0.001)
        out = []
        for request_id in list(self.running):
            self.running[request_id] -= 1
            if self.running[request_id] == 0:
                del self.running[request_id]
                out.append(SimpleNamespace(request_id=request_id, finished=True))
        return out


def loop_of(engine: FakeEngine, max_in_flight: int = 0) -> EngineLoop:
    return EngineLoop(lambda: SimpleNamespace(llm_engine=engine), max_in_flight, Spans("engine"),
                      salt=lambda: "policy-0")


def params():
    return SimpleNamespace(output_kind=None)


def wait_for_step(engine: FakeEngine, step: int) -> None:
    while engine.steps < step:
        time.sleep(0.001)


def started(length: int, steps: int) -> tuple[FakeEngine, EngineLoop, object]:
    """A loop whose engine is `steps` steps into a request `length` steps long (its future)."""
    engine = FakeEngine()
    loop = loop_of(engine)
    future = loop.submit([length], params())
    wait_for_step(engine, steps)
    return engine, loop, future


@pytest.fixture(autouse=True)
def tokens_input(monkeypatch):
    """vllm.inputs.tokens_input, as plain data."""
    import vllm.inputs

    monkeypatch.setattr(vllm.inputs, "tokens_input",
                        lambda ids, cache_salt: {"prompt_token_ids": ids, "cache_salt": cache_salt})


def test_requests_are_admitted_up_to_the_limit_and_refilled_as_others_finish():
    engine = FakeEngine()
    loop = loop_of(engine, max_in_flight=2)
    futures = loop.submit_all([([steps], params()) for steps in (1, 3, 2)])
    for f in futures:
        f.result(timeout=TIMEOUT)
    ran = [ids for what, ids in engine.log if what == "step"]
    assert ran[0] == ["0", "1"]  # two at once: the third waits
    assert ran[1] == ["1", "2"]  # request 0 finished after one step; request 2 took its place
    assert max(len(ids) for ids in ran) == 2


class SlowParams(SimpleNamespace):
    """Sampling parameters that take a while to prepare, as a real submitter does between
    requests: time enough for the engine to step in between."""

    def __setattr__(self, name, value):
        time.sleep(0.005)
        super().__setattr__(name, value)


def test_a_batch_submitted_together_enters_the_engine_at_one_step_while_it_runs():
    engine, loop, running = started(200, 3)  # the engine steps every millisecond meanwhile
    for f in loop.submit_all([([5], SlowParams()) for _ in range(10)]):
        f.result(timeout=TIMEOUT)
    batch = [str(i) for i in range(1, 11)]
    first_step = next(ids for what, ids in engine.log if what == "step" and set(ids) & set(batch))
    assert set(batch) <= set(first_step)  # all ten in the step that ran the first of them
    assert not running.done()  # the precondition: the engine was stepping all along
    running.result(timeout=TIMEOUT)


def test_completions_are_reported_in_the_engines_order():
    """Which groups fill a batch can depend on the order they are reported in: it must be the
    engine's, the same in every run, not the order of a set of futures."""
    order = []
    futures = loop_of(FakeEngine()).submit_all([([steps], params()) for steps in (2, 1, 2, 1, 3, 1)],
                                               on_done=order.append)
    for f in futures:
        f.result(timeout=TIMEOUT)
    assert [futures.index(f) for f in order] == [1, 3, 5, 0, 2, 4]  # one step: requests 1, 3, 5 in the order they ran


def test_a_call_runs_between_two_steps_while_requests_keep_generating():
    engine, loop, slow = started(50, 5)
    at = loop.call(lambda: engine.steps)  # e.g. a weight update, in flight
    assert 5 <= at < 50 and not slow.done()
    slow.result(timeout=TIMEOUT)
    assert engine.steps == 50


def test_an_idle_call_waits_for_the_requests_in_the_engine_and_admits_none_meanwhile():
    engine, loop, first = started(20, 2)
    seen = {}

    def update():
        seen["steps"], seen["running"] = engine.steps, dict(engine.running)

    threading.Thread(target=lambda: loop.call(update, when_idle=True)).start()
    wait_for_step(engine, 5)  # the call is waiting: a request submitted now must not start
    second = loop.submit([1], params())
    first.result(timeout=TIMEOUT)
    second.result(timeout=TIMEOUT)
    assert seen == {"steps": 20, "running": {}}  # between rounds: after the first, before the second
    assert engine.log[-1] == ("step", ["1"])


def test_a_crash_of_the_engine_reaches_every_waiter():
    loop = loop_of(FakeEngine(fail_at_step=3))
    running = loop.submit([10], params())
    with pytest.raises(RuntimeError, match="engine crashed"):
        running.result(timeout=TIMEOUT)
    with pytest.raises(RuntimeError, match="the engine's loop stopped"):
        loop.submit([1], params())


def test_a_failing_call_fails_alone():
    engine = FakeEngine()
    loop = loop_of(engine)
    with pytest.raises(ZeroDivisionError):
        loop.call(lambda: 1 / 0)
    assert loop.submit([2], params()).result(timeout=TIMEOUT) is not None


def test_generation_is_one_span_per_busy_stretch_split_by_calls():
    engine, loop, _ = started(30, 10)
    loop.call(lambda: None)  # a weight update in flight splits the stretch
    loop.submit([1], params()).result(timeout=TIMEOUT)
    while engine.running:
        time.sleep(0.001)
    spans, deadline = [], time.monotonic() + TIMEOUT
    while len(spans) < 2 and time.monotonic() < deadline:  # the second closes once idle
        spans += loop.spans.take()
        time.sleep(0.01)
    assert [s.name for s in spans] == ["generate", "generate"]
    assert spans[0].start + spans[0].seconds <= spans[1].start


def test_the_loop_asks_vllm_for_one_final_output_per_request():
    from vllm.sampling_params import RequestOutputKind

    sampling = params()
    loop_of(FakeEngine()).submit([1], sampling).result(timeout=TIMEOUT)
    assert sampling.output_kind == RequestOutputKind.FINAL_ONLY


def test_the_engine_is_built_on_the_thread_that_steps_it_and_runs_every_call(tokens_input):
    """On a GPU the model runner keeps the CUDA stream of the thread that started it, and a step
    on another thread's stream could read its sampled ids before they are written: the engine
    is built, stepped and called on one thread, never the caller's."""
    threads: dict[str, set[int]] = {"build": set(), "step": set(), "call": set()}

    class Recording(FakeEngine):
        def step(self):
            threads["step"].add(threading.get_ident())
            return super().step()

    def build():
        threads["build"].add(threading.get_ident())
        return SimpleNamespace(llm_engine=Recording())

    loop = EngineLoop(build, 0, Spans("engine"), salt=lambda: "policy-0")
    loop.submit([2], params()).result(timeout=TIMEOUT)
    loop.call(lambda: threads["call"].add(threading.get_ident()))
    assert len(threads["build"] | threads["step"] | threads["call"]) == 1
    assert threading.get_ident() not in threads["build"]


def test_an_engine_that_cannot_be_built_fails_the_constructor():
    def build():
        raise ValueError("no such model")

    with pytest.raises(ValueError, match="no such model"):
        EngineLoop(build, 0, Spans("engine"), salt=lambda: "policy-0")


def test_a_loop_that_stops_tells_every_waiter_then_its_owner(tokens_input):
    """The rollout worker exits then, for Ray to restart it: an actor whose loop stopped can do
    nothing, and would otherwise fail every call while Ray saw it alive."""
    engine = FakeEngine()
    stopped = []
    loop = EngineLoop(lambda: SimpleNamespace(llm_engine=engine), 0, Spans("engine"),
                      salt=lambda: "policy-0", on_failure=lambda e: stopped.append((e, future.done())))
    future = loop.submit([100], params())
    engine.fail_at_step = engine.steps + 2  # once `future` is there to look at
    with pytest.raises(RuntimeError, match="engine crashed"):
        future.result(timeout=TIMEOUT)
    deadline = time.monotonic() + TIMEOUT
    while not stopped and time.monotonic() < deadline:
        time.sleep(0.001)
    assert [(str(e), told) for e, told in stopped] == [("engine crashed", True)]
