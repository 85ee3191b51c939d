"""Raw split-ring writer for tests: hostile rings the driver API would refuse to build.

Every function writes (or reads) the little-endian wire format of VIRTIO 1.2 section
2.7 straight into guest memory with :mod:`struct`, through ``GuestMemory.write`` /
``GuestMemory.read``. Nothing is checked: a descriptor may carry any address, length,
flags and ``next``; the available ring may name any head and ``avail->idx`` may jump
anywhere. That is the point: tests play a misbehaving guest driver (or, for a driver
queue, a misbehaving device) with these functions.

Layout reminders (queue size ``n``; addresses as given by ``vqcore.split_addresses``):

* descriptor table: ``n`` entries of ``struct virtq_desc { le64 addr; le32 len;
  le16 flags; le16 next; }`` (16 bytes each); an indirect table has the same format;
* available ring: ``le16 flags; le16 idx; le16 ring[n]; le16 used_event;``
* used ring: ``le16 flags; le16 idx; struct { le32 id; le32 len; } ring[n];
  le16 avail_event;``
"""

from __future__ import annotations

import struct
from typing import Iterable, Sequence

from vqcore.split import (VIRTQ_AVAIL_F_NO_INTERRUPT, VIRTQ_DESC_F_INDIRECT,
                          VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, VIRTQ_USED_F_NO_NOTIFY)

__all__ = [
    "VIRTQ_DESC_F_NEXT", "VIRTQ_DESC_F_WRITE", "VIRTQ_DESC_F_INDIRECT",
    "VIRTQ_USED_F_NO_NOTIFY", "VIRTQ_AVAIL_F_NO_INTERRUPT", "DESC_SIZE",
    "pack_desc", "unpack_desc", "write_desc", "write_descs", "read_desc",
    "write_avail_flags", "write_avail_idx", "read_avail_idx", "write_avail_entry",
    "offer", "write_used_event", "write_used_flags", "write_used_idx", "read_used_idx",
    "write_used_elem", "read_used_elem", "read_avail_event", "complete",
]

_DESC = struct.Struct("<QIHH")
_U16 = struct.Struct("<H")
_USED_ELEM = struct.Struct("<II")

#: bytes per descriptor (ring table and indirect table)
DESC_SIZE = _DESC.size

_M16 = 0xFFFF
_M32 = 0xFFFFFFFF
_M64 = 0xFFFFFFFFFFFFFFFF


# ---- descriptors ---------------------------------------------------------------------

def pack_desc(addr: int, length: int, flags: int = 0, next: int = 0) -> bytes:
    """The 16 wire bytes of one descriptor. Fields are truncated to their widths
    (addr 64, len 32, flags 16, next 16 bits), never rejected."""
    return _DESC.pack(addr & _M64, length & _M32, flags & _M16, next & _M16)


def unpack_desc(raw: bytes) -> tuple[int, int, int, int]:
    """``(addr, len, flags, next)`` of 16 wire bytes."""
    return _DESC.unpack(raw)


def write_desc(mem, table: int, index: int, addr: int, length: int, flags: int = 0,
               next: int = 0) -> None:
    """Write descriptor ``index`` of the table at guest address ``table``.

    ``table`` is the ring's descriptor table or an indirect table; ``index`` is not
    checked against any size."""
    mem.write(table + DESC_SIZE * index, pack_desc(addr, length, flags, next))


def write_descs(mem, table: int, entries: Iterable[Sequence[int]], first: int = 0) -> None:
    """Write consecutive descriptors from index ``first``; each entry is
    ``(addr, len)``, ``(addr, len, flags)`` or ``(addr, len, flags, next)``."""
    raw = b"".join(pack_desc(*e) for e in entries)
    if raw:
        mem.write(table + DESC_SIZE * first, raw)


def read_desc(mem, table: int, index: int) -> tuple[int, int, int, int]:
    """``(addr, len, flags, next)`` of descriptor ``index`` of the table at ``table``."""
    return unpack_desc(mem.read(table + DESC_SIZE * index, DESC_SIZE))


