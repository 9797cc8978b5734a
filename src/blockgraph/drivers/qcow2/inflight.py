"""The qcow2 metadata lock and the writes whose data is in flight outside it.

QEMU's ``s->lock`` protects metadata, but an allocating write drops it while its data (and
COW) is written, and records the allocation (``QCowL2Meta``) so that a request touching the
same clusters waits for it (QEMU's "dependencies"). This module is that, for asyncio.

Rules of this module:

* ``async with lock`` is the exclusive metadata lock *and* a barrier: it also waits until no
  write has data in flight outside the lock (an allocation between its prepare and link steps,
  or an in-place write). Everything that may free, share or move clusters (discard, zero
  writes, snapshots, resize, check, close, amend, ...) takes it that way, so a cluster is never
  freed, reused or shared while a write still targets it.
* Writes take the mutex without the barrier (:meth:`MetadataLock.start_write`), and
  :meth:`MetadataLock.relock` takes it again for a write's link step, for reads of the mapping
  and for flushes: those never wait for data in flight, so they cannot deadlock with it.
* While a barrier waits, new writes wait for it (:meth:`start_write`) and lock-free in-place
  writes take the locked path (:meth:`busy`), so a stream of writes cannot starve it.
* An allocation registers an :class:`InflightWrite` for its guest clusters before it drops the
  mutex; a write overlapping it waits until it is linked (:meth:`dependency`). A second write to
  a cluster being allocated therefore sees the cluster allocated and never allocates it twice.
"""

from __future__ import annotations

import asyncio


class InflightWrite:
    """Guest clusters ``[first, end)`` (cluster indices) whose write is in flight."""

    __slots__ = ("first", "end", "done")

    def __init__(self, first: int, end: int) -> None:
        self.first = first
        self.end = end
        self.done: asyncio.Event | None = None  # made only when someone waits

    async def wait(self) -> None:
        if self.done is None:
            self.done = asyncio.Event()
        await self.done.wait()


class MetadataLock:
    """The metadata mutex plus the writes in flight outside it (see the module rules)."""

    __slots__ = ("_mutex", "writes", "inplace", "_barriers", "_idle", "_no_barrier")

    def __init__(self) -> None:
        self._mutex = asyncio.Lock()
        self.writes: list[InflightWrite] = []
        # In-place data writes in flight outside the mutex, without an InflightWrite.
        self.inplace = 0
        self._barriers = 0  # ``async with`` callers waiting for the in-flight writes
        self._idle: asyncio.Event | None = None
        self._no_barrier: asyncio.Event | None = None

    # -- the barrier (exclusive) acquisition ------------------------------------------------

    async def __aenter__(self) -> None:
        await self._mutex.acquire()
        if not self.writes and not self.inplace:
            return
        self._barriers += 1
        try:
            while self.writes or self.inplace:
                self._mutex.release()
                if self._idle is None:
                    self._idle = asyncio.Event()
                await self._idle.wait()
                await self._mutex.acquire()
        finally:
            self._barriers -= 1
            if not self._barriers and self._no_barrier is not None:
                self._no_barrier.set()
                self._no_barrier = None

    async def __aexit__(self, *exc: object) -> None:
        self._mutex.release()

    # -- writes and readers -----------------------------------------------------------------

    def locked(self) -> bool:
        """Whether the mutex is held or a barrier waits: lock-free fast paths stand back."""
        return self._barriers > 0 or self._mutex.locked()

    async def start_write(self) -> None:
        """Take the mutex for a new write: after any barrier that is waiting."""
        await self._mutex.acquire()
        while self._barriers:
            self._mutex.release()
            if self._no_barrier is None:
                self._no_barrier = asyncio.Event()
            await self._no_barrier.wait()
            await self._mutex.acquire()

    async def relock(self) -> None:
        """Take the mutex only (a write's link step, mapping lookups, flushes)."""
        await self._mutex.acquire()

    def release(self) -> None:
        self._mutex.release()

    def dependency(self, first: int, end: int) -> InflightWrite | None:
        """The in-flight write overlapping guest clusters ``[first, end)``, if any."""
        for w in self.writes:
            if w.first < end and first < w.end:
                return w
        return None

    def register(self, first: int, end: int) -> InflightWrite:
        w = InflightWrite(first, end)
        self.writes.append(w)
        return w

    def finish(self, w: InflightWrite) -> None:
        self.writes.remove(w)
        if w.done is not None:
            w.done.set()
        self._check_idle()

    def end_inplace(self) -> None:
        self.inplace -= 1
        if not self.inplace:
            self._check_idle()

    def _check_idle(self) -> None:
        if self._idle is not None and not self.writes and not self.inplace:
            self._idle.set()
            self._idle = None
