"""The packed virtqueue (VIRTIO 1.2 section 2.8), device side and driver side.

The same API as the split ring (:mod:`vqcore.split`): the data-path methods are those
of :class:`vqcore.queue.DeviceQueue` / :class:`vqcore.queue.DriverQueue`. The three
addresses are the descriptor ring, the driver event suppression area and the device
event suppression area (``avail_addr`` and ``used_addr`` hold the latter two). Indices
read and set through ``next_avail``/``next_used`` carry the wrap counter in bit 15, as
vhost-user's GET/SET_VRING_BASE do.
"""

from collections import namedtuple

import numpy as np

from libc.stdint cimport uintptr_t

from vqcore.errors import LayoutError
from vqcore cimport spec

# the spec's constants, as the C headers define them (vqcore/spec.pxd)
DESC_ALIGN = spec.VQ_DESC_ALIGN
EVENT_ALIGN = 4                       # (pvirtq_event_suppress: Python lays it out alone)
MAX_QUEUE_SIZE = spec.VQ_MAX_QUEUE_SIZE

VIRTQ_DESC_F_AVAIL = spec.VIRTQ_DESC_F_AVAIL
VIRTQ_DESC_F_USED = spec.VIRTQ_DESC_F_USED
RING_EVENT_FLAGS_ENABLE = spec.RING_EVENT_FLAGS_ENABLE
RING_EVENT_FLAGS_DISABLE = spec.RING_EVENT_FLAGS_DISABLE
RING_EVENT_FLAGS_DESC = spec.RING_EVENT_FLAGS_DESC

#: a position as ``next_avail``/``next_used`` and vhost-user carry it: the slot in bits
#: 0-14, the wrap counter in bit 15 (the typed code below spells them 0x7FFF and 15)
PACKED_SLOT_MASK = 0x7FFF
PACKED_WRAP = 1 << 15

PackedLayout = namedtuple("PackedLayout", "size desc_size event_size")
PackedLayout.__doc__ = "Byte sizes of a packed ring's descriptor ring and event areas."

PackedAddresses = namedtuple("PackedAddresses", "desc driver device end")
PackedAddresses.__doc__ = "Guest addresses of a packed ring laid out in one area."


def check_packed_size(size):
    """Raise :class:`LayoutError` unless ``size`` is in 1..32768 (any number: packed
    rings need no power of two)."""
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
    drv = base + lay.desc_size
    dev = drv + 4
    return PackedAddresses(base, drv, dev, dev + 4)


cdef inline void *_data(arr):
    return <void *><uintptr_t>arr.ctypes.data


cdef int _map_packed(QueueBase self, GuestMemory memory, unsigned int size,
                     unsigned long long desc, unsigned long long driver,
                     unsigned long long device, bint event_idx, str name,
                     vq_pdesc **d, vq_pevent **drv, vq_pevent **dev) except -1:
    check_packed_size(size)
    for what, addr, align in (("descriptor ring", desc, DESC_ALIGN),
                              ("driver area", driver, EVENT_ALIGN),
                              ("device area", device, EVENT_ALIGN)):
        if addr % align:
            raise LayoutError(f"{what} address {addr:#x} is not {align}-byte aligned")
    d[0] = <vq_pdesc *>memory.ptr_or_raise(desc, 16 * size, "descriptor ring")
    drv[0] = <vq_pevent *>memory.ptr_or_raise(driver, 4, "driver area")
    dev[0] = <vq_pevent *>memory.ptr_or_raise(device, 4, "device area")
    self._attach(memory, size, desc, driver, device, event_idx, name)
    return 0


cdef inline unsigned int _split_idx(unsigned int value, unsigned int size, str what) except? 0xFFFFFFFF:
    if value > 0xFFFF or (value & 0x7FFF) >= size:
        raise ValueError(f"{what} {value:#x}: index (bits 0-14) must be below {size}, "
                         f"wrap counter in bit 15")
    return value