# ---- available ring (written by the driver) --------------------------------------------

def write_avail_flags(mem, avail: int, flags: int) -> None:
    """Set ``avail->flags`` (e.g. ``VIRTQ_AVAIL_F_NO_INTERRUPT``)."""
    mem.write(avail, _U16.pack(flags & _M16))


def write_avail_idx(mem, avail: int, idx: int) -> None:
    """Set ``avail->idx`` to any value (taken mod 2**16)."""
    mem.write(avail + 2, _U16.pack(idx & _M16))


def read_avail_idx(mem, avail: int) -> int:
    """``avail->idx``."""
    return _U16.unpack(mem.read(avail + 2, 2))[0]


def write_avail_entry(mem, avail: int, size: int, position: int, head: int) -> None:
    """Put ``head`` (any 16-bit value) in slot ``position % size`` of the avail ring."""
    mem.write(avail + 4 + 2 * (position % size), _U16.pack(head & _M16))


def offer(mem, avail: int, size: int, heads: Iterable[int], start: int | None = None,
          publish: bool = True) -> int:
    """Offer ``heads`` in consecutive avail slots from index ``start`` (default: the
    current ``avail->idx``), then (if ``publish``) set ``avail->idx`` past them.

    Returns the new index (mod 2**16). No head is checked: offering a head twice, or
    one >= ``size``, is how tests play a hostile guest."""
    idx = read_avail_idx(mem, avail) if start is None else start
    for head in heads:
        write_avail_entry(mem, avail, size, idx, head)
        idx = (idx + 1) & _M16
    if publish:
        write_avail_idx(mem, avail, idx)
    return idx


def write_used_event(mem, avail: int, size: int, value: int) -> None:
    """Set ``used_event`` (the field after the avail ring; EVENT_IDX)."""
    mem.write(avail + 4 + 2 * size, _U16.pack(value & _M16))


# ---- used ring (written by the device) -------------------------------------------------

def write_used_flags(mem, used: int, flags: int) -> None:
    """Set ``used->flags`` (e.g. ``VIRTQ_USED_F_NO_NOTIFY``)."""
    mem.write(used, _U16.pack(flags & _M16))


def write_used_idx(mem, used: int, idx: int) -> None:
    """Set ``used->idx`` to any value (taken mod 2**16)."""
    mem.write(used + 2, _U16.pack(idx & _M16))


def read_used_idx(mem, used: int) -> int:
    """``used->idx``."""
    return _U16.unpack(mem.read(used + 2, 2))[0]


def write_used_elem(mem, used: int, size: int, position: int, id: int, length: int) -> None:
    """Write the used element in slot ``position % size``: any ``id`` and ``len``."""
    mem.write(used + 4 + 8 * (position % size), _USED_ELEM.pack(id & _M32, length & _M32))


def read_used_elem(mem, used: int, size: int, position: int) -> tuple[int, int]:
    """``(id, len)`` of the used element in slot ``position % size``."""
    return _USED_ELEM.unpack(mem.read(used + 4 + 8 * (position % size), 8))


def read_avail_event(mem, used: int, size: int) -> int:
    """``avail_event`` (the field after the used ring; EVENT_IDX)."""
    return _U16.unpack(mem.read(used + 4 + 8 * size, 2))[0]


def complete(mem, used: int, size: int, elems: Iterable[tuple[int, int]],
             start: int | None = None, publish: bool = True) -> int:
    """Play a device: write ``(id, len)`` used elements from index ``start`` (default:
    the current ``used->idx``), then (if ``publish``) set ``used->idx`` past them.
    Returns the new index (mod 2**16)."""
    idx = read_used_idx(mem, used) if start is None else start
    for id_, length in elems:
        write_used_elem(mem, used, size, idx, id_, length)
        idx = (idx + 1) & _M16
    if publish:
        write_used_idx(mem, used, idx)
    return idx
