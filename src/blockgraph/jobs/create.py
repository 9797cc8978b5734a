"""``blockdev-create``: image creation as a job of type ``create`` (QEMU 7.2).

What QEMU checks before its first I/O fails the job before the command returns (the events
``created``, ``running``, ``aborting``, ``concluded`` precede the return); the I/O itself runs
after it (``waiting``, ``pending``, ``concluded`` follow). The job is never dismissed on its own
(``auto-dismiss`` is off for ``blockdev-create``) and its progress is 1 of 1 once it ran.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Mapping
from typing import Any

from blockgraph.drivers.base import ChildRole
from blockgraph.drivers.qcow2.create import check_options, qcow2_create
from blockgraph.errors import BlockError
from blockgraph.graph.layer import BlockLayer
from blockgraph.graph.node import Child, Node
from blockgraph.jobs.job import Job, JobManager
from blockgraph.options.keyval import flatten

__all__ = ["CreateJob"]

_SECTOR = 512
_ZERO_CHUNK = 1 << 20
_QCOW2_VERSIONS = {"v2": "0.10", "v3": "1.1"}


class CreateJob(Job):
    """One ``blockdev-create`` job.

    :param options: the checked ``BlockdevCreateOptions`` (``driver`` ``file`` or ``qcow2``).
    """

    job_type = "create"

    def __init__(self, manager: JobManager, job_id: str, layer: BlockLayer,
                 options: Mapping[str, Any]) -> None:
        super().__init__(manager, job_id, auto_finalize=True, auto_dismiss=False)
        self.layer = layer
        self.options = dict(options)
        self._fd: int | None = None
        self._node: Node | None = None
        self._temporary_node = False
        self._data_node: Node | None = None
        self._temporary_data_node = False

    def prepare(self) -> None:
        self.total_progress = 1
        try:
            if self.options["driver"] == "file":
                self._prepare_file()
            elif self.options["driver"] == "qcow2":
                self._prepare_qcow2()
            else:
                raise BlockError(f"Driver '{self.options['driver']}' does not support "
                                 "blockdev-create")
        except BlockError:
            self.current_progress = 1
            raise

    async def run(self) -> None:
        try:
            if self.options["driver"] == "file":
                await self._run_file()
            else:
                await self._run_qcow2()
        finally:
            self.current_progress = 1

    # -- file -------------------------------------------------------------------------------

    def _prepare_file(self) -> None:
        filename = str(self.options["filename"])
        try:
            self._fd = os.open(filename, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise BlockError(f"Could not create '{filename}': "
                             f"{os.strerror(exc.errno or errno.EIO)}") from exc

    async def _run_file(self) -> None:
        fd = self._fd
        assert fd is not None
        filename = str(self.options["filename"])
        size = int(self.options["size"])
        preallocation = str(self.options.get("preallocation", "off"))
        try:
            os.ftruncate(fd, 0)
            if preallocation == "falloc" and size:
                os.posix_fallocate(fd, 0, size)
            elif preallocation == "full":
                zeroes = bytes(min(size, _ZERO_CHUNK))
                offset = 0
                while offset < size:
                    offset += os.pwrite(fd, zeroes[: size - offset], offset)
            os.ftruncate(fd, size)
        except OSError as exc:
            raise BlockError(f"Could not resize file: "
                             f"{os.strerror(exc.errno or errno.EIO)}") from exc
        finally:
            os.close(fd)
            self._fd = None
        self.log.debug("created %s (%d bytes)", filename, size)

    # -- qcow2 ------------------------------------------------------------------------------

    def _prepare_qcow2(self) -> None:
        size = int(self.options["size"])
        if size % _SECTOR:
            raise BlockError(f"Image size must be a multiple of {_SECTOR} bytes")
        for unsupported in ("encrypt",):
            if unsupported in self.options:
                raise BlockError(f"blockdev-create option '{unsupported}' is not supported yet")
        kwargs = self._qcow2_kwargs()
        version = 3 if kwargs["compat"] == "1.1" else 2
        check_options(size, version, kwargs["cluster_size"], kwargs["refcount_bits"],
                      kwargs["extended_l2"], kwargs["compression_type"],
                      kwargs["lazy_refcounts"], kwargs["preallocation"],
                      kwargs.get("backing_file"), kwargs.get("backing_format"),
                      "data-file" in self.options, kwargs["data_file_raw"])
        file = self.options["file"]
        if isinstance(file, str):
            self._node = self.layer.lookup_bs(file)
            if self._node.flags.read_only:
                raise BlockError("Block node is read-only")
        data_file = self.options.get("data-file")
        if isinstance(data_file, str):
            self._data_node = self.layer.lookup_bs(data_file)
            if self._data_node.flags.read_only:
                raise BlockError("Block node is read-only")

    async def _run_qcow2(self) -> None:
        opts = self.options
        if self._node is None:
            # An inline BlockdevOptions: open it for the creation only.
            self._node = await self.layer.open_node(None, flatten(dict(opts["file"])))
            self._temporary_node = True
        node = self._node
        try:
            kwargs = self._qcow2_kwargs()
            if "data-file" in opts and self._data_node is None:
                self._data_node = await self.layer.open_node(
                    None, flatten(dict(opts["data-file"])))
                self._temporary_data_node = True
            data_node = self._data_node
            if data_node is not None:
                # The header records the data file under its node's filename, as QEMU does.
                kwargs["data_file"] = Child("data-file", ChildRole.DATA, data_node, data_node)
                kwargs["data_file_name"] = data_node.filename
            # Written through a writeback view of the node, as QEMU's creation BlockBackend.
            child = Child("file", ChildRole.IMAGE, node, node)
            await qcow2_create(child, int(opts["size"]), **kwargs)
            await node.flush()
            if data_node is not None:
                await data_node.flush()
        finally:
            if self._temporary_node:
                await self.layer.delete_node(node)
                self._node = None
            if self._temporary_data_node and self._data_node is not None:
                await self.layer.delete_node(self._data_node)
                self._data_node = None

    def _qcow2_kwargs(self) -> dict[str, Any]:
        opts = self.options
        kwargs: dict[str, Any] = {
            "compat": _QCOW2_VERSIONS[str(opts.get("version", "v3"))],
            "cluster_size": int(opts.get("cluster-size", 65536)),
            "lazy_refcounts": bool(opts.get("lazy-refcounts", False)),
            "refcount_bits": int(opts.get("refcount-bits", 16)),
            "extended_l2": bool(opts.get("extended-l2", False)),
            "compression_type": str(opts.get("compression-type", "zlib")),
            "preallocation": str(opts.get("preallocation", "off")),
            "data_file_raw": bool(opts.get("data-file-raw", False)),
        }
        if "backing-file" in opts:
            kwargs["backing_file"] = str(opts["backing-file"])
        if "backing-fmt" in opts:
            kwargs["backing_format"] = str(opts["backing-fmt"])
        return kwargs

    def abort(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
