"""The benchmark's arithmetic: model FLOPs, steady-state throughput, time to reward, the report
written from hand-made results, and the command line (no engines, no Ray)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from deploy.bench import flops, report, roofline
from deploy.bench.end_to_end import EndToEndResult, throughput
from deploy.bench.generation import GenerationBatch, GenerationResult, GenerationSide
from deploy.bench.machine import Machine, ModelShape
from deploy.bench.peak import PeakResult
from deploy.bench.results import BenchResults, Failed
from deploy.bench.runs import RunRecord, Step
from deploy.bench.scaling import ScalingResult, WorkersThroughput
from deploy.bench.time_to_reward import TimeToRewardResult, first_reaching
from deploy.bench.weight_sync import WeightSyncPreset, WeightSyncResult, WeightSyncVariant

PYTHIA_70M = ModelShape(name="pythia-70m-shape", layers=6, hidden=512, heads=8, ffn=2048,
                        vocab=50304, tied_embeddings=False, params=70_426_624)
PEAK = PeakResult(gflops_by_dtype={"float32": 100.0, "bfloat16": 400.0}, bandwidth_gb_s=10.0,
                  gflops_by_size={"float32": {2048: 100.0}, "bfloat16": {2048: 400.0}},
                  threads=2, repeats=5)


def test_forward_flops_per_token_by_hand():
    # Layers: 2 * 6 * (4 * 512^2 + 2 * 512 * 2048) = 37,748,736; logits: 2 * 512 * 50304.
    layers, logits = 37_748_736, 51_511_296
    # One completion token after a prompt of 10 (the first came from the prefill): context 11.
    assert flops.decode(PYTHIA_70M, 10, 2) == layers + logits + 4 * 6 * 512 * 11
    assert flops.prefill(PYTHIA_70M, 2) == 2 * layers + 4 * 6 * 512 * (1 + 2) + logits
    assert flops.training(PYTHIA_70M, 1, 1) == 3 * (2 * layers + 4 * 6 * 512 * 3 + logits)


def test_a_phase_floor_is_the_larger_of_its_flops_and_its_bytes():
    # 40 GFLOP and 5 GB: 0.1 s at bfloat16's 400 GFLOP/s, 0.4 s at float32's 100; 0.5 s at 10 GB/s.
    p = roofline.phase("decode", "bfloat16", 2.0, 40.0, 5.0, PEAK)
    assert (p.floor_s, p.bound, p.share) == (0.5, "memory", 0.25)
    p = roofline.phase("learner", "float32", 1.0, 80.0, 5.0, PEAK)
    assert (p.floor_s, p.bound, p.share) == (0.8, "compute", 0.8)


def test_bytes_each_phase_must_move_by_hand():
    # Weights read per forward: all but the input embedding (50304 x 512, gathered by row).
    read = 70_426_624 - 50304 * 512
    kv = 2 * 6 * 512 * 2  # keys and values per position, bfloat16
    # A prompt of 10 and completions of 3 and 2: two decode steps (the longest's), at contexts
    # 11 and 12 for the first and 11 for the second.
    assert roofline.decode_gbytes(PYTHIA_70M, [10], [[3, 2]], "bfloat16") * 1e9 == \
        pytest.approx(2 * read * 2 + kv * (11 + 12 + 11))
    assert roofline.prefill_gbytes(PYTHIA_70M, [10, 6], "bfloat16") * 1e9 == \
        pytest.approx(read * 2 + kv * 16)
    # Two float32 micro-batches: weights read twice and gradients read and written, each; AdamW.
    assert roofline.learner_gbytes(PYTHIA_70M, 2, "float32") * 1e9 == \
        pytest.approx(2 * (2 * read * 4 + 8 * 70_426_624) + 28 * 70_426_624)


def flat_phases(gflop_per_token: float):
    """A step of `gflop_per_token` x mean completion tokens GFLOP, no bytes, no measured time."""
    return lambda dtype, tokens, steps: [roofline.phase("all", dtype, float("nan"),
                                                        gflop_per_token * tokens, 0.0, PEAK)]


def record(startup: float, ends: list[float], rewards: list[float] | None = None,
           tokens: list[float] | None = None) -> RunRecord:
    """A run whose step i ends `ends[i]` seconds after the run started."""
    n = len(ends)
    return RunRecord(run_dir="r", first_step_start_s=startup, steps=[
        Step(step=i + 1, elapsed_s=end, reward=(rewards or [0.0] * n)[i],
             tokens=(tokens or [100] * n)[i]) for i, end in enumerate(ends)])


def test_steady_state_leaves_out_the_warm_up_steps():
    run = record(20.0, [30.0, 32.0, 34.0], tokens=[100, 100, 120])
    # Step 1 is warm-up: steps 2 and 3, 4 s from the end of step 1, 32 completions, 220 tokens.
    s = throughput(run, 0, warmup=1, batch_size=16, step_phases=flat_phases(0.6), dtype="float32")
    assert s.steps_measured == 2 and s.seconds_per_step == 2.0 and s.startup_s == 20.0
    assert s.completions_per_s == 8.0 and s.tokens_per_s == 55.0
    # 220 / 32 = 6.875 tokens a completion: 4.125 GFLOP a step, 0.04125 s at 100 GFLOP/s.
    assert s.mean_completion_tokens == 6.875 and s.floor_s_per_step == pytest.approx(0.04125)
    assert s.share_of_floor == pytest.approx(0.04125 / 2.0)
    assert s.vs_trl == 1.0  # no TRL run given: this is TRL's
    bf16 = throughput(run, 0, warmup=1, batch_size=16, step_phases=flat_phases(0.6), dtype="bfloat16")
    assert bf16.floor_s_per_step == pytest.approx(0.04125 / 4)  # against bfloat16's peak
    whole = throughput(run, 0, warmup=0, batch_size=16, step_phases=flat_phases(1.0), dtype="float32")
    assert whole.seconds_per_step == pytest.approx(14 / 3)  # from the start of step 1
    last = throughput(run, 0, warmup=5, batch_size=16, step_phases=flat_phases(1.0), dtype="float32")
    assert last.steps_measured == 1  # keeps the last step


def test_startup_spans_are_the_traces_spans_of_no_step_by_when_they_began(tmp_path):
    from common.spans import Span, Trace
    from deploy.bench.runs import StartupSpan, startup_spans

    trace = Trace(tmp_path / "trace.json")
    trace.add([Span("start ray", "driver", 100.0, 2.0), Span("start engine", "rollout worker 0", 101.5, 9.0),
               Span("train", "learner", 112.0, 1.0, 1), Span("load model", "learner", 101.0, 3.0)])
    trace.write()
    assert startup_spans(tmp_path / "trace.json") == [
        StartupSpan("driver", "start ray", 0.0, 2.0), StartupSpan("learner", "load model", 1.0, 3.0),
        StartupSpan("rollout worker 0", "start engine", 1.5, 9.0)]


def test_first_reaching_counts_from_the_run_and_from_step_one():
    run = record(10.0, [12.0, 14.0], rewards=[0.5, 0.95])
    hit = first_reaching(run, 0.9, policy_lag=0)
    assert (hit.step, hit.seconds_incl_startup, hit.seconds_excl_startup) == (2, 14.0, 4.0)
    assert hit.reached and hit.vs_trl_incl_startup is None  # no TRL run to compare with
    miss = first_reaching(run, 0.99, policy_lag=0)
    assert not miss.reached and miss.best_reward == 0.95 and miss.steps_run == 2
    # TRL: reached at 28 s, 20 s after its first step started: ours is 14/28 and 4/20 of that.
    trl = first_reaching(record(8.0, [18.0, 28.0], rewards=[0.1, 0.9]), 0.9, policy_lag=None)
    ours = first_reaching(run, 0.9, policy_lag=1, trl=trl)
    assert (ours.vs_trl_incl_startup, ours.vs_trl_excl_startup) == (0.5, 0.2)
    assert first_reaching(run, 0.99, policy_lag=1, trl=trl).vs_trl_incl_startup is None
    assert (ours.label, trl.label) == ("ours, 1 step async", "TRL GRPOTrainer")


def test_a_run_with_compiled_engines_is_named_apart_from_the_default():
    from deploy.bench.runs import RunOf

    runs = [RunOf(0), RunOf(0, compiled=True), RunOf(1, weight_update="in_flight", compiled=True)]
    assert [r.mode for r in runs] == ["sync", "sync_compiled", "in_flight_compiled"]
    assert [r.label for r in runs] == ["ours, synchronous", "ours, synchronous, engines compiled",
                                       "ours, in flight, 1 step, engines compiled"]


# --- the report, from hand-made results ------------------------------------------------------

MACHINE = Machine(cpu="Test CPU", cores=2, ram_gib=8.0, python="3.11",
                  versions={"torch": "2", "vllm": "0", "trl": "1", "ray": "2"},
                  flags=["avx512_f", "avx512_bf16"])
TINY = ModelShape(name="tiny", layers=2, hidden=128, heads=2, ffn=512, vocab=50304,
                  tied_embeddings=False, params=13_271_040)


def gen_side(tokens_per_s: float, fraction: float) -> GenerationSide:
    return GenerationSide(seconds=1.0, tokens=int(tokens_per_s), completions=16,
                          tokens_per_s=tokens_per_s, completions_per_s=tokens_per_s / 64,
                          model_gflops=fraction * 100.0, fraction_of_peak=fraction, dtype="float32")


def gen_batch(completions: int, ours: float, engine: float, hf: float,
              fractions: tuple[float, float, float]) -> GenerationBatch:
    # Prefill: 1 GFLOP, 0.5 GB: 0.05 s at 10 GB/s, in 0.1 s. Decode: 0.4 s of 4 GB, in 0.9 s.
    # The call's floor is 0.45 s: 45% of the worker's 1 s.
    phases = [roofline.phase("prefill", "float32", 0.1, 1.0, 0.5, PEAK),
              roofline.phase("decode", "float32", 0.9, 5.0, 4.0, PEAK)]
    return GenerationBatch(completions=completions, prompts=completions // 8, mean_prompt_tokens=20.0,
                           ours=gen_side(ours, fractions[0]), ours_engine=gen_side(engine, fractions[1]),
                           hf_generate=gen_side(hf, fractions[2]), phases=phases, floor_s=0.45,
                           share_of_floor=0.45)


def variant(seconds: float, collectives: int, memcpy_s: float) -> WeightSyncVariant:
    return WeightSyncVariant(seconds=seconds, collectives=collectives, learner_s=seconds / 10,
                             engine_s=seconds / 2, vs_memcpy=seconds / memcpy_s)


def results() -> BenchResults:
    # End to end, each run 3 steps of 16 completions, the first left out: 32 completions in the
    # last two steps. Ours synchronous: 4 s for them, 8/s; one step async: 1 s, 32/s; TRL in
    # float32: 20 s, 1.6/s, faster than its bf16 run (30 s): the anchor. So ours is 5x TRL
    # synchronous and 20x async (target 2.5x met). A step is 40 GFLOP (6.25 tokens a completion,
    # 6.4 GFLOP a token, no bytes), 0.4 s at float32's 100 GFLOP/s: 20% of the floor at 2 s a
    # step, 80% at 0.5 s; 0.1 s at bfloat16's 400.
    def e2e_run(lag, run, trl=None, dtype="float32"):
        return throughput(run, lag, warmup=1, batch_size=16, step_phases=flat_phases(6.4),
                          dtype=dtype, trl=trl)

    trl = e2e_run(None, record(10.0, [20.0, 30.0, 40.0]))
    trl_bf16 = e2e_run(None, record(10.0, [25.0, 40.0, 55.0]), dtype="bfloat16")
    e2e = EndToEndResult(model=PYTHIA_70M, config={"batch": 16}, mean_prompt_tokens=20.0,
                         trl=trl, trl_others=[trl_bf16],
                         ours=[e2e_run(0, record(20.0, [30.0, 32.0, 34.0]), trl),
                               e2e_run(1, record(20.0, [30.0, 30.5, 31.0]), trl)])
    # Time to reward 0.9: TRL at 70 s (step 3, 30 s of startup); ours synchronous at 7 s
    # (step 2, 5 s of startup), 0.1x incl. startup (target 0.2x met) and 2/40 = 0.05x excl.
    ttr_trl = first_reaching(record(30.0, [50.0, 60.0, 70.0], rewards=[0.1, 0.5, 0.9]), 0.9,
                             policy_lag=None)
    ttr = TimeToRewardResult(model=TINY, config={"batch": 32}, threshold=0.9, trl=ttr_trl, ours=[
        first_reaching(record(5.0, [6.0, 7.0], rewards=[0.2, 0.95]), 0.9, 0, ttr_trl),
        first_reaching(record(4.0, [6.0, 8.0, 9.0], rewards=[0.2, 0.5, 0.4]), 0.9, 1, ttr_trl)])
    generation = GenerationResult(model=PYTHIA_70M, config={"G": 8}, batches=[
        gen_batch(16, 600.0, 610.0, 200.0, (0.9, 0.91, 0.3)),
        gen_batch(128, 900.0, 910.0, 450.0, (0.45, 0.46, 0.2))])
    sync = WeightSyncResult(config={}, presets={
        "tiny": WeightSyncPreset(model=TINY, bytes=53_000_000, memcpy_s=0.005, memcpy_threads=2,
                                 shm=variant(0.012, 1, 0.005), broadcast=variant(0.1, 1, 0.005),
                                 per_tensor=variant(0.3, 28, 0.005)),
        "pythia-410m-shape": Failed("RuntimeError: no room"),
        "pythia-70m-shape": WeightSyncPreset(
            model=PYTHIA_70M, bytes=282_000_000, memcpy_s=0.02, memcpy_threads=2,
            shm=variant(0.16, 2, 0.02), broadcast=variant(0.45, 2, 0.02),
            per_tensor=variant(0.44, 76, 0.02))})

    def workers(n, threads, tokens_per_s):
        return WorkersThroughput(workers=n, cpus_each=1, threads_each=threads, seconds=10.0,
                                 tokens=int(10 * tokens_per_s), tokens_per_s=tokens_per_s,
                                 completions_per_s=tokens_per_s / 64)

    scaling = ScalingResult(model=PYTHIA_70M, config={}, completions=128,
                            one=workers(1, 1, 400.0), two=workers(2, 1, 720.0),
                            oversubscribed=workers(2, 2, 300.0))
    peak = PEAK
    return BenchResults(
        machine=MACHINE, command="python -m deploy.bench", started="now",
        settings={"smoke": False}, section_s={"peak": 1.0},
        sections=dict(peak=peak, scaling=scaling, generation=generation, weight_sync=sync,
                      e2e=e2e, time_to_reward=ttr))


def rows(md: str, heading: str) -> list[str]:
    """The table rows (header and separator left out) of the section under `heading`."""
    section = md.split(f"\n## {heading}", 1)[1].split("\n## ", 1)[0]
    return [line for line in section.splitlines() if line.startswith("| ")][1:]


def test_report_targets_say_what_was_met():
    assert rows(report.markdown(results()), "Targets") == [  # in the sections' order
        "| generation at 16 completions: share of its roofline floor | >= 50% | 45% | **no** |",
        "| weight sync tiny: best transport vs memcpy | <= 3x | 2.4x | yes |",
        "| weight sync pythia-70m-shape: best transport vs memcpy | <= 3x | 8.0x | **no** |",
        "| end to end sync: completions/s vs TRL's faster | >= 2.5x | 5.0x | yes |",
        "| end to end sync: share of the step's roofline floor | >= 50% | 20% | **no** |",
        "| end to end async: completions/s vs TRL's faster | >= 2.5x | 20.0x | yes |",
        "| end to end async: share of the step's roofline floor | >= 50% | 80% | yes |",
        "| time to reward 0.9: sync vs TRL's faster (incl. startup) | <= 0.5x | 0.10x | yes |",
        "| startup: sync vs TRL's faster | <= 30.0 s | 5.0 s | yes |",
    ]


def test_report_tables_put_each_number_in_its_row():
    md = report.markdown(results())
    assert "*Machine*: Test CPU (avx512_f, avx512_bf16), 2 cores, 8.0 GiB RAM; torch 2, vllm 0, " \
           "trl 1, ray 2." in md
    assert "- float32 matmul: **100 GFLOP/s** (n=2048: 100)" in md
    assert "- bfloat16 matmul: **400 GFLOP/s** (n=2048: 400)" in md
    assert "- memory bandwidth (copy, read + write): **10.0 GB/s**" in md
    assert rows(md, "End to end")[:4] == [
        "| ours, synchronous | float32 | 2.00 | 8.00 | 50.00 | 0.40 | 20% | 20.00 | 2 | 5.0x |",
        "| ours, 1 step async | float32 | 0.50 | 32.00 | 200.00 | 0.40 | 80% | 20.00 | 2 | 20.0x |",
        "| TRL GRPOTrainer | float32 | 10.00 | 1.60 | 10.00 | 0.40 | 4% | 10.00 | 2 | 1.0x |",
        "| TRL GRPOTrainer, bf16=True | bfloat16 | 15.00 | 1.07 | 6.67 | 0.10 | 1% | 10.00 | 2 |  |",
    ]
    assert "*Model*: pythia-70m-shape (6 layers x 512, 70M params). *Config*: batch 16." in md
    assert "TRL's faster configuration here: TRL GRPOTrainer (the anchor of every ratio)." in md
    assert rows(md, "Time to reward") == [
        "| ours, synchronous | 2 | 7.00 | 2.00 | 5.00 | 0.10x / 0.05x |",
        "| ours, 1 step async | not in 3 steps (best 0.500) | - | - | 4.00 | - |",
        "| TRL GRPOTrainer | 3 | 70.00 | 40.00 | 30.00 | - |",
    ]
    generation = rows(md, "Generation")
    assert generation[3:6] == [
        "| 128 | ours (rollout worker) | 900.00 | 14.06 | 45% | 45% | 2.0x |",
        "| 128 | ours, engine only | 910.00 |  | 46% | 45% |  |",
        "| 128 | HF generate (TRL's path) | 450.00 | 7.03 | 20% |  | 1.0x |",
    ]
    assert "| 16 | prefill | float32 | 0.100 | 1.0 | 0.50 | 0.050 | memory | 50% |" in generation
    assert "| 128 | decode | float32 | 0.900 | 5.0 | 4.00 | 0.400 | memory | 44% |" in generation
    assert rows(md, "Weight sync") == [
        "| tiny | 53 | 0.0050 | 0.012 (0.001 + 0.006) | 2.4x | 0.100 in 1 (20.0x) "
        "| 0.300 in 28 (60.0x) |",
        "| pythia-410m-shape | - | - | - | - | failed: RuntimeError: no room | - |",
        "| pythia-70m-shape | 282 | 0.0200 | 0.160 (0.016 + 0.080) | 8.0x | 0.450 in 2 (22.5x) "
        "| 0.440 in 76 (22.0x) |",
    ]
    assert rows(md, "Scaling") == [
        "| 1 | 1 (1) | 400.00 | 6.25 | 1.00x |",
        "| 2 | 1 (1) | 720.00 | 11.25 | 1.80x (90% of linear) |",
        "| 2 | 1 (2 threads: every core) | 300.00 | 4.69 | 0.75x |",
    ]


def test_report_marks_a_failed_section_and_leaves_out_what_did_not_run():
    r = results()
    r.sections["e2e"] = Failed("RuntimeError: TRL baseline exited 1")
    r.sections["time_to_reward"] = None
    md = report.markdown(r)
    assert "## End to end: a GRPO step, ours vs TRL's GRPOTrainer\n\n**Failed**: " \
           "`RuntimeError: TRL baseline exited 1`" in md
    assert "## Time to reward" not in md
    assert not [row for row in rows(md, "Targets") if "end to end" in row or "time to" in row]


def test_report_writes_json_and_png(tmp_path):
    import matplotlib.image

    report.write(tmp_path, results())
    written = json.loads((tmp_path / "bench.json").read_text())
    s = written["sections"]
    assert s["peak"]["gflops_by_dtype"]["bfloat16"] == 400.0 and written["section_s"] == {"peak": 1.0}
    assert [(run["policy_lag"], run["vs_trl"]) for run in s["e2e"]["ours"]] == [(0, 5.0),
                                                                               (1, 20.0)]
    assert s["e2e"]["trl"]["policy_lag"] is None and s["e2e"]["trl"]["completions_per_s"] == 1.6
    assert s["time_to_reward"]["ours"][1]["step"] is None
    assert s["weight_sync"]["presets"]["pythia-410m-shape"] == {"error": "RuntimeError: no room"}
    assert s["scaling"]["speedup"] == 1.8 and s["generation"]["batches"][1]["completions"] == 128

    # Five charts, two a row, each 7 x 4.2 inches at 110 dpi; the sixth place is left empty.
    image = matplotlib.image.imread(tmp_path / "bench.png")[..., :3]
    assert image.shape == (3 * 462, 2 * 770, 3)
    ink = (image < 0.95).any(axis=2)
    blue = (np.abs(image - np.array([0x1F, 0x77, 0xB4]) / 255).max(axis=2) < 0.02)  # C0 bars
    # The inside of each place (a panel's frame may cross its border by a pixel or two).
    cells = [(slice(r * 462 + 20, (r + 1) * 462 - 20), slice(c * 770 + 20, (c + 1) * 770 - 20))
             for r in range(3) for c in range(2)]
    for cell in cells[:5]:
        assert ink[cell].mean() > 0.05 and blue[cell].mean() > 0.005
    assert ink[cells[5]].mean() < 0.001


def test_a_modes_run_is_summed_up_over_its_steady_steps():
    from deploy.bench.modes import summarize

    phases = [dict(step_s=s, train_s=t, sync_s=0.1, engine_busy=b, learner_busy=1 - b,
                   token_lag_mean=lag, mixed_version_frac=mixed)
              for s, t, b, lag, mixed in ((9.0, 1.0, 0.5, 0.0, 0.0), (2.0, 1.0, 0.5, 1.0, 0.25),
                                          (4.0, 3.0, 0.25, 0.5, 0.75))]
    run = RunRecord(run_dir="r", first_step_start_s=10.0, steps=[
        Step(step=i + 1, elapsed_s=end, reward=reward, tokens=64, metrics=p)
        for i, (end, reward, p) in enumerate(zip((19.0, 21.0, 25.0), (0.1, 0.6, 0.7), phases))])
    m = summarize("in flight", 1, "in_flight", run, warmup=1, batch_size=16)
    # Steps 2 and 3: 6 s from the end of step 1, 32 completions of 4 tokens each.
    assert (m.steps_measured, m.seconds_per_step, m.completions_per_s) == (2, 3.0, 32 / 6)
    assert m.mean_completion_tokens == 4.0
    assert m.engine_busy == 0.375 and m.learner_busy == 0.625 and m.train_s == 2.0
    assert m.generate_s == (0.5 * 2.0 + 0.25 * 4.0) / 2  # engine-seconds per step
    assert (m.token_lag_mean, m.mixed_version_frac) == (0.75, 0.5)


def test_each_section_has_its_own_options_and_a_smoke_variant():
    from deploy.bench.__main__ import parse
    from deploy.bench.sections import SECTIONS

    args, chosen = parse(["--only", "e2e,scaling", "--e2e.steps", "3", "--weight-sync.repeats", "5"])
    assert chosen == ["peak", "scaling", "e2e"]  # the table's order; e2e needs the peak
    assert (args.e2e.steps, args.weight_sync.repeats, args.e2e.trl_steps) == (3, 5, 4)
    smoke, _ = parse(["--smoke", "--out", "/tmp/x"])
    assert (smoke.threads, smoke.group_size, smoke.out) == (1, 4, "/tmp/x")
    assert all(vars(smoke)[name] == s.settings.smoke() for name, s in SECTIONS.items())
    with pytest.raises(SystemExit, match="unknown section"):
        parse(["--only", "e2e,speed"])


def test_the_smokes_end_to_end_and_time_to_reward_are_one_run():
    """The Runner runs a configuration once: the smoke's two sections must ask for the same."""
    from common.config import to_dict
    from deploy.bench.__main__ import parse
    from deploy.bench.harness import Harness

    args, _ = parse(["--smoke"])
    harness = Harness(args, results())
    e, t = args.e2e, args.time_to_reward
    ours = [harness.config(model=s.preset, batch=s.batch, tokens=s.tokens, lr=s.lr, steps=s.steps)
            for s in (e, t)]
    assert to_dict(ours[0]) == to_dict(ours[1]) and ours[0].rollout.weight_update == "between_rounds"
    assert (e.lags, e.trl_steps) == (t.lags, t.trl_steps) and not t.in_flight
    assert not e.compiled_lags  # a compiled run would be a second one


