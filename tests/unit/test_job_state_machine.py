"""The job core: QEMU 7.2's status table, verb table, events and lifecycle; the create job;
the write threshold and the rerror/werror policies of the graph (their events)."""

from __future__ import annotations

import asyncio
import errno
from pathlib import Path

import pytest

from blockgraph.errors import BlockError, IOFailure
from blockgraph.graph.layer import BlockLayer
from blockgraph.jobs.create import CreateJob
from blockgraph.jobs.job import (
    TRANSITIONS,
    VERBS,
    IllegalTransition,
    Job,
    JobManager,
    JobStatus,
    JobVerb,
    StateError,
)

S = JobStatus
ORDER = [S.UNDEFINED, S.CREATED, S.RUNNING, S.PAUSED, S.READY, S.STANDBY, S.WAITING, S.PENDING,
         S.ABORTING, S.CONCLUDED, S.NULL]

# The spec's JobSTT, row by row (U C R P Y S W D X E N), written out independently of the code.
SPEC_STT = {
    S.UNDEFINED: "0 1 0 0 0 0 0 0 0 0 0",
    S.CREATED: "0 0 1 0 0 0 0 0 1 0 1",
    S.RUNNING: "0 0 0 1 1 0 1 0 1 0 0",
    S.PAUSED: "0 0 1 0 0 0 0 0 0 0 0",
    S.READY: "0 0 0 0 0 1 1 0 1 0 0",
    S.STANDBY: "0 0 0 0 1 0 0 0 0 0 0",
    S.WAITING: "0 0 0 0 0 0 0 1 1 0 0",
    S.PENDING: "0 0 0 0 0 0 0 0 1 1 0",
    S.ABORTING: "0 0 0 0 0 0 0 0 1 1 0",
    S.CONCLUDED: "0 0 0 0 0 0 0 0 0 0 1",
    S.NULL: "0 0 0 0 0 0 0 0 0 0 0",
}
# The spec's JobVerbTable (U C R P Y S W D X E N).
SPEC_VERBS = {
    JobVerb.CANCEL: "0 1 1 1 1 1 1 1 0 0 0",
    JobVerb.PAUSE: "0 1 1 1 1 1 0 0 0 0 0",
    JobVerb.RESUME: "0 1 1 1 1 1 0 0 0 0 0",
    JobVerb.SET_SPEED: "0 1 1 1 1 1 0 0 0 0 0",
    JobVerb.COMPLETE: "0 0 0 0 1 1 0 0 0 0 0",
    JobVerb.FINALIZE: "0 0 0 0 0 0 0 1 0 0 0",
    JobVerb.DISMISS: "0 0 0 0 0 0 0 0 0 1 0",
}


def _row(bits: str) -> set[JobStatus]:
    return {status for status, bit in zip(ORDER, bits.split(), strict=True) if bit == "1"}


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, object]]] = []
        self._changed = asyncio.Event()

    def __call__(self, name: str, data: dict[str, object]) -> None:
        self.events.append((name, data))
        self._changed.set()

    async def until(self, job: Job, status: JobStatus) -> None:
        """Wait for the job's events until it is in ``status`` (no timed waits)."""
        while job.status is not status:
            self._changed.clear()
            await self._changed.wait()

    def statuses(self, job_id: str = "j") -> list[str]:
        return [str(d["status"]) for n, d in self.events
                if n == "JOB_STATUS_CHANGE" and d["id"] == job_id]


class ScriptedJob(Job):
    """A job whose work waits for the test: ``poke`` takes it to its next pause point, ``go``
    ends it, ``fail`` makes it fail."""

    job_type = "backup"

    def __init__(self, manager: JobManager, job_id: str = "j", *, ready: bool = False,
                 **kwargs: bool) -> None:
        super().__init__(manager, job_id, **kwargs)
        self.go = asyncio.Event()
        self.poke = asyncio.Event()
        self.fail: str | None = None
        self.ready = ready
        self.committed = False
        self.aborted = False

    async def run(self) -> None:
        if self.ready:
            self.set_ready()
        while True:
            await self.pause_point()
            if self.go.is_set():
                break
            self.poke.clear()
            await self.poke.wait()
        if self.fail is not None:
            raise IOFailure(errno.EIO)

    def complete(self) -> None:
        self.finish()

    def finish(self) -> None:
        self.go.set()
        self.poke.set()

    def commit(self) -> None:
        self.committed = True

    def abort(self) -> None:
        self.aborted = True


def _job_in(status: JobStatus) -> Job:
    job = Job(JobManager(Recorder()), "j")
    job.status = status
    return job


# -- the tables --------------------------------------------------------------------------------


