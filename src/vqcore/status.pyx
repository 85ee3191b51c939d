"""The status codes of the nogil kernels (``vq_status.h``, their one source) as
:class:`Status`, and the one checker that turns a code into its exception (the cold
path). The pure-Python models raise with the same codes."""

import enum

from vqcore.errors import (AddressOutOfBounds, AddressOverflow, BatchTooSmall, ChainTooLong,
                           ChainLengthOverflow, DescriptorNotAvailable, HeadInUse,
                           IndirectLengthError, IndirectTableNotContiguous,
                           IndirectTableTooLong, IndirectWithNext, InvalidAvailRingIndex,
                           InvalidChain, InvalidDescriptorIndex, InvalidHeadIndex,
                           InvalidUsedId, InvalidUsedLength, InvalidUsedRingIndex,
                           NestedIndirectDescriptor, NetHeaderError, NotInFlight, QueueBroken,
                           QueueError, WritableBeforeReadable)


class Status(enum.IntEnum):
    """A kernel's status (``QueueError.code``): 0 is success, each negative value one
    kind of failure; the values are those of ``enum vq_status``."""
    OK = VQ_OK
    HEAD_INDEX = VQ_E_HEAD_INDEX
    DESC_INDEX = VQ_E_DESC_INDEX
    AVAIL_IDX = VQ_E_AVAIL_IDX
    CHAIN_TOO_LONG = VQ_E_CHAIN_TOO_LONG
    INDIRECT_LEN = VQ_E_INDIRECT_LEN
    INDIRECT_NESTED = VQ_E_INDIRECT_NESTED
    INDIRECT_NEXT = VQ_E_INDIRECT_NEXT
    INDIRECT_TOO_LONG = VQ_E_INDIRECT_TOO_LONG
    INDIRECT_SPLIT = VQ_E_INDIRECT_SPLIT
    OUT_OF_BOUNDS = VQ_E_OUT_OF_BOUNDS
    ADDR_OVERFLOW = VQ_E_ADDR_OVERFLOW
    CHAIN_LEN_OVERFLOW = VQ_E_CHAIN_LEN_OVERFLOW
    WRITE_ORDER = VQ_E_WRITE_ORDER
    HEAD_IN_USE = VQ_E_HEAD_IN_USE
    USED_IDX = VQ_E_USED_IDX
    USED_ID = VQ_E_USED_ID
    USED_LEN = VQ_E_USED_LEN
    NET_HDR = VQ_E_NET_HDR
    DESC_NOT_AVAIL = VQ_E_DESC_NOT_AVAIL
    NOT_IN_FLIGHT = VQ_E_NOT_IN_FLIGHT
    BATCH_TOO_SMALL = VQ_E_BATCH_TOO_SMALL
    BROKEN = VQ_E_BROKEN
    BAD_CHAIN = VQ_E_BAD_CHAIN
    NO_INDIRECT = VQ_E_NO_INDIRECT

    @property
    def violation(self) -> bool:
        """Whether the code is the other side's violation (it breaks the queue)."""
        return bool(vq_is_violation(self))


#: status -> exception class
CODE_TO_EXCEPTION = {
    Status.HEAD_INDEX: InvalidHeadIndex,
    Status.DESC_INDEX: InvalidDescriptorIndex,
    Status.AVAIL_IDX: InvalidAvailRingIndex,
    Status.CHAIN_TOO_LONG: ChainTooLong,
    Status.INDIRECT_LEN: IndirectLengthError,
    Status.INDIRECT_NESTED: NestedIndirectDescriptor,
    Status.INDIRECT_NEXT: IndirectWithNext,
    Status.INDIRECT_TOO_LONG: IndirectTableTooLong,
    Status.INDIRECT_SPLIT: IndirectTableNotContiguous,
    Status.OUT_OF_BOUNDS: AddressOutOfBounds,
    Status.ADDR_OVERFLOW: AddressOverflow,
    Status.CHAIN_LEN_OVERFLOW: ChainLengthOverflow,
    Status.WRITE_ORDER: WritableBeforeReadable,
    Status.HEAD_IN_USE: HeadInUse,
    Status.USED_IDX: InvalidUsedRingIndex,
    Status.USED_ID: InvalidUsedId,
    Status.USED_LEN: InvalidUsedLength,
    Status.NET_HDR: NetHeaderError,
    Status.DESC_NOT_AVAIL: DescriptorNotAvailable,
    Status.NOT_IN_FLIGHT: NotInFlight,
    Status.BATCH_TOO_SMALL: BatchTooSmall,
    Status.BROKEN: QueueBroken,
    Status.BAD_CHAIN: InvalidChain,
    Status.NO_INDIRECT: InvalidChain,
}

