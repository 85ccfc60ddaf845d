"""The learner with a LoRA adapter (`learner.lora_rank`), on the tiny preset without Ray: only the
adapter trains, holds AdamW state and travels; the reference is the model with the adapter off;
checkpoints hold the adapter and resume it exactly; the final model has it merged."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from common.config import Config
from common.lora import ADAPTER_DIR
from common.types import RunState, RunSummary
from learner.batch import collate
from learner.learner import Learner
from tests.unit.learner.test_learner import group

RANK, ALPHA = 8, 16.0
TARGETS = ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")


def lora_learner(beta: float = 0.0, dtype: str = "float32") -> Learner:
    cfg = Config()
    cfg.grpo.group_size, cfg.grpo.batch_size, cfg.grpo.beta = 2, 2, beta
    cfg.model.dtype = dtype
    cfg.learner.lora_rank, cfg.learner.lora_alpha = RANK, ALPHA
    return Learner(cfg)


@pytest.fixture()
def learner() -> Learner:
    return lora_learner()


def base_model(learner: Learner) -> torch.nn.Module:
    """The model as it was loaded, apart from the learner."""
    return AutoModelForCausalLM.from_pretrained(learner.model_path, dtype=torch.float32)


def adapted_linears(model: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    """The base model's linear layers that the default targets name."""
    return {name: m for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in TARGETS}


def logprobs(learner: Learner, batch) -> torch.Tensor:
    g = batch[0]
    mb = collate([(g.prompt.token_ids, ids, []) for ids in g.completion_ids], torch.zeros(2),
                 learner.pad_id)
    with torch.no_grad():
        return learner.logprobs(mb)[0]


def test_only_the_adapter_trains_and_holds_adamw_state(learner):
    linears = adapted_linears(base_model(learner))
    expected = sum(RANK * (m.in_features + m.out_features) for m in linears.values())
    assert len(linears) == 4 * 2  # the tiny preset's two blocks, four linear layers each
    frozen = {k: v.clone() for k, v in learner.model.state_dict().items() if "lora_" not in k}

    learner.train([group(learner, [1010, 2020, 3030], [4040, 5050, 6060])])

    trained = [p for p in learner.model.parameters() if p.requires_grad]
    assert sum(p.numel() for p in trained) == expected
    state = learner.optimizer.state
    assert set(state) == set(trained)  # AdamW's moments exist for the adapter alone
    assert sum(s["exp_avg"].numel() + s["exp_avg_sq"].numel() for s in state.values()) == 2 * expected
    assert all(torch.equal(v, frozen[k]) for k, v in learner.model.state_dict().items() if k in frozen)
    b = [p for n, p in learner.model.named_parameters() if "lora_B" in n]
    assert all(p.abs().sum() > 0 for p in b)  # the precondition: the step moved the adapter


def test_only_the_adapter_is_sent_under_peft_names(learner):
    specs = learner.weight_specs()
    whole = sum(p.numel() for p in learner.model.parameters()) * 4  # float32 (tiny's dtype here)
    sent = sum(s.nbytes for s in specs)
    assert {s.name.rsplit(".", 2)[-2] for s in specs} == {"lora_A", "lora_B"}
    assert all(s.name.startswith("base_model.model.gpt_neox.layers.") for s in specs)
    assert sent == sum(p.numel() for p in learner.trainable()) * 4
    assert whole / sent > 400  # rank 8 of a 13.3M-parameter model
    sent_weights = dict(learner.sender.named_weights())
    assert list(sent_weights) == [s.name for s in specs]


