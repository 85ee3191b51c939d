from typing import NamedTuple, Sequence

import numpy as np

from vqcore.memory import GuestMemory
from vqcore.queue import DeviceQueue, DriverQueue

DESC_ALIGN: int
EVENT_ALIGN: int
MAX_QUEUE_SIZE: int
VIRTQ_DESC_F_AVAIL: int
VIRTQ_DESC_F_USED: int
RING_EVENT_FLAGS_ENABLE: int
RING_EVENT_FLAGS_DISABLE: int
RING_EVENT_FLAGS_DESC: int

class PackedLayout(NamedTuple):
    size: int
    desc_size: int
    event_size: int

class PackedAddresses(NamedTuple):
    desc: int
    driver: int
    device: int
    end: int

def check_packed_size(size: int) -> None: ...
def packed_layout(size: int) -> PackedLayout: ...
def packed_addresses(base: int, size: int) -> PackedAddresses: ...

class PackedDeviceQueue(DeviceQueue):
    def __init__(self, memory: GuestMemory, size: int, desc_addr: int, driver_addr: int,
                 device_addr: int, *, event_idx: bool = False, name: str = "") -> None: ...

class PackedDriverQueue(DriverQueue):
    def __init__(self, memory: GuestMemory, size: int, desc_addr: int, driver_addr: int,
                 device_addr: int, *, event_idx: bool = False, indirect_addr: int | None = None,
                 indirect_max: int = 0, name: str = "") -> None: ...

PACKED_SLOT_MASK: int
PACKED_WRAP: int
SLOT_STATES: tuple[str, str, str, str]

def packed_desc_flags(memory: GuestMemory, desc_addr: int, size: int) -> np.ndarray: ...
def packed_slot_codes(flags: Sequence[int] | np.ndarray, wrap: int) -> np.ndarray: ...
def packed_slot_state(flags: int, wrap: int) -> str: ...
def packed_ring_position(flags: Sequence[int] | np.ndarray) -> int | None: ...
def packed_ring_is_fresh(flags: Sequence[int] | np.ndarray) -> bool: ...
