"""vqcore: the data plane of pyvirtio, a VirtIO virtqueue engine compiled from Cython.

Guest memory (:class:`GuestMemory`), a reusable batch of descriptor chains
(:class:`ChainBatch`), and virtqueues — split (:class:`SplitDeviceQueue`,
:class:`SplitDriverQueue`) and packed (:class:`PackedDeviceQueue`,
:class:`PackedDriverQueue`) — with one API (:class:`DeviceQueue`, :class:`DriverQueue`);
:func:`device_queue` / :func:`driver_queue` pick the layout from the feature bits. Ring
work runs without the GIL, one call per batch.
"""

from vqcore.errors import *  # noqa: F401,F403
from vqcore.errors import __all__ as _errors_all
from vqcore.memory import GuestMemory, MemoryRegion
from vqcore.batch import ChainBatch, Chain
from vqcore.queue import DeviceQueue, DriverQueue
from vqcore.split import (SplitDeviceQueue, SplitDriverQueue, SplitLayout, SplitAddresses,
                          split_layout, split_addresses, check_queue_size, need_event,
                          MAX_QUEUE_SIZE)
from vqcore.packed import (PackedDeviceQueue, PackedDriverQueue, PackedLayout,
                           PackedAddresses, packed_layout, packed_addresses)
from vqcore.status import Status

#: feature bits that choose how a queue is built
VIRTIO_RING_F_EVENT_IDX = 1 << 29
VIRTIO_F_RING_PACKED = 1 << 34


def ring_addresses(base, size, features=0):
    """Lay a ring out from ``base`` for the negotiated ``features``: a
    :class:`SplitAddresses` (desc, avail, used, end) or a :class:`PackedAddresses`
    (desc, driver, device, end)."""
    if features & VIRTIO_F_RING_PACKED:
        return packed_addresses(base, size)
    return split_addresses(base, size)


def device_queue(memory, size, desc, driver_area, device_area, *, features=0, name=""):
    """The device side of a queue as the negotiated ``features`` say: packed with
    VIRTIO_F_RING_PACKED, else split; event index with VIRTIO_RING_F_EVENT_IDX."""
    cls = PackedDeviceQueue if features & VIRTIO_F_RING_PACKED else SplitDeviceQueue
    return cls(memory, size, desc, driver_area, device_area,
               event_idx=bool(features & VIRTIO_RING_F_EVENT_IDX), name=name)


def driver_queue(memory, size, desc, driver_area, device_area, *, features=0,
                 indirect_addr=None, indirect_max=0, name=""):
    """The driver side of a queue as the negotiated ``features`` say (see
    :func:`device_queue`)."""
    cls = PackedDriverQueue if features & VIRTIO_F_RING_PACKED else SplitDriverQueue
    return cls(memory, size, desc, driver_area, device_area,
               event_idx=bool(features & VIRTIO_RING_F_EVENT_IDX),
               indirect_addr=indirect_addr, indirect_max=indirect_max, name=name)

__version__ = "0.1.0"

__all__ = ["Status", "GuestMemory", "MemoryRegion", "ChainBatch", "Chain", "DeviceQueue",
           "DriverQueue",
           "PackedDeviceQueue", "PackedDriverQueue", "PackedLayout", "PackedAddresses",
           "packed_layout", "packed_addresses", "ring_addresses", "device_queue",
           "driver_queue", "VIRTIO_F_RING_PACKED", "VIRTIO_RING_F_EVENT_IDX", "SplitDeviceQueue",
           "SplitDriverQueue", "SplitLayout", "SplitAddresses", "split_layout",
           "split_addresses", "check_queue_size", "need_event", "MAX_QUEUE_SIZE",
           *_errors_all]
