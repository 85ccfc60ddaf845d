"""What goes wrong on a cluster, done for real: a rollout worker's process killed mid-run, the
learner killed, the driver killed; and bad input, each ending in one line and a non-zero exit
(or a counted skip), never a hang or a traceback wall."""

from __future__ import annotations

import glob
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from common.weight_sync import SHARED_WEIGHTS
from tests.integration.conftest import RUN_DTYPE

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
TIMEOUT = 900
OVERLONG = 2


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory) -> Path:
    """40 short prompts and two that are longer than data.max_prompt_tokens (skipped, counted)."""
    path = tmp_path_factory.mktemp("data") / "prompts.jsonl"
    rows = [{"question": f"What is the nicest thing about the number {i}?"} for i in range(40)]
    rows += [{"question": "Tell me everything about " + "the sea and the sky " * 60}] * OVERLONG
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def args(run_dir: Path, prompts_file: Path, steps: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "deploy.train", "--run-dir", str(run_dir), "--steps", str(steps),
            "--data.dataset", str(prompts_file), "--data.prompt-column", "question",
            "--data.eval-split", "", "--grpo.group-size", "4", "--grpo.batch-size", "16",
            "--learner.checkpoint-every", "2", "--rollout.kv-cache-gib", "0.5",
            "--logging.progress", "lines", *extra]


def start(cmd: list[str]) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT)


def run_ids(run_dir: Path) -> list[str]:
    """The ids of the runs (each invocation is one) whose driver logged into `run_dir`."""
    return re.findall(r"run id (\w+)", (run_dir / "logs" / "driver.log").read_text())


def left_outside(run_id: str) -> list[str]:
    """What run `run_id` keeps outside its run directory: its weights in shared memory, its
    engines' temporary directories (another run on the machine has its own)."""
    return glob.glob(SHARED_WEIGHTS.format(run_id)) + glob.glob(f"{tempfile.gettempdir()}/grpo-ray-engine-{run_id}-*")


def steps_logged(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line)["step"] for line in path.read_text().splitlines()] if path.exists() else []


def wait_for_step(proc: subprocess.Popen, run_dir: Path, step: int) -> None:
    deadline = time.monotonic() + TIMEOUT
    while max(steps_logged(run_dir), default=0) < step:
        assert proc.poll() is None, f"the run ended early:\n{proc.stderr.read()[-3000:]}"
        assert time.monotonic() < deadline, f"no step {step} after {TIMEOUT} s"
        time.sleep(0.5)


def actor_processes(proc: subprocess.Popen, title: str) -> list[psutil.Process]:
    """The run's Ray actor processes whose title starts with `title` (e.g. ray::Learner)."""
    found = []
    for child in psutil.Process(proc.pid).children(recursive=True):
        try:
            if " ".join(child.cmdline()).startswith(title):
                found.append(child)
        except psutil.NoSuchProcess:
            pass
    return found


def finish(proc: subprocess.Popen) -> tuple[int, str]:
    try:
        _, err = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("the run hung")
    return proc.returncode, err


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def one_line_error(stderr: str, code: str) -> str:
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if line.startswith(code)]
    assert lines, stderr[-3000:]
    return lines[-1]


SYNC_TIMEOUT_S = 3  # below an engine's start (~20 s here): the group must wait for readiness


def test_a_local_runs_actors_are_not_starved_by_other_work_on_the_machine():
    """The actors do all of a run's work: they run at the driver's priority (Ray's default,
    niceness 15, gave them 4% of the CPU beside one busy process per core)."""
    probe = ("import os, ray; from common.config import Config; from deploy.launch import init_ray; "
             "init_ray(Config()); print(ray.get(ray.remote(num_cpus=0)(lambda: os.nice(0)).remote()), "
             "os.nice(0))")
    proc = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env={k: v for k, v in os.environ.items() if not k.startswith("RAY_")})
    assert proc.returncode == 0, proc.stderr[-2000:]
    actor, driver = proc.stdout.split()
    assert actor == driver


