"""QEMU 7.2's job core: the job state machine as data, the verbs, and the job registry.

Rules (QEMU 7.2's ``job.c``, observed on qemu-storage-daemon):

* every status change goes through :meth:`Job._transition`, checked against
  :data:`TRANSITIONS`; a change to the same status is silent, any other emits
  ``JOB_STATUS_CHANGE`` {``id``, ``status``};
* a user command (a *verb*) is accepted only in the statuses :data:`VERBS` lists for it,
  otherwise :class:`StateError` (``Job 'x' in state 'y' cannot accept command verb 'z'``);
* a job's life: ``created`` → ``running`` → (its work) → ``waiting`` → ``pending`` →
  (finalize: automatic unless ``auto-finalize=false``) → ``concluded`` → (dismiss: automatic
  unless ``auto-dismiss=false``) → ``null``. A failure or a cancel goes ``aborting`` →
  ``concluded`` instead, keeping the error text for ``query-jobs``;
* pausing takes effect at the job's next pause point (``running`` → ``paused``, ``ready`` →
  ``standby``); cancelling a paused job resumes it first.

Everything that changes a job's status lives in this module.
"""

from __future__ import annotations

import asyncio
import enum
import errno
import logging
import os
import re
from collections.abc import Callable, Iterator
from typing import ClassVar

from blockgraph.errors import BlockError, IOFailure

__all__ = ["JobStatus", "JobVerb", "TRANSITIONS", "VERBS", "StateError", "Job", "JobManager",
           "EventSink"]

log = logging.getLogger(__name__)

EventSink = Callable[[str, dict[str, object]], None]


class JobStatus(enum.Enum):
    """QAPI ``JobStatus``."""

    UNDEFINED = "undefined"
    CREATED = "created"
    RUNNING = "running"
    PAUSED = "paused"
    READY = "ready"
    STANDBY = "standby"
    WAITING = "waiting"
    PENDING = "pending"
    ABORTING = "aborting"
    CONCLUDED = "concluded"
    NULL = "null"


class JobVerb(enum.Enum):
    """QAPI ``JobVerb`` of 7.2 (no ``change`` yet)."""

    CANCEL = "cancel"
    PAUSE = "pause"
    RESUME = "resume"
    SET_SPEED = "set-speed"
    COMPLETE = "complete"
    FINALIZE = "finalize"
    DISMISS = "dismiss"


S = JobStatus

# JobSTT: from → the statuses it may change to.
TRANSITIONS: dict[JobStatus, frozenset[JobStatus]] = {
    S.UNDEFINED: frozenset({S.CREATED}),
    S.CREATED: frozenset({S.RUNNING, S.ABORTING, S.NULL}),
    S.RUNNING: frozenset({S.PAUSED, S.READY, S.WAITING, S.ABORTING}),
    S.PAUSED: frozenset({S.RUNNING}),
    S.READY: frozenset({S.STANDBY, S.WAITING, S.ABORTING}),
    S.STANDBY: frozenset({S.READY}),
    S.WAITING: frozenset({S.PENDING, S.ABORTING}),
    S.PENDING: frozenset({S.ABORTING, S.CONCLUDED}),
    S.ABORTING: frozenset({S.ABORTING, S.CONCLUDED}),
    S.CONCLUDED: frozenset({S.NULL}),
    S.NULL: frozenset(),
}

_ACTIVE = frozenset({S.CREATED, S.RUNNING, S.PAUSED, S.READY, S.STANDBY})

# JobVerbTable: verb → the statuses that accept it.
VERBS: dict[JobVerb, frozenset[JobStatus]] = {
    JobVerb.CANCEL: _ACTIVE | {S.WAITING, S.PENDING},
    JobVerb.PAUSE: _ACTIVE,
    JobVerb.RESUME: _ACTIVE,
    JobVerb.SET_SPEED: _ACTIVE,
    JobVerb.COMPLETE: frozenset({S.READY, S.STANDBY}),
    JobVerb.FINALIZE: frozenset({S.PENDING}),
    JobVerb.DISMISS: frozenset({S.CONCLUDED}),
}

_JOB_ID_RE = re.compile(r"[A-Za-z][A-Za-z0-9_.\-]*\Z")


