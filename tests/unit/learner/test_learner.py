"""The learner on the tiny preset, without Ray: one GRPO step moves probability toward the
completions with positive advantage; checkpoints round-trip and never unpickle code."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch

from common.config import Config
from common.types import Prompt, RolloutGroup, RunState
from learner import checkpoint
from learner.batch import collate
from learner.learner import Learner
from learner.weight_sender import SAMPLE_STRIDE

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture()
def learner() -> Learner:
    cfg = Config()
    cfg.grpo.group_size, cfg.grpo.batch_size = 2, 2
    return Learner(cfg)


def group(learner: Learner, good: list[int], bad: list[int]) -> RolloutGroup:
    """One prompt, two completions: `good` rewarded 1, `bad` 0, with on-policy log-probs."""
    prompt = Prompt(0, "User: Hi\nAssistant:", [12092, 27, 8894, 187, 15, 2])
    seqs = [(prompt.token_ids, good, [0.0] * len(good)), (prompt.token_ids, bad, [0.0] * len(bad))]
    logp = completion_logprobs(learner, seqs)
    return RolloutGroup(prompt=prompt, completions=["good", "bad"], completion_ids=[good, bad],
                        logprobs=[logp[0][: len(good)], logp[1][: len(bad)]],
                        token_versions=[[0] * len(good), [0] * len(bad)],
                        finish_reasons=["length", "length"], rewards=[1.0, 0.0],
                        reward_parts={"r": [1.0, 0.0]}, policy_version=0)


def completion_logprobs(learner: Learner, seqs) -> list[list[float]]:
    mb = collate(seqs, torch.zeros(len(seqs)), learner.pad_id)
    with torch.no_grad():
        logp, _ = learner.logprobs(mb)
    return logp.tolist()


def test_a_grpo_step_favours_the_rewarded_completion(learner):
    good, bad = [1010, 2020, 3030], [4040, 5050, 6060]
    batch = [group(learner, good, bad)]
    before = [sum(lp) for lp in batch[0].logprobs]
    metrics = learner.train(batch)
    after = [sum(lp) for lp in completion_logprobs(learner, [(batch[0].prompt.token_ids, good, []),
                                                             (batch[0].prompt.token_ids, bad, [])])]
    assert after[0] > before[0] and after[1] < before[1]
    assert learner.version == 1 and metrics["step"] == 1
    assert metrics["reward"] == pytest.approx(0.5) and metrics["train_tokens"] == 6
    assert metrics["is_weight"] == pytest.approx(1.0, abs=1e-4)  # behaviour == learner here
    assert metrics["grad_norm"] > 0


def test_the_update_does_not_depend_on_the_order_the_groups_arrived_in():
    """Groups reach the buffer in the order they finish, which varies between runs: the update
    must not, to the bit, or a resumed run drifts from the uninterrupted one."""
    def trained(order: list[int]) -> tuple[dict, dict]:
        torch.manual_seed(0)
        cfg = Config()
        cfg.grpo.group_size, cfg.grpo.batch_size, cfg.learner.micro_batch_size = 2, 6, 2
        learner = Learner(cfg)
        groups = []
        for i in range(3):
            g = group(learner, [1010 + i, 2020, 3030 + 7 * i], [4040, 5050 + i, 6060, 77 + i])
            g.prompt = Prompt(i, g.prompt.text, g.prompt.token_ids[: 3 + i])
            groups.append(g)
        metrics = learner.train([groups[i] for i in order])
        return metrics, {k: v.clone() for k, v in learner.model.state_dict().items()}

    (m1, w1), (m2, w2) = trained([0, 1, 2]), trained([2, 0, 1])
    assert m1["loss"] == m2["loss"] and m1["grad_norm"] == m2["grad_norm"]
    assert all(torch.equal(w1[k], w2[k]) for k in w1)


def test_the_mismatch_between_engine_and_learner_is_measured_on_the_batch(learner):
    batch = [group(learner, [1010, 2020, 3030], [4040, 5050, 6060])]
    batch[0].logprobs[1][2] += 0.1  # the engine put one token 0.1 nats higher than the learner
    metrics = learner.train(batch)
    # k3 of KL(engine || learner) on that token: r = exp(learner - engine) = exp(-0.1),
    # r - 1 - log r; the other five tokens agree. Mean over the 6 tokens trained on.
    k3 = math.exp(-0.1) - 1 + 0.1
    assert metrics["mismatch_kl"] == pytest.approx(k3 / 6, abs=2e-6)
    assert metrics["mismatch_max"] == pytest.approx(0.1, abs=2e-5)


def test_a_second_pass_takes_the_first_pass_as_old_and_clips(monkeypatch):
    cfg = Config()
    cfg.grpo.group_size, cfg.grpo.batch_size, cfg.grpo.num_iterations = 2, 2, 2
    cfg.learner.micro_batch_size = 1  # two micro-batches per pass
    learner = Learner(cfg)
    calls = []

    def recording(logp, old_logp, *args, **kwargs):
        calls.append((logp.detach().clone(), None if old_logp is None else old_logp.clone(), args[2]))
        return grpo_loss(logp, old_logp, *args, **kwargs)

    from learner import learner as learner_module
    from learner.grpo import grpo_loss
    monkeypatch.setattr(learner_module, "grpo_loss", recording)
    metrics = learner.train([group(learner, [1010, 2020, 3030], [4040, 5050, 6060])])

    assert len(calls) == 4  # 2 passes x 2 micro-batches
    assert calls[0][1] is None and calls[1][1] is None  # pass 1 is on-policy
    for first, second in ((calls[0], calls[2]), (calls[1], calls[3])):
        assert torch.equal(second[1], first[0])  # pass 2's old log-probs are pass 1's
        assert not torch.equal(second[0], first[0])  # and its own moved (lr 3e-2)
    # The clip fraction, worked out from the recorded log-probs: pass 1 clips nothing (ratio 1);
    # in pass 2 a token is clipped where its ratio left [0.8, 1.2] on its advantage's side.
    clipped = 0
    for logp, old, advantages in calls[2:]:
        ratio, adv = torch.exp(logp - old), advantages.unsqueeze(-1)
        clipped += int((((ratio < 0.8) & (adv < 0)) | ((ratio > 1.2) & (adv > 0))).sum())
    assert clipped > 0  # the precondition: clipping happened
    assert metrics["clip_fraction"] == pytest.approx(clipped / 6 / 2, abs=1e-6)  # 6 tokens, 2 passes
    steps = {float(state["step"]) for state in learner.optimizer.state.values()}
    assert steps == {2.0}  # the optimizer stepped once per pass


def test_bfloat16_keeps_float32_master_weights_so_a_step_of_1e_6_reaches_the_engines():
    cfg = Config()
    cfg.grpo.group_size, cfg.grpo.batch_size = 2, 2
    cfg.model.dtype, cfg.learner.learning_rate = "bfloat16", 1e-6  # the reference run's
    learner = Learner(cfg)
    assert {p.dtype for p in learner.model.parameters()} == {torch.float32}
    sent = dict(learner.sender.named_weights())
    assert {t.dtype for t in sent.values() if t.is_floating_point()} == {torch.bfloat16}
    masters = [p.detach().clone() for p in learner.model.parameters()]
    metrics = learner.train([group(learner, [1010, 2020, 3030], [4040, 5050, 6060])])

    # What pure bfloat16 would have done: AdamW on bfloat16 weights, the same start and gradients.
    pure = [m.to(torch.bfloat16).requires_grad_() for m in masters]
    for weight, p in zip(pure, learner.model.parameters()):
        weight.grad = p.grad.to(torch.bfloat16)
    torch.optim.AdamW(pure, lr=1e-6, weight_decay=0.0).step()
    # Weights of the usual size (|w| >= 1e-3, bf16 spacing >= 7.6e-6): a step of 1e-6 rounds away.
    usual = [m.abs() >= 1e-3 for m in masters]
    pure_changed = sum(int(((w != m.to(torch.bfloat16)) & u).sum()) for w, m, u in zip(pure, masters, usual))
    engines_changed = sum(int(((p.detach().to(torch.bfloat16) != m.to(torch.bfloat16)) & u).sum())
                          for p, m, u in zip(learner.model.parameters(), masters, usual))
    stepped = sum(int((p.detach() != m).sum()) for p, m in zip(learner.model.parameters(), masters))
    assert stepped > 100_000  # the precondition: the master weights took the step
    assert pure_changed == 0  # pure bf16: the engines would get the same weights forever
    assert engines_changed > 100  # float32 masters: the engines' bfloat16 weights move
    # The metric counts every SAMPLE_STRIDE-th element of each parameter (a whole copy would
    # cost half the model's memory again on a GPU): the same count, and near the whole's.
    sample = [(p.detach().reshape(-1)[::SAMPLE_STRIDE], m.reshape(-1)[::SAMPLE_STRIDE])
              for p, m in zip(learner.model.parameters(), masters)]
    changed = sum(int((p.to(torch.bfloat16) != m.to(torch.bfloat16)).sum()) for p, m in sample)
    assert metrics["engine_weights_changed"] == pytest.approx(changed / sum(m.numel() for _, m in sample))
    whole = sum(int((p.detach().to(torch.bfloat16) != m.to(torch.bfloat16)).sum())
                for p, m in zip(learner.model.parameters(), masters)) / sum(m.numel() for m in masters)
    assert metrics["engine_weights_changed"] == pytest.approx(whole, rel=0.1)


def test_a_checkpoint_round_trips(learner, tmp_path):
    batch = [group(learner, [1, 2], [3, 4])]
    learner.train(batch)
    saved = learner.save_checkpoint(str(tmp_path), RunState(step=1, eval_before=0.5))
    weights = {k: v.clone() for k, v in learner.model.state_dict().items()}
    optimizer = copy.deepcopy(learner.optimizer.state_dict())
    scheduler = copy.deepcopy(learner.scheduler.state_dict())
    rng = torch.get_rng_state()
    learner.train(batch)
    torch.rand(3)  # the training process's random state moves on too
    assert not torch.equal(torch.get_rng_state(), rng)  # the load below must matter
    assert learner.scheduler.state_dict() != scheduler

    assert learner.load_checkpoint(str(tmp_path)) == RunState(step=1, eval_before=0.5)
    assert learner.version == 1 and Path(saved).name == "step_000001"
    for key, value in learner.model.state_dict().items():
        assert torch.equal(value, weights[key]), key
    loaded = learner.optimizer.state_dict()
    assert loaded["param_groups"] == optimizer["param_groups"]
    for index, state in optimizer["state"].items():
        for key, value in state.items():
            assert torch.equal(loaded["state"][index][key], value), (index, key)
    assert learner.scheduler.state_dict() == scheduler
    assert torch.equal(torch.get_rng_state(), rng)


class _Exploit:
    def __reduce__(self):
        return (Path.touch, (Path("/tmp/grpo-ray-pwned"),))


def test_a_checkpoint_never_unpickles_code(learner, tmp_path):
    learner.train([group(learner, [1, 2], [3, 4])])
    directory = Path(learner.save_checkpoint(str(tmp_path), RunState(step=1)))
    torch.save({"optimizer": _Exploit()}, directory / "learner.pt")
    Path("/tmp/grpo-ray-pwned").unlink(missing_ok=True)
    with pytest.raises(checkpoint.CheckpointError, match="damaged"):
        learner.load_checkpoint(str(tmp_path))
    assert not Path("/tmp/grpo-ray-pwned").exists()


def test_a_checkpoint_file_torch_cannot_read_is_called_damaged(learner, tmp_path):
    import zipfile

    learner.train([group(learner, [1, 2], [3, 4])])
    directory = Path(learner.save_checkpoint(str(tmp_path), RunState(step=1)))
    with zipfile.ZipFile(directory / "learner.pt", "w") as archive:  # a zip, not a torch archive
        archive.writestr("notes.txt", "overwritten")
    with pytest.raises(checkpoint.CheckpointError, match="damaged"):
        learner.load_checkpoint(str(tmp_path))


def test_a_bug_while_loading_a_checkpoint_keeps_its_own_error(learner, tmp_path, monkeypatch):
    learner.train([group(learner, [1, 2], [3, 4])])
    learner.save_checkpoint(str(tmp_path), RunState(step=1))

    def misread(state: dict) -> None:
        raise KeyError("a key the load path misspelt")

    monkeypatch.setattr(learner.scheduler, "load_state_dict", misread)
    with pytest.raises(KeyError, match="misspelt"):
        learner.load_checkpoint(str(tmp_path))


def test_weights_shared_again_at_the_same_path_reach_the_engine(learner, tmp_path):
    from common.weight_sync import SharedMemoryChannel

    path = tmp_path / "weights"
    learner.open_shared_weights(str(path))
    learner.send_weights()
    learner.open_shared_weights(str(path))  # again: closing the first must not remove the second
    engine = SharedMemoryChannel(str(path), learner.weight_specs())
    learner.version = 3
    learner.send_weights()
    sent = dict(learner.sender.named_weights())
    for name, tensor in engine.receive(3):
        assert torch.equal(tensor, sent[name]), name
    learner.close_weight_sync()
    assert not path.exists()


def test_a_step_reads_from_the_device_a_fixed_number_of_times_whatever_its_micro_batches(monkeypatch):
    """A read of a device tensor on the host (`.item()`, `float()`, `.tolist()`, `.cpu()`)
    waits for everything queued before it: inside the micro-batch loop the host would stall the
    GPU once per micro-batch. Counted here as the project's own calls on tensors, with 1 and
    with 4 micro-batches (transformers' mask code reads one per forward, out of our hands)."""
    import sys

    reads = []
    for name in ("item", "tolist", "cpu", "__float__", "__int__", "__bool__"):
        real = getattr(torch.Tensor, name)

        def counted(self, *args, _real=real, _name=name, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if str(ROOT) in caller and "site-packages" not in caller:
                reads.append((_name, caller, sys._getframe(1).f_lineno))
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)

    def reads_in_a_step(micro_batch_size: int) -> int:
        cfg = Config()
        cfg.grpo.group_size, cfg.grpo.batch_size, cfg.learner.micro_batch_size = 2, 8, micro_batch_size
        learner = Learner(cfg)
        groups = [group(learner, [1010 + i, 2020], [4040, 5050 + i]) for i in range(4)]
        reads.clear()
        learner.train(groups)
        return len(reads)

    one, four = reads_in_a_step(8), reads_in_a_step(2)
    assert one > 0 and four == one, (one, four)  # the precondition: reads are seen


def test_the_probe_set_is_scored_as_an_engine_holding_the_weights_in_bfloat16_scores_it():
    """The mismatch alarm's oracle: a bfloat16 engine computes everything in bfloat16, which
    autocast (float32 residual stream and norms) does not; an independent bfloat16 copy of the
    model, loaded from the same weights, must score exactly what the learner reports for it."""
    from transformers import AutoModelForCausalLM

    cfg = Config()
    cfg.model.dtype = "bfloat16"
    learner = Learner(cfg)
    prompt = [12092, 27, 8894, 187, 15, 2]
    sequences, starts = [prompt + [1010, 2020, 3030, 4040], prompt[:3] + [5050, 6060]], [6, 3]
    engine = AutoModelForCausalLM.from_pretrained(learner.model_path, dtype=torch.bfloat16)
    with torch.no_grad():
        expected = [engine(torch.tensor([ids])).logits[0, start - 1:-1].float().log_softmax(-1)
                    .gather(-1, torch.tensor(ids[start:])[:, None])[:, 0].tolist()
                    for ids, start in zip(sequences, starts)]
    autocast = learner.probe_logprobs(sequences, starts)
    apart = max(abs(a - b) for row, other in zip(autocast, expected) for a, b in zip(row, other))
    assert apart > 1e-3  # the precondition: autocast is not what a bfloat16 engine computes
    scored = learner.probe_logprobs(sequences, starts, "bfloat16")
    assert [[pytest.approx(x, abs=1e-5) for x in row] for row in expected] == scored
    assert learner.probe_logprobs(sequences, starts, "float32") != scored
    assert {p.dtype for p in learner.model.parameters()} == {torch.float32}  # the masters untouched
