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
from typing import Literal

import msgspec
import yaml


class ConfigError(ValueError):
    """A configuration the run cannot start with; `problems` holds one line per mistake."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


@dataclass
class ModelConfig:
    name: str = "tiny"
    """Policy to train: a preset (`tiny`, `pythia-70m-shape`, `pythia-410m-shape`), a local
    Hugging Face model directory, or a hub id such as `EleutherAI/pythia-410m-deduped`."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Weights and compute dtype: `auto` is float32 on CPU and bfloat16 on GPU."""
    max_model_len: int = 512
    """Longest prompt plus completion, in tokens, for the engines and the learner."""
    cache_dir: str = ""
    """Where presets are built once and kept; empty means `$GRPO_RAY_CACHE` or
    `~/.cache/grpo-ray`."""


@dataclass
class DataConfig:
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
class RolloutConfig:
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
    num_cpus: float = 1
    """Ray CPUs reserved per worker."""
    num_gpus: float = 0
    """Ray GPUs per worker on a GPU cluster; set it to `tensor_parallel_size`."""
    threads: int = 0
    """CPU only: OpenMP/torch threads per engine; 0 chooses (see `cpu_threads`)."""
    tensor_parallel_size: int = 1
    """GPU only: GPUs one engine shards the model over."""
    gpu_memory_utilization: float = 0.85
    """GPU only: fraction of each GPU's memory vLLM may take."""
    kv_cache_gib: float = 1.0
    """CPU only: KV-cache space per engine in GiB (vLLM's default would be half the RAM)."""


@dataclass
class GRPOConfig:
    group_size: int = 8
    """Completions sampled per prompt (G); advantages are relative within a group."""
    batch_size: int = 32
    """Completions per learner step; a multiple of `group_size`."""
    loss_type: Literal["grpo", "dapo", "dr_grpo"] = "dapo"
    """Loss aggregation, as in TRL: `grpo` mean per sequence then over sequences; `dapo` sum
    over all completion tokens over their count; `dr_grpo` sum over (sequences x max_tokens)."""
    scale_rewards: Literal["group", "batch", "none"] = "group"
    """Divide centred rewards by the group's std, the batch's std, or nothing (Dr. GRPO)."""
    epsilon: float = 0.2
    """Lower clip range of the policy ratio: ratios below 1 - epsilon are clipped."""
    epsilon_high: float | None = None
    """Upper clip range (DAPO clip-higher); None means `epsilon`."""
    beta: float = 0.0
    """Coefficient of the k3 KL penalty to the frozen reference model; 0 loads no reference."""
    num_iterations: int = 1
    """Optimizer passes over each batch (mu in the GRPO paper)."""
    importance_sampling_cap: float = 3.0
    """Truncated importance sampling: each token's loss is weighted by
    min(exp(logp_old - logp_behaviour), cap), correcting for stale or mismatched rollouts;
    0 turns the correction off."""


@dataclass
class BufferConfig:
    max_policy_lag: int = 0
    """0: synchronous (on-policy) GRPO. k >= 1: generation runs up to k policy versions
    ahead of training; groups older than that are dropped and counted."""
    capacity: int = 0
    """Most groups held; producers wait when it is full. 0 means enough for
    `max_policy_lag + 1` batches."""
    timeout_s: float = 600.0
    """Longest wait for a batch (learner) or for room (workers) before the run fails."""


@dataclass
class LearnerConfig:
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
    num_cpus: float = 1
    """Ray CPUs reserved for the learner."""
    num_gpus: float = 0
    """Ray GPUs for the learner on a GPU cluster."""
    threads: int = 0
    """CPU only: torch threads for the learner; 0 chooses (see `cpu_threads`)."""


@dataclass
class ClusterConfig:
    address: str = ""
    """Ray cluster to join: empty starts a local instance (or joins the job's cluster under
    `ray job submit`); `auto` or `host:port` joins a running one."""
    device: Literal["cpu", "gpu"] = "cpu"
    """Where engines and the learner run; `gpu` needs vLLM's CUDA build."""
    weight_sync: Literal["auto", "broadcast", "shm"] = "auto"
    """How new weights reach the engines: `broadcast` (torch.distributed, gloo on CPU, NCCL
    on GPU, works across nodes) or `shm` (shared memory, CPU engines on the learner's node).
    `auto` picks `shm` where it can."""
    weight_sync_timeout_s: float = 120.0
    """Longest a weight broadcast waits for a group member; then it fails, and the group is
    formed again (a member that died mid-broadcast would otherwise stall every other)."""
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


