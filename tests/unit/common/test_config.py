"""Run configuration: bounds and validation lines, strict loading from dicts and YAML,
command-line overrides, resuming."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from common.config import Bound, Config, ConfigError, ModelConfig, bounds, cpu_threads, validate
from common.config_loading import from_args, from_dict, load, parse


def problems_after(**changes) -> list[str]:
    """validate() of the default config with `section__field=value` changes applied."""
    cfg = Config()
    for key, value in changes.items():
        section, name = key.split("__")
        setattr(getattr(cfg, section), name, value)
    return validate(cfg)


# ----- validate -----


def test_defaults_are_valid():
    assert validate(Config()) == []


@pytest.mark.parametrize("changes, field", [
    (dict(grpo__group_size=1), "grpo.group_size"),
    (dict(grpo__batch_size=30), "grpo.batch_size (30) must be a multiple of grpo.group_size (8)"),
    (dict(learner__learning_rate=0.0), "learner.learning_rate"),
    (dict(learner__learning_rate=-1e-3), "learner.learning_rate"),
    (dict(rollout__rewards=("nope",)), "unknown reward `nope`"),
    (dict(model__name="not-a-model"), "unknown model `not-a-model`"),
    (dict(rollout__reward_weights=(1.0, 2.0)), "reward_weights has 2 weights for 1 reward"),
    (dict(data__max_prompt_tokens=500), "exceeds model.max_model_len (512)"),
    (dict(rollout__num_gpus=1), "cluster.device is cpu"),
    (dict(learner__num_gpus=1), "learner.num_gpus is set"),
])
def test_each_mistake_gives_one_line_naming_the_field(changes, field):
    problems = problems_after(**changes)
    assert len(problems) == 1, problems
    assert field in problems[0]


# A row per rule: the field, a value just outside its bound, the line it must give (by hand).
RULE_ROWS = [
    ("steps", 0, "steps must be >= 1 (got 0)"),
    ("stop_after", -1, "stop_after must be >= 0 (got -1)"),
    ("model.max_model_len", 0, "model.max_model_len must be >= 1 (got 0)"),
    ("data.max_prompt_tokens", 0, "data.max_prompt_tokens must be >= 1 (got 0)"),
    ("data.eval_prompts", -1, "data.eval_prompts must be >= 0 (got -1)"),
    ("rollout.num_cpus", 0, "rollout.num_cpus must be > 0 (got 0)"),
    ("rollout.num_gpus", -1, "rollout.num_gpus must be >= 0 (got -1)"),
    ("rollout.threads", -1, "rollout.threads must be >= 0 (got -1)"),
    ("rollout.num_workers", 0, "rollout.num_workers must be >= 1 (got 0)"),
    ("rollout.max_tokens", 0, "rollout.max_tokens must be >= 1 (got 0)"),
    ("rollout.temperature", 0.0, "rollout.temperature must be > 0 (got 0.0)"),
    ("rollout.top_p", 1.01, "rollout.top_p must be in (0, 1] (got 1.01)"),
    ("rollout.tensor_parallel_size", 0, "rollout.tensor_parallel_size must be >= 1 (got 0)"),
    ("rollout.gpu_memory_utilization", 0.0, "rollout.gpu_memory_utilization must be in (0, 1] (got 0.0)"),
    ("rollout.kv_cache_gib", 0.0, "rollout.kv_cache_gib must be > 0 (got 0.0)"),
    ("rollout.max_in_flight", 0, "rollout.max_in_flight must be >= 1 (got 0)"),
    ("rollout.reward_timeout_s", 0, "rollout.reward_timeout_s must be > 0 (got 0)"),
    ("reward_model.num_workers", 0, "reward_model.num_workers must be >= 1 (got 0)"),
    ("reward_model.num_cpus", 0, "reward_model.num_cpus must be > 0 (got 0)"),
    ("reward_model.num_gpus", -1, "reward_model.num_gpus must be >= 0 (got -1)"),
    ("reward_model.threads", -1, "reward_model.threads must be >= 0 (got -1)"),
    ("rollout.weight_update", "in_flight", "rollout.weight_update in_flight needs "
     "buffer.max_policy_lag >= 1: with 0 nothing is being generated when the weights change"),
    ("grpo.group_size", 1, "grpo.group_size must be >= 2 for group-relative advantages (got 1)"),
    ("grpo.batch_size", 0, "grpo.batch_size must be >= 1 (got 0)"),
    ("grpo.epsilon", 0.0, "grpo.epsilon must be > 0 (got 0.0)"),
    ("grpo.epsilon_high", 0.0, "grpo.epsilon_high must be > 0 (got 0.0)"),
    ("grpo.beta", -0.01, "grpo.beta must be >= 0 (got -0.01)"),
    ("grpo.num_iterations", 0, "grpo.num_iterations must be >= 1 (got 0)"),
    ("grpo.delta", 1.0, "grpo.delta must be > 1 (got 1.0)"),
    ("grpo.sapo_temperature_pos", 0.0, "grpo.sapo_temperature_pos must be > 0 (got 0.0)"),
    ("grpo.sapo_temperature_neg", 0.0, "grpo.sapo_temperature_neg must be > 0 (got 0.0)"),
    ("grpo.vllm_importance_sampling_clip_min", -0.5,
     "grpo.vllm_importance_sampling_clip_min must be >= 0 (got -0.5)"),
    ("grpo.vllm_importance_sampling_clip_min", 3.0,
     "grpo.vllm_importance_sampling_clip_min (3.0) must be below grpo.vllm_importance_sampling_clip_max (3.0)"),
    ("grpo.vllm_importance_sampling_clip_max", 0.0,
     "grpo.vllm_importance_sampling_clip_max must be > 0 (got 0.0)"),
    ("grpo.loss_type", "cispo", "grpo.loss_type cispo caps the ratio at grpo.epsilon_high: set it "
     "(TRL recommends 5.0; unset, TRL would cap it at epsilon, 0.2)"),
    ("grpo.max_extra_rounds", -1, "grpo.max_extra_rounds must be >= 0 (got -1)"),
    ("buffer.max_policy_lag", -1, "buffer.max_policy_lag must be >= 0 (got -1)"),
    ("buffer.capacity", -1, "buffer.capacity must be >= 0 (got -1)"),
    ("buffer.capacity", 3, "buffer.capacity (3 groups) cannot hold one batch (4 groups)"),
    ("buffer.timeout_s", 0.0, "buffer.timeout_s must be > 0 (got 0.0)"),
    ("learner.num_cpus", 0, "learner.num_cpus must be > 0 (got 0)"),
    ("learner.num_gpus", -1, "learner.num_gpus must be >= 0 (got -1)"),
    ("learner.threads", -1, "learner.threads must be >= 0 (got -1)"),
    ("learner.learning_rate", 0.0, "learner.learning_rate must be > 0 (got 0.0)"),
    ("learner.warmup_steps", -1, "learner.warmup_steps must be >= 0 (got -1)"),
    ("learner.weight_decay", -0.1, "learner.weight_decay must be >= 0 (got -0.1)"),
    ("learner.max_grad_norm", -1.0, "learner.max_grad_norm must be >= 0 (got -1.0)"),
    ("learner.micro_batch_size", 0, "learner.micro_batch_size must be >= 1 (got 0)"),
    ("learner.checkpoint_every", -1, "learner.checkpoint_every must be >= 0 (got -1)"),
    ("learner.keep_checkpoints", 0, "learner.keep_checkpoints must be >= 1 (got 0)"),
    ("learner.num_ranks", 0, "learner.num_ranks must be >= 1 (got 0)"),
    ("learner.lora_rank", -1, "learner.lora_rank must be in 0..512 (vLLM's largest max_lora_rank) (got -1)"),
    ("learner.lora_rank", 513, "learner.lora_rank must be in 0..512 (vLLM's largest max_lora_rank) (got 513)"),
    ("learner.lora_alpha", 0.0, "learner.lora_alpha must be > 0 (got 0.0)"),
    ("learner.lora_dropout", 1.5, "learner.lora_dropout must be in 0..1 (got 1.5)"),
    ("learner.lora_target_modules", [], "learner.lora_target_modules is empty: a LoRA adapter needs "
                                        "layers to adapt"),
    ("learner.num_ranks", 3, "grpo.batch_size (32) must be a multiple of learner.num_ranks (3): "
                             "each rank trains on an equal share"),
    ("cluster.weight_sync_timeout_s", 0.0, "cluster.weight_sync_timeout_s must be > 0 (got 0.0)"),
    ("cluster.weight_check_tolerance", -0.1, "cluster.weight_check_tolerance must be >= 0 (got -0.1)"),
    ("cluster.weight_sync_port", 65536, "cluster.weight_sync_port must be in 0..65535 (got 65536)"),
    ("cluster.sync_bucket_mb", 0, "cluster.sync_bucket_mb must be >= 1 (got 0)"),
    ("cluster.num_cpus", -1, "cluster.num_cpus must be >= 0 (got -1)"),
    ("cluster.call_timeout_s", 0.0, "cluster.call_timeout_s must be > 0 (got 0.0)"),
    ("cluster.max_worker_restarts", -1, "cluster.max_worker_restarts must be >= 0 (got -1)"),
    ("logging.eval_every", -1, "logging.eval_every must be >= 0 (got -1)"),
    ("env.max_turns", 0, "env.max_turns must be >= 1 (got 0)"),
    ("env.max_episode_tokens", 0, "env.max_episode_tokens must be >= 1 (got 0)"),
    ("env.step_timeout_s", 0.0, "env.step_timeout_s must be > 0 (got 0.0)"),
    ("env.threads", 0, "env.threads must be >= 1 (got 0)"),
    ("env.name", "common.rewards:explicit_pos", "env.name: environment `common.rewards:explicit_pos` "
                                                "is not a skyrl_gym BaseTextEnv subclass"),
    ("env.name", "no_such_module:Env", "env.name: environment `no_such_module:Env`: cannot import it "
                                       "(ModuleNotFoundError: No module named 'no_such_module')"),
]


def test_an_unknown_environment_is_one_line_listing_the_registered_ones():
    [line] = validate(with_value("env.name", "nope"))
    assert line.startswith("env.name: unknown environment `nope`: registered are aime, calculator, ")
    assert line.endswith("; or give a package.module:Class path")
    assert "gsm8k_multi_turn" in line and "say_word" in line


def test_an_environment_scores_the_episodes_so_reward_functions_are_refused_beside_it():
    cfg = Config()
    cfg.env.name = "say_word"
    assert validate(cfg) == []
    cfg.rollout.rewards = ("length",)
    assert validate(cfg) == ["env.name (say_word) scores the episodes; rollout.rewards (length) does "
                             "not apply with it: leave it unset"]


def test_compiled_engines_are_refused_where_vllm_would_not_compile_them():
    cfg = Config()
    cfg.cluster.device, cfg.rollout.compile = "cpu", True
    assert validate(cfg) == []
    cfg.learner.lora_rank = 8
    assert validate(cfg) == ["rollout.compile: vLLM runs CPU engines that serve a LoRA adapter "
                             "(learner.lora_rank) uncompiled; leave it off"]
    cfg.cluster.device = "gpu"  # where vLLM compiles every engine, LoRA or not
    assert "rollout.compile" not in " ".join(validate(cfg))


def with_value(path: str, value) -> Config:
    cfg = Config()
    *section, name = path.split(".")
    setattr(getattr(cfg, section[0]) if section else cfg, name, value)
    return cfg


@pytest.mark.parametrize("path, value, line", RULE_ROWS, ids=[f"{p}={v}" for p, v, _ in RULE_ROWS])
def test_each_rule_gives_its_line(path, value, line):
    assert validate(with_value(path, value)) == [line]


def test_every_declared_bound_has_a_row():
    sections = [name for name, value in vars(Config()).items() if dataclasses.is_dataclass(value)]
    assert "reward_model" in sections
    declared = {*bounds(Config)} | {f"{name}.{field}" for name in sections
                                    for field in bounds(type(getattr(Config(), name)))}
    assert declared <= {path for path, _, _ in RULE_ROWS}


@pytest.mark.parametrize("bound, words", [
    (Bound(ge=1), ">= 1"), (Bound(gt=0), "> 0"), (Bound(gt=0, le=1), "in (0, 1]"),
    (Bound(ge=0, le=65535), "in 0..65535"), (Bound(ge=1e-6), ">= 1e-06"),
    (Bound(ge=2, why="for group-relative advantages"), ">= 2 for group-relative advantages")])
def test_a_bound_is_worded_as_the_error_line_reads(bound, words):
    assert str(bound) == words


@pytest.mark.parametrize("value, kept", [(None, True), (0, False), (1e-9, True), (1, True), (1.01, False)])
def test_a_bound_keeps_its_range_and_lets_an_unset_optional_field_be(value, kept):
    assert Bound(gt=0, le=1).keeps(value) is kept


@pytest.mark.parametrize("ends", [dict(), dict(le=1), dict(ge=0, gt=0)])
def test_a_bound_without_exactly_one_lower_end_fails_where_it_is_declared(ends):
    with pytest.raises(TypeError, match="exactly one lower end"):
        Bound(**ends)


def test_the_parsers_accept_bounded_fields_and_leave_the_check_to_validate(tmp_path):
    """Neither msgspec nor tyro stops at the first value out of bounds: every one is reported."""
    path = tmp_path / "run.yaml"
    path.write_text("grpo:\n  group_size: 1\nrollout:\n  top_p: 2.0\n")
    with pytest.raises(ConfigError) as e:
        from_args([str(path), "--learner.num-ranks", "0", "--cluster.weight-sync-port", "-1"])
    assert e.value.problems == [
        "grpo.group_size must be >= 2 for group-relative advantages (got 1)",
        "rollout.top_p must be in (0, 1] (got 2.0)",
        "learner.num_ranks must be >= 1 (got 0)",
        "cluster.weight_sync_port must be in 0..65535 (got -1)"]


def numeric_fields() -> list[str]:
    """Every int or float field of the config (optional ones too), as section.field."""
    import dataclasses
    import typing

    def numeric(hint) -> bool:
        kinds = set(typing.get_args(hint)) - {type(None)} or {hint}
        return kinds <= {int, float}

    out = [f.name for f in dataclasses.fields(Config) if numeric(typing.get_type_hints(Config)[f.name])]
    for section in dataclasses.fields(Config):
        cls = section.default_factory
        if dataclasses.is_dataclass(cls):
            hints = typing.get_type_hints(cls)
            out += [f"{section.name}.{f.name}" for f in dataclasses.fields(cls) if numeric(hints[f.name])]
    return out


ANY_VALUE = {"seed"}  # every integer is a seed


@pytest.mark.parametrize("path", [p for p in numeric_fields() if p not in ANY_VALUE])
def test_a_negative_value_of_any_numeric_field_is_refused_in_one_line(path):
    problems = validate(with_value(path, -1))
    assert problems, f"{path} = -1 passes validation"
    assert any(path in line for line in problems) and all("\n" not in line for line in problems)


def test_the_sweep_reaches_every_section():
    assert {p.split(".")[0] for p in numeric_fields() if "." in p} == {
        "model", "data", "rollout", "env", "grpo", "buffer", "learner", "reward_model", "cluster", "logging"}


def test_group_size_one_line_says_why_and_what_was_given():
    assert problems_after(grpo__group_size=1) == [
        "grpo.group_size must be >= 2 for group-relative advantages (got 1)"]


def test_prompt_plus_completion_line_gives_all_three_numbers():
    assert problems_after(data__max_prompt_tokens=500) == [
        "data.max_prompt_tokens (500) + rollout.max_tokens (24) exceeds model.max_model_len (512)"]


def test_prompt_plus_completion_exactly_at_limit_is_fine():
    assert problems_after(data__max_prompt_tokens=512 - 24) == []


def test_several_mistakes_give_several_lines():
    cfg = Config()
    cfg.grpo.group_size = 1
    cfg.learner.learning_rate = 0.0
    cfg.model.name = "not-a-model"
    problems = validate(cfg)
    assert len(problems) == 3
    assert problems[0].startswith("grpo.group_size")
    assert problems[1].startswith("learner.learning_rate")
    assert problems[2].startswith("model.name")


@pytest.mark.parametrize("section, field, value, line", [
    ("learner", "num_gpus", 2, "learner.num_gpus must be 1 on a GPU cluster (got 2)"),
    ("rollout", "num_gpus", 3, "rollout.num_gpus (3) must equal rollout.tensor_parallel_size (2)"),
    ("rollout", "num_gpus", 1, "rollout.num_gpus (1) must equal rollout.tensor_parallel_size (2)"),
    ("cluster", "weight_sync", "shm", "cluster.weight_sync shm is for CPU engines; use broadcast (NCCL) on GPU"),
])
def test_gpus_that_would_sit_idle_are_refused(section, field, value, line):
    cfg = Config()
    cfg.cluster.device = "gpu"
    cfg.rollout.tensor_parallel_size = cfg.rollout.num_gpus = 2
    cfg.learner.num_gpus = 1
    setattr(getattr(cfg, section), field, value)
    assert validate(cfg) == [line]


def test_gpu_cluster_config_is_valid():
    cfg = Config()
    cfg.cluster.device = "gpu"
    cfg.rollout.tensor_parallel_size = cfg.rollout.num_gpus = 2
    cfg.learner.num_gpus = 1
    assert validate(cfg) == []


def test_a_gpu_cluster_needs_no_gpu_counts_beyond_the_device():
    """Unset, each role gets what the device implies: an engine its tensor-parallel ranks."""
    cfg = Config()
    cfg.cluster.device = "gpu"
    cfg.rollout.tensor_parallel_size = 2
    assert validate(cfg) == [] and (cfg.gpus("rollout"), cfg.gpus("learner")) == (2, 1)
    cfg.cluster.device = "cpu"
    assert validate(cfg) == [
        "rollout.tensor_parallel_size > 1 needs cluster.device gpu"] and cfg.gpus("rollout") == 0


@pytest.fixture
def machine(monkeypatch):
    """Pretend this machine has (or lacks) a CUDA device and vLLM's CUDA build."""
    import importlib.metadata

    import torch

    def pretend(cuda: bool, cuda_vllm: bool) -> None:
        def version(name):
            if name == "vllm" and cuda_vllm:
                return "0.32.0"
            raise importlib.metadata.PackageNotFoundError(name)

        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 8 if cuda else 0)
        monkeypatch.setattr(importlib.metadata, "version", version)
    return pretend