cdef class PackedDeviceQueue(DeviceQueue):
    """The device side of a packed virtqueue.

    ``PackedDeviceQueue(memory, size, desc_addr, driver_addr, device_addr, event_idx=False)``
    """

    def __init__(self, GuestMemory memory not None, unsigned int size,
                 unsigned long long desc_addr, unsigned long long driver_addr,
                 unsigned long long device_addr, *, bint event_idx=False, str name=""):
        cdef vq_pdesc *d
        cdef vq_pevent *drv
        cdef vq_pevent *dev
        _map_packed(self, memory, size, desc_addr, driver_addr, device_addr, event_idx,
                    name or f"packed-device[{size}]", &d, &drv, &dev)
        self._state = {"inflight": np.zeros(size, np.uint8), "ndesc": np.zeros(size, np.uint16)}
        self.q.size = size
        self.q.desc, self.q.driver_event, self.q.device_event = d, drv, dev
        self.q.mem = memory.mem
        self.q.inflight = <uint8_t *>_data(self._state["inflight"])
        self.q.id_ndesc = <uint16_t *>_data(self._state["ndesc"])
        self.q.event_idx = event_idx
        vq_packed_dev_handle(&self.q, &self.h)
        self.reset()

    def reset(self):
        """Back to the initial state: position 0, wrap counters 1, nothing in flight."""
        self._state["inflight"][:] = 0
        self.q.num_inflight = 0
        self.q.next_avail = 0
        self.q.next_used = 0
        self.q.avail_wrap = 1
        self.q.used_wrap = 1
        self.q.signalled_used = 0
        self.q.signalled_wrap = 1
        self.q.signalled_valid = 0
        self.q.broken = 0
        self._error = None

    @property
    def next_avail(self):
        """Next descriptor slot to look at, with the avail wrap counter in bit 15."""
        return self.q.next_avail | (self.q.avail_wrap << 15)

    @next_avail.setter
    def next_avail(self, unsigned int value):
        _split_idx(value, self.size, "next_avail")
        self.q.next_avail = value & 0x7FFF
        self.q.avail_wrap = value >> 15
        self.q.signalled_valid = 0

    @property
    def next_used(self):
        """Next descriptor slot to write a used element to, with the used wrap counter
        in bit 15."""
        return self.q.next_used | (self.q.used_wrap << 15)

    @next_used.setter
    def next_used(self, unsigned int value):
        _split_idx(value, self.size, "next_used")
        self.q.next_used = value & 0x7FFF
        self.q.used_wrap = value >> 15
        self.q.signalled_used = self.q.next_used
        self.q.signalled_wrap = self.q.used_wrap
        self.q.signalled_valid = 0

    def __repr__(self):
        return (f"<PackedDeviceQueue {self.name} size={self.size} next_avail={self.next_avail:#x}"
                f" next_used={self.next_used:#x}{' BROKEN' if self.q.broken else ''}>")


cdef class PackedDriverQueue(DriverQueue):
    """The driver side of a packed virtqueue (what a guest's driver does).

    ``indirect_addr``/``indirect_max``: a guest-memory area of
    ``size * indirect_max * 16`` bytes for indirect tables (one table per buffer id).
    """

    def __init__(self, GuestMemory memory not None, unsigned int size,
                 unsigned long long desc_addr, unsigned long long driver_addr,
                 unsigned long long device_addr, *, bint event_idx=False,
                 indirect_addr=None, unsigned int indirect_max=0, str name=""):
        cdef vq_pdesc *d
        cdef vq_pevent *drv
        cdef vq_pevent *dev
        _map_packed(self, memory, size, desc_addr, driver_addr, device_addr, event_idx,
                    name or f"packed-driver[{size}]", &d, &drv, &dev)
        self.q.ind_host = self._indirect_area(indirect_addr, indirect_max)
        self.q.ind_gpa = indirect_addr or 0
        self.q.ind_max = self.indirect_max
        self._state = {
            "free_ids": np.zeros(size, np.uint16), "ndesc": np.zeros(size, np.uint16),
            "wbytes": np.zeros(size, np.uint32), "token": np.zeros(size, np.uint64),
            "inflight": np.zeros(size, np.uint8),
        }
        self.q.size = size
        self.q.desc, self.q.driver_event, self.q.device_event = d, drv, dev
        self.q.mem = memory.mem
        self.q.free_ids = <uint16_t *>_data(self._state["free_ids"])
        self.q.ndesc = <uint16_t *>_data(self._state["ndesc"])
        self.q.wbytes = <uint32_t *>_data(self._state["wbytes"])
        self.q.token = <uint64_t *>_data(self._state["token"])
        self.q.inflight = <uint8_t *>_data(self._state["inflight"])
        self.q.event_idx = event_idx
        vq_packed_drv_handle(&self.q, &self.h)
        self.reset()

    def reset(self):
        """Back to the initial state: every slot and id free, wrap counters 1. Also
        zeroes the descriptor ring and the event areas, as a driver does at setup."""
        st = self._state
        # ids are handed out from the top of the stack: 0 first
        st["free_ids"][:] = np.arange(self.size - 1, -1, -1, dtype=np.uint16)
        st["inflight"][:] = 0
        self.q.free_top = self.size
        self.q.num_free = self.size
        self.q.next_avail = 0
        self.q.next_used = 0
        self.q.kicked_at = 0
        self.q.avail_wrap = 1
        self.q.used_wrap = 1
        self.q.kicked_wrap = 1
        self.q.broken = 0
        self._error = None
        self.memory.write(self.desc_addr, bytes(16 * self.size))
        self.memory.write(self.avail_addr, bytes(4))
        self.memory.write(self.used_addr, bytes(4))

    @property
    def in_flight(self):
        """Chains added and not yet reclaimed."""
        return self.size - self.q.free_top

    @property
    def next_avail(self):
        """Next slot this driver fills, with its wrap counter in bit 15."""
        return self.q.next_avail | (self.q.avail_wrap << 15)

    @property
    def last_used(self):
        """Next slot this driver reads a used element from, with its wrap counter in
        bit 15."""
        return self.q.next_used | (self.q.used_wrap << 15)

    def __repr__(self):
        return (f"<PackedDriverQueue {self.name} size={self.size} free={self.q.num_free}"
                f" next_avail={self.next_avail:#x} last_used={self.last_used:#x}>")


