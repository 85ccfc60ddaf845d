"""Multi-turn episodes on a fake engine (a future per request, answered by a script): token in,
token out across turns, the limits, and an environment's faults in one line. The real engine
runs them in tests/integration/test_train.py."""

from __future__ import annotations

import itertools
import math
import re
import threading
from concurrent.futures import Future
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import skyrl_gym
from skyrl_gym.envs.base_text_env import BaseTextEnv, BaseTextEnvStepOutput

from actors.episodes import EpisodeRunner
from common import models
from common.config import Config
from common.environments import EnvError, ObservationTokens
from common.spans import Spans
from common.types import Prompt


@pytest.fixture(scope="module")
def tokenizer():
    return models.tokenizer_for("tiny")


@dataclass
class Logprob:
    logprob: float


class FakeEngine:
    """Answers each request with `reply(prompt_ids, turn_of_that_prompt)` token ids, each with
    log-prob -0.5 and finish reason `length`, and keeps every request's prompt ids."""

    def __init__(self, tokenizer, reply=lambda ids: [285, 1175]):
        self.tokenizer, self.reply, self.requests = tokenizer, reply, []
        self.lock = threading.Lock()

    def submit(self, prompt_ids: list[int], params) -> Future:
        with self.lock:
            self.requests.append((list(prompt_ids), params))
        ids = self.reply(prompt_ids)
        out = SimpleNamespace(token_ids=ids, text=self.tokenizer.decode(ids), finish_reason="length",
                              logprobs=[{t: Logprob(-0.5)} for t in ids])
        future: Future = Future()
        future.set_result(SimpleNamespace(outputs=[out]))
        return future


class Echo(BaseTextEnv):
    """Answers every turn with `You said: <text>` and rewards 0.25 a turn, for max_turns turns."""

    def __init__(self, env_config=None, extras=None):
        super().__init__()
        self.max_turns = extras["max_turns"]

    def step(self, action):
        self.turns += 1
        done = self.turns >= self.max_turns
        return BaseTextEnvStepOutput(observations=[] if done else [{"role": "user", "content": "You said: " + action}],
                                     reward=0.25, done=done, metadata={})


class Hangs(Echo):
    def step(self, action):
        threading.Event().wait(60)


class Raises(Echo):
    def step(self, action):
        raise KeyError("no such key")


class RaisesOnInit(Echo):
    def init(self, prompt_):
        raise RuntimeError("no game server")


class Malformed(Echo):
    def step(self, action):
        return {"observations": "not messages", "reward": 1.0, "done": False}


for cls in (Echo, Hangs, Raises, RaisesOnInit, Malformed):
    skyrl_gym.register(id=f"test-{cls.__name__.lower()}", entry_point=cls)


def runner(tokenizer, engine, name: str, **env) -> EpisodeRunner:
    cfg = Config()
    cfg.env.name = f"test-{name}"
    for key, value in env.items():
        setattr(cfg.env, key, value)
    return EpisodeRunner(cfg, engine.submit, tokenizer, Spans("test"), lambda out: [3] * len(out.token_ids))


def prompt(tokenizer, index: int = 0) -> Prompt:
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                         add_generation_prompt=True)
    return Prompt(index=index, text=text, token_ids=tokenizer(text)["input_ids"], raw="Hi")


def test_each_turn_continues_from_the_exact_tokens_so_far_and_only_the_models_are_trained(tokenizer):
    engine = FakeEngine(tokenizer)
    p = prompt(tokenizer)
    _, [out] = runner(tokenizer, engine, "echo", max_turns=3).submit(p, 0, 1, 8).result(10)
    obs = ObservationTokens(tokenizer)
    said = obs([{"role": "user", "content": "You said: " + tokenizer.decode([285, 1175])}])
    # The oracle: the prompt, the model's ids as sampled, then the observation's, turn by turn.
    assert [ids for ids, _ in engine.requests] == [p.token_ids, p.token_ids + [285, 1175] + said,
                                                   p.token_ids + 2 * ([285, 1175] + said)]
    assert out.token_ids == [285, 1175] + said + [285, 1175] + said + [285, 1175]
    assert out.model_mask == [1, 1] + [0] * len(said) + [1, 1] + [0] * len(said) + [1, 1]
    assert out.logprobs == [-0.5, -0.5] + [0.0] * len(said) + [-0.5, -0.5] + [0.0] * len(said) + [-0.5, -0.5]
    assert out.versions == [3] * len(out.token_ids)
    assert out.reward == pytest.approx(0.75)  # per-turn rewards summed
    assert (out.episode.turns, out.finish_reason) == (3, "length")
    # The observation's tokens are the chat template's, and the model's text is never re-tokenized.
    assert tokenizer.decode(said).startswith("\nUser: You said:")


def test_the_episode_ends_truncated_where_its_token_budget_would_be_passed(tokenizer):
    engine = FakeEngine(tokenizer, reply=lambda ids: [285] * 6)
    _, [out] = runner(tokenizer, engine, "echo", max_turns=4, max_episode_tokens=20).submit(
        prompt(tokenizer), 0, 1, 6).result(10)
    assert len(out.token_ids) <= 20
    assert out.finish_reason == "length"
    assert out.episode.turns < 4  # the budget ended it, not max_turns
    # Each turn asked no more than the budget left.
    assert all(params.max_tokens <= 20 - (len(ids) - len(prompt(tokenizer).token_ids))
               for ids, params in engine.requests)


