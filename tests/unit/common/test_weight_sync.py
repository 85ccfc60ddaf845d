"""Weight transport: specs, buckets, flat byte layout, the shared-memory file, and a real gloo
broadcast between two processes (no vLLM engine, no Ray)."""

from __future__ import annotations

import multiprocessing as mp
import queue

import pytest
import torch

from common.weight_sync import (
    BroadcastChannel,
    SharedMemoryChannel,
    TensorSpec,
    WeightSyncError,
    flatten,
    packed_size,
    listen_socket,
    plan_buckets,
    specs_of,
    unflatten,
)

TIMEOUT_S = 60


def mixed() -> list[tuple[str, torch.Tensor]]:
    return [
        ("w", torch.arange(6, dtype=torch.float32).reshape(2, 3) / 4),  # 24 bytes
        ("h", torch.tensor([0.5, -1.5, 2.0, 3.0], dtype=torch.bfloat16)),  # 8 bytes
        ("ids", torch.tensor([7, -8, 2**40], dtype=torch.int64)),  # 24 bytes
    ]


def spec(nbytes: int, name: str = "t") -> TensorSpec:
    return TensorSpec(name, "uint8", (nbytes,))


# ----- TensorSpec, specs_of -----


def test_nbytes_float32_and_bfloat16():
    assert TensorSpec("a", "float32", (2, 3)).nbytes == 24
    assert TensorSpec("b", "bfloat16", (5,)).nbytes == 10
    assert TensorSpec("s", "float32", ()).nbytes == 4  # a scalar has one element


def test_specs_of_names_dtypes_shapes():
    assert specs_of(mixed()) == [
        TensorSpec("w", "float32", (2, 3)),
        TensorSpec("h", "bfloat16", (4,)),
        TensorSpec("ids", "int64", (3,)),
    ]


# ----- plan_buckets -----


def test_plan_buckets_groups_consecutive_tensors_up_to_the_limit():
    sizes = [40, 50, 10, 30, 60, 40]
    # 40+50 = 90; +10 = 100 (fits exactly); 30+60 = 90; +40 = 130 > 100 -> new bucket
    assert plan_buckets([spec(n) for n in sizes], 100) == [[0, 1, 2], [3, 4], [5]]


def test_plan_buckets_respects_the_limit():
    specs = [spec(n) for n in [30, 30, 30, 30, 30]]
    buckets = plan_buckets(specs, 64)
    assert buckets == [[0, 1], [2, 3], [4]]
    assert all(sum(specs[i].nbytes for i in b) <= 64 for b in buckets)


def test_plan_buckets_oversized_tensor_goes_alone():
    assert plan_buckets([spec(10), spec(500), spec(10)], 100) == [[0], [1], [2]]


def test_plan_buckets_empty():
    assert plan_buckets([], 100) == []


# ----- flatten / unflatten -----


def test_flatten_lays_raw_bytes_at_16_byte_aligned_offsets():
    flat = flatten([t for _, t in mixed()])
    assert flat.dtype == torch.uint8
    assert flat.numel() == 32 + 16 + 32  # 24, 8 and 24 bytes, each padded to a multiple of 16
    assert packed_size(specs_of(mixed())) == 80
    # 0.25 as little-endian float32 is 00 00 80 3e; element 1 of "w" starts at byte 4
    assert flat[4:8].tolist() == [0x00, 0x00, 0x80, 0x3E]


def test_flatten_unflatten_round_trip_mixed_dtypes():
    named = mixed()
    flat = flatten([t for _, t in named])
    out = list(unflatten(flat, specs_of(named)))
    assert [n for n, _ in out] == ["w", "h", "ids"]
    for (_, expected), (_, actual) in zip(named, out):
        assert actual.dtype == expected.dtype
        assert actual.shape == expected.shape
        assert torch.equal(actual, expected)


def test_unflatten_returns_views_sharing_memory():
    named = mixed()
    flat = flatten([t for _, t in named])
    views = dict(unflatten(flat, specs_of(named)))
    assert views["h"].data_ptr() == flat.data_ptr() + 32
    assert views["ids"].data_ptr() == flat.data_ptr() + 48
    views["w"][0, 0] = 1.0  # float32 1.0 is 00 00 80 3f
    assert flat[0:4].tolist() == [0x00, 0x00, 0x80, 0x3F]


