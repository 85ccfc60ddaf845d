"""Prompt data: the bundled set, loading splits, rendering, tokenizing, and the sampler."""

from __future__ import annotations

import json
import time
from pathlib import Path

import datasets
import huggingface_hub.constants
import pytest
from transformers import PreTrainedTokenizerFast

from common.config import DataConfig
from common.data import BUNDLED, DataError, PromptSampler, load_prompts, load_split, prepare, render
from common.types import Prompt

TOKENIZER_FILE = Path(__file__).parents[3] / "common" / "assets" / "gpt-neox-20b-tokenizer.json"
TEMPLATE = (
    "{% for m in messages %}User: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    tok = PreTrainedTokenizerFast(
        tokenizer_file=str(TOKENIZER_FILE),
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        pad_token="<|padding|>",
    )
    tok.chat_template = TEMPLATE
    return tok


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path_factory, monkeypatch):
    # Keep the Arrow caches of these small test files out of the user's ~/.cache.
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path_factory.mktemp("hf"))


def bundled_rows() -> list[dict]:
    return [json.loads(line) for line in BUNDLED.read_text().splitlines()]


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


# --- the bundled prompt set -----------------------------------------------------------------


def test_bundled_file_has_enough_unique_prompts():
    rows = bundled_rows()
    prompts = [r["prompt"] for r in rows]
    assert len(rows) >= 320
    assert len({" ".join(p.lower().split()) for p in prompts}) == len(prompts)
    assert all(set(r) == {"prompt", "split"} for r in rows)
    assert all(5 <= len(p.split()) <= 40 for p in prompts)


def test_bundled_split_rule_every_sixth_line_is_eval():
    rows = bundled_rows()
    assert [r["split"] for r in rows] == [
        "eval" if i % 6 == 5 else "train" for i in range(len(rows))
    ]
    train = {r["prompt"] for r in rows if r["split"] == "train"}
    eval_ = {r["prompt"] for r in rows if r["split"] == "eval"}
    assert train and eval_ and not train & eval_


def test_load_split_bundled_sizes():
    rows = bundled_rows()
    n_eval = len(rows) // 6
    train = load_split(DataConfig(), "train")
    eval_ = load_split(DataConfig(), "eval")
    assert (len(train), len(eval_)) == (len(rows) - n_eval, n_eval)
    assert set(train["split"]) == {"train"} and set(eval_["split"]) == {"eval"}
    assert not set(train["prompt"]) & set(eval_["prompt"])


def test_load_split_bundled_unknown_split_names_the_ones_present():
    with pytest.raises(DataError, match=r"split `test` is empty.*eval, train"):
        load_split(DataConfig(), "test")


# --- local files ----------------------------------------------------------------------------


def test_local_jsonl_with_split_column_and_custom_prompt_column(tmp_path):
    rows = [{"question": f"q{i}", "answer": i, "split": "eval" if i % 3 == 0 else "train"}
            for i in range(9)]
    cfg = DataConfig(dataset=write_jsonl(tmp_path / "d.jsonl", rows), prompt_column="question")
    assert load_split(cfg, "train")["question"] == [f"q{i}" for i in range(9) if i % 3]
    assert load_split(cfg, "eval")["answer"] == [0, 3, 6]


def test_local_parquet_without_split_column_is_all_train(tmp_path):
    path = tmp_path / "d.parquet"
    datasets.Dataset.from_dict({"text": ["a b", "c d", "e f"], "label": [1, 2, 3]}).to_parquet(path)
    cfg = DataConfig(dataset=str(path), prompt_column="text")
    assert load_split(cfg, "train")["text"] == ["a b", "c d", "e f"]
    with pytest.raises(DataError, match=r"d\.parquet` has no `split` column.*eval_split ''"):
        load_split(cfg, "eval")


def test_local_parquet_with_split_column(tmp_path):
    path = tmp_path / "d.parquet"
    datasets.Dataset.from_dict({"q": ["a", "b", "c"], "split": ["train", "eval", "train"]}
                               ).to_parquet(path)
    cfg = DataConfig(dataset=str(path), prompt_column="q")
    assert load_split(cfg, "train")["q"] == ["a", "c"]
    assert load_split(cfg, "eval")["q"] == ["b"]


def test_local_jsonl_without_split_column(tmp_path):
    cfg = DataConfig(dataset=write_jsonl(tmp_path / "d.jsonl", [{"prompt": "x"}, {"prompt": "y"}]))
    assert len(load_split(cfg, "train")) == 2
    with pytest.raises(DataError, match="no `split` column"):
        load_split(cfg, "eval")


