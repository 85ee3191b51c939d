"""A pure-Python reference model of the split virtqueue (VIRTIO 1.2 section 2.7).

This module is the **oracle of the tests** and the **baseline of the benchmarks**: the
differential tests run every operation on the Cython engine and on this model and
demand identical results, exceptions and ring memory images, and the benchmarks report
the engine's speed as a *ratio to the pure-Python model*.

It is written straight from the spec, for clarity rather than speed: every ring field
is read or written with :mod:`struct` through :meth:`GuestMemory.read` /
:meth:`GuestMemory.write`, and the bookkeeping is plain Python lists and dicts. It
exposes the same API as the engine (``vqcore``): :class:`ChainBatch`,
:class:`SplitDeviceQueue`, :class:`SplitDriverQueue`, :func:`split_layout`,
:func:`split_addresses`, :func:`need_event`, with the same constructor signatures,
return values, exception classes (from :mod:`vqcore.errors`, carrying the same
``code``/``index``/``addr``/``length`` details) and broken-queue semantics. The driver
hands out descriptors in the engine's order (free list 0, 1, 2, ...; a chain takes the
front of the free list; a reclaimed chain goes back on the front; the indirect table of
head ``h`` lives at ``indirect_addr + h * indirect_max * 16``), so the same operations
leave byte-identical rings behind.

Differences that are not part of the ring semantics: a model queue does not pin its
:class:`GuestMemory` (the engine forbids changing the region table while a queue is
attached; the model cannot), and nothing here is atomic or ordered (one thread only).

Split ring layout for a queue of ``N`` entries (all little-endian)::

    descriptor table  N * { le64 addr; le32 len; le16 flags; le16 next; }   16-aligned
    available ring    le16 flags; le16 idx; le16 ring[N]; le16 used_event;   2-aligned
    used ring         le16 flags; le16 idx; { le32 id; le32 len; }[N];
                      le16 avail_event;                                         4-aligned
"""

from __future__ import annotations

import logging
import operator
import struct
from collections import namedtuple

import numpy as np

from vqcore.errors import *  # noqa: F401,F403  (the same exception names as vqcore)
from vqcore.errors import __all__ as _errors_all
from vqcore.errors import (AddressOutOfBounds, AddressOverflow, BatchTooSmall, ChainTooLong,
                           ChainLengthOverflow, HeadInUse, IndirectLengthError,
                           IndirectTableNotContiguous, IndirectTableTooLong, IndirectWithNext,
                           InvalidAvailRingIndex, InvalidChain, InvalidDescriptorIndex,
                           InvalidHeadIndex, InvalidUsedId, InvalidUsedLength,
                           InvalidUsedRingIndex, LayoutError, NestedIndirectDescriptor,
                           NotInFlight, QueueBroken, RingViolation, WritableBeforeReadable)
from vqcore.memory import GuestMemory
from vqcore.split import (AVAIL_ALIGN, DESC_ALIGN, MAX_QUEUE_SIZE, USED_ALIGN,
                          VIRTQ_AVAIL_F_NO_INTERRUPT, VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT,
                          VIRTQ_DESC_F_WRITE, VIRTQ_USED_F_NO_NOTIFY)
from vqcore.status import Status

log = logging.getLogger("vqcore.model")

# ---- constants of the spec (section 2.7) ------------------------------------------------
# (their one source is the engine's C headers: the model imports them, with the status
# codes its QueueError.code carries; everything the model computes it computes itself)

_U16 = 0xFFFF
_U32 = 0xFFFFFFFF
_U64 = 0xFFFFFFFFFFFFFFFF

# virtq_desc, virtq_used_elem and a ring index / flags field
_DESC = struct.Struct("<QIHH")
_USED_ELEM = struct.Struct("<II")
_LE16 = struct.Struct("<H")

# ---- layout -------------------------------------------------------------------------------

SplitLayout = namedtuple("SplitLayout", "size desc_size avail_size used_size")
SplitLayout.__doc__ = "Byte sizes of the three parts of a split ring (with event fields)."

SplitAddresses = namedtuple("SplitAddresses", "desc avail used end")
SplitAddresses.__doc__ = "Guest addresses of a split ring laid out in one area."


def check_queue_size(size):
    """Raise :class:`LayoutError` unless ``size`` is a power of two in 1..32768."""
    if not isinstance(size, int) or size < 1 or size > MAX_QUEUE_SIZE or size & (size - 1):
        raise LayoutError(f"queue size {size!r} is not a power of two in 1..{MAX_QUEUE_SIZE}")


def split_layout(size):
    """Sizes of the descriptor table, available ring and used ring (spec 2.7)."""
    check_queue_size(size)
    return SplitLayout(size, 16 * size, 2 + 2 + 2 * size + 2, 2 + 2 + 8 * size + 2)


def _align_up(value, align):
    return (value + align - 1) // align * align


def split_addresses(base, size, align=DESC_ALIGN):
    """Lay the three parts out one after another from ``base`` (16-byte aligned);
    the used ring starts at a multiple of ``align`` (and of 4)."""
    lay = split_layout(size)
    if base % DESC_ALIGN:
        raise LayoutError(f"base {base:#x} is not 16-byte aligned")
    desc = base
    avail = desc + lay.desc_size
    used = _align_up(_align_up(avail + lay.avail_size, align), USED_ALIGN)
    return SplitAddresses(desc, avail, used, used + lay.used_size)