def test_unflatten_views_a_dtype_that_follows_an_odd_sized_tensor():
    named = [("h", torch.ones(3, dtype=torch.bfloat16)), ("ids", torch.tensor([5], dtype=torch.int64))]
    out = dict(unflatten(flatten([t for _, t in named]), specs_of(named)))
    assert out["ids"].tolist() == [5]


# ----- listen_socket -----


def test_listen_socket_binds_free_ports_on_loopback():
    a, b = listen_socket("127.0.0.1"), listen_socket("127.0.0.1")
    try:
        host_a, port_a = a.getsockname()
        host_b, port_b = b.getsockname()
        assert host_a == host_b == "127.0.0.1"
        assert port_a > 0 and port_b > 0
        assert port_a != port_b
    finally:
        a.close()
        b.close()


# ----- SharedMemoryChannel -----


def test_shared_weights_send_then_receive(tmp_path):
    named = mixed()
    shared = SharedMemoryChannel(str(tmp_path / "weights"), specs_of(named), owner=True)
    shared.send(named, version=3)
    out = list(shared.receive(3))
    assert [n for n, _ in out] == ["w", "h", "ids"]
    for (_, expected), (_, actual) in zip(named, out):
        assert torch.equal(actual, expected)


def test_shared_weights_wrong_version_names_both(tmp_path):
    named = mixed()
    shared = SharedMemoryChannel(str(tmp_path / "weights"), specs_of(named), owner=True)
    shared.send(named, version=3)
    with pytest.raises(WeightSyncError, match="holds version 3, expected version 4"):
        shared.receive(4)


def test_shared_weights_never_written_is_refused(tmp_path):
    shared = SharedMemoryChannel(str(tmp_path / "weights"), specs_of(mixed()))
    with pytest.raises(WeightSyncError, match="holds no weights of this model"):
        shared.receive(0)


def test_weights_being_written_are_refused(tmp_path):
    named = mixed()
    writer = SharedMemoryChannel(str(tmp_path / "weights"), specs_of(named), owner=True)
    writer.send(named, version=1)

    def interrupted():  # the learner dies, or is read from, in the middle of a write
        yield named[0]
        reader = SharedMemoryChannel(str(tmp_path / "weights"), specs_of(named))
        with pytest.raises(WeightSyncError, match="is being written, expected version 2"):
            reader.receive(2)
        raise RuntimeError("write stopped")

    with pytest.raises(RuntimeError, match="write stopped"):
        writer.send(interrupted(), version=2)


def test_weights_of_other_tensors_are_refused(tmp_path):
    named = mixed()
    SharedMemoryChannel(str(tmp_path / "weights"), specs_of(named), owner=True).send(named, version=1)
    other = specs_of(named)[:2]  # an engine of another model: fewer bytes expected
    with pytest.raises(WeightSyncError, match="holds no weights of this model"):
        SharedMemoryChannel(str(tmp_path / "weights"), other).receive(1)


def test_an_engine_reads_what_the_learner_wrote(tmp_path):
    path = str(tmp_path / "weights")
    named = mixed()
    writer = SharedMemoryChannel(path, specs_of(named), owner=True)
    writer.send(named, version=1)
    reader = SharedMemoryChannel(path, specs_of(named))  # as an engine in another process opens it
    assert torch.equal(dict(reader.receive(1))["ids"], named[2][1])
    updated = [(n, t + 1) for n, t in named]
    writer.send(updated, version=2)
    got = dict(reader.receive(2))
    assert torch.equal(got["w"], named[0][1] + 1)
    assert got["h"].tolist() == [1.5, -0.5, 3.0, 4.0]


def test_only_the_owner_removes_the_file(tmp_path):
    path = tmp_path / "weights"
    reader = SharedMemoryChannel(str(path), specs_of(mixed()))
    owner = SharedMemoryChannel(str(path), specs_of(mixed()), owner=True)
    reader.close()
    assert path.is_file()
    owner.close()
    assert not path.exists()


# ----- BroadcastChannel: real gloo between two processes -----


def _receiver(port: int, specs: list[TensorSpec], buckets: list[list[int]], results,
              secret: str = "s3cret", timeout_s: float = TIMEOUT_S, version: int = 7) -> None:
    try:
        group = BroadcastChannel("127.0.0.1", port, rank=1, world_size=2, specs=specs,
                                 buckets=buckets, device="cpu", timeout_s=timeout_s, secret=secret)
        got = {name: (str(t.dtype), t.tolist()) for name, t in group.receive(version)}
        group.close()
        results.put(got)
    except BaseException as e:  # reported to the parent instead of a silent exit
        results.put(f"{type(e).__name__}: {e}")


