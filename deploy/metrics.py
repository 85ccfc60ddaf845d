"""Where a run's numbers go: one console line (or a progress bar) per step, `metrics.jsonl` in the
run directory, wandb when enabled, and the reward curve as a PNG at the end."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from common.config import Config, to_dict

CONSOLE = (("reward", "reward {:+.3f}"), ("kl", "kl {:.4f}"), ("clip_fraction", "clip {:.3f}"),
           ("entropy", "entropy {:.2f}"), ("gen_tokens_per_s", "gen {:.0f} tok/s"),
           ("step_s", "{:.1f} s/step"), ("policy_lag", "lag {:.1f}"),
           ("engine_busy", "engines {:.0%}"), ("learner_busy", "learner {:.0%}"))


def read_jsonl(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


class MetricsLog:
    def __init__(self, cfg: Config, run_dir: Path, first_step: int,
                 checkpointed: dict | None = None):
        """`first_step`: the step a resumed run starts after (0: a fresh run); `checkpointed`:
        that step's metrics, saved with its checkpoint."""
        self.cfg, self.path = cfg, run_dir / "metrics.jsonl"
        kept = []
        if first_step == 0:
            self.path.write_text("")
        else:  # resumed: forget the steps after the checkpoint, which are done again
            kept = [m for m in read_jsonl(self.path) if m.get("step", 0) <= first_step] \
                if self.path.exists() else []
            self.path.write_text("".join(json.dumps(m) + "\n" for m in kept))
        self.wandb = None
        if cfg.logging.wandb:
            import wandb

            self.wandb = wandb.init(project=cfg.logging.wandb_project, config=to_dict(cfg),
                                    dir=str(run_dir), name=run_dir.name, resume="allow")
        self.bar = None
        if cfg.logging.progress == "bar" and sys.stdout.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=cfg.steps, initial=first_step, desc="GRPO", unit="step",
                            dynamic_ncols=True)
        # A step is logged after its checkpoint is written (a step in the file is one a resume
        # keeps): a run stopped between the two logs its checkpoint's step here.
        if checkpointed and first_step not in [m.get("step") for m in kept]:
            self.log(checkpointed)

    @property
    def wandb_url(self) -> str | None:
        return getattr(self.wandb, "url", None) if self.wandb else None

    def log(self, metrics: dict) -> None:
        # A measure that could not be taken (NaN) is left out: strict JSON readers reject NaN.
        metrics = {k: v for k, v in metrics.items() if not (isinstance(v, float) and math.isnan(v))}
        with self.path.open("a") as f:
            f.write(json.dumps(metrics) + "\n")
        if self.wandb is not None:
            self.wandb.log(metrics, step=metrics["step"])
        text = "  ".join(fmt.format(metrics[k]) for k, fmt in CONSOLE
                         if k in metrics and not math.isnan(metrics[k]))  # nan: not measured
        if self.bar is not None:
            self.bar.set_postfix_str(text, refresh=False)
            self.bar.update(metrics["step"] - self.bar.n)
        else:
            print(f"step {metrics['step']:>4}/{self.cfg.steps}  {text}", flush=True)

    def note(self, line: str) -> None:
        (self.bar.write if self.bar is not None else print)(line)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.wandb is not None:
            self.wandb.finish()


def plot_rewards(metrics: list[dict], out: Path, title: str, eval_before: float = math.nan) -> None:
    """The reward curve (`reward_figure`) as a PNG at `out`."""
    import matplotlib.pyplot as plt

    fig = reward_figure(metrics, title, eval_before)
    fig.savefig(out, dpi=120)
    plt.close(fig)


def reward_figure(metrics: list[dict], title: str, eval_before: float = math.nan):
    """Mean reward per step with a moving average over a tenth of the steps, and the eval-split
    reward where measured (`eval_before` at step 0)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [m["step"] for m in metrics if "reward" in m]
    rewards = [m["reward"] for m in metrics if "reward" in m]
    window = max(1, len(rewards) // 10)
    smooth = [sum(rewards[max(0, i - window + 1): i + 1]) / len(rewards[max(0, i - window + 1): i + 1])
              for i in range(len(rewards))]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, rewards, alpha=0.35, label="batch mean reward")
    ax.plot(steps, smooth, label=f"moving average ({window} steps)")
    evals = [(m["step"], m["eval_reward"]) for m in [{"step": 0, "eval_reward": eval_before}, *metrics]
             if not math.isnan(m.get("eval_reward", math.nan))]
    if evals:
        ax.plot(*zip(*evals), "o", label="eval split")
    ax.set(xlabel="step", ylabel="reward", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig
