"""Our GRPO functions against TRL 1.16's own GRPOTrainer code on the same tensors.

TRL computes advantages, the truncation mask and the vLLM importance-sampling ratio in
`_generate_and_score_completions`, and the loss in `_compute_loss`. Both run here unmodified on a
trainer built without its __init__: generation, rewards and the model's forward pass are stubbed
to return fixed tensors. One batch of two groups of three completions with ragged lengths, off
policy (current != old != behaviour), NaN behaviour log-probs and NaN (unscored) rewards, is split
into two micro-batches as TRL's gradient accumulation would; the loss summed over them and its
gradient with respect to the per-token log-probs must agree within 1e-6 for every loss type,
importance-sampling mode and level the two share.

Unscored samples stay in the loss mask here, as in TRL (advantage 0, but still in the KL term and
the token counts); `mask_unscored`, which takes them out, is this project's choice.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
import trl.trainer.grpo_trainer as trl_grpo
from trl import GRPOConfig as TRLConfig
from trl import GRPOTrainer

from common.config import GRPOConfig
from common.rewards import combine
from learner.grpo import (
    IMPORTANCE_SAMPLING_LEVELS,
    IMPORTANCE_SAMPLING_MODES,
    LOSS_TYPES,
    Normalisers,
    group_advantages,
    grpo_loss,
    importance_sampling_ratio,
    mask_truncated_completions,
    policy_ratio,
    sampling_mismatch,
)

TOL = 1e-6
NAN = float("nan")
EOS, PAD = 0, 1
G = 3
MICRO_BATCHES = (slice(0, 3), slice(3, 6))
REWARD_WEIGHTS = torch.tensor([1.0, 0.5])
MAX_COMPLETION_LENGTH = 7  # above the longest completion (5), so dr_grpo's constant matters

# Completion lengths 5, 2, 4, 1, 3, 5; rows 1 and 5 end without EOS: truncated.
LENGTHS = [5, 2, 4, 1, 3, 5]
TRUNCATED = [False, True, False, False, False, True]
# old - behaviour per token, NaN where vLLM gave no log-prob. Row sums (NaN as 0): 1.5, -0.1,
# -1.2, 0.2, 0.05, 0.9, so sequence ratios 4.48, 0.90, 0.30, 1.22, 1.05, 2.46 fall on both sides
# of every bound used below; single tokens (1.3, -0.9, 0.8) do too.
IS_LOG_DIFF = [
    [1.3, -0.4, 0.5, 0.3, -0.2],
    [0.3, -0.4],
    [-0.9, 0.2, NAN, -0.5],
    [0.2],
    [0.8, -0.6, -0.15],
    [0.5, 0.4, -0.3, 0.2, 0.1],
]
# Two reward functions (weights 1, 0.5); NaN = returned None. Row 3 is unscored by both. Sums
# 1.25, 0.2, 0.1 | NaN, 0.45, 0.75: advantages +, -, - | 0, -, +.
REWARDS_PER_FUNC = torch.tensor(
    [[1.0, 0.5], [0.2, NAN], [0.1, NAN], [NAN, NAN], [NAN, 0.9], [0.6, 0.3]], dtype=torch.float64
)


@dataclasses.dataclass(frozen=True)
class Case:
    loss_type: str
    mode: str | None  # None: importance-sampling correction off
    level: str
    beta: float = 0.0
    use_bias_correction_kl: bool = True
    delta: float | None = None
    epsilon: float = 0.2
    epsilon_high: float | None = None
    clip_min: float | None = None
    clip_max: float | None = 3.0
    mask_truncated: bool = False
    scale_rewards: str = "group"


PARAMETER_SETS = {
    "trl-defaults": dict(),
    "kl-corrected-delta-batch-truncmask": dict(
        beta=0.04, delta=1.5, epsilon_high=0.28, clip_min=0.5, clip_max=2.0,
        mask_truncated=True, scale_rewards="batch"),
    "kl-plain-none-truncmask": dict(
        beta=0.04, use_bias_correction_kl=False, epsilon_high=0.28, clip_min=0.6, clip_max=1.5,
        mask_truncated=True, scale_rewards="none"),
}


def make_case(loss_type: str, mode: str | None, level: str, params: str) -> Case:
    kw = dict(PARAMETER_SETS[params])
    if loss_type == "cispo":
        # cispo's cap is on the ratio itself; near-1 ratios need a cap near 1 to be both sides of it
        kw["epsilon_high"] = 1.2
    return Case(loss_type, mode, level, **kw)


def make_data() -> SimpleNamespace:
    """Fixed float64 tensors [6, 5]; padded positions hold moderate garbage that must not count."""
    gen = torch.Generator().manual_seed(0)
    rows, width = len(LENGTHS), max(LENGTHS)
    valid = torch.tensor([[t < n for t in range(width)] for n in LENGTHS])  # [B, T]
    garbage = torch.randn(rows, width, generator=gen, dtype=torch.float64)  # [B, T]
    old = -torch.rand(rows, width, generator=gen, dtype=torch.float64) * 3 - 0.1  # [B, T]
    old = torch.where(valid, old, garbage)
    diff = torch.tensor([d + [0.0] * (width - len(d)) for d in IS_LOG_DIFF], dtype=torch.float64)
    # TRL builds the sampling log-probs as float32 from Python floats: use float32 values
    behaviour = (old - diff).float().double()  # [B, T], NaN where diff is NaN
    # policy log-ratio per row: rows 0 (A > 0) and 2 (A < 0) are clipped, high and low; row 4
    # (A < 0) sits above 1 + eps and delta, where only delta caps it
    offsets = torch.tensor([0.5, -0.35, -0.35, -0.3, 0.6, 0.15], dtype=torch.float64)
    noise = torch.randn(rows, width, generator=gen, dtype=torch.float64) * 0.35
    logp = old + offsets.unsqueeze(-1) + noise  # [B, T]
    ref = old + torch.randn(rows, width, generator=gen, dtype=torch.float64) * 0.3  # [B, T]
    completion_ids = [
        [int(x) for x in torch.randint(2, 50, (n,), generator=gen)] for n in LENGTHS
    ]
    for ids, truncated in zip(completion_ids, TRUNCATED):
        if not truncated:
            ids[-1] = EOS
    return SimpleNamespace(
        valid=valid, old=old, behaviour=behaviour, logp=logp, ref=ref,
        completion_ids=completion_ids,
        prompt_ids=[[5, 6, 7], [5, 6, 7], [5, 6, 7], [8, 9], [8, 9], [8, 9]],
        entropies=torch.rand(rows, width, generator=gen, dtype=torch.float64),
    )


DATA = make_data()


# ----- TRL's side -----


class SingleProcess:
    """Just what GRPOTrainer asks of accelerate's Accelerator in one process."""

    device = torch.device("cpu")
    num_processes = 1
    process_index = 0
    sync_gradients = True

    def gather(self, x):
        return x

    def reduce(self, x, reduction="sum"):
        return x