@pytest.mark.parametrize("cuda, cuda_vllm, device", [
    (True, True, "gpu"), (True, False, "cpu"), (False, True, "cpu"), (False, False, "cpu")])
def test_the_default_device_is_the_gpu_only_where_cuda_and_vllms_cuda_build_are(machine, cuda,
                                                                                 cuda_vllm, device):
    machine(cuda, cuda_vllm)
    cfg = parse([])
    assert cfg.cluster.device == device and validate(cfg) == []
    assert parse(["--cluster.device", "cpu"]).cluster.device == "cpu"  # an explicit choice holds
    assert parse(["--cluster.device", "auto"]).cluster.device == device


@pytest.mark.parametrize("cuda, cuda_vllm, words", [
    (True, True, "8 CUDA device(s) and vLLM's CUDA build"),
    (True, False, "a CUDA device, but vLLM's CPU build is installed"),
    (False, True, "no CUDA device on this machine"), (False, False, "no CUDA device on this machine")])
def test_the_log_says_why_the_device_was_chosen(machine, cuda, cuda_vllm, words):
    from common import models

    machine(cuda, cuda_vllm)
    assert models.why_device(models.detect_device()).startswith(words)


def test_the_device_is_settled_once_and_saved_as_settled(machine, tmp_path):
    from common.config import to_dict

    machine(True, True)
    assert to_dict(parse([]))["cluster"]["device"] == "gpu"  # actors elsewhere get this, not `auto`


