"""A reward plug-in for a test that breaks LoRA's adapter sync on purpose, the failure verl's users
took for staleness: from weight sync STALE_FROM on, the engine is handed the adapter it already
has (the one of sync STALE_FROM - 1) instead of the new one, as a transport that never delivers
would leave it. Imported in every rollout worker with its reward (common/rewards.py resolves
`module:function`). The reward itself is the built-in explicit_pos."""

from __future__ import annotations

from common import weight_sync
from common.rewards import explicit_pos

STALE_FROM = 1  # the first update after the start: the engine keeps the initial adapter
_receive = weight_sync.SharedMemoryChannel.receive
_kept: list = []


def _stale(self, version: int):
    arrived = [(name, tensor.clone()) for name, tensor in _receive(self, version)]
    if version < STALE_FROM or not _kept:
        _kept[:] = arrived
    return _kept


weight_sync.SharedMemoryChannel.receive = _stale


def reward(prompts, completions, **kwargs):
    return explicit_pos(prompts, completions)