def trl_trainer(case: Case) -> GRPOTrainer:
    """A GRPOTrainer with exactly the attributes the two methods read, set as __init__ would."""
    t = object.__new__(GRPOTrainer)
    t.args = SimpleNamespace(
        use_bias_correction_kl=case.use_bias_correction_kl,
        delta=case.delta,
        sapo_temperature_pos=TRLConfig.sapo_temperature_pos,
        sapo_temperature_neg=TRLConfig.sapo_temperature_neg,
        # TRL's default: one generation batch per optimizer step, split in two micro-batches;
        # num_iterations 2 makes TRL keep old log-probs even with the IS correction off
        gradient_accumulation_steps=2,
        steps_per_generation=2,
        per_device_train_batch_size=3,
        gradient_checkpointing_kwargs=None,
    )
    t.accelerator = SingleProcess()
    t.model = SimpleNamespace(training=True, is_gradient_checkpointing=False)
    t.ref_model = SimpleNamespace()
    t.num_iterations = 2
    t.current_gradient_accumulation_steps = 2
    t.loss_type = case.loss_type
    t.importance_sampling_level = case.level
    t.beta = case.beta
    t.epsilon_low = case.epsilon
    t.epsilon_high = case.epsilon if case.epsilon_high is None else case.epsilon_high
    t.max_completion_length = MAX_COMPLETION_LENGTH
    t.use_vllm = True
    t.vllm_importance_sampling_correction = case.mode is not None
    t.vllm_importance_sampling_mode = case.mode
    t.vllm_importance_sampling_clip_min = case.clip_min
    t.vllm_importance_sampling_clip_max = case.clip_max
    t.mask_truncated_completions = case.mask_truncated
    t.eos_token_ids = [EOS]
    t._tokenizer = SimpleNamespace(pad_token_id=PAD)
    t.pad_to_multiple_of = None
    t.num_generations = G
    t.scale_rewards = case.scale_rewards
    t.multi_objective_aggregation = "sum_then_normalize"
    t.reward_weights = REWARD_WEIGHTS
    t.reward_func_names = ["first", "second"]
    t.environment_factories = None
    t.environments = None
    t.tools = None
    t.log_multimodal = False
    t.top_entropy_quantile = 1.0
    t.off_policy_mask_threshold = None
    t.aux_loss_enabled = False
    t._entropy_bonus_enabled = False
    t._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    t._logs = {"prompt": [], "completion": [], "rewards": defaultdict(list), "advantages": [],
               "extra": defaultdict(list)}
    t._pending_extra_logs = {}
    t._pending_metrics = {}
    return t


