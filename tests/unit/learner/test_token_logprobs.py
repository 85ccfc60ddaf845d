"""`token_logprobs` against the whole float32 logits: `F.cross_entropy` for the log-probs, TRL's
`entropy_from_logits` for the entropy, autograd through both for the gradients; and the learner's
log-probs and gradients through it against its whole-logits path."""

from __future__ import annotations

import math
import random

import pytest
import torch
import torch.nn.functional as F
from trl.trainer.utils import entropy_from_logits

from common.config import Config
from learner import learner as learner_module
from learner import token_logprobs as module
from learner.batch import collate
from learner.learner import Learner
from learner.token_logprobs import rows_per_chunk, token_logprobs

N, H, V = 50, 32, 3000


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    # 7 rows a chunk: 50 rows are 7 full chunks and a short one.
    monkeypatch.setattr(module, "CHUNK_BYTES", 7 * 4 * V)


def inputs(seed: int = 0, scale: float = 0.5):
    g = torch.Generator().manual_seed(seed)
    hidden, weight = torch.randn(N, H, generator=g), torch.randn(V, H, generator=g) * scale
    targets, upstream = torch.randint(V, (N,), generator=g), torch.randn(N, generator=g)
    return hidden, weight, targets, upstream


def whole(hidden, weight, targets, upstream, temperature, dtype=torch.float32):
    """The oracle: the logits in `dtype` (as autocast computes them), then float32 throughout."""
    hidden, weight = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    logits = (hidden.to(dtype) @ weight.to(dtype).T).float() / temperature
    logp = -F.cross_entropy(logits, targets, reduction="none")
    (logp * upstream).sum().backward()
    return logp.detach(), entropy_from_logits(logits.detach()), hidden.grad, weight.grad


def fused(hidden, weight, targets, upstream, temperature, dtype=torch.float32):
    hidden, weight = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    logp, entropy = token_logprobs(hidden.to(dtype), weight.to(dtype), targets, temperature,
                                   entropy=True)
    (logp * upstream).sum().backward()
    return logp.detach(), entropy, hidden.grad, weight.grad


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_log_probs_entropy_and_gradients_are_those_of_the_whole_float32_logits(temperature):
    assert rows_per_chunk(V) == 7 and N % 7  # precondition: several chunks and a short last one
    args = inputs()
    (logp, entropy, g_hidden, g_weight) = fused(*args, temperature)
    (want_logp, want_entropy, want_hidden, want_weight) = whole(*args, temperature)
    # precondition: peaked distributions (uniform would have entropy log V, 8.0), log-probs spread
    assert want_entropy.max() < math.log(V) - 1 and want_logp.std() > 1.0
    torch.testing.assert_close(logp, want_logp, rtol=0, atol=1e-5)
    torch.testing.assert_close(entropy, want_entropy, rtol=0, atol=1e-5)
    assert relative(g_hidden, want_hidden) < 1e-6
    assert relative(g_weight, want_weight) < 1e-6


def test_a_sharp_policy_whose_probabilities_underflow_float32_is_still_exact(monkeypatch):
    """A trained policy leaves most of the vocabulary below exp(-87), where exp's inputs are
    clamped (`EXP_FLOOR`): what that drops is far below float32's resolution of the sums."""
    args = inputs(2, scale=8.0)
    got, want = fused(*args, 1.0), whole(*args, 1.0)
    logits = args[0] @ args[1].T
    below = (logits - logits.logsumexp(-1, keepdim=True) < module.EXP_FLOOR).float().mean()
    assert below > 0.5  # precondition: most log-probs are under the clamp
    assert want[1].min() < 1e-3 and want[1].max() > 0.1  # and entropies from ~0 up
    monkeypatch.setattr(module, "EXP_FLOOR", -math.inf)
    unclamped = fused(*args, 1.0)
    for a, b in zip(got, unclamped):
        assert relative(a, b) < 1e-7
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=1e-4)  # log-probs down to -900
    torch.testing.assert_close(got[1], want[1], rtol=0, atol=1e-5)
    # Logits in the hundreds round more than above, clamped or not (2.7e-6 either way).
    assert relative(got[2], want[2]) < 1e-5 and relative(got[3], want[3]) < 1e-5


def test_in_bfloat16_the_gradients_are_autocasts_to_within_a_tenth_of_bfloat16s_own_error():
    """In bfloat16 the gradient of the logits is rounded to bfloat16 before both matmuls (as
    autocast rounds it): the two paths then differ by the odd last-bit flip, far less than
    bfloat16 differs from float32."""
    args = inputs(1)
    got = fused(*args, 1.0, torch.bfloat16)
    want = whole(*args, 1.0, torch.bfloat16)
    exact = whole(*args, 1.0)
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(got[1], want[1], rtol=0, atol=1e-5)
    for i in (2, 3):
        error = relative(want[i], exact[i])
        assert error > 1e-3  # precondition: bfloat16 is visibly not float32
        assert relative(got[i], want[i]) < error / 10


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_learner_computes_what_its_whole_logits_compute(monkeypatch, dtype):
    """The learner's log-probs, entropy and every parameter's gradient through `token_logprobs`
    against the whole model's logits, at a temperature, with left- and right-padding."""
    cfg = Config()
    cfg.model.dtype, cfg.rollout.temperature = dtype, 0.9
    learner = Learner(cfg)
    rng = random.Random(0)
    seqs = [([rng.randrange(50000) for _ in range(3 + i)],
             [rng.randrange(50000) for _ in range(12 - i)], [0.0] * (12 - i)) for i in range(5)]
    mb = collate(seqs, torch.zeros(len(seqs)), learner.pad_id)
    calls = []
    spy = learner_module.token_logprobs
    monkeypatch.setattr(learner_module, "token_logprobs", lambda *a, **k: calls.append(1) or spy(*a, **k))

    def run():
        learner.model.zero_grad()
        logp, entropy = learner.logprobs(mb, entropy=True)
        (logp * mb.completion_mask).sum().backward()
        return logp.detach(), entropy, {n: p.grad.clone() for n, p in learner.model.named_parameters()}

    logp, entropy, grads = run()
    assert calls and type(learner.model.get_output_embeddings()) is torch.nn.Linear
    monkeypatch.setattr(learner, "_fused_head_of", lambda model: None)
    want_logp, want_entropy, want_grads = run()
    assert len(calls) == 1  # precondition: the second run took the whole-logits path
    mask = mb.completion_mask
    torch.testing.assert_close(logp[mask], want_logp[mask], rtol=0, atol=1e-5)
    torch.testing.assert_close(entropy[mask], want_entropy[mask], rtol=0, atol=1e-4)
    # float32: the same to rounding. bfloat16: the last-bit flips above, through the layers.
    bound = 1e-5 if dtype == "float32" else 2e-3
    for name, want in want_grads.items():
        assert want.norm() > 0, name
        assert relative(grads[name], want) < bound, name
