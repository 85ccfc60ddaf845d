"""Weight transport: specs, buckets, flat byte layout, the shared-memory file, and a real gloo
broadcast between two processes (no vLLM engine, no Ray)."""

from __future__ import annotations

import multiprocessing as mp
import queue

import pytest
import torch

from common.weight_sync import (
    BroadcastGroup,
    SharedWeights,
    TensorSpec,
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


# ----- SharedWeights -----


def test_shared_weights_write_then_read(tmp_path):
    named = mixed()
    shared = SharedWeights(str(tmp_path / "weights"), specs_of(named))
    shared.write(named, version=3)
    out = list(shared.read(3))
    assert [n for n, _ in out] == ["w", "h", "ids"]
    for (_, expected), (_, actual) in zip(named, out):
        assert torch.equal(actual, expected)


def test_shared_weights_wrong_version_names_both(tmp_path):
    named = mixed()
    shared = SharedWeights(str(tmp_path / "weights"), specs_of(named))
    shared.write(named, version=3)
    with pytest.raises(RuntimeError, match="holds version 3, expected version 4"):
        shared.read(4)


def test_shared_weights_never_written_is_refused(tmp_path):
    shared = SharedWeights(str(tmp_path / "weights"), specs_of(mixed()))
    with pytest.raises(RuntimeError, match="holds no weights of this model"):
        shared.read(0)


def test_shared_weights_second_object_reads_what_the_first_wrote(tmp_path):
    path = str(tmp_path / "weights")
    named = mixed()
    writer = SharedWeights(path, specs_of(named))
    writer.write(named, version=1)
    reader = SharedWeights(path, specs_of(named))  # as an engine in another process opens it
    assert torch.equal(dict(reader.read(1))["ids"], named[2][1])
    updated = [(n, t + 1) for n, t in named]
    writer.write(updated, version=2)
    got = dict(reader.read(2))
    assert torch.equal(got["w"], named[0][1] + 1)
    assert got["h"].tolist() == [1.5, -0.5, 3.0, 4.0]


def test_shared_weights_unlink_removes_the_file(tmp_path):
    path = tmp_path / "weights"
    shared = SharedWeights(str(path), specs_of(mixed()))
    assert path.is_file()
    shared.unlink()
    assert not path.exists()
    shared.unlink()  # a second unlink is harmless


# ----- BroadcastGroup: real gloo between two processes -----


def _receiver(port: int, specs: list[tuple], buckets: list[list[int]], results,
              secret: str = "s3cret", timeout_s: float = TIMEOUT_S) -> None:
    try:
        group = BroadcastGroup("127.0.0.1", port, rank=1, world_size=2, device="cpu",
                               timeout_s=timeout_s, secret=secret)
        typed = [TensorSpec(n, d, tuple(s)) for n, d, s in specs]
        got = {name: (str(t.dtype), t.tolist()) for name, t in group.receive(typed, buckets)}
        group.close()
        results.put(got)
    except BaseException as e:  # reported to the parent instead of a silent exit
        results.put(f"{type(e).__name__}: {e}")


def test_broadcast_send_receive_between_two_processes():
    """Rank 0 sends two buckets to rank 1; a third process that claims rank 1 without the
    group's secret is not admitted (it times out) and does not disturb the real group."""
    named = mixed()
    specs = [(s.name, s.dtype, s.shape) for s in specs_of(named)]
    buckets = plan_buckets(specs_of(named), 32)
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
        group = BroadcastGroup("127.0.0.1", port, rank=0, world_size=2, device="cpu",
                               timeout_s=TIMEOUT_S, secret="s3cret", sock=sock)
        group.send(named, buckets)
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
