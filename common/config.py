"""The run configuration: one root object with a section per role, a docstring per field.

Loaded from a YAML file (see deploy/configs/) and overridden on the command line, e.g.
`python -m deploy.train deploy/configs/tiny.yaml --grpo.epsilon 0.2 --rollout.num-workers 2`.
`validate` checks the whole object once, before anything starts.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

import yaml


class ConfigError(ValueError):
    """A configuration the run cannot start with; `problems` holds one line per mistake."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


class Section:
    """A config section: its fields, and in `RULES` the bound each numeric one must keep, worded
    as the error line words it (`"temperature": "> 0"` reads "rollout.temperature must be > 0
    (got -1)"). Rules that tie several fields together are code, in `problems`."""

    RULES: ClassVar[dict[str, str]] = {}

    def problems(self, prefix: str) -> list[str]:
        """One line per broken rule of this section (its own and its base classes'), each field
        named as `prefix` + its name."""
        rules = {name: rule for cls in reversed(type(self).__mro__) for name, rule in
                 vars(cls).get("RULES", {}).items()}
        return [f"{prefix}{name} must be {rule} (got {getattr(self, name)})"
                for name, rule in rules.items() if not _keeps(getattr(self, name), rule)]


def _keeps(value: float | None, rule: str) -> bool:
    """Whether `value` keeps `rule`: `>= 1`, `> 0` (either may go on to say why),
    `in 0..65535` (ends included) or `in (0, 1]`; None is an optional field left unset."""
    if value is None:
        return True
    if rule.startswith("in ("):
        low, high = map(float, rule.removeprefix("in (").removesuffix("]").split(", "))
        return low < value <= high
    if rule.startswith("in "):
        low, high = map(float, rule.removeprefix("in ").split(".."))
        return low <= value <= high
    op, bound = rule.split(" ")[:2]
    return value >= float(bound) if op == ">=" else value > float(bound)


@dataclass
class ModelConfig(Section):
    """The policy: which model, in which dtype, how long its sequences may be."""

    RULES = {"max_model_len": ">= 1"}

    name: str = "tiny"
    """Policy to train: a preset (`tiny`, `pythia-70m-shape`, `pythia-410m-shape`,
    `pythia-1.4b-shape`), a local Hugging Face model directory, or a hub id such as
    `EleutherAI/pythia-410m-deduped`."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Weights and compute dtype: `auto` is float32 on CPU and bfloat16 on GPU."""
    max_model_len: int = 512
    """Longest prompt plus completion, in tokens, for the engines and the learner."""
    cache_dir: str = ""
    """Where presets are built once and kept; empty means `$GRPO_RAY_CACHE` or
    `~/.cache/grpo-ray`."""

    def problems(self, prefix: str) -> list[str]:
        from common import models  # torch is heavier than this module

        problem = models.check_name(self.name)
        return super().problems(prefix) + ([f"{prefix}name: {problem}"] if problem else [])


@dataclass
class DataConfig(Section):
    """The prompts: where they come from and how they are rendered and cut."""

    RULES = {"max_prompt_tokens": ">= 1", "eval_prompts": ">= 0"}

    dataset: str = "bundled"
    """Prompt source: `bundled` (the project's open-ended questions), a Hugging Face dataset
    name, or a local .json/.jsonl/.parquet file."""
    prompt_column: str = "prompt"
    """Column that holds the prompt: a string, or a list of chat messages."""
    train_split: str = "train"
    """Split to train on."""
    eval_split: str = "eval"
    """Split to measure the reward on before and after training; empty for none."""
    eval_prompts: int = 32
    """How many eval-split prompts to score (0 for all)."""
    max_prompt_tokens: int = 128
    """Prompts longer than this (after the chat template) are handled as `overlong` says."""
    overlong: Literal["truncate", "skip"] = "skip"
    """What to do with a prompt over `max_prompt_tokens`: keep its last tokens, or skip it;
    either way it is counted."""
    chat_template: bool = True
    """Wrap each prompt as a user message and render it with the tokenizer's chat template."""


@dataclass
class ActorResources(Section):
    """What each actor of a role asks of Ray, and of the machine."""

    RULES = {"num_cpus": "> 0", "num_gpus": ">= 0", "threads": ">= 0"}

    num_cpus: float = 1
    """Ray CPUs reserved for each of this role's actors."""
    num_gpus: float | None = None
    """Ray GPUs for each of this role's actors; unset: none on a CPU, and on a GPU a rollout
    worker's `tensor_parallel_size` or the learner's 1."""
    threads: int = 0
    """CPU only: torch and OpenMP threads of each of this role's actors; 0 chooses (see
    `cpu_threads`)."""


