"""The split virtqueue (VIRTIO 1.2 section 2.7), device side and driver side.

Both sides are built from a :class:`~vqcore.memory.GuestMemory`, a queue size (a power
of two up to 32768) and the guest-physical addresses of the descriptor table, the
available ring and the used ring. One call moves a whole batch; the ring work runs with
the GIL released. A queue object is not thread-safe: use each one from one thread at a
time (the two sides of a ring may live in different threads or processes).
"""

import logging
from collections import namedtuple

import numpy as np

from libc.stdint cimport uintptr_t

from vqcore.errors import LayoutError, QueueBroken, RingViolation
from vqcore.status cimport raise_status, vq_fail, vq_is_violation, VQ_E_BROKEN

log = logging.getLogger("vqcore.split")

DESC_ALIGN = 16
AVAIL_ALIGN = 2
USED_ALIGN = 4
MAX_QUEUE_SIZE = 32768

VIRTQ_DESC_F_NEXT = 1
VIRTQ_DESC_F_WRITE = 2
VIRTQ_DESC_F_INDIRECT = 4
VIRTQ_USED_F_NO_NOTIFY = 1
VIRTQ_AVAIL_F_NO_INTERRUPT = 1

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
    return SplitLayout(size, 16 * size, 6 + 2 * size, 6 + 8 * size)


def split_addresses(base, size, align=DESC_ALIGN):
    """Lay the three parts out one after another from ``base`` (16-byte aligned).

    ``align`` is where the used ring starts (4 for VERSION_1; 4096 reproduces the
    legacy layout that some VMMs still use).
    """
    lay = split_layout(size)
    if base % DESC_ALIGN:
        raise LayoutError(f"base {base:#x} is not 16-byte aligned")
    desc = base
    avail = desc + lay.desc_size
    used = (avail + lay.avail_size + align - 1) // align * align
    used = (used + USED_ALIGN - 1) // USED_ALIGN * USED_ALIGN
    return SplitAddresses(desc, avail, used, used + lay.used_size)


def need_event(int event_idx, int new_idx, int old_idx):
    """The spec's ``vring_need_event`` on 16-bit indices."""
    return bool(vq_need_event(<uint16_t>event_idx, <uint16_t>new_idx, <uint16_t>old_idx))


cdef inline void *_data(arr):
    return <void *><uintptr_t>arr.ctypes.data


cdef class _SplitRing:
    """What both sides of a split ring share: the mapped rings and error handling."""

    def __cinit__(self, *args, **kwargs):
        self.memory = None
        self._error = None
        self.violations = 0

    cdef int _map(self, unsigned int size, unsigned long long desc,
                  unsigned long long avail, unsigned long long used,
                  vq_desc **d, vq_avail **a, vq_used **u) except -1:
        check_queue_size(size)
        for what, addr, align in (("descriptor table", desc, DESC_ALIGN),
                                  ("available ring", avail, AVAIL_ALIGN),
                                  ("used ring", used, USED_ALIGN)):
            if addr % align:
                raise LayoutError(f"{what} address {addr:#x} is not {align}-byte aligned")
        lay = split_layout(size)
        d[0] = <vq_desc *>self.memory.ptr_or_raise(desc, lay.desc_size, "descriptor table")
        a[0] = <vq_avail *>self.memory.ptr_or_raise(avail, lay.avail_size, "available ring")
        u[0] = <vq_used *>self.memory.ptr_or_raise(used, lay.used_size, "used ring")
        self.size = size
        self.desc_addr, self.avail_addr, self.used_addr = desc, avail, used
        return 0

    cdef int _raise(self, const vq_err *e) except -1:
        """Raise the error in ``e``; the first violation is logged and kept."""
        if e.code == VQ_E_BROKEN and self._error is not None:
            raise QueueBroken(f"{self.name}: queue is broken ({self._error})",
                              code=VQ_E_BROKEN) from self._error
        try:
            raise_status(e, self.name)
        except RingViolation as exc:
            self.violations += 1
            if self._error is None:
                # keep a traceback-free copy: the raised one's frames hold this queue
                self._error = type(exc)(str(exc), code=exc.code, index=exc.index,
                                        addr=exc.addr, length=exc.length)
                log.warning("%s; queue marked broken", str(exc))
            raise
        return -1

    @property
    def error(self):
        """The violation that broke the queue, or None."""
        return self._error

    def __dealloc__(self):
        if self.memory is not None:
            self.memory.detach()