def need_event(event_idx, new_idx, old_idx):
    """The spec's ``vring_need_event`` (section 2.7.10) on 16-bit indices: True when
    ``event_idx`` is one of the indices ``old_idx .. new_idx - 1`` just passed."""
    return (new_idx - event_idx - 1) & _U16 < (new_idx - old_idx) & _U16


def _uint(value, bits, what):
    """``value`` as a C unsigned integer of ``bits`` bits (as Cython converts it)."""
    value = operator.index(value)
    if value < 0 or value >> bits:
        raise OverflowError(f"{what} {value} does not fit an unsigned {bits}-bit integer")
    return value


# ---- guest memory access ------------------------------------------------------------------

class _Regions:
    """A snapshot of the guest memory's region table, for the checks the spec's device
    makes: is a range inside memory, inside one region, and where does it live."""

    def __init__(self, memory):
        self.regions = memory.regions        # sorted by guest-physical address

    def find(self, gpa):
        """The region holding ``gpa``, or None."""
        for r in self.regions:
            if r.gpa <= gpa < r.gpa + r.size:
                return r
        return None

    def inside_one(self, gpa, length):
        """True when ``[gpa, gpa+length)`` lies inside one region."""
        r = self.find(gpa)
        return r is not None and length <= r.size - (gpa - r.gpa)

    def pieces(self, gpa, length, room):
        """Split a buffer into ``(gpa, host_addr, length)`` pieces, one per region it
        crosses. Returns the pieces or the status code of the failure: overflow, out of
        bounds, or more than ``room`` pieces."""
        if length and length - 1 > _U64 - gpa:     # a range may end exactly at 2**64
            return Status.ADDR_OVERFLOW
        out = []
        while length:
            r = self.find(gpa)
            if r is None:
                return Status.OUT_OF_BOUNDS
            if len(out) == room:
                return Status.BATCH_TOO_SMALL
            chunk = min(length, r.size - (gpa - r.gpa))
            out.append((gpa, r.host_addr + (gpa - r.gpa), chunk))
            gpa += chunk
            length -= chunk
        return out


def _check_ring_in_memory(memory, gpa, length, what):
    regions = _Regions(memory)
    if length and length - 1 > _U64 - gpa:
        raise AddressOverflow(f"{what} {gpa:#x} + {length} overflows 64 bits")
    if not regions.inside_one(gpa, length):
        raise AddressOutOfBounds(f"{what} {gpa:#x}+{length} is not inside one guest memory region")


# ---- the batch ----------------------------------------------------------------------------

Chain = namedtuple("Chain", "head segments readable writable token used_len")
Chain.__doc__ = ("One chain of a batch: head id, segments as (gpa, length, writable), "
                 "readable and writable byte totals, token, used length.")