@dataclass
class RolloutConfig(ActorResources):
    """The rollout workers: how many, how they sample, how completions are scored."""

    RULES = {"num_workers": ">= 1", "max_tokens": ">= 1",
             "temperature": "> 0", "top_p": "in (0, 1]", "tensor_parallel_size": ">= 1",
             "gpu_memory_utilization": "in (0, 1]", "kv_cache_gib": "> 0", "max_in_flight": ">= 1"}

    num_workers: int = 1
    """Rollout workers, each owning one vLLM engine."""
    max_tokens: int = 24
    """Most tokens generated per completion."""
    temperature: float = 1.0
    """Sampling temperature (the learner's log-probs use the same one)."""
    top_p: float = 1.0
    """Nucleus sampling; 1.0 samples from the full distribution, which GRPO assumes."""
    rewards: tuple[str, ...] = ("explicit_pos",)
    """Reward functions: built-in names (see common/rewards.py) or `module:function` paths."""
    reward_weights: tuple[float, ...] = ()
    """One weight per reward function; empty means 1.0 each."""
    tensor_parallel_size: int = 1
    """GPU only: GPUs one engine shards the model over."""
    gpu_memory_utilization: float = 0.85
    """GPU only: fraction of each GPU's memory vLLM may take."""
    kv_cache_gib: float = 1.0
    """CPU only: KV-cache space per engine in GiB (vLLM's default would be half the RAM)."""
    weight_update: Literal["between_rounds", "in_flight"] = "between_rounds"
    """When a new policy reaches an engine: `between_rounds`, once it has finished what it
    was generating; `in_flight`, between two decode steps, the completions being generated
    going on with the new weights (their tokens carry both versions). `in_flight` needs
    buffer.max_policy_lag >= 1."""
    max_in_flight: int = 16
    """`in_flight`: most groups an engine generates at once; new prompts are admitted as
    others finish (between rounds every group of a round is admitted at once)."""

    def problems(self, prefix: str) -> list[str]:
        from common import rewards  # the reward plug-ins may import much

        lines = super().problems(prefix)
        if not self.rewards:
            lines.append(f"{prefix}rewards must name at least one reward function")
        if self.reward_weights and len(self.reward_weights) != len(self.rewards):
            lines.append(f"{prefix}reward_weights has {len(self.reward_weights)} weights for "
                         f"{len(self.rewards)} reward functions")
        for name in self.rewards:
            try:
                rewards.resolve(name)
            except rewards.RewardError as e:
                lines.append(f"{prefix}rewards: {e}")
        return lines


