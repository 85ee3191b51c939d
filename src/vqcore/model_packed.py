"""A pure-Python reference model of the packed virtqueue (VIRTIO 1.2 section 2.8).

The packed counterpart of :mod:`vqcore.model`, and like it the **oracle of the tests**
and the **baseline of the benchmarks**: the same API as the engine's
:class:`vqcore.PackedDeviceQueue` / :class:`vqcore.PackedDriverQueue` (constructor
signatures, return values, exception classes with the same ``code``/``index``/``addr``/
``length``, broken-queue semantics), and for the same sequence of operations the same
bytes in guest memory. It is written for clarity, straight from the spec: every ring
field goes through :meth:`GuestMemory.read` / :meth:`GuestMemory.write` with
:mod:`struct`, the bookkeeping is lists and dicts.

The ring (queue size ``N``, any number 1..32768; all little-endian)::

    descriptor ring   N * { le64 addr; le32 len; le16 id; le16 flags; }   16-aligned
    driver area       le16 off_wrap; le16 flags;    (driver event suppression) 4-aligned
    device area       le16 off_wrap; le16 flags;    (device event suppression) 4-aligned

How it works (section 2.8):

* Each side keeps a ring wrap counter, 1 at the start, flipped each time its position
  passes the end of the ring. A descriptor is *available* when its AVAIL bit equals the
  driver's wrap counter and its USED bit does not; *used* when both equal the device's.
* The driver writes a buffer as consecutive descriptors linked by NEXT (wrapping at the
  end of the ring), each with AVAIL/USED set for the wrap counter of its own slot and
  the buffer id in every descriptor (the device takes it from the last one). The first
  descriptor's flags are written last, so the device never sees half a chain; a batch of
  chains is made visible the same way (its first head last). With an indirect table,
  one ring descriptor (INDIRECT) points at a table of descriptors used in order (their
  NEXT and id are ignored).
* The device writes one used descriptor per buffer (id, written length, WRITE when that
  length is not zero, AVAIL = USED = its wrap counter) at its next used position, which
  then skips as many slots as that buffer took; in a batch the first one's flags go last.
* Event suppression: each side writes its wishes (ENABLE, DISABLE, or DESC with a ring
  offset and wrap counter) into its own area; the other side reads them after publishing.

The engine's choices the model shares, so the memory images match byte for byte: buffer
ids come from a stack (0 first; a reclaimed id goes back on top); the indirect table of
buffer id ``i`` lives at ``indirect_addr + i * indirect_max * 16``; ``enable_*`` with
event idx writes DESC with the own position, without it ENABLE; ``disable_*`` writes
DISABLE; the driver's reset zeroes the descriptor ring and both event areas. Indices read
or set through ``next_avail``/``next_used``/``last_used`` carry the wrap counter in bit
15 (vhost-user's GET/SET_VRING_BASE form).

The hostile-guest checks are those of the split ring (:mod:`vqcore.model`) plus one of
the packed ring: a chain whose NEXT runs into a descriptor that is not available for its
slot's wrap counter (:class:`DescriptorNotAvailable`).
"""

from __future__ import annotations

import struct
from collections import namedtuple

import numpy as np

from vqcore import model as _model
from vqcore.errors import *  # noqa: F401,F403  (the same exception names as vqcore)
from vqcore.errors import __all__ as _errors_all
from vqcore.errors import (AddressOutOfBounds, AddressOverflow, BatchTooSmall, ChainLengthOverflow,
                           ChainTooLong, DescriptorNotAvailable, HeadInUse, InvalidChain,
                           InvalidHeadIndex, InvalidUsedId, InvalidUsedLength, LayoutError,
                           NestedIndirectDescriptor, NotInFlight, RingViolation,
                           WritableBeforeReadable)
from vqcore.memory import GuestMemory
from vqcore.model import Chain, ChainBatch, need_event
from vqcore.packed import (DESC_ALIGN, EVENT_ALIGN, MAX_QUEUE_SIZE, RING_EVENT_FLAGS_DESC,
                           RING_EVENT_FLAGS_DISABLE, RING_EVENT_FLAGS_ENABLE, VIRTQ_DESC_F_AVAIL,
                           VIRTQ_DESC_F_USED)
