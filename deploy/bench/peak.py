"""The machine's float32 matmul peak: the best GFLOP/s of large `torch.mm` calls on the configured
threads, the yardstick every "fraction of peak" in the benchmark is measured against."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from deploy.bench.harness import Harness


@dataclass
class Settings:
    """Peak: the float32 matmul peak, measured first (every fraction of peak is against it)."""

    sizes: tuple[int, ...] = (2048, 4096)
    """n of the n x n matrices multiplied."""
    repeats: int = 5
    """Timed multiplications of each size (after a warm-up)."""

    @classmethod
    def smoke(cls) -> Settings:
        return cls(sizes=(1024, 2048))


@dataclass
class PeakResult:
    gflops: float
    """The best of every size: the peak."""
    threads: int
    repeats: int
    gflops_by_size: dict[int, float]
    """Best GFLOP/s of n x n matrices, by n."""
    dtype: str = "float32"


def run(harness: Harness, s: Settings) -> PeakResult:
    """Best of `repeats` timed multiplications of n x n float32 matrices, over `sizes`."""
    threads, before = harness.options.threads, torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        per_size = {}
        for n in s.sizes:
            a, b, out = torch.randn(n, n), torch.randn(n, n), torch.empty(n, n)
            torch.mm(a, b, out=out)  # warm-up: first call pays for allocation and thread start
            best = min(_timed(lambda: torch.mm(a, b, out=out)) for _ in range(s.repeats))
            per_size[n] = 2 * n**3 / best / 1e9
    finally:
        torch.set_num_threads(before)
    return PeakResult(gflops=max(per_size.values()), threads=threads, repeats=s.repeats,
                      gflops_by_size=per_size)


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def markdown(peak: PeakResult) -> list[str]:
    sizes = ", ".join(f"n={n}: {g:.0f}" for n, g in peak.gflops_by_size.items())
    return [f"**{peak.gflops:.0f} GFLOP/s** on {peak.threads} thread(s): best of {peak.repeats} "
            f"`torch.mm` of n x n float32 matrices ({sizes} GFLOP/s).", ""]