def trl_generation(t: GRPOTrainer, monkeypatch) -> dict:
    """TRL's `_generate_and_score_completions` on DATA: engine, rewards and forward stubbed."""
    monkeypatch.setattr(trl_grpo, "gather_object", lambda x: x)
    sampling = [[None if torch.isnan(x) else float(x) for x in row[:n]]
                for row, n in zip(DATA.behaviour, LENGTHS)]
    t._generate = lambda prompts: (DATA.prompt_ids, DATA.completion_ids, None,
                                   ["text"] * len(prompts), sampling, {}, None, None)
    t._calculate_rewards = lambda *args: REWARDS_PER_FUNC.clone()

    def forward(model, *args, **kwargs):
        return (DATA.ref if model is t.ref_model else DATA.old).clone(), None, None

    t._get_per_token_logps_and_entropies = forward
    return t._generate_and_score_completions([{"prompt": "p"}] * len(LENGTHS))


def trl_loss(t: GRPOTrainer, batch: dict) -> tuple[torch.Tensor, torch.Tensor, list[dict]]:
    """TRL's `_compute_loss` summed over the micro-batches: (loss, d loss / d logp, metrics)."""
    logp = DATA.logp.clone().requires_grad_()
    total, metrics = 0.0, []
    for rows in MICRO_BATCHES:
        micro = {k: v[rows] if isinstance(v, torch.Tensor) and v.dim() > 0 else v
                 for k, v in batch.items()}
        t._get_per_token_logps_and_entropies = (
            lambda *args, rows=rows, **kwargs: (logp[rows], DATA.entropies[rows], None))
        t._metrics["train"].clear()
        total = total + t._compute_loss(None, micro)
        metrics.append({k: v[-1] for k, v in t._metrics["train"].items()})
    total.backward()
    return total.detach(), logp.grad, metrics


# ----- our side -----


def our_mask(case: Case) -> torch.Tensor:
    mask = DATA.valid
    if case.mask_truncated:
        mask = mask_truncated_completions(mask, torch.tensor(TRUNCATED))
    return mask  # [B, T]


def our_advantages(case: Case) -> torch.Tensor:
    rewards = torch.tensor(combine(REWARDS_PER_FUNC.T.tolist(), REWARD_WEIGHTS.tolist()),
                           dtype=REWARDS_PER_FUNC.dtype)  # [B], as the rollout worker scores them
    return group_advantages(rewards.view(-1, G), case.scale_rewards).reshape(-1)  # [B]


