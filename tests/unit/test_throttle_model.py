"""The throttling model (objects/throttle.py) on a fake clock: no real time passes here."""

from __future__ import annotations

import pytest

from blockgraph.errors import BlockError
from blockgraph.objects import ObjectRegistry, add_object
from blockgraph.objects.throttle import ThrottleLimits, ThrottleState


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
    group = registry.join_throttle_group("tg", None)
    assert group.limits.get("iops-total-max") == 20
    with pytest.raises(BlockError, match="^object 'tg' is in use, can not be deleted$"):
        registry.remove("tg")
    registry.leave_throttle_group(group)
    registry.remove("tg")
    assert "tg" not in registry.throttle_groups


def test_anonymous_group_goes_with_its_last_member() -> None:
    registry = ObjectRegistry()
    a = registry.join_throttle_group("g", ThrottleLimits({"iops-total": 1}))
    b = registry.join_throttle_group("g", ThrottleLimits({"iops-total": 2}))
    assert a is b and a.limits.get("iops-total") == 2  # the last configuration wins
    registry.leave_throttle_group(a)
    assert "g" in registry.throttle_groups
    registry.leave_throttle_group(b)
    assert "g" not in registry.throttle_groups