_MESSAGES = {
    VQ_E_HEAD_INDEX: "avail ring slot {index} names head {addr}, not below the queue size {len}",
    VQ_E_DESC_INDEX: "descriptor {index} chains to index {addr}, beyond a table of {len}",
    VQ_E_AVAIL_IDX: "avail->idx is {addr}, {len} entries ahead of the last seen {index} (more than the queue size)",
    VQ_E_CHAIN_TOO_LONG: "chain at head {index} is longer than {len} descriptors (a loop?)",
    VQ_E_INDIRECT_LEN: "descriptor {index}: indirect table length {len} is zero or not a multiple of 16",
    VQ_E_INDIRECT_NESTED: "indirect table entry {index} has the INDIRECT flag (nested indirect)",
    VQ_E_INDIRECT_NEXT: "descriptor {index} has both INDIRECT and NEXT set",
    VQ_E_INDIRECT_TOO_LONG: "descriptor {index}: indirect table of {len} entries exceeds the queue size",
    VQ_E_INDIRECT_SPLIT: "descriptor {index}: indirect table at {addr:#x}+{len} is not inside one memory region",
    VQ_E_OUT_OF_BOUNDS: "descriptor {index}: buffer {addr:#x}+{len} is outside guest memory",
    VQ_E_ADDR_OVERFLOW: "descriptor {index}: address {addr:#x} + length {len} overflows 64 bits",
    VQ_E_CHAIN_LEN_OVERFLOW: "chain at head {index}: total length {len} exceeds 2**32-1",
    VQ_E_WRITE_ORDER: "descriptor {index}: device-readable segment after a device-writable one",
    VQ_E_HEAD_IN_USE: "head {index} offered again while still in flight",
    VQ_E_USED_IDX: "used->idx is {addr}, {len} entries ahead of the last seen {index} (more than the queue size)",
    VQ_E_USED_ID: "used element names id {addr}, which is not in flight (queue size {len})",
    VQ_E_USED_LEN: "used element for head {index} reports {addr} bytes, more than its {len} writable bytes",
    VQ_E_NET_HDR: "chain at head {index} has {addr} bytes, fewer than the {len}-byte virtio-net header",
    VQ_E_DESC_NOT_AVAIL: "chain at slot {addr} runs into slot {index}, whose flags {len:#x} do not mark it available",
    VQ_E_NOT_IN_FLIGHT: "head {index} is not in flight (never popped, or already pushed)",
    VQ_E_BATCH_TOO_SMALL: "chain at head {index} needs more than the batch's {len} segments",
    VQ_E_BROKEN: "queue is broken by an earlier violation; reset it",
    VQ_E_BAD_CHAIN: "chain {index} given to add() is invalid ({len} segments)",
    VQ_E_NO_INDIRECT: "indirect chains need an indirect area (chain {index})",
}


cdef int raise_status(const vq_err *e, str where) except -1:
    cls = CODE_TO_EXCEPTION.get(e.code, QueueError)
    template = _MESSAGES.get(e.code, "error code {code}")
    msg = template.format(index=e.index, addr=e.addr, len=e.len, code=e.code)
    if where:
        msg = f"{where}: {msg}"
    raise cls(msg, code=Status(e.code), index=e.index, addr=e.addr, length=e.len)