def our_loss(case: Case) -> tuple[torch.Tensor, torch.Tensor, list]:
    """grpo_loss summed over the micro-batches with whole-batch totals: (loss, grad, outputs)."""
    mask = our_mask(case)
    advantages = our_advantages(case)
    behaviour = torch.where(DATA.valid, DATA.behaviour, 1e4)  # garbage TRL never sees
    logp = DATA.logp.clone().requires_grad_()
    options = GRPOConfig(
        loss_type=case.loss_type, epsilon=case.epsilon, epsilon_high=case.epsilon_high,
        beta=case.beta, delta=case.delta, importance_sampling_level=case.level,
        use_bias_correction_kl=case.use_bias_correction_kl,
        vllm_importance_sampling_correction=case.mode is not None,
        vllm_importance_sampling_mode=case.mode or "token_truncate",
        vllm_importance_sampling_clip_min=case.clip_min,
        vllm_importance_sampling_clip_max=case.clip_max,
    )
    totals = Normalisers(num_sequences=len(LENGTHS), num_tokens=int(mask.sum()),
                         max_completion_length=MAX_COMPLETION_LENGTH,
                         num_micro_batches=len(MICRO_BATCHES))
    outs = [grpo_loss(logp[s], DATA.old[s], behaviour[s], DATA.ref[s], advantages[s], mask[s],
                      options, totals) for s in MICRO_BATCHES]
    total = sum(out.loss for out in outs)
    total.backward()
    return total.detach(), logp.grad, outs


# ----- preconditions: the inputs exercise what is compared -----


def assert_case_is_not_trivial(case: Case) -> None:
    mask = our_mask(case)
    keep = mask.bool()
    adv = our_advantages(case).unsqueeze(-1)  # [B, 1]
    assert (adv > 0).any() and (adv < 0).any() and (adv == 0).any()  # row 3: unscored
    assert torch.isnan(DATA.behaviour[keep]).any()
    assert not torch.allclose(DATA.logp[keep], DATA.old[keep])
    ratio = policy_ratio(DATA.logp, DATA.old, mask, case.level).expand_as(DATA.logp)  # [B, T]
    if case.loss_type == "cispo":
        over = (ratio > case.epsilon_high) & (adv > 0)
        assert over[keep].any() and not over[keep].all()
    elif case.loss_type == "sapo":
        assert ((ratio[keep] - 1).abs() > 0.2).any()  # the gate is far from linear there
    else:
        eps_high = case.epsilon if case.epsilon_high is None else case.epsilon_high
        clipped = ((ratio < 1 - case.epsilon) & (adv < 0)) | ((ratio > 1 + eps_high) & (adv > 0))
        assert clipped[keep].any() and not clipped[keep].all()
        if case.delta is not None:
            assert ((ratio > case.delta) & (adv < 0))[keep].any()
    if case.mode is not None:
        unbounded = case.mode.replace("truncate", "mask")  # a mask mode without bounds: raw ratio
        raw = importance_sampling_ratio(DATA.old, DATA.behaviour, mask, unbounded, None, None)
        raw = raw.expand_as(DATA.logp)[keep]
        low = -torch.inf if case.clip_min is None else case.clip_min
        high = torch.inf if case.clip_max is None else case.clip_max
        outside = (raw < low) | (raw > high)
        assert outside.any() and not outside.all()
        # each bound changes a weight where it matters: on a row whose advantage is not 0
        signal = adv.expand_as(DATA.logp)[keep] != 0
        if case.clip_min is not None:
            assert (outside & signal & (raw < 1)).any()
        assert (outside & signal & (raw > 1)).any()
    if case.mask_truncated:
        assert not keep.all(-1)[torch.tensor(TRUNCATED)].any() and keep.any(-1).sum() == 4


# ----- the comparisons -----

CASES = [
    pytest.param(make_case(loss_type, mode, level, params),
                 id=f"{loss_type}-{mode or 'no_is'}-{level}-{params}")
    for loss_type in LOSS_TYPES  # all of ours are TRL's; TRL's luspo and vespo are not ours
    for mode in (None, *IMPORTANCE_SAMPLING_MODES)
    for level in IMPORTANCE_SAMPLING_LEVELS
    for params in PARAMETER_SETS
]


def close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected.to(actual.dtype), atol=TOL, rtol=0)