def test_wrong_prompt_column_lists_the_columns(tmp_path):
    cfg = DataConfig(dataset=write_jsonl(tmp_path / "d.jsonl", [{"question": "x", "id": 1}]))
    with pytest.raises(DataError, match=r"no column `prompt`.*question, id"):
        load_split(cfg, "train")


def test_empty_file_and_empty_split(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match="empty"):
        load_split(DataConfig(dataset=str(empty)), "train")
    only_train = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "x", "split": "train"}])
    with pytest.raises(DataError, match=r"split `eval` is empty"):
        load_split(DataConfig(dataset=only_train), "eval")


def test_missing_local_file(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_split(DataConfig(dataset=str(tmp_path / "nope.jsonl")), "train")


def test_unknown_hub_dataset_fails_fast(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # Both libraries read these variables once, at import; patch what they read them into.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    start = time.monotonic()
    with pytest.raises(DataError, match="no-such-org/no-such-dataset"):
        load_split(DataConfig(dataset="no-such-org/no-such-dataset"), "train")
    assert time.monotonic() - start < 10


# --- render and prepare ---------------------------------------------------------------------


def test_render_string_and_messages(tokenizer):
    assert render("Hi there?", tokenizer, use_chat_template=False) == "Hi there?"
    assert render("Hi there?", tokenizer, use_chat_template=True) == "User: Hi there?\nAssistant:"
    messages = [{"role": "user", "content": "one"}, {"role": "user", "content": "two"}]
    assert render(messages, tokenizer, True) == "User: one\nUser: two\nAssistant:"
    with pytest.raises(DataError, match="chat template"):
        render(messages, tokenizer, use_chat_template=False)
    with pytest.raises(DataError, match="string or a list"):
        render(42, tokenizer, use_chat_template=True)


def test_prepare_tokenizes_without_special_tokens(tokenizer):
    ds = datasets.Dataset.from_dict({"prompt": ["Hello world"], "split": ["train"]})
    prompts, overlong = prepare(ds, DataConfig(), tokenizer)
    assert overlong == 0
    (p,) = prompts
    assert p.index == 0 and p.text == "User: Hello world\nAssistant:"
    assert p.token_ids == tokenizer(p.text, add_special_tokens=False)["input_ids"]
    assert tokenizer.bos_token_id not in p.token_ids
    assert p.columns == {}


def test_prepare_truncate_keeps_last_tokens(tokenizer):
    long = " ".join(f"word{i}" for i in range(60))
    ds = datasets.Dataset.from_dict({"prompt": ["short one", long]})
    cfg = DataConfig(max_prompt_tokens=16, overlong="truncate")
    prompts, overlong = prepare(ds, cfg, tokenizer)
    assert overlong == 1 and [p.index for p in prompts] == [0, 1]
    full = tokenizer(render(long, tokenizer, True), add_special_tokens=False)["input_ids"]
    assert len(full) > 16
    assert prompts[1].token_ids == full[-16:]
    assert prompts[1].text == tokenizer.decode(full[-16:])
    assert prompts[1].text.endswith("word59\nAssistant:")


def test_prepare_skip_drops_overlong_and_counts(tokenizer):
    long = " ".join(["many"] * 80)
    ds = datasets.Dataset.from_dict({"prompt": [long, "short", long, "brief"]})
    prompts, overlong = prepare(ds, DataConfig(max_prompt_tokens=20, overlong="skip"), tokenizer)
    assert overlong == 2
    assert [p.index for p in prompts] == [1, 3]  # row indices survive the skip
    with pytest.raises(DataError, match=r"all 2 prompts.*max_prompt_tokens \(20\)"):
        prepare(ds.select([0, 2]), DataConfig(max_prompt_tokens=20), tokenizer)


def test_prepare_passes_extra_columns_through(tokenizer):
    ds = datasets.Dataset.from_dict(
        {"q": ["a", "b"], "answer": ["x", "y"], "n": [1, 2], "split": ["train", "train"]}
    )
    prompts, _ = prepare(ds, DataConfig(prompt_column="q", chat_template=False), tokenizer)
    assert [p.text for p in prompts] == ["a", "b"]
    assert [p.columns for p in prompts] == [{"answer": "x", "n": 1}, {"answer": "y", "n": 2}]


def test_prepare_chat_messages_column(tokenizer):
    ds = datasets.Dataset.from_dict({"prompt": [[{"role": "user", "content": "hey"}]]})
    (p,), _ = prepare(ds, DataConfig(), tokenizer)
    assert p.text == "User: hey\nAssistant:"


def test_prepare_empty_prompt_names_the_row(tokenizer):
    ds = datasets.Dataset.from_dict({"prompt": ["fine", "  "]})
    with pytest.raises(DataError, match="row 1"):
        prepare(ds, DataConfig(), tokenizer)


def test_prepare_bundled_end_to_end(tokenizer):
    cfg = DataConfig()
    prompts, overlong = prepare(load_split(cfg, "train"), cfg, tokenizer)
    assert overlong == 0 and len(prompts) >= 260
    assert all(p.columns == {} for p in prompts)


def test_load_prompts_gives_both_splits_and_cuts_the_eval_split(tokenizer):
    splits = load_prompts(DataConfig(eval_prompts=5), tokenizer)
    assert len(splits.train) >= 260 and len(splits.eval) == 5 and splits.overlong == 0
    assert {p.text for p in splits.train}.isdisjoint(p.text for p in splits.eval)
    assert load_prompts(DataConfig(eval_split=""), tokenizer).eval == []
    assert len(load_prompts(DataConfig(eval_prompts=0), tokenizer).eval) >= 50  # 0 is all


def test_load_prompts_counts_overlong_prompts_of_both_splits(tokenizer):
    every = load_prompts(DataConfig(max_prompt_tokens=1000, eval_prompts=0), tokenizer)
    limit = sorted(len(p.token_ids) for p in every.train + every.eval)[-3]  # three are longer
    splits = load_prompts(DataConfig(max_prompt_tokens=limit, eval_prompts=0), tokenizer)
    over = sum(len(p.token_ids) > limit for p in every.train + every.eval)
    assert splits.overlong == over >= 1
    assert len(splits.train) + len(splits.eval) == len(every.train) + len(every.eval) - over


# --- the sampler ----------------------------------------------------------------------------


def make_prompts(n: int) -> list[Prompt]:
    return [Prompt(index=i, text=f"p{i}", token_ids=[i]) for i in range(n)]


def indices(prompts: list[Prompt]) -> list[int]:
    return [p.index for p in prompts]


def test_sampler_is_deterministic_per_seed():
    prompts = make_prompts(50)
    a = indices(PromptSampler(prompts, seed=1).take(120))
    b = indices(PromptSampler(prompts, seed=1).take(120))
    c = indices(PromptSampler(prompts, seed=2).take(120))
    assert a == b and a != c


def test_sampler_each_epoch_is_a_permutation():
    prompts = make_prompts(13)
    s = PromptSampler(prompts, seed=0)
    epochs = [indices(s.take(13)) for _ in range(4)]
    assert all(sorted(e) == list(range(13)) for e in epochs)
    assert len({tuple(e) for e in epochs}) > 1  # each epoch is shuffled afresh
    assert s.position == 52


def test_sampler_take_crosses_epoch_boundary():
    prompts = make_prompts(10)
    stream = indices(PromptSampler(prompts, seed=3).take(30))
    s = PromptSampler(prompts, seed=3)
    chunks = [indices(s.take(n)) for n in (7, 7, 7, 9)]  # 7..14 and 14..21 straddle epochs
    assert sum(chunks, []) == stream
    assert s.take(0) == [] and s.position == 30


def test_sampler_resume_from_position_continues_the_stream():
    prompts = make_prompts(17)
    uninterrupted = indices(PromptSampler(prompts, seed=7).take(100))
    first = PromptSampler(prompts, seed=7)
    head = indices(first.take(40))
    resumed = PromptSampler(prompts, seed=7, position=first.position)
    assert head + indices(resumed.take(60)) == uninterrupted


def test_sampler_stamps_each_prompt_with_its_place_in_the_stream():
    prompts = make_prompts(5)
    s = PromptSampler(prompts, seed=0, position=3)
    taken = s.take(4)  # crosses into the second epoch, where the same rows come again
    assert [p.position for p in taken] == [3, 4, 5, 6]
    assert all(p.position == -1 for p in prompts)  # the split itself is left as it was


def test_sampler_refuses_no_prompts():
    with pytest.raises(DataError):
        PromptSampler([], seed=0)


def test_a_jsonl_line_that_is_not_json_is_named_with_its_start(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"question": "a"}\n\n{"question": "b"}\n{"question": "c", oops}\n{"question": "d"}\n')
    with pytest.raises(DataError) as e:
        load_split(DataConfig(dataset=str(path), prompt_column="question"), "train")
    assert str(e.value) == (f"`{path}` line 4 is not JSON (Expecting property name enclosed in double "
                            "quotes, column 19): '{\"question\": \"c\", oops}'")
