"""I/O throttling: limits, their leaky buckets, and the groups that share them.

One mechanism serves every place QEMU throttles: ``-drive throttling.*`` (a BlockBackend),
the ``throttle`` filter driver over a ``throttle-group`` object, and ``qemu-img convert -r``.
The model is the one QEMU documents (docs/throttle.txt):

* six buckets, ``bps-total``/``-read``/``-write`` counting bytes and ``iops-*`` counting
  requests (with ``iops-size``, a request of N bytes counts N/iops-size when that is more
  than one); a read fills the total and read buckets, a write the total and write buckets;
* a bucket leaks at its average rate ``avg``. Without a burst rate it holds a tenth of a
  second's worth (``avg/10``); with one (``max``) it holds ``max * max-length``, and when
  ``max-length`` is above one second a second, burst, bucket leaking at ``max`` holds
  ``max/10``. A request waits while any of its buckets is fuller than it may be, for as long
  as that takes to drain; then it is counted;
* requests of one direction go in order (FIFO); reads and writes do not wait for each other.

A group's members (BlockBackends, throttle nodes) share its buckets; new limits replace the
old ones for all of them, as with QEMU's throttle groups, and wake the waiting requests to
look again. A member that leaves its group (limits switched off, a BlockBackend deleted, a
throttle node closed) lets its waiting requests go at once, as QEMU's drain does. Values are
unsigned 64-bit in QEMU: a negative one given through QMP or a command line counts as the
huge number it becomes there.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from blockgraph.errors import BlockError
from blockgraph.options.schema import parse_int

# Bucket names in QEMU's order, which is also the order its checks report in.
BUCKETS = ("bps-total", "bps-read", "bps-write", "iops-total", "iops-read", "iops-write")
# query-block's and block_set_io_throttle's names for them.
QUERY_NAMES = {"bps-total": "bps", "bps-read": "bps_rd", "bps-write": "bps_wr",
               "iops-total": "iops", "iops-read": "iops_rd", "iops-write": "iops_wr"}
# Those names for every limit (BlockIOThrottle's members), in QEMU's schema order: the six
# averages, their bursts, the bursts' lengths, the iops size.
QMP_MEMBERS: dict[str, str] = {
    **{QUERY_NAMES[b]: b for b in BUCKETS},
    **{QUERY_NAMES[b] + "_max": b + "-max" for b in BUCKETS},
    **{QUERY_NAMES[b] + "_max_length": b + "-max-length" for b in BUCKETS},
    "iops_size": "iops-size",
}
# Every member of QEMU's ThrottleLimits (``limits.X`` and the ``x-X`` properties).
LIMIT_KEYS = (*(f"{b}{s}" for b in BUCKETS for s in ("", "-max", "-max-length")), "iops-size")

_MAX_VALUE = 1_000_000_000_000_000
# The largest burst length a throttle-group property takes (QEMU checks it there only).
MAX_LENGTH = 4294967295
_UINT64 = (1 << 64) - 1


@dataclass
class ThrottleLimits:
    """The limits of a throttle group, by QEMU's member names; 0 is no limit."""

    values: dict[str, int] = field(default_factory=dict)

    def get(self, key: str) -> int:
        """The value of ``key`` as QEMU holds it: unsigned 64-bit (-1 is 2^64 - 1)."""
        default = 1 if key.endswith("-max-length") else 0
        return self.values.get(key, default) & _UINT64

    @property
    def enabled(self) -> bool:
        return any(self.get(b) or self.get(b + "-max") for b in BUCKETS)

    def check(self) -> None:
        """QEMU's validation of a configuration, in its order and words.

        :raise BlockError: the first problem found.
        """
        for kind in ("bps", "iops"):
            for suffix in ("", "-max"):
                total = self.get(f"{kind}-total{suffix}")
                if total and (self.get(f"{kind}-read{suffix}")
                              or self.get(f"{kind}-write{suffix}")):
                    raise BlockError("bps/iops/max total values and read/write values cannot "
                                     "be used at the same time")
        if self.get("iops-size") and not any(self.get(f"iops-{d}") for d in ("total", "read",
                                                                             "write")):
            raise BlockError("iops size requires an iops value to be set")
        for bucket in BUCKETS:
            avg, peak, length = self.get(bucket), self.get(bucket + "-max"), self.get(
                bucket + "-max-length")
            if not 0 <= avg <= _MAX_VALUE or not 0 <= peak <= _MAX_VALUE:
                raise BlockError(f"bps/iops/max values must be within [0, {_MAX_VALUE}]")
            if length == 0:
                raise BlockError("the burst length cannot be 0")
            if length > 1 and not peak:
                raise BlockError("burst length set without burst rate")
            if peak and length > _MAX_VALUE // peak:
                raise BlockError("burst length too high for this burst rate")
            if peak and not avg:
                raise BlockError("bps_max/iops_max require corresponding bps/iops values")
            if peak and peak < avg:
                raise BlockError("bps_max/iops_max cannot be lower than bps/iops")

    def query(self) -> dict[str, int]:
        """query-block's members: the six averages always; bursts, their lengths and the
        iops size only when set (QEMU leaves the others out)."""
        out = {}
        for name, key in QMP_MEMBERS.items():
            if key in BUCKETS:
                shown = True
            elif key == "iops-size":
                shown = bool(self.get(key))
            else:  # a burst or its length: shown with the burst
                shown = bool(self.get(key.partition("-max")[0] + "-max"))
            if shown:
                out[name] = self.get(key)
        return out


