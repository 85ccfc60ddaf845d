"""The driver's pure parts: where a run writes by default, locally and as a Ray job."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from deploy.train import default_run_dir, ray_job_id, summarize

ROOT = Path(__file__).resolve().parents[3]

JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"


def test_a_local_run_writes_under_runs_in_the_working_directory(monkeypatch):
    monkeypatch.delenv(JOB_ENV, raising=False)
    assert ray_job_id() is None
    path = default_run_dir()
    assert path.parent == Path("runs") and re.fullmatch(r"\d{8}-\d{6}", path.name)


def test_a_ray_job_writes_where_it_outlives_the_jobs_working_directory(monkeypatch, tmp_path):
    # What Ray's job supervisor sets in its driver's environment.
    monkeypatch.setenv(JOB_ENV, json.dumps({"runtime_env": {}, "metadata": {
        "job_submission_id": "raysubmit_abc123", "job_name": "raysubmit_abc123"}}))
    assert ray_job_id() == "raysubmit_abc123"
    monkeypatch.setenv("GRPO_RAY_RUNS", str(tmp_path))
    path = default_run_dir()
    assert path.parent == tmp_path and re.fullmatch(r"\d{8}-\d{6}-raysubmit_abc123", path.name)
    monkeypatch.delenv("GRPO_RAY_RUNS")
    assert default_run_dir().parent == Path("~/grpo-ray/runs").expanduser()


def test_summarize_reports_the_fifths_and_the_eval_split():
    history = [{"step": i, "reward": r, "elapsed_s": 10.0 + i} for i, r in
               enumerate([0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0], start=1)]
    history[-1]["eval_reward"] = 0.75
    # 11 steps: a fifth is 2 steps: (0.0 + 0.1) / 2 and (0.9 + 1.0) / 2.
    assert summarize(history, eval_before=-0.123456) == {
        "mean reward, first fifth of steps": 0.05,
        "mean reward, last fifth of steps": 0.95,
        "eval-split reward before training": -0.1235,
        "eval-split reward after training": 0.75,
        "steps": 11,
        "wall-clock seconds": 21.0,
    }


def test_without_an_eval_split_the_summary_says_so_and_metrics_stay_strict_json(tmp_path):
    from common.config import Config
    from deploy.metrics import MetricsLog

    history = [{"step": 1, "reward": 0.5, "elapsed_s": 3.0}]
    assert summarize(history, eval_before=None)["eval-split reward"] == "no eval split"
    cfg = Config()
    cfg.logging.progress = "lines"
    log = MetricsLog(cfg, tmp_path, first_step=0)
    log.log({"step": 1, "reward": 0.5, "gen_tokens_per_s": float("nan")})
    line = (tmp_path / "metrics.jsonl").read_text()
    assert json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} in metrics.jsonl")) == \
        {"step": 1, "reward": 0.5}  # what could not be measured is left out


HEAVY = ("torch", "transformers", "datasets", "trl", "vllm")


def imported_after(code: str) -> list[str]:
    """Which of HEAVY a fresh interpreter holds after running `code` in the project's root."""
    probe = f"import sys\n{code}\nprint([m for m in {HEAVY!r} if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True)
    return ast.literal_eval(out.stdout.strip().splitlines()[-1])


def test_the_driver_starts_ray_and_places_actors_without_the_libraries_only_actors_need(tmp_path):
    """Ray's start and the actors' are the first step's critical path: the driver reads the config,
    makes the run directory and plans the resources without torch (where vLLM's CUDA build is
    absent), and imports the actors' classes with torch alone, not transformers' model classes,
    TRL or datasets, which the actors import where they use them (2 to 3 s of imports)."""
    from common import models

    if models._cuda_vllm():  # device detection then asks torch for a CUDA device
        pytest.skip("vLLM's CUDA build is installed")
    assert imported_after(f"""
from common import config_loading
from deploy.launch import check_machine, plan
from deploy.train import prepare_run_dir
cfg = config_loading.from_args(["--run-dir", {str(tmp_path / "run")!r}])
check_machine(cfg); prepare_run_dir(cfg); plan(cfg)""") == []
    actors = """
from actors.reward_model import RewardModel
from actors.rollout_worker import RolloutWorker
from common.buffer import RolloutBuffer
from learner.learner import Learner"""
    assert imported_after(actors) == ["torch"]
    # The probe sees transformers where it is imported: the prompts' tokenizer, on their thread.
    assert imported_after(actors + "\nfrom common import models; models.tokenizer_for('tiny')") \
        == ["torch", "transformers"]
