"""The queue API, written once for both ring layouts.

:class:`DeviceQueue` (pop, push, notification control) and :class:`DriverQueue` (add,
publish, kick decision, reclaim, interrupt control) call the ring through a handle of
``vq_queue.h``; :mod:`vqcore.split` and :mod:`vqcore.packed` supply the layouts. Every
kernel's status code becomes an exception in one place, :meth:`QueueBase._raise`.
"""

import logging

import numpy as np

from libc.stdint cimport uintptr_t

from vqcore.batch cimport ChainBatch
from vqcore.errors import LayoutError, QueueBroken, RingViolation
from vqcore.status cimport raise_status, VQ_E_BROKEN


cdef class QueueBase:
    """What every queue keeps: its memory (attached while the queue lives), layout
    addresses, name, and the violation that broke it."""

    def __cinit__(self, *args, **kwargs):
        self.memory = None
        self._error = None
        self.violations = 0

    cdef int _attach(self, GuestMemory memory, unsigned int size, unsigned long long desc,
                     unsigned long long avail, unsigned long long used, bint event_idx,
                     str name) except -1:
        if self.memory is not None:
            raise RuntimeError("queue already initialised")
        memory.attach()
        self.memory = memory
        self.size = size
        self.desc_addr, self.avail_addr, self.used_addr = desc, avail, used
        self.event_idx = event_idx
        self.name = name
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
                logging.getLogger(type(self).__module__).warning(
                    "%s; queue marked broken", str(exc))
            raise
        return -1

    @property
    def error(self):
        """The violation that broke the queue, or None."""
        return self._error

    def __dealloc__(self):
        if self.memory is not None:
            self.memory.detach()


cdef inline void *_data(arr):
    return <void *><uintptr_t>arr.ctypes.data


cdef class DeviceQueue(QueueBase):
    """The device side of a virtqueue (split or packed): the guest's driver is on the
    other side and is not trusted."""

    def pop(self, ChainBatch batch not None):
        """Pop up to ``batch.max_chains`` available chains into ``batch``.

        Returns how many were popped. Raises a :class:`RingViolation` subclass (and
        marks the queue broken) when the guest broke a rule; the chains popped before
        the bad one stay in the batch.
        """
        cdef int rc
        batch.hold(self.memory)
        with nogil:
            rc = self.h.ops.pop(self.h.q, &batch.b)
        if rc < 0:
            self._raise(self.h.err)
        return rc

    def push_used(self, ChainBatch batch not None, count=None):
        """Return the first ``count`` (default all) chains of ``batch`` to the driver
        with ``batch.used_len`` as the written length, and publish them at once."""
        cdef uint32_t n = batch.b.count if count is None else count
        if n > batch.b.count:
            raise ValueError(f"count {n} exceeds the batch's {batch.b.count} chains")
        cdef int rc
        with nogil:
            rc = self.h.ops.push(self.h.q, batch.b.head, batch.b.used_len, n)
        if rc < 0:
            self._raise(self.h.err)

    def push(self, heads, lengths):
        """Return chains by head (buffer) id with their written lengths (array-likes)."""
        h = np.ascontiguousarray(heads, np.uint16)
        ln = np.ascontiguousarray(lengths, np.uint32)
        if h.shape != ln.shape or h.ndim != 1:
            raise ValueError("heads and lengths must be 1-d arrays of one length")
        cdef uint32_t n = h.shape[0]
        cdef int rc
        cdef uint16_t *hp = <uint16_t *>_data(h)
        cdef uint32_t *lp = <uint32_t *>_data(ln)
        with nogil:
            rc = self.h.ops.push(self.h.q, hp, lp, n)
        if rc < 0:
            self._raise(self.h.err)

    def needs_notification(self):
        """After pushing: should the driver be interrupted? (its suppression wishes)"""
        return bool(self.h.ops.needs_notification(self.h.q))

    def enable_notification(self):
        """Ask for kicks again; returns True when chains arrived meanwhile (drain
        again before sleeping)."""
        return bool(self.h.ops.enable_notification(self.h.q))

    def enable_notification_more(self):
        """Ask for a kick only when the driver adds buffers beyond those available now
        (what is there cannot be used yet, e.g. too little room for the next frame).
        Returns True when armed: look at the ring once more, then sleep until the kick;
        False when the driver kept moving meanwhile: look again before sleeping."""
        return bool(self.h.ops.enable_notification_more(self.h.q))

    def enable_notification_after(self, uint32_t n):
        """Ask for the next kick only once ``n`` chains wait unpopped (coalesced kicks:
        the caller bounds the wait with a timer; ``n`` is clamped to 1..size, 1 is
        :meth:`enable_notification`). Without EVENT_IDX the driver cannot be asked for
        a count and notifications stay disabled. Packed rings count descriptor slots.
        Returns True when ``n`` chains already wait: drain now."""
        return bool(self.h.ops.enable_notification_after(self.h.q, n))

    def disable_notification(self):
        """Ask the driver not to kick."""
        self.h.ops.disable_notification(self.h.q)

    def pending(self):
        """Chains made available and not yet popped (packed: 1 if any, else 0)."""
        return self.h.ops.pending(self.h.q)

    @property
    def in_flight(self):
        """Chains popped and not yet pushed."""
        return self.h.num_inflight[0]

    @property
    def broken(self):
        """True after a violation, until :meth:`reset`."""
        return bool(self.h.broken[0])


