"""`ray job submit` against a real two-node Ray cluster started with `ray start` on this machine:
a head node (the learner's) and a second node offering the custom resource `rollout` (the rollout
workers'). A training job must end SUCCEEDED with its workers on the second node and the weights
broadcast across nodes; a bad config must end FAILED with its one-line error in the job log."""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
from subprocess import CompletedProcess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from tests.integration.conftest import engines_had_the_learners_weights

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent  # the venv's `ray` and `python`: the cluster runs from it
MARK = "GRPO_RAY_TEST_CLUSTER"     # in the environment of every process the cluster starts
TRAIN = ["--steps", "3", "--grpo.batch-size", "16", "--grpo.group-size", "4",
         "--data.eval-prompts", "8", "--rollout.kv-cache-gib", "0.5", "--logging.progress", "lines",
         "--learner.checkpoint-every", "0"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LocalCluster:
    gcs: str          # bootstrap address, for `ray start --address` and the state API
    dashboard: str    # job submission address
    env: dict
    mark: str

    def ray(self, *args: str, timeout: float = 120, check: bool = True) -> CompletedProcess:
        proc = subprocess.run([str(BIN / "ray"), *args], env=self.env, cwd=ROOT, text=True,
                              capture_output=True, timeout=timeout)
        if check and proc.returncode != 0:
            pytest.fail(f"ray {' '.join(args)} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
        return proc

    def submit(self, job_id: str, *train_args: str, timeout: float = 600) -> CompletedProcess:
        """`ray job submit` as a user runs it; it follows the job's log until the job ends."""
        try:
            return self.ray("job", "submit", "--address", self.dashboard, "--submission-id", job_id,
                            "--working-dir", str(ROOT), "--runtime-env", "deploy/runtime_env.yaml",
                            "--", "python", "-m", "deploy.train", *train_args,
                            timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            self.ray("job", "stop", "--address", self.dashboard, job_id, check=False)
            log = self.logs(job_id)[-3000:]
            pytest.fail(f"job {job_id} still running after {timeout:.0f} s:\n{log}")

    def status(self, job_id: str) -> str:
        """What `ray job status` says: "Job 'ID' succeeded", or "... failed" and the message."""
        proc = self.ray("job", "status", "--address", self.dashboard, job_id)
        return proc.stdout + proc.stderr

    def logs(self, job_id: str) -> str:
        return self.ray("job", "logs", "--address", self.dashboard, job_id).stdout

    def list(self, kind: str, check: bool = True) -> list[dict]:
        """Ray's state API (`ray list`); with check=False an empty list while it is not up."""
        proc = self.ray("list", kind, "--address", self.gcs, "--format", "json", "--detail",
                        "--limit", "1000", check=check)
        return json.loads(proc.stdout) if proc.returncode == 0 else []

    def processes(self) -> list[psutil.Process]:
        """Every process this cluster started (they all inherit the mark). Read from /proc
        directly: Ray retitles its agents, and psutil then parses their environment as empty."""
        tag = f"{MARK}={self.mark}\0".encode()
        found = []
        for p in psutil.process_iter():
            try:
                if tag in Path(f"/proc/{p.pid}/environ").read_bytes():
                    found.append(p)
            except OSError:  # gone, or not ours to read
                pass
        return found

    def kill(self) -> None:
        """Stop exactly this cluster's processes (`ray stop` stops every Ray on the machine)."""
        procs = self.processes()
        for p in procs:
            try:
                p.terminate()
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(procs, timeout=5)
        for p in alive + self.processes():
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=10)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    temp = tmp_path_factory.mktemp("ray")
    token = temp / "auth_token"
    token.write_text(secrets.token_hex(32))
    gcs_port, dash_port = free_port(), free_port()
    mark = uuid.uuid4().hex
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update({
        "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        # Token authentication with this cluster's own token: Ray turns it on for a head node
        # whenever ~/.ray/auth_token exists, and a worker node must then present the same token.
        "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token),
        "RAY_USAGE_STATS_ENABLED": "0", MARK: mark,
        # Workers at normal priority, as a run's own local Ray: CI machines are shared.
        "RAY_worker_niceness": "0",
        # Where a job without --run-dir writes (the drivers of its jobs inherit it).
        "GRPO_RAY_RUNS": str(temp / "runs"),
    })
    c = LocalCluster(gcs=f"127.0.0.1:{gcs_port}", dashboard=f"http://127.0.0.1:{dash_port}",
                     env=env, mark=mark)
    # Ray registers a node started with a loopback --node-ip-address under this machine's own
    # address (what other nodes could reach); the dashboard and job server stay on 127.0.0.1.
    common = ["--node-ip-address", "127.0.0.1", "--num-cpus", "2", "--num-gpus", "0",
              "--disable-usage-stats"]
    started = time.perf_counter()
    try:
        # Ports Ray would otherwise take at fixed numbers (other Ray instances on this machine
        # may hold them), chosen free here.
        c.ray("start", "--head", "--port", str(gcs_port), "--dashboard-host", "127.0.0.1",
              "--dashboard-port", str(dash_port), "--include-dashboard", "true",
              "--ray-client-server-port", str(free_port()),
              "--dashboard-agent-listen-port", str(free_port()), "--temp-dir", str(temp), *common)
        # The second node in a temporary directory of its own, as on a machine of its own: each
        # node's runtime-env agent unpacks a job's working_dir under its session directory and,
        # the first time it needs it, deletes what is there
        # (ray/_private/runtime_env/working_dir.py, WorkingDirPlugin.create, overwrite=True).
        # Sharing the head's, it once deleted the driver's working directory under it (the
        # driver's `import actors` failed).
        c.ray("start", "--address", c.gcs, "--resources", json.dumps({"rollout": 2}),
              "--dashboard-agent-listen-port", str(free_port()),
              "--temp-dir", str(tmp_path_factory.mktemp("node")), *common)
        deadline = time.monotonic() + 60
        while len([n for n in c.list("nodes", check=False) if n["state"] == "ALIVE"]) < 2:
            assert time.monotonic() < deadline, "the second node never joined"
            time.sleep(1)
        print(f"two-node cluster up in {time.perf_counter() - started:.1f} s")
        yield c
    finally:
        c.kill()
        assert not c.processes(), "processes of the test cluster survived"


def node_roles(c: LocalCluster) -> tuple[str, str]:
    nodes = [n for n in c.list("nodes") if n["state"] == "ALIVE"]
    head = next(n["node_id"] for n in nodes if n["is_head_node"])
    second = next(n["node_id"] for n in nodes if not n["is_head_node"])
    return head, second


def test_bad_config_job_fails_with_one_line_error(cluster, tmp_path):
    job = f"bad-config-{uuid.uuid4().hex[:8]}"
    proc = cluster.submit(job, "--run-dir", str(tmp_path / "run"), "--grpo.group-size", "1",
                          timeout=180)
    assert proc.returncode == 1, proc.stdout[-3000:]  # `ray job submit` exits 1 for a failed job
    status = cluster.status(job)
    assert f"Job '{job}' failed" in status, status
    assert "exit code 2" in status, status
    assert "config error: grpo.group_size must be >= 2" in status, status
    log = cluster.logs(job)
    assert "config error: grpo.group_size must be >= 2" in log, log[-3000:]
    assert "Traceback" not in log, log[-3000:]


def test_submitted_job_trains_with_workers_on_the_second_node(cluster, tmp_path):
    job = f"train-{uuid.uuid4().hex[:8]}"
    started = time.perf_counter()
    # No --run-dir: the job's working directory is deleted with it, so the run must go elsewhere.
    proc = cluster.submit(job, "--rollout.num-workers", "2", "--cluster.rollout-resource", "rollout",
                          *TRAIN)
    print(f"training job ended in {time.perf_counter() - started:.1f} s")
    assert proc.returncode == 0, proc.stdout[-5000:]
    assert f"Job '{job}' succeeded" in cluster.status(job)
    [run_dir] = (Path(cluster.env["GRPO_RAY_RUNS"])).glob(f"*-{job}")
    assert f"run directory: {run_dir}" in cluster.logs(job)

    history = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in history] == [1, 2, 3]
    # The engines on the other node sampled with the learner's broadcast weights at every step.
    assert engines_had_the_learners_weights(history), [m["is_weight"] for m in history]
    assert (run_dir / "final" / "config.json").is_file()

    log = cluster.logs(job)
    assert "weight sync: broadcast" in log, log[-5000:]  # the workers are not on the learner's node

    # Where Ray ran the job's actors, from its state API: workers on the node offering `rollout`.
    head, second = node_roles(cluster)
    job_id = next(j["job_id"] for j in cluster.list("jobs") if j["submission_id"] == job)
    actors = [a for a in cluster.list("actors") if a["job_id"] == job_id]
    workers = [a for a in actors if a["class_name"] == "RolloutWorker"]
    learners = [a for a in actors if a["class_name"] == "Learner"]
    assert len(workers) == 2 and len(learners) == 1, actors
    assert all(a["node_id"] == second for a in workers), workers
    assert learners[0]["node_id"] == head, learners


def test_a_stopped_job_ends_as_an_interrupted_run_saying_how_to_continue(cluster, tmp_path):
    """`ray job stop` sends the driver SIGTERM, and SIGKILL 3 s later: the job says STOPPED, and
    its log ends with the line that says how to continue, printed on arrival of the signal."""
    job, run_dir = f"stop-{uuid.uuid4().hex[:8]}", tmp_path / "run"
    cluster.ray("job", "submit", "--address", cluster.dashboard, "--submission-id", job, "--no-wait",
                "--working-dir", str(ROOT), "--runtime-env", "deploy/runtime_env.yaml", "--",
                "python", "-m", "deploy.train", *TRAIN, "--steps", "40", "--learner.checkpoint-every", "1",
                "--run-dir", str(run_dir))
    deadline = time.monotonic() + 600
    while not (run_dir / "metrics.jsonl").is_file() or not (run_dir / "metrics.jsonl").read_text():
        assert time.monotonic() < deadline and "failed" not in cluster.status(job), cluster.logs(job)[-3000:]
        time.sleep(0.5)
    cluster.ray("job", "stop", "--address", cluster.dashboard, job)
    while f"Job '{job}' was stopped" not in cluster.status(job):  # ray job status: STOPPED
        assert time.monotonic() < deadline, cluster.status(job)
        time.sleep(0.5)
    last = cluster.logs(job).strip().splitlines()[-1]
    assert last.startswith("interrupted: continue from the last checkpoint (step ") and \
        last.endswith(f"with --resume --run-dir {run_dir}"), cluster.logs(job)[-3000:]