@pytest.mark.parametrize("transport, workers, weight_update, task, reward_model", [
    # killed while generating its share; and the reward model's actor killed too
    ("shm", 1, "between_rounds", "stream", True),
    ("broadcast", 2, "in_flight", "receive_weights", False),  # killed in the middle of a broadcast
])
def test_a_killed_rollout_worker_is_restarted_and_training_completes(tmp_path, prompts_file,
                                                                     transport, workers,
                                                                     weight_update, task,
                                                                     reward_model, reward_model_dir):
    run_dir = tmp_path / "run"
    model = f"model:{reward_model_dir}"
    rewards = ("explicit_pos", "length", *([model] if reward_model else []))
    weights = ("1.0", "0.5", "0.25")[:len(rewards)]
    proc = start(args(run_dir, prompts_file, 8, "--cluster.weight-sync", transport,
                      "--rollout.num-workers", str(workers), "--buffer.max-policy-lag", "1",
                      "--rollout.weight-update", weight_update,
                      "--cluster.weight-sync-timeout-s", str(SYNC_TIMEOUT_S),
                      "--cluster.call-timeout-s", "600", "--cluster.sync-bucket-mb", "1",
                      "--rollout.rewards", *rewards, "--rollout.reward-weights", *weights))
    wait_for_step(proc, run_dir, 2)
    assert len(actor_processes(proc, "ray::RolloutWorker")) == workers
    deadline = time.monotonic() + TIMEOUT
    while not (busy := actor_processes(proc, f"ray::RolloutWorker.{task}")):  # Ray titles the task
        assert time.monotonic() < deadline and proc.poll() is None, f"never saw {task}"
        time.sleep(0.005)
    busy[0].kill()  # SIGKILL
    if reward_model:
        [scorer] = actor_processes(proc, "ray::RewardModel")
        scorer.kill()
    killed_at, steps_then = time.monotonic(), max(steps_logged(run_dir), default=0)
    wait_for_step(proc, run_dir, steps_then + 1)
    recovered_s = time.monotonic() - killed_at
    if reward_model:  # Ray restarted it, and the step after the kill was scored by it
        assert [p.pid for p in actor_processes(proc, "ray::RewardModel")] not in ([], [scorer.pid])
    code, err = finish(proc)
    assert code == 0, err[-3000:]
    # Within the weight-sync timeout and an engine's restart, not cluster.call_timeout_s (600 s).
    assert recovered_s < SYNC_TIMEOUT_S + 120, recovered_s
    history = metrics(run_dir)
    assert [m["step"] for m in history] == list(range(1, 9))
    last = history[-1]
    assert last["worker_restarts"] == 1
    if task == "stream":
        assert last["lost_groups"] >= 1  # counted, and generated again
    assert last["buffer_consumed"] == 8 * 4
    assert last["buffer_produced"] == (last["buffer_consumed"] + last["buffer_dropped_stale"]
                                       + last["buffer_dropped_zero_std"] + last["buffer_size"])
    assert last["overlong_prompts"] == OVERLONG
    assert (run_dir / "final" / "model.safetensors").is_file()
    for m in history:  # the rewards, weighted 1.0, 0.5 (and 0.25), reach the learner as their sum
        assert m["reward"] == pytest.approx(m["reward/explicit_pos"] + 0.5 * m["reward/length"]
                                            + (0.25 * m[f"reward/{model}"] if reward_model else 0), abs=1e-6)
    assert any(m["reward/length"] > 0 for m in history)


