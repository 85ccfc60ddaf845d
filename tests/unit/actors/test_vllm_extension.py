"""The engine's end of the weight channel, with a fake channel and no vLLM: a transfer that fails
leaves the weights as they were; a load that fails part-way ends the process, for Ray to restart."""

from __future__ import annotations

import pytest
import torch

from actors import vllm_extension
from actors.vllm_extension import EXIT_FOR_RESTART, WeightSyncExtension


class Channel:
    specs: list = []

    def __init__(self, fails: bool):
        self.fails, self.closed = fails, False

    def receive(self, version):
        if self.fails:
            raise RuntimeError("a member of the group died")
        return iter([("w", torch.ones(2))])

    def close(self):
        self.closed = True


class Engine(WeightSyncExtension):
    def __init__(self, transfer_fails: bool = False, load_fails: bool = False):
        self._channel = Channel(transfer_fails)
        self.load_fails, self.loaded = load_fails, []

    def _load(self, specs, weights):
        for name, tensor in weights:
            self.loaded.append(name)  # one tensor in, then the failure
            if self.load_fails:
                raise RuntimeError("a tensor of the wrong shape")


@pytest.fixture
def exits(monkeypatch):
    codes = []

    def exit_(code):
        codes.append(code)
        raise SystemExit(code)

    monkeypatch.setattr(vllm_extension.os, "_exit", exit_)
    return codes


def test_a_transfer_that_fails_loads_nothing_and_leaves_the_group(exits):
    engine = Engine(transfer_fails=True)
    channel = engine._channel
    with pytest.raises(RuntimeError, match="died"):
        engine.receive_weights(1)
    assert engine.loaded == [] and channel.closed and exits == []


def test_a_load_that_fails_part_way_ends_the_process_for_ray_to_restart(exits, caplog):
    engine = Engine(load_fails=True)
    with pytest.raises(SystemExit):
        engine.receive_weights(1)
    assert engine.loaded == ["w"] and exits == [EXIT_FOR_RESTART]
    assert "loading weights version 1 failed part-way" in caplog.text


def test_a_whole_load_returns(exits):
    engine = Engine()
    engine.receive_weights(1)
    assert engine.loaded == ["w"] and exits == []