@pytest.mark.parametrize("case", CASES)
def test_loss_and_gradient_match_trl(case, monkeypatch):
    assert_case_is_not_trivial(case)
    t = trl_trainer(case)
    batch = trl_generation(t, monkeypatch)
    generation_metrics = {k: v[-1] for k, v in t._metrics["train"].items()}

    # what TRL derives before the loss: advantages, the loss mask, the IS ratio
    close(our_advantages(case), batch["advantages"])
    assert our_mask(case).tolist() == batch["completion_mask"].bool().tolist()
    if case.mode is not None:
        ours = importance_sampling_ratio(DATA.old, DATA.behaviour, our_mask(case), case.mode,
                                         case.clip_min, case.clip_max)
        close(ours, batch["importance_sampling_ratio"])
        mismatch = sampling_mismatch(DATA.old, DATA.behaviour, our_mask(case))
        close(mismatch.max_abs_diff,
              torch.tensor(generation_metrics["sampling/sampling_logp_difference/max"]))

    trl_total, trl_grad, trl_metrics = trl_loss(t, batch)
    total, grad, outs = our_loss(case)
    close(total, trl_total)
    close(grad, trl_grad)

    # per micro-batch metrics where TRL also averages over tokens (it counts sequences at
    # sequence level)
    for out, metrics in zip(outs, trl_metrics):
        if case.beta:
            close(out.kl, torch.tensor(metrics["kl"]))
        if case.level == "token" and case.loss_type == "cispo":
            close(out.clip_fraction, torch.tensor(metrics["cispo_clip_ratio"]))
        elif case.level == "token" and case.loss_type != "sapo":
            close(out.clip_fraction, torch.tensor(metrics["clip_ratio/region_mean"]))


WRONG_VARIANTS = [
    ("mode", "token_mask"),
    ("level", "token"),
    ("use_bias_correction_kl", False),
    ("delta", None),
    ("scale_rewards", "group"),
    ("mask_truncated", False),
    ("clip_min", None),
]


@pytest.mark.parametrize("loss_type, wrong", [("dapo", "bnpo"), ("grpo", "sapo"),
                                             ("dr_grpo", "dapo"), ("cispo", "dapo")])
def test_a_wrong_loss_type_does_not_match(loss_type, wrong, monkeypatch):
    case = make_case(loss_type, "sequence_mask", "token", "kl-corrected-delta-batch-truncmask")
    t = trl_trainer(case)
    trl_total, trl_grad, _ = trl_loss(t, trl_generation(t, monkeypatch))
    total, grad, _ = our_loss(dataclasses.replace(case, loss_type=wrong))
    assert (total - trl_total).abs() > 1e3 * TOL or (grad - trl_grad).abs().max() > 1e3 * TOL


@pytest.mark.parametrize("field, wrong", WRONG_VARIANTS, ids=[f for f, _ in WRONG_VARIANTS])
def test_a_wrong_setting_does_not_match(field, wrong, monkeypatch):
    # the comparison above would catch each of these departures from TRL's settings
    case = make_case("grpo", "sequence_mask", "sequence", "kl-corrected-delta-batch-truncmask")
    assert getattr(case, field) != wrong
    t = trl_trainer(case)
    trl_total, trl_grad, _ = trl_loss(t, trl_generation(t, monkeypatch))
    total, grad, _ = our_loss(dataclasses.replace(case, **{field: wrong}))
    assert (total - trl_total).abs() > 1e3 * TOL or (grad - trl_grad).abs().max() > 1e3 * TOL


def test_the_configs_defaults_against_trls():
    """grpo_loss has no defaults of its own (test_grpo.py): a run's loss options are its
    GRPOConfig's, whose defaults are TRL's but where this project chose otherwise."""
    ours = {f.name: f.default for f in dataclasses.fields(GRPOConfig)}
    for name in ("sapo_temperature_pos", "sapo_temperature_neg", "importance_sampling_level",
                 "delta", "use_bias_correction_kl", "vllm_importance_sampling_correction",
                 "vllm_importance_sampling_clip_min", "vllm_importance_sampling_clip_max"):
        assert ours[name] == getattr(TRLConfig, name), name
    # where this project keeps its per-token truncation instead (documented in common/config.py)
    assert (ours["vllm_importance_sampling_mode"], TRLConfig.vllm_importance_sampling_mode) == (
        "token_truncate", "sequence_mask")
    assert not [p for p in inspect.signature(grpo_loss).parameters.values()
                if p.default is not inspect.Parameter.empty]
