"""vqcore: the data plane of pyvirtio, a VirtIO virtqueue engine compiled from Cython.

Guest memory (:class:`GuestMemory`), a reusable batch of descriptor chains
(:class:`ChainBatch`), and the split virtqueue's device side (:class:`SplitDeviceQueue`)
and driver side (:class:`SplitDriverQueue`). Ring work runs without the GIL, one call
per batch.
"""

from vqcore.errors import *  # noqa: F401,F403
from vqcore.errors import __all__ as _errors_all
from vqcore.memory import GuestMemory, MemoryRegion
from vqcore.batch import ChainBatch, Chain
from vqcore.split import (SplitDeviceQueue, SplitDriverQueue, SplitLayout, SplitAddresses,
                          split_layout, split_addresses, check_queue_size, need_event,
                          MAX_QUEUE_SIZE)

__version__ = "0.1.0"

__all__ = ["GuestMemory", "MemoryRegion", "ChainBatch", "Chain", "SplitDeviceQueue",
           "SplitDriverQueue", "SplitLayout", "SplitAddresses", "split_layout",
           "split_addresses", "check_queue_size", "need_event", "MAX_QUEUE_SIZE",
           *_errors_all]
