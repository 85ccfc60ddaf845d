"""The machine's float32 matmul peak: the best GFLOP/s of large `torch.mm` calls on the configured
threads, the yardstick every "fraction of peak" in the benchmark is measured against."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch


@dataclass
class PeakResult:
    gflops: float
    """The best of every size: the peak."""
    threads: int
    repeats: int
    gflops_by_size: dict[int, float]
    """Best GFLOP/s of n x n matrices, by n."""
    dtype: str = "float32"


def measure(threads: int, sizes: tuple[int, ...] = (2048, 4096), repeats: int = 5) -> PeakResult:
    """Best of `repeats` timed multiplications of n x n float32 matrices, over `sizes`."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        per_size = {}
        for n in sizes:
            a, b, out = torch.randn(n, n), torch.randn(n, n), torch.empty(n, n)
            torch.mm(a, b, out=out)  # warm-up: first call pays for allocation and thread start
            best = min(_timed(lambda: torch.mm(a, b, out=out)) for _ in range(repeats))
            per_size[n] = 2 * n**3 / best / 1e9
    finally:
        torch.set_num_threads(before)
    return PeakResult(gflops=max(per_size.values()), threads=threads, repeats=repeats,
                      gflops_by_size=per_size)


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start
