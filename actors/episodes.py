"""Multi-turn episodes on a rollout worker's engine loop: token in, token out.

Each episode is a coroutine on the runner's event loop. A model turn is a request to the engine
loop holding the prompt and every token of the episode so far, the model's exactly as sampled
and the environment's as `ObservationTokens` renders them; the environment's calls run on a
thread pool, each bounded by env.step_timeout_s. While one episode waits on its environment the
engine goes on decoding every other request, and the next turn enters the engine as soon as the
observation is tokenized (the engine loop admits requests between two steps).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
import zlib
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from common import data, environments
from common.config import Config
from common.environments import EnvError
from common.errors import one_line
from common.spans import Spans
from common.types import Episode, Prompt

log = logging.getLogger(__name__)


@dataclass
class EpisodeOutput:
    """One episode: the tokens after its prompt, the model's and the environment's in turn."""

    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)
    model_mask: list[int] = field(default_factory=list)
    finish_reason: str = "stop"
    """The last model turn's (`stop` or `length`), or `length` if the episode's token budget or
    the model's context ended it."""
    reward: float = 0.0
    """The environment's rewards summed over the turns; NaN for an episode dropped on error."""
    text: str = ""
    episode: Episode = field(default_factory=lambda: Episode(turns=0, env_seconds=0.0, tool_calls=0))

    def add(self, ids: list[int], logprobs: list[float], versions: list[int], by_model: bool) -> None:
        self.token_ids += ids
        self.logprobs += logprobs
        self.versions += versions
        self.model_mask += [int(by_model)] * len(ids)


@dataclass
class _Dropped:
    """In place of an environment that could not be made or started (env.on_error drop)."""

    error: str


def _first_messages(env, messages: list[dict]) -> list[dict]:
    """What `init` makes of the prompt's messages (it returns them with an info dict)."""
    result = env.init([dict(m) for m in messages])
    return environments.checked_messages(result[0] if isinstance(result, tuple) else result, "init's messages")


def turn_seed(run_seed: int, round_: int, prompt: int, sample: int, turn: int) -> int:
    """A distinct, reproducible sampling seed per model turn of each episode."""
    return zlib.crc32(f"{run_seed}:{round_}:{prompt}:{sample}:{turn}".encode()) & 0x7FFFFFFF


