"""Worker threads for blocking file I/O (QEMU's ``aio=threads`` thread pool).

A big ``preadv``/``pwritev`` (or an ``fdatasync``) blocks the thread that calls it for as long
as the kernel copies or the disk syncs, and the event loop stalls meanwhile. Python releases
the GIL during these system calls, so a worker thread lets the kernel do that work while the
event loop parses the next requests and sends replies.

A hand-off is not free (queueing, a wake-up of the worker, and one of the event loop through
its self-pipe: tens of microseconds of Python), so callers offload only requests big enough to
pay for it (see :mod:`blockgraph.drivers.file`).

The pool is process-wide (threads are a process resource, like the file descriptors they work
on), created on first use, after any fork: a fork copies the pool's state but not its
threads, so a child forgets the pool it inherited and makes its own. The workers are daemon
threads: an exiting process never waits for an idle worker, and no operation is left behind
at exit, because :func:`run` does not return before its operation finished, even when the
awaiting task is cancelled.
"""

from __future__ import annotations

import asyncio
import os
import queue
import threading
from collections.abc import Callable
from typing import Any, Generic, TypeVar

T = TypeVar("T")

# Two cores on the reference machine; QEMU starts up to 64 workers, but beyond a few the
# threads only compete for the GIL and the cores with the event loop.
MAX_WORKERS = 4


class _Job(Generic[T]):
    """One operation: what to run, and where its outcome goes."""

    __slots__ = ("loop", "future", "call", "args", "result", "error", "finished", "waiter")

    def __init__(self, loop: asyncio.AbstractEventLoop, call: Callable[..., T],
                 args: tuple[Any, ...]) -> None:
        self.loop = loop
        self.future: asyncio.Future[T] = loop.create_future()
        self.call = call
        self.args = args
        self.result: T | None = None
        self.error: BaseException | None = None
        self.finished = False
        # Made only when the awaiting task was cancelled and waits for the end anyway.
        self.waiter: asyncio.Future[None] | None = None

    def complete(self) -> None:
        # Runs in the event loop's thread.
        self.finished = True
        future = self.future
        if not future.done():
            if self.error is not None:
                future.set_exception(self.error)
            else:
                future.set_result(self.result)  # type: ignore[arg-type]
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        self.error = None  # no reference cycle through the traceback


class _Pool:
    def __init__(self, size: int) -> None:
        self.size = size
        self.jobs: queue.SimpleQueue[_Job[Any]] = queue.SimpleQueue()
        self.threads: list[threading.Thread] = []
        self.idle = 0
        self.lock = threading.Lock()

    def submit(self, job: _Job[Any]) -> None:
        # As concurrent.futures does: a new thread only when no worker waits (the count may
        # run high for a moment, which only delays a thread start, never a job).
        with self.lock:
            if self.idle:
                self.idle -= 1
                start = False
            else:
                start = len(self.threads) < self.size
        if start:
            thread = threading.Thread(target=self._work, name=f"blockgraph-io-{len(self.threads)}",
                                      daemon=True)
            self.threads.append(thread)
            thread.start()
        self.jobs.put(job)

    def _work(self) -> None:
        jobs = self.jobs
        while True:
            job = jobs.get()
            try:
                job.result = job.call(*job.args)
            except BaseException as exc:  # delivered to the awaiting task
                job.error = exc
            try:
                job.loop.call_soon_threadsafe(job.complete)
            except RuntimeError:
                pass  # the loop is closed: nobody waits any more
            with self.lock:
                self.idle += 1


_pool: _Pool | None = None


def _forget_pool() -> None:
    global _pool
    _pool = None


os.register_at_fork(after_in_child=_forget_pool)


def _get_pool() -> _Pool:
    global _pool
    pool = _pool
    if pool is None:
        pool = _pool = _Pool(MAX_WORKERS)
    return pool


async def run(call: Callable[..., T], *args: Any) -> T:
    """Run ``call(*args)`` in a worker thread; return its result or raise its exception.

    ``call`` must not touch event-loop state. Cancelling the awaiting task does not abandon
    the operation: the task waits for it to finish (then raises ``CancelledError``), so that
    no caller goes on while an operation it started is still running, as with inline I/O.
    """
    job: _Job[T] = _Job(asyncio.get_running_loop(), call, args)
    _get_pool().submit(job)
    try:
        return await job.future
    except asyncio.CancelledError:
        while not job.finished:
            job.waiter = job.loop.create_future()
            try:
                await job.waiter
            except asyncio.CancelledError:
                continue
        raise