class ChainBatch:
    """A batch of up to ``max_chains`` chains holding up to ``max_segments`` segments.

    The same fields as the engine's batch, as numpy arrays: per chain ``heads``,
    ``seg_start`` (count + 1 entries), ``readable_segments``, ``readable_bytes``,
    ``writable_bytes``, ``used_len``, ``descriptors_used``, ``tokens``; per segment
    ``seg_addr``, ``seg_len``, ``seg_host``. A device pop fills the chain and segment
    fields; a driver reclaim fills ``heads``, ``tokens`` and ``used_len``.
    """

    def __init__(self, max_chains=256, max_segments=None):
        max_chains = _uint(max_chains, 32, "max_chains")
        if max_chains == 0 or max_chains > 65536:
            raise ValueError("max_chains must be 1..65536")
        nseg = max(4 * max_chains, 1024) if max_segments is None else _uint(max_segments, 64,
                                                                            "max_segments")
        if nseg == 0 or nseg > (1 << 24):
            raise ValueError("max_segments must be 1..2**24")
        self._max_chains = max_chains
        self._max_segs = nseg
        self._count = 0
        self._nseg = 0
        self._head = np.zeros(max_chains, np.uint16)
        self._seg_start = np.zeros(max_chains + 1, np.uint32)
        self._nread = np.zeros(max_chains, np.uint32)
        self._rbytes = np.zeros(max_chains, np.uint32)
        self._wbytes = np.zeros(max_chains, np.uint32)
        self._used_len = np.zeros(max_chains, np.uint32)
        self._ndesc = np.zeros(max_chains, np.uint16)
        self._token = np.zeros(max_chains, np.uint64)
        self._seg_gpa = np.zeros(nseg, np.uint64)
        self._iov = np.zeros((nseg, 2), np.uint64)      # (host address, length)
        self._memory = None                               # set by a device pop

    # ---- sizes ----------------------------------------------------------------------

    @property
    def max_chains(self):
        """How many chains the batch can hold."""
        return self._max_chains

    @property
    def max_segments(self):
        """How many segments the batch can hold."""
        return self._max_segs

    @property
    def count(self):
        """Chains now in the batch."""
        return self._count

    @property
    def num_segments(self):
        """Segments now in the batch."""
        return self._nseg

    def __len__(self):
        return self._count

    def clear(self):
        """Empty the batch (the arrays keep their old contents beyond ``count``)."""
        self._count = 0
        self._nseg = 0
        self._seg_start[0] = 0

    # ---- views ----------------------------------------------------------------------

    @property
    def heads(self):
        """uint16 head ids of the chains, shape (count,)."""
        return self._head[:self._count]

    @property
    def used_len(self):
        """uint32 used length per chain (set before push_used; filled by reclaim)."""
        return self._used_len[:self._count]

    @property
    def tokens(self):
        """uint64 token per chain."""
        return self._token[:self._count]

    @property
    def readable_bytes(self):
        """uint32 device-readable bytes per chain."""
        return self._rbytes[:self._count]

    @property
    def writable_bytes(self):
        """uint32 device-writable bytes per chain."""
        return self._wbytes[:self._count]

    @property
    def seg_start(self):
        """uint32 index of each chain's first segment, shape (count + 1,)."""
        return self._seg_start[:self._count + 1]

    @property
    def readable_segments(self):
        """uint32 number of readable segments per chain (they come first)."""
        return self._nread[:self._count]

    @property
    def descriptors_used(self):
        """uint16 ring descriptors each chain took (1 for an indirect chain)."""
        return self._ndesc[:self._count]

    @property
    def seg_addr(self):
        """uint64 guest-physical address of each segment."""
        return self._seg_gpa[:self._nseg]

    @property
    def seg_len(self):
        """uint64 length of each segment."""
        return self._iov[:self._nseg, 1]

    @property
    def seg_host(self):
        """uint64 host address of each segment (device side, after pop)."""
        return self._iov[:self._nseg, 0]

    # ---- per-chain access -------------------------------------------------------------

    def chain(self, i):
        """The i-th chain as a :class:`Chain`."""
        i = operator.index(i)
        if i < 0:
            i += self._count
        if not 0 <= i < self._count:
            raise IndexError("chain index out of range")
        s0, s1 = int(self._seg_start[i]), int(self._seg_start[i + 1])
        nr = int(self._nread[i])
        segs = [(int(self._seg_gpa[s]), int(self._iov[s, 1]), s - s0 >= nr)
                for s in range(s0, s1)]
        return Chain(int(self._head[i]), segs, int(self._rbytes[i]), int(self._wbytes[i]),
                     int(self._token[i]), int(self._used_len[i]))

    def __iter__(self):
        for i in range(self._count):
            yield self.chain(i)

    def chain_bytes(self, i, writable=False):
        """Copy of the readable (or writable) bytes of chain i (a popped batch only)."""
        c = self.chain(i)
        i = operator.index(i)
        s0 = int(self._seg_start[i + self._count if i < 0 else i])
        out = bytearray()
        for k, (gpa, length, w) in enumerate(c.segments):
            if w != bool(writable):
                continue
            if self._iov[s0 + k, 0] == 0 or self._memory is None:
                raise ValueError("segment has no host address: chain_bytes needs a popped batch")
            out += self._memory.read(gpa, length)
        return bytes(out)

    # ---- building a driver batch --------------------------------------------------------

    def append(self, readable=(), writable=(), token=0):
        """Append one chain: ``readable`` and ``writable`` are sequences of
        ``(gpa, length)``; ``token`` comes back from the driver's reclaim."""
        token = _uint(token, 64, "token")
        k = self._count
        n = len(readable) + len(writable)
        if k >= self._max_chains:
            raise BatchTooSmall("batch is full", code=Status.BATCH_TOO_SMALL)
        if self._nseg + n > self._max_segs:
            raise BatchTooSmall("batch has no room for the segments", code=Status.BATCH_TOO_SMALL)
        if n == 0:
            raise InvalidChain("a chain needs at least one segment")
        segs = [(_uint(gpa, 64, "address"), _uint(length, 64, "length"))
                for gpa, length in list(readable) + list(writable)]
        rb = sum(length for _, length in segs[:len(readable)])
        wb = sum(length for _, length in segs[len(readable):])
        if rb > _U32 or wb > _U32:
            raise InvalidChain("chain longer than 2**32-1 bytes")
        s = self._nseg
        for gpa, length in segs:
            self._seg_gpa[s] = gpa
            self._iov[s] = (0, length)
            s += 1
        self._nseg = s
        self._nread[k] = len(readable)
        self._rbytes[k] = rb
        self._wbytes[k] = wb
        self._token[k] = token
        self._head[k] = 0
        self._used_len[k] = 0
        self._seg_start[k + 1] = s
        self._count = k + 1

    def load(self, seg_addr, seg_len, seg_count, readable_count, tokens):
        """Fill the batch at once from arrays: ``seg_addr``/``seg_len`` per segment,
        ``seg_count``/``readable_count``/``tokens`` per chain."""
        addr = np.ascontiguousarray(seg_addr, np.uint64)
        ln = np.ascontiguousarray(seg_len, np.uint64)
        cnt = np.ascontiguousarray(seg_count, np.uint32)
        nrd = np.ascontiguousarray(readable_count, np.uint32)
        tok = np.ascontiguousarray(tokens, np.uint64)
        nchains, nseg = cnt.shape[0], addr.shape[0]
        if ln.shape[0] != nseg or nrd.shape[0] != nchains or tok.shape[0] != nchains:
            raise ValueError("array lengths do not match")
        if int(cnt.sum()) != nseg:
            raise ValueError("seg_count does not add up to the number of segments")
        if nchains > self._max_chains or nseg > self._max_segs:
            raise BatchTooSmall(f"{nchains} chains / {nseg} segments exceed the batch",
                                code=Status.BATCH_TOO_SMALL)
        if any(c == 0 or r > c for c, r in zip(cnt.tolist(), nrd.tolist())):
            raise InvalidChain("each chain needs >= 1 segment and readable_count <= seg_count")
        starts = [0]
        rsum, wsum = [], []
        for c, r in zip(cnt.tolist(), nrd.tolist()):
            s0 = starts[-1]
            rsum.append(sum(ln[s0:s0 + r].tolist()))
            wsum.append(sum(ln[s0 + r:s0 + c].tolist()))
            starts.append(s0 + c)
        if any(v > _U32 for v in rsum + wsum):
            raise InvalidChain("chain longer than 2**32-1 bytes")
        self._seg_gpa[:nseg] = addr
        self._iov[:nseg, 0] = 0
        self._iov[:nseg, 1] = ln
        self._seg_start[:nchains + 1] = starts
        self._nread[:nchains] = nrd
        self._rbytes[:nchains] = rsum
        self._wbytes[:nchains] = wsum
        self._token[:nchains] = tok
        self._head[:nchains] = 0
        self._used_len[:nchains] = 0
        self._count = nchains
        self._nseg = nseg

    def __repr__(self):
        return (f"<model.ChainBatch {self._count}/{self._max_chains} chains, "
                f"{self._nseg}/{self._max_segs} segments>")


