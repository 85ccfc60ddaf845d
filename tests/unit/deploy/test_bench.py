"""The benchmark's arithmetic: model FLOPs, steady-state throughput, time to reward, and the
report written from a hand-made result (no engines, no Ray)."""

from __future__ import annotations

import json

import pytest

from deploy.bench import flops, report
from deploy.bench.end_to_end import steady
from deploy.bench.time_to_reward import first_reaching

PYTHIA_70M = {"name": "pythia-70m-shape", "layers": 6, "hidden": 512, "heads": 8, "ffn": 2048,
              "vocab": 50304, "tied_embeddings": False, "params": 70_426_624}


def test_forward_flops_per_token_by_hand():
    # Layers: 2 * 6 * (4 * 512^2 + 2 * 512 * 2048) = 37,748,736; logits: 2 * 512 * 50304.
    layers, logits = 37_748_736, 51_511_296
    # One completion token after a prompt of 10 (the first came from the prefill): context 11.
    assert flops.decode(PYTHIA_70M, 10, 2) == layers + logits + 4 * 6 * 512 * 11
    assert flops.prefill(PYTHIA_70M, 2) == 2 * layers + 4 * 6 * 512 * (1 + 2) + logits
    assert flops.training(PYTHIA_70M, 1, 1) == 3 * (2 * layers + 4 * 6 * 512 * 3 + logits)


def test_grpo_step_floor_matches_the_issue():
    # 16 completions of 64 tokens, G = 8, ~30-token prompts: about 2.6 s at 165 GFLOP/s.
    seconds = flops.grpo_step(PYTHIA_70M, 2, 8, 30, 64) / 165e9
    assert seconds == pytest.approx(2.6, abs=0.1)


def test_steady_state_leaves_out_the_warm_up_steps():
    record = {"first_step_start_s": 20.0, "steps": [
        {"step": 1, "elapsed_s": 30.0, "reward": 0.0, "tokens": 100},
        {"step": 2, "elapsed_s": 32.0, "reward": 0.0, "tokens": 100},
        {"step": 3, "elapsed_s": 34.0, "reward": 0.0, "tokens": 120}]}
    s = steady(record, warmup=1, batch_size=16)
    assert s["steps_measured"] == 2 and s["seconds_per_step"] == 2.0
    assert s["completions_per_s"] == 8.0 and s["tokens_per_s"] == 55.0
    assert steady(record, warmup=0, batch_size=16)["seconds_per_step"] == pytest.approx(14 / 3)
    assert steady(record, warmup=5, batch_size=16)["steps_measured"] == 1  # keeps the last step


def test_first_reaching_counts_from_the_run_and_from_step_one():
    record = {"first_step_start_s": 10.0, "run_dir": "r", "steps": [
        {"step": 1, "elapsed_s": 12.0, "reward": 0.5},
        {"step": 2, "elapsed_s": 14.0, "reward": 0.95}]}
    hit = first_reaching(record, 0.9)
    assert (hit["step"], hit["seconds_incl_startup"], hit["seconds_excl_startup"]) == (2, 14.0, 4.0)
    miss = first_reaching(record, 0.99)
    assert not miss["reached"] and miss["best_reward"] == 0.95


def _side(**extra):
    return {"seconds_per_step": 2.0, "completions_per_s": 8.0, "tokens_per_s": 500.0,
            "fraction_of_peak": 0.3, "startup_s": 20.0, "steps_measured": 4,
            "floor_s_per_step": 0.6, **extra}


def test_report_writes_markdown_json_and_png(tmp_path):
    machine = {"cpu": "Test CPU", "cores": 2, "ram_gib": 8.0, "python": "3.11",
               "versions": {"torch": "2", "vllm": "0", "trl": "1", "ray": "2"}}
    gen_side = {"tokens_per_s": 900.0, "completions_per_s": 14.0, "fraction_of_peak": 0.45,
                "engine_tokens_per_s": 910.0, "engine_fraction_of_peak": 0.46}
    results = {"machine": machine, "command": "python -m deploy.bench", "started": "now",
               "settings": {"smoke": False}, "sections": {
        "peak": {"gflops": 170.0, "threads": 2, "repeats": 5, "gflops_by_size": {"2048": 170.0}},
        "generation": {"model": PYTHIA_70M, "config": {"G": 8}, "batches": {"128": {
            "completions": 128, "ratio_tokens_per_s": 2.0, "ours": gen_side,
            "hf_generate": {**gen_side, "tokens_per_s": 450.0}}}},
        "e2e": {"model": PYTHIA_70M, "config": {"batch": 16}, "ours_sync": _side(),
                "ours_async": _side(), "trl": _side(completions_per_s=0.2),
                "ours_sync_vs_trl": 40.0, "ours_async_vs_trl": 40.0},
        "weight_sync": {"config": {}, "presets": {"tiny": {
            "bytes": 53e6, "memcpy_s": 0.005, "shm": {"seconds": 0.05, "learner_s": 0.005,
                                                      "engine_s": 0.04, "vs_memcpy": 10.0},
            "broadcast": {"seconds": 0.1, "engine_s": 0.09, "vs_memcpy": 20.0, "collectives": 1},
            "per_tensor": {"seconds": 0.3, "engine_s": 0.29, "vs_memcpy": 60.0, "collectives": 28}},
            "pythia-410m-shape": {"error": "RuntimeError: no room"}}},
        "scaling": {"model": PYTHIA_70M, "config": {}, "cpus_per_worker": 1, "speedup": 1.8,
                    "threads_per_worker": 1,
                    "oversubscribed": {"threads_per_worker": 2, "tokens_per_s": 300.0,
                                       "completions_per_s": 4.0},
                    "efficiency": 0.9,
                    "workers_1": {"tokens_per_s": 400.0, "completions_per_s": 6.0},
                    "workers_2": {"tokens_per_s": 720.0, "completions_per_s": 11.0}},
        "time_to_reward": {"model": PYTHIA_70M, "config": {}, "threshold": 0.9,
                           "ours_sync": {"reached": True, "step": 12, "seconds_incl_startup": 60.0,
                                         "seconds_excl_startup": 30.0, "startup_s": 30.0},
                           "trl": {"reached": False, "steps_run": 30, "best_reward": 0.5,
                                   "startup_s": 3.0}},
    }}
    report.write(tmp_path, results)
    md = (tmp_path / "bench.md").read_text()
    assert "Test CPU, 2 cores" in md and "pythia-70m-shape (6 layers x 512, 70M params)" in md
    assert "| end to end sync: completions/s vs TRL | >= 10x | 40.0x | yes |" in md
    assert "| generation at 128 completions: model FLOPs/s vs peak | >= 50% | 45% | **no** |" in md
    assert "failed: RuntimeError: no room" in md and "not in 30 steps" in md
    assert "| 0.100 in 1 (20.0x) | 0.300 in 28 (60.0x) |" in md
    assert "| 2 | 1 (2 threads: every core) | 300.00 | 4.00 | 0.75x |" in md
    assert json.loads((tmp_path / "bench.json").read_text())["sections"]["peak"]["gflops"] == 170.0
    assert (tmp_path / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
