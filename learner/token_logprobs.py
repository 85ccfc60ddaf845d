"""The log-prob of each chosen token, and each position's entropy, from the last hidden states and
the output layer, without a float32 copy of the logits.

The whole float32 logits of 1,024 positions over a 50k vocabulary are 206 MB a tensor, written and
read several times (cross_entropy's forward and backward, the entropy). Here the logits stay in
the compute dtype (what the output layer's matmul returns) and the float32 work runs a few rows at
a time, in buffers a few MB large. The arithmetic is the same as `F.cross_entropy` on the float32
logits (and TRL's `entropy_from_logits`): log p = x - lse(x) at the chosen token,
H = lse(x) - sum p x, with x = logits / temperature. A 70m-shape learner step (16 x 80 tokens, AMX
Xeon, `python -m deploy.bench --only learner`) took 0.70 s this way against 0.79 s from the whole
logits, and 0.70 against 0.82 s on a sharpened policy (entropy 0.65)."""

from __future__ import annotations

import torch
from torch import Tensor

CHUNK_BYTES = 4 << 20
"""float32 work per chunk of rows: on an AMX Xeon (2 MB of L2 a core), 1, 4 and 16 MB chunks
timed the same within noise."""

EXP_FLOOR = -87.0
"""exp's inputs are clamped here: below about -87.3 its result leaves float32's normal range, and
torch's vectorised exp then takes a slow path (20 rows x 50k: 0.28 ms, 18 ms with subnormal
results, 7.6 ms with results that underflow to 0, on an AMX Xeon). A trained policy puts most of
the vocabulary there, so `logsumexp` and `log_softmax` slow down with training. A probability of
exp(-87) = 1.6e-38 instead of less changes no float32 sum that also holds the largest (1)."""


def rows_per_chunk(vocab: int) -> int:
    return max(1, CHUNK_BYTES // (4 * vocab))


class _TokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, targets: Tensor, temperature: float,
                with_entropy: bool) -> tuple[Tensor, Tensor]:
        logits = hidden @ weight.T                                    # [N, V], compute dtype
        lse = torch.empty(len(logits), dtype=torch.float32, device=logits.device)
        logp = torch.empty_like(lse)
        entropy = torch.empty_like(lse) if with_entropy else lse.new_empty(0)
        step = rows_per_chunk(logits.shape[1])
        for i in range(0, len(logits), step):
            x = logits[i:i + step].to(torch.float32, copy=True)        # [n, V]
            if temperature != 1.0:
                x.div_(temperature)
            top = x.amax(dim=-1, keepdim=True)
            x.sub_(top)                                               # <= 0, max 0
            e = x.clamp_min(EXP_FLOOR).exp_()
            total = e.sum(dim=-1)                                     # >= 1
            log_total = total.log()
            lse[i:i + step] = top.squeeze(1) + log_total
            logp[i:i + step] = x.gather(1, targets[i:i + step, None]).squeeze(1) - log_total
            if with_entropy:  # H = lse - E[x]: two terms >= 0 once shifted, so no cancellation
                entropy[i:i + step] = log_total - (e * x).sum(dim=-1) / total
        ctx.temperature = temperature
        ctx.save_for_backward(hidden, weight, targets, logits, lse)
        ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_logp: Tensor, _grad_entropy: Tensor):
        hidden, weight, targets, logits, lse = ctx.saved_tensors
        t = ctx.temperature
        step = rows_per_chunk(logits.shape[1])
        grad = grad_logp.float() / t
        for i in range(0, len(logits), step):
            # d log p_t / d x = onehot(t) - softmax(x), and x = logits / t.
            p = logits[i:i + step].to(torch.float32, copy=True)
            if t != 1.0:
                p.div_(t)
            p.sub_(lse[i:i + step, None]).clamp_min_(EXP_FLOOR).exp_()
            p.mul_(-grad[i:i + step, None]).scatter_add_(1, targets[i:i + step, None],
                                                         grad[i:i + step, None])
            logits[i:i + step] = p  # the logits are not needed again: their buffer takes the grad
        grad_hidden = logits @ weight if ctx.needs_input_grad[0] else None
        grad_weight = logits.T @ hidden if ctx.needs_input_grad[1] else None
        return grad_hidden, grad_weight, None, None, None


def token_logprobs(hidden: Tensor, weight: Tensor, targets: Tensor, temperature: float = 1.0,
                   entropy: bool = False) -> tuple[Tensor, Tensor | None]:
    """log softmax(hidden @ weight.T / temperature) at `targets`, in float32, and with `entropy`
    each row's entropy (no gradient). `hidden` [N, H] and `weight` [V, H] in the compute dtype
    (the matmuls run in it; the gradients come back in it), `targets` [N] token ids."""
    logp, ent = _TokenLogprobs.apply(hidden, weight, targets, float(temperature), entropy)
    return logp, ent if entropy else None