@dataclass
class GRPOConfig(Section):
    """The GRPO objective: groups, advantages, the clipped ratio, KL, off-policy correction.
    Field names and meanings are TRL's GRPOConfig's (README: "Coming from TRL")."""

    RULES = {"group_size": ">= 2 for group-relative advantages", "batch_size": ">= 1",
             "epsilon": "> 0", "epsilon_high": "> 0", "delta": "> 1", "beta": ">= 0",
             "num_iterations": ">= 1", "sapo_temperature_pos": "> 0", "sapo_temperature_neg": "> 0",
             "vllm_importance_sampling_clip_min": ">= 0", "vllm_importance_sampling_clip_max": "> 0",
             "max_extra_rounds": ">= 0"}

    group_size: int = 8
    """Completions sampled per prompt (G); advantages are relative within a group."""
    batch_size: int = 32
    """Completions per learner step; a multiple of `group_size`."""
    loss_type: Literal["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo"] = "dapo"
    """The loss, as TRL defines each: `grpo` mean per sequence, then over sequences; `bnpo` sum
    over a micro-batch's tokens over their count; `dapo` sum over all completion tokens over
    their count; `dr_grpo` sum over (sequences x max_tokens); `cispo` the clipped ratio as a
    detached weight of the log-prob (MiniMax-M1); `sapo` a soft gate instead of the clip."""
    scale_rewards: Literal["group", "batch", "none"] = "group"
    """Divide centred rewards by the group's std, the batch's std, or nothing (Dr. GRPO)."""
    epsilon: float = 0.2
    """Lower clip range of the policy ratio: ratios below 1 - epsilon are clipped."""
    epsilon_high: float | None = None
    """Upper clip range (DAPO clip-higher); None means `epsilon`. For `cispo` the cap of the
    ratio itself (TRL recommends 5.0)."""
    delta: float | None = None
    """Two-sided clip (INTELLECT-2): the unclipped ratio is capped at delta too; keep it above
    1 + epsilon_high. None: off."""
    importance_sampling_level: Literal["token", "sequence"] = "token"
    """The policy ratio per token, or per sequence as the exponent of its mean log-ratio
    (GSPO)."""
    beta: float = 0.0
    """Coefficient of the k3 KL penalty to the frozen reference model; 0 loads no reference."""
    use_bias_correction_kl: bool = True
    """Multiply the k3 KL term by the policy ratio, an unbiased estimate off-policy
    (DeepSeek-V3.2, TRL's default); False: plain k3. Matters only with beta > 0."""
    num_iterations: int = 1
    """Optimizer passes over each batch (mu in the GRPO paper)."""
    sapo_temperature_pos: float = 1.0
    """`sapo`: temperature of the soft gate where the advantage is positive."""
    sapo_temperature_neg: float = 1.05
    """`sapo`: temperature of the soft gate where the advantage is zero or negative."""
    vllm_importance_sampling_correction: bool = True
    """Weight each token's loss by pi_old / pi_behaviour, where pi_behaviour is the engine's
    log-prob of the sampled token: corrects for stale rollouts and for vLLM's numerics."""
    vllm_importance_sampling_mode: Literal["token_truncate", "token_mask", "sequence_truncate",
                                           "sequence_mask"] = "token_truncate"
    """Per token or per sequence (the exponent of the summed log-differences); `truncate`
    clamps the weight into [clip_min, clip_max], `mask` zeroes weights outside it. TRL's default
    is `sequence_mask`; this project keeps the per-token truncation it always had."""
    vllm_importance_sampling_clip_min: float | None = None
    """Lower bound of the importance weight; None: none."""
    vllm_importance_sampling_clip_max: float = 3.0
    """Upper bound of the importance weight."""
    mask_truncated_completions: bool = False
    """Leave completions cut off at rollout.max_tokens (finish reason `length`) out of the
    loss, so an unfinished answer is not trained on as a wrong one (DAPO's overlong filter)."""
    drop_zero_std_groups: bool = False
    """Dynamic sampling (DAPO): leave out groups whose G rewards are all equal (they carry no
    signal) and generate more until the batch is full."""
    max_extra_rounds: int = 10
    """Dynamic sampling: most extra rounds of generation (each of batch_size completions) per
    step before the run stops for want of groups with signal."""

    def problems(self, prefix: str) -> list[str]:
        lines = super().problems(prefix)
        if self.group_size >= 1 and self.batch_size >= 1 and self.batch_size % self.group_size:
            lines.append(f"{prefix}batch_size ({self.batch_size}) must be a multiple of "
                         f"{prefix}group_size ({self.group_size})")
        low, high = self.vllm_importance_sampling_clip_min, self.vllm_importance_sampling_clip_max
        if low is not None and low >= high > 0:
            lines.append(f"{prefix}vllm_importance_sampling_clip_min ({low}) must be below "
                         f"{prefix}vllm_importance_sampling_clip_max ({high})")
        if self.loss_type == "cispo" and self.epsilon_high is None:
            lines.append(f"{prefix}loss_type cispo caps the ratio at {prefix}epsilon_high: set it "
                         "(TRL recommends 5.0; unset, TRL would cap it at epsilon, 0.2)")
        return lines


@dataclass
class BufferConfig(Section):
    """The buffer between the workers and the learner: how stale a group may be."""

    RULES = {"max_policy_lag": ">= 0", "capacity": ">= 0", "timeout_s": "> 0"}

    max_policy_lag: int = 0
    """0: synchronous (on-policy) GRPO. k >= 1: generation runs up to k policy versions
    ahead of training; groups older than that are dropped and counted."""
    capacity: int = 0
    """Most groups held; producers wait when it is full. 0 means enough for
    `max_policy_lag + 1` batches."""
    timeout_s: float = 600.0
    """Longest wait for a batch (learner) or for room (workers) before the run fails."""


