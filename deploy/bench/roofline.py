"""Roofline floors: a phase cannot take less than its model FLOPs at the matmul peak of the dtype
it computes in, nor less than the bytes it must move at the memory bandwidth; its floor is the
larger of the two, and its share of the floor (floor / measured) says how close it runs to the
machine's limit.

The bytes are the least each phase must move, not what an implementation moves (activations and
logits are left out, so the floor stays a floor):

- prefill: every weight read once (one batched forward over all prompts), each prompt token's
  keys and values written;
- decode: every weight read once per decode step (one batched forward for all running
  sequences) and, per token, the keys and values of its context read;
- learner: per micro-batch, the weights read by the forward and again by the backward (in the
  compute dtype) and the float32 weight gradients accumulated (read and written); per step,
  AdamW reads float32 weights, gradients and both moments and writes weights and moments
  (28 bytes per parameter).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from deploy.bench import render
from deploy.bench.machine import ModelShape
from deploy.bench.peak import PeakResult

ADAMW_BYTES = 28  # per parameter and step: read weight, grad, m, v; write weight, m, v (float32)


def dtype_bytes(dtype: str) -> int:
    return 4 if dtype == "float32" else 2


@dataclass
class Phase:
    name: str
    dtype: str
    """What it computes in: the peak its FLOPs are against."""
    measured_s: float
    gflop: float
    gbytes: float
    floor_s: float
    """max(gflop / peak of dtype, gbytes / bandwidth)."""
    bound: str
    """"compute" or "memory": which of the two sets the floor."""
    share: float
    """floor_s / measured_s: 1.0 is the machine's limit (NaN where nothing was measured)."""


def phase(name: str, dtype: str, measured_s: float, gflop: float, gbytes: float,
          peak: PeakResult) -> Phase:
    compute_s, memory_s = gflop / peak.gflops(dtype), gbytes / peak.bandwidth_gb_s
    floor = max(compute_s, memory_s)
    return Phase(name=name, dtype=dtype, measured_s=measured_s, gflop=gflop, gbytes=gbytes,
                 floor_s=floor, bound="compute" if compute_s >= memory_s else "memory",
                 share=floor / measured_s if measured_s > 0 else math.nan)


def _weight_bytes(shape: ModelShape, dtype: str) -> int:
    """What one forward reads of the weights: all but the input embedding's unused rows (a
    gather reads only the tokens' rows; tied embeddings are read whole by the unembedding)."""
    gathered = 0 if shape.tied_embeddings else shape.vocab * shape.hidden
    return (shape.params - gathered) * dtype_bytes(dtype)


def _kv_bytes_per_position(shape: ModelShape, dtype: str) -> int:
    return 2 * shape.layers * shape.hidden * dtype_bytes(dtype)  # keys and values


def prefill_gbytes(shape: ModelShape, prompt_lens: list[int], dtype: str) -> float:
    return (_weight_bytes(shape, dtype) + _kv_bytes_per_position(shape, dtype) * sum(prompt_lens)) / 1e9


def decode_gbytes(shape: ModelShape, prompt_lens: list[int], completion_lens: list[list[int]],
                  dtype: str) -> float:
    """Completion tokens after the first (the prefill's logits gave it), all sequences decoding
    together: as many weight reads as the longest completion has decode steps."""
    steps = max((c for cs in completion_lens for c in cs), default=1) - 1
    contexts = sum((p + c - 1) * (p + c) / 2 - p * (p + 1) / 2  # positions p .. p+c-2, each +1
                   for p, cs in zip(prompt_lens, completion_lens) for c in cs)
    return (_weight_bytes(shape, dtype) * steps
            + _kv_bytes_per_position(shape, dtype) * contexts) / 1e9


def learner_gbytes(shape: ModelShape, micro_batches: int, dtype: str) -> float:
    reads = 2 * _weight_bytes(shape, dtype)  # forward and backward
    grads = 8 * shape.params  # float32 gradients accumulated: read and written
    return ((reads + grads) * micro_batches + ADAMW_BYTES * shape.params) / 1e9


HEADER = ["phase", "dtype", "measured s", "GFLOP", "GB moved", "floor s", "bound by",
          "share of floor"]


def rows(phases: list[Phase]) -> list[list]:
    return [[p.name, p.dtype, f"{p.measured_s:.3f}", f"{p.gflop:.1f}", f"{p.gbytes:.2f}",
             f"{p.floor_s:.3f}", p.bound, render.pct(p.share)] for p in phases]