# ---- what both sides share -------------------------------------------------------------------

class _SplitRing:
    """The three ring parts in guest memory, field access, and error handling."""

    _kind = "split"

    def __init__(self, memory, size, desc_addr, avail_addr, used_addr, name):
        if not isinstance(memory, GuestMemory):
            raise TypeError("memory must be a vqcore.GuestMemory")
        size = _uint(size, 32, "size")
        desc_addr = _uint(desc_addr, 64, "desc_addr")
        avail_addr = _uint(avail_addr, 64, "avail_addr")
        used_addr = _uint(used_addr, 64, "used_addr")
        check_queue_size(size)
        for what, addr, align in (("descriptor table", desc_addr, DESC_ALIGN),
                                  ("available ring", avail_addr, AVAIL_ALIGN),
                                  ("used ring", used_addr, USED_ALIGN)):
            if addr % align:
                raise LayoutError(f"{what} address {addr:#x} is not {align}-byte aligned")
        lay = split_layout(size)
        _check_ring_in_memory(memory, desc_addr, lay.desc_size, "descriptor table")
        _check_ring_in_memory(memory, avail_addr, lay.avail_size, "available ring")
        _check_ring_in_memory(memory, used_addr, lay.used_size, "used ring")
        self.memory = memory
        self.size = size
        self.desc_addr, self.avail_addr, self.used_addr = desc_addr, avail_addr, used_addr
        self.name = name or f"{self._kind}[{size}]"
        self.violations = 0
        self._error = None
        self._broken = False

    # ---- ring fields (spec 2.7.5, 2.7.6, 2.7.8) -------------------------------------------

    def _read16(self, gpa):
        return _LE16.unpack(self.memory.read(gpa, 2))[0]

    def _write16(self, gpa, value):
        self.memory.write(gpa, _LE16.pack(value & _U16))

    # avail ring: flags, idx, ring[size], used_event
    def _avail_flags_addr(self):
        return self.avail_addr

    def _avail_idx_addr(self):
        return self.avail_addr + 2

    def _avail_ring_addr(self, i):
        return self.avail_addr + 4 + 2 * (i & (self.size - 1))

    def _used_event_addr(self):
        return self.avail_addr + 4 + 2 * self.size

    # used ring: flags, idx, ring[size] of {id, len}, avail_event
    def _used_flags_addr(self):
        return self.used_addr

    def _used_idx_addr(self):
        return self.used_addr + 2

    def _used_elem_addr(self, i):
        return self.used_addr + 4 + 8 * (i & (self.size - 1))

    def _avail_event_addr(self):
        return self.used_addr + 4 + 8 * self.size

    # ---- errors -----------------------------------------------------------------------------

    def _violation(self, cls, message, *, code, index=0, addr=0, length=0):
        """The other side broke the spec: mark the queue broken and raise."""
        self._broken = True
        self._fail(cls, message, code=code, index=index, addr=addr, length=length)

    def _fail(self, cls, message, *, code, index=0, addr=0, length=0):
        detail = dict(code=code, index=index, addr=addr, length=length)
        exc = cls(f"{self.name}: {message}", **detail)
        if isinstance(exc, RingViolation):
            self.violations += 1
            if self._error is None:
                # a copy without a traceback: the raised one's frames hold this queue
                self._error = cls(str(exc), **detail)
                log.warning("%s: %s; queue marked broken", self.name, exc)
        raise exc

    def _check_not_broken(self):
        if self._broken:
            raise QueueBroken(f"{self.name}: queue is broken ({self._error})",
                              code=Status.BROKEN) from self._error

    @property
    def error(self):
        """The violation that broke the queue, or None."""
        return self._error

    @property
    def broken(self):
        """True after a violation, until :meth:`reset`."""
        return self._broken


# ---- device side ------------------------------------------------------------------------------

