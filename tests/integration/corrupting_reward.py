"""A reward plug-in for a test that breaks a weight transport on purpose. A run imports its reward
functions in every rollout worker (common/rewards.py resolves `module:function`), so importing this
module there also wraps the shared-memory channel the engine receives weights on: from weight sync
CORRUPT_FROM on, one tensor arrives scaled, as a broken transport would deliver it. The reward
itself is the built-in explicit_pos."""

from __future__ import annotations

from common import weight_sync
from common.rewards import explicit_pos

CORRUPT_FROM = 2
CORRUPTED = "gpt_neox.layers.0.attention.dense.weight"
_receive = weight_sync.SharedMemoryChannel.receive


def _corrupted(self, version: int):
    for name, tensor in _receive(self, version):
        yield name, tensor * 1.5 if version >= CORRUPT_FROM and name == CORRUPTED else tensor


weight_sync.SharedMemoryChannel.receive = _corrupted


def reward(prompts, completions, **kwargs):
    return explicit_pos(prompts, completions)
