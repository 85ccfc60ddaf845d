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
from deploy.clients import LearnerClient
from deploy.workers import RolloutWorkers

# Largest mean |learner - engine| log-prob difference per probe token accepted, by the weights'
# dtype. The learner scores the probes as an engine would: from its weights cast to the engines'
# dtype and computed in it throughout. The two then differ only by their kernels: in float32 by
# about 1e-5 per token; in 16 bits by a share of that dtype's own rounding, which grows as the
# policy sharpens (a token the policy finds very unlikely, log-prob -16, can move a whole unit):
# the mean is the statistic, not the worst token.
TOLERANCE = {"float32": 1e-3, "bfloat16": 0.1, "float16": 0.05}
# An unsharded learner measures that rounding (`probe_rounding`: its probe log-probs in float32
# against the engines' dtype) and the tolerance follows it: ROUNDING_FACTOR x that, at least
# ROUNDING_FLOOR. Over two 24-step bfloat16 runs of the tiny model at 3e-2 (in flight and
# synchronous, rounding from 0.0012 to 0.11 per token) the engine stayed within 0.86x of it, a
# quarter of the tolerance at most; one tensor scaled by 1.5 on the way
# (tests/integration/corrupting_reward.py) put it 0.051 away at step 2, 10x the floor. Autocast
# is no oracle for a bfloat16 engine: it keeps the residual stream and the norms in float32, and
# on a sharpened policy (step 16 of a run) put a correct engine 0.30 per token away where the
# cast weights put it 0.0016 away.
ROUNDING_FACTOR, ROUNDING_FLOOR = 3.0, 0.005
PROBE_PROMPTS = 2
PROBE_COMPLETION = " I think that is a good question, and the answer is not a simple one."


class WeightCheckFailed(RunError):
    """The engines' log-probs are not the learner's after a weight sync."""


@dataclass
class Agreement:
    """How two scorings of the probe set differ: on average per token, and at the worst token."""

    mean: float
    worst: float
    probe: int
    token: int
    learner: float
    engine: float


def compare(learner: list[list[float]], engine: list[list[float]]) -> Agreement:
    """The mean |difference| of two scorings of the probe set, and the token that differs most."""
    worst = Agreement(0.0, -1.0, -1, -1, 0.0, 0.0)
    total, tokens = 0.0, 0
    for probe, (ours, theirs) in enumerate(zip(learner, engine, strict=True)):
        for token, (a, b) in enumerate(zip(ours, theirs, strict=True)):
            total, tokens = total + abs(a - b), tokens + 1
            if abs(a - b) > worst.worst:
                worst = Agreement(0.0, abs(a - b), probe, token, a, b)
    worst.mean = total / max(tokens, 1)
    return worst


class WeightCheck:
    def __init__(self, cfg: Config, learner: LearnerClient, workers: RolloutWorkers, specs: list[TensorSpec],
                 prompts: list[Prompt], tokenizer):
        self.learner, self.workers = learner, workers
        completion = tokenizer(PROBE_COMPLETION, add_special_tokens=False)["input_ids"]
        probes = prompts[:PROBE_PROMPTS]
        self.sequences = [p.token_ids + completion for p in probes]
        self.starts = [len(p.token_ids) for p in probes]
        self.dtype = next(s.dtype for s in specs if s.dtype in TOLERANCE)
        tolerance = cfg.cluster.weight_check_tolerance
        self.tolerance = TOLERANCE[self.dtype] if tolerance is None else tolerance
        # FSDP's ranks compute only in the compute dtype: sharded, the fixed tolerance holds.
        self.measure_rounding = self.dtype != "float32" and cfg.learner.num_ranks == 1
        self.follows_rounding = self.measure_rounding and tolerance is None

    def __call__(self, version: int) -> dict[str, float]:
        """Every engine, now at `version`, against the learner: the largest mean and per-token
        differences, as metrics; raises WeightCheckFailed over the tolerance."""
        if not self.tolerance:
            return {}
        learner = self.learner.probe_logprobs(self.sequences, self.starts, self.dtype)
        rounding, tolerance, why = 0.0, self.tolerance, "cluster.weight_check_tolerance"
        if self.measure_rounding:
            exact = self.learner.probe_logprobs(self.sequences, self.starts, "float32")
            rounding = compare(exact, learner).mean
        if self.follows_rounding:
            tolerance = max(ROUNDING_FLOOR, ROUNDING_FACTOR * rounding)
            why = f"{ROUNDING_FACTOR:g}x the learner's own {self.dtype} rounding of it, {rounding:.3g}"
        seen = []
        for i, engine in enumerate(self.workers.probe_logprobs(self.sequences, self.starts)):
            a = compare(learner, engine)
            if a.mean > tolerance:
                raise WeightCheckFailed(
                    f"after weight sync {version}, rollout worker {i} scores the probe set "
                    f"{a.mean:.3g} apart from the learner per token (worst: token {a.token} of "
                    f"probe {a.probe}, {a.engine:.4f} against {a.learner:.4f}), over the {self.dtype} "
                    f"tolerance {tolerance:.3g} ({why}); the engines do not hold the learner's weights")
            seen.append(a)
        return {"probe_logprob_diff_mean": max(a.mean for a in seen),
                "probe_logprob_diff_max": max(a.worst for a in seen), "probe_rounding": rounding,
                "probe_tolerance": tolerance}
