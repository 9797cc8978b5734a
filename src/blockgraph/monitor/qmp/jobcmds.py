"""The QMP commands of jobs, ``blockdev-create`` and ``block-set-write-threshold``.

Kept out of :mod:`~blockgraph.monitor.qmp.commands` so that the command table there only names
them. ``BlockdevCreateOptions`` is checked here (the union by ``driver``) with the table's
QAPI-style checkers, imported when a command runs since the table imports this module.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from blockgraph.errors import BlockError
from blockgraph.jobs.create import CreateJob

if TYPE_CHECKING:
    from blockgraph.monitor.qmp.commands import Member, QMPMonitor

__all__ = ["query_jobs", "job_cancel", "job_pause", "job_resume", "job_complete",
           "job_dismiss", "job_finalize", "blockdev_create", "block_set_write_threshold"]

# Drivers with blockdev-create support in QEMU 7.2 that we do not implement yet are refused by
# the job itself; a driver without any is refused before the job exists.
_NO_CREATE = ("blkdebug", "blklogwrites", "blkreplay", "blkverify", "bochs", "cloop", "compress",
              "copy-before-write", "copy-on-read", "dmg", "snapshot-access", "ftp", "ftps",
              "host_cdrom", "host_device", "http", "https", "iscsi", "nbd", "null-aio",
              "null-co", "nvme", "preallocate", "quorum", "raw", "replication", "throttle",
              "vvfat")


def _create_members(driver: str) -> tuple[Member, ...]:
    from blockgraph.monitor.qmp.commands import (
        BLOCKDEV_REF,
        BOOL,
        INT,
        OBJECT,
        STR,
        T,
        enum,
        opt,
        req,
    )

    # QAPI ``size`` (uint64): checked by _check_create_options ("expects uint64").
    SIZE = T("any", name="size")  # noqa: N806 - a type constant, as in the table module
    prealloc = enum("off", "metadata", "falloc", "full")
    if driver == "file":
        return (req("filename", STR), req("size", SIZE), opt("preallocation", prealloc),
                opt("nocow", BOOL), opt("extent-size-hint", SIZE))
    if driver == "qcow2":
        from blockgraph.monitor.qmp.commands import DRIVERS

        return (req("file", BLOCKDEV_REF), opt("data-file", BLOCKDEV_REF),
                opt("data-file-raw", BOOL), opt("extended-l2", BOOL), req("size", SIZE),
                opt("version", enum("v2", "v3")), opt("backing-file", STR),
                opt("backing-fmt", enum(*DRIVERS)), opt("encrypt", OBJECT),
                opt("cluster-size", SIZE), opt("preallocation", prealloc),
                opt("lazy-refcounts", BOOL), opt("refcount-bits", INT),
                opt("compression-type", enum("zlib", "zstd")))
    return ()


def _check_enum(member: Member, value: object) -> None:
    # QEMU's enum visitor names the member alone, not its path ('version', not
    # 'options.version').
    if member.type.kind == "enum" and isinstance(value, str) and value not in member.type.values:
        raise BlockError(f"Parameter '{member.name}' does not accept value '{value}'")


def _check_create_options(options: dict[str, Any]) -> None:
    from blockgraph.monitor.qmp.commands import DRIVERS, check_members, enum, req
    from blockgraph.monitor.qmp.encode import qdict_order

    driver_member = req("driver", enum(*DRIVERS))
    _check_enum(driver_member, options.get("driver"))
    check_members((driver_member,), options, "options", leftovers=False)
    driver = str(options["driver"])
    members = _create_members(driver)
    for member in members:
        value = options.get(member.name)
        _check_enum(member, value)
        check_members((member,), options, "options", leftovers=False)
        if member.type.name == "size" and value is not None and (
                not isinstance(value, int) or isinstance(value, bool)):
            raise BlockError(f"Parameter 'options.{member.name}' expects uint64")
    known = {"driver"} | {m.name for m in members}
    for key in qdict_order(options.keys()):
        if key not in known:
            raise BlockError(f"Parameter 'options.{key}' is unexpected")


async def blockdev_create(mon: QMPMonitor, args: dict[str, Any]) -> object:
    options = args["options"]
    _check_create_options(options)
    driver = str(options["driver"])
    if driver in _NO_CREATE:
        raise BlockError("Driver does not support blockdev-create")
    if driver not in ("file", "qcow2"):
        raise BlockError(f"blockdev-create of driver '{driver}' is not supported yet")
    job_id = str(args["job-id"])
    mon.jobs.check_new_id(job_id)
    job = CreateJob(mon.jobs, job_id, mon.layer, options)
    mon.jobs.add(job)
    job.start()
    return {}


async def query_jobs(mon: QMPMonitor, args: dict[str, Any]) -> object:
    return mon.jobs.query()


async def job_cancel(mon: QMPMonitor, args: dict[str, Any]) -> object:
    mon.jobs.get(str(args["id"])).user_cancel(force=True)
    return {}


async def job_pause(mon: QMPMonitor, args: dict[str, Any]) -> object:
    mon.jobs.get(str(args["id"])).user_pause()
    return {}


async def job_resume(mon: QMPMonitor, args: dict[str, Any]) -> object:
    mon.jobs.get(str(args["id"])).user_resume()
    return {}


async def job_complete(mon: QMPMonitor, args: dict[str, Any]) -> object:
    mon.jobs.get(str(args["id"])).user_complete()
    return {}


async def job_dismiss(mon: QMPMonitor, args: dict[str, Any]) -> object:
    mon.jobs.get(str(args["id"])).user_dismiss()
    return {}


async def job_finalize(mon: QMPMonitor, args: dict[str, Any]) -> object:
    mon.jobs.get(str(args["id"])).user_finalize()
    return {}


async def block_set_write_threshold(mon: QMPMonitor, args: dict[str, Any]) -> object:
    name = str(args["node-name"])
    node = mon.layer.find_node(name)
    if node is None:
        raise BlockError(f"Device '{name}' not found")
    threshold = int(args["write-threshold"])
    node.write_threshold = max(threshold, 0)
    return {}
