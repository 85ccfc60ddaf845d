"""The driver's side of the learner and the rollout buffer: one method per remote call, each
waiting with a timeout that names what it waited for and a death that names the actor. Calls the
driver overlaps with other work return a `Call` to wait on; the rest return their result."""

from __future__ import annotations

from typing import TYPE_CHECKING

from common.spans import Span
from common.types import RunState, RunSummary
from common.weight_sync import TensorSpec
from deploy.remote import Call

if TYPE_CHECKING:
    from ray.actor import ActorHandle


class Client:
    """One actor's handle, the timeout of each call to it, and its name in messages."""

    actor: str

    def __init__(self, handle: ActorHandle, timeout_s: float):
        self.handle, self.timeout_s = handle, timeout_s

    def _call(self, ref, what: str) -> Call:
        return Call(ref, what, self.actor, self.timeout_s)


class LearnerClient(Client):
    """A `learner.learner.Learner` actor (rank 0: it drives the other ranks itself)."""

    actor = "the learner"

    def train(self, batch: Call, step: int) -> Call:
        """One update on the groups `batch` brings (handed over inside Ray, not through here)."""
        return self._call(self.handle.train.remote(batch.ref), f"learner step {step + 1}")

    def take_spans(self) -> list[Span]:
        return self._call(self.handle.take_spans.remote(), "the learner's spans").result()

    def probe_logprobs(self, sequences: list[list[int]], starts: list[int],
                       dtype: str | None = None) -> list[list[float]]:
        return self._call(self.handle.probe_logprobs.remote(sequences, starts, dtype),
                          "the learner to score the probe set").result()

    def load_checkpoint(self, run_dir: str) -> RunState:
        return self._call(self.handle.load_checkpoint.remote(run_dir),
                          "the learner to load the checkpoint").result()

    def save_checkpoint(self, run_dir: str, state: RunState) -> str:
        return self._call(self.handle.save_checkpoint.remote(run_dir, state),
                          f"checkpoint {state.step} to be saved").result()

    def export(self, directory: str, summary: RunSummary) -> str:
        return self._call(self.handle.export.remote(directory, summary),
                          "the final model to be written").result()

    # --- weights ---------------------------------------------------------------------------------

    def weight_specs(self) -> list[TensorSpec]:
        return self._call(self.handle.weight_specs.remote(), "the learner to start").result()

    def open_shared_weights(self, path: str) -> None:
        self._call(self.handle.open_shared_weights.remote(path), "the learner to open the shared weights").result()

    def open_weight_group(self, host: str, port: int) -> int:
        return self._call(self.handle.open_weight_group.remote(host, port),
                          "the learner to open the weight-sync port").result()

    def connect_weight_group(self, world_size: int, buckets: list[list[int]], timeout_s: float,
                             secret: str) -> Call:
        return self._call(self.handle.connect_weight_group.remote(world_size, buckets, timeout_s, secret),
                          "the weight-sync group to form")

    def send_weights(self) -> Call:
        return self._call(self.handle.send_weights.remote(), "the learner to send the weights")

    def close_weight_sync(self) -> None:
        self._call(self.handle.close_weight_sync.remote(), "the weight sync to close").result()


class BufferClient(Client):
    """The `common.buffer.RolloutBuffer` actor."""

    actor = "the rollout buffer"

    def batch(self, groups: int, step: int, first: int, timeout_s: float) -> Call:
        """The batch of `groups` groups for learner step `step` (see `RolloutBuffer.get`)."""
        return self._call(self.handle.get.remote(groups, step, first, timeout_s),
                          f"a batch of {groups} groups for step {step + 1}")

    def short(self) -> int:
        """Groups the batch being waited for still lacks."""
        return self._call(self.handle.short.remote(), "the buffer's counts").result()

    def stats(self) -> dict[str, int]:
        return self._call(self.handle.stats.remote(), "the buffer's counts").result()

    def carry_on(self, counts: dict[str, int]) -> None:
        self._call(self.handle.carry_on.remote(counts), "the buffer's counts").result()

    def take_spans(self) -> list[Span]:
        return self._call(self.handle.take_spans.remote(), "the buffer's spans").result()
