"""Exception classes of vqcore.

One base, :class:`VirtioError`; below it one class per kind of failure. Every class also
inherits the builtin exception that fits (``IndexError``, ``ValueError``,
``OverflowError``, ``RuntimeError``) so callers may catch either.

:class:`RingViolation` and its subclasses are misbehaviour of the *other side* of a ring:
on a device queue the guest's driver wrote something the spec forbids, on a driver queue
the device did. Raising one marks the queue broken (see :class:`QueueBroken`). The other
classes are errors of the caller and leave the queue usable.
"""

from __future__ import annotations


class VirtioError(Exception):
    """Base class of every error raised by vqcore and pyvirtio."""


class LayoutError(VirtioError, ValueError):
    """A queue size or ring address breaks the spec's size or alignment rules."""


class MemoryRegionError(VirtioError, ValueError):
    """A guest memory region is invalid: empty, overlapping, read-only, or in use."""


class QueueError(VirtioError):
    """Base of the errors raised by ring operations."""

    #: the kernel status code (a :class:`vqcore.status.Status`), or 0
    code: int = 0

    def __init__(self, message: str = "", *, code: int = 0, index: int | None = None,
                 addr: int | None = None, length: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.index = index
        self.addr = addr
        self.length = length


class RingViolation(QueueError):
    """The other side of the ring broke a rule of the spec; the queue is now broken."""


class InvalidHeadIndex(RingViolation, IndexError):
    """The avail ring names a head descriptor index >= the queue size."""


class InvalidDescriptorIndex(RingViolation, IndexError):
    """A descriptor's ``next`` points beyond the descriptor (or indirect) table."""


class InvalidAvailRingIndex(RingViolation, ValueError):
    """``avail->idx`` moved more than the queue size ahead of the last seen index."""


class ChainTooLong(RingViolation, ValueError):
    """A chain has more descriptors than the queue size allows (a loop, usually)."""


class InvalidIndirectDescriptor(RingViolation, ValueError):
    """An INDIRECT descriptor or its table is malformed."""


class IndirectLengthError(InvalidIndirectDescriptor):
    """An indirect table's length is zero or not a multiple of 16."""


class NestedIndirectDescriptor(InvalidIndirectDescriptor):
    """An INDIRECT descriptor appears inside an indirect table."""


class IndirectWithNext(InvalidIndirectDescriptor):
    """A descriptor has both INDIRECT and NEXT set."""


class IndirectTableTooLong(InvalidIndirectDescriptor):
    """An indirect table holds more entries than the queue size."""


class IndirectTableNotContiguous(InvalidIndirectDescriptor):
    """An indirect table does not lie inside one guest memory region."""


class AddressOutOfBounds(RingViolation, ValueError):
    """A guest address range is not inside guest memory."""


class AddressOverflow(RingViolation, OverflowError):
    """A guest address plus length wraps around 2**64."""


class ChainLengthOverflow(RingViolation, OverflowError):
    """A chain's readable or writable total exceeds 2**32 - 1 bytes."""


class WritableBeforeReadable(RingViolation, ValueError):
    """A device-readable segment follows a device-writable one."""


class HeadInUse(RingViolation, ValueError):
    """The guest offered a head again while the device still holds it."""


class InvalidUsedRingIndex(RingViolation, ValueError):
    """Driver side: the device moved ``used->idx`` more than the queue size ahead."""


class InvalidUsedId(RingViolation, IndexError):
    """Driver side: a used element names a head that is not in flight."""


class InvalidUsedLength(RingViolation, ValueError):
    """Driver side: a used length exceeds the writable bytes of its chain."""


class NetHeaderError(RingViolation, ValueError):
    """virtio-net: a TX chain shorter than the virtio-net header, or an RX chain with no
    room for it."""


class DescriptorNotAvailable(RingViolation, ValueError):
    """Packed ring: a chain continues (NEXT) into a descriptor whose AVAIL/USED flags do
    not mark it available for its slot's wrap counter."""


class NotInFlight(QueueError, ValueError):
    """``push_used`` was given a head that was never popped (or already pushed)."""


class BatchTooSmall(QueueError, ValueError):
    """A single chain needs more segments than the batch can hold."""


class InvalidChain(QueueError, ValueError):
    """Driver side: a chain handed to ``add`` is malformed (empty, too long, ...)."""


class QueueBroken(QueueError, RuntimeError):
    """The queue was broken by an earlier :class:`RingViolation` and must be reset."""


__all__ = [name for name, obj in list(globals().items())
           if isinstance(obj, type) and issubclass(obj, VirtioError)]