@dataclass
class LearnerConfig(ActorResources):
    """The learner: optimizer, schedule, micro-batches, checkpoints, and its resources."""

    RULES = {"learning_rate": "> 0", "warmup_steps": ">= 0",
             "weight_decay": ">= 0", "max_grad_norm": ">= 0", "micro_batch_size": ">= 1",
             "checkpoint_every": ">= 0", "keep_checkpoints": ">= 1", "num_ranks": ">= 1"}

    num_ranks: int = 1
    """Processes the learner runs as, the model sharded over them with FSDP2 (one GPU each on a
    GPU cluster); each trains on its share of every batch's sequences. More than one lets a
    model train whose weights, gradients and AdamW state do not fit one device (see the README's
    table per Pythia size)."""
    learning_rate: float | None = None
    """AdamW learning rate; None means the model's own default (3e-2 for the random-init
    `tiny` preset, 1e-6 for Pythia-sized models)."""
    lr_schedule: Literal["constant", "linear", "cosine"] = "constant"
    """Learning-rate schedule after warm-up."""
    warmup_steps: int = 0
    """Steps of linear warm-up."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this; 0 disables clipping."""
    micro_batch_size: int = 16
    """Sequences per forward/backward pass; gradients accumulate over the batch."""
    checkpoint_every: int = 10
    """Save a resumable checkpoint every this many steps (and always at the end); 0 only at
    the end."""
    keep_checkpoints: int = 2
    """Most recent checkpoints kept on disk."""


@dataclass
class ClusterConfig(Section):
    """Where the actors run and how they talk: Ray, devices, weight sync, timeouts."""

    RULES = {"weight_sync_timeout_s": "> 0", "weight_check_tolerance": ">= 0",
             "weight_sync_port": "in 0..65535",
             "sync_bucket_mb": ">= 1", "num_cpus": ">= 0", "call_timeout_s": "> 0",
             "max_worker_restarts": ">= 0"}

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
    weight_sync_timeout_s: float = 120.0
    """Longest a weight broadcast waits for a group member; then it fails, and the group is
    formed again (a member that died mid-broadcast would otherwise stall every other)."""
    weight_check_tolerance: float | None = None
    """After every weight sync every engine and the learner score the same probe sequences;
    a mean per-token log-prob difference above this stops the run (the engines would be
    sampling from other weights). None: 1e-3 in float32, 0.1 in bfloat16, 0.05 in float16;
    0: off."""
    weight_sync_port: int = 0
    """Port of the broadcast group's rendezvous on the learner's node; 0 takes any free one.
    Set one where a firewall only opens known ports."""
    sync_bucket_mb: int = 256
    """Broadcast tensors in flat buckets of about this size instead of one at a time."""
    rollout_resource: str = ""
    """Custom Ray resource every rollout worker asks for (one unit each), to pin the workers
    to the nodes that offer it."""
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    """Ray placement-group strategy for the learner's and the workers' bundles."""
    num_cpus: int = 0
    """Local Ray instance only: logical CPUs to offer; 0 means what the run asks for or the
    machine's count, whichever is larger."""
    call_timeout_s: float = 900.0
    """Longest wait for any single actor call (generate, train step, weight sync)."""
    max_worker_restarts: int = 3
    """Times Ray restarts a rollout worker that died; its lost groups are counted and
    generated again."""

    def __post_init__(self):
        # Settled where the config is made (the driver), so every actor gets the same answer
        # wherever Ray puts it.
        if self.device == "auto":
            from common import models  # torch is heavier than this module

            self.device = models.detect_device()[0]