cdef class SplitDeviceQueue(_SplitRing):
    """The device side of a split virtqueue.

    ``SplitDeviceQueue(memory, size, desc_addr, avail_addr, used_addr, event_idx=False)``
    """

    def __init__(self, GuestMemory memory not None, unsigned int size,
                 unsigned long long desc_addr, unsigned long long avail_addr,
                 unsigned long long used_addr, *, bint event_idx=False, str name=""):
        cdef vq_desc *d
        cdef vq_avail *a
        cdef vq_used *u
        if self.memory is not None:
            raise RuntimeError("queue already initialised")
        self.memory = memory
        try:
            self._map(size, desc_addr, avail_addr, used_addr, &d, &a, &u)
        except BaseException:
            self.memory = None
            raise
        memory.attach()
        self.name = name or f"split-device[{size}]"
        self._state = np.zeros(size, np.uint8)
        self.q.size = size
        self.q.mask = size - 1
        self.q.desc, self.q.avail, self.q.used = d, a, u
        self.q.mem = memory.mem
        self.q.inflight = <uint8_t *>_data(self._state)
        self.q.event_idx = event_idx
        self.reset()

    def reset(self):
        """Back to the initial state: indices 0, nothing in flight, not broken."""
        self._state[:] = 0
        self.q.num_inflight = 0
        self.q.last_avail = 0
        self.q.used_idx = 0
        self.q.signalled_used = 0
        self.q.signalled_valid = 0
        self.q.used_flags = 0
        self.q.broken = 0
        self._error = None

    # ---- the data path ----------------------------------------------------------------

    def pop(self, ChainBatch batch not None):
        """Pop up to ``batch.max_chains`` available chains into ``batch``.

        Returns how many were popped. Raises a :class:`RingViolation` subclass (and
        marks the queue broken) when the guest broke a rule; the chains popped before
        the bad one stay in the batch.
        """
        cdef int rc
        with nogil:
            rc = vq_split_pop(&self.q, &batch.b)
        if rc < 0:
            self._raise(&self.q.err)
        return rc

    def push_used(self, ChainBatch batch not None, count=None):
        """Return the first ``count`` (default all) chains of ``batch`` to the driver
        with ``batch.used_len`` as the written length, and publish ``used->idx`` once."""
        cdef uint32_t n = batch.b.count if count is None else count
        if n > batch.b.count:
            raise ValueError(f"count {n} exceeds the batch's {batch.b.count} chains")
        cdef int rc
        with nogil:
            rc = vq_split_push(&self.q, batch.b.head, batch.b.used_len, n)
        if rc < 0:
            self._raise(&self.q.err)

    def push(self, heads, lengths):
        """Return chains by head id with their written lengths (array-likes)."""
        h = np.ascontiguousarray(heads, np.uint16)
        ln = np.ascontiguousarray(lengths, np.uint32)
        if h.shape != ln.shape or h.ndim != 1:
            raise ValueError("heads and lengths must be 1-d arrays of one length")
        cdef uint32_t n = h.shape[0]
        cdef int rc
        cdef uint16_t *hp = <uint16_t *>_data(h)
        cdef uint32_t *lp = <uint32_t *>_data(ln)
        with nogil:
            rc = vq_split_push(&self.q, hp, lp, n)
        if rc < 0:
            self._raise(&self.q.err)

    # ---- notifications ----------------------------------------------------------------

    def needs_notification(self):
        """After pushing: should the driver be interrupted? (event idx or NO_INTERRUPT)"""
        return bool(vq_split_needs_notification(&self.q))

    def enable_notification(self):
        """Ask for kicks again; returns True when chains arrived meanwhile (drain
        again before sleeping)."""
        return bool(vq_split_enable_notification(&self.q))

    def disable_notification(self):
        """Ask the driver not to kick (NO_NOTIFY; with event idx, a no-op)."""
        vq_split_disable_notification(&self.q)

    def pending(self):
        """Chains made available and not yet popped (reads ``avail->idx``)."""
        return vq_split_avail_pending(&self.q)

    # ---- state --------------------------------------------------------------------------

    @property
    def event_idx(self):
        """Whether VIRTIO_F_EVENT_IDX is in use."""
        return bool(self.q.event_idx)

    @property
    def next_avail(self):
        """The next available-ring index to consume (GET/SET_VRING_BASE)."""
        return self.q.last_avail

    @next_avail.setter
    def next_avail(self, unsigned int value):
        if value > 0xFFFF:
            raise ValueError("index must be 0..65535")
        self.q.last_avail = value
        self.q.signalled_valid = 0

    @property
    def next_used(self):
        """The next used-ring index to fill."""
        return self.q.used_idx

    @next_used.setter
    def next_used(self, unsigned int value):
        if value > 0xFFFF:
            raise ValueError("index must be 0..65535")
        self.q.used_idx = value
        self.q.signalled_used = value
        self.q.signalled_valid = 0

    @property
    def in_flight(self):
        """Chains popped and not yet pushed."""
        return self.q.num_inflight

    @property
    def broken(self):
        """True after a violation, until :meth:`reset`."""
        return bool(self.q.broken)

    def __repr__(self):
        return (f"<SplitDeviceQueue {self.name} size={self.size} next_avail={self.q.last_avail}"
                f" next_used={self.q.used_idx}{' BROKEN' if self.q.broken else ''}>")