class EpisodeRunner:
    def __init__(self, cfg: Config, submit: Callable[[list[int], object], Future], tokenizer,
                 spans: Spans, token_versions: Callable[[object], list[int]]):
        """`submit(prompt_ids, sampling_params)` puts one request into the engine loop and
        returns the future of its vLLM output; `token_versions` labels a completion's tokens
        with the policy version that sampled each."""
        self.cfg, self.env = cfg, cfg.env
        self.submit_request, self.spans, self.token_versions = submit, spans, token_versions
        self.tokenizer = tokenizer
        self.env_id = environments.resolve(cfg.env.name)
        self.observation_ids = environments.ObservationTokens(tokenizer)
        self.pool = ThreadPoolExecutor(cfg.env.threads, thread_name_prefix="environment")
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, name="episodes", daemon=True).start()

    def submit(self, prompt: Prompt, round_: int, n: int, max_tokens: int) -> Future:
        """`n` episodes of `prompt`: a Future of (the prompt as the environment's `init` left
        it, their EpisodeOutputs in order)."""
        return asyncio.run_coroutine_threadsafe(self._group(prompt, round_, n, max_tokens), self.loop)

    async def _group(self, prompt: Prompt, round_: int, n: int, max_tokens: int):
        starts = await asyncio.gather(*(self._start(prompt, k) for k in range(n)))
        prompts = [p for p, env in starts if not isinstance(env, _Dropped)] or [prompt]
        if any(p.token_ids != prompts[0].token_ids for p in prompts):
            raise EnvError(f"environment `{self.env.name}`: init gave the episodes of prompt "
                           f"{prompt.index} different prompts; a group needs one")
        outputs = await asyncio.gather(*(self._episode(prompts[0], env, round_, k, max_tokens)
                                         for k, (_, env) in enumerate(starts)))
        return prompts[0], list(outputs)

    async def _start(self, prompt: Prompt, k: int):
        """(the prompt as `init` returns it, the episode's environment); with env.on_error drop,
        (the prompt, _Dropped) for an environment that could not be made or started."""
        where = f"episode {k} of prompt {prompt.index}"
        try:
            env = await self._call(lambda: environments.make(self.env_id, prompt.columns, self.env.max_turns),
                                   "make", where, None)
            messages = (prompt.raw if isinstance(prompt.raw, list)
                        else [{"role": "user", "content": prompt.raw or prompt.text}])
            result = await self._call(lambda: _first_messages(env, messages), "init", where, None)
        except EnvError as e:
            if self.env.on_error == "fail":
                raise
            return prompt, _Dropped(str(e))
        if result == messages:
            return prompt, env
        text = data.render(result, self.tokenizer, use_chat_template=True)  # as the dataset's prompts
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return dataclasses.replace(prompt, text=text, token_ids=ids, raw=result), env

    async def _episode(self, prompt: Prompt, env, round_: int, k: int, max_tokens: int) -> EpisodeOutput:
        from vllm import SamplingParams

        out, rollout = EpisodeOutput(), self.cfg.rollout
        context = self.cfg.model.max_model_len - len(prompt.token_ids)
        if isinstance(env, _Dropped):
            return self._dropped(out, env.error)
        try:
            while True:
                where = f"turn {out.episode.turns + 1} of episode {k} of prompt {prompt.index}"
                room = min(max_tokens, self.env.max_episode_tokens - len(out.token_ids),
                           context - len(out.token_ids))
                if room <= 0:
                    out.finish_reason = "length"
                    break
                params = SamplingParams(n=1, max_tokens=room, temperature=rollout.temperature, top_p=rollout.top_p,
                                        logprobs=0, seed=turn_seed(self.cfg.seed, round_, prompt.index, k,
                                                                   out.episode.turns))
                done = await asyncio.wrap_future(self.submit_request(prompt.token_ids + out.token_ids, params))
                turn = done.outputs[0]
                ids = list(turn.token_ids)
                out.add(ids, [lp[t].logprob for lp, t in zip(turn.logprobs, ids)], self.token_versions(turn), True)
                out.episode.turns += 1
                out.finish_reason = turn.finish_reason
                observations, reward, over = await self._call(
                    lambda: environments.checked_step(env.step(turn.text)), "step", where, out.episode)
                out.reward += reward
                if over or out.episode.turns >= self.env.max_turns:
                    break
                obs = self.observation_ids(observations)
                out.episode.tool_calls += sum(m["role"] == "tool" for m in observations)
                if len(out.token_ids) + len(obs) >= min(self.env.max_episode_tokens, context):
                    out.finish_reason = "length"  # no room for the observation and a reply
                    break
                out.add(obs, [0.0] * len(obs), [out.versions[-1]] * len(obs), False)
        except EnvError as e:
            if self.env.on_error == "fail":
                raise
            self._dropped(out, str(e))
        finally:
            self.pool.submit(env.close)  # not waited for: a close that hangs holds one thread
        out.text = self.tokenizer.decode(out.token_ids)
        return out

    @staticmethod
    def _dropped(out: EpisodeOutput, error: str) -> EpisodeOutput:
        """`out` left out of the loss (reward NaN, as an unscored completion), its error kept."""
        log.warning("%s; the episode is dropped (env.on_error drop)", error)
        out.reward, out.episode.error = float("nan"), error
        return out

    async def _call(self, fn: Callable, what: str, where: str, episode: Episode | None):
        """`fn()` on the environment's pool, bounded by env.step_timeout_s; an EnvError in one
        line naming the environment, the call and the episode when it raises or runs over."""
        start = time.time()
        try:
            return await asyncio.wait_for(self.loop.run_in_executor(self.pool, fn), self.env.step_timeout_s)
        except TimeoutError:
            raise EnvError(f"environment `{self.env.name}`: {what} took over {self.env.step_timeout_s:g} s "
                           f"in {where} (env.step_timeout_s)") from None
        except EnvError as e:
            raise EnvError(f"environment `{self.env.name}`: {what} in {where}: {e}") from None
        except Exception as e:
            raise EnvError(f"environment `{self.env.name}` raised {one_line(repr(e), 200)} in {what} "
                           f"of {where}") from e
        finally:
            seconds = time.time() - start
            self.spans.add("environment", start, seconds)
            if episode is not None:
                episode.env_seconds += seconds
