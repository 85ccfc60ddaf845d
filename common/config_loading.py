"""The run's Config from a run file and the command line, and what a resumed run may change.

`[run.yaml] [--section.field value ...]`: the file's values over the defaults, the command
line's over the file's; `--resume` starts from the config saved in the run directory instead.
Every problem is reported at once, as a ConfigError.
"""

from __future__ import annotations

import dataclasses
import difflib
from pathlib import Path

import msgspec
import tyro
import yaml

from common.config import Config, ConfigError, to_dict, validate

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
        run = {**_read(saved), "stop_after": Config.stop_after}
        cfg = parse(argv, description, base=run)
        changed = resume_changes(from_dict(run), cfg)
        if changed:
            raise ConfigError(changed)
    problems = validate(cfg)
    if problems:
        raise ConfigError(problems)
    return cfg


def parse(argv: list[str], description: str | None = None, base: dict | None = None) -> Config:
    """`[run.yaml] [--section.field value ...]`: a run file, then command-line overrides, on top
    of `base` (plain data, as a run file holds it; default: the defaults)."""
    data = base or {}
    if argv and not argv[0].startswith("-"):
        data, argv = _merge(data, _read(argv[0])), argv[1:]
    return tyro.cli(Config, default=_tyro_default(data), args=argv, description=description)


def _tyro_default(data: dict) -> Config:
    """`data` as tyro's default, its learning rate left unset unless `data` sets one: the Config
    tyro makes from it then settles the rate for the model the command line ends with, not for
    the model of the defaults."""
    cfg = from_dict(data)
    cfg.learner.learning_rate = data.get("learner", {}).get("learning_rate")
    return cfg


def from_dict(data: dict) -> Config:
    """Build a Config from nested plain data (a parsed YAML file), refusing unknown keys.
    Values out of their bounds pass here: `validate` reports them, all at once."""
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


def resume_changes(original: Config, resumed: Config) -> list[str]:
    """A line for every field `resumed` changes that a resumed run may not change. Both are
    settled Configs, so an unset learning rate shows as the rate the run uses."""
    before, after = _flat(to_dict(original)), _flat(to_dict(resumed))
    return [f"cannot change {key} when resuming: the run has {before[key]!r}, the command line "
            f"says {after[key]!r} (only steps, stop_after, logging.* and timeouts may change)"
            for key in before if before[key] != after[key] and not key.startswith(CHANGEABLE_ON_RESUME)]


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


def _flat(data: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = tuple(value) if isinstance(value, list) else value
    return out


def _merge(data: dict, overrides: dict) -> dict:
    """`data` with the (nested) values of `overrides` put in."""
    out = dict(data)
    for key, value in overrides.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out
