from typing import NamedTuple

from vqcore.memory import GuestMemory
from vqcore.queue import DeviceQueue, DriverQueue

DESC_ALIGN: int
AVAIL_ALIGN: int
USED_ALIGN: int
MAX_QUEUE_SIZE: int
VIRTQ_DESC_F_NEXT: int
VIRTQ_DESC_F_WRITE: int
VIRTQ_DESC_F_INDIRECT: int
VIRTQ_USED_F_NO_NOTIFY: int
VIRTQ_AVAIL_F_NO_INTERRUPT: int

class SplitLayout(NamedTuple):
    size: int
    desc_size: int
    avail_size: int
    used_size: int

class SplitAddresses(NamedTuple):
    desc: int
    avail: int
    used: int
    end: int

def check_queue_size(size: int) -> None: ...
def split_layout(size: int) -> SplitLayout: ...
def split_addresses(base: int, size: int, align: int = ...) -> SplitAddresses: ...
def need_event(event_idx: int, new_idx: int, old_idx: int) -> bool: ...

class SplitDeviceQueue(DeviceQueue):
    """The device side of a split virtqueue."""
    def __init__(self, memory: GuestMemory, size: int, desc_addr: int, avail_addr: int,
                 used_addr: int, *, event_idx: bool = False, name: str = "") -> None: ...

class SplitDriverQueue(DriverQueue):
    """The driver side of a split virtqueue."""
    def __init__(self, memory: GuestMemory, size: int, desc_addr: int, avail_addr: int,
                 used_addr: int, *, event_idx: bool = False, indirect_addr: int | None = None,
                 indirect_max: int = 0, name: str = "") -> None: ...