def test_transition_table_is_the_spec() -> None:
    assert set(TRANSITIONS) == set(ORDER)
    for status, bits in SPEC_STT.items():
        assert TRANSITIONS[status] == _row(bits), status


@pytest.mark.parametrize("source", ORDER)
@pytest.mark.parametrize("target", ORDER)
def test_every_transition(source: JobStatus, target: JobStatus) -> None:
    recorder = Recorder()
    job = Job(JobManager(recorder), "j")
    job.status = source
    if target in _row(SPEC_STT[source]):
        job._transition(target)
        assert job.status is target
        expected = [] if source is target else [("JOB_STATUS_CHANGE",
                                                 {"id": "j", "status": target.value})]
        assert recorder.events == expected
    else:
        with pytest.raises(IllegalTransition):
            job._transition(target)
        assert job.status is source
        assert recorder.events == []


def test_ready_to_running_is_not_allowed_in_7_2() -> None:
    assert S.RUNNING not in TRANSITIONS[S.READY]


def test_verb_table_is_the_spec() -> None:
    assert set(VERBS) == set(JobVerb)
    for verb, bits in SPEC_VERBS.items():
        assert VERBS[verb] == _row(bits), verb


@pytest.mark.parametrize("verb", list(JobVerb))
@pytest.mark.parametrize("status", ORDER)
def test_every_verb_guard(verb: JobVerb, status: JobStatus) -> None:
    job = _job_in(status)
    if status in _row(SPEC_VERBS[verb]):
        job._check_verb(verb)
        return
    with pytest.raises(StateError) as err:
        job._check_verb(verb)
    assert err.value.state is status
    assert err.value.required == VERBS[verb]
    assert err.value.verb is verb
    assert err.value.qmp_class == "GenericError"
    assert str(err.value) == (f"Job 'j' in state '{status.value}' cannot accept command verb "
                              f"'{verb.value}'")


def test_state_error_is_a_block_error() -> None:
    assert issubclass(StateError, BlockError)


@pytest.mark.parametrize(("call", "verb"), [
    (lambda j: j.user_cancel(), JobVerb.CANCEL),
    (lambda j: j.user_pause(), JobVerb.PAUSE),
    (lambda j: j.user_resume(), JobVerb.RESUME),
    (lambda j: j.set_speed(1), JobVerb.SET_SPEED),
    (lambda j: j.user_complete(), JobVerb.COMPLETE),
    (lambda j: j.user_finalize(), JobVerb.FINALIZE),
    (lambda j: j.user_dismiss(), JobVerb.DISMISS),
])
def test_user_commands_go_through_the_guard(call: object, verb: JobVerb) -> None:
    for status in ORDER:
        if status in VERBS[verb]:
            continue
        job = _job_in(status)
        job.user_paused = True  # resume checks that before the verb
        with pytest.raises(StateError, match=f"cannot accept command verb '{verb.value}'"):
            call(job)  # type: ignore[operator]
        assert job.status is status


# -- lifecycle ---------------------------------------------------------------------------------


def test_auto_lifecycle() -> None:
    async def scenario() -> list[str]:
        rec = Recorder()
        manager = JobManager(rec)
        job = ScriptedJob(manager)
        manager.add(job)
        job.start()
        assert rec.statuses() == ["created", "running"]
        job.finish()
        await job.wait()
        assert job.committed and not job.aborted
        assert manager.find("j") is None
        return rec.statuses()

    assert asyncio.run(scenario()) == ["created", "running", "waiting", "pending", "concluded",
                                       "null"]


def test_manual_finalize_and_dismiss() -> None:
    async def scenario() -> None:
        rec = Recorder()
        manager = JobManager(rec)
        job = ScriptedJob(manager, auto_finalize=False, auto_dismiss=False)
        manager.add(job)
        job.start()
        job.finish()
        await job.wait()
        assert job.status is S.PENDING and not job.committed
        assert manager.query() == [{"id": "j", "type": "backup", "status": "pending",
                                    "current-progress": 0, "total-progress": 0}]
        with pytest.raises(StateError):
            job.user_dismiss()
        job.user_finalize()
        assert job.committed and job.status is S.CONCLUDED
        job.user_dismiss()
        assert manager.find("j") is None
        assert rec.statuses() == ["created", "running", "waiting", "pending", "concluded", "null"]

    asyncio.run(scenario())