def test_a_hung_environment_step_times_out_in_one_line_naming_it_and_the_episode(tokenizer):
    with pytest.raises(EnvError) as err:
        runner(tokenizer, FakeEngine(tokenizer), "hangs", step_timeout_s=0.2).submit(
            prompt(tokenizer, 7), 0, 2, 4).result(10)
    message = str(err.value)
    assert "\n" not in message
    assert "test-hangs" in message and "step took over 0.2 s" in message
    assert "of prompt 7" in message and "env.step_timeout_s" in message


@pytest.mark.parametrize("name, says", [("raises", "raised KeyError('no such key') in step"),
                                        ("malformed", "observations must be a list of chat messages")])
def test_an_environment_that_raises_or_answers_malformed_costs_one_line(tokenizer, name, says):
    with pytest.raises(EnvError) as err:
        runner(tokenizer, FakeEngine(tokenizer), name).submit(prompt(tokenizer, 5), 0, 1, 4).result(10)
    assert says in str(err.value) and "episode 0 of prompt 5" in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("name, says", [("raises", "raised KeyError('no such key') in step"),
                                        ("raisesoninit", "raised RuntimeError('no game server') in init")])
def test_with_on_error_drop_the_episode_is_left_out_of_the_loss_and_counted(tokenizer, name, says):
    _, outs = runner(tokenizer, FakeEngine(tokenizer), name, on_error="drop").submit(
        prompt(tokenizer), 0, 2, 4).result(10)
    assert all(math.isnan(o.reward) for o in outs)  # NaN: unscored, masked out of the loss
    assert all(says in o.episode.error for o in outs)
    with pytest.raises(EnvError, match=re.escape(says)):  # by default, one line
        runner(tokenizer, FakeEngine(tokenizer), name).submit(prompt(tokenizer), 0, 2, 4).result(10)


def test_the_engine_keeps_decoding_while_one_episode_waits_on_its_environment(tokenizer):
    """Episode 0's first step blocks until episode 1 has asked for its third turn: with turns
    run one at a time (or episodes one after another) that never happens, and the step times
    out instead."""
    released, made = threading.Event(), itertools.count()

    class Waits(Echo):
        def step(self, action):
            if self.extras_sample == 0 and self.turns == 0:
                assert released.wait(5), "no other episode went on while this one waited"
            return super().step(action)

        def init(self, prompt_):
            self.extras_sample = next(made)  # atomic: inits run on the pool's threads at once
            return prompt_, {}

    skyrl_gym.register(id="test-waits", entry_point=Waits)
    engine = FakeEngine(tokenizer)
    original = engine.submit

    def submit(ids, params):
        if sum(1 for r, _ in engine.requests if len(r) > len(p.token_ids)) >= 1:
            released.set()  # episode 1 is on its third turn while episode 0 waits
        return original(ids, params)

    engine.submit = submit
    p = prompt(tokenizer)
    _, outs = runner(tokenizer, engine, "waits", max_turns=3, step_timeout_s=10).submit(p, 0, 2, 4).result(20)
    assert released.is_set()
    assert [o.episode.turns for o in outs] == [3, 3]


def test_a_tool_call_is_answered_with_a_tool_message_in_the_plain_templates_format(tokenizer):
    """The built-in calculator: a call in the model's text, its result as a `Tool:` line before
    the next turn, and a final answer scored."""
    call = '<tool_call>{"name": "calculator", "arguments": {"expression": "17*23"}}</tool_call>'
    turns = iter([call, "#### 391"])
    engine = FakeEngine(tokenizer, reply=lambda ids: tokenizer(next(turns))["input_ids"])
    cfg_runner = runner(tokenizer, engine, "echo", max_turns=4)
    cfg_runner.env_id = "calculator"
    p = prompt(tokenizer)
    p.columns = {"expression": "17*23"}
    asked, [out] = cfg_runner.submit(p, 0, 1, 32).result(10)
    assert "You may call these tools" in asked.text and "What is 17*23?" in asked.text
    assert asked.token_ids == engine.requests[0][0]  # the group's prompt is what init rendered
    result = tokenizer.decode(engine.requests[1][0][len(asked.token_ids):])
    assert result == call + "\nTool: 391\nAssistant:"
    assert (out.reward, out.episode.tool_calls, out.episode.turns) == (1.0, 1, 2)


def test_the_calculator_evaluates_arithmetic_and_nothing_else():
    from common.builtin_envs import calculate

    assert calculate("2 + 3 * (4 - 1) ** 2 / 3") == 11
    with pytest.raises(ValueError, match="not arithmetic"):
        calculate("__import__('os').system('true')")


def test_an_episode_dropped_at_init_leaves_its_group_the_prompt_the_others_started_from(tokenizer):
    """One environment fails to start; the others add a system message: the group trains on the
    prompt they rendered, and the dropped episode is counted, not compared with it."""
    made = itertools.count()

    class SystemThenFails(Echo):
        def init(self, prompt_):
            if next(made) == 0:
                raise RuntimeError("no game server")
            return [{"role": "system", "content": "Be brief."}, *prompt_], {}

    skyrl_gym.register(id="test-systemthenfails", entry_point=SystemThenFails)
    asked, outs = runner(tokenizer, FakeEngine(tokenizer), "systemthenfails", on_error="drop").submit(
        prompt(tokenizer), 0, 3, 4).result(10)
    assert asked.text.startswith("Be brief.\nUser: Hi")
    assert sum(math.isnan(o.reward) for o in outs) == 1 and sum(bool(o.episode.error) for o in outs) == 1