@dataclass
class LoggingConfig:
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
    `runs/<date>-<time>`. Under `ray job submit` give an absolute path (on shared storage for
    a multi-node cluster): the job's working directory is temporary."""
    resume: bool = False
    """Continue from the last checkpoint in `run_dir`."""
    stop_after: int = 0
    """Stop (with a checkpoint) after this many steps of this invocation, as if interrupted;
    0 runs to `steps`."""

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
    rollout workers share them); when they overlap, each keeps to its Ray CPUs, so that
    actors on one machine do not fight over cores."""
    section = cfg.rollout if role == "rollout" else cfg.learner
    if section.threads:
        return section.threads
    if cfg.buffer.max_policy_lag == 0:
        return max(1, cores // (cfg.rollout.num_workers if role == "rollout" else 1))
    return max(1, int(section.num_cpus))


def from_dict(data: dict) -> Config:
    """Build a Config from nested plain data (a parsed YAML file), refusing unknown keys."""
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
    path = Path(path)
    if not path.is_file():
        raise ConfigError([f"config file not found: {path}"])
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError([f"{path}: not valid YAML ({e})"]) from None
    if not isinstance(data, dict):
        raise ConfigError([f"{path}: expected a mapping of sections, got {type(data).__name__}"])
    return from_dict(data)


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
    from common import models, rewards  # imported here: both are heavier than this module

    p: list[str] = []
    g, r, l, b, d = cfg.grpo, cfg.rollout, cfg.learner, cfg.buffer, cfg.data

    def need(ok: bool, line: str) -> None:
        if not ok:
            p.append(line)

    need(cfg.steps >= 1, f"steps must be >= 1 (got {cfg.steps})")
    need(bool(cfg.run_dir) or not cfg.resume, "resume needs --run-dir: the run to continue")
    need(cfg.stop_after >= 0, f"stop_after must be >= 0 (got {cfg.stop_after})")
    need(g.group_size >= 2, f"grpo.group_size must be >= 2 for group-relative advantages (got {g.group_size})")
    need(g.batch_size >= 1, f"grpo.batch_size must be >= 1 (got {g.batch_size})")
    if g.group_size >= 1 and g.batch_size >= 1:
        need(g.batch_size % g.group_size == 0,
             f"grpo.batch_size ({g.batch_size}) must be a multiple of grpo.group_size ({g.group_size})")
    need(g.epsilon > 0, f"grpo.epsilon must be > 0 (got {g.epsilon})")
    need(g.epsilon_high is None or g.epsilon_high > 0, f"grpo.epsilon_high must be > 0 (got {g.epsilon_high})")
    need(g.beta >= 0, f"grpo.beta must be >= 0 (got {g.beta})")
    need(g.num_iterations >= 1, f"grpo.num_iterations must be >= 1 (got {g.num_iterations})")
    need(g.importance_sampling_cap == 0 or g.importance_sampling_cap >= 1,
         f"grpo.importance_sampling_cap must be 0 (off) or >= 1 (got {g.importance_sampling_cap})")

    need(r.num_workers >= 1, f"rollout.num_workers must be >= 1 (got {r.num_workers})")
    need(r.max_tokens >= 1, f"rollout.max_tokens must be >= 1 (got {r.max_tokens})")
    need(r.temperature > 0, f"rollout.temperature must be > 0 (got {r.temperature})")
    need(0 < r.top_p <= 1, f"rollout.top_p must be in (0, 1] (got {r.top_p})")
    need(len(r.rewards) >= 1, "rollout.rewards must name at least one reward function")
    need(not r.reward_weights or len(r.reward_weights) == len(r.rewards),
         f"rollout.reward_weights has {len(r.reward_weights)} weights for {len(r.rewards)} reward functions")
    for name in r.rewards:
        try:
            rewards.resolve(name)
        except rewards.RewardError as e:
            p.append(f"rollout.rewards: {e}")
    need(r.num_cpus > 0, f"rollout.num_cpus must be > 0 (got {r.num_cpus})")
    need(r.threads >= 0, f"rollout.threads must be >= 0 (got {r.threads})")
    need(r.kv_cache_gib > 0, f"rollout.kv_cache_gib must be > 0 (got {r.kv_cache_gib})")
    need(r.tensor_parallel_size >= 1, f"rollout.tensor_parallel_size must be >= 1 (got {r.tensor_parallel_size})")
    need(0 < r.gpu_memory_utilization <= 1,
         f"rollout.gpu_memory_utilization must be in (0, 1] (got {r.gpu_memory_utilization})")

    need(l.learning_rate is None or l.learning_rate > 0,
         f"learner.learning_rate must be > 0 (got {l.learning_rate})")
    need(l.warmup_steps >= 0, f"learner.warmup_steps must be >= 0 (got {l.warmup_steps})")
    need(l.max_grad_norm >= 0, f"learner.max_grad_norm must be >= 0 (got {l.max_grad_norm})")
    need(l.micro_batch_size >= 1, f"learner.micro_batch_size must be >= 1 (got {l.micro_batch_size})")
    need(l.checkpoint_every >= 0, f"learner.checkpoint_every must be >= 0 (got {l.checkpoint_every})")
    need(l.keep_checkpoints >= 1, f"learner.keep_checkpoints must be >= 1 (got {l.keep_checkpoints})")
    need(l.num_cpus > 0, f"learner.num_cpus must be > 0 (got {l.num_cpus})")

    need(b.max_policy_lag >= 0, f"buffer.max_policy_lag must be >= 0 (got {b.max_policy_lag})")
    need(b.capacity >= 0, f"buffer.capacity must be >= 0 (got {b.capacity})")
    if b.capacity and g.group_size >= 1 and g.batch_size >= g.group_size:
        need(b.capacity >= cfg.prompts_per_step,
             f"buffer.capacity ({b.capacity} groups) cannot hold one batch ({cfg.prompts_per_step} groups)")
    need(b.timeout_s > 0, f"buffer.timeout_s must be > 0 (got {b.timeout_s})")

    need(d.max_prompt_tokens >= 1, f"data.max_prompt_tokens must be >= 1 (got {d.max_prompt_tokens})")
    need(d.eval_prompts >= 0, f"data.eval_prompts must be >= 0 (got {d.eval_prompts})")
    need(d.max_prompt_tokens + r.max_tokens <= cfg.model.max_model_len,
         f"data.max_prompt_tokens ({d.max_prompt_tokens}) + rollout.max_tokens ({r.max_tokens}) "
         f"exceeds model.max_model_len ({cfg.model.max_model_len})")

    c = cfg.cluster
    if c.device == "cpu":
        need(r.num_gpus == 0 and l.num_gpus == 0,
             "cluster.device is cpu but rollout.num_gpus or learner.num_gpus is set")
        need(r.tensor_parallel_size == 1, "rollout.tensor_parallel_size > 1 needs cluster.device gpu")
    else:
        need(r.num_gpus >= r.tensor_parallel_size,
             f"rollout.num_gpus ({r.num_gpus}) must cover rollout.tensor_parallel_size ({r.tensor_parallel_size})")
        need(l.num_gpus >= 1, f"learner.num_gpus must be >= 1 on a GPU cluster (got {l.num_gpus})")
        need(c.weight_sync != "shm", "cluster.weight_sync shm is for CPU engines; use broadcast (NCCL) on GPU")
    need(c.weight_sync_timeout_s > 0, f"cluster.weight_sync_timeout_s must be > 0 (got {c.weight_sync_timeout_s})")
    need(0 <= c.weight_sync_port <= 65535, f"cluster.weight_sync_port must be in 0..65535 (got {c.weight_sync_port})")
    need(c.sync_bucket_mb >= 1, f"cluster.sync_bucket_mb must be >= 1 (got {c.sync_bucket_mb})")
    need(c.call_timeout_s > 0, f"cluster.call_timeout_s must be > 0 (got {c.call_timeout_s})")
    need(c.max_worker_restarts >= 0, f"cluster.max_worker_restarts must be >= 0 (got {c.max_worker_restarts})")

    problem = models.check_name(cfg.model.name)
    if problem:
        p.append(f"model.name: {problem}")
    return p


def from_args(argv: list[str], description: str | None = None) -> Config:
    """`parse`, then `validate`: a Config the run can start with, or ConfigError with every
    problem."""
    cfg = parse(argv, description)
    problems = validate(cfg)
    if problems:
        raise ConfigError(problems)
    return cfg


def parse(argv: list[str], description: str | None = None) -> Config:
    """`[run.yaml] [--section.field value ...]`: a run file, then command-line overrides."""
    import tyro

    base = Config()
    if argv and not argv[0].startswith("-"):
        base, argv = load(argv[0]), argv[1:]
    return tyro.cli(Config, default=base, args=argv, description=description)