def test_failure_aborts_with_the_error() -> None:
    async def scenario() -> None:
        rec = Recorder()
        manager = JobManager(rec)
        job = ScriptedJob(manager, auto_dismiss=False)
        manager.add(job)
        job.start()
        job.fail = "x"
        job.finish()
        await job.wait()
        assert job.aborted and not job.committed
        assert rec.statuses() == ["created", "running", "aborting", "concluded"]
        assert manager.query()[0]["error"] == "Input/output error"

    asyncio.run(scenario())


def test_pause_resume_and_cancel_a_paused_job() -> None:
    async def scenario() -> None:
        rec = Recorder()
        manager = JobManager(rec)
        job = ScriptedJob(manager)
        manager.add(job)
        job.start()
        job.user_pause()
        with pytest.raises(BlockError, match="^Job is already paused$"):
            job.user_pause()
        job.poke.set()
        await rec.until(job, S.PAUSED)
        job.user_resume()
        with pytest.raises(BlockError, match="^Can't resume a job that was not paused$"):
            job.user_resume()
        await rec.until(job, S.RUNNING)
        job.user_pause()
        job.poke.set()
        await rec.until(job, S.PAUSED)
        job.user_cancel()
        await job.wait()
        assert job.aborted
        assert rec.statuses() == ["created", "running", "paused", "running", "paused", "running",
                                  "aborting", "concluded", "null"]

    asyncio.run(scenario())


def test_ready_standby_complete() -> None:
    async def scenario() -> None:
        rec = Recorder()
        manager = JobManager(rec)
        job = ScriptedJob(manager, ready=True)
        manager.add(job)
        job.start()
        await rec.until(job, S.READY)
        job.user_pause()
        job.poke.set()
        await rec.until(job, S.STANDBY)
        with pytest.raises(BlockError, match="cannot be completed"):
            job.user_complete()  # paused
        job.user_resume()
        await rec.until(job, S.READY)
        job.user_complete()
        await job.wait()
        assert rec.statuses() == ["created", "running", "ready", "standby", "ready", "waiting",
                                  "pending", "concluded", "null"]

    asyncio.run(scenario())


def test_complete_refused_by_jobs_that_never_get_ready() -> None:
    job = _job_in(S.READY)
    with pytest.raises(BlockError, match="^The active block job 'j' cannot be completed$"):
        job.user_complete()


def test_cancel_before_start_and_when_pending() -> None:
    rec = Recorder()
    manager = JobManager(rec)
    job = ScriptedJob(manager, "c")
    manager.add(job)
    job._transition(S.CREATED)
    job.user_cancel()
    assert rec.statuses("c") == ["created", "aborting", "concluded", "null"]

    async def pending() -> None:
        job = ScriptedJob(manager, "p", auto_finalize=False)
        manager.add(job)
        job.start()
        job.finish()
        await job.wait()
        job.user_cancel()
        assert job.error == "Operation canceled"
        assert rec.statuses("p") == ["created", "running", "waiting", "pending", "aborting",
                                     "concluded", "null"]

    asyncio.run(pending())


def test_set_speed() -> None:
    job = _job_in(S.RUNNING)
    job.set_speed(1000)
    assert job.speed == 1000
    with pytest.raises(BlockError, match="^Invalid parameter 'speed'$"):
        job.set_speed(-1)


def test_manager_ids_and_lookup() -> None:
    manager = JobManager(Recorder())
    with pytest.raises(BlockError, match="^Job not found$"):
        manager.get("x")
    manager.add(Job(manager, "a"))
    with pytest.raises(BlockError, match="^Job ID 'a' already in use$"):
        manager.add(Job(manager, "a"))
    with pytest.raises(BlockError, match="^Invalid job ID '1a'$"):
        manager.check_new_id("1a")
    manager.add(Job(manager, "b"))
    assert [j.id for j in manager] == ["b", "a"]  # newest first


def test_shutdown_destroys_concluded_jobs() -> None:
    rec = Recorder()
    manager = JobManager(rec)
    job = Job(manager, "j")
    manager.add(job)
    job.status = S.CONCLUDED
    manager.shutdown()
    assert rec.statuses() == ["null"] and manager.find("j") is None


# -- blockdev-create ---------------------------------------------------------------------------