class SplitDeviceQueue(_SplitRing):
    """The device side of a split virtqueue (the model).

    ``SplitDeviceQueue(memory, size, desc_addr, avail_addr, used_addr, event_idx=False)``
    """

    _kind = "split-device"

    def __init__(self, memory, size, desc_addr, avail_addr, used_addr, *, event_idx=False,
                 name=""):
        super().__init__(memory, size, desc_addr, avail_addr, used_addr, name)
        self._event_idx = bool(event_idx)
        self.reset()

    def reset(self):
        """Back to the initial state: indices 0, nothing in flight, not broken."""
        self._in_flight = set()          # heads popped and not pushed yet
        self._last_avail = 0             # next avail ring index to consume
        self._used_idx = 0               # next used ring index to fill
        self._signalled_used = 0         # used index at the last notification decision
        self._signalled_valid = False    # False right after reset/restore
        self._used_flags = 0             # what we keep in used->flags
        self._broken = False
        self._error = None

    # ---- pop (spec 2.7.13.1 seen from the device) ---------------------------------------------

    def pop(self, batch):
        """Pop up to ``batch.max_chains`` available chains into ``batch``; returns how
        many. A guest violation raises (the queue is then broken); the chains popped
        before the bad one stay in the batch."""
        if not isinstance(batch, ChainBatch):
            raise TypeError("batch must be a vqcore.model.ChainBatch")
        batch.clear()
        self._check_not_broken()
        avail_idx = self._read16(self._avail_idx_addr())
        pending = (avail_idx - self._last_avail) & _U16
        if pending > self.size:
            self._violation(InvalidAvailRingIndex,
                            f"avail->idx {avail_idx} is {pending} ahead of {self._last_avail}",
                            code=Status.AVAIL_IDX, index=self._last_avail, addr=avail_idx,
                            length=pending)
        regions = _Regions(self.memory)
        batch._memory = self.memory
        try:
            for _ in range(min(pending, batch.max_chains)):
                slot = self._last_avail & (self.size - 1)
                head = self._read16(self._avail_ring_addr(self._last_avail))
                if head >= self.size:
                    self._violation(InvalidHeadIndex, f"avail ring slot {slot} names head {head}",
                                    code=Status.HEAD_INDEX, index=slot, addr=head, length=self.size)
                if head in self._in_flight:
                    self._violation(HeadInUse, f"head {head} offered again while in flight",
                                    code=Status.HEAD_IN_USE, index=head)
                try:
                    chain = self._walk_chain(head, batch, regions)
                except BatchTooSmall:
                    if batch.count:
                        break        # no room left for this chain: the next pop takes it
                    raise
                self._commit(batch, head, chain)
                self._in_flight.add(head)
                self._last_avail = (self._last_avail + 1) & _U16
        except RingViolation:
            self._broken = True
            raise
        return batch.count

    def _walk_chain(self, head, batch, regions):
        """Follow the chain at ``head`` (NEXT links, at most one INDIRECT table at the
        end) with every check of the spec; returns the chain's segments and totals."""
        table, table_size = self.desc_addr, self.size
        in_indirect = False
        idx = head
        ttl = self.size                  # descriptors this table may still give
        ring_descs = 0
        writing = False
        segments = []                    # (gpa, host, length, writable)
        readable_segments = readable_bytes = writable_bytes = 0
        room = batch.max_segments - batch.num_segments
        while True:
            addr, length, flags, nxt = _DESC.unpack(self.memory.read(table + 16 * idx, 16))
            if not in_indirect:
                ring_descs += 1
            if flags & VIRTQ_DESC_F_INDIRECT:
                if in_indirect:
                    self._fail(NestedIndirectDescriptor, f"indirect entry {idx} is INDIRECT",
                               code=Status.INDIRECT_NESTED, index=idx, addr=addr, length=length)
                table, table_size = self._indirect_table(idx, addr, length, flags, regions)
                in_indirect = True
                idx = 0
                ttl = table_size
                continue
            writable = bool(flags & VIRTQ_DESC_F_WRITE)
            if writing and not writable:
                self._fail(WritableBeforeReadable, f"descriptor {idx}: readable after writable",
                           code=Status.WRITE_ORDER, index=idx, addr=addr, length=length)
            writing = writing or writable
            if length:
                pieces = regions.pieces(addr, length, room - len(segments))
                if pieces == Status.BATCH_TOO_SMALL:
                    self._fail(BatchTooSmall, f"chain at head {head} needs more segments",
                               code=Status.BATCH_TOO_SMALL, index=head, addr=addr,
                               length=batch.max_segments)
                if pieces == Status.ADDR_OVERFLOW:
                    self._fail(AddressOverflow, f"descriptor {idx}: {addr:#x}+{length} overflows",
                               code=Status.ADDR_OVERFLOW, index=idx, addr=addr, length=length)
                if pieces == Status.OUT_OF_BOUNDS:
                    self._fail(AddressOutOfBounds, f"descriptor {idx}: {addr:#x}+{length} "
                               "is outside guest memory",
                               code=Status.OUT_OF_BOUNDS, index=idx, addr=addr, length=length)
                segments += [(gpa, host, n, writable) for gpa, host, n in pieces]
                if writable:
                    writable_bytes += length
                else:
                    readable_segments += len(pieces)
                    readable_bytes += length
            if not flags & VIRTQ_DESC_F_NEXT:
                break
            if nxt >= table_size:
                self._fail(InvalidDescriptorIndex, f"descriptor {idx} chains to {nxt}",
                           code=Status.DESC_INDEX, index=idx, addr=nxt, length=table_size)
            ttl -= 1
            if ttl == 0:
                self._fail(ChainTooLong, f"chain at head {head} is longer than {self.size}",
                           code=Status.CHAIN_TOO_LONG, index=head, addr=0, length=self.size)
            idx = nxt
        if readable_bytes > _U32 or writable_bytes > _U32:
            self._fail(ChainLengthOverflow, f"chain at head {head} is longer than 2**32-1",
                       code=Status.CHAIN_LEN_OVERFLOW, index=head, addr=0,
                       length=max(readable_bytes, writable_bytes))
        return segments, readable_segments, readable_bytes, writable_bytes, ring_descs

    def _indirect_table(self, idx, addr, length, flags, regions):
        """Check an INDIRECT descriptor (spec 2.7.5.3); returns (table gpa, entries)."""
        if flags & VIRTQ_DESC_F_NEXT:
            self._fail(IndirectWithNext, f"descriptor {idx} has INDIRECT and NEXT",
                       code=Status.INDIRECT_NEXT, index=idx, addr=addr, length=length)
        if length == 0 or length % 16:
            self._fail(IndirectLengthError, f"descriptor {idx}: indirect length {length}",
                       code=Status.INDIRECT_LEN, index=idx, addr=addr, length=length)
        entries = length // 16
        if entries > self.size:
            self._fail(IndirectTableTooLong, f"descriptor {idx}: {entries} indirect entries",
                       code=Status.INDIRECT_TOO_LONG, index=idx, addr=addr, length=entries)
        if length - 1 > _U64 - addr:               # the table may end exactly at 2**64
            self._fail(AddressOverflow, f"descriptor {idx}: {addr:#x}+{length} overflows",
                       code=Status.ADDR_OVERFLOW, index=idx, addr=addr, length=length)
        if not regions.inside_one(addr, length):
            both_ends_inside = (regions.find(addr) is not None
                                and regions.find(addr + length - 1) is not None)
            cls, code = ((IndirectTableNotContiguous, Status.INDIRECT_SPLIT) if both_ends_inside
                         else (AddressOutOfBounds, Status.OUT_OF_BOUNDS))
            self._fail(cls, f"descriptor {idx}: indirect table {addr:#x}+{length} is not "
                       "inside one region", code=code, index=idx, addr=addr, length=length)
        return addr, entries

    @staticmethod
    def _commit(batch, head, chain):
        segments, nread, rbytes, wbytes, ndesc = chain
        k, s = batch._count, batch._nseg
        for gpa, host, length, _ in segments:
            batch._seg_gpa[s] = gpa
            batch._iov[s] = (host, length)
            s += 1
        batch._head[k] = head
        batch._nread[k] = nread
        batch._rbytes[k] = rbytes
        batch._wbytes[k] = wbytes
        batch._ndesc[k] = ndesc
        batch._seg_start[k + 1] = s
        batch._nseg = s
        batch._count = k + 1

    # ---- push (spec 2.7.8) ----------------------------------------------------------------

    def push_used(self, batch, count=None):
        """Return the first ``count`` (default all) chains of ``batch`` with
        ``batch.used_len`` as the written length; publish ``used->idx`` once."""
        if not isinstance(batch, ChainBatch):
            raise TypeError("batch must be a vqcore.model.ChainBatch")
        n = batch.count if count is None else _uint(count, 32, "count")
        if n > batch.count:
            raise ValueError(f"count {n} exceeds the batch's {batch.count} chains")
        self._push(batch.heads[:n].tolist(), batch.used_len[:n].tolist())

    def push(self, heads, lengths):
        """Return chains by head id with their written lengths (array-likes)."""
        h = np.ascontiguousarray(heads, np.uint16)
        ln = np.ascontiguousarray(lengths, np.uint32)
        if h.shape != ln.shape or h.ndim != 1:
            raise ValueError("heads and lengths must be 1-d arrays of one length")
        self._push(h.tolist(), ln.tolist())

    def _push(self, heads, lengths):
        returned = set()
        for head in heads:
            if head not in self._in_flight or head in returned:
                self._fail(NotInFlight, f"head {head} is not in flight", code=Status.NOT_IN_FLIGHT,
                           index=head)
            returned.add(head)
        for i, (head, length) in enumerate(zip(heads, lengths)):
            self.memory.write(self._used_elem_addr(self._used_idx + i),
                              _USED_ELEM.pack(head, length))
        self._in_flight -= returned
        self._used_idx = (self._used_idx + len(heads)) & _U16
        self._write16(self._used_idx_addr(), self._used_idx)

    # ---- notifications (spec 2.7.7, 2.7.10) -----------------------------------------------

    def needs_notification(self):
        """After pushing: should the driver be interrupted?"""
        new, old, valid = self._used_idx, self._signalled_used, self._signalled_valid
        self._signalled_used, self._signalled_valid = new, True
        if valid and new == old:
            return False                 # nothing used since the last decision
        if self._event_idx:
            if not valid:
                return True              # first decision after reset/restore
            return need_event(self._read16(self._used_event_addr()), new, old)
        return not self._read16(self._avail_flags_addr()) & VIRTQ_AVAIL_F_NO_INTERRUPT

    def enable_notification(self):
        """Ask for kicks again; True when chains arrived meanwhile."""
        if self._event_idx:
            self._write16(self._avail_event_addr(), self._last_avail)
        else:
            self._used_flags &= ~VIRTQ_USED_F_NO_NOTIFY
            self._write16(self._used_flags_addr(), self._used_flags)
        return self._read16(self._avail_idx_addr()) != self._last_avail

    def enable_notification_more(self):
        """Ask for a kick only beyond the buffers available now (avail_event at the
        driver's index); True when armed."""
        if not self._event_idx:
            self.enable_notification()
            return True
        for _ in range(8):
            seen = self._read16(self._avail_idx_addr())
            self._write16(self._avail_event_addr(), seen)
            if self._read16(self._avail_idx_addr()) == seen:
                return True
        return False

    def enable_notification_after(self, n):
        """Ask for a kick only once ``n`` chains wait (avail_event n-1 past ours; no
        event idx: notifications stay disabled); True when they already wait."""
        n = min(_uint(n, 32, "n"), self.size)
        if n <= 1:
            return self.enable_notification()
        if self._event_idx:
            self._write16(self._avail_event_addr(), (self._last_avail + n - 1) & 0xFFFF)
        else:
            self.disable_notification()
        return (self._read16(self._avail_idx_addr()) - self._last_avail) & 0xFFFF >= n

    def disable_notification(self):
        """Ask the driver not to kick (NO_NOTIFY; with event idx, a no-op)."""
        if not self._event_idx:
            self._used_flags |= VIRTQ_USED_F_NO_NOTIFY
            self._write16(self._used_flags_addr(), self._used_flags)

    def pending(self):
        """Chains made available and not yet popped (reads ``avail->idx``)."""
        return (self._read16(self._avail_idx_addr()) - self._last_avail) & _U16

    # ---- state -------------------------------------------------------------------------------

    @property
    def event_idx(self):
        """Whether VIRTIO_F_EVENT_IDX is in use."""
        return self._event_idx

    @property
    def next_avail(self):
        """The next available-ring index to consume."""
        return self._last_avail

    @next_avail.setter
    def next_avail(self, value):
        value = _uint(value, 32, "index")
        if value > _U16:
            raise ValueError("index must be 0..65535")
        self._last_avail = value
        self._signalled_valid = False

    @property
    def next_used(self):
        """The next used-ring index to fill."""
        return self._used_idx

    @next_used.setter
    def next_used(self, value):
        value = _uint(value, 32, "index")
        if value > _U16:
            raise ValueError("index must be 0..65535")
        self._used_idx = value
        self._signalled_used = value
        self._signalled_valid = False

    @property
    def in_flight(self):
        """Chains popped and not yet pushed."""
        return len(self._in_flight)

    def __repr__(self):
        return (f"<model.SplitDeviceQueue {self.name} size={self.size} "
                f"next_avail={self._last_avail} next_used={self._used_idx}"
                f"{' BROKEN' if self._broken else ''}>")


