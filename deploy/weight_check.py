"""After every weight sync, a fixed probe set is scored by every engine and by the learner at the
same version. A sync that delivered other weights than the learner's (a broken transport, a
reload that missed a tensor) would otherwise go on training on samples from the wrong policy
with no sign; here it stops the run in one line, naming the worst token."""

from __future__ import annotations

from dataclasses import dataclass

from common.config import Config
from common.errors import RunError
from common.types import Prompt
from common.weight_sync import TensorSpec
from deploy.workers import RolloutWorkers

# Largest per-token |learner - engine| log-prob difference accepted, by the weights' dtype. The
# two compute the same function with different kernels: in float32 they agree to about 1e-5
# (DESIGN.md section 2); in 16-bit formats they differ by up to a few hundredths per token.
TOLERANCE = {"float32": 1e-3, "bfloat16": 0.5, "float16": 0.25}
PROBE_PROMPTS = 2
PROBE_COMPLETION = " I think that is a good question, and the answer is not a simple one."


class WeightCheckFailed(RunError):
    """The engines' log-probs are not the learner's after a weight sync."""


@dataclass
class Worst:
    """The largest difference between two scorings of the probe set, and where it is."""

    difference: float
    probe: int
    token: int
    learner: float
    engine: float


def worst_difference(learner: list[list[float]], engine: list[list[float]]) -> Worst:
    """The token whose log-probs differ most between the learner's and an engine's scoring."""
    worst = Worst(-1.0, -1, -1, 0.0, 0.0)
    for probe, (ours, theirs) in enumerate(zip(learner, engine, strict=True)):
        for token, (a, b) in enumerate(zip(ours, theirs, strict=True)):
            if abs(a - b) > worst.difference:
                worst = Worst(abs(a - b), probe, token, a, b)
    return worst


class WeightCheck:
    def __init__(self, cfg: Config, learner, workers: RolloutWorkers, specs: list[TensorSpec],
                 prompts: list[Prompt], tokenizer):
        self.learner, self.workers = learner, workers
        completion = tokenizer(PROBE_COMPLETION, add_special_tokens=False)["input_ids"]
        probes = prompts[:PROBE_PROMPTS]
        self.sequences = [p.token_ids + completion for p in probes]
        self.starts = [len(p.token_ids) for p in probes]
        self.dtype = next(s.dtype for s in specs if s.dtype in TOLERANCE)
        tolerance = cfg.cluster.weight_check_tolerance
        self.tolerance = TOLERANCE[self.dtype] if tolerance is None else tolerance

    def __call__(self, version: int) -> None:
        """Every engine, now at `version`, against the learner; raises WeightCheckFailed."""
        if not self.tolerance:
            return
        learner = self.workers.get(self.learner.score.remote(self.sequences, self.starts),
                                   "the learner to score the probe set", actor="the learner")
        engines = self.workers.call("score", self.sequences, self.starts)
        for i, ref in engines.items():
            worst = worst_difference(learner, self.workers.get(ref, f"rollout worker {i} to score the probe set"))
            if worst.difference > self.tolerance:
                raise WeightCheckFailed(
                    f"after weight sync {version}, rollout worker {i} gives token {worst.token} of "
                    f"probe {worst.probe} a log-prob of {worst.engine:.4f} and the learner "
                    f"{worst.learner:.4f}: {worst.difference:.3g} apart, over the {self.dtype} "
                    f"tolerance {self.tolerance:g} (cluster.weight_check_tolerance); the engines "
                    "do not hold the learner's weights")
