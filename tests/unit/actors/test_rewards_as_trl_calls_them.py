"""Reward functions get what TRL's GRPOTrainer gives them: TRL's own `_calculate_rewards` and a
rollout worker score the same batch with a function that records its keywords, for a plain-text
and a conversational dataset. TRL's documented examples run unchanged; `async` ones run at once."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import pytest
from transformers import TrainerState
from trl import GRPOTrainer

from actors.rollout_worker import RolloutWorker
from common.rewards import RewardError, Scorer
from common.types import Prompt
from deploy.examples.trl_rewards import format_reward_func, reward_len

HERE = __name__
STEP = 3
G = 2
CALLS: list[dict] = []
# What TRL passes that has no equivalent here: its completions table and its metrics logger.
NOT_PASSED = {"log_extra", "log_metric"}


def record(**kwargs) -> list[float]:
    CALLS.append(kwargs)
    return [1.0] * len(kwargs["completions"])


def trl_calls(raw, completions: list, completion_ids: list[list[int]], columns: dict) -> dict:
    """The keywords TRL's `_calculate_rewards` calls `record` with, for G completions of `raw`."""
    trainer = object.__new__(GRPOTrainer)  # only what `_calculate_rewards` reads
    trainer.accelerator = SimpleNamespace(device="cpu", is_main_process=True)
    trainer.args = SimpleNamespace(report_to=[])
    trainer.reward_funcs, trainer.reward_func_names = [record], ["record"]
    trainer.reward_processing_classes = [None]
    trainer.state = TrainerState(global_step=STEP)
    trainer._log_completion_extra = trainer._log_metric = lambda *args, **kwargs: None
    trainer.environments = None
    CALLS.clear()
    GRPOTrainer._calculate_rewards(trainer, [{"prompt": raw, **columns}] * G, [raw] * G, completions,
                                   completion_ids)
    return CALLS.pop()


def worker_scoring(scorer: Scorer) -> RolloutWorker:
    worker = object.__new__(RolloutWorker)  # only its scoring: no engine
    worker.scorer, worker.version = scorer, STEP
    return worker


def engine_outputs(texts: list[str]) -> list:
    return [SimpleNamespace(text=text, token_ids=[7 + i, 8]) for i, text in enumerate(texts)]


@pytest.mark.parametrize("raw", ["What is 2 + 2?", [{"role": "user", "content": "What is 2 + 2?"}]],
                         ids=["plain", "conversational"])
def test_every_keyword_trl_passes_reaches_the_function_with_trls_values(raw):
    texts = ["Four.", "It is 4"]
    conversational = isinstance(raw, list)
    trl_completions = [[{"role": "assistant", "content": t}] for t in texts] if conversational else texts
    trl = trl_calls(raw, trl_completions, [[7, 8], [8, 8]], {"answer": "4"})

    prompt = Prompt(index=0, text="<rendered>", token_ids=[1, 2], columns={"answer": "4"}, raw=raw)
    CALLS.clear()
    worker_scoring(Scorer([f"{HERE}:record"]))._score(prompt, engine_outputs(texts)).result()
    ours = CALLS.pop()

    assert set(ours) == set(trl) - NOT_PASSED
    for key in ("prompts", "completions", "completion_ids", "answer"):
        assert ours[key] == trl[key], key
    assert type(ours["trainer_state"]) is type(trl["trainer_state"])
    assert ours["trainer_state"].global_step == trl["trainer_state"].global_step == STEP


def test_trls_documented_rewards_run_unchanged():
    completions = ["x" * 20, "x" * 25]
    total, _ = Scorer(["deploy.examples.trl_rewards:reward_len"])(["p", "p"], completions)
    assert total == reward_len(completions) == [0, -5]

    prompt = Prompt(index=0, text="q", token_ids=[1], raw=[{"role": "user", "content": "q"}])
    texts = ["<think>a</think><answer>4</answer>", "4"]
    scorer = Scorer(["deploy.examples.trl_rewards:format_reward_func"])
    total, _ = worker_scoring(scorer)._score(prompt, engine_outputs(texts)).result()
    assert total == [1.0, 0.0]
    with pytest.raises(TypeError):  # the precondition: it needs completions as messages
        format_reward_func(texts)


RUNNING = {"now": 0, "most": 0}


async def verifier(completions, **kwargs) -> list[float]:
    """An HTTP verifier's shape: 50 ms of waiting per call."""
    RUNNING["now"] += 1
    RUNNING["most"] = max(RUNNING["most"], RUNNING["now"])
    await asyncio.sleep(0.05)
    RUNNING["now"] -= 1
    return [float(len(c)) for c in completions]


def test_an_async_reward_scores_every_group_of_a_batch_at_once():
    scorer = Scorer([f"{HERE}:verifier"])
    groups = [[f"completion {i}", f"completion {i}!"] for i in range(32)]  # 64 completions
    RUNNING.update(now=0, most=0)
    start = time.perf_counter()
    pending = [scorer.submit(["p", "p"], g) for g in groups]
    totals = [f.result()[0] for f in pending]
    seconds = time.perf_counter() - start
    assert totals == [[float(len(c)) for c in g] for g in groups]
    assert RUNNING["most"] == len(groups)  # all in flight together, not one group after another
    assert seconds < 64 * 0.05 / 4, seconds  # one at a time: 32 x 50 ms, per completion 64 x 50 ms


async def hangs(completions, **kwargs) -> list[float]:
    await asyncio.sleep(60)
    return [0.0] * len(completions)


def test_an_async_reward_that_does_not_answer_stops_the_run_in_one_line_naming_it():
    scorer = Scorer([f"{HERE}:hangs"], timeout_s=0.1)
    with pytest.raises(RewardError) as info:
        scorer(["p"], ["c"])
    message = str(info.value)
    assert f"`{HERE}:hangs` took over 0.1 s" in message and "rollout.reward_timeout_s" in message
    assert "\n" not in message