# ---- driver side ------------------------------------------------------------------------------

class SplitDriverQueue(_SplitRing):
    """The driver side of a split virtqueue (the model).

    ``indirect_addr``/``indirect_max``: a guest-memory area of
    ``size * indirect_max * 16`` bytes for indirect tables (one table per head).
    """

    _kind = "split-driver"

    def __init__(self, memory, size, desc_addr, avail_addr, used_addr, *, event_idx=False,
                 indirect_addr=None, indirect_max=0, name=""):
        super().__init__(memory, size, desc_addr, avail_addr, used_addr, name)
        indirect_max = _uint(indirect_max, 32, "indirect_max")
        if indirect_addr is not None:
            if indirect_max < 1 or indirect_max > self.size:
                raise LayoutError(f"indirect_max must be 1..{self.size}")
            if indirect_addr % DESC_ALIGN:
                raise LayoutError(f"indirect area {indirect_addr:#x} is not 16-byte aligned")
            _check_ring_in_memory(memory, indirect_addr, self.size * indirect_max * 16,
                                  "indirect area")
            self._indirect_addr, self._indirect_max = indirect_addr, indirect_max
        else:
            self._indirect_addr, self._indirect_max = None, 0
        self._event_idx = bool(event_idx)
        self.reset()

    def reset(self):
        """Back to the initial state: all descriptors free, indices 0; zeroes the shared
        ring headers (flags, indices, event fields) as a driver does at setup."""
        self._free = list(range(self.size))  # free descriptors, in the order they are given out
        self._chains = {}                 # head -> (descriptors, writable bytes, token)
        self._avail_idx = 0               # next avail ring index to fill
        self._kicked_at = 0               # avail index at the last kick decision
        self._last_used = 0               # next used ring index to read
        self._avail_flags = 0             # what we keep in avail->flags
        self._broken = False
        self._error = None
        lay = split_layout(self.size)
        self.memory.write(self.avail_addr, bytes(lay.avail_size))
        self.memory.write(self.used_addr, bytes(lay.used_size))

    # ---- add (spec 2.7.13) -------------------------------------------------------------------

    def _write_desc(self, gpa, addr, length, flags, nxt):
        self.memory.write(gpa, _DESC.pack(addr, length, flags, nxt))

    def _write_chain(self, table, indices, segments):
        """Write ``segments`` (gpa, length, writable) into descriptors ``indices`` of the
        table at ``table``, linked with NEXT in that order."""
        for pos, (i, (gpa, length, writable)) in enumerate(zip(indices, segments)):
            last = pos == len(indices) - 1
            flags = (VIRTQ_DESC_F_WRITE if writable else 0) | (0 if last else VIRTQ_DESC_F_NEXT)
            self._write_desc(table + 16 * i, gpa, length, flags, 0 if last else indices[pos + 1])

    def add(self, batch, *, indirect=False, publish=True, start=0):
        """Make the chains of ``batch`` (from chain ``start`` on) available; returns how
        many were added (stops early when descriptors run out)."""
        if not isinstance(batch, ChainBatch):
            raise TypeError("batch must be a vqcore.model.ChainBatch")
        start = _uint(start, 32, "start")
        if start > batch.count:
            raise ValueError("start beyond the batch")
        self._check_not_broken()
        if indirect and self._indirect_addr is None:
            self._fail(InvalidChain, f"indirect chains need an indirect area (chain {start})",
                       code=Status.NO_INDIRECT, index=start)
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
            if len(self._free) < need:
                break
            descs = self._free[:need]
            del self._free[:need]
            head = descs[0]
            if indirect:
                table = self._indirect_addr + head * self._indirect_max * 16
                self._write_chain(table, list(range(nseg)), segments)
                self._write_desc(self.desc_addr + 16 * head, table, 16 * nseg,
                                 VIRTQ_DESC_F_INDIRECT, 0)
            else:
                self._write_chain(self.desc_addr, descs, segments)
            self._chains[head] = (descs, int(batch._wbytes[c]), int(batch._token[c]))
            self._write16(self._avail_ring_addr(self._avail_idx), head)
            self._avail_idx = (self._avail_idx + 1) & _U16
            c += 1
        if publish:
            self.publish()
        return c - start

    def publish(self):
        """Publish ``avail->idx`` (after adds made with ``publish=False``)."""
        self._write16(self._avail_idx_addr(), self._avail_idx)

    def kick_needed(self):
        """Must the device be notified of what was published since the last call?"""
        new, old = self._read16(self._avail_idx_addr()), self._kicked_at   # published only
        self._kicked_at = new
        if new == old:
            return False
        if self._event_idx:
            return need_event(self._read16(self._avail_event_addr()), new, old)
        return not self._read16(self._used_flags_addr()) & VIRTQ_USED_F_NO_NOTIFY

    # ---- reclaim (spec 2.7.14) ---------------------------------------------------------------

    def reclaim(self, batch):
        """Collect up to ``batch.max_chains`` used chains into ``batch`` (``heads``,
        ``tokens``, ``used_len``); returns how many. A device violation raises (the
        queue is then broken) after the chains before it were reclaimed."""
        if not isinstance(batch, ChainBatch):
            raise TypeError("batch must be a vqcore.model.ChainBatch")
        batch.clear()
        self._check_not_broken()
        used_idx = self._read16(self._used_idx_addr())
        pending = (used_idx - self._last_used) & _U16
        if pending > self.size:
            self._violation(InvalidUsedRingIndex,
                            f"used->idx {used_idx} is {pending} ahead of {self._last_used}",
                            code=Status.USED_IDX, index=self._last_used, addr=used_idx,
                            length=pending)
        bad = None
        k = 0
        while k < min(pending, batch.max_chains):
            pos = (self._last_used + k) & _U16
            head, length = _USED_ELEM.unpack(self.memory.read(self._used_elem_addr(pos), 8))
            if head not in self._chains:
                bad = (InvalidUsedId, f"used element {pos} names id {head}, not in flight",
                       dict(code=Status.USED_ID, index=pos, addr=head, length=self.size))
                break
            descs, wbytes, token = self._chains.pop(head)
            if length > wbytes:
                self._chains[head] = (descs, wbytes, token)
                bad = (InvalidUsedLength, f"head {head}: used length {length} > {wbytes}",
                       dict(code=Status.USED_LEN, index=head, addr=length, length=wbytes))
                break
            batch._head[k] = head
            batch._token[k] = token
            batch._used_len[k] = length
            batch._seg_start[k + 1] = 0
            self._free[0:0] = descs      # the freed chain goes on the front of the free list
            k += 1
        batch._count = k
        self._last_used = (self._last_used + k) & _U16
        if bad is not None:
            cls, message, detail = bad
            self._violation(cls, message, **detail)
        return k

    # ---- interrupt suppression (spec 2.7.7, 2.7.10) --------------------------------------------

    def disable_interrupts(self):
        """Ask the device not to interrupt (NO_INTERRUPT, or used_event parked half the
        index space away)."""
        if self._event_idx:
            self._write16(self._used_event_addr(), self._last_used + 0x8000)
        else:
            self._avail_flags |= VIRTQ_AVAIL_F_NO_INTERRUPT
            self._write16(self._avail_flags_addr(), self._avail_flags)

    def enable_interrupts(self):
        """Ask the device to interrupt again; True when used chains already wait."""
        if self._event_idx:
            self._write16(self._used_event_addr(), self._last_used)
        else:
            self._avail_flags &= ~VIRTQ_AVAIL_F_NO_INTERRUPT
            self._write16(self._avail_flags_addr(), self._avail_flags)
        return self._read16(self._used_idx_addr()) != self._last_used

    # ---- state -------------------------------------------------------------------------------

    @property
    def event_idx(self):
        """Whether VIRTIO_F_EVENT_IDX is in use."""
        return self._event_idx

    @property
    def num_free(self):
        """Free descriptors."""
        return len(self._free)

    @property
    def in_flight(self):
        """Chains added and not yet reclaimed."""
        return len(self._chains)

    @property
    def next_avail(self):
        """The next available-ring index this driver fills."""
        return self._avail_idx

    @property
    def last_used(self):
        """The next used-ring index this driver reads."""
        return self._last_used

    @property
    def indirect_max(self):
        """Entries per indirect table (0: no indirect area)."""
        return self._indirect_max

    def __repr__(self):
        return (f"<model.SplitDriverQueue {self.name} size={self.size} free={len(self._free)}"
                f" next_avail={self._avail_idx} last_used={self._last_used}>")


__all__ = ["GuestMemory", "ChainBatch", "Chain", "SplitDeviceQueue", "SplitDriverQueue",
           "SplitLayout", "SplitAddresses", "split_layout", "split_addresses",
           "check_queue_size", "need_event", "MAX_QUEUE_SIZE", *_errors_all]