from vqcore.split import VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE
from vqcore.status import Status

# ---- constants of the spec (section 2.8): the engine's (its C headers), imported above

_U16 = 0xFFFF
_U32 = 0xFFFFFFFF

# pvirtq_desc: addr, len, id, flags; its used form (len, id) at offset 8; a le16 field
_PDESC = struct.Struct("<QIHH")
_LEN_ID = struct.Struct("<IH")
_LE16 = struct.Struct("<H")
_EVENT = struct.Struct("<HH")          # pvirtq_event_suppress: off_wrap, flags


# ---- layout -------------------------------------------------------------------------------

PackedLayout = namedtuple("PackedLayout", "size desc_size event_size")
PackedLayout.__doc__ = "Byte sizes of a packed ring's descriptor ring and event areas."

PackedAddresses = namedtuple("PackedAddresses", "desc driver device end")
PackedAddresses.__doc__ = "Guest addresses of a packed ring laid out in one area."


def check_packed_size(size):
    """Raise :class:`LayoutError` unless ``size`` is in 1..32768 (no power of two needed)."""
    if not isinstance(size, int) or not 1 <= size <= MAX_QUEUE_SIZE:
        raise LayoutError(f"packed queue size {size!r} is not in 1..{MAX_QUEUE_SIZE}")


def packed_layout(size):
    """Sizes of the descriptor ring (16 bytes a slot) and of each event area (4)."""
    check_packed_size(size)
    return PackedLayout(size, 16 * size, 4)


def packed_addresses(base, size):
    """Lay a packed ring out from ``base``: descriptors, driver area, device area."""
    lay = packed_layout(size)
    if base % DESC_ALIGN:
        raise LayoutError(f"base {base:#x} is not 16-byte aligned")
    driver = base + lay.desc_size
    device = driver + lay.event_size
    return PackedAddresses(base, driver, device, device + lay.event_size)


# ---- the flag rules (sections 2.8.1, 2.8.10) ----------------------------------------------

def avail_bits(wrap):
    """AVAIL/USED bits of a descriptor the driver makes available with wrap counter ``wrap``."""
    return VIRTQ_DESC_F_AVAIL if wrap else VIRTQ_DESC_F_USED


def used_bits(wrap):
    """AVAIL/USED bits of a descriptor the device marks used with wrap counter ``wrap``."""
    return VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED if wrap else 0


def is_avail(flags, wrap):
    """AVAIL matches the wrap counter and USED does not."""
    return bool(flags & VIRTQ_DESC_F_AVAIL) == bool(wrap) != bool(flags & VIRTQ_DESC_F_USED)


def is_used(flags, wrap):
    """AVAIL and USED both match the wrap counter."""
    return bool(flags & VIRTQ_DESC_F_AVAIL) == bool(wrap) == bool(flags & VIRTQ_DESC_F_USED)


def packed_need_event(off_wrap, new, old, wrap, size):
    """Did the position moving from ``old`` to ``new`` (wrap counter now ``wrap``) pass
    the event ``off_wrap`` (offset in bits 0-14, wrap counter in bit 15)? An event of the
    other wrap counter lies one ring length back; ``old`` is given on the same scale."""
    event = off_wrap & 0x7FFF
    if off_wrap >> 15 != wrap:
        event -= size
    return need_event(event & _U16, new & _U16, old & _U16)


def _advance(pos, wrap, n, size):
    """Position ``n`` slots after ``pos``, and the wrap counter there."""
    pos += n
    if pos >= size:
        pos -= size
        wrap ^= 1
    return pos, wrap


# ---- what both sides share -------------------------------------------------------------------

