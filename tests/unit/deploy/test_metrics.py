"""Run metrics: the reward-curve PNG, metrics.jsonl lines, console lines, trimming on resume."""

from __future__ import annotations

import json
import math

import pytest

from common.config import Config
from deploy.metrics import MetricsLog, plot_rewards, read_jsonl, reward_figure

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def lines_config(steps: int = 3) -> Config:
    cfg = Config()
    cfg.logging.progress = "lines"
    cfg.steps = steps
    return cfg


def test_the_reward_curve_plots_each_step_the_moving_average_and_the_eval_points(tmp_path):
    rewards = [-0.2, 0.1, 0.4, 0.8, 0.6, 0.9, 1.0, 0.7, 0.9, 1.0, 0.95, 1.0, 0.9, 1.0, 1.0, 0.8,
               1.0, 0.9, 1.0, 1.0]
    history = [{"step": i + 1, "reward": r} for i, r in enumerate(rewards)]
    history[0]["eval_reward"] = math.nan  # not measured at that step
    history[9]["eval_reward"] = 0.35
    history[19]["eval_reward"] = 0.95
    fig = reward_figure(history, "tiny", eval_before=-0.1)
    raw, smooth, evals = fig.axes[0].get_lines()
    assert list(raw.get_xdata()) == list(range(1, 21)) and list(raw.get_ydata()) == rewards
    # 20 steps: a window of 2, the first point alone.
    expected = [rewards[0]] + [(rewards[i - 1] + rewards[i]) / 2 for i in range(1, 20)]
    assert list(smooth.get_ydata()) == pytest.approx(expected)
    assert list(evals.get_xdata()) == [0, 10, 20] and list(evals.get_ydata()) == [-0.1, 0.35, 0.95]
    assert fig.axes[0].get_title() == "tiny"

    plot_rewards(history, tmp_path / "reward.png", "tiny", eval_before=-0.1)
    assert (tmp_path / "reward.png").read_bytes()[:8] == PNG_SIGNATURE


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


def test_metrics_log_resume_logs_the_checkpointed_step_a_stopped_run_did_not(tmp_path, capsys):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "reward": s / 10}) + "\n" for s in (1, 2, 3)))
    log = MetricsLog(lines_config(steps=5), tmp_path, first_step=4,
                     checkpointed={"step": 4, "reward": 0.4, "kl": math.nan})
    assert read_jsonl(path) == [{"step": s, "reward": s / 10} for s in (1, 2, 3, 4)]
    assert capsys.readouterr().out == "step    4/5  reward +0.400\n"
    log.log({"step": 5, "reward": 0.5})
    assert [m["step"] for m in read_jsonl(path)] == [1, 2, 3, 4, 5]


def test_metrics_log_resume_keeps_a_logged_checkpointed_step_once(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "reward": s / 10}) + "\n" for s in (1, 2, 3, 4)))
    MetricsLog(lines_config(steps=5), tmp_path, first_step=4,
               checkpointed={"step": 4, "reward": 0.9})
    assert read_jsonl(path) == [{"step": s, "reward": s / 10} for s in (1, 2, 3, 4)]


def test_metrics_log_resume_without_a_file_starts_empty(tmp_path):
    MetricsLog(lines_config(), tmp_path, first_step=2)
    assert read_jsonl(tmp_path / "metrics.jsonl") == []