def test_create_jobs(tmp_path: Path) -> None:
    layer = BlockLayer()
    rec = Recorder()
    manager = JobManager(rec)
    raw = tmp_path / "f.raw"
    image = tmp_path / "q.qcow2"

    async def scenario() -> None:
        job = CreateJob(manager, "f", layer, {"driver": "file", "filename": str(raw),
                                              "size": 1 << 20, "preallocation": "full"})
        manager.add(job)
        job.start()
        await job.wait()
        assert job.info() == {"id": "f", "type": "create", "status": "concluded",
                              "current-progress": 1, "total-progress": 1}
        assert raw.stat().st_size == 1 << 20
        job.user_dismiss()
        image.touch()
        node = await layer.open_node(None, {"driver": "file", "filename": str(image),
                                            "node-name": "qf"})
        node.write_threshold = 70000
        layer.event_listeners.append(rec)
        job = CreateJob(manager, "q", layer, {"driver": "qcow2", "file": "qf",
                                              "size": 16 << 20})
        manager.add(job)
        job.start()
        await job.wait()
        assert job.error is None
        assert ("BLOCK_WRITE_THRESHOLD", {"node-name": "qf", "amount-exceeded": 126608,
                                          "write-threshold": 70000}) in rec.events
        assert node.write_threshold == 0
        # Failures found before any I/O conclude the job before start() returns.
        for job_id, options, error in [
            ("e1", {"driver": "qcow2", "file": "nope", "size": 1 << 20},
             "Cannot find device='nope' nor node-name='nope'"),
            ("e2", {"driver": "qcow2", "file": "qf", "size": 1000},
             "Image size must be a multiple of 512 bytes"),
            ("e3", {"driver": "qcow2", "file": "qf", "size": 1 << 20, "version": "v2",
                    "lazy-refcounts": True},
             "Lazy refcounts only supported with compatibility level 1.1 and above (use "
             "version=v3 or greater)"),
            ("e4", {"driver": "file", "filename": str(tmp_path / "no" / "x"), "size": 0},
             f"Could not create '{tmp_path / 'no' / 'x'}': No such file or directory"),
        ]:
            job = CreateJob(manager, job_id, layer, options)
            manager.add(job)
            job.start()
            assert job.status is S.CONCLUDED
            assert job.info()["error"] == error
            assert rec.statuses(job_id) == ["created", "running", "aborting", "concluded"]

    layer.run(scenario())
    layer.close()


# -- the graph's events ------------------------------------------------------------------------


def test_write_threshold_one_shot(tmp_path: Path) -> None:
    layer = BlockLayer()
    rec = Recorder()
    layer.event_listeners.append(rec)
    disk = tmp_path / "d.raw"
    disk.write_bytes(bytes(1 << 20))

    async def scenario() -> None:
        node = await layer.open_node(str(disk), {"driver": "raw", "node-name": "n"})
        node.write_threshold = 12 << 10
        await node.pwritev(0, memoryview(bytes(4096)))
        assert rec.events == []
        await node.pwritev(13 << 10, memoryview(bytes(64 << 10)))
        await node.pwritev(512 << 10, memoryview(bytes(4096)))
        assert rec.events == [("BLOCK_WRITE_THRESHOLD", {
            "node-name": "n", "amount-exceeded": (13 << 10) + (64 << 10) - (12 << 10),
            "write-threshold": 12 << 10})]
        assert node.write_threshold == 0

    layer.run(scenario())
    layer.close()


@pytest.mark.parametrize(("policy", "error", "action"), [
    ("report", errno.EIO, "report"), ("ignore", errno.EIO, "ignore"),
    ("stop", errno.EIO, "stop"), ("enospc", errno.ENOSPC, "stop"),
    ("enospc", errno.EIO, "report"),
])
def test_io_error_policies(policy: str, error: int, action: str) -> None:
    layer = BlockLayer()
    rec = Recorder()
    layer.event_listeners.append(rec)
    bb = layer.new_backend("d0")
    bb.werror = policy
    bb.iostatus_enabled = True  # as a guest device would
    assert bb.handle_io_error(False, error) == action
    io_error = {"device": "d0", "operation": "write", "action": action,
                "nospace": error == errno.ENOSPC,
                "reason": "No space left on device" if error == errno.ENOSPC
                else "Input/output error"}
    if action == "stop":
        assert rec.events == [("BLOCK_IO_ERROR", io_error), ("STOP", {})]
        assert layer.run_state == "io-error" and not layer.vm_running
        assert bb.iostatus == ("nospace" if error == errno.ENOSPC else "failed")
    else:
        assert rec.events == [("BLOCK_IO_ERROR", io_error)]
        assert layer.vm_running and bb.iostatus == "ok"
    layer.close()


def test_io_error_without_iostatus_has_no_nospace() -> None:
    layer = BlockLayer()
    rec = Recorder()
    layer.event_listeners.append(rec)
    bb = layer.new_backend("d0")
    bb.rerror = "report"
    assert bb.handle_io_error(True, errno.EIO) == "report"
    assert rec.events == [("BLOCK_IO_ERROR", {"device": "d0", "operation": "read",
                                              "action": "report",
                                              "reason": "Input/output error"})]
    layer.close()
