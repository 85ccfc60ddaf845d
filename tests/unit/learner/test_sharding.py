"""A learner of two ranks (learner/sharding.py, FSDP2 over gloo) makes the same update as one:
its sequences dealt evenly, its parameters equal to a one-rank learner's after several steps,
its sharded checkpoint restored exactly, its export a whole model. The ranks are two processes
here without Ray; rank 0's wait for the others is tested with a stand-in for Ray, and the fan-out
end to end (tests/integration)."""

from __future__ import annotations

import random
import socket
import sys
import time
import types
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from common.config import Config
from common.errors import RunError
from common.types import Prompt, RolloutGroup, RunState, RunSummary
from learner.sharding import deal, on_every_rank

STEPS = 3


# ----- dealing sequences to ranks -----


@pytest.mark.parametrize("lengths, ranks", [([5, 1, 4, 2, 3, 6], 2), ([9] * 8, 4), ([3, 1], 1),
                                            ([10, 9, 8, 7, 6, 5, 4, 3, 2], 3)])
def test_every_sequence_is_dealt_once_and_each_rank_gets_as_many(lengths, ranks):
    shares = deal(lengths, ranks)
    assert sorted(i for share in shares for i in share) == list(range(len(lengths)))
    assert {len(share) for share in shares} == {len(lengths) // ranks}


def test_dealing_keeps_the_ranks_token_counts_close():
    rng = random.Random(0)
    lengths = [rng.randint(10, 500) for _ in range(64)]
    tokens = [sum(lengths[i] for i in share) for share in deal(lengths, 4)]
    # Dealt in input order instead, the spread is hundreds of tokens; snake dealing stays
    # within the longest sequence.
    in_order = [sum(lengths[r::4]) for r in range(4)]
    assert max(tokens) - min(tokens) <= max(lengths)
    assert max(tokens) - min(tokens) < max(in_order) - min(in_order)


def test_a_batch_that_cannot_be_dealt_evenly_is_refused():
    with pytest.raises(ValueError, match="5 sequences cannot be dealt evenly to 2 ranks"):
        deal([1] * 5, 2)


# ----- rank 0's calls to the other ranks -----


class RayActorError(Exception):
    pass


class FakeRay(types.ModuleType):
    """What `on_every_rank` asks of Ray: each other rank's call waited for in turn."""

    exceptions = types.SimpleNamespace(RayActorError=RayActorError)

    def __init__(self, events: list[str], dead: set[str] = frozenset()):
        super().__init__("ray")
        self.events, self.dead = events, dead

    def get(self, ref: str) -> None:
        self.events.append(f"waited for {ref}")
        if ref in self.dead:
            raise RayActorError(ref)


def test_rank_0_runs_its_part_then_waits_for_every_other_rank(monkeypatch):
    events = []
    monkeypatch.setitem(sys.modules, "ray", FakeRay(events))

    def call() -> str:
        with on_every_rank(["rank 1's call", "rank 2's call"]):
            events.append("rank 0's part")
            return "rank 0's result"

    assert call() == "rank 0's result"
    assert events == ["rank 0's part", "waited for rank 1's call", "waited for rank 2's call"]


def test_a_rank_that_died_is_named_even_when_rank_0_failed_too(monkeypatch):
    events = []
    monkeypatch.setitem(sys.modules, "ray", FakeRay(events, dead={"rank 2's call"}))
    with pytest.raises(RunError, match="^learner rank 2 died$"):
        with on_every_rank(["rank 1's call", "rank 2's call"]):
            raise ConnectionError("a collective failed because rank 2 is gone")
    assert events == ["waited for rank 1's call", "waited for rank 2's call"]


def test_one_rank_needs_no_ray(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # importing it would fail
    with on_every_rank([]):
        pass


# ----- two ranks against one -----


def config(ranks: int) -> Config:
    cfg = Config()
    # Compared at float32's precision: in bfloat16, FSDP's cast of each shard and one rank's
    # autocast of whole weights round differently (the engines' own check covers bfloat16).
    cfg.model.dtype = "float32"
    cfg.grpo.group_size, cfg.grpo.batch_size = 2, 8
    cfg.learner.num_ranks, cfg.learner.threads = ranks, 1
    cfg.learner.micro_batch_size = 2
    cfg.learner.max_grad_norm = 0.5  # clipping over the ranks' shards takes part
    cfg.learner.learning_rate = 1e-2
    cfg.grpo.beta = 0.04  # the reference model is sharded too
    cfg.cluster.call_timeout_s = 30  # the ranks' collectives: a rank left waiting fails, not hangs
    return cfg


class BrokenChannel:
    """A weight channel whose send fails after three tensors, as when an engine dies in the
    middle of a broadcast."""

    def send(self, named_tensors, version: int) -> None:
        for _ in range(3):
            next(named_tensors)
        raise ConnectionError("an engine left the broadcast")

    def close(self) -> None:
        pass


def probe() -> tuple[list[list[int]], list[int]]:
    """Sequences to score, and where each one's scored part starts."""
    return [[12092, 27, 8894, 187, 15, 2, 1010, 2020], [12092, 27, 3030, 4040, 5050]], [6, 2]


def batches() -> list[list[RolloutGroup]]:
    """STEPS batches of 4 groups with completions of different lengths, rewards and behaviour
    log-probs, so that no rank's share looks like another's."""
    rng = random.Random(1)
    out = []
    for step in range(STEPS):
        groups = []
        for g in range(4):
            prompt = Prompt(g, "User: Hi\nAssistant:", [rng.randrange(50, 5000) for _ in range(rng.randint(3, 8))])
            ids = [[rng.randrange(50, 5000) for _ in range(rng.randint(2, 12))] for _ in range(2)]
            groups.append(RolloutGroup(
                prompt=prompt, completions=["a", "b"], completion_ids=ids,
                logprobs=[[-rng.uniform(5, 12) for _ in c] for c in ids],
                token_versions=[[step] * len(c) for c in ids], finish_reasons=["stop", "length"],
                rewards=[rng.random(), rng.random()], reward_parts={}, policy_version=step))
        out.append(groups)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def leave_group() -> None:
    """Both ranks done, the group torn down before the process exits: a rank that exited with its
    gloo group alive aborted now and then ("terminate called without an active exception",
    SIGABRT), twice in four full runs of the unit tests on 2026-12-05."""
    import torch.distributed as dist

    dist.barrier()
    dist.destroy_process_group()


def two_ranks(rank: int, port: int, out: Path) -> None:
    """One rank: STEPS steps with a checkpoint before the last, the last step repeated after
    restoring it, and the model exported."""
    from learner.learner import Learner

    learner = Learner(config(2), rank)
    learner.join_ranks("127.0.0.1", port, peers=[])
    data = batches()
    # a forward with no backward first: the shards must stay shards
    scores = learner.probe_logprobs(*probe())
    metrics = [learner.train(b) for b in data[:-1]]
    learner.save_checkpoint(str(out / "run"), RunState(step=STEPS - 1))
    metrics.append(learner.train(data[-1]))
    scores_after = learner.probe_logprobs(*probe())
    learner.export(str(out / "first"), RunSummary(steps=STEPS, complete=True))
    restored = learner.load_checkpoint(str(out / "run"))
    again = learner.train(data[-1])
    learner.export(str(out / "again"), RunSummary(steps=STEPS, complete=True))
    if rank == 0:
        learner.sender.channel = BrokenChannel()
    start, send_failed = time.perf_counter(), False
    try:
        learner.send_weights()  # rank 1 gathers every tensor; rank 0's send stops after three
    except ConnectionError:
        send_failed = True
    send_s = time.perf_counter() - start
    scores_later = learner.probe_logprobs(*probe())  # the ranks are still in step
    if rank == 0:
        torch.save({"metrics": metrics, "again": again, "restored_step": restored.step,
                    "scores": scores, "scores_after": scores_after, "send_failed": send_failed,
                    "send_s": send_s, "scores_later": scores_later},
                   out / "rank0.pt")
    leave_group()


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("two-ranks")
    mp.start_processes(two_ranks, args=(free_port(), out), nprocs=2, start_method="spawn")
    return out


@pytest.fixture(scope="module")
def one_rank() -> tuple[dict, list[dict], tuple]:
    from learner.learner import Learner

    learner = Learner(config(1))
    scores = learner.probe_logprobs(*probe())
    metrics = [learner.train(b) for b in batches()]
    return ({k: v.clone() for k, v in learner.model.state_dict().items()}, metrics,
            (scores, learner.probe_logprobs(*probe())))


def exported(directory: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).state_dict()


def test_two_ranks_train_the_same_parameters_as_one(sharded, one_rank):
    expected, _, _ = one_rank
    got = exported(sharded / "first")
    start = initial_parameters()
    assert got.keys() == expected.keys() == start.keys()
    for name, want in expected.items():
        change, sharded_change = want - start[name], got[name] - start[name]
        assert change.norm() > 1e-2  # precondition: every tensor moved
        # Each tensor's change agrees to 1e-3 of its size. Not closer: AdamW divides by the root
        # of the squared gradient, so where a gradient is only rounding noise (the key biases',
        # which softmax ignores) the two orders of addition step differently.
        assert (sharded_change - change).norm() / change.norm() < 1e-3, name
    # The parameters as one vector: within 1e-5 of one rank's, relative.
    difference = sum((got[k] - expected[k]).norm() ** 2 for k in expected) ** 0.5
    assert difference / sum(w.norm() ** 2 for w in expected.values()) ** 0.5 < 1e-5


def initial_parameters() -> dict[str, torch.Tensor]:
    from learner.learner import Learner

    return Learner(config(1)).model.state_dict()


def test_two_ranks_report_the_metrics_of_one(sharded, one_rank):
    _, expected, _ = one_rank
    got = torch.load(sharded / "rank0.pt")["metrics"]
    for want, have in zip(expected, got, strict=True):
        for key in ("loss", "grad_norm", "kl", "reward", "train_tokens", "is_weight", "mismatch_kl",
                    "mismatch_max", "clip_fraction", "engine_weights_changed"):
            assert have[key] == pytest.approx(want[key], rel=1e-4, abs=1e-7), key
    assert expected[0]["grad_norm"] > config(1).learner.max_grad_norm  # clipping took part


def test_two_ranks_score_as_one_before_and_after_training(sharded, one_rank):
    _, _, (before, after) = one_rank
    saved = torch.load(sharded / "rank0.pt")
    assert max(abs(a - b) for a, b in zip(sum(before, []), sum(after, []))) > 1e-2  # it learned
    for want, got in ((before, saved["scores"]), (after, saved["scores_after"])):
        assert [len(row) for row in got] == [2, 3]
        for w, g in zip(sum(want, []), sum(got, [])):
            assert g == pytest.approx(w, abs=1e-4)


def test_a_sharded_checkpoint_restores_the_step_exactly(sharded):
    saved = torch.load(sharded / "rank0.pt")
    assert saved["restored_step"] == STEPS - 1
    assert saved["again"]["loss"] == saved["metrics"][-1]["loss"]
    first, again = exported(sharded / "first"), exported(sharded / "again")
    assert all(torch.equal(first[k], again[k]) for k in first)
    saved_dir = sharded / "run" / "checkpoints" / f"step_{STEPS - 1:06d}"
    assert len(list((saved_dir / "sharded").glob("*.distcp"))) == 2  # each rank wrote its shards
    assert not (saved_dir / "model").exists()


def test_a_broadcast_that_fails_on_rank_0_leaves_the_ranks_in_step(sharded):
    """Rank 0's send stops part-way (an engine died): the other rank is gathering every tensor
    with it, so rank 0 must go through the rest too, at once, not leave it waiting on a
    collective until the timeout; afterwards both ranks still compute together."""
    saved = torch.load(sharded / "rank0.pt")
    assert saved["send_failed"]
    assert saved["send_s"] < 10  # not the ranks' 30 s timeout
    assert saved["scores_later"] == saved["scores_after"]  # the same weights, scored together


# ----- LoRA on two ranks -----


def lora_config(ranks: int) -> Config:
    cfg = config(ranks)
    cfg.learner.lora_rank, cfg.learner.learning_rate = 8, 3e-2
    return cfg


def two_ranks_lora(rank: int, port: int, out: Path) -> None:
    """One rank of a LoRA learner: STEPS steps, the adapter as the engines get it, the export."""
    from learner.learner import Learner

    learner = Learner(lora_config(2), rank)
    learner.join_ranks("127.0.0.1", port, peers=[])
    metrics = [learner.train(b) for b in batches()]
    sent = {name: t.clone() for name, t in learner.sender.named_weights()}  # every rank gathers
    learner.export(str(out / "final"), RunSummary(steps=STEPS, complete=True))
    if rank == 0:
        torch.save({"metrics": metrics, "sent": sent, "specs": [s.name for s in learner.weight_specs()]},
                   out / "rank0.pt")
    leave_group()


@pytest.fixture(scope="module")
def sharded_lora(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("two-ranks-lora")
    mp.start_processes(two_ranks_lora, args=(free_port(), out), nprocs=2, start_method="spawn")
    return out


def test_a_lora_adapter_on_two_ranks_trains_and_is_sent_as_on_one(sharded_lora, tmp_path):
    from safetensors.torch import load_file

    from common.lora import ADAPTER_DIR
    from learner.learner import Learner

    one = Learner(lora_config(1))
    metrics = [one.train(b) for b in batches()]
    one.export(str(tmp_path / "final"), RunSummary(steps=STEPS, complete=True))
    saved = torch.load(sharded_lora / "rank0.pt")
    assert saved["specs"] == [s.name for s in one.weight_specs()]  # the adapter alone
    expected = dict(one.sender.named_weights())
    assert expected.keys() == saved["sent"].keys()
    moved = [n for n in expected if "lora_B" in n]
    assert moved and all(expected[n].abs().sum() > 0 for n in moved)  # the precondition: it trained
    for name, want in expected.items():  # gathered whole for the engines, as one rank has it
        assert (saved["sent"][name] - want).norm() <= 1e-5 * want.norm() + 1e-7, name
    for got, want in zip(saved["metrics"], metrics, strict=True):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-4, abs=1e-7)
    for path in (f"{ADAPTER_DIR}/adapter_model.safetensors", "model.safetensors"):
        got, want = load_file(sharded_lora / "final" / path), load_file(tmp_path / "final" / path)
        assert got.keys() == want.keys(), path
        for name in want:
            assert (got[name] - want[name]).norm() <= 1e-5 * want[name].norm() + 1e-7, (path, name)
