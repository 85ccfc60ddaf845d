"""Environments: generation throughput of multi-turn episodes whose environment sleeps at every
step, run as training runs them (each turn enters the engine as soon as its observation is
ready, while the others decode) against the same episodes run one turn at a time (every
episode's turn generated as one batch, then every environment step, then the next turn: the
engine idles while the slowest environment answers). The environment sleeps a mean latency per
step, each episode for its own time between none and twice that, as tools and remote
environments vary; the model never stops early (random init), so every turn is `tokens` long
on both sides."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from skyrl_gym.envs.base_text_env import BaseTextEnv, BaseTextEnvStepOutput

from deploy.bench import prompts, render

if TYPE_CHECKING:
    from deploy.bench.harness import Harness

log = logging.getLogger(__name__)


class SleepingEnv(BaseTextEnv):
    """Sleeps `latency_s` x a factor in [0, 2) fixed per episode at every step, answers `Go on.`,
    and ends after max_turns turns. The factors follow the golden-ratio sequence, so any run of
    consecutive episodes spreads evenly over [0, 2) and both sides see the same spread."""

    made = 0

    def __init__(self, env_config=None, extras=None):
        super().__init__()
        self.max_turns = extras["max_turns"]
        SleepingEnv.made += 1
        self.latency_s = extras["latency_s"] * 2 * (SleepingEnv.made * 0.6180339887 % 1)

    def step(self, action: str) -> BaseTextEnvStepOutput:
        time.sleep(self.latency_s)
        self.turns += 1
        done = self.turns >= self.max_turns
        return BaseTextEnvStepOutput(observations=[] if done else [{"role": "user", "content": "Go on."}],
                                     reward=0.0, done=done, metadata={})


@dataclass
class Settings:
    """Environments: episodes with a sleeping environment, in the engine loop vs one turn at a time."""

    preset: str = "pythia-70m-shape"
    """Model generating."""
    episodes: int = 64
    """Episodes per call (a multiple of group_size)."""
    turns: int = 4
    """Model turns per episode."""
    tokens: int = 16
    """Tokens per model turn."""
    latencies_ms: tuple[float, ...] = (50.0, 500.0)
    """The environment's mean sleep per step, one measurement each: 50 ms as issue-sized tools,
    500 ms where the environment's wait is on the scale of a turn's decoding on this CPU."""
    repeats: int = 2
    """Timed calls of each side (after a warm-up): the best counts."""

    @classmethod
    def smoke(cls) -> Settings:
        return cls(preset="tiny", episodes=16, turns=2, tokens=8, latencies_ms=(50.0,), repeats=1)


@dataclass
class Latency:
    """Both sides at one mean environment sleep."""

    latency_ms: float
    in_loop_tokens_per_s: float
    """Model tokens per second, episodes run as training runs them."""
    in_loop_s: float
    turn_at_a_time_tokens_per_s: float
    """The same episodes, every turn of every episode generated as one batch."""
    turn_at_a_time_s: float
    speedup: float


@dataclass
class EnvironmentsResult:
    config: dict[str, object]
    latencies: list[Latency]


def run(harness: Harness, s: Settings) -> EnvironmentsResult:
    import ray

    from actors.rollout_worker import RolloutWorker
    from deploy.launch import init_ray

    harness.pool.stop()  # its engines would share the cores
    threads = harness.options.threads
    cfg = harness.config(model=s.preset, batch=s.episodes, tokens=s.tokens, extra=(
        "--env.name", f"{__name__}:SleepingEnv", "--env.max-turns", str(s.turns),
        "--env.max-episode-tokens", "512", "--env.threads", str(s.episodes),
        "--rollout.threads", str(threads)))
    if not ray.is_initialized():
        init_ray(cfg)
    chosen = prompts.first(cfg, s.episodes // harness.options.group_size)
    worker = ray.remote(num_cpus=threads)(RolloutWorker).remote(cfg)
    tokens, latencies = s.episodes * s.turns * s.tokens, []
    try:
        for latency_ms in s.latencies_ms:
            for p in chosen:
                p.columns = {"latency_s": latency_ms / 1000}
            ray.get(worker.generate.remote(chosen[:1], -1))  # warm-up
            in_loop = min(ray.get(worker.generate.remote(chosen, r))[1].seconds for r in range(s.repeats))
            one_turn = min(ray.get(worker.__ray_call__.remote(
                _turn_at_a_time, chosen, harness.options.group_size, s.tokens, s.turns, r)) for r in range(s.repeats))
            log.info("environments, %g ms: %.0f tokens/s in the loop, %.0f one turn at a time", latency_ms,
                     tokens / in_loop, tokens / one_turn)
            latencies.append(Latency(latency_ms, tokens / in_loop, in_loop, tokens / one_turn, one_turn,
                                     one_turn / in_loop))
    finally:
        ray.kill(worker)
    return EnvironmentsResult(
        config={"model": s.preset, "episodes": s.episodes, "turns": s.turns, "tokens per turn": s.tokens,
                "environment sleep per step": "each episode's own, from 0 to twice the mean",
                "threads": threads, "best of": s.repeats}, latencies=latencies)


def _turn_at_a_time(worker, chosen: list, n: int, tokens: int, turns: int, round_: int) -> float:
    """In the worker's actor: the episodes of `chosen` (n each), every turn of every episode one
    batch, then every environment step on the same pool; returns the seconds."""
    from concurrent.futures import wait

    from vllm import SamplingParams

    from actors.episodes import turn_seed
    from common import environments

    runner = worker.episodes
    episodes = [(p, k, environments.make(runner.env_id, p.columns, turns)) for p in chosen for k in range(n)]
    contexts = [list(p.token_ids) for p, _, _ in episodes]
    start = time.perf_counter()
    for turn in range(turns):
        outs = [f.result() for f in worker.loop.submit_all([
            (ids, SamplingParams(n=1, max_tokens=tokens, logprobs=0,
                                 seed=turn_seed(worker.cfg.seed, round_, p.index, k, turn)))
            for ids, (p, k, _) in zip(contexts, episodes)])]
        steps = [runner.pool.submit(env.step, out.outputs[0].text) for (_, _, env), out in zip(episodes, outs)]
        wait(steps)
        for ids, out, step in zip(contexts, outs, steps):
            ids += list(out.outputs[0].token_ids) + runner.observation_ids(step.result()["observations"])
    return time.perf_counter() - start


def markdown(r: EnvironmentsResult) -> list[str]:
    header = ["environment sleep (mean)", "episodes run", "model tokens/s", "seconds", "gain"]
    rows = []
    for x in r.latencies:
        rows += [[f"{x.latency_ms:g} ms", "in the engine loop (as training runs them)",
                  f"{x.in_loop_tokens_per_s:.0f}", f"{x.in_loop_s:.2f}", f"{x.speedup:.2f}x"],
                 [f"{x.latency_ms:g} ms", "one turn at a time", f"{x.turn_at_a_time_tokens_per_s:.0f}",
                  f"{x.turn_at_a_time_s:.2f}", ""]]
    return [*render.labelled(r.config, None, header, rows), ""]