class _PackedRing:
    """The descriptor ring and the two event areas in guest memory, field access, and
    the error handling of the split model (the same rules for a violation)."""

    _kind = "packed"

    # one behaviour for both layouts: mark broken, raise, count, log the first one once
    _violation = _model._SplitRing._violation
    _fail = _model._SplitRing._fail
    _check_not_broken = _model._SplitRing._check_not_broken
    error = _model._SplitRing.error
    broken = _model._SplitRing.broken

    def __init__(self, memory, size, desc_addr, driver_addr, device_addr, event_idx, name):
        if not isinstance(memory, GuestMemory):
            raise TypeError("memory must be a vqcore.GuestMemory")
        size = _model._uint(size, 32, "size")
        desc_addr = _model._uint(desc_addr, 64, "desc_addr")
        driver_addr = _model._uint(driver_addr, 64, "driver_addr")
        device_addr = _model._uint(device_addr, 64, "device_addr")
        check_packed_size(size)
        for what, addr, align in (("descriptor ring", desc_addr, DESC_ALIGN),
                                  ("driver area", driver_addr, EVENT_ALIGN),
                                  ("device area", device_addr, EVENT_ALIGN)):
            if addr % align:
                raise LayoutError(f"{what} address {addr:#x} is not {align}-byte aligned")
        _model._check_ring_in_memory(memory, desc_addr, 16 * size, "descriptor ring")
        _model._check_ring_in_memory(memory, driver_addr, 4, "driver area")
        _model._check_ring_in_memory(memory, device_addr, 4, "device area")
        self.memory = memory
        self.size = size
        # the engine's attribute names (shared with the split ring): avail_addr is the
        # driver area, used_addr the device area
        self.desc_addr, self.avail_addr, self.used_addr = desc_addr, driver_addr, device_addr
        self.name = name or f"{self._kind}[{size}]"
        self.violations = 0
        self._event_idx = bool(event_idx)
        self._error = None
        self._broken = False

    @property
    def event_idx(self):
        """Whether VIRTIO_F_EVENT_IDX (RING_EVENT_FLAGS_DESC) is in use."""
        return self._event_idx

    # ---- ring fields -------------------------------------------------------------------------

    def _desc(self, slot):
        return self.desc_addr + 16 * slot

    def _read_desc(self, slot):
        """``(addr, len, id, flags)`` of ring slot ``slot``."""
        return _PDESC.unpack(self.memory.read(self._desc(slot), 16))

    def _read_flags(self, slot):
        return _LE16.unpack(self.memory.read(self._desc(slot) + 14, 2))[0]

    def _write_flags(self, slot, flags):
        self.memory.write(self._desc(slot) + 14, _LE16.pack(flags))

    def _read_event(self, area):
        """``(off_wrap, flags)`` of an event suppression area."""
        return _EVENT.unpack(self.memory.read(area, 4))

    def _write_event_flags(self, area, flags):
        self.memory.write(area + 2, _LE16.pack(flags))

    def _write_event(self, area, off, wrap, flags):
        self.memory.write(area, _EVENT.pack(off | wrap << 15, flags))


# ---- device side ------------------------------------------------------------------------------