def test_a_killed_learner_ends_the_run_with_one_line_and_resume_completes_it(tmp_path, prompts_file):
    run_dir = tmp_path / "run"
    in_flight = ("--buffer.max-policy-lag", "1", "--rollout.weight-update", "in_flight")
    proc = start(args(run_dir, prompts_file, 8, *in_flight))
    wait_for_step(proc, run_dir, 3)
    [run_id] = run_ids(run_dir)
    weights, engine_dir = sorted(left_outside(run_id), key=lambda path: "engine" in path)
    assert weights == SHARED_WEIGHTS.format(run_id)  # the precondition: its weights in shared memory,
    assert glob.glob(f"{engine_dir}/vllm_dist_*")  # and vLLM's file in its engine's directory
    actor_processes(proc, "ray::Learner")[0].kill()
    code, err = finish(proc)
    assert code == 1
    line = one_line_error(err, "error:")
    assert "the learner died" in line and "--resume" in line
    assert left_outside(run_id) == []  # no model-sized file left in RAM, nothing in /tmp

    resumed = run(args(run_dir, prompts_file, 8, *in_flight, "--resume"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert steps_logged(run_dir) == list(range(1, 9))  # no step lost, none repeated
    assert [left_outside(i) for i in run_ids(run_dir)] == [[], []]


def test_a_killed_driver_takes_its_cluster_down_and_resume_completes_the_run(tmp_path, prompts_file):
    run_dir = tmp_path / "run"
    proc = start(args(run_dir, prompts_file, 8))
    wait_for_step(proc, run_dir, 3)
    cluster = [p for p in psutil.Process(proc.pid).children(recursive=True)
               if p.name() in ("raylet", "gcs_server") or "ray::" in " ".join(p.cmdline())
               and "Agent" not in " ".join(p.cmdline())]
    proc.kill()
    proc.wait()
    _, alive = psutil.wait_procs(cluster, timeout=60)
    assert not alive, f"left running after the driver died: {[p.name() for p in alive]}"

    [killed] = run_ids(run_dir)
    assert len(left_outside(killed)) == 2  # its weights and its engine's directory are left

    resumed = run(args(run_dir, prompts_file, 8, "--resume"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert steps_logged(run_dir) == list(range(1, 9))
    assert [left_outside(i) for i in run_ids(run_dir)] == [[], []]  # the resumed run removed them, and its own
    assert not list((run_dir / "checkpoints").glob("*.tmp"))
    # No eval split here: said, and left out of metrics.jsonl (a NaN there is not JSON).
    assert "eval-split reward: no eval split" in resumed.stderr
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        assert "eval_reward" not in json.loads(line, parse_constant=lambda c: pytest.fail(f"{c}: {line}"))


def test_a_reward_that_raises_stops_the_run_with_one_line(tmp_path, prompts_file):
    proc = run(args(tmp_path / "run", prompts_file, 4, "--rollout.rewards",
                    "tests.integration.faulty_rewards:raises_on_third"))
    assert proc.returncode == 1
    line = one_line_error(proc.stderr, "error:")
    assert "reward `tests.integration.faulty_rewards:raises_on_third`" in line and "sample" in line


def test_a_reward_that_returns_nan_stops_the_run_with_one_line(tmp_path, prompts_file):
    proc = run(args(tmp_path / "run", prompts_file, 4, "--rollout.rewards", "explicit_pos",
                    "tests.integration.faulty_rewards:nan_on_second"))
    assert proc.returncode == 1
    line = one_line_error(proc.stderr, "error:")
    assert "nan_on_second" in line and "sample 1" in line


def test_a_weight_sync_that_delivers_other_weights_stops_the_run_with_one_line(tmp_path, prompts_file):
    """One tensor arrives corrupted from weight sync 2 on (tests/integration/corrupting_reward.py):
    the probe set scored right after that sync must stop the run before it trains on it."""
    run_dir = tmp_path / "run"
    proc = run(args(run_dir, prompts_file, 4, "--rollout.rewards",
                    "tests.integration.corrupting_reward:reward"))
    assert proc.returncode == 1
    line = one_line_error(proc.stderr, "error:")
    assert line.startswith("error: after weight sync 2, rollout worker 0 scores the probe set ")
    assert f"over the {RUN_DTYPE} tolerance " in line and "do not hold the learner's weights" in line
    assert steps_logged(run_dir) == [1]  # step 2's update was made, never trained on


def test_a_busy_weight_sync_port_is_one_line(tmp_path, prompts_file):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = run(args(tmp_path / "run", prompts_file, 2, "--cluster.weight-sync", "broadcast",
                        "--cluster.weight-sync-port", str(port)))
    assert proc.returncode == 1
    assert f"cluster.weight_sync_port {port} cannot be bound" in one_line_error(proc.stderr, "error:")


def test_every_wait_has_a_timeout_that_names_what_it_waited_for(tmp_path, prompts_file):
    # 1 s: the engines are ready about 3 s after the driver, its prompts loaded, starts waiting.
    proc = run(args(tmp_path / "run", prompts_file, 2, "--cluster.call-timeout-s", "1"))
    assert proc.returncode == 1
    assert "waited 1 s for" in one_line_error(proc.stderr, "error:")


@pytest.mark.parametrize("extra, expected", [
    (["--grpo.group-size", "1"], "grpo.group_size must be >= 2"),
    (["--grpo.batch-size", "18"], "grpo.batch_size (18) must be a multiple of grpo.group_size (4)"),
    (["--learner.learning-rate", "-1"], "learner.learning_rate must be > 0"),
    (["--rollout.rewards", "happiness"], "unknown reward `happiness`"),
    (["--model.name", "no-such-model"], "unknown model `no-such-model`"),
    (["--rollout.reward-weights", "1", "2"], "rollout.reward_weights has 2 weights for 1 reward functions"),
])
def test_bad_config_values_are_one_line_each(tmp_path, prompts_file, extra, expected):
    proc = run(args(tmp_path / "run", prompts_file, 2, *extra))
    assert proc.returncode == 2
    assert expected in one_line_error(proc.stderr, "config error:")


def test_a_plan_this_machine_cannot_hold_is_refused_before_anything_starts(tmp_path, prompts_file):
    """More engines than cores (64 on a 2-core machine, say): Ray would start what fits and wait for the rest, silently
    and for ever. The run says so at once, naming the fields, and makes no run directory: its output is these two
    lines and nothing else (no Ray, no actor started; not timed, since a loaded machine starts Python slowly)."""
    cores = os.cpu_count()
    proc = run(args(tmp_path / "run", prompts_file, 2, "--rollout.num-workers", str(cores + 1),
                    "--rollout.kv-cache-gib", "65536"))
    assert proc.returncode == 2
    assert [line for line in proc.stderr.splitlines() if line.strip()] == [
        f"config error: rollout.num_workers ({cores + 1}) x rollout.num_cpus (1) asks {cores + 1} CPUs "
        f"for the engines; this machine has {cores}",
        f"config error: rollout.num_workers ({cores + 1}) x rollout.kv_cache_gib (65536) asks "
        f"{(cores + 1) * 65536} GiB for the engines' KV caches; this machine has "
        f"{psutil.virtual_memory().total / 2**30:.0f} GiB"]
    assert not (tmp_path / "run").exists()


def test_bad_data_is_one_line(tmp_path, prompts_file):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    proc = run(args(tmp_path / "a", empty, 2))
    assert proc.returncode == 1 and "is empty" in one_line_error(proc.stderr, "error:")

    proc = run(args(tmp_path / "b", prompts_file, 2, "--data.prompt-column", "prompt"))
    assert proc.returncode == 1
    line = one_line_error(proc.stderr, "error:")
    assert "`prompt`" in line and "question" in line  # names the columns there are

    broken = tmp_path / "broken.jsonl"
    broken.write_text(prompts_file.read_text() + '{"question": "unfinished\n')
    proc = run(args(tmp_path / "c", broken, 2))
    assert proc.returncode == 1
    assert one_line_error(proc.stderr, "error:").startswith(f"error: `{broken}` line 43 is not JSON (")
    assert [line for line in proc.stderr.splitlines() if "grpo-ray:" not in line] == \
        [one_line_error(proc.stderr, "error:")]  # no library's lines beside it


def test_missing_or_damaged_checkpoints_are_one_line(tmp_path, prompts_file):
    proc = run(args(tmp_path / "none", prompts_file, 2, "--resume"))
    assert proc.returncode == 1 and "no checkpoint to resume from" in one_line_error(proc.stderr, "error:")

    run_dir = tmp_path / "run"
    first = run(args(run_dir, prompts_file, 4, "--stop-after", "2"))
    assert first.returncode == 0, first.stderr[-3000:]
    weights = run_dir / "checkpoints" / "step_000002" / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # a torn write
    proc = run(args(run_dir, prompts_file, 4, "--resume"))
    assert proc.returncode == 1
    assert "step_000002 is damaged: model.safetensors" in one_line_error(proc.stderr, "error:")


@pytest.fixture
def immutable(tmp_path):
    """A directory nothing can be written in, not even by root (chattr +i)."""
    directory = tmp_path / "locked"
    directory.mkdir()
    if subprocess.run(["chattr", "+i", str(directory)], capture_output=True).returncode != 0:
        pytest.skip("this file system cannot make a directory immutable (chattr +i)")
    yield directory
    subprocess.run(["chattr", "-i", str(directory)], check=True)


def test_a_run_dir_that_cannot_be_written_is_one_line(tmp_path, prompts_file, immutable):
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    proc = run(args(a_file, prompts_file, 2))
    assert proc.returncode == 1
    assert one_line_error(proc.stderr, "error:") == f"error: --run-dir {a_file} is a file, not a directory"
    proc = run(args(immutable / "run", prompts_file, 2))
    assert proc.returncode == 1
    assert one_line_error(proc.stderr, "error:") == \
        f"error: cannot write {immutable / 'run'}: Operation not permitted"


@pytest.fixture
def small_disk(tmp_path):
    """A 240 MB file system: one checkpoint of the tiny model (about 150 MB) fits, two do not."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=240m", "tmpfs", str(mount)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=True)


def test_a_disk_that_fills_during_the_run_is_one_line_with_a_resume_hint(small_disk, prompts_file):
    run_dir = small_disk / "run"
    proc = run(args(run_dir, prompts_file, 6))  # checkpoints at steps 2 and 4
    assert proc.returncode == 1, proc.stderr[-3000:]
    line = one_line_error(proc.stderr, "error:")
    assert line.startswith(f"error: cannot write {run_dir}/checkpoints/") and "No space left on device" in line
    assert line.endswith(f"; continue from the last checkpoint (step 2) with --resume --run-dir {run_dir}")
    assert steps_logged(run_dir) == [1, 2, 3]  # not step 4, whose checkpoint failed
    assert not list((run_dir / "checkpoints").glob("*.tmp"))  # the half-written one is gone
