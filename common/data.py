"""Prompt data: load a split (bundled, local file or hub dataset), render and tokenize it into
`Prompt`s, and hand training prompts out in a reproducible, resumable order."""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common.config import DataConfig
from common.errors import RunError
from common.types import Prompt

if TYPE_CHECKING:
    import datasets


class DataError(RunError, ValueError):
    """Prompt data the run cannot use; the message is one line saying what and where."""


BUNDLED = Path(__file__).parent / "assets" / "prompts.jsonl"

_LOCAL_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}


# --- loading ------------------------------------------------------------------------------


def load_split(cfg: DataConfig, split: str) -> datasets.Dataset:
    """One split of `cfg.dataset`, checked to be non-empty and to hold `cfg.prompt_column`.
    `datasets` is imported here, not with the module: a rollout worker renders prompts with this
    module but loads none, and the import (0.5 s) would lengthen its start."""
    import datasets

    # Loading and filtering prompts takes a moment; its progress bars are not the run's progress.
    datasets.disable_progress_bars()
    name = cfg.dataset
    if name == "bundled":
        ds = _filter_split(_load_file(BUNDLED, "json"), split, name)
    elif Path(name).suffix in _LOCAL_BUILDERS:
        path = Path(name)
        if not path.is_file():
            raise DataError(f"data.dataset: local file `{name}` not found")
        ds = _load_file(path, _LOCAL_BUILDERS[path.suffix])
        if "split" in ds.column_names:
            ds = _filter_split(ds, split, name)
        elif split != "train":
            raise DataError(
                f"`{name}` has no `split` column, so it has only a train split; set "
                f"data.eval_split '' (or add a `split` column) instead of asking for `{split}`"
            )
    else:
        ds = _load_hub(name, split)

    if len(ds) == 0:
        raise DataError(f"dataset `{name}` split `{split}` is empty")
    if cfg.prompt_column not in ds.column_names:
        raise DataError(
            f"dataset `{name}` has no column `{cfg.prompt_column}` (set data.prompt_column); "
            f"its columns are: {', '.join(ds.column_names)}"
        )
    return ds


def _load_file(path: Path, builder: str) -> datasets.Dataset:
    # The json builder fails on an empty file with a bare StopIteration; say what it means.
    if path.stat().st_size == 0:
        raise DataError(f"dataset `{path}` is empty")
    import datasets

    logger = datasets.utils.logging.get_logger()
    level = logger.getEffectiveLevel()
    logger.setLevel(logging.CRITICAL)  # its failure would be logged twice: it is said below, once
    try:
        return datasets.load_dataset(builder, data_files=str(path), split="train")
    except Exception as e:
        if path.suffix == ".jsonl":
            _raise_bad_line(path)
        raise DataError(f"could not read `{path}` as {builder}: {e}") from e
    finally:
        logger.setLevel(level)


def _raise_bad_line(path: Path) -> None:
    """Name the first line of a JSON Lines file that is not a JSON object: datasets says only
    that an error occurred while generating the dataset."""
    with path.open(encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"`{path}` line {number} is not JSON ({e.msg}, column {e.colno}): "
                                f"{line.strip()[:60]!r}") from None
            if not isinstance(row, dict):
                raise DataError(f"`{path}` line {number} is not a JSON object: {line.strip()[:60]!r}")


def _filter_split(ds: datasets.Dataset, split: str, name: str) -> datasets.Dataset:
    out = ds.filter(lambda s: s == split, input_columns="split")
    if len(out) == 0:
        known = ", ".join(sorted(str(s) for s in ds.unique("split")))
        raise DataError(f"dataset `{name}` split `{split}` is empty (splits present: {known})")
    return out


def _load_hub(name: str, split: str) -> datasets.Dataset:
    import datasets
    from datasets.exceptions import DatasetNotFoundError

    try:
        return datasets.load_dataset(name, split=split)
    except DatasetNotFoundError:
        raise DataError(
            f"data.dataset: `{name}` is neither `bundled`, a local .json/.jsonl/.parquet file, "
            f"nor a dataset found on the Hugging Face Hub"
        ) from None
    except ConnectionError as e:
        raise DataError(
            f"data.dataset: could not reach the Hugging Face Hub for `{name}` and it is not in "
            f"the local cache ({e}); check the name and the network, or use a local file"
        ) from None
    except ValueError as e:
        # datasets words an unknown split as 'Unknown split "x". Should be one of [...]'.
        if "split" in str(e).lower():
            raise DataError(f"dataset `{name}` has no split `{split}`: {e}") from None
        raise DataError(f"could not load dataset `{name}` split `{split}`: {e}") from e
    except Exception as e:
        raise DataError(f"could not load dataset `{name}` split `{split}`: {e}") from e


# --- rendering and tokenizing -------------------------------------------------------------


