"""Run metrics: the reward-curve PNG, metrics.jsonl lines, console lines, trimming on resume."""

from __future__ import annotations

import json
import math

from common.config import Config
from deploy.metrics import MetricsLog, plot_rewards, read_jsonl

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def lines_config(steps: int = 3) -> Config:
    cfg = Config()
    cfg.logging.progress = "lines"
    cfg.steps = steps
    return cfg


def test_plot_rewards_writes_a_png(tmp_path):
    history = [
        {"step": 1, "reward": -0.2, "eval_reward": math.nan},
        {"step": 2, "reward": 0.1},
        {"step": 3, "reward": 0.4, "eval_reward": 0.35},
        {"step": 4, "reward": 0.8},
    ]
    out = tmp_path / "reward.png"
    plot_rewards(history, out, "tiny", eval_before=-0.1)
    data = out.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert len(data) > 1000


def test_metrics_log_writes_jsonl_and_one_line_per_step(tmp_path, capsys):
    log = MetricsLog(lines_config(), tmp_path, first_step=0)
    log.log({"step": 1, "reward": 0.25, "kl": 0.001, "policy_lag": 0.0})
    log.log({"step": 2, "reward": -0.5})
    log.close()
    assert read_jsonl(tmp_path / "metrics.jsonl") == [
        {"step": 1, "reward": 0.25, "kl": 0.001, "policy_lag": 0.0},
        {"step": 2, "reward": -0.5},
    ]
    out = capsys.readouterr().out.splitlines()
    assert out == [
        "step    1/3  reward +0.250  kl 0.0010  lag 0.0",
        "step    2/3  reward -0.500",
    ]


def test_metrics_log_fresh_start_empties_an_old_file(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 9}) + "\n")
    MetricsLog(lines_config(), tmp_path, first_step=0)
    assert (tmp_path / "metrics.jsonl").read_text() == ""


def test_metrics_log_resume_drops_steps_after_the_checkpoint(tmp_path, capsys):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "reward": s / 10}) + "\n" for s in (1, 2, 3, 4)))
    log = MetricsLog(lines_config(steps=5), tmp_path, first_step=2)
    assert read_jsonl(path) == [{"step": 1, "reward": 0.1}, {"step": 2, "reward": 0.2}]
    log.log({"step": 3, "reward": 0.9})
    assert [m["step"] for m in read_jsonl(path)] == [1, 2, 3]
    assert capsys.readouterr().out == "step    3/5  reward +0.900\n"


def test_metrics_log_resume_without_a_file_starts_empty(tmp_path):
    MetricsLog(lines_config(), tmp_path, first_step=2)
    assert read_jsonl(tmp_path / "metrics.jsonl") == []