def _group_of_two(specs, buckets, version: int) -> tuple[BroadcastChannel, object, object]:
    """Rank 0 here, rank 1 in a spawned process expecting `version`: (channel, results, process)."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    sock = listen_socket("127.0.0.1")
    port = sock.getsockname()[1]
    child = ctx.Process(target=_receiver, args=(port, specs, buckets, results, "s3cret", TIMEOUT_S,
                                                version), daemon=True)
    child.start()
    group = BroadcastChannel("127.0.0.1", port, rank=0, world_size=2, specs=specs, buckets=buckets,
                             device="cpu", timeout_s=TIMEOUT_S, secret="s3cret", sock=sock)
    return group, results, child


def test_broadcast_send_receive_between_two_processes():
    """Rank 0 sends two buckets to rank 1; a third process that claims rank 1 without the
    group's secret is not admitted (it times out) and does not disturb the real group."""
    named = mixed()
    specs = specs_of(named)
    buckets = plan_buckets(specs, 32)
    assert buckets == [[0, 1], [2]]  # 24 + 8 bytes, then 24

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    sock = listen_socket("127.0.0.1")
    port = sock.getsockname()[1]
    stranger_results = ctx.Queue()
    stranger = ctx.Process(target=_receiver, args=(port, specs, buckets, stranger_results, "guess", 5.0),
                           daemon=True)
    stranger.start()
    child = ctx.Process(target=_receiver, args=(port, specs, buckets, results), daemon=True)
    child.start()
    try:
        group = BroadcastChannel("127.0.0.1", port, rank=0, world_size=2, specs=specs,
                                 buckets=buckets, device="cpu", timeout_s=TIMEOUT_S,
                                 secret="s3cret", sock=sock)
        group.send(named, version=7)
        got = results.get(timeout=TIMEOUT_S)
        refused = stranger_results.get(timeout=TIMEOUT_S)
        group.close()
    except queue.Empty:
        pytest.fail("a receiving process sent no result")
    finally:
        for proc in (child, stranger):
            proc.join(TIMEOUT_S)
            if proc.is_alive():
                proc.kill()
    assert isinstance(refused, str) and "timeout" in refused.lower()
    assert got == {
        "w": ("torch.float32", [[0.0, 0.25, 0.5], [0.75, 1.0, 1.25]]),
        "h": ("torch.bfloat16", [0.5, -1.5, 2.0, 3.0]),
        "ids": ("torch.int64", [7, -8, 2**40]),
    }
    assert child.exitcode == 0


def test_a_broadcast_of_another_version_is_refused_by_the_engine():
    named = mixed()
    specs = specs_of(named)
    group, results, child = _group_of_two(specs, plan_buckets(specs, 1 << 20), version=8)
    try:
        try:
            group.send(named, version=7)
        except RuntimeError:
            pass  # the engine stopped listening after the version: the rest times out or fails
        assert results.get(timeout=TIMEOUT_S) == (
            "WeightSyncError: the learner broadcast weights version 7, this engine expected version 8")
    finally:
        group.close()
        child.join(TIMEOUT_S)
        if child.is_alive():
            child.kill()


# ----- the GPU path's rendezvous and deadline, proven on the CPU -----


def _stateless_member(port: int, rank: int, secret: str, timeout_s: float, results) -> None:
    """A member of vLLM's StatelessProcessGroup over `rendezvous`, as the NCCL path builds it."""
    import time as clock

    from common.weight_sync import rendezvous, stateless_group

    start = clock.monotonic()
    try:
        group = stateless_group(rendezvous("127.0.0.1", port, rank, 2, timeout_s, secret), rank, 2,
                                timeout_s)
        results.put(("ok", group.broadcast_obj(None, src=0)))  # what NCCL's unique id travels by
    except BaseException as e:
        results.put((type(e).__name__, round(clock.monotonic() - start, 1)))