def test_the_gpu_check_checks_the_gpu_by_default_on_a_gpu_machine(machine):
    from deploy.gpu_check import command_line

    machine(True, True)
    on_gpu = parse(command_line([]))
    assert (on_gpu.cluster.device, on_gpu.gpus("learner"), on_gpu.gpus("rollout")) == ("gpu", 1, 1)
    assert on_gpu.model.name == "EleutherAI/pythia-410m-deduped"
    machine(False, False)
    assert parse(command_line([])).cluster.device == "cpu"
    assert parse(command_line(["--cluster.device", "gpu"])).cluster.device == "gpu"  # the gpu test's


# ----- from_dict -----


def test_from_dict_fills_sections_and_keeps_other_defaults():
    cfg = from_dict({"grpo": {"group_size": 4}, "steps": 3})
    assert (cfg.grpo.group_size, cfg.steps) == (4, 3)
    assert cfg.grpo.batch_size == 32
    assert cfg.rollout.rewards == ("explicit_pos",)


def test_from_dict_refuses_unknown_keys_with_a_hint():
    with pytest.raises(ConfigError) as e:
        from_dict({"grpo": {"grup_size": 4}, "stepz": 3})
    assert e.value.problems == [
        "unknown config field `grpo.grup_size` (did you mean `grpo.group_size`?)",
        "unknown config field `stepz` (did you mean `steps`?)",
    ]


