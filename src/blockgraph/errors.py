"""One error taxonomy for the whole library.

Every error knows the QMP ``class`` it is reported with and carries QEMU's message text
unchanged, so the monitor and the command-line tools print it without translation. What the
caller must do decides the type: reject a command or option (:class:`BlockError` and its
children), fail one request (:class:`IOFailure`), or drop a connection (:class:`ProtocolError`).
"""

from __future__ import annotations

import errno as _errno


class BlockError(Exception):
    """A command, an option set or an open was rejected; nothing was changed.

    :param desc: QEMU's message, verbatim.
    :param qmp_class: the QMP error class this maps to.
    """

    qmp_class_default = "GenericError"

    def __init__(self, desc: str, qmp_class: str | None = None) -> None:
        super().__init__(desc)
        self.desc = desc
        self.qmp_class = qmp_class or self.qmp_class_default

    def __str__(self) -> str:
        return self.desc

    def prepend(self, prefix: str) -> BlockError:
        """Return the same error with ``prefix`` before its message (QEMU's error_prepend)."""
        err = type(self).__new__(type(self))
        BlockError.__init__(err, prefix + self.desc, self.qmp_class)
        return err


class OptionError(BlockError):
    """An option was malformed, of the wrong type, unknown or missing."""


class DeviceNotFound(BlockError):
    """A device or node name that names nothing."""

    qmp_class_default = "DeviceNotFound"


class IOFailure(Exception):
    """One I/O request failed with an errno; the graph itself is fine.

    :param errno: the POSIX error number, as QEMU reports it (``-errno`` internally).
    """

    def __init__(self, errno: int, message: str | None = None) -> None:
        self.errno = errno
        super().__init__(message or _errno_text(errno))


class ProtocolError(Exception):
    """A peer broke a wire protocol; the connection must be dropped."""


def _errno_text(err: int) -> str:
    import os

    return os.strerror(err) if err else "Success"


EIO = _errno.EIO
EINVAL = _errno.EINVAL
ENOSPC = _errno.ENOSPC
EPERM = _errno.EPERM
ENOTSUP = _errno.ENOTSUP
ENOMEDIUM = _errno.ENOMEDIUM
