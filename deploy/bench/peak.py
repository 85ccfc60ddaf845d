"""The machine's limits, measured first: the matmul peak in float32 and in bfloat16 (the best
GFLOP/s of large `torch.mm` calls on the configured threads) and the memory bandwidth (the best
GB/s of a large copy, as STREAM's copy kernel counts it: bytes read plus bytes written). Every
roofline floor in the benchmark is against these: a phase cannot take less than its FLOPs at the
peak of the dtype it computes in, nor less than its bytes at the bandwidth."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from deploy.bench.harness import Harness

DTYPES = ("float32", "bfloat16")


@dataclass
class Settings:
    """Peak: the matmul peaks and the memory bandwidth, measured first (every floor is against
    them)."""

    sizes: tuple[int, ...] = (2048, 4096)
    """n of the n x n matrices multiplied."""
    repeats: int = 5
    """Timed multiplications of each size and copies (after a warm-up)."""
    copy_mib: int = 1024
    """Size of the copied tensor: far larger than any cache."""

    @classmethod
    def smoke(cls) -> Settings:
        return cls(sizes=(1024,), repeats=2, copy_mib=256)


@dataclass
class PeakResult:
    gflops_by_dtype: dict[str, float]
    """The best of every size, by dtype: the matmul peak a computation in that dtype is against."""
    gflops_by_size: dict[str, dict[int, float]]
    """Best GFLOP/s of n x n matrices, by dtype and n."""
    bandwidth_gb_s: float
    """Best (bytes read + bytes written) / s of copying `copy_mib`."""
    threads: int
    repeats: int

    def gflops(self, dtype: str) -> float:
        """The peak of `dtype` (float16 counts as bfloat16: both are 16-bit matmuls)."""
        return self.gflops_by_dtype["float32" if dtype == "float32" else "bfloat16"]


def run(harness: Harness, s: Settings) -> PeakResult:
    threads, before = harness.options.threads, torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        by_size = {dtype: _matmul(getattr(torch, dtype), s) for dtype in DTYPES}
        bandwidth = _bandwidth(s)
    finally:
        torch.set_num_threads(before)
    return PeakResult(gflops_by_dtype={d: max(sizes.values()) for d, sizes in by_size.items()},
                      gflops_by_size=by_size, bandwidth_gb_s=bandwidth, threads=threads,
                      repeats=s.repeats)


def _matmul(dtype: torch.dtype, s: Settings) -> dict[int, float]:
    """Best of `repeats` timed multiplications of n x n matrices, for each n in `sizes`."""
    per_size = {}
    for n in s.sizes:
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        out = torch.empty(n, n, dtype=dtype)
        torch.mm(a, b, out=out)  # warm-up: first call pays for allocation and thread start
        best = min(_timed(lambda: torch.mm(a, b, out=out)) for _ in range(s.repeats))
        per_size[n] = 2 * n**3 / best / 1e9
    return per_size


def _bandwidth(s: Settings) -> float:
    src = torch.ones(s.copy_mib * 2**20 // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)  # warm-up: the pages are touched once before timing
    best = min(_timed(lambda: dst.copy_(src)) for _ in range(s.repeats))
    return 2 * src.nbytes / best / 1e9


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def markdown(peak: PeakResult) -> list[str]:
    lines = []
    for dtype in DTYPES:
        sizes = ", ".join(f"n={n}: {g:.0f}" for n, g in peak.gflops_by_size[dtype].items())
        lines.append(f"- {dtype} matmul: **{peak.gflops_by_dtype[dtype]:.0f} GFLOP/s** ({sizes})")
    ratio = peak.gflops_by_dtype["bfloat16"] / peak.gflops_by_dtype["float32"]
    return [f"On {peak.threads} thread(s), best of {peak.repeats}:", "", *lines,
            f"- memory bandwidth (copy, read + write): **{peak.bandwidth_gb_s:.1f} GB/s**", "",
            f"bfloat16 multiplies {ratio:.1f}x as fast as float32 here.", ""]
