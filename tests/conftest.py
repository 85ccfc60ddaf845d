"""Shared test setup: GPU-only tests are skipped on machines without CUDA."""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def reward_model_dir(tmp_path_factory):
    """A small random-init sequence classifier (one label) with the Pythia tokenizer, built
    here as the `tiny` preset is: what `model:PATH` rewards load on a machine without a hub."""
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForSequenceClassification

    from common import models

    out = tmp_path_factory.mktemp("reward-model")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        config = GPTNeoXConfig(**models._config_dict(models.PRESETS["tiny"]), num_labels=1)
        GPTNeoXForSequenceClassification(config).save_pretrained(out)
    models.tokenizer_for("tiny").save_pretrained(out)
    return out
