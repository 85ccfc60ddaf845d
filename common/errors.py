"""The project's own failures. Each says in one line what went wrong and what to do about it, so
the driver prints it as one `error:` line; anything else (a bug here, in torch, in vLLM) keeps its
traceback."""

from __future__ import annotations


class RunError(Exception):
    """A failure the run reports in one line; its message names what and, where it can, the fix."""


class WaitTimeout(RunError, TimeoutError):
    """A bounded wait ran out; the message names what was waited for."""
