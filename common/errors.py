"""The project's own failures. Each says in one line what went wrong and what to do about it, so
the driver prints it as one `error:` line; anything else (a bug here, in torch, in vLLM) keeps its
traceback."""

from __future__ import annotations


class RunError(Exception):
    """A failure the run reports in one line; its message names what and, where it can, the fix."""


class WaitTimeout(RunError, TimeoutError):
    """A bounded wait ran out; the message names what was waited for."""


def one_line(text: str, limit: int) -> str:
    """`text` on one line and cut at `limit` characters: what a one-line failure quotes of
    another message (an exception's, a value's repr)."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "..."