def test_the_gpu_rendezvous_admits_members_and_no_stranger():
    from common.weight_sync import rendezvous, stateless_group

    ctx = mp.get_context("spawn")
    member_results, stranger_results = ctx.Queue(), ctx.Queue()
    sock = listen_socket("127.0.0.1")
    port = sock.getsockname()[1]
    stranger = ctx.Process(target=_stateless_member, args=(port, 1, "guess", 2.0, stranger_results),
                           daemon=True)
    stranger.start()
    member = ctx.Process(target=_stateless_member, args=(port, 1, "s3cret", TIMEOUT_S, member_results),
                         daemon=True)
    member.start()
    try:
        group = stateless_group(rendezvous("127.0.0.1", port, 0, 2, TIMEOUT_S, "s3cret", sock), 0, 2,
                                TIMEOUT_S)
        group.broadcast_obj({"unique_id": 42}, src=0)
        assert member_results.get(timeout=TIMEOUT_S) == ("ok", {"unique_id": 42})
        failed, seconds = stranger_results.get(timeout=TIMEOUT_S)
    finally:
        for proc in (member, stranger):
            proc.join(TIMEOUT_S)
    assert failed != "ok" and seconds >= 1.5  # it waited its own 2 s, and never met the members


def test_a_sub_second_rendezvous_timeout_is_kept_not_rounded_to_zero():
    import time as clock

    from common.weight_sync import rendezvous

    sock = listen_socket("127.0.0.1")
    store = rendezvous("127.0.0.1", sock.getsockname()[1], 0, 2, 0.5, "s3cret", sock)
    start = clock.monotonic()
    with pytest.raises(Exception, match="(?i)timeout"):
        store.get("no such key")
    assert 0.3 < clock.monotonic() - start < 5


def test_a_wait_past_its_deadline_aborts_and_raises():
    import time as clock

    from common.weight_sync import wait_or_abort

    aborted = []
    start = clock.monotonic()
    with pytest.raises(WeightSyncError, match="waited 0 s for a member of its group"):
        wait_or_abort(lambda: False, lambda: aborted.append(True), 0.2)
    assert aborted == [True] and clock.monotonic() - start < 2
    polls = iter([False, False, True])
    wait_or_abort(lambda: next(polls), lambda: aborted.append(False), 5.0)
    assert aborted == [True]  # done in time: nothing aborted


def _member(port: int, rank: int, specs, buckets, fail_after: int | None, results) -> None:
    """Rank `rank` of a 3-member group; with `fail_after`, its transfer breaks after that many
    broadcasts, and it stays in the group 3 s more (a member whose process lives on: only what
    it says in the store can tell the others)."""
    import time as clock

    group = BroadcastChannel("127.0.0.1", port, rank, 3, specs, buckets, "cpu", 20.0, "s3cret")
    if fail_after is not None:
        done, broadcast = iter(range(100)), group._broadcast

        def failing(tensor):
            if next(done) == fail_after:
                results.put((rank, "failed at", clock.time()))
                raise RuntimeError("transfer failed")
            broadcast(tensor)

        group._broadcast = failing
    try:
        for _ in group.receive(1):
            pass
        results.put((rank, "ok", clock.time()))
    except BaseException as e:
        results.put((rank, type(e).__name__, clock.time()))
        if fail_after is not None:
            clock.sleep(3)
    finally:
        group.close()


def test_a_member_whose_transfer_fails_makes_every_other_fail_within_two_seconds():
    """On a GPU an aborted NCCL communicator tells no other member: each would wait out its
    own deadline (20 s here). The failing member says so in the group's store, and the others
    ask it while they wait; gloo shows the same path on the CPU."""
    # Big buckets (3 x 4 MB), so the learner cannot finish into socket buffers alone.
    named = [("a", torch.ones(1 << 20)), ("b", torch.ones(1 << 20)), ("c", torch.ones(1 << 20))]
    specs = specs_of(named)
    buckets = plan_buckets(specs, 4 << 20)
    assert len(buckets) == 3
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    sock = listen_socket("127.0.0.1")
    port = sock.getsockname()[1]
    procs = [ctx.Process(target=_member, args=(port, rank, specs, buckets, fail, results), daemon=True)
             for rank, fail in ((1, 2), (2, None))]
    for proc in procs:
        proc.start()
    import time as clock

    learner = BroadcastChannel("127.0.0.1", port, 0, 3, specs, buckets, "cpu", 20.0, "s3cret", sock)
    with pytest.raises(WeightSyncError, match="another member of the weight group failed"):
        learner.send(named, version=1)
    learner_end = clock.time()
    events = [results.get(timeout=60) for _ in range(3)]
    learner.close()
    for proc in procs:
        proc.join(60)
    failed_at = next(t for rank, what, t in events if what == "failed at")
    ends = {rank: (what, t - failed_at) for rank, what, t in events if what != "failed at"}
    assert ends[1][0] == "RuntimeError" and ends[2][0] == "WeightSyncError", ends
    assert learner_end - failed_at < 2 and ends[2][1] < 2, (learner_end - failed_at, ends)
