"""The split virtqueue (VIRTIO 1.2 section 2.7), device side and driver side.

The data-path methods (pop, push_used, add, reclaim, notifications) are those of
:class:`vqcore.queue.DeviceQueue` / :class:`vqcore.queue.DriverQueue`; this module lays
the split ring out and keeps its indices.

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

from vqcore.errors import LayoutError
from vqcore cimport spec
from vqcore.queue cimport QueueBase, DeviceQueue, DriverQueue

log = logging.getLogger("vqcore.split")

# the spec's constants, as the C headers define them (vqcore/spec.pxd): the one source
# the models and the control plane import
DESC_ALIGN = spec.VQ_DESC_ALIGN
AVAIL_ALIGN = spec.VQ_AVAIL_ALIGN
USED_ALIGN = spec.VQ_USED_ALIGN
MAX_QUEUE_SIZE = spec.VQ_MAX_QUEUE_SIZE

VIRTQ_DESC_F_NEXT = spec.VIRTQ_DESC_F_NEXT
VIRTQ_DESC_F_WRITE = spec.VIRTQ_DESC_F_WRITE
VIRTQ_DESC_F_INDIRECT = spec.VIRTQ_DESC_F_INDIRECT
VIRTQ_USED_F_NO_NOTIFY = spec.VIRTQ_USED_F_NO_NOTIFY
VIRTQ_AVAIL_F_NO_INTERRUPT = spec.VIRTQ_AVAIL_F_NO_INTERRUPT

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


cdef int _map_split(QueueBase self, GuestMemory memory, unsigned int size,
                    unsigned long long desc, unsigned long long avail,
                    unsigned long long used, bint event_idx, str name,
                    vq_desc **d, vq_avail **a, vq_used **u) except -1:
    """Check the layout of a split ring, find its three parts in guest memory and
    attach the queue to the memory."""
    check_queue_size(size)
    for what, addr, align in (("descriptor table", desc, DESC_ALIGN),
                              ("available ring", avail, AVAIL_ALIGN),
                              ("used ring", used, USED_ALIGN)):
        if addr % align:
            raise LayoutError(f"{what} address {addr:#x} is not {align}-byte aligned")
    lay = split_layout(size)
    d[0] = <vq_desc *>memory.ptr_or_raise(desc, lay.desc_size, "descriptor table")
    a[0] = <vq_avail *>memory.ptr_or_raise(avail, lay.avail_size, "available ring")
    u[0] = <vq_used *>memory.ptr_or_raise(used, lay.used_size, "used ring")
    self._attach(memory, size, desc, avail, used, event_idx, name)
    return 0


cdef class SplitDeviceQueue(DeviceQueue):
    """The device side of a split virtqueue.

    ``SplitDeviceQueue(memory, size, desc_addr, avail_addr, used_addr, event_idx=False)``
    """

    def __init__(self, GuestMemory memory not None, unsigned int size,
                 unsigned long long desc_addr, unsigned long long avail_addr,
                 unsigned long long used_addr, *, bint event_idx=False, str name=""):
        cdef vq_desc *d
        cdef vq_avail *a
        cdef vq_used *u
        _map_split(self, memory, size, desc_addr, avail_addr, used_addr, event_idx,
                   name or f"split-device[{size}]", &d, &a, &u)
        self._state = np.zeros(size, np.uint8)
        self.q.size = size
        self.q.mask = size - 1
        self.q.desc, self.q.avail, self.q.used = d, a, u
        self.q.mem = memory.mem
        self.q.inflight = <uint8_t *>_data(self._state)
        self.q.event_idx = event_idx
        vq_split_dev_handle(&self.q, &self.h)
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

    def __repr__(self):
        return (f"<SplitDeviceQueue {self.name} size={self.size} next_avail={self.q.last_avail}"
                f" next_used={self.q.used_idx}{' BROKEN' if self.q.broken else ''}>")


cdef class SplitDriverQueue(DriverQueue):
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
        _map_split(self, memory, size, desc_addr, avail_addr, used_addr, event_idx,
                   name or f"split-driver[{size}]", &d, &a, &u)
        self.q.ind_host = self._indirect_area(indirect_addr, indirect_max)
        self.q.ind_gpa = indirect_addr or 0
        self.q.ind_max = self.indirect_max
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
        vq_split_drv_handle(&self.q, &self.h)
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

    def __repr__(self):
        return (f"<SplitDriverQueue {self.name} size={self.size} free={self.q.num_free}"
                f" next_avail={self.q.avail_idx} last_used={self.q.last_used}>")