def test_the_reference_is_the_model_with_its_adapter_off():
    learner = lora_learner(beta=0.04)
    assert learner.ref_model is None  # no second copy of the model
    batch = [group(learner, [1010, 2020, 3030], [4040, 5050, 6060])]
    for _ in range(3):
        learner.train(batch)
    g = batch[0]
    mb = collate([(g.prompt.token_ids, ids, []) for ids in g.completion_ids], torch.zeros(2),
                 learner.pad_id)
    reference = learner._ref_logprobs(mb)
    base = base_model(learner)
    with torch.no_grad():
        expected = torch.stack([base(torch.tensor([g.prompt.token_ids + ids])).logits[0].log_softmax(-1)
                                [len(g.prompt.token_ids) - 1:-1].gather(-1, torch.tensor(ids)[:, None])[:, 0]
                                for ids in g.completion_ids])
    assert (logprobs(learner, batch) - expected).abs().max() > 1e-3  # the adapter matters
    torch.testing.assert_close(reference, expected, atol=1e-5, rtol=0)
    assert any(p.requires_grad for p in learner.model.parameters())  # the adapter is back on


def test_a_lora_checkpoint_holds_the_adapter_and_resumes_exactly(learner, tmp_path):
    batch = [group(learner, [1, 2, 3], [4, 5, 6])]
    learner.train(batch)
    saved = Path(learner.save_checkpoint(str(tmp_path), RunState(step=1)))
    assert sorted(p.name for p in (saved / "adapter").iterdir()) == [
        "README.md", "adapter_config.json", "adapter_model.safetensors"]
    assert not (saved / "model").exists()
    stored = load_file(saved / "adapter" / "adapter_model.safetensors")
    assert sum(t.numel() for t in stored.values()) == sum(p.numel() for p in learner.trainable())
    learner.train(batch)
    after_two = {k: v.clone() for k, v in learner.model.state_dict().items()}

    resumed = lora_learner()
    assert resumed.load_checkpoint(str(tmp_path)) == RunState(step=1)
    resumed.train(batch)
    for key, value in resumed.model.state_dict().items():
        assert torch.equal(value, after_two[key]), key
    assert not torch.equal(after_two[next(k for k in after_two if "lora_B" in k)],
                           lora_learner().model.state_dict()[next(k for k in after_two if "lora_B" in k)])


def test_the_final_model_is_the_base_with_the_adapter_merged_and_the_adapter_beside_it(learner, tmp_path):
    from transformers import pipeline

    batch = [group(learner, [1010, 2020, 3030], [4040, 5050, 6060])]
    for _ in range(3):
        learner.train(batch)
    policy = logprobs(learner, batch)
    final = Path(learner.export(str(tmp_path / "final"), RunSummary(steps=3, complete=True, results={})))

    merged = load_file(final / "model.safetensors")
    adapter = load_file(final / ADAPTER_DIR / "adapter_model.safetensors")
    config = json.loads((final / ADAPTER_DIR / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == (RANK, ALPHA)
    base = base_model(learner)
    changed = 0
    for name, linear in adapted_linears(base).items():
        a = adapter[f"base_model.model.{name}.lora_A.weight"]
        b = adapter[f"base_model.model.{name}.lora_B.weight"]
        expected = linear.weight.detach() + (ALPHA / RANK) * b @ a
        torch.testing.assert_close(merged[f"{name}.weight"], expected, atol=1e-6, rtol=1e-6)
        changed += not torch.equal(merged[f"{name}.weight"], linear.weight.detach())
    assert changed == len(adapted_linears(base))  # the precondition: every merge changed its layer
    untouched = {k: v for k, v in base.state_dict().items()
                 if k.endswith("weight") and k.rsplit(".", 1)[0] not in adapted_linears(base)}
    for key, value in untouched.items():
        if key in merged:
            assert torch.equal(merged[key], value), key

    learner.model = AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32)  # scores it
    torch.testing.assert_close(logprobs(learner, batch), policy, atol=1e-4, rtol=0)
    assert "merged into these weights" in (final / "README.md").read_text()
    generator = pipeline("text-generation", model=str(final))
    assert generator("Hello", max_new_tokens=4, do_sample=False)[0]["generated_text"].startswith("Hello")
