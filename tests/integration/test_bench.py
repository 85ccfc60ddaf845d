"""The benchmark's smoke run: `python -m deploy.bench --smoke` on tiny shapes must produce its
three outputs with every section measured. A benchmark is not a timed test: no speed is asserted."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
SECTIONS = ("peak", "scaling", "generation", "weight_sync", "e2e", "learner", "time_to_reward", "modes",
            "ranks", "padding", "lora", "environments")
CHARTS = ("scaling", "generation", "weight_sync", "e2e", "time_to_reward", "modes")  # bench.png's panels
PANEL = (462, 770)  # pixels (height, width) of a panel: 4.2 x 7 inches at 110 dpi


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


def cpu_model() -> str:
    """The CPU's name as the kernel gives it, read here, apart from the benchmark."""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def test_smoke_writes_the_markdown(bench):
    md = (bench / "bench.md").read_text()
    for heading in ("## Generation", "## End to end", "## Weight sync", "## Scaling",
                    "## Time to reward"):
        assert heading in md
    machine = next(line for line in md.splitlines() if line.startswith("*Machine*: "))
    assert machine.startswith(f"*Machine*: {cpu_model()} (")
    assert f"), {os.cpu_count()} cores, " in machine


def test_smoke_chart_has_a_panel_per_section(bench):
    import matplotlib.image

    sections = json.loads((bench / "bench.json").read_text())["sections"]
    drawn = [name for name in CHARTS if sections[name] and "error" not in sections[name]]
    cols = 2 if len(drawn) > 1 else 1
    rows = -(-len(drawn) // cols)
    image = matplotlib.image.imread(bench / "bench.png")[..., :3]
    assert image.shape == (rows * PANEL[0], cols * PANEL[1], 3)
    ink = (image < 0.95).any(axis=2)  # anything drawn: text, axes, bars
    first_bar = (np.abs(image - np.array([0x1F, 0x77, 0xB4]) / 255).max(axis=2) < 0.02)  # C0

    def cell(i: int, margin: int = 20) -> tuple[slice, slice]:
        """The inside of the i-th place: a panel's frame may cross its border by a pixel or two."""
        row, col = divmod(i, cols)
        return (slice(row * PANEL[0] + margin, (row + 1) * PANEL[0] - margin),
                slice(col * PANEL[1] + margin, (col + 1) * PANEL[1] - margin))

    ttr = sections["time_to_reward"]
    for i, name in enumerate(drawn):
        assert ink[cell(i)].mean() > 0.01, f"the {name} panel is empty"
        # Each chart's first bar is C0; time to reward draws none for a run that did not reach.
        if name != "time_to_reward" or ttr["ours"][0]["step"] is not None:
            assert first_bar[cell(i)].mean() > 0.001, f"the {name} panel has no bars"
    for i in range(len(drawn), rows * cols):
        assert ink[cell(i)].mean() < 0.001  # a place left empty


def test_smoke_json_has_every_section_with_positive_numbers(bench):
    results = json.loads((bench / "bench.json").read_text())
    assert results["machine"]["cpu"] == cpu_model()
    assert results["machine"]["cores"] == os.cpu_count()
    assert "torch" in results["machine"]["versions"]
    s = results["sections"]
    assert not [name for name in SECTIONS if s[name] is None or "error" in s[name]]
    assert set(results["section_s"]) == set(SECTIONS)

    peak = s["peak"]
    assert positive(peak["gflops_by_dtype"]["float32"]) and positive(peak["gflops_by_dtype"]["bfloat16"])
    assert positive(peak["bandwidth_gb_s"])
    for batch in s["generation"]["batches"]:
        for side in ("ours", "ours_engine", "hf_generate"):
            assert positive(batch[side]["tokens_per_s"])
            assert positive(batch[side]["fraction_of_peak"])
        assert [p["name"] for p in batch["phases"]] == ["prefill", "decode"]
        assert all(positive(p["measured_s"]) and positive(p["floor_s"]) for p in batch["phases"])
        assert 0 < batch["share_of_floor"] < 1  # a floor no run can beat
    for workers in ("one", "two"):
        assert positive(s["scaling"][workers]["tokens_per_s"])
    sync = s["weight_sync"]["presets"]["tiny"]
    assert positive(sync["bytes"]) and positive(sync["memcpy_s"])
    assert positive(sync["shm"]["seconds"]) and positive(sync["broadcast"]["seconds"])
    e2e, ttr = s["e2e"], s["time_to_reward"]
    for section in (e2e, ttr):  # the smoke runs ours synchronously only
        assert [run["policy_lag"] for run in section["ours"]] == [0]
        assert section["trl"]["policy_lag"] is None
    for run in (*e2e["ours"], e2e["trl"]):
        assert positive(run["completions_per_s"]) and positive(run["tokens_per_s"])
    ours, trl = e2e["ours"][0], e2e["trl"]
    assert ours["vs_trl"] == pytest.approx(ours["completions_per_s"] / trl["completions_per_s"])
    assert trl["dtype"] == "bfloat16"  # the smoke's TRL runs with bf16=True
    assert [p["name"] for p in ours["phases"]] == ["prefill + decode", "learner", "the rest"]
    assert all(positive(p["measured_s"]) for p in ours["phases"][:2])
    assert 0 < ours["share_of_floor"] < 1 and 0 < trl["share_of_floor"] < 1
    for run in (*ttr["ours"], ttr["trl"]):
        assert run["step"] is None or 1 <= run["step"] <= run["steps_run"]
        assert positive(run["startup_s"])
    modes = s["modes"]["modes"]
    assert [(m["policy_lag"], m["weight_update"]) for m in modes] == [  # the smoke's two
        (0, "between_rounds"), (1, "in_flight")]
    for m in modes:
        assert positive(m["completions_per_s"]) and 0 < m["engine_busy"] <= 1 and 0 < m["learner_busy"] <= 1
    assert modes[0]["token_lag_mean"] == 0 and modes[1]["token_lag_mean"] > 0  # one step ahead
    one, two = s["ranks"]["ranks"]
    assert (one["ranks"], two["ranks"]) == (1, 2) and positive(one["seconds_per_step"])
    assert one["communication_s"] == 0 and 0 < two["communication_share"] < 1  # FSDP's ranges found
    learner = s["learner"]  # both log-prob paths, on the random-init and the sharpened policy
    assert [(c["policy"] == "random init", c["log_probs"].startswith("chunked")) for c in learner["cases"]] == [
        (True, False), (True, True), (False, False), (False, True)]
    assert all(positive(c["seconds_per_step"]) for c in learner["cases"])
    assert learner["cases"][2]["entropy"] < learner["cases"][0]["entropy"] - 1  # sharpened
    assert learner["config"]["MALLOC_MMAP_MAX_"] == "0"  # the learner actor's environment
    # The profiler's ranges were found: the chunked log-probs' own work, and the matmuls.
    assert positive(learner["profile"]["log-probs' float32 pass over the vocabulary"])
    assert positive(learner["profile"]["matmuls"]) and positive(learner["step_s"])
    padding = s["padding"]  # spread lengths: by length pads less than in the batch's order
    assert 0 <= padding["by_length"]["padded_share"] < padding["in_order"]["padded_share"]
    assert positive(padding["by_length"]["seconds_per_step"])
    [environments] = s["environments"]["latencies"]  # the same episodes, in the engine loop and turn by turn
    assert environments["latency_ms"] == 50
    assert positive(environments["in_loop_tokens_per_s"]) and positive(environments["turn_at_a_time_tokens_per_s"])
    assert environments["speedup"] == pytest.approx(environments["turn_at_a_time_s"] / environments["in_loop_s"])
    lora = s["lora"]["presets"]["tiny"]  # the adapter against the model: 32768 against 13.3M
    assert lora["full"]["sync_bytes"] / lora["lora"]["sync_bytes"] == pytest.approx(lora["bytes_ratio"])
    assert lora["bytes_ratio"] > 400 and lora["lora"]["trained_parameters"] == 32768
    for variant in (lora["full"], lora["lora"]):
        assert positive(variant["sync_s"]) and positive(variant["seconds_per_step"])
        assert positive(variant["peak_rss_gib"])
    for name in ("generation", "scaling", "e2e", "learner", "time_to_reward", "modes", "ranks", "padding"):
        assert s[name]["model"]["name"] == "tiny" and s[name]["config"]
