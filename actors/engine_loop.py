"""The engine's own thread: it owns a vLLM engine running in this process and steps it, admitting
requests as others finish (continuous batching across rounds), and runs every other use of the
engine (loading weights, scoring) between two of its steps. vLLM's in-process engine is not
thread-safe; everything reaches it through here.

Why a loop of our own and not vLLM's AsyncLLM: AsyncLLM always runs the engine core in a second
process (vllm/v1/engine/core_client.py, EngineCoreClient.make_client refuses asyncio in
process), slower to start than one in process, and pausing it for a weight update waits on
that process; here a weight update is a call between two steps. Refilling as groups finish
never waits for a round's longest completion (the README's results give the gain), and driving
step() ourselves costs nothing over LLM.generate, which is the same loop
(vllm/entrypoints/common/offline.py, _run_engine).
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from common.spans import Spans


@dataclass
class Request:
    """One engine request (a group: `n` samples of one prompt) and where its output goes."""

    prompt_ids: list[int]
    params: object  # vllm.SamplingParams
    done: Future = field(default_factory=Future)


@dataclass
class _Call:
    fn: Callable[[], object]
    when_idle: bool
    done: Future = field(default_factory=Future)


class EngineLoop:
    def __init__(self, build: Callable[[], object], max_in_flight: int, spans: Spans,
                 salt: Callable[[], str], adapter: Callable[[], object] = lambda: None,
                 on_failure: Callable[[BaseException], None] | None = None):
        """`build` makes the engine (a vllm.LLM), on the engine's own thread: the thread that
        steps an engine must be the one that built it. With one GPU per engine vLLM's worker runs
        in the calling thread (vllm/v1/executor/uniproc_executor.py, UniProcExecutor), and its
        model runner caches the CUDA stream current on the thread that first asks, during
        start-up (vllm/v1/worker/gpu/model_runner.py, GPUModelRunner.main_stream); the copies of
        sampled ids to the host wait on that stream only (vllm/v1/worker/gpu/async_utils.py,
        AsyncOutput). Current streams are per OS thread, and vLLM gives a thread without one a new
        stream of its own (vllm/utils/torch_utils.py, current_stream; PyNcclCommunicator calls
        it): stepped from another thread, the first step could read its ids before they were
        written."""
        self.max_in_flight = max_in_flight
        """Most requests in the engine at once; 0: every request submitted."""
        self.spans, self.salt = spans, salt
        self.adapter = adapter
        """The LoRA request (a vllm.LoRARequest, or None) of a request admitted now."""
        self.on_failure = on_failure
        """Called on the engine's thread once the loop stopped for good, every waiter told."""
        self._waiting: deque[Request] = deque()  # guarded by _lock, as _calls
        self._calls: list[_Call] = []
        self._running: dict[str, Request] = {}
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._busy_since: float | None = None
        self._failed: BaseException | None = None
        built: Future = Future()
        threading.Thread(target=self._run, args=(build, built, torch.get_num_threads()),
                         name="engine-loop", daemon=True).start()
        self.llm = built.result()  # or what building it raised

    def submit(self, prompt_ids: list[int], params) -> Future:
        """The request's final vLLM output (a RequestOutput), once generated."""
        return self.submit_all([(prompt_ids, params)])[0]

    def submit_all(self, requests: list[tuple[list[int], object]],
                   on_done: Callable[[Future], object] | None = None) -> list[Future]:
        """`submit` for several requests, which enter the engine at the same step (room
        allowing): a round's batch is then the same in every run, and so are its numerics and
        samples; one at a time, the engine could step on the first few before the rest came.
        `on_done` is called with each future as it completes, on the engine's thread: in the
        engine's order, the same in every run (which `as_completed` does not keep)."""
        from vllm.sampling_params import RequestOutputKind

        for _, params in requests:
            # One output per request, with all n samples, when the last is done; vLLM's default
            # (cumulative) finishes a request with its last sample's output alone
            # (vllm/v1/engine/parallel_sampling.py, ParentRequest.get_outputs).
            params.output_kind = RequestOutputKind.FINAL_ONLY
        batch = [Request(ids, params) for ids, params in requests]
        for request in batch if on_done else ():
            request.done.add_done_callback(on_done)
        self._raise_if_failed()
        with self._lock:
            self._waiting.extend(batch)
        self._wake.set()
        return [request.done for request in batch]

    def call(self, fn: Callable[[], object], when_idle: bool = False):
        """Run `fn` on the engine's thread between two steps and return its result; with
        `when_idle`, once no request is in the engine (none is admitted meanwhile)."""
        self._raise_if_failed()
        call = _Call(fn, when_idle)
        with self._lock:
            self._calls.append(call)
        self._wake.set()
        return call.done.result()

    def _raise_if_failed(self) -> None:
        if self._failed is not None:
            raise RuntimeError("the engine's loop stopped") from self._failed

    # --- the engine's thread -------------------------------------------------------------------

    def _run(self, build: Callable[[], object], built: Future, threads: int) -> None:
        # OpenMP's thread count belongs to each thread, and a new one starts from the process's
        # (Ray's 1): the engine must be built and run with the actor's threads, or vLLM's CPU
        # attention refuses ("thread_num" check). vLLM replaces torch.set_num_threads while it
        # starts (vllm/v1/worker/cpu_worker.py, CPUWorker.init_device); torch's own setter is
        # still there.
        torch._C.set_num_threads(threads)
        try:
            llm = build()
        except BaseException as e:
            built.set_exception(e)
            return
        self.engine = llm.llm_engine
        built.set_result(llm)
        try:
            while True:
                if not self._running and not self._waiting and not self._calls:
                    self._mark_idle()
                    self._wake.wait()
                    self._wake.clear()
                self._run_calls()
                self._admit()
                if self._running:
                    self._step()
        except BaseException as e:  # every waiter hears of it, nobody hangs
            self._failed = e
            for request in self._running.values():
                request.done.set_exception(e)
            with self._lock:
                calls, self._calls = self._calls, []
                waiting, self._waiting = list(self._waiting), deque()
            for call in calls:
                call.done.set_exception(e)
            for request in waiting:
                request.done.set_exception(e)
            if self.on_failure is not None:
                self.on_failure(e)

    def _step(self) -> None:
        if self._busy_since is None:
            self._busy_since = time.time()
        for out in self.engine.step():
            if out.finished:
                self._running.pop(out.request_id).done.set_result(out)

    def _mark_idle(self) -> None:
        """Close the span of generation since the engine last went busy."""
        if self._busy_since is not None:
            self.spans.add("generate", self._busy_since, time.time() - self._busy_since)
            self._busy_since = None

    def _run_calls(self) -> None:
        with self._lock:
            ready = [c for c in self._calls if not (c.when_idle and self._running)]
            self._calls = [c for c in self._calls if c not in ready]
        if ready:
            self._mark_idle()  # a call between two steps splits the generation span
        for call in ready:
            try:
                call.done.set_result(call.fn())
            except Exception as e:  # the caller's to raise
                call.done.set_exception(e)

    def _admit(self) -> None:
        from vllm.inputs import tokens_input

        with self._lock:
            if any(c.when_idle for c in self._calls):  # draining
                return
            room = self.max_in_flight - len(self._running) if self.max_in_flight else len(self._waiting)
            admitted = [self._waiting.popleft() for _ in range(min(room, len(self._waiting)))]
        for request in admitted:
            request_id = str(next(self._ids))
            try:
                # The cache salt names the weights: prompt blocks cached under older weights are
                # never reused, which a prefix-cache reset cannot ensure while requests run
                # (vllm/v1/core/block_pool.py, BlockPool.reset_prefix_cache then refuses).
                self.engine.add_request(request_id, tokens_input(request.prompt_ids, cache_salt=self.salt()),
                                        request.params, lora_request=self.adapter())
            except Exception as e:  # a bad request fails alone
                request.done.set_exception(e)
                continue
            self._running[request_id] = request
