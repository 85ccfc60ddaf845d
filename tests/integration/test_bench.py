"""The benchmark's smoke run: `python -m deploy.bench --smoke` on tiny shapes must produce its
three outputs with every section measured. A benchmark is not a timed test: no speed is asserted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
SECTIONS = ("peak", "scaling", "generation", "weight_sync", "e2e", "time_to_reward")


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bench")
    proc = subprocess.run([sys.executable, "-m", "deploy.bench", "--smoke", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        pytest.fail(f"deploy.bench --smoke exited {proc.returncode}:\n{proc.stderr[-4000:]}")
    return out


def positive(value) -> bool:
    return isinstance(value, (int, float)) and value > 0


def test_smoke_writes_the_three_outputs(bench):
    assert (bench / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (bench / "bench.md").read_text()
    for heading in ("## Generation", "## End to end", "## Weight sync", "## Scaling",
                    "## Time to reward"):
        assert heading in md
    assert "AMD" in md or "Intel" in md or "cores" in md  # the machine is named


def test_smoke_json_has_every_section_with_positive_numbers(bench):
    results = json.loads((bench / "bench.json").read_text())
    assert results["machine"]["cores"] >= 1 and "torch" in results["machine"]["versions"]
    s = results["sections"]
    assert set(SECTIONS) <= set(s)
    assert not [name for name in SECTIONS if "error" in s[name]]

    assert positive(s["peak"]["gflops"])
    for batch in s["generation"]["batches"].values():
        for side in ("ours", "hf_generate"):
            assert positive(batch[side]["tokens_per_s"])
            assert positive(batch[side]["fraction_of_peak"])
    for n in (1, 2):
        assert positive(s["scaling"][f"workers_{n}"]["tokens_per_s"])
    sync = s["weight_sync"]["presets"]["tiny"]
    assert positive(sync["bytes"]) and positive(sync["memcpy_s"])
    assert positive(sync["shm"]["seconds"]) and positive(sync["broadcast"]["seconds"])
    for run in ("ours_sync", "trl"):  # the smoke runs ours synchronously only
        assert positive(s["e2e"][run]["completions_per_s"])
        assert positive(s["e2e"][run]["tokens_per_s"])
    assert positive(s["e2e"]["ours_sync_vs_trl"])
    for run in ("ours_sync", "trl"):
        assert "reached" in s["time_to_reward"][run]
        assert positive(s["time_to_reward"][run]["startup_s"])
    for name in ("generation", "scaling", "e2e", "time_to_reward"):
        assert s[name]["model"]["name"] == "tiny" and s[name]["config"]