@dataclass
class LoggingConfig(Section):
    """What a run reports, and where."""

    RULES = {"eval_every": ">= 0"}

    wandb: bool = False
    """Also log to Weights & Biases (`WANDB_MODE=offline` works without a network)."""
    wandb_project: str = "grpo-ray"
    """W&B project name."""
    progress: Literal["bar", "lines"] = "bar"
    """A live progress bar, or one plain line per step (better for job logs)."""
    eval_every: int = 0
    """Score the eval split every this many steps; 0 only before and after training."""


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    buffer: BufferConfig = field(default_factory=BufferConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    steps: int = 40
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
    stop_after: int = 0
    """Stop (with a checkpoint) after this many steps of this invocation, as if interrupted;
    0 runs to `steps`."""

    def problems(self) -> list[str]:
        """Every problem that would stop or spoil the run, one line each: the run's own fields',
        each section's, then the rules that tie sections together."""
        lines = [f"{name} must be >= {low} (got {getattr(self, name)})"
                 for name, low in (("steps", 1), ("stop_after", 0)) if getattr(self, name) < low]
        if self.resume and not self.run_dir:
            lines.append("resume needs --run-dir: the run to continue")
        for name in ("grpo", "rollout", "learner", "buffer", "data", "cluster", "logging"):
            lines += getattr(self, name).problems(f"{name}.")
        grpo, rollout, buffer = self.grpo, self.rollout, self.buffer
        if buffer.capacity > 0 and grpo.group_size >= 1 and grpo.batch_size >= grpo.group_size \
                and buffer.capacity < self.prompts_per_step:
            lines.append(f"buffer.capacity ({buffer.capacity} groups) cannot hold one batch "
                         f"({self.prompts_per_step} groups)")
        if self.learner.num_ranks >= 1 and grpo.batch_size % self.learner.num_ranks:
            lines.append(f"grpo.batch_size ({grpo.batch_size}) must be a multiple of "
                         f"learner.num_ranks ({self.learner.num_ranks}): each rank trains on an "
                         f"equal share")
        if rollout.weight_update == "in_flight" and buffer.max_policy_lag < 1:
            lines.append("rollout.weight_update in_flight needs buffer.max_policy_lag >= 1: with 0 "
                         "nothing is being generated when the weights change")
        if self.model.max_model_len >= 1 and \
                self.data.max_prompt_tokens + rollout.max_tokens > self.model.max_model_len:
            lines.append(f"data.max_prompt_tokens ({self.data.max_prompt_tokens}) + rollout.max_tokens "
                         f"({rollout.max_tokens}) exceeds model.max_model_len ({self.model.max_model_len})")
        return lines + self._device_problems() + self.model.problems("model.")

    def _device_problems(self) -> list[str]:
        rollout, cluster = self.rollout, self.cluster
        if cluster.device == "cpu":
            wrong = {"cluster.device is cpu but rollout.num_gpus or learner.num_gpus is set":
                     self.gpus("rollout") > 0 or self.gpus("learner") > 0,
                     "rollout.tensor_parallel_size > 1 needs cluster.device gpu":
                     rollout.tensor_parallel_size > 1}
        else:
            # GPUs that would sit idle are refused: an engine uses exactly its tensor-parallel
            # GPUs, and the learner is one process on one GPU.
            wrong = {f"rollout.num_gpus ({rollout.num_gpus}) must equal rollout.tensor_parallel_size "
                     f"({rollout.tensor_parallel_size})": self.gpus("rollout") != rollout.tensor_parallel_size,
                     f"learner.num_gpus must be 1 on a GPU cluster (got {self.learner.num_gpus})":
                     self.gpus("learner") != 1,
                     "cluster.weight_sync shm is for CPU engines; use broadcast (NCCL) on GPU":
                     cluster.weight_sync == "shm"}
        return [line for line, broken in wrong.items() if broken]

    def gpus(self, role: Literal["rollout", "learner"]) -> float:
        """GPUs for each of `role`'s actors: its `num_gpus`, or when unset what the device
        implies (none on a CPU; an engine's tensor-parallel ranks, or the learner's one)."""
        chosen = getattr(self, role).num_gpus
        if chosen is not None:
            return chosen
        if self.cluster.device != "gpu":
            return 0
        return self.rollout.tensor_parallel_size if role == "rollout" else 1

    @property
    def prompts_per_step(self) -> int:
        return self.grpo.batch_size // self.grpo.group_size

    @property
    def learning_rate(self) -> float:
        """`learner.learning_rate`, or the model's own default when it is None."""
        from common import models  # torch is heavier than this module

        return self.learner.learning_rate or models.default_learning_rate(self.model.name)


def cpu_threads(cfg: Config, role: Literal["rollout", "learner"], cores: int) -> int:
    """Threads for a CPU actor of `role` on a node with `cores` cores, when `threads` is 0. In a
    synchronous run generation and training take turns, so each uses the node's cores (the
    rollout workers share them, and the learner's ranks do); when they overlap, each keeps to
    its Ray CPUs, so that actors on one machine do not fight over cores."""
    section = cfg.rollout if role == "rollout" else cfg.learner
    if section.threads:
        return section.threads
    if cfg.buffer.max_policy_lag == 0:
        return max(1, cores // (cfg.rollout.num_workers if role == "rollout" else cfg.learner.num_ranks))
    return max(1, int(section.num_cpus))


def from_dict(data: dict) -> Config:
    """Build a Config from nested plain data (a parsed YAML file), refusing unknown keys."""
    import msgspec  # only here: the learner alone (deploy/bench/learner_gpu.py) needs no more

    problems: list[str] = []
    _check_keys(Config, data, "", problems)
    if problems:
        raise ConfigError(problems)
    try:
        return msgspec.convert(data, Config, strict=False)
    except msgspec.ValidationError as e:
        raise ConfigError([f"config: {e}"]) from None


def load(path: str | Path) -> Config:
    """Read a YAML run file into a Config (fields it leaves out keep their defaults)."""
    return from_dict(_read(path))


def _read(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError([f"config file not found: {path}"])
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError([f"{path}: not valid YAML ({e})"]) from None
    if not isinstance(data, dict):
        raise ConfigError([f"{path}: expected a mapping of sections, got {type(data).__name__}"])
    return data


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def _check_keys(cls: type, data: dict, prefix: str, problems: list[str]) -> None:
    known = {f.name: f for f in dataclasses.fields(cls)}
    for key, value in data.items():
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f" (did you mean `{prefix}{close[0]}`?)" if close else ""
            problems.append(f"unknown config field `{prefix}{key}`{hint}")
            continue
        sub = known[key].default_factory
        if dataclasses.is_dataclass(sub) and isinstance(value, dict):
            _check_keys(sub, value, f"{prefix}{key}.", problems)


def validate(cfg: Config) -> list[str]:
    """Every problem with `cfg` that would stop or spoil the run, one line each."""
    return cfg.problems()


# What a resumed run may change on the command line: how long it runs and how it reports and
# waits. Anything else would make the rest of the run a different run than the one checkpointed.
CHANGEABLE_ON_RESUME = ("steps", "stop_after", "resume", "run_dir", "logging.", "cluster.address",
                        "buffer.timeout_s", "cluster.call_timeout_s", "cluster.weight_sync_timeout_s")
SAVED_CONFIG = "config.yaml"


def from_args(argv: list[str], description: str | None = None) -> Config:
    """The run's Config from the command line, checked: `--resume` continues from the run
    directory's own config, where the command line may change only CHANGEABLE_ON_RESUME.
    Raises ConfigError with every problem."""
    cfg = parse(argv, description)
    saved = Path(cfg.run_dir) / SAVED_CONFIG
    if cfg.resume and cfg.run_dir and saved.is_file():
        # stop_after belongs to the invocation that gave it, not to the run.
        original = dataclasses.replace(load(saved), stop_after=Config.stop_after)
        cfg = parse(argv, description, base=original)
        changed = resume_changes(original, cfg)
        if changed:
            raise ConfigError(changed)
    problems = validate(cfg)
    if problems:
        raise ConfigError(problems)
    return cfg


def resume_changes(original: Config, resumed: Config) -> list[str]:
    """A line for every field `resumed` changes that a resumed run may not change."""
    before, after = _flat(to_dict(original)), _flat(to_dict(resumed))
    return [f"cannot change {key} when resuming: the run has {_shown(original, key, before[key])}, "
            f"the command line says {_shown(resumed, key, after[key])} (only steps, stop_after, "
            f"logging.* and timeouts may change)"
            for key in before if before[key] != after[key] and not key.startswith(CHANGEABLE_ON_RESUME)]


def _shown(cfg: Config, key: str, value) -> str:
    """A field's value as the run uses it: an unset learning rate is the model's default."""
    if key == "learner.learning_rate" and value is None:
        return f"{cfg.learning_rate!r} (the model's default)"
    return repr(value)


def _flat(data: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = tuple(value) if isinstance(value, list) else value
    return out


def parse(argv: list[str], description: str | None = None, base: Config | None = None) -> Config:
    """`[run.yaml] [--section.field value ...]`: a run file, then command-line overrides, on top
    of `base` (default: the defaults)."""
    import tyro

    base = base or Config()
    if argv and not argv[0].startswith("-"):
        base, argv = from_dict(_merge(to_dict(base), _read(argv[0]))), argv[1:]
    return tyro.cli(Config, default=base, args=argv, description=description)


def _merge(data: dict, overrides: dict) -> dict:
    """`data` with the (nested) values of `overrides` put in."""
    out = dict(data)
    for key, value in overrides.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out