class PackedDeviceQueue(_PackedRing):
    """The device side of a packed virtqueue (the model).

    ``PackedDeviceQueue(memory, size, desc_addr, driver_addr, device_addr, event_idx=False)``
    """

    _kind = "packed-device"

    def __init__(self, memory, size, desc_addr, driver_addr, device_addr, *, event_idx=False,
                 name=""):
        super().__init__(memory, size, desc_addr, driver_addr, device_addr, event_idx, name)
        self.reset()

    def reset(self):
        """Back to the initial state: position 0, wrap counters 1, nothing in flight."""
        self._in_flight = {}              # buffer id -> ring slots its chain took
        self._next_avail, self._avail_wrap = 0, 1
        self._next_used, self._used_wrap = 0, 1
        self._signalled = None            # (next_used, wrap) at the last notification decision
        self._broken = False
        self._error = None

    # ---- pop (section 2.8.6 seen from the device) ------------------------------------------

    def pop(self, batch):
        """Pop up to ``batch.max_chains`` available chains into ``batch``; returns how
        many. A guest violation raises (the queue is then broken); the chains popped
        before the bad one stay in the batch."""
        if not isinstance(batch, ChainBatch):
            raise TypeError("batch must be a vqcore.model.ChainBatch")
        batch.clear()
        self._check_not_broken()
        regions = _model._Regions(self.memory)
        batch._memory = self.memory
        try:
            while batch.count < batch.max_chains:
                pos, wrap = self._next_avail, self._avail_wrap
                flags = self._read_flags(pos)
                if not is_avail(flags, wrap):
                    break                # the driver has not made this slot available
                try:
                    buffer_id, chain = self._walk_chain(pos, flags, wrap, batch, regions)
                except BatchTooSmall:
                    if batch.count:
                        break            # no room left for this chain: the next pop takes it
                    raise
                if buffer_id >= self.size:
                    self._fail(InvalidHeadIndex, f"chain at slot {pos} has buffer id {buffer_id}",
                               code=Status.HEAD_INDEX, index=pos, addr=buffer_id, length=self.size)
                if buffer_id in self._in_flight:
                    self._fail(HeadInUse, f"buffer id {buffer_id} offered again while in flight",
                               code=Status.HEAD_IN_USE, index=buffer_id)
                _model.SplitDeviceQueue._commit(batch, buffer_id, chain)
                ndesc = chain[-1]
                self._in_flight[buffer_id] = ndesc
                self._next_avail, self._avail_wrap = _advance(pos, wrap, ndesc, self.size)
        except RingViolation:
            self._broken = True
            raise
        return batch.count

    # the checks of an INDIRECT descriptor are the split ring's (section 2.7.5.3)
    _indirect_table = _model.SplitDeviceQueue._indirect_table

    def _walk_chain(self, pos, flags, wrap, batch, regions):
        """Follow the chain that starts at slot ``pos`` (its flags already read): NEXT to
        the following slot, or one INDIRECT table at the end. Returns the buffer id (in
        the last ring descriptor) and the chain's segments and totals."""
        size = self.size
        ttl = size                       # descriptors the chain may still take
        slot = pos
        ring_descs = 0
        writing = False
        segments = []                    # (gpa, host, length, writable)
        totals = {"nread": 0, "rbytes": 0, "wbytes": 0}
        room = batch.max_segments - batch.num_segments

        def buffer(index, addr, length, flags):
            """One descriptor's buffer: order rule, bounds, segments."""
            nonlocal writing
            writable = bool(flags & VIRTQ_DESC_F_WRITE)
            if writing and not writable:
                self._fail(WritableBeforeReadable, f"descriptor {index}: readable after writable",
                           code=Status.WRITE_ORDER, index=index, addr=addr, length=length)
            writing = writing or writable
            if not length:
                return                   # no segment, but it counted for the order rule
            pieces = regions.pieces(addr, length, room - len(segments))
            if pieces == Status.BATCH_TOO_SMALL:
                self._fail(BatchTooSmall, f"chain at slot {pos} needs more segments",
                           code=Status.BATCH_TOO_SMALL, index=pos, addr=addr,
                           length=batch.max_segments)
            if pieces == Status.ADDR_OVERFLOW:
                self._fail(AddressOverflow, f"descriptor {index}: {addr:#x}+{length} overflows",
                           code=Status.ADDR_OVERFLOW, index=index, addr=addr, length=length)
            if pieces == Status.OUT_OF_BOUNDS:
                self._fail(AddressOutOfBounds, f"descriptor {index}: {addr:#x}+{length} "
                           "is outside guest memory",
                           code=Status.OUT_OF_BOUNDS, index=index, addr=addr, length=length)
            segments.extend((gpa, host, n, writable) for gpa, host, n in pieces)
            if writable:
                totals["wbytes"] += length
            else:
                totals["nread"] += len(pieces)
                totals["rbytes"] += length

        while True:
            addr, length, buffer_id, _ = self._read_desc(slot)
            ring_descs += 1
            if flags & VIRTQ_DESC_F_INDIRECT:
                table, entries = self._indirect_table(slot, addr, length, flags, regions)
                for i in range(entries):             # used in order; NEXT and id ignored
                    e_addr, e_len, _, e_flags = _PDESC.unpack(self.memory.read(table + 16 * i, 16))
                    if e_flags & VIRTQ_DESC_F_INDIRECT:
                        self._fail(NestedIndirectDescriptor, f"indirect entry {i} is INDIRECT",
                                   code=Status.INDIRECT_NESTED, index=i, addr=e_addr, length=e_len)
                    buffer(i, e_addr, e_len, e_flags)
                break                    # an indirect descriptor ends the chain
            buffer(slot, addr, length, flags)
            if not flags & VIRTQ_DESC_F_NEXT:
                break
            ttl -= 1
            if ttl == 0:
                self._fail(ChainTooLong, f"chain at slot {pos} is longer than {size}",
                           code=Status.CHAIN_TOO_LONG, index=pos, addr=0, length=size)
            slot, wrap = _advance(slot, wrap, 1, size)
            flags = self._read_flags(slot)
            if not is_avail(flags, wrap):
                self._fail(DescriptorNotAvailable, f"chain at slot {pos} runs into slot {slot}, "
                           f"flags {flags:#x} not available", code=Status.DESC_NOT_AVAIL,
                           index=slot, addr=pos, length=flags)
        if totals["rbytes"] > _U32 or totals["wbytes"] > _U32:
            self._fail(ChainLengthOverflow, f"chain at slot {pos} is longer than 2**32-1",
                       code=Status.CHAIN_LEN_OVERFLOW, index=pos, addr=0,
                       length=max(totals["rbytes"], totals["wbytes"]))
        return buffer_id, (segments, totals["nread"], totals["rbytes"], totals["wbytes"],
                           ring_descs)

    # ---- push (section 2.8.7 seen from the device) -----------------------------------------

    def push_used(self, batch, count=None):
        """Return the first ``count`` (default all) chains of ``batch`` with
        ``batch.used_len`` as the written length, made visible at once."""
        if not isinstance(batch, ChainBatch):
            raise TypeError("batch must be a vqcore.model.ChainBatch")
        n = batch.count if count is None else _model._uint(count, 32, "count")
        if n > batch.count:
            raise ValueError(f"count {n} exceeds the batch's {batch.count} chains")
        self._push(batch.heads[:n].tolist(), batch.used_len[:n].tolist())

    def push(self, heads, lengths):
        """Return chains by buffer id with their written lengths (array-likes)."""
        h = np.ascontiguousarray(heads, np.uint16)
        ln = np.ascontiguousarray(lengths, np.uint32)
        if h.shape != ln.shape or h.ndim != 1:
            raise ValueError("heads and lengths must be 1-d arrays of one length")
        self._push(h.tolist(), ln.tolist())

    def _push(self, ids, lengths):
        returned = set()
        for buffer_id in ids:
            if buffer_id not in self._in_flight or buffer_id in returned:
                self._fail(NotInFlight, f"buffer id {buffer_id} is not in flight",
                           code=Status.NOT_IN_FLIGHT, index=buffer_id)
            returned.add(buffer_id)
        pos, wrap = self._next_used, self._used_wrap
        first = None
        for buffer_id, length in zip(ids, lengths):
            flags = used_bits(wrap) | (VIRTQ_DESC_F_WRITE if length else 0)
            self.memory.write(self._desc(pos) + 8, _LEN_ID.pack(length, buffer_id))
            if first is None:
                first = (pos, flags)     # its flags go last: the batch appears at once
            else:
                self._write_flags(pos, flags)
            pos, wrap = _advance(pos, wrap, self._in_flight.pop(buffer_id), self.size)
        if first is not None:
            self._write_flags(*first)
        self._next_used, self._used_wrap = pos, wrap

    # ---- notifications (section 2.8.10) ------------------------------------------------------

    def needs_notification(self):
        """After pushing: should the driver be interrupted? (its driver area)"""
        new = (self._next_used, self._used_wrap)
        last, self._signalled = self._signalled, new
        if last == new:
            return False                 # nothing used since the last decision
        off_wrap, flags = self._read_event(self.avail_addr)
        if flags == RING_EVENT_FLAGS_DISABLE:
            return False
        if flags != RING_EVENT_FLAGS_DESC or not self._event_idx or last is None:
            return True                  # ENABLE (or reserved values), or the first decision
        old, old_wrap = last
        if old_wrap != self._used_wrap:
            old -= self.size             # the last decision was one lap back
        return packed_need_event(off_wrap, self._next_used, old, self._used_wrap, self.size)

    def enable_notification(self):
        """Ask for kicks again (ENABLE, or DESC at our next position); True when a chain
        is already available."""
        if self._event_idx:
            self._write_event(self.used_addr, self._next_avail, self._avail_wrap,
                              RING_EVENT_FLAGS_DESC)
        else:
            self._write_event_flags(self.used_addr, RING_EVENT_FLAGS_ENABLE)
        return self.pending() == 1

    def enable_notification_more(self):
        """Ask for a kick at any further available chain (ENABLE); always armed."""
        self._write_event_flags(self.used_addr, RING_EVENT_FLAGS_ENABLE)
        return True

    def enable_notification_after(self, n):
        """Ask for a kick only once the slot ``n``-1 past ours is available (DESC; no
        event idx: DISABLE); True when it already is."""
        n = min(_model._uint(n, 32, "n"), self.size)
        if n <= 1:
            return self.enable_notification()
        pos, wrap = self._next_avail + n - 1, self._avail_wrap
        if pos >= self.size:
            pos, wrap = pos - self.size, wrap ^ 1
        if self._event_idx:
            self._write_event(self.used_addr, pos, wrap, RING_EVENT_FLAGS_DESC)
        else:
            self._write_event_flags(self.used_addr, RING_EVENT_FLAGS_DISABLE)
        return is_avail(self._read_flags(pos), wrap)

    def disable_notification(self):
        """Ask the driver not to kick (DISABLE)."""
        self._write_event_flags(self.used_addr, RING_EVENT_FLAGS_DISABLE)

    def pending(self):
        """1 when the next slot holds an available chain, else 0."""
        return int(is_avail(self._read_flags(self._next_avail), self._avail_wrap))

    # ---- state ---------------------------------------------------------------------------------

    def _check_index(self, value, what):
        value = _model._uint(value, 32, what)
        if value > _U16 or (value & 0x7FFF) >= self.size:
            raise ValueError(f"{what} {value:#x}: index (bits 0-14) must be below {self.size}, "
                             f"wrap counter in bit 15")
        return value & 0x7FFF, value >> 15

    @property
    def next_avail(self):
        """Next slot to look at, with the avail wrap counter in bit 15."""
        return self._next_avail | self._avail_wrap << 15

    @next_avail.setter
    def next_avail(self, value):
        self._next_avail, self._avail_wrap = self._check_index(value, "next_avail")
        self._signalled = None

    @property
    def next_used(self):
        """Next slot to write a used descriptor to, with the used wrap counter in bit 15."""
        return self._next_used | self._used_wrap << 15

    @next_used.setter
    def next_used(self, value):
        self._next_used, self._used_wrap = self._check_index(value, "next_used")
        self._signalled = None

    @property
    def in_flight(self):
        """Chains popped and not yet pushed."""
        return len(self._in_flight)

    def __repr__(self):
        return (f"<model_packed.PackedDeviceQueue {self.name} size={self.size} "
                f"next_avail={self.next_avail:#x} next_used={self.next_used:#x}"
                f"{' BROKEN' if self._broken else ''}>")


