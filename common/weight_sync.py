"""Moving weights from the learner to the rollout engines: the wire format both sides agree on, and
one channel class per transport with the same two verbs, `send` (the learner) and `receive` (each
engine).

Two transports: a broadcast group (torch.distributed; gloo on CPU, NCCL on GPU; works across
nodes), and a shared-memory file that CPU engines on the learner's node read directly.
Tensors travel as raw bytes in flat buckets, so one collective moves many parameters.
"""

from __future__ import annotations

import os
import socket
import struct
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import timedelta

import torch

from common.errors import RunError
from common.held import create_held

NamedTensors = Iterable[tuple[str, torch.Tensor]]


class WeightSyncError(RunError):
    """Weights that cannot be sent or received as asked; one line."""


@dataclass(frozen=True)
class TensorSpec:
    """Name, dtype and shape of one parameter, as both sides of a transfer must agree on."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        numel = 1
        for d in self.shape:
            numel *= d
        return numel * getattr(torch, self.dtype).itemsize


def specs_of(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> list[TensorSpec]:
    return [TensorSpec(n, str(t.dtype).removeprefix("torch."), tuple(t.shape)) for n, t in named_tensors]


def plan_buckets(specs: list[TensorSpec], bucket_bytes: int) -> list[list[int]]:
    """Consecutive runs of tensor indices of at most `bucket_bytes` each; a bigger tensor goes alone."""
    buckets: list[list[int]] = []
    size = 0
    for i, spec in enumerate(specs):
        if buckets and size + spec.nbytes <= bucket_bytes:
            buckets[-1].append(i)
            size += spec.nbytes
        else:
            buckets.append([i])
            size = spec.nbytes
    return buckets


ALIGN = 16  # every tensor starts at a multiple of this, so each dtype can view its bytes in place


def _padded(nbytes: int) -> int:
    return -(-nbytes // ALIGN) * ALIGN


def packed_size(specs: list[TensorSpec]) -> int:
    """Bytes of `specs` laid out by `flatten`."""
    return sum(_padded(s.nbytes) for s in specs)


def flatten(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The tensors' bytes, each at an aligned offset, as one uint8 tensor."""
    flat = torch.empty(sum(_padded(t.nbytes) for t in tensors), dtype=torch.uint8, device=tensors[0].device)
    offset = 0
    for t in tensors:
        flat[offset : offset + t.nbytes].copy_(t.detach().contiguous().reshape(-1).view(torch.uint8))
        offset += _padded(t.nbytes)
    return flat


def unflatten(flat: torch.Tensor, specs: list[TensorSpec]) -> Iterator[tuple[str, torch.Tensor]]:
    """Views of `flat` (uint8, laid out by `flatten`) as the tensors `specs` describe; no copy."""
    offset = 0
    for spec in specs:
        chunk = flat[offset : offset + spec.nbytes]
        yield spec.name, chunk.view(getattr(torch, spec.dtype)).view(spec.shape)
        offset += _padded(spec.nbytes)


class WeightChannel(ABC):
    """One end of a weight transport: the learner sends the policy on it, every engine receives."""

    specs: list[TensorSpec]
    """The tensors, in the order they travel."""

    @abstractmethod
    def send(self, named_tensors: NamedTensors, version: int) -> None:
        """Send the tensors (in the order of the channel's specs) as policy `version`."""

    @abstractmethod
    def receive(self, version: int) -> Iterator[tuple[str, torch.Tensor]]:
        """The tensors of policy `version`, each valid until the channel next receives. Fails if
        another version arrives."""

    @abstractmethod
    def close(self) -> None:
        """Leave the transport (the sender also removes what it made)."""


# --- broadcast group -------------------------------------------------------------------------


class PortInUse(RunError):
    """The configured weight-sync port is taken; one line."""


