"""The run configuration: one root object with a section per role, a docstring per field.

Loaded from a YAML file (see deploy/configs/) and overridden on the command line, e.g.
`python -m deploy.train deploy/configs/tiny.yaml --grpo.epsilon 0.2 --rollout.num-workers 2`.
Numeric fields declare their range as `Annotated[int, Bound(ge=1)]`; rules that tie fields
together are `validate_*` methods. `validate` checks the whole object once, before anything starts,
and reports every problem. Reading run files and the command line is common/config_loading.py.
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Annotated, Literal


class ConfigError(ValueError):
    """A configuration the run cannot start with; `problems` holds one line per mistake."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


@dataclass(frozen=True)
class Bound:
    """The range a numeric field must keep, declared on it: `Annotated[int, Bound(ge=1)]`.
    Checked by `validate`, not by the YAML or command-line parser, so that every value out of
    range is reported at once. None, an optional field left unset, keeps any bound."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    why: str = ""
    """Said after the bound on the error line: "must be >= 2 for group-relative advantages"."""

    def __post_init__(self):
        if (self.ge is None) == (self.gt is None):
            raise TypeError(f"{self!r}: a Bound needs exactly one lower end, ge or gt")

    def keeps(self, value: float | None) -> bool:
        if value is None:
            return True
        above = value >= self.ge if self.ge is not None else value > self.gt
        return above and (self.le is None or value <= self.le)

    def __str__(self) -> str:
        if self.le is None:
            text = f">= {self.ge:g}" if self.ge is not None else f"> {self.gt:g}"
        elif self.ge is not None:
            text = f"in {self.ge:g}..{self.le:g}"
        else:
            text = f"in ({self.gt:g}, {self.le:g}]"
        return f"{text} {self.why}" if self.why else text


@functools.cache
def bounds(cls: type) -> dict[str, Bound]:
    """The Bound of every field of dataclass `cls` (its base classes' too) that declares one."""
    hints = typing.get_type_hints(cls, include_extras=True)
    return {f.name: meta for f in dataclasses.fields(cls)
            for meta in getattr(hints[f.name], "__metadata__", ()) if isinstance(meta, Bound)}


def out_of_bounds(obj, prefix: str) -> list[str]:
    """A line for every field of `obj` outside its Bound, named as `prefix` + its name."""
    return [f"{prefix}{name} must be {bound} (got {getattr(obj, name)})"
            for name, bound in bounds(type(obj)).items() if not bound.keeps(getattr(obj, name))]


class Section:
    """A config section: fields with a docstring each, their Bounds, and (in subclasses) a
    `validate_*` method per rule that ties several fields together."""

    def problems(self, prefix: str) -> list[str]:
        """One line per broken bound or rule of this section, each field named as `prefix` + its
        name."""
        return out_of_bounds(self, prefix)


@dataclass
class ModelConfig(Section):
    """The policy: which model, in which dtype, how long its sequences may be."""

    name: str = "tiny"
    """Policy to train: a preset (`tiny`, `pythia-70m-shape`, `pythia-410m-shape`,
    `pythia-1.4b-shape`), a local Hugging Face model directory, or a hub id such as
    `EleutherAI/pythia-410m-deduped`."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Weights and compute dtype: `auto` is bfloat16 mixed precision (float32 master weights,
    bfloat16 compute and engines) where the hardware multiplies bfloat16 natively (a GPU of
    compute capability 8.0 or more; a CPU with AMX or AVX512-BF16), else float32."""
    max_model_len: Annotated[int, Bound(ge=1)] = 512
    """Longest prompt plus completion, in tokens, for the engines and the learner."""
    cache_dir: str = ""
    """Where presets are built once and kept; empty means `$GRPO_RAY_CACHE` or
    `~/.cache/grpo-ray`."""

    def problems(self, prefix: str) -> list[str]:
        return super().problems(prefix) + [*self.validate_name(prefix)]

    def validate_name(self, prefix: str) -> Iterator[str]:
        from common import models  # torch is heavier than this module

        problem = models.check_name(self.name)
        if problem:
            yield f"{prefix}name: {problem}"


@dataclass
class DataConfig(Section):
    """The prompts: where they come from and how they are rendered and cut."""

    dataset: str = "bundled"
    """Prompt source: `bundled` (the project's open-ended questions), a Hugging Face dataset
    name, or a local .json/.jsonl/.parquet file."""
    prompt_column: str = "prompt"
    """Column that holds the prompt: a string, or a list of chat messages."""
    train_split: str = "train"
    """Split to train on."""
    eval_split: str = "eval"
    """Split to measure the reward on before and after training; empty for none."""
    eval_prompts: Annotated[int, Bound(ge=0)] = 32
    """How many eval-split prompts to score (0 for all)."""
    max_prompt_tokens: Annotated[int, Bound(ge=1)] = 128
    """Prompts longer than this (after the chat template) are handled as `overlong` says."""
    overlong: Literal["truncate", "skip"] = "skip"
    """What to do with a prompt over `max_prompt_tokens`: keep its last tokens, or skip it;
    either way it is counted."""
    chat_template: bool = True
    """Wrap each prompt as a user message and render it with the tokenizer's chat template."""


@dataclass
class ActorResources(Section):
    """What each actor of a role asks of Ray, and of the machine."""

    num_cpus: Annotated[float, Bound(gt=0)] = 1
    """Ray CPUs reserved for each of this role's actors."""
    num_gpus: Annotated[float | None, Bound(ge=0)] = None
    """Ray GPUs for each of this role's actors; unset: none on a CPU, and on a GPU a rollout
    worker's `tensor_parallel_size` or the learner's 1."""
    threads: Annotated[int, Bound(ge=0)] = 0
    """CPU only: torch and OpenMP threads of each of this role's actors; 0 chooses (see
    `cpu_threads`)."""


@dataclass
class RolloutConfig(ActorResources):
    """The rollout workers: how many, how they sample, how completions are scored."""

    num_workers: Annotated[int, Bound(ge=1)] = 1
    """Rollout workers, each owning one vLLM engine."""
    max_tokens: Annotated[int, Bound(ge=1)] = 24
    """Most tokens generated per completion."""
    temperature: Annotated[float, Bound(gt=0)] = 1.0
    """Sampling temperature (the learner's log-probs use the same one)."""
    top_p: Annotated[float, Bound(gt=0, le=1)] = 1.0
    """Nucleus sampling; 1.0 samples from the full distribution, which GRPO assumes."""
    rewards: tuple[str, ...] = ("explicit_pos",)
    """Reward functions: built-in names (see common/rewards.py), `module:function` paths, or
    `model:PATH`, a sequence-classification model (a local directory or a hub id) scoring in
    actors of its own (see reward_model)."""
    reward_weights: tuple[float, ...] = ()
    """One weight per reward function; empty means 1.0 each."""
    reward_timeout_s: Annotated[float, Bound(gt=0)] = 120.0
    """Longest an `async` reward function may take on one group before the run stops, naming
    it (a verifier behind a network that stopped answering)."""
    tensor_parallel_size: Annotated[int, Bound(ge=1)] = 1
    """GPU only: GPUs one engine shards the model over."""
    gpu_memory_utilization: Annotated[float, Bound(gt=0, le=1)] = 0.85
    """GPU only: fraction of each GPU's memory vLLM may take."""
    kv_cache_gib: Annotated[float, Bound(gt=0)] = 1.0
    """CPU only: most KV-cache space per engine in GiB (vLLM's default would be half the RAM).
    An engine takes less when that holds 256 sequences of model.max_model_len tokens, all it
    runs at once: the `tiny` default takes 128 MiB."""
    compile: bool = False
    """CPU only: compile the engines' model with torch.compile, as vLLM always does on GPUs.
    Each engine starts 3 to 5 s later (10 to 30 s more the first time on a machine) and
    generates faster: a fifth less time on pythia-70m's and 410m's shapes, under a tenth on
    the `tiny` default. Worth it for long runs of real models."""
    weight_update: Literal["between_rounds", "in_flight"] = "between_rounds"
    """When a new policy reaches an engine: `between_rounds`, once it has finished what it
    was generating; `in_flight`, between two decode steps, the completions being generated
    going on with the new weights (their tokens carry both versions). `in_flight` needs
    buffer.max_policy_lag >= 1."""
    max_in_flight: Annotated[int, Bound(ge=1)] = 16
    """`in_flight`: most groups an engine generates at once; new prompts are admitted as
    others finish (between rounds every group of a round is admitted at once)."""

    def problems(self, prefix: str) -> list[str]:
        return super().problems(prefix) + [*self.validate_rewards_named(prefix),
                                           *self.validate_one_weight_per_reward(prefix),
                                           *self.validate_rewards_exist(prefix)]

    def validate_rewards_named(self, prefix: str) -> Iterator[str]:
        if not self.rewards:
            yield f"{prefix}rewards must name at least one reward function"

    def validate_one_weight_per_reward(self, prefix: str) -> Iterator[str]:
        if self.reward_weights and len(self.reward_weights) != len(self.rewards):
            yield (f"{prefix}reward_weights has {len(self.reward_weights)} weights for "
                   f"{len(self.rewards)} reward functions")

    def validate_rewards_exist(self, prefix: str) -> Iterator[str]:
        from common import rewards  # the reward plug-ins may import much

        for name in self.rewards:
            if rewards.is_reward_model(name):
                from common import models

                problem = models.reward_model_problem(name.removeprefix(rewards.MODEL_PREFIX))
                if problem:
                    yield f"{prefix}rewards: {name}: {problem}"
                continue
            try:
                rewards.resolve(name)
            except rewards.RewardError as e:
                yield f"{prefix}rewards: {e}"


@dataclass
class EnvConfig(Section):
    """Multi-turn episodes: an environment answers each model turn until it is done. Off (empty
    `name`), a rollout is one completion scored by rollout.rewards."""

    name: str = ""
    """A skyrl-gym text environment (`skyrl_gym.envs.BaseTextEnv`): a registered id such as
    `gsm8k_multi_turn`, or `package.module:Class`. Built once per episode with the dataset row's
    other columns as its `extras` (plus `max_turns`), as SkyRL builds it. Its rewards, summed
    over the turns, are the episode's reward; rollout.rewards does not apply."""
    max_turns: Annotated[int, Bound(ge=1)] = 4
    """Most model turns per episode (the environment may end it sooner)."""
    max_episode_tokens: Annotated[int, Bound(ge=1)] = 128
    """Most tokens after the prompt, the model's and the environment's together; an episode
    that would pass it (or model.max_model_len) ends there, truncated (`length`)."""
    step_timeout_s: Annotated[float, Bound(gt=0)] = 30.0
    """Longest one environment call (make, init, step, close) may take."""
    on_error: Literal["fail", "drop"] = "fail"
    """An environment that raises, answers malformed or times out: `fail` stops the run in one
    line naming it and the episode; `drop` leaves the episode out of the loss (reward NaN),
    logs one line and counts it in `env_errors`."""
    threads: Annotated[int, Bound(ge=1)] = 32
    """Threads running environment calls per rollout worker: episodes waiting on their
    environment at once (a hung call holds one until the process ends)."""

    def problems(self, prefix: str) -> list[str]:
        return super().problems(prefix) + [*self.validate_environment_exists(prefix)]

    def validate_environment_exists(self, prefix: str) -> Iterator[str]:
        if self.name:
            from common import environments  # imports the plug-in

            try:
                environments.resolve(self.name)
            except environments.EnvError as e:
                yield f"{prefix}name: {e}"


@dataclass
class GRPOConfig(Section):
    """The GRPO objective: groups, advantages, the clipped ratio, KL, off-policy correction.
    Field names and meanings are TRL's GRPOConfig's (README: "Coming from TRL")."""

    group_size: Annotated[int, Bound(ge=2, why="for group-relative advantages")] = 8
    """Completions sampled per prompt (G); advantages are relative within a group."""
    batch_size: Annotated[int, Bound(ge=1)] = 32
    """Completions per learner step; a multiple of `group_size`."""
    loss_type: Literal["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo"] = "dapo"
    """The loss, as TRL defines each: `grpo` mean per sequence, then over sequences; `bnpo` sum
    over a micro-batch's tokens over their count; `dapo` sum over all completion tokens over
    their count; `dr_grpo` sum over (sequences x max_tokens); `cispo` the clipped ratio as a
    detached weight of the log-prob (MiniMax-M1); `sapo` a soft gate instead of the clip."""
    scale_rewards: Literal["group", "batch", "none"] = "group"
    """Divide centred rewards by the group's std, the batch's std, or nothing (Dr. GRPO)."""
    epsilon: Annotated[float, Bound(gt=0)] = 0.2
    """Lower clip range of the policy ratio: ratios below 1 - epsilon are clipped."""
    epsilon_high: Annotated[float | None, Bound(gt=0)] = None
    """Upper clip range (DAPO clip-higher); None means `epsilon`. For `cispo` the cap of the
    ratio itself (TRL recommends 5.0)."""
    delta: Annotated[float | None, Bound(gt=1)] = None
    """Two-sided clip (INTELLECT-2): the unclipped ratio is capped at delta too; keep it above
    1 + epsilon_high. None: off."""
    importance_sampling_level: Literal["token", "sequence"] = "token"
    """The policy ratio per token, or per sequence as the exponent of its mean log-ratio
    (GSPO)."""
    beta: Annotated[float, Bound(ge=0)] = 0.0
    """Coefficient of the k3 KL penalty to the frozen reference model; 0 loads no reference."""
    use_bias_correction_kl: bool = True
    """Multiply the k3 KL term by the policy ratio, an unbiased estimate off-policy
    (DeepSeek-V3.2, TRL's default); False: plain k3. Matters only with beta > 0."""
    num_iterations: Annotated[int, Bound(ge=1)] = 1
    """Optimizer passes over each batch (mu in the GRPO paper)."""
    sapo_temperature_pos: Annotated[float, Bound(gt=0)] = 1.0
    """`sapo`: temperature of the soft gate where the advantage is positive."""
    sapo_temperature_neg: Annotated[float, Bound(gt=0)] = 1.05
    """`sapo`: temperature of the soft gate where the advantage is zero or negative."""
    vllm_importance_sampling_correction: bool = True
    """Weight each token's loss by pi_old / pi_behaviour, where pi_behaviour is the engine's
    log-prob of the sampled token: corrects for stale rollouts and for vLLM's numerics."""
    vllm_importance_sampling_mode: Literal["token_truncate", "token_mask", "sequence_truncate",
                                           "sequence_mask"] = "token_truncate"
    """Per token or per sequence (the exponent of the summed log-differences); `truncate`
    clamps the weight into [clip_min, clip_max], `mask` zeroes weights outside it. TRL's default
    is `sequence_mask`; this project's is per-token truncation."""
    vllm_importance_sampling_clip_min: Annotated[float | None, Bound(ge=0)] = None
    """Lower bound of the importance weight; None: none."""
    vllm_importance_sampling_clip_max: Annotated[float, Bound(gt=0)] = 3.0
    """Upper bound of the importance weight."""
    mask_truncated_completions: bool = False
    """Leave completions cut off at rollout.max_tokens (finish reason `length`) out of the
    loss, so an unfinished answer is not trained on as a wrong one (DAPO's overlong filter)."""
    drop_zero_std_groups: bool = False
    """Dynamic sampling (DAPO): leave out groups whose G rewards are all equal (they carry no
    signal) and generate more until the batch is full."""
    max_extra_rounds: Annotated[int, Bound(ge=0)] = 10
    """Dynamic sampling: most extra rounds of generation (each of batch_size completions) per
    step before the run stops for want of groups with signal."""

    def problems(self, prefix: str) -> list[str]:
        return super().problems(prefix) + [*self.validate_batch_is_whole_groups(prefix),
                                           *self.validate_importance_clip_range(prefix),
                                           *self.validate_cispo_cap(prefix)]

    def validate_batch_is_whole_groups(self, prefix: str) -> Iterator[str]:
        if self.group_size >= 1 and self.batch_size >= 1 and self.batch_size % self.group_size:
            yield (f"{prefix}batch_size ({self.batch_size}) must be a multiple of "
                   f"{prefix}group_size ({self.group_size})")

    def validate_importance_clip_range(self, prefix: str) -> Iterator[str]:
        low, high = self.vllm_importance_sampling_clip_min, self.vllm_importance_sampling_clip_max
        if low is not None and low >= high > 0:
            yield (f"{prefix}vllm_importance_sampling_clip_min ({low}) must be below "
                   f"{prefix}vllm_importance_sampling_clip_max ({high})")

    def validate_cispo_cap(self, prefix: str) -> Iterator[str]:
        if self.loss_type == "cispo" and self.epsilon_high is None:
            yield (f"{prefix}loss_type cispo caps the ratio at {prefix}epsilon_high: set it "
                   "(TRL recommends 5.0; unset, TRL would cap it at epsilon, 0.2)")


@dataclass
class BufferConfig(Section):
    """The buffer between the workers and the learner: how stale a group may be."""

    max_policy_lag: Annotated[int, Bound(ge=0)] = 0
    """0: synchronous (on-policy) GRPO. k >= 1: generation runs up to k policy versions
    ahead of training; groups older than that are dropped and counted."""
    capacity: Annotated[int, Bound(ge=0)] = 0
    """Most groups held; producers wait when it is full. 0 means enough for
    `max_policy_lag + 1` batches."""
    timeout_s: Annotated[float, Bound(gt=0)] = 600.0
    """Longest wait for a batch (learner) or for room (workers) before the run fails."""


@dataclass
class RewardModelConfig(ActorResources):
    """The actors of each `model:PATH` reward in rollout.rewards: a sequence-classification
    model scoring completions beside the engines, on resources of its own."""

    num_workers: Annotated[int, Bound(ge=1)] = 1
    """Actors per reward model; the rollout workers send them groups in turn."""


@dataclass
class LearnerConfig(ActorResources):
    """The learner: optimizer, schedule, micro-batches, checkpoints, and its resources."""

    num_ranks: Annotated[int, Bound(ge=1)] = 1
    """Processes the learner runs as, the model sharded over them with FSDP2 (one GPU each on a
    GPU cluster); each trains on its share of every batch's sequences. More than one lets a
    model train whose weights, gradients and AdamW state do not fit one device (see the README's
    table per Pythia size)."""
    learning_rate: Annotated[float | None, Bound(gt=0)] = None
    """AdamW learning rate; None means the model's own default (3e-2 for the random-init
    `tiny` preset, 1e-6 for Pythia-sized models), settled when the config is made and saved
    with the run."""
    lr_schedule: Literal["constant", "linear", "cosine"] = "constant"
    """Learning-rate schedule after warm-up."""
    warmup_steps: Annotated[int, Bound(ge=0)] = 0
    """Steps of linear warm-up."""
    weight_decay: Annotated[float, Bound(ge=0)] = 0.0
    """AdamW weight decay."""
    max_grad_norm: Annotated[float, Bound(ge=0)] = 1.0
    """Clip the global gradient norm to this; 0 disables clipping."""
    micro_batch_size: Annotated[int, Bound(ge=1)] = 16
    """Sequences per forward/backward pass; gradients accumulate over the batch."""
    checkpoint_every: Annotated[int, Bound(ge=0)] = 10
    """Save a resumable checkpoint every this many steps (and always at the end); 0 only at
    the end."""
    keep_checkpoints: Annotated[int, Bound(ge=1)] = 2
    """Most recent checkpoints kept on disk."""
    # LoRA, with the names of peft's LoraConfig (r, lora_alpha, lora_dropout, target_modules).
    lora_rank: Annotated[int, Bound(ge=0, le=512, why="(vLLM's largest max_lora_rank)")] = 0
    """0 trains every weight. Above 0, a LoRA adapter of this rank (peft's `r`) trains on
    `lora_target_modules` and the model under it stays frozen: only the adapter has gradients
    and AdamW state, only the adapter travels to the engines (which serve it with vLLM's LoRA
    support), and with `grpo.beta` the reference model is the same model with the adapter off.
    Checkpoints hold the adapter; the final model has it merged, and holds it alone in
    `adapter/` beside."""
    lora_alpha: Annotated[float, Bound(gt=0)] = 16.0
    """The adapter's update BA is scaled by `lora_alpha / lora_rank`."""
    lora_dropout: Annotated[float, Bound(ge=0, le=1)] = 0.0
    """Dropout on the adapter's input while training. Above 0 the learner's log-probs are no
    longer the engines' (they run without it), so the importance weights move off 1."""
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"])
    """Layers that get an adapter, by the last part of their module name (peft's
    `target_modules`); the default is every linear layer of a GPT-NeoX (Pythia) block."""

    def problems(self, prefix: str) -> list[str]:
        return super().problems(prefix) + [*self.validate_lora_targets(prefix)]

    def validate_lora_targets(self, prefix: str) -> Iterator[str]:
        if not self.lora_target_modules:
            yield f"{prefix}lora_target_modules is empty: a LoRA adapter needs layers to adapt"


@dataclass
class ClusterConfig(Section):
    """Where the actors run and how they talk: Ray, devices, weight sync, timeouts."""

    address: str = ""
    """Ray cluster to join: empty starts a local instance (or joins the job's cluster under
    `ray job submit`); `auto` or `host:port` joins a running one."""
    device: Literal["auto", "cpu", "gpu"] = "auto"
    """Where engines and the learner run: `auto` is `gpu` where the driver's machine has a CUDA
    device and vLLM's CUDA build, else `cpu` (a cluster whose head node has no GPU: say `gpu`);
    `gpu` needs vLLM's CUDA build."""
    weight_sync: Literal["auto", "broadcast", "shm"] = "auto"
    """How new weights reach the engines: `broadcast` (torch.distributed, gloo on CPU, NCCL
    on GPU, works across nodes) or `shm` (shared memory, CPU engines on the learner's node).
    `auto` picks `shm` where it can."""
    # The broadcast group's settings; `shm` has no group, no port and no buckets.
    weight_sync_timeout_s: Annotated[float, Bound(gt=0)] = 120.0
    """Longest a weight broadcast waits for a group member; then it fails, and the group is
    formed again (a member that died mid-broadcast would otherwise stall every other)."""
    weight_sync_port: Annotated[int, Bound(ge=0, le=65535)] = 0
    """Port of the broadcast group's rendezvous on the learner's node; 0 takes any free one.
    Set one where a firewall only opens known ports."""
    sync_bucket_mb: Annotated[int, Bound(ge=1)] = 256
    """Broadcast tensors in flat buckets of about this size instead of one at a time."""
    weight_check_tolerance: Annotated[float | None, Bound(ge=0)] = None
    """After every weight sync every engine and the learner score the same probe sequences;
    a mean per-token log-prob difference above this stops the run (the engines would be
    sampling from other weights). None: 1e-3 in float32; in 16 bits 3x the learner's own
    rounding of the probes (its float32 weights against them cast to the engines' dtype), at
    least 0.005, or on a sharded learner 0.1 in bfloat16 and 0.05 in float16; 0: off."""
    rollout_resource: str = ""
    """Custom Ray resource every rollout worker asks for (one unit each), to pin the workers
    to the nodes that offer it."""
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    """Ray placement-group strategy for the learner's and the workers' bundles."""
    num_cpus: Annotated[int, Bound(ge=0)] = 0
    """Local Ray instance only: logical CPUs to offer; 0 means what the run asks for or the
    machine's count, whichever is larger."""
    call_timeout_s: Annotated[float, Bound(gt=0)] = 900.0
    """Longest wait for any single actor call (generate, train step, weight sync)."""
    max_worker_restarts: Annotated[int, Bound(ge=0)] = 3
    """Times Ray restarts a rollout worker that died; its lost groups are counted and
    generated again."""

    def __post_init__(self):
        # Settled where the config is made (the driver), so every actor gets the same answer
        # wherever Ray puts it.
        if self.device == "auto":
            from common import models

            self.device = models.detect_device()


@dataclass
class LoggingConfig(Section):
    """What a run reports, and where."""

    wandb: bool = False
    """Also log to Weights & Biases (`WANDB_MODE=offline` works without a network)."""
    wandb_project: str = "grpo-ray"
    """W&B project name."""
    progress: Literal["bar", "lines"] = "bar"
    """A live progress bar, or one plain line per step (better for job logs)."""
    eval_every: Annotated[int, Bound(ge=0)] = 0
    """Score the eval split every this many steps; 0 only before and after training."""


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    env: EnvConfig = field(default_factory=EnvConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    buffer: BufferConfig = field(default_factory=BufferConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    reward_model: RewardModelConfig = field(default_factory=RewardModelConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    steps: Annotated[int, Bound(ge=1)] = 40
    """Learner steps (policy updates) to run."""
    seed: int = 0
    """Seeds the prompt order, the sampling and the learner."""
    run_dir: str = ""
    """Run directory: config, metrics, checkpoints, final model; empty means a new
    `runs/<date>-<time>`, or under `ray job submit` (whose working directory is deleted with
    the job) `$GRPO_RAY_RUNS/<date>-<time>-<job id>`, default `~/grpo-ray/runs`. On a
    multi-node cluster give a directory on storage the head and the learner's node share."""
    resume: bool = False
    """Continue from the last checkpoint in `run_dir`."""
    stop_after: Annotated[int, Bound(ge=0)] = 0
    """Stop (with a checkpoint) after this many steps of this invocation, as if interrupted;
    0 runs to `steps`."""

    def __post_init__(self):
        # The learning rate the run uses, settled once for the model it trains, so that code
        # reads `learner.learning_rate` alone. Made from the command line, this Config is made
        # last, with the final model; made in code, it keeps the rate of the model it was made
        # with, so code that changes the model afterwards sets the rate too.
        if self.learner.learning_rate is None:
            from common import models  # torch is heavier than this module

            lr = models.default_learning_rate(self.model.name)
            self.learner = dataclasses.replace(self.learner, learning_rate=lr)

    def problems(self) -> list[str]:
        """Every problem that would stop or spoil the run, one line each: the run's own fields',
        each section's, then the rules that tie sections together."""
        lines = out_of_bounds(self, "") + [*self.validate_resume_has_run_dir()]
        for name in ("grpo", "rollout", "env", "learner", "reward_model", "buffer", "data", "cluster", "logging"):
            lines += getattr(self, name).problems(f"{name}.")
        for rule in (self.validate_capacity_holds_a_batch, self.validate_batch_splits_over_ranks,
                     self.validate_in_flight_has_lag, self.validate_sequence_fits_model,
                     self.validate_no_gpus_on_cpu, self.validate_tensor_parallel_on_gpu,
                     self.validate_engine_gpus, self.validate_learner_gpu,
                     self.validate_shm_on_cpu, self.validate_rewards_or_environment,
                     self.validate_compile_without_lora):
            lines += rule()
        return lines + self.model.problems("model.")

    def validate_resume_has_run_dir(self) -> Iterator[str]:
        if self.resume and not self.run_dir:
            yield "resume needs --run-dir: the run to continue"

    def validate_capacity_holds_a_batch(self) -> Iterator[str]:
        grpo, capacity = self.grpo, self.buffer.capacity
        if capacity > 0 and grpo.group_size >= 1 and grpo.batch_size >= grpo.group_size \
                and capacity < self.prompts_per_step:
            yield (f"buffer.capacity ({capacity} groups) cannot hold one batch "
                   f"({self.prompts_per_step} groups)")

    def validate_batch_splits_over_ranks(self) -> Iterator[str]:
        batch, ranks = self.grpo.batch_size, self.learner.num_ranks
        if ranks >= 1 and batch % ranks:
            yield (f"grpo.batch_size ({batch}) must be a multiple of learner.num_ranks ({ranks}): "
                   f"each rank trains on an equal share")

    def validate_in_flight_has_lag(self) -> Iterator[str]:
        if self.rollout.weight_update == "in_flight" and self.buffer.max_policy_lag < 1:
            yield ("rollout.weight_update in_flight needs buffer.max_policy_lag >= 1: with 0 "
                   "nothing is being generated when the weights change")

    def validate_sequence_fits_model(self) -> Iterator[str]:
        prompt, completion, most = (self.data.max_prompt_tokens, self.rollout.max_tokens,
                                    self.model.max_model_len)
        if most >= 1 and prompt + completion > most:
            yield (f"data.max_prompt_tokens ({prompt}) + rollout.max_tokens ({completion}) "
                   f"exceeds model.max_model_len ({most})")

    def validate_no_gpus_on_cpu(self) -> Iterator[str]:
        for role in ("rollout", "learner", "reward_model"):
            if self.cluster.device == "cpu" and self.gpus(role) > 0:
                yield f"cluster.device is cpu but {role}.num_gpus is set"

    def validate_tensor_parallel_on_gpu(self) -> Iterator[str]:
        if self.cluster.device == "cpu" and self.rollout.tensor_parallel_size > 1:
            yield "rollout.tensor_parallel_size > 1 needs cluster.device gpu"

    # GPUs that would sit idle are refused: an engine uses exactly its tensor-parallel GPUs, and
    # the learner is one process on one GPU.
    def validate_engine_gpus(self) -> Iterator[str]:
        tp = self.rollout.tensor_parallel_size
        if self.cluster.device != "cpu" and self.gpus("rollout") != tp:
            yield (f"rollout.num_gpus ({self.rollout.num_gpus}) must equal "
                   f"rollout.tensor_parallel_size ({tp})")

    def validate_learner_gpu(self) -> Iterator[str]:
        if self.cluster.device != "cpu" and self.gpus("learner") != 1:
            yield f"learner.num_gpus must be 1 on a GPU cluster (got {self.learner.num_gpus})"

    def validate_shm_on_cpu(self) -> Iterator[str]:
        if self.cluster.device != "cpu" and self.cluster.weight_sync == "shm":
            yield "cluster.weight_sync shm is for CPU engines; use broadcast (NCCL) on GPU"

    def validate_rewards_or_environment(self) -> Iterator[str]:
        if self.env.name and self.rollout.rewards != RolloutConfig.rewards:
            yield (f"env.name ({self.env.name}) scores the episodes; rollout.rewards "
                   f"({', '.join(self.rollout.rewards)}) does not apply with it: leave it unset")

    def validate_compile_without_lora(self) -> Iterator[str]:
        # vllm/platforms/cpu.py, CpuPlatform.check_and_update_config: CompilationMode.NONE
        # whenever a LoRA config is set.
        if self.cluster.device == "cpu" and self.rollout.compile and self.learner.lora_rank:
            yield ("rollout.compile: vLLM runs CPU engines that serve a LoRA adapter "
                   "(learner.lora_rank) uncompiled; leave it off")

    def gpus(self, role: Literal["rollout", "learner", "reward_model"]) -> float:
        """GPUs for each of `role`'s actors: its `num_gpus`, or when unset what the device
        implies (none on a CPU; an engine's tensor-parallel ranks, or one for the learner and
        each reward model)."""
        chosen = getattr(self, role).num_gpus
        if chosen is not None:
            return chosen
        if self.cluster.device != "gpu":
            return 0
        return self.rollout.tensor_parallel_size if role == "rollout" else 1

    @property
    def prompts_per_step(self) -> int:
        return self.grpo.batch_size // self.grpo.group_size


def cpu_threads(cfg: Config, role: Literal["rollout", "learner", "reward_model"], cores: int) -> int:
    """Threads for a CPU actor of `role` on a node with `cores` cores, when `threads` is 0. In a
    synchronous run generation and training take turns, so each uses the node's cores (the
    rollout workers share them, and the learner's ranks do); when they overlap, each keeps to
    its Ray CPUs, so that actors on one machine do not fight over cores. A reward model scores
    while the engines generate: it keeps to its Ray CPUs."""
    section = getattr(cfg, role)
    if section.threads:
        return section.threads
    if cfg.buffer.max_policy_lag == 0 and role != "reward_model":
        return max(1, cores // (cfg.rollout.num_workers if role == "rollout" else cfg.learner.num_ranks))
    return max(1, int(section.num_cpus))


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def validate(cfg: Config) -> list[str]:
    """Every problem with `cfg` that would stop or spoil the run, one line each."""
    return cfg.problems()