def test_the_learners_gpu_bench_runs_without_ray_vllm_or_the_cli_libraries(tmp_path):
    """The lent GPU has torch and transformers but no Ray, no vLLM, no msgspec or tyro: the
    learner and its bench must import and run without them (here on the CPU, --smoke)."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[3]
    probe = ("import sys\n"
             "for name in ('ray', 'vllm', 'msgspec', 'tyro'): sys.modules[name] = None\n"
             "from deploy.bench import learner_gpu\n"
             f"sys.exit(learner_gpu.main(['--smoke', '--out', {str(tmp_path)!r}]))\n")
    proc = subprocess.run([sys.executable, "-c", probe], cwd=root, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads((tmp_path / "learner_gpu.json").read_text())
    assert [(s["model"], s["dtype"], s["lora_rank"]) for s in out["steps"]] == [
        ("tiny", "bfloat16", 16), ("tiny", "bfloat16", 0), ("tiny", "float16", 0)]
    assert all(s["seconds_per_step"] > 0 and 0 < s["mfu"] for s in out["steps"])
    assert out["steps"][2]["loss_scale"] > 0 and out["checkpoint_bit_for_bit"] is True
    assert out["broadcast"]["aborted"] is True and out["broadcast"]["abort_s"] < 1


def test_a_steps_phases_read_an_async_step_without_generation_as_unmeasured():
    """metrics.jsonl leaves out a NaN: a step whose rounds were generated before it has no
    gen_tokens_per_s, and its phases must still be read (the e2e section failed on it)."""
    import math

    from deploy.bench.end_to_end import phases_of

    phases = phases_of(PYTHIA_70M, PEAK, 2, 8, 30.0, 1)
    steps = [Step(1, 10.0, 0.0, 64, {"train_s": 2.0, "step_s": 3.0})]
    gen, learner, rest = phases("bfloat16", 4.0, steps)
    assert math.isnan(gen.measured_s) and gen.floor_s > 0 and learner.measured_s == 2.0
    measured = [Step(1, 10.0, 0.0, 64, {"train_s": 2.0, "step_s": 3.0, "gen_tokens_per_s": 64.0})]
    assert phases("bfloat16", 4.0, measured)[0].measured_s == 1.0