class StateError(BlockError):
    """A verb was given to a job in a status that does not accept it.

    :param state: the job's status.
    :param required: the statuses the verb needs.
    :param job_id: the job's id (for QEMU's message).
    :param verb: the refused verb.
    """

    def __init__(self, state: JobStatus, required: frozenset[JobStatus], job_id: str = "",
                 verb: JobVerb = JobVerb.CANCEL) -> None:
        super().__init__(f"Job '{job_id}' in state '{state.value}' cannot accept command verb "
                         f"'{verb.value}'")
        self.state = state
        self.required = required
        self.verb = verb


class IllegalTransition(AssertionError):
    """A job tried a status change :data:`TRANSITIONS` forbids: a bug in a job, never input."""


class Job:
    """One job. Subclasses implement :meth:`run` (and :meth:`complete` for jobs that get ready).

    :param manager: the registry the job lives in.
    :param job_id: its id (unique among the manager's jobs).
    :param auto_finalize: finalize on its own once pending.
    :param auto_dismiss: disappear on its own once concluded.
    """

    job_type: ClassVar[str] = "create"

    def __init__(self, manager: JobManager, job_id: str, *, auto_finalize: bool = True,
                 auto_dismiss: bool = True) -> None:
        self.manager = manager
        self.id = job_id
        self.auto_finalize = auto_finalize
        self.auto_dismiss = auto_dismiss
        self.status = S.UNDEFINED
        self.current_progress = 0
        self.total_progress = 0
        self.speed = 0
        self.error: str | None = None
        self.cancelled = False
        self.user_paused = False
        self._pause_requested = False
        self._resumed = asyncio.Event()
        self._resumed.set()
        self._task: asyncio.Task[None] | None = None
        self.log = log.getChild(job_id)

    def __repr__(self) -> str:
        return f"<Job {self.id} ({self.job_type}) {self.status.value}>"

    # -- the table --------------------------------------------------------------------------

    def _transition(self, status: JobStatus) -> None:
        if status not in TRANSITIONS[self.status]:
            raise IllegalTransition(f"job {self.id}: {self.status.value} -> {status.value}")
        changed = status is not self.status
        self.status = status
        if changed:
            self.manager.emit("JOB_STATUS_CHANGE", {"id": self.id, "status": status.value})

    def _check_verb(self, verb: JobVerb) -> None:
        required = VERBS[verb]
        if self.status not in required:
            raise StateError(self.status, required, self.id, verb)

    # -- what a job implements --------------------------------------------------------------

    def prepare(self) -> None:
        """Checks that run before the command returns; raising fails the job at once."""

    async def run(self) -> None:
        """The job's work. Raise :class:`BlockError` / :class:`IOFailure` to fail."""

    def complete(self) -> None:
        """``job-complete`` on a ready job; jobs that never get ready refuse it."""
        raise BlockError(f"The active block job '{self.id}' cannot be completed")

    def commit(self) -> None:
        """Finalize after success (graph changes of the job)."""

    def abort(self) -> None:
        """Finalize after failure or cancel."""

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> None:
        """``created`` → ``running``; run :meth:`prepare` now and :meth:`run` as a task."""
        self._transition(S.CREATED)
        self._transition(S.RUNNING)
        try:
            self.prepare()
        except (BlockError, IOFailure) as exc:
            self._fail(str(exc))
            return
        self._task = asyncio.get_running_loop().create_task(self._main())

    async def _main(self) -> None:
        try:
            await self.pause_point()
            await self.run()
        except asyncio.CancelledError:
            if not self.cancelled:
                raise
            self._abort_to_concluded()
            return
        except (BlockError, IOFailure, OSError) as exc:
            self._fail(str(exc))
            return
        if self.cancelled:
            self._abort_to_concluded()
            return
        self._transition(S.WAITING)
        self._transition(S.PENDING)
        if self.auto_finalize:
            self._finalize()

    def _fail(self, message: str) -> None:
        self.error = message
        self._abort_to_concluded()

    def _abort_to_concluded(self) -> None:
        if self.error is None and self.cancelled:
            self.error = os.strerror(errno.ECANCELED)
        self._transition(S.ABORTING)
        self.abort()
        self._conclude()

    def _finalize(self) -> None:
        try:
            self.commit()
        except (BlockError, IOFailure) as exc:
            self._fail(str(exc))
            return
        self._conclude()

    def _conclude(self) -> None:
        self._transition(S.CONCLUDED)
        if self.auto_dismiss:
            self._dismiss()

    def _dismiss(self) -> None:
        self._transition(S.NULL)
        self.manager.remove(self)

    async def pause_point(self) -> None:
        """Where a running job honours a pause request (QEMU's ``job_pause_point``)."""
        if not self._pause_requested:
            return
        ready = self.status is S.READY
        self._transition(S.STANDBY if ready else S.PAUSED)
        try:
            await self._resumed.wait()
        finally:
            # Also on cancel: QEMU goes paused → running → aborting.
            self._transition(S.READY if ready else S.RUNNING)

    def set_ready(self) -> None:
        """``running`` → ``ready``: the job waits for ``job-complete``."""
        self._transition(S.READY)

    # -- verbs ------------------------------------------------------------------------------

    def user_pause(self) -> None:
        self._check_verb(JobVerb.PAUSE)
        if self.user_paused:
            raise BlockError("Job is already paused")
        self.user_paused = True
        self._pause_requested = True
        self._resumed.clear()

    def user_resume(self) -> None:
        # QEMU looks at the pause before the verb table here.
        if not self.user_paused:
            raise BlockError("Can't resume a job that was not paused")
        self._check_verb(JobVerb.RESUME)
        self.user_paused = False
        self._pause_requested = False
        self._resumed.set()

    def set_speed(self, speed: int) -> None:
        self._check_verb(JobVerb.SET_SPEED)
        if speed < 0:
            raise BlockError("Invalid parameter 'speed'")
        self.speed = speed

    def user_cancel(self, force: bool = False) -> None:
        self._check_verb(JobVerb.CANCEL)
        self.cancelled = True
        if self.status is S.CREATED:
            self._abort_to_concluded()
            return
        if self.status in (S.WAITING, S.PENDING):
            self._abort_to_concluded()
            return
        # A paused job is resumed first so that it can see the cancel.
        if self.user_paused:
            self.user_paused = False
            self._pause_requested = False
            self._resumed.set()
        if self._task is not None and not self._task.done():
            self._task.cancel()

    def user_complete(self) -> None:
        self._check_verb(JobVerb.COMPLETE)
        if self.user_paused or self.cancelled:
            raise BlockError(f"The active block job '{self.id}' cannot be completed")
        self.complete()

    def user_finalize(self) -> None:
        self._check_verb(JobVerb.FINALIZE)
        self._finalize()

    def user_dismiss(self) -> None:
        self._check_verb(JobVerb.DISMISS)
        self._dismiss()

    # -- queries ----------------------------------------------------------------------------

    def info(self) -> dict[str, object]:
        """One ``JobInfo`` of ``query-jobs``, in QEMU's member order."""
        out: dict[str, object] = {"id": self.id, "type": self.job_type,
                                  "status": self.status.value,
                                  "current-progress": self.current_progress,
                                  "total-progress": self.total_progress}
        if self.error is not None:
            out["error"] = self.error
        return out

    async def wait(self) -> None:
        """Wait until the job's task has ended (for library users and tests)."""
        if self._task is not None:
            await asyncio.shield(self._task)


