"""The kernels' status codes (``vq_status.h``) and their exception classes."""

import enum

from vqcore.errors import QueueError

class Status(enum.IntEnum):
    OK: int
    HEAD_INDEX: int
    DESC_INDEX: int
    AVAIL_IDX: int
    CHAIN_TOO_LONG: int
    INDIRECT_LEN: int
    INDIRECT_NESTED: int
    INDIRECT_NEXT: int
    INDIRECT_TOO_LONG: int
    INDIRECT_SPLIT: int
    OUT_OF_BOUNDS: int
    ADDR_OVERFLOW: int
    CHAIN_LEN_OVERFLOW: int
    WRITE_ORDER: int
    HEAD_IN_USE: int
    USED_IDX: int
    USED_ID: int
    USED_LEN: int
    NET_HDR: int
    DESC_NOT_AVAIL: int
    NOT_IN_FLIGHT: int
    BATCH_TOO_SMALL: int
    BROKEN: int
    BAD_CHAIN: int
    NO_INDIRECT: int
    @property
    def violation(self) -> bool: ...

CODE_TO_EXCEPTION: dict[Status, type[QueueError]]