def listen_socket(host: str, port: int = 0) -> socket.socket:
    """A socket bound to `port` on `host`, or to a free port when it is 0: taking the port and
    binding it is one step, so no other process can grab it in between."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a fixed port right after a restart
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise PortInUse(f"cluster.weight_sync_port {port} cannot be bound on {host} ({e.strerror}); "
                        "choose another, or 0 for any free port") from None
    sock.listen()
    return sock


def rendezvous(host: str, port: int, rank: int, world_size: int, timeout_s: float, secret: str,
               sock: socket.socket | None = None):
    """The store one weight group's members meet in, served by rank 0 on the socket it bound.
    Its keys live under the group's `secret`, which only the driver's members are told, and it
    does not wait for `world_size` connections, so a stranger who connects stands in for nobody.
    The timeout may be below a second (a timedelta, never rounded to 0)."""
    from torch.distributed import PrefixStore, TCPStore

    store = TCPStore(host, port, world_size, is_master=rank == 0, timeout=timedelta(seconds=timeout_s),
                     wait_for_workers=False, master_listen_fd=sock.detach() if sock is not None else None)
    return PrefixStore(f"grpo-ray/{secret}", store)


def stateless_group(store, rank: int, world_size: int, timeout_s: float):
    """vLLM's StatelessProcessGroup over our own store, once every member is there. vLLM's
    `StatelessProcessGroup.create` would serve a bare store that anyone reaching the port can
    write to, and the NCCL unique id it passes is unpickled by every member
    (vllm/distributed/utils.py, StatelessProcessGroup.broadcast_obj); the group is a plain
    dataclass of rank, world size and store, so it is built here over the secret's store."""
    from vllm.distributed.utils import StatelessProcessGroup

    group = StatelessProcessGroup(rank=rank, world_size=world_size, store=store)
    # Every member present before NCCL's ncclCommInitRank, which waits for all of them with
    # no timeout (vllm/distributed/device_communicators/pynccl.py, PyNcclCommunicator._init_comm).
    group.barrier(timeout=timeout_s)
    return group


FAILED_KEY = "failed"  # set in a group's store by the first member whose transfer fails
ASK_EVERY_S = 0.05    # how often a waiting member asks the store whether another one failed


def wait_or_abort(done: Callable[[], bool], abort: Callable[[], None], timeout_s: float,
                  failed_elsewhere: Callable[[], bool] = lambda: False) -> None:
    """Poll `done` until it holds; past `timeout_s`, or as soon as `failed_elsewhere` says
    another member gave up, call `abort` and raise. For work that could otherwise wait forever
    on a member that died, or on one that failed and will never take part again."""
    start = asked = time.monotonic()
    while not done():
        now = time.monotonic()
        if now - asked > ASK_EVERY_S:
            asked = now
            if failed_elsewhere():
                abort()
                raise WeightSyncError("another member of the weight group failed its transfer; "
                                      "this one was aborted")
        if now - start > timeout_s:
            abort()
            raise WeightSyncError(f"a weight broadcast waited {timeout_s:.0f} s for a member of its "
                                  "group (cluster.weight_sync_timeout_s); the group was aborted")
        time.sleep(0.001)