# ---- driver side ------------------------------------------------------------------------------

class PackedDriverQueue(_PackedRing):
    """The driver side of a packed virtqueue (the model).

    ``indirect_addr``/``indirect_max``: a guest-memory area of
    ``size * indirect_max * 16`` bytes for indirect tables (one table per buffer id).
    """

    _kind = "packed-driver"

    def __init__(self, memory, size, desc_addr, driver_addr, device_addr, *, event_idx=False,
                 indirect_addr=None, indirect_max=0, name=""):
        super().__init__(memory, size, desc_addr, driver_addr, device_addr, event_idx, name)
        indirect_max = _model._uint(indirect_max, 32, "indirect_max")
        self._indirect_addr, self._indirect_max = None, 0
        if indirect_addr is not None:
            if indirect_max < 1 or indirect_max > self.size:
                raise LayoutError(f"indirect_max must be 1..{self.size}")
            if indirect_addr % DESC_ALIGN:
                raise LayoutError(f"indirect area {indirect_addr:#x} is not 16-byte aligned")
            _model._check_ring_in_memory(memory, indirect_addr, self.size * indirect_max * 16,
                                         "indirect area")
            self._indirect_addr, self._indirect_max = indirect_addr, indirect_max
        self.reset()

    def reset(self):
        """Back to the initial state: every slot and id free, wrap counters 1. Zeroes the
        descriptor ring and both event areas, as a driver does at setup."""
        self._free_ids = list(range(self.size - 1, -1, -1))   # a stack: 0 on top
        self._chains = {}                 # buffer id -> (slots, writable bytes, token)
        self._num_free = self.size        # free ring slots
        self._next_avail, self._avail_wrap = 0, 1
        self._next_used, self._used_wrap = 0, 1
        self._kicked = (0, 1)             # (next_avail, wrap) at the last kick decision
        self._broken = False
        self._error = None
        self.memory.write(self.desc_addr, bytes(16 * self.size))
        self.memory.write(self.avail_addr, bytes(4))
        self.memory.write(self.used_addr, bytes(4))

    # ---- add (section 2.8.13) ------------------------------------------------------------------

    def add(self, batch, *, indirect=False, publish=True, start=0):
        """Make the chains of ``batch`` (from chain ``start`` on) available; returns how
        many were added (stops early when slots or ids run out). Each chain's head flags
        are written after its other descriptors, the batch's first head last of all;
        ``publish`` changes nothing (a packed ring has no index to publish)."""
        if not isinstance(batch, ChainBatch):
            raise TypeError("batch must be a vqcore.model.ChainBatch")
        start = _model._uint(start, 32, "start")
        if start > batch.count:
            raise ValueError("start beyond the batch")
        self._check_not_broken()
        if indirect and self._indirect_addr is None:
            self._fail(InvalidChain, f"indirect chains need an indirect area (chain {start})",
                       code=Status.NO_INDIRECT, index=start)
        first_head = None                # (slot, flags) of the batch's first head
        c = start
        while c < batch.count:
            segments = batch.chain(c).segments
            nseg = len(segments)
            limit = self._indirect_max if indirect else self.size
            if nseg == 0 or nseg > limit:
                if c == start:
                    self._fail(InvalidChain, f"chain {c} given to add() is invalid "
                               f"({nseg} segments)", code=Status.BAD_CHAIN, index=c, length=nseg)
                break                    # add what fits; the next call reports it
            need = 1 if indirect else nseg
            if self._num_free < need or not self._free_ids:
                break
            buffer_id = self._free_ids.pop()
            head = self._next_avail
            pos, wrap = self._next_avail, self._avail_wrap
            if indirect:
                table = self._indirect_addr + buffer_id * self._indirect_max * 16
                self.memory.write(table, b"".join(
                    _PDESC.pack(gpa, length, 0, VIRTQ_DESC_F_WRITE if writable else 0)
                    for gpa, length, writable in segments))
                self.memory.write(self._desc(pos), struct.pack("<QIH", table, 16 * nseg,
                                                               buffer_id))
                head_flags = VIRTQ_DESC_F_INDIRECT | avail_bits(wrap)
                pos, wrap = _advance(pos, wrap, 1, self.size)
            else:
                for k, (gpa, length, writable) in enumerate(segments):
                    flags = (avail_bits(wrap) | (VIRTQ_DESC_F_WRITE if writable else 0)
                             | (VIRTQ_DESC_F_NEXT if k + 1 < nseg else 0))
                    self.memory.write(self._desc(pos), struct.pack("<QIH", gpa, length,
                                                                   buffer_id))
                    if k == 0:
                        head_flags = flags   # written once the whole chain is in place
                    else:
                        self._write_flags(pos, flags)
                    pos, wrap = _advance(pos, wrap, 1, self.size)
            if first_head is None:
                first_head = (head, head_flags)
            else:
                self._write_flags(head, head_flags)
            self._chains[buffer_id] = (need, int(batch._wbytes[c]), int(batch._token[c]))
            self._num_free -= need
            self._next_avail, self._avail_wrap = pos, wrap
            c += 1
        if first_head is not None:
            self._write_flags(*first_head)
        return c - start

    def publish(self):
        """Nothing to do: every add is visible when it returns."""

    def kick_needed(self):
        """Must the device be notified of what was made available since the last call?"""
        new = (self._next_avail, self._avail_wrap)
        last, self._kicked = self._kicked, new
        if last == new:
            return False
        off_wrap, flags = self._read_event(self.used_addr)
        if flags == RING_EVENT_FLAGS_DISABLE:
            return False
        if flags != RING_EVENT_FLAGS_DESC or not self._event_idx:
            return True
        old, old_wrap = last
        if old_wrap != self._avail_wrap:
            old -= self.size
        return packed_need_event(off_wrap, self._next_avail, old, self._avail_wrap, self.size)

    # ---- reclaim (section 2.8.14) --------------------------------------------------------------

    def reclaim(self, batch):
        """Collect up to ``batch.max_chains`` used chains into ``batch`` (``heads``,
        ``tokens``, ``used_len``); returns how many. A device violation raises (the
        queue is then broken) after the chains before it were reclaimed."""
        if not isinstance(batch, ChainBatch):
            raise TypeError("batch must be a vqcore.model.ChainBatch")
        batch.clear()
        self._check_not_broken()
        pos, wrap = self._next_used, self._used_wrap
        bad = None
        k = 0
        while k < batch.max_chains:
            _, length, buffer_id, flags = self._read_desc(pos)
            if not is_used(flags, wrap):
                break
            if buffer_id not in self._chains:
                bad = (InvalidUsedId, f"used descriptor at slot {pos} names id {buffer_id}, "
                       "not in flight", dict(code=Status.USED_ID, index=pos, addr=buffer_id,
                                             length=self.size))
                break
            if not flags & VIRTQ_DESC_F_WRITE:
                length = 0               # the length is reserved without WRITE
            slots, wbytes, token = self._chains[buffer_id]
            if length > wbytes:
                bad = (InvalidUsedLength, f"buffer id {buffer_id}: used length {length} > {wbytes}",
                       dict(code=Status.USED_LEN, index=buffer_id, addr=length, length=wbytes))
                break
            del self._chains[buffer_id]
            self._free_ids.append(buffer_id)
            self._num_free += slots
            batch._head[k] = buffer_id
            batch._token[k] = token
            batch._used_len[k] = length
            batch._seg_start[k + 1] = 0
            pos, wrap = _advance(pos, wrap, slots, self.size)
            k += 1
        batch._count = k
        self._next_used, self._used_wrap = pos, wrap
        if bad is not None:
            cls, message, detail = bad
            self._violation(cls, message, **detail)
        return k

    # ---- interrupt suppression (section 2.8.10) --------------------------------------------------

    def disable_interrupts(self):
        """Ask the device not to interrupt (DISABLE)."""
        self._write_event_flags(self.avail_addr, RING_EVENT_FLAGS_DISABLE)

    def enable_interrupts(self):
        """Ask the device to interrupt again (ENABLE, or DESC at our next used position);
        True when a used chain already waits."""
        if self._event_idx:
            self._write_event(self.avail_addr, self._next_used, self._used_wrap,
                              RING_EVENT_FLAGS_DESC)
        else:
            self._write_event_flags(self.avail_addr, RING_EVENT_FLAGS_ENABLE)
        return is_used(self._read_flags(self._next_used), self._used_wrap)

    # ---- state ---------------------------------------------------------------------------------

    @property
    def num_free(self):
        """Free ring slots."""
        return self._num_free

    @property
    def in_flight(self):
        """Chains added and not yet reclaimed."""
        return len(self._chains)

    @property
    def next_avail(self):
        """Next slot this driver fills, with its wrap counter in bit 15."""
        return self._next_avail | self._avail_wrap << 15

    @property
    def last_used(self):
        """Next slot this driver reads a used descriptor from, with its wrap counter in
        bit 15."""
        return self._next_used | self._used_wrap << 15

    @property
    def indirect_max(self):
        """Entries per indirect table (0: no indirect area)."""
        return self._indirect_max

    def __repr__(self):
        return (f"<model_packed.PackedDriverQueue {self.name} size={self.size} "
                f"free={self._num_free} next_avail={self.next_avail:#x} "
                f"last_used={self.last_used:#x}>")


__all__ = ["GuestMemory", "ChainBatch", "Chain", "PackedDeviceQueue", "PackedDriverQueue",
           "PackedLayout", "PackedAddresses", "packed_layout", "packed_addresses",
           "check_packed_size", "packed_need_event", "MAX_QUEUE_SIZE", *_errors_all]