cdef class SplitDriverQueue(_SplitRing):
    """The driver side of a split virtqueue (what a guest's driver does).

    ``indirect_addr``/``indirect_max``: a guest-memory area of
    ``size * indirect_max * 16`` bytes for indirect tables (one table per head).
    """

    def __init__(self, GuestMemory memory not None, unsigned int size,
                 unsigned long long desc_addr, unsigned long long avail_addr,
                 unsigned long long used_addr, *, bint event_idx=False,
                 indirect_addr=None, unsigned int indirect_max=0, str name=""):
        cdef vq_desc *d
        cdef vq_avail *a
        cdef vq_used *u
        if self.memory is not None:
            raise RuntimeError("queue already initialised")
        self.memory = memory
        try:
            self._map(size, desc_addr, avail_addr, used_addr, &d, &a, &u)
            if indirect_addr is not None:
                if indirect_max < 1 or indirect_max > size:
                    raise LayoutError(f"indirect_max must be 1..{size}")
                if indirect_addr % DESC_ALIGN:
                    raise LayoutError(f"indirect area {indirect_addr:#x} is not 16-byte aligned")
                self.q.ind_host = memory.ptr_or_raise(indirect_addr, <unsigned long long>size * indirect_max * 16,
                                                      "indirect area")
                self.q.ind_gpa = indirect_addr
                self.q.ind_max = indirect_max
            else:
                self.q.ind_host = NULL
                self.q.ind_max = 0
        except BaseException:
            self.memory = None
            raise
        memory.attach()
        self.name = name or f"split-driver[{size}]"
        self._state = {
            "free_next": np.zeros(size, np.uint16), "tail": np.zeros(size, np.uint16),
            "ndesc": np.zeros(size, np.uint16), "wbytes": np.zeros(size, np.uint32),
            "token": np.zeros(size, np.uint64), "inflight": np.zeros(size, np.uint8),
        }
        self.q.size = size
        self.q.mask = size - 1
        self.q.desc, self.q.avail, self.q.used = d, a, u
        self.q.mem = memory.mem
        self.q.free_next = <uint16_t *>_data(self._state["free_next"])
        self.q.tail = <uint16_t *>_data(self._state["tail"])
        self.q.ndesc = <uint16_t *>_data(self._state["ndesc"])
        self.q.wbytes = <uint32_t *>_data(self._state["wbytes"])
        self.q.token = <uint64_t *>_data(self._state["token"])
        self.q.inflight = <uint8_t *>_data(self._state["inflight"])
        self.q.event_idx = event_idx
        self.reset()

    def reset(self):
        """Back to the initial state: all descriptors free, indices 0.

        Also zeroes the shared ring headers (flags, indices, event fields) as a driver
        does when it sets a queue up.
        """
        st = self._state
        st["free_next"][:] = (np.arange(self.size, dtype=np.uint32) + 1) % max(self.size, 1)
        st["inflight"][:] = 0
        self.q.num_free = self.size
        self.q.free_head = 0
        self.q.avail_idx = 0
        self.q.kicked_at = 0
        self.q.last_used = 0
        self.q.avail_flags = 0
        self.q.broken = 0
        self._error = None
        lay = split_layout(self.size)
        self.memory.write(self.avail_addr, bytes(lay.avail_size))
        self.memory.write(self.used_addr, bytes(lay.used_size))

    # ---- the data path ----------------------------------------------------------------

    def add(self, ChainBatch batch not None, *, bint indirect=False, bint publish=True,
            unsigned int start=0):
        """Make the chains of ``batch`` (from chain ``start`` on) available.

        Segments are readable first, then writable (``batch.readable_segments``);
        each chain's token comes back from :meth:`reclaim`. With ``indirect`` each
        chain takes one ring descriptor and an indirect table. Stops early when the
        ring has too few free descriptors; returns how many chains were added.
        ``avail->idx`` is published once at the end unless ``publish`` is False.
        """
        if start > batch.b.count:
            raise ValueError("start beyond the batch")
        cdef int rc
        with nogil:
            rc = vq_split_drv_add(&self.q, &batch.b, start, indirect, publish)
        if rc < 0:
            self._raise(&self.q.err)
        return rc

    def publish(self):
        """Publish ``avail->idx`` (after adds made with ``publish=False``)."""
        vq_split_drv_publish(&self.q)

    def kick_needed(self):
        """Must the device be notified of what was published since the last call?"""
        return bool(vq_split_drv_kick_needed(&self.q))

    def reclaim(self, ChainBatch batch not None):
        """Collect up to ``batch.max_chains`` used chains into ``batch``: ``heads``,
        ``tokens`` and ``used_len``. Returns how many. Raises a :class:`RingViolation`
        subclass when the device misbehaved."""
        cdef int rc
        with nogil:
            rc = vq_split_drv_reclaim(&self.q, &batch.b)
        if rc < 0:
            self._raise(&self.q.err)
        return rc

    def enable_interrupts(self):
        """Ask the device to interrupt again; True when used chains already wait."""
        return bool(vq_split_drv_enable_interrupts(&self.q))

    def disable_interrupts(self):
        """Ask the device not to interrupt (NO_INTERRUPT, or used_event parked)."""
        vq_split_drv_disable_interrupts(&self.q)

    # ---- state --------------------------------------------------------------------------

    @property
    def event_idx(self):
        """Whether VIRTIO_F_EVENT_IDX is in use."""
        return bool(self.q.event_idx)

    @property
    def num_free(self):
        """Free descriptors."""
        return self.q.num_free

    @property
    def in_flight(self):
        """Chains added and not yet reclaimed."""
        return int(self._state["inflight"].sum())

    @property
    def next_avail(self):
        """The next available-ring slot this driver fills."""
        return self.q.avail_idx

    @property
    def last_used(self):
        """The next used-ring slot this driver reads."""
        return self.q.last_used

    @property
    def broken(self):
        """True after a device violation, until :meth:`reset`."""
        return bool(self.q.broken)

    @property
    def indirect_max(self):
        """Entries per indirect table (0: no indirect area)."""
        return self.q.ind_max

    def __repr__(self):
        return (f"<SplitDriverQueue {self.name} size={self.size} free={self.q.num_free}"
                f" next_avail={self.q.avail_idx} last_used={self.q.last_used}>")