class JobManager:
    """The jobs of one process, newest first (as ``query-jobs`` lists them).

    :param emit: where ``JOB_STATUS_CHANGE`` and the other job events go.
    """

    def __init__(self, emit: EventSink) -> None:
        self.emit = emit
        self._jobs: list[Job] = []

    def __iter__(self) -> Iterator[Job]:
        return iter(list(self._jobs))

    def check_new_id(self, job_id: str) -> None:
        """:raise BlockError: QEMU's text for a malformed or taken id."""
        if not _JOB_ID_RE.match(job_id):
            raise BlockError(f"Invalid job ID '{job_id}'")
        if self.find(job_id) is not None:
            raise BlockError(f"Job ID '{job_id}' already in use")

    def add(self, job: Job) -> None:
        self.check_new_id(job.id)
        self._jobs.insert(0, job)

    def remove(self, job: Job) -> None:
        if job in self._jobs:
            self._jobs.remove(job)

    def find(self, job_id: str) -> Job | None:
        return next((j for j in self._jobs if j.id == job_id), None)

    def get(self, job_id: str) -> Job:
        """:raise BlockError: ``Job not found``."""
        job = self.find(job_id)
        if job is None:
            raise BlockError("Job not found")
        return job

    def query(self) -> list[dict[str, object]]:
        return [job.info() for job in self._jobs]

    def shutdown(self) -> None:
        """At quit: jobs still around are cancelled, concluded ones destroyed (``null``)."""
        for job in list(self._jobs):
            if job.status is S.CONCLUDED:
                job._dismiss()
            elif job.status in VERBS[JobVerb.CANCEL]:
                job.user_cancel(force=True)