def test_from_dict_unknown_key_without_close_match_has_no_hint():
    with pytest.raises(ConfigError) as e:
        from_dict({"zzzzzz": 1})
    assert e.value.problems == ["unknown config field `zzzzzz`"]


def test_from_dict_refuses_wrong_types():
    with pytest.raises(ConfigError, match=r"grpo\.group_size"):
        from_dict({"grpo": {"group_size": "eight"}})
    with pytest.raises(ConfigError, match=r"Expected `object`, got `int`"):
        from_dict({"grpo": 5})


def test_from_dict_refuses_value_outside_literal():
    with pytest.raises(ConfigError, match=r"loss_type"):
        from_dict({"grpo": {"loss_type": "ppo"}})


# ----- load -----


def test_load_partial_sections_keep_defaults(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("grpo:\n  epsilon: 0.1\nrollout:\n  rewards: [length, format]\nsteps: 5\n")
    cfg = load(path)
    assert cfg.grpo.epsilon == 0.1
    assert cfg.grpo.group_size == 8
    assert cfg.rollout.rewards == ("length", "format")
    assert cfg.rollout.max_tokens == 24
    assert cfg.steps == 5


def test_load_empty_file_gives_defaults(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("")
    assert load(path) == Config()


def test_load_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found: .*missing.yaml"):
        load(tmp_path / "missing.yaml")


def test_load_invalid_yaml(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("grpo: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load(path)


def test_load_non_mapping_yaml(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping of sections, got list"):
        load(path)


# ----- parse -----


def test_parse_applies_file_then_override(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("grpo:\n  epsilon: 0.1\n  group_size: 4\n")
    cfg = parse([str(path), "--grpo.epsilon", "0.3"])
    assert cfg.grpo.epsilon == 0.3  # override wins over the file
    assert cfg.grpo.group_size == 4  # file wins over the default
    assert cfg.grpo.batch_size == 32  # default


def test_parse_without_file_overrides_defaults():
    cfg = parse(["--rollout.max-tokens", "7"])
    assert cfg.rollout.max_tokens == 7
    assert cfg.grpo.epsilon == 0.2


def test_from_args_returns_a_valid_config_or_every_problem():
    assert from_args(["--steps", "3"]).steps == 3
    with pytest.raises(ConfigError) as e:
        from_args(["--grpo.group-size", "1", "--steps", "0"])
    assert e.value.problems == ["steps must be >= 1 (got 0)",
                                "grpo.group_size must be >= 2 for group-relative advantages (got 1)"]


def test_an_unset_learning_rate_is_the_models_default_once_the_config_is_made():
    assert Config().learner.learning_rate == 3e-2  # the tiny preset's
    assert Config(model=ModelConfig(name="pythia-70m-shape")).learner.learning_rate == 1e-6
    assert from_dict({"learner": {"learning_rate": 5e-4}}).learner.learning_rate == 5e-4


def test_the_learning_rate_is_the_default_of_the_model_the_command_line_ends_with(tmp_path):
    assert parse(["--model.name", "pythia-70m-shape"]).learner.learning_rate == 1e-6
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  name: pythia-70m-shape\n")
    assert parse([str(path)]).learner.learning_rate == 1e-6
    assert parse([str(path), "--model.name", "tiny"]).learner.learning_rate == 3e-2
    path.write_text("learner:\n  learning_rate: 0.001\n")  # a rate given is kept
    assert parse([str(path), "--model.name", "pythia-70m-shape"]).learner.learning_rate == 1e-3


# ----- resume -----


def started_run(tmp_path, *argv: str) -> str:
    """A run directory holding the config.yaml that `deploy.train` writes for `argv`."""
    import yaml

    from common.config import to_dict

    run_dir = str(tmp_path / "run")
    cfg = from_args([*argv, "--run-dir", run_dir])
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return run_dir


def test_resume_continues_the_run_that_was_started(tmp_path):
    run_dir = started_run(tmp_path, "--steps", "30", "--grpo.epsilon", "0.1")
    cfg = from_args(["--run-dir", run_dir, "--resume"])
    assert (cfg.steps, cfg.grpo.epsilon, cfg.resume) == (30, 0.1, True)  # not the defaults 40, 0.2


def test_stop_after_belongs_to_the_invocation_that_gave_it(tmp_path):
    run_dir = started_run(tmp_path, "--steps", "16", "--stop-after", "6")
    assert from_args(["--run-dir", run_dir, "--resume"]).stop_after == 0  # runs to step 16
    assert from_args(["--run-dir", run_dir, "--resume", "--stop-after", "4"]).stop_after == 4


def test_resume_may_run_longer_and_report_differently(tmp_path):
    run_dir = started_run(tmp_path, "--steps", "30")
    cfg = from_args(["--run-dir", run_dir, "--resume", "--steps", "50", "--logging.progress",
                     "lines", "--cluster.call-timeout-s", "60"])
    assert (cfg.steps, cfg.logging.progress, cfg.cluster.call_timeout_s) == (50, "lines", 60)


def test_resume_refuses_any_other_change_in_one_line_naming_both_values(tmp_path):
    run_dir = started_run(tmp_path, "--steps", "30")
    with pytest.raises(ConfigError) as e:
        from_args(["--run-dir", run_dir, "--resume", "--model.name", "pythia-70m-shape",
                   "--rollout.rewards", "length"])
    assert e.value.problems == [
        "cannot change model.name when resuming: the run has 'tiny', the command line says "
        "'pythia-70m-shape' (only steps, stop_after, logging.* and timeouts may change)",
        "cannot change rollout.rewards when resuming: the run has ('explicit_pos',), the command "
        "line says ('length',) (only steps, stop_after, logging.* and timeouts may change)"]


def test_a_refused_learning_rate_shows_the_one_the_run_uses_not_none(tmp_path):
    run_dir = started_run(tmp_path)  # learner.learning_rate unset: the tiny preset's own
    with pytest.raises(ConfigError) as e:
        from_args(["--run-dir", run_dir, "--resume", "--learner.learning-rate", "0.01"])
    assert e.value.problems == [
        "cannot change learner.learning_rate when resuming: the run has 0.03, the command line "
        "says 0.01 (only steps, stop_after, logging.* and timeouts may change)"]


def test_the_run_saves_the_learning_rate_it_uses_and_resumes_with_it(tmp_path):
    import yaml

    run_dir = started_run(tmp_path)
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["learner"]["learning_rate"] == 3e-2
    assert from_args(["--run-dir", run_dir, "--resume"]).learner.learning_rate == 3e-2


def test_a_saved_config_with_the_learning_rate_unset_resumes_without_a_change(tmp_path):
    import yaml

    run_dir = started_run(tmp_path)
    path = tmp_path / "run" / "config.yaml"
    saved = yaml.safe_load(path.read_text())
    saved["learner"]["learning_rate"] = None  # as a run made before the rate was saved
    path.write_text(yaml.safe_dump(saved, sort_keys=False))
    assert from_args(["--run-dir", run_dir, "--resume"]).learner.learning_rate == 3e-2
    assert from_args(["--run-dir", run_dir, "--resume", "--learner.learning-rate", "0.03"])


def test_resume_with_the_run_file_it_started_from(tmp_path):
    run_file = str(Path(__file__).parents[3] / "deploy" / "configs" / "tiny.yaml")
    run_dir = started_run(tmp_path, run_file, "--steps", "12", "--grpo.epsilon", "0.1")
    assert from_args(["--run-dir", run_dir, "--resume"]).steps == 12
    # A run file given again is part of the command line: its values are asked for explicitly.
    cfg = from_args([run_file, "--run-dir", run_dir, "--resume"])
    assert (cfg.steps, cfg.grpo.epsilon) == (40, 0.1)  # the file's steps; epsilon it leaves alone
    with pytest.raises(ConfigError, match="cannot change rollout.max_tokens"):
        from_args([run_file, "--run-dir", run_dir, "--resume", "--rollout.max-tokens", "8"])


# ----- prompts_per_step -----


def test_prompts_per_step():
    assert Config().prompts_per_step == 32 // 8
    cfg = Config()
    cfg.grpo.batch_size, cfg.grpo.group_size = 12, 3
    assert cfg.prompts_per_step == 4


def test_cpu_threads_take_the_node_in_turns_when_synchronous():
    cfg = Config()  # max_policy_lag 0: generation and training alternate
    assert cpu_threads(cfg, "learner", cores=8) == 8
    cfg.rollout.num_workers = 3
    assert cpu_threads(cfg, "rollout", cores=8) == 2  # the workers generate at the same time
    cfg.rollout.num_workers = 16
    assert cpu_threads(cfg, "rollout", cores=8) == 1  # never zero
    cfg.learner.num_ranks = 2
    assert cpu_threads(cfg, "learner", cores=8) == 4  # the learner's ranks train at the same time


def test_cpu_threads_keep_to_ray_cpus_when_overlapping():
    cfg = Config()
    cfg.buffer.max_policy_lag = 1
    cfg.rollout.num_cpus, cfg.learner.num_cpus = 3.5, 0.5
    assert cpu_threads(cfg, "rollout", cores=8) == 3
    assert cpu_threads(cfg, "learner", cores=8) == 1
    cfg.rollout.threads = 6  # an explicit number always wins
    assert cpu_threads(cfg, "rollout", cores=8) == 6