class BroadcastChannel(WeightChannel):
    """One member of a process group that exists only to broadcast weights from rank 0 (the
    learner) to the engines: gloo on a CPU, NCCL (vLLM's PyNcclCommunicator) on a GPU. It lives
    beside vLLM's own groups without touching global state. Only the members the driver created
    can join (see `rendezvous`); on a CPU the gloo connections bind the node's address `host`
    (loopback on a single machine), not every interface. No collective waits for a lost member
    longer than `timeout_s`."""

    def __init__(self, host: str, port: int, rank: int, world_size: int, specs: list[TensorSpec],
                 buckets: list[list[int]], device: str | torch.device, timeout_s: float, secret: str,
                 sock: socket.socket | None = None):
        self.rank, self.world_size, self.timeout_s = rank, world_size, timeout_s
        self.specs, self.buckets = specs, buckets
        self.device = torch.device(device)
        self._store = store = rendezvous(host, port, rank, world_size, timeout_s, secret, sock)
        self._pg = self._nccl = None
        if self.device.type == "cpu":
            from torch.distributed import ProcessGroupGloo

            opts = ProcessGroupGloo._Options()
            opts._timeout = timedelta(seconds=timeout_s)  # gloo fails a collective that waits longer
            opts._devices = [ProcessGroupGloo.create_device(hostname=host)]
            self._pg = ProcessGroupGloo(store, rank, world_size, opts)
        else:
            if self.device.index is None:  # the learner's "cuda": this process's device
                self.device = torch.device("cuda", torch.cuda.current_device())
            self._nccl = _nccl_communicator(stateless_group(store, rank, world_size, timeout_s),
                                            self.device)

    def _broadcast(self, tensor: torch.Tensor) -> None:
        if self._nccl is None:
            opts = torch.distributed.BroadcastOptions()
            opts.rootRank = 0
            work = self._pg.broadcast([tensor], opts)
            wait_or_abort(work.is_completed, self._pg.abort, self.timeout_s, self._failed_elsewhere)
            work.wait()  # raises what the collective met
            return
        # PyNcclCommunicator.broadcast only enqueues the kernel, and has no timeout
        # (vllm/distributed/device_communicators/pynccl.py, broadcast). Waiting on the stream
        # would block forever for a member that died; a CUDA event is polled instead
        # (torch.cuda.Event.query is cudaEventQuery, which never blocks: c10/cuda/CUDAEvent.h,
        # CUDAEvent::query), and past the deadline the communicator is aborted
        # (PyNcclCommunicator.destroy calls ncclCommAbort, which ends the waiting kernel).
        stream = torch.cuda.current_stream()
        self._nccl.broadcast(tensor, src=0, stream=stream)
        done = torch.cuda.Event()
        done.record(stream)
        # Aborting reaches only this member's communicator (ncclCommAbort in
        # PyNcclCommunicator.destroy): the others would wait out their own deadline. A member
        # that fails says so in the group's store, which every waiting member asks.
        wait_or_abort(done.query, self._nccl.destroy, self.timeout_s, self._failed_elsewhere)

    def _failed_elsewhere(self) -> bool:
        try:
            return self._store.check([FAILED_KEY])
        except Exception:  # the store is rank 0's: gone with the learner
            return True

    def _fail(self, error: BaseException) -> None:
        """Tell every other member, through the store, that this one's transfer failed."""
        try:
            self._store.set(FAILED_KEY, f"rank {self.rank}: {error}"[:200])
        except Exception:
            pass  # the store went with rank 0, and everyone hears of that anyway

    def send(self, named_tensors: NamedTensors, version: int) -> None:
        tensors = (t for _, t in named_tensors)  # one bucket's at a time: they may be made on demand
        try:
            self._broadcast(torch.tensor([version], dtype=torch.int64, device=self.device))
            for bucket in self.buckets:
                self._broadcast(flatten([next(tensors).to(self.device) for _ in bucket]))
        except BaseException as e:
            self._fail(e)
            raise

    def receive(self, version: int) -> Iterator[tuple[str, torch.Tensor]]:
        """Every bucket arrives before the first tensor is handed out, so a transfer that fails
        part-way has loaded nothing: on a GPU vLLM's reload moves each layer to the meta device
        until all of it arrived (vllm/model_executor/model_loader/reload/layerwise.py), and an
        interrupted one would leave the engine without weights. On a GPU the buckets wait in
        host memory, where a model-sized copy fits, not in the engine's reserved GPU memory;
        the reload copies them in (a loader's param.data.copy_ crosses devices)."""
        try:
            arrived = self._receive_all(version)
        except BaseException as e:
            self._fail(e)
            raise
        return (named for flat, bucket_specs in arrived for named in unflatten(flat, bucket_specs))

    def _receive_all(self, version: int) -> list[tuple[torch.Tensor, list[TensorSpec]]]:
        sent = torch.empty(1, dtype=torch.int64, device=self.device)
        self._broadcast(sent)
        if int(sent) != version:
            raise WeightSyncError(f"the learner broadcast weights version {int(sent)}, "
                                  f"this engine expected version {version}")
        arrived = []
        for bucket in self.buckets:
            bucket_specs = [self.specs[i] for i in bucket]
            flat = torch.empty(packed_size(bucket_specs), dtype=torch.uint8, device=self.device)
            self._broadcast(flat)  # complete when it returns: the CUDA event was polled
            arrived.append((flat.cpu(), bucket_specs))
        return arrived

    def close(self) -> None:
        if self._pg is not None:
            self._pg.shutdown()
        if self._nccl is not None:
            # ncclCommAbort: never waits for the other members, which may be gone
            # (pynccl.py, PyNcclCommunicator.destroy); a dropped communicator would leak.
            self._nccl.destroy()
        self._pg = self._nccl = self._store = None


