"""NBD wire constants shared by the client driver and the server (``specs/nbd-protocol.md``).

They keep the spec's names without the ``NBD_`` prefix (``OPT_GO``, ``REP_ERR_UNSUP``,
``CMD_FLAG_FUA``); all numbers on the wire are big-endian. This module sits in ``drivers/`` so
that the client driver can use it without importing the export layer above it.
"""

from __future__ import annotations

# -- magic numbers ---------------------------------------------------------------------------

NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT"
OPTION_REPLY_MAGIC = 0x0003E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

# -- handshake flags (server) and client flags ------------------------------------------------

FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1
FLAG_C_FIXED_NEWSTYLE = 1 << 0
FLAG_C_NO_ZEROES = 1 << 1

# -- options -------------------------------------------------------------------------------

OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_PEEK_EXPORT = 4
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_LIST_META_CONTEXT = 9
OPT_SET_META_CONTEXT = 10
OPT_EXTENDED_HEADERS = 11

# -- option reply types ----------------------------------------------------------------------

REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_META_CONTEXT = 4
_REP_ERR = 1 << 31
REP_ERR_UNSUP = _REP_ERR + 1
REP_ERR_POLICY = _REP_ERR + 2
REP_ERR_INVALID = _REP_ERR + 3
REP_ERR_PLATFORM = _REP_ERR + 4
REP_ERR_TLS_REQD = _REP_ERR + 5
REP_ERR_UNKNOWN = _REP_ERR + 6
REP_ERR_SHUTDOWN = _REP_ERR + 7
REP_ERR_BLOCK_SIZE_REQD = _REP_ERR + 8
REP_ERR_TOO_BIG = _REP_ERR + 9

# -- info types ------------------------------------------------------------------------------

INFO_EXPORT = 0
INFO_NAME = 1
INFO_DESCRIPTION = 2
INFO_BLOCK_SIZE = 3

# -- transmission flags ----------------------------------------------------------------------

FLAG_HAS_FLAGS = 1 << 0
FLAG_READ_ONLY = 1 << 1
FLAG_SEND_FLUSH = 1 << 2
FLAG_SEND_FUA = 1 << 3
FLAG_ROTATIONAL = 1 << 4
FLAG_SEND_TRIM = 1 << 5
FLAG_SEND_WRITE_ZEROES = 1 << 6
FLAG_SEND_DF = 1 << 7
FLAG_CAN_MULTI_CONN = 1 << 8
FLAG_SEND_RESIZE = 1 << 9
FLAG_SEND_CACHE = 1 << 10
FLAG_SEND_FAST_ZERO = 1 << 11

# -- commands and their flags ----------------------------------------------------------------

CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_CACHE = 5
CMD_WRITE_ZEROES = 6
CMD_BLOCK_STATUS = 7

CMD_FLAG_FUA = 1 << 0
CMD_FLAG_NO_HOLE = 1 << 1
CMD_FLAG_DF = 1 << 2
CMD_FLAG_REQ_ONE = 1 << 3
CMD_FLAG_FAST_ZERO = 1 << 4

# -- structured replies ----------------------------------------------------------------------

REPLY_FLAG_DONE = 1 << 0

REPLY_TYPE_NONE = 0
REPLY_TYPE_OFFSET_DATA = 1
REPLY_TYPE_OFFSET_HOLE = 2
REPLY_TYPE_BLOCK_STATUS = 5
REPLY_TYPE_ERROR = (1 << 15) + 1
REPLY_TYPE_ERROR_OFFSET = (1 << 15) + 2

# -- error values ----------------------------------------------------------------------------

EPERM = 1
EIO = 5
ENOMEM = 12
EINVAL = 22
ENOSPC = 28
EOVERFLOW = 75
ENOTSUP = 95
ESHUTDOWN = 108

# -- base:allocation states ------------------------------------------------------------------

STATE_HOLE = 1 << 0
STATE_ZERO = 1 << 1

# -- limits and QEMU's fixed context ids -----------------------------------------------------

MAX_BUFFER_SIZE = 32 * 1024 * 1024  # QEMU's NBD_MAX_BUFFER_SIZE: payloads and option data
MAX_STRING_SIZE = 4096
MAX_BLOCK_STATUS_EXTENTS = (1 << 20) // 8
PREFERRED_BLOCK_SIZE = 4096

META_ID_BASE_ALLOCATION = 0
META_ID_ALLOCATION_DEPTH = 1
CONTEXT_BASE_ALLOCATION = "base:allocation"
CONTEXT_ALLOCATION_DEPTH = "qemu:allocation-depth"

# QEMU's nbd_opt_lookup names, used in its error texts (client and server alike).
OPTION_NAMES: dict[int, str] = {
    OPT_EXPORT_NAME: "export name",
    OPT_ABORT: "abort",
    OPT_LIST: "list",
    OPT_STARTTLS: "starttls",
    OPT_INFO: "info",
    OPT_GO: "go",
    OPT_STRUCTURED_REPLY: "structured reply",
    OPT_LIST_META_CONTEXT: "list meta context",
    OPT_SET_META_CONTEXT: "set meta context",
}


def option_name(option: int) -> str:
    return OPTION_NAMES.get(option, "<unknown>")