def render(prompt: str | list[dict[str, Any]], tokenizer: Any, use_chat_template: bool) -> str:
    """The text an engine sees for one prompt: a string or a list of chat messages."""
    if isinstance(prompt, str):
        if not use_chat_template:
            return prompt
        messages = [{"role": "user", "content": prompt}]
    elif isinstance(prompt, list) and all(isinstance(m, dict) for m in prompt):
        if not use_chat_template:
            raise DataError(
                "prompts are chat messages, which need a chat template; set data.chat_template true"
            )
        messages = prompt
    else:
        raise DataError(
            f"a prompt must be a string or a list of chat messages, got {type(prompt).__name__}"
        )
    if getattr(tokenizer, "chat_template", None) is None:
        raise DataError("the tokenizer has no chat template; set data.chat_template false")
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def prepare(ds: datasets.Dataset, cfg: DataConfig, tokenizer: Any) -> tuple[list[Prompt], int]:
    """Every row as a `Prompt`, overlong ones truncated or skipped; returns (prompts, overlong)."""
    rows = ds.to_list()
    texts = []
    for i, row in enumerate(rows):
        raw = row[cfg.prompt_column]
        if _is_empty(raw):
            raise DataError(f"dataset `{cfg.dataset}` row {i}: `{cfg.prompt_column}` is empty")
        try:
            texts.append(render(raw, tokenizer, cfg.chat_template))
        except DataError as e:
            raise DataError(f"dataset `{cfg.dataset}` row {i}: {e}") from None

    # The template already holds any special tokens the model expects; adding BOS would double it.
    all_ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    limit = cfg.max_prompt_tokens
    prompts, overlong = [], 0
    for i, (row, text, ids) in enumerate(zip(rows, texts, all_ids)):
        if len(ids) > limit:
            overlong += 1
            if cfg.overlong == "skip":
                continue
            # Keep the end: with a chat template that is the question and the assistant cue.
            ids = ids[-limit:]
            text = tokenizer.decode(ids)
        columns = {k: v for k, v in row.items() if k not in (cfg.prompt_column, "split")}
        prompts.append(Prompt(index=i, text=text, token_ids=list(ids), columns=columns,
                              raw=row[cfg.prompt_column]))

    if not prompts:
        if rows:
            raise DataError(
                f"dataset `{cfg.dataset}`: all {len(rows)} prompts are longer than "
                f"data.max_prompt_tokens ({limit}) and were skipped; raise it or set "
                f"data.overlong truncate"
            )
        raise DataError(f"dataset `{cfg.dataset}`: no rows to prepare")
    return prompts, overlong


def _is_empty(raw: Any) -> bool:
    return raw is None or (isinstance(raw, str) and not raw.strip()) or raw == []


@dataclass
class PromptSplits:
    """A run's prompts: the train split, the eval split (maybe empty), and how many of either
    were over `data.max_prompt_tokens`."""

    train: list[Prompt]
    eval: list[Prompt]
    overlong: int


def load_prompts(cfg: DataConfig, tokenizer: Any) -> PromptSplits:
    """The train and eval splits of `cfg.dataset`, rendered and tokenized as a run uses them;
    the eval split cut to `cfg.eval_prompts` (0: all of it)."""
    train, overlong = prepare(load_split(cfg, cfg.train_split), cfg, tokenizer)
    evals: list[Prompt] = []
    if cfg.eval_split:
        evals, skipped = prepare(load_split(cfg, cfg.eval_split), cfg, tokenizer)
        overlong += skipped
        evals = evals[: cfg.eval_prompts or None]
    return PromptSplits(train, evals, overlong)


# --- sampling -----------------------------------------------------------------------------


class PromptSampler:
    """Endless, reproducible stream of training prompts: each epoch is a fresh permutation seeded
    by (seed, epoch), so the whole stream is a pure function of (seed, position) and resuming
    needs only `position`."""

    def __init__(self, prompts: list[Prompt], seed: int, position: int = 0):
        if not prompts:
            raise DataError("no prompts to sample from")
        if position < 0:
            raise ValueError(f"position must be >= 0 (got {position})")
        self.prompts = list(prompts)
        self.seed = seed
        self.position = position
        """Prompts handed out so far."""
        self._epoch = -1
        self._order: list[int] = []

    def take(self, n: int) -> list[Prompt]:
        """The next `n` prompts, crossing epoch boundaries as needed."""
        out = []
        for _ in range(n):
            epoch, i = divmod(self.position, len(self.prompts))
            out.append(replace(self.prompts[self._permutation(epoch)[i]], position=self.position))
            self.position += 1
        return out

    def _permutation(self, epoch: int) -> list[int]:
        if epoch != self._epoch:
            order = list(range(len(self.prompts)))
            # A string seed is hashed with SHA-512, so the order is the same in every process
            # (unlike hash(), which PYTHONHASHSEED changes) and independent of global RNG state.
            random.Random(f"{self.seed}-{epoch}").shuffle(order)
            self._epoch, self._order = epoch, order
        return self._order
