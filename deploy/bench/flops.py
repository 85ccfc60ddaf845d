"""Model FLOPs of generation and training for a GPT-NeoX shape (the work a step must do, not
what a given implementation spends; padding and recomputation are not counted).

One token's forward pass at context length `ctx` (positions it attends to, itself included):

    F(ctx) = 2 * L * (4 h^2 + 2 h ffn)    QKV, output and the two MLP matmuls
           + 4 * L * h * ctx              attention scores (Q K^T) and the weighted sum (A V)
           + 2 * h * V                    the unembedding, only where logits are needed

TRL's `compute_flops_per_token` counts three MLP matmuls (a gated MLP); GPT-NeoX has two.
Generation: the prompt is prefilled once per prompt (every engine here shares it between the G
samples), then each completion token costs one F with logits. Training: forward and backward
over prompt and completion of every sequence, 3 F per token, logits on the completion only.
"""

from __future__ import annotations

from deploy.bench.machine import ModelShape


def _layers(shape: ModelShape) -> float:
    h = shape.hidden
    return 2 * shape.layers * (4 * h * h + 2 * h * shape.ffn)


def _attention(shape: ModelShape, first: int, last: int) -> float:
    """Attention FLOPs of the tokens at positions first..last-1 (context = position + 1)."""
    contexts = (last * (last + 1) - first * (first + 1)) / 2
    return 4 * shape.layers * shape.hidden * contexts


def _logits(shape: ModelShape) -> float:
    return 2 * shape.hidden * shape.vocab


def prefill(shape: ModelShape, prompt_len: float) -> float:
    return _layers(shape) * prompt_len + _attention(shape, 0, prompt_len) + _logits(shape)


def decode(shape: ModelShape, prompt_len: float, completion_len: float) -> float:
    """The completion's tokens after the first (which the prefill's logits gave)."""
    n = max(completion_len - 1, 0)
    return (_layers(shape) + _logits(shape)) * n + _attention(shape, prompt_len, prompt_len + n)


def generation(shape: ModelShape, prompt_lens: list[float],
               completion_lens: list[list[float]]) -> float:
    """FLOPs to sample completion_lens[i] (one length per sample) for prompt i."""
    return sum(prefill(shape, p) + sum(decode(shape, p, c) for c in cs)
               for p, cs in zip(prompt_lens, completion_lens))


def training(shape: ModelShape, prompt_len: float, completion_len: float) -> float:
    """Forward and backward of one sequence (3x the forward), logits on its completion."""
    tokens = prompt_len + completion_len
    forward = (_layers(shape) * tokens + _attention(shape, 0, tokens)
               + _logits(shape) * completion_len)
    return 3 * forward

