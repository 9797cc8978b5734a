"""The throttling model (objects/throttle.py) on a fake clock: no real time passes here."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from blockgraph.errors import BlockError
from blockgraph.graph.layer import BlockLayer
from blockgraph.objects import ObjectRegistry, add_object
from blockgraph.objects.throttle import (
    ThrottleGroup,
    ThrottleLimits,
    ThrottleMember,
    ThrottleState,
)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _state(**values: int) -> tuple[ThrottleState, Clock]:
    clock = Clock()
    return ThrottleState(ThrottleLimits({k.replace("_", "-"): v for k, v in values.items()}),
                         clock), clock


def _run(state: ThrottleState, clock: Clock, requests: int, nbytes: int = 512,
         is_write: bool = False) -> float:
    """Send ``requests`` back to back, each waiting as long as it must; the time taken."""
    start = clock.now
    for _ in range(requests):
        clock.now += state.wait_time(is_write)
        assert state.wait_time(is_write) == 0
        state.account(is_write, nbytes)
    return clock.now - start


def test_average_rate_after_a_tenth_of_a_second_of_slack() -> None:
    state, clock = _state(iops_total=10)
    # The bucket holds avg/10 = 1 request: two go at once, then one every 1/10 s.
    assert _run(state, clock, 2) == 0
    assert _run(state, clock, 10) == pytest.approx(1.0)


def test_burst_then_average() -> None:
    state, clock = _state(iops_total=10, iops_total_max=50, iops_total_max_length=2)
    # The burst bucket (max/10 = 5 requests) limits the start to max per second...
    assert _run(state, clock, 6) == 0
    assert _run(state, clock, 5) == pytest.approx(0.1)
    # ...until the main bucket (max * length = 100 requests) is full; then avg rules.
    _run(state, clock, 200)
    assert _run(state, clock, 10) == pytest.approx(1.0)


def test_bytes_buckets_and_directions() -> None:
    state, clock = _state(bps_write=4096)
    # Reads are not limited by a write limit.
    assert _run(state, clock, 100, 4096, is_write=False) == 0
    # The bucket may hold 409.6 bytes: the second 4 KiB write waits 0.9 s for the first to
    # drain to that, the third a whole second (4096 B/s from then on).
    assert _run(state, clock, 3, 4096, is_write=True) == pytest.approx(1.9)


def test_iops_size_counts_big_requests_as_several() -> None:
    state, clock = _state(iops_total=10, iops_size=4096)
    _run(state, clock, 2, 4096)
    assert _run(state, clock, 5, 4096) == pytest.approx(0.5)
    # Four operations each: after the first (which waits 0.1 s for the one before), each
    # waits (4 - 1) / 10 + 0.1 s.
    assert _run(state, clock, 5, 16384) == pytest.approx(0.1 + 4 * 0.4)


def test_idle_time_drains_the_bucket() -> None:
    state, clock = _state(bps_total=1000)
    _run(state, clock, 5, 1000)
    clock.now += 60
    assert state.wait_time(False) == 0


@pytest.mark.parametrize(("values", "message"), [
    ({"bps-total": 1, "bps-read": 1, "iops-size": 1},
     "bps/iops/max total values and read/write values cannot be used at the same time"),
    ({"bps-total": 10**15 + 1, "iops-size": 1}, "iops size requires an iops value to be set"),
    ({"bps-total": 10, "bps-total-max": 5, "iops-total": 10**15 + 1},
     "bps_max/iops_max cannot be lower than bps/iops"),  # bucket order decides
    ({"iops-total": 1, "iops-total-max-length": 2}, "burst length set without burst rate"),
    ({"iops-total-max": 5, "iops-total-max-length": 0}, "the burst length cannot be 0"),
    ({"iops-write-max": 5}, "bps_max/iops_max require corresponding bps/iops values"),
])
def test_check_order_and_texts(values: dict[str, int], message: str) -> None:
    with pytest.raises(BlockError, match=f"^{message}$"):
        ThrottleLimits(values).check()


def test_query_names_only_what_is_set() -> None:
    limits = ThrottleLimits({"iops-total": 10, "iops-total-max": 20, "bps-read": 5})
    assert limits.query() == {"bps": 0, "bps_rd": 5, "bps_wr": 0, "iops": 10, "iops_rd": 0,
                              "iops_wr": 0, "iops_max": 20, "iops_max_length": 1}


def test_throttle_group_object_in_use_cannot_be_deleted() -> None:
    registry = ObjectRegistry()
    add_object(registry, "throttle-group,id=tg,x-iops-total=10,limits.iops-total-max=20")
    member = registry.join_throttle_group("tg", None)
    assert member.group.limits.get("iops-total-max") == 20
    with pytest.raises(BlockError, match="^object 'tg' is in use, can not be deleted$"):
        registry.remove("tg")
    registry.leave_throttle_group(member)
    registry.remove("tg")
    assert "tg" not in registry.throttle_groups


def test_anonymous_group_goes_with_its_last_member() -> None:
    registry = ObjectRegistry()
    a = registry.join_throttle_group("g", ThrottleLimits({"iops-total": 1}))
    b = registry.join_throttle_group("g", ThrottleLimits({"iops-total": 2}))
    assert a.group is b.group and a.group.limits.get("iops-total") == 2  # the last one wins
    registry.leave_throttle_group(a)
    assert "g" in registry.throttle_groups
    registry.leave_throttle_group(b)
    assert "g" not in registry.throttle_groups


def test_a_burst_of_one_second_needs_no_burst_bucket() -> None:
    # max-length 1 (the default): the bucket simply holds max; no max/10 burst bucket.
    state, clock = _state(iops_total=10, iops_total_max=100)
    assert _run(state, clock, 60) == 0


def test_limits_are_unsigned_and_burst_length_is_bounded() -> None:
    with pytest.raises(BlockError, match="^burst length too high for this burst rate$"):
        ThrottleLimits({"bps-total": 10**14, "bps-total-max": 10**15,
                        "bps-total-max-length": 11}).check()
    # -1 is 2^64 - 1 in QEMU: a huge burst length, not a negative one.
    with pytest.raises(BlockError, match="^burst length set without burst rate$"):
        ThrottleLimits({"iops-total": 5, "iops-total-max-length": -1}).check()


# -- waiting requests (real event loop; the bounds only stop a hung test) --------------------


async def _queued(group: ThrottleGroup, member: ThrottleMember, n: int) -> list[asyncio.Task[None]]:
    tasks = [asyncio.ensure_future(group.intercept(member, False, 512)) for _ in range(n)]
    await asyncio.sleep(0)  # let them take their places: the first goes, the rest wait
    return tasks


def test_waiting_requests_go_when_their_member_leaves() -> None:
    async def scenario() -> None:
        group = ThrottleGroup("g", ThrottleLimits({"iops-total": 1}))  # 1 request/s
        member = group.join()
        tasks = await _queued(group, member, 30)
        assert sum(t.done() for t in tasks) == 1  # the bucket holds a tenth of a request
        group.leave(member)
        await asyncio.wait_for(asyncio.gather(*tasks), 10)

    asyncio.run(scenario())


def test_new_limits_wake_waiting_requests() -> None:
    async def scenario() -> None:
        group = ThrottleGroup("g", ThrottleLimits({"iops-total": 1}))
        member = group.join()
        tasks = await _queued(group, member, 30)
        group.configure(ThrottleLimits({}))  # no limits: everything goes
        await asyncio.wait_for(asyncio.gather(*tasks), 10)

    asyncio.run(scenario())


def test_deleting_a_drive_lets_its_throttled_requests_finish(tmp_path: Path) -> None:
    image = tmp_path / "disk.raw"
    image.write_bytes(b"\x5a" * 65536)
    layer = BlockLayer()
    try:
        bb = layer.new_backend("d0")
        layer.run(layer.open_node(str(image), {"driver": "raw"}, backend=bb))
        bb.set_io_limits(ThrottleLimits({"iops-total": 1}))

        async def scenario() -> list[bytes]:
            bufs = [bytearray(512) for _ in range(20)]
            tasks = [asyncio.ensure_future(bb.preadv(i * 512, memoryview(b)))
                     for i, b in enumerate(bufs)]
            await asyncio.sleep(0)
            await asyncio.wait_for(layer.remove_backend(bb), 10)
            assert all(t.done() for t in tasks) and bb.in_flight == 0
            await asyncio.gather(*tasks)  # every read succeeded, before the node closed
            return [bytes(b) for b in bufs]

        assert layer.run(scenario()) == [b"\x5a" * 512] * 20
        assert "d0" not in layer.objects.throttle_groups
    finally:
        layer.close()
