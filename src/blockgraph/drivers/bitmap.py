"""Dirty bitmaps: which parts of a node were written since a point in time.

A :class:`DirtyBitmap` covers a node's bytes in ``granularity``-sized chunks, one bit each.
The bits live in a ``bytearray``, least significant bit first in each byte: exactly qcow2's
on-disk bitmap layout (``specs/qcow2-format.md`` §9), so persisting one is a slice copy. Ranges
are set, cleared and scanned with whole-``int`` operations on the affected bytes, never with a
Python loop per bit.

The request layer (:mod:`blockgraph.io.request`) marks every *enabled* bitmap of a node after a
write, zero write or discard reached its driver.
"""

from __future__ import annotations

from collections.abc import Iterator

MIN_GRANULARITY = 512
MAX_GRANULARITY = 1 << 31


def valid_granularity(granularity: int) -> bool:
    """QEMU's rule: a power of two, at least 512 (and qcow2 stores at most 2^31)."""
    return MIN_GRANULARITY <= granularity <= MAX_GRANULARITY and not granularity & (granularity - 1)


class DirtyBitmap:
    """One dirty bitmap of a node.

    :param name: unique per node ("" for an anonymous bitmap).
    :param size: the node's length in bytes.
    :param granularity: bytes per bit, a power of two >= 512.
    :param enabled: whether writes mark it (qcow2's ``auto`` flag).
    :param persistent: whether the format driver stores it in the image.
    :param inconsistent: loaded from an image that was not closed cleanly (qcow2 ``in_use``):
        it cannot be used, only removed.
    """

    def __init__(self, name: str, size: int, granularity: int, *, enabled: bool = True,
                 persistent: bool = False, inconsistent: bool = False) -> None:
        if not valid_granularity(granularity):
            raise ValueError("Granularity must be power of 2 and at least 512")
        self.name = name
        self.size = size
        self.granularity = granularity
        self.enabled = enabled
        self.persistent = persistent
        self.inconsistent = inconsistent
        self.bits = bytearray(self.byte_length(size, granularity))

    @staticmethod
    def byte_length(size: int, granularity: int) -> int:
        """Bytes of bit array needed to cover ``size`` bytes."""
        return (-(-size // granularity) + 7) // 8

    @property
    def nb_bits(self) -> int:
        return -(-self.size // self.granularity)

    # -- changing bits ----------------------------------------------------------------------

    def _bit_span(self, offset: int, length: int) -> tuple[int, int] | None:
        end = min(offset + length, self.size)
        if length <= 0 or offset >= end or offset < 0:
            return None
        return offset // self.granularity, (end - 1) // self.granularity + 1

    def _apply(self, first: int, last: int, value: bool) -> None:
        # Whole bytes in the middle are a slice assignment; the partial bytes at both ends are
        # one int operation each.
        lo_byte, hi_byte = first // 8, (last - 1) // 8
        if lo_byte == hi_byte:
            mask = ((1 << (last - first)) - 1) << (first % 8)
            self.bits[lo_byte] = self.bits[lo_byte] | mask if value else self.bits[lo_byte] & ~mask
            return
        head_mask = (0xFF << (first % 8)) & 0xFF
        tail_bits = last - hi_byte * 8
        tail_mask = (1 << tail_bits) - 1
        fill = 0xFF if value else 0
        self.bits[lo_byte + 1 : hi_byte] = bytes([fill]) * (hi_byte - lo_byte - 1)
        if value:
            self.bits[lo_byte] |= head_mask
            self.bits[hi_byte] |= tail_mask
        else:
            self.bits[lo_byte] &= ~head_mask & 0xFF
            self.bits[hi_byte] &= ~tail_mask & 0xFF

    def set_range(self, offset: int, length: int) -> None:
        """Mark every chunk touched by ``[offset, offset+length)`` dirty."""
        span = self._bit_span(offset, length)
        if span is not None:
            self._apply(span[0], span[1], True)

    def clear_range(self, offset: int, length: int) -> None:
        """Mark every chunk touched by ``[offset, offset+length)`` clean."""
        span = self._bit_span(offset, length)
        if span is not None:
            self._apply(span[0], span[1], False)

    def mark(self, offset: int, length: int) -> None:
        """The request layer's hook: set the range if the bitmap is enabled."""
        if self.enabled and not self.inconsistent:
            self.set_range(offset, length)

    def clear(self) -> None:
        self.bits[:] = bytes(len(self.bits))

    def resize(self, size: int) -> None:
        """Follow a node resize: new chunks are clean; bits past the new end are dropped."""
        nb = self.byte_length(size, self.granularity)
        if nb < len(self.bits):
            del self.bits[nb:]
        else:
            self.bits.extend(bytes(nb - len(self.bits)))
        self.size = size
        spare = nb * 8 - self.nb_bits
        if spare and self.bits:
            self.bits[-1] &= 0xFF >> spare

    def merge(self, source: DirtyBitmap) -> None:
        """Set every chunk that is dirty in ``source`` (which may have another granularity)."""
        if source.granularity == self.granularity and len(source.bits) == len(self.bits):
            merged = int.from_bytes(self.bits, "little") | int.from_bytes(source.bits, "little")
            self.bits[:] = merged.to_bytes(len(self.bits), "little")
            return
        for offset, length in source.dirty_runs(0, source.size):
            self.set_range(offset, length)

    # -- reading ----------------------------------------------------------------------------

    def is_empty(self) -> bool:
        return self.bits.count(0) == len(self.bits)

    def count(self) -> int:
        """Dirty bytes (chunks times granularity, the last chunk clipped to the size)."""
        return self.dirty_bytes(0, self.size)

    def dirty_bytes(self, offset: int, length: int) -> int:
        return sum(n for _, n in self.dirty_runs(offset, length))

    def runs(self, offset: int, length: int) -> Iterator[tuple[int, int, bool]]:
        """(offset, length, dirty) runs covering ``[offset, offset+length)`` (clipped to the size)."""
        end = min(offset + length, self.size)
        if offset >= end:
            return
        first = offset // self.granularity
        last = (end - 1) // self.granularity + 1
        lo_byte = first // 8
        window = int.from_bytes(self.bits[lo_byte : (last + 7) // 8], "little") >> (first - lo_byte * 8)
        nb = last - first
        window &= (1 << nb) - 1
        pos = 0
        g = self.granularity
        while pos < nb:
            # Length of the run of equal bits starting at ``pos``: find the lowest bit that
            # differs from the current one.
            dirty = bool(window & 1)
            probe = ~window if dirty else window
            if probe == 0 or (not dirty and window == 0):
                n = nb - pos
            else:
                n = min((probe & -probe).bit_length() - 1, nb - pos)
            start = max((first + pos) * g, offset)
            stop = min((first + pos + n) * g, end)
            yield start, stop - start, dirty
            window >>= n
            pos += n

    def dirty_runs(self, offset: int, length: int) -> Iterator[tuple[int, int]]:
        """(offset, length) of the dirty runs in the range."""
        for start, n, dirty in self.runs(offset, length):
            if dirty:
                yield start, n

    def info_flags(self) -> list[str]:
        """qcow2 ``Qcow2BitmapInfoFlags`` names as ``qemu-img info`` lists them."""
        flags = []
        if self.inconsistent:
            flags.append("in-use")
        if self.enabled:
            flags.append("auto")
        return flags