# ---------------------------------------------------------------------------------------
# Reading a ring a device left: where it stood, from the descriptors' flags alone
# (a back-end that takes over a running ring, e.g. after a crash, with a stale base).

#: what a packed descriptor's flags say about its slot for a device at wrap counter w,
#: in the order a device's ring reads from slot 0 on: made available for the next lap,
#: used in this lap, made available for this lap, used in the previous lap (or a never
#: written zero slot at the start)
SLOT_STATES = ("next", "used", "avail", "old")


def packed_desc_flags(GuestMemory memory not None, desc_addr, size):
    """A copy of the flags of the ``size`` descriptors at ``desc_addr`` (uint16 array;
    a copy, as the driver may write the ring meanwhile)."""
    check_packed_size(size)
    return np.frombuffer(memory.read(desc_addr, 16 * size), "<u2")[7::8].copy()


def _avail_used_bits(flags):
    flags = np.asarray(flags, dtype=np.uint16)
    return (flags & VIRTQ_DESC_F_AVAIL) != 0, (flags & VIRTQ_DESC_F_USED) != 0


def packed_slot_codes(flags, wrap):
    """Each slot's state for a device at wrap counter ``wrap``, as an index into
    :data:`SLOT_STATES` (an array as long as ``flags``)."""
    a, u = _avail_used_bits(flags)
    mine = a == bool(wrap)
    return np.where(a == u, np.where(mine, 1, 3), np.where(mine, 2, 0))


def packed_slot_state(flags, wrap):
    """The :data:`SLOT_STATES` name of one descriptor's flags for a device at wrap
    counter ``wrap``."""
    return SLOT_STATES[int(packed_slot_codes([flags], wrap)[0])]


def packed_ring_position(flags):
    """Where the device side of a packed ring stands (slot | wrap << 15), read from the
    flags of every descriptor of the ring, or None when they do not say it clearly.

    Model: chains of one descriptor each (as Linux's virtio-net driver posts them:
    single RX buffers, indirect tables for multi-part TX), processed in order. For a
    device at slot P with wrap counter w, the slots read from 0 on are in
    :data:`SLOT_STATES` order: made available for the next lap, used in this lap up to
    P, then made available for this lap and used in the previous lap (or zero). The
    wrap counter for which the ring reads so decides P; both must agree if both do.
    A chain of several descriptors leaves slots that break the order: None.
    """
    if len(flags) == 0:
        return None
    found = set()
    for w in (0, 1):
        code = packed_slot_codes(flags, w)
        if np.all(np.diff(code) >= 0):
            later = np.flatnonzero(code >= 2)
            if len(later):
                found.add(int(later[0]) | w << 15)
            else:                             # the whole lap used: slot 0, next lap
                found.add(0 | (w ^ 1) << 15)
    return found.pop() if len(found) == 1 else None


def packed_ring_is_fresh(flags):
    """Whether a packed ring's flags are those of a ring no device used yet: slots made
    available for the first lap (wrap counter 1) from slot 0 on, the rest zero."""
    _, u = _avail_used_bits(flags)
    return bool(not u.any() and packed_ring_position(flags) == PACKED_WRAP)