def _nccl_communicator(group, device: torch.device):
    from vllm.distributed.device_communicators.pynccl import PyNcclCommunicator
    from vllm.utils.nccl import unpinned_nccl_env

    # Without the NCCL settings vLLM may pin for its own communicators: the learner's process
    # has none, and members that disagree hang (vllm/utils/nccl.py, unpinned_nccl_env).
    with unpinned_nccl_env():
        communicator = PyNcclCommunicator(group, device=device)
    # It comes up disabled when NCCL cannot load or VLLM_DISABLE_PYNCCL is set, and then
    # broadcasts nothing without a word (pynccl.py, PyNcclCommunicator.__init__ and broadcast):
    # the engines would load uninitialised buffers.
    if communicator.disabled:
        raise WeightSyncError("vLLM's NCCL communicator is disabled (NCCL did not load, or "
                              "VLLM_DISABLE_PYNCCL is set): weights cannot be broadcast to the engines")
    return communicator


# --- shared memory ---------------------------------------------------------------------------

_HEADER = struct.Struct("<8sqq")  # magic, version, payload bytes
_MAGIC = b"GRPOWTS1"


class SharedMemoryChannel(WeightChannel):
    """One copy of the weights in a file in shared memory (/dev/shm): the learner writes it, every
    engine on the same node reloads from it directly. The header holds the version written last,
    so a reader can tell a stale or half-written file from the one it was told to load."""

    BEING_WRITTEN = -1

    def __init__(self, path: str, specs: list[TensorSpec], owner: bool = False):
        self.path, self.specs, self.owner = path, specs, owner
        self.payload = packed_size(specs)
        self._lock = None
        if owner:
            self._lock = create_held(path)
        else:
            os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))  # the weights are this user's only
        self._mem = torch.from_file(path, shared=True, size=_HEADER.size + self.payload,
                                    dtype=torch.uint8)

    def send(self, named_tensors: NamedTensors, version: int) -> None:
        self._set_header(self.BEING_WRITTEN)
        for (_, tensor), (_, view) in zip(named_tensors, self._views(), strict=True):
            view.copy_(tensor.detach())
        self._set_header(version)

    def receive(self, version: int) -> Iterator[tuple[str, torch.Tensor]]:
        magic, found, payload = _HEADER.unpack(self._mem[: _HEADER.size].numpy().tobytes())
        if magic != _MAGIC or payload != self.payload:
            raise WeightSyncError(f"{self.path} holds no weights of this model (never written, or "
                                  "written for other tensors)")
        if found != version:
            state = "is being written" if found == self.BEING_WRITTEN else f"holds version {found}"
            raise WeightSyncError(f"shared weights at {self.path} {state}, expected version {version}")
        return self._views()

    def _views(self) -> Iterator[tuple[str, torch.Tensor]]:
        return unflatten(self._mem[_HEADER.size :], self.specs)

    def _set_header(self, version: int) -> None:
        header = _HEADER.pack(_MAGIC, version, self.payload)
        self._mem[: _HEADER.size].copy_(torch.frombuffer(bytearray(header), dtype=torch.uint8))

    def close(self) -> None:
        """Unmap the file; the sender (its owner) also removes it."""
        self._mem = None
        if self.owner and os.path.exists(self.path):
            os.unlink(self.path)
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None


SHARED_WEIGHTS = "/dev/shm/grpo-ray-{}.weights"  # a model-sized file in memory, one per run