def parse_limit(name: str, value: object) -> int:
    """A limit's value from an option: a keyval string, or an integer from JSON.

    :raise BlockError: QEMU's ``Parameter 'NAME' expects integer``.
    """
    if isinstance(value, bool):
        raise BlockError(f"Invalid parameter type for '{name}', expected: integer")
    if isinstance(value, int):
        return value
    return parse_int(name, str(value))


@dataclass
class _Bucket:
    avg: float
    peak: float
    length: float
    level: float = 0.0
    burst_level: float = 0.0

    @property
    def bursts(self) -> bool:
        # The burst bucket exists only for bursts longer than a second.
        return bool(self.peak) and self.length > 1

    def leak(self, elapsed: float) -> None:
        self.level = max(0.0, self.level - elapsed * self.avg)
        if self.bursts:
            self.burst_level = max(0.0, self.burst_level - elapsed * self.peak)

    def wait(self) -> float:
        """Seconds until this bucket lets a request through (0: now)."""
        if not self.avg:
            return 0.0
        size = self.peak * self.length if self.peak else self.avg / 10
        wait = (self.level - size) / self.avg
        if self.bursts:
            wait = max(wait, (self.burst_level - self.peak / 10) / self.peak)
        # Below a nanosecond is rounding left over from the leak: no wait.
        return wait if wait > 1e-9 else 0.0

    def add(self, units: float) -> None:
        if self.avg:
            self.level += units
            if self.bursts:
                self.burst_level += units


class ThrottleState:
    """The buckets of one configuration, on an injectable clock (seconds, monotonic)."""

    def __init__(self, limits: ThrottleLimits,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.configure(limits)

    def configure(self, limits: ThrottleLimits) -> None:
        """New limits: the buckets start empty, as QEMU's do after a change."""
        self.limits = limits
        self._buckets = {b: _Bucket(float(limits.get(b)), float(limits.get(b + "-max")),
                                    float(limits.get(b + "-max-length"))) for b in BUCKETS}
        self._stamp = self.clock()
        self._iops_size = limits.get("iops-size")

    def _leak(self) -> None:
        now = self.clock()
        elapsed, self._stamp = now - self._stamp, now
        for bucket in self._buckets.values():
            bucket.leak(elapsed)

    def _involved(self, is_write: bool) -> tuple[_Bucket, ...]:
        way = "write" if is_write else "read"
        b = self._buckets
        return (b["bps-total"], b[f"bps-{way}"], b["iops-total"], b[f"iops-{way}"])

    def wait_time(self, is_write: bool) -> float:
        """Seconds a request in this direction must wait before it may go (0: now)."""
        self._leak()
        return max(bucket.wait() for bucket in self._involved(is_write))

    def account(self, is_write: bool, nbytes: int) -> None:
        """Count a request that goes now."""
        ops = 1.0
        if self._iops_size and nbytes > self._iops_size:
            ops = nbytes / self._iops_size
        bps_total, bps_way, iops_total, iops_way = self._involved(is_write)
        bps_total.add(nbytes)
        bps_way.add(nbytes)
        iops_total.add(ops)
        iops_way.add(ops)


def _resolve(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


class ThrottleMember:
    """One member's place in a group: while ``active`` its requests wait for the limits."""

    def __init__(self, group: ThrottleGroup) -> None:
        self.group = group
        self.active = True


class ThrottleGroup:
    """Limits shared by every member (BlockBackend or throttle node) of one group.

    :param name: the group's name (``throttling.group``, the drive's id, or the object's id).
    """

    def __init__(self, name: str, limits: ThrottleLimits | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.name = name
        self.state = ThrottleState(limits or ThrottleLimits(), clock)
        self.members = 0
        # One queue per direction: asyncio.Lock wakes its waiters in FIFO order.
        self._queues = (asyncio.Lock(), asyncio.Lock())
        # Futures of the requests waiting for their time; resolved early whenever they must
        # look again (new limits, a member that left).
        self._waiters: set[asyncio.Future[None]] = set()

    @property
    def limits(self) -> ThrottleLimits:
        return self.state.limits

    def configure(self, limits: ThrottleLimits) -> None:
        self.state.configure(limits)
        self._wake()

    def join(self) -> ThrottleMember:
        self.members += 1
        return ThrottleMember(self)

    def leave(self, member: ThrottleMember) -> None:
        """``member`` is gone: its waiting requests go now, unthrottled."""
        if member.active:
            member.active = False
            self.members -= 1
            self._wake()

    def _wake(self) -> None:
        for waiter in self._waiters:
            _resolve(waiter)
        self._waiters.clear()

    async def intercept(self, member: ThrottleMember, is_write: bool, nbytes: int) -> None:
        """Wait until a request of ``nbytes`` may go, then count it."""
        if not self.state.limits.enabled or not member.active:
            return
        async with self._queues[is_write]:
            while member.active and self.state.limits.enabled:
                delay = self.state.wait_time(is_write)
                if delay <= 0:
                    self.state.account(is_write, nbytes)
                    return
                # A future and a timer, not asyncio.wait_for: on Python 3.12 that ties itself
                # to the current task, which during an NBD request's eager first step is the
                # connection's (see the NBD server's _start).
                waiter = asyncio.get_running_loop().create_future()
                self._waiters.add(waiter)
                timer = asyncio.get_running_loop().call_later(delay, _resolve, waiter)
                try:
                    await waiter
                finally:
                    timer.cancel()
                    self._waiters.discard(waiter)


__all__ = ["BUCKETS", "LIMIT_KEYS", "MAX_LENGTH", "QMP_MEMBERS", "QUERY_NAMES", "ThrottleGroup",
           "ThrottleLimits", "ThrottleMember", "ThrottleState", "parse_limit"]
