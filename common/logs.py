"""Where a run's output goes: the console shows the run's own lines (start-up, one line per step,
results); everything else (library warnings, the engines' and the learner's logs) goes to files
in the run directory's `logs/`, where it can be read when something needs explaining."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

OWN_LOGGERS = ("grpo-ray", "actors", "common", "deploy", "learner")
"""The project's loggers: the only ones the console shows below ERROR."""
FORMAT = "%(asctime)s %(name)s: %(message)s"


def log_dir(run_dir: str | Path) -> Path:
    path = Path(run_dir) / "logs"
    path.mkdir(parents=True, exist_ok=True)
    return path


class _OwnOrSevere(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR or record.name.split(".")[0] in OWN_LOGGERS


def console() -> None:
    """The driver's console: the project's INFO lines and anyone's errors, nothing else."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(FORMAT, datefmt="%H:%M:%S"))
    handler.addFilter(_OwnOrSevere())
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    logging.captureWarnings(True)  # Python warnings become log records of `py.warnings`


def driver_file(run_dir: str | Path) -> None:
    """Everything the driver logs, warnings of libraries included, also to `logs/driver.log`."""
    handler = logging.FileHandler(log_dir(run_dir) / "driver.log")
    handler.setFormatter(logging.Formatter(FORMAT))
    logging.getLogger().addHandler(handler)


def actor_file(run_dir: str | Path, name: str) -> None:
    """This process's stdout and stderr, of Python and of native code alike (vLLM, torch,
    OpenMP), appended to `logs/<name>.log`: a restarted actor adds to the same file."""
    with open(log_dir(run_dir) / f"{name}.log", "a", buffering=1) as out:
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
            os.dup2(out.fileno(), stream.fileno())