cdef class DriverQueue(QueueBase):
    """The driver side of a virtqueue (split or packed): what a guest's driver does.
    It doubles as the guest in tests and the load generator of the benchmarks."""

    cdef uint8_t *_indirect_area(self, indirect_addr, unsigned int indirect_max) except? NULL:
        """Check and map the indirect area (``size * indirect_max * 16`` bytes)."""
        self.indirect_max = 0
        if indirect_addr is None:
            return NULL
        if indirect_max < 1 or indirect_max > self.size:
            raise LayoutError(f"indirect_max must be 1..{self.size}")
        if indirect_addr % 16:
            raise LayoutError(f"indirect area {indirect_addr:#x} is not 16-byte aligned")
        cdef uint8_t *p = self.memory.ptr_or_raise(
            indirect_addr, <unsigned long long>self.size * indirect_max * 16, "indirect area")
        self.indirect_max = indirect_max
        return p

    def add(self, ChainBatch batch not None, *, bint indirect=False, bint publish=True,
            unsigned int start=0):
        """Make the chains of ``batch`` (from chain ``start`` on) available.

        Segments are readable first, then writable (``batch.readable_segments``);
        each chain's token comes back from :meth:`reclaim`. With ``indirect`` each
        chain takes one ring descriptor and an indirect table. Stops early when the
        ring has too few free descriptors; returns how many chains were added. The
        batch is published once at the end (split: unless ``publish`` is False).
        """
        if start > batch.b.count:
            raise ValueError("start beyond the batch")
        cdef int rc
        with nogil:
            rc = self.h.ops.add(self.h.q, &batch.b, start, indirect, publish)
        if rc < 0:
            self._raise(self.h.err)
        return rc

    def publish(self):
        """Publish what adds made with ``publish=False`` wrote (split rings)."""
        self.h.ops.publish(self.h.q)

    def kick_needed(self):
        """Must the device be notified of what was published since the last call?"""
        return bool(self.h.ops.kick_needed(self.h.q))

    def reclaim(self, ChainBatch batch not None):
        """Collect up to ``batch.max_chains`` used chains into ``batch``: ``heads``,
        ``tokens`` and ``used_len``. Returns how many. Raises a :class:`RingViolation`
        subclass when the device misbehaved."""
        cdef int rc
        with nogil:
            rc = self.h.ops.reclaim(self.h.q, &batch.b)
        if rc < 0:
            self._raise(self.h.err)
        return rc

    def enable_interrupts(self):
        """Ask the device to interrupt again; True when used chains already wait."""
        return bool(self.h.ops.enable_interrupts(self.h.q))

    def disable_interrupts(self):
        """Ask the device not to interrupt."""
        self.h.ops.disable_interrupts(self.h.q)

    @property
    def num_free(self):
        """Free descriptors (ring slots)."""
        return self.h.num_free[0]

    @property
    def broken(self):
        """True after a device violation, until :meth:`reset`."""
        return bool(self.h.broken[0])
