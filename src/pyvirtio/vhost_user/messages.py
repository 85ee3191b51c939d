"""vhost-user wire format (QEMU docs/interop/vhost-user.rst): request codes, flags,
protocol features and the message bodies, each a small class with ``pack``, ``unpack``
(which checks the exact size) and ``validate`` (which checks the values).

Every number is in the host's byte order, as the protocol says (both ends are on one
machine).
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, field
from typing import ClassVar

import vqcore
from vqcore.errors import VirtioError
from vqcore.packed import PACKED_SLOT_MASK, PACKED_WRAP

#: the 12-byte header: request, flags, size
HEADER = struct.Struct("=III")
HEADER_SIZE = HEADER.size
#: largest body we accept (a SET_CONFIG of 4 KiB of config space fits easily)
MAX_BODY = 4096 + 12
#: fds one message may carry
MAX_FDS = 8
#: regions of SET_MEM_TABLE (VHOST_MEMORY_BASELINE_NREGIONS)
MAX_MEM_TABLE_REGIONS = 8
#: regions with CONFIGURE_MEM_SLOTS (what GET_MAX_MEM_SLOTS answers)
MAX_MEM_SLOTS = 509
#: largest ring (the spec's, as vqcore's headers define it)
MAX_QUEUE_SIZE = vqcore.MAX_QUEUE_SIZE

VERSION = 0x1
FLAG_VERSION_MASK = 0x3
FLAG_REPLY = 0x4
FLAG_NEED_REPLY = 0x8

#: VHOST_USER_F_PROTOCOL_FEATURES (a virtio feature bit, tested as a mask)
F_PROTOCOL_FEATURES = 1 << 30

#: u64 vring index payload: bits 0-7 the index, bit 8 "no fd: poll instead"
VRING_IDX_MASK = 0xFF
VRING_NOFD_MASK = 1 << 8

#: SET_VRING_ADDR flags: VHOST_VRING_F_LOG
VRING_F_LOG = 1 << 0


class VhostUserError(VirtioError):
    """Base class of vhost-user protocol errors."""


class ProtocolError(VhostUserError, ValueError):
    """A malformed or out-of-place message: the connection is closed or NACKed."""


class Request(enum.IntEnum):
    """Front-end requests (``VHOST_USER_*``)."""
    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_BACKEND_REQ_FD = 21
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    CREATE_CRYPTO_SESSION = 26
    CLOSE_CRYPTO_SESSION = 27
    POSTCOPY_ADVISE = 28
    POSTCOPY_LISTEN = 29
    POSTCOPY_END = 30
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    GPU_SET_SOCKET = 33
    RESET_DEVICE = 34
    VRING_KICK = 35
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40


class ProtocolFeature(enum.IntFlag):
    """``VHOST_USER_PROTOCOL_F_*`` bits."""
    MQ = 1 << 0
    LOG_SHMFD = 1 << 1
    RARP = 1 << 2
    REPLY_ACK = 1 << 3
    NET_MTU = 1 << 4
    BACKEND_REQ = 1 << 5
    CROSS_ENDIAN = 1 << 6
    CRYPTO_SESSION = 1 << 7
    PAGEFAULT = 1 << 8
    CONFIG = 1 << 9
    BACKEND_SEND_FD = 1 << 10
    HOST_NOTIFIER = 1 << 11
    INFLIGHT_SHMFD = 1 << 12
    RESET_DEVICE = 1 << 13
    INBAND_NOTIFICATIONS = 1 << 14
    CONFIGURE_MEM_SLOTS = 1 << 15
    STATUS = 1 << 16


# ---- bodies ---------------------------------------------------------------------------

class Body:
    """A message body of a fixed layout."""
    FMT: ClassVar[struct.Struct]

    @classmethod
    def unpack(cls, data: bytes):
        if len(data) != cls.FMT.size:
            raise ProtocolError(f"{cls.__name__}: body of {len(data)} bytes, expected {cls.FMT.size}")
        obj = cls(*cls.FMT.unpack(data))
        obj.validate()
        return obj

    def pack(self) -> bytes:
        return self.FMT.pack(*self.fields())

    def fields(self) -> tuple:
        raise NotImplementedError

    def validate(self) -> None:
        """Raise :class:`ProtocolError` when a value is out of range."""


@dataclass
class U64(Body):
    """A single u64 (features, mtu, status, queue num, fd index, ...)."""
    value: int
    FMT: ClassVar[struct.Struct] = struct.Struct("=Q")

    def fields(self) -> tuple:
        return (self.value,)


@dataclass
class VringState(Body):
    """``struct vhost_vring_state``: index and num (size, base or enable)."""
    index: int
    num: int
    FMT: ClassVar[struct.Struct] = struct.Struct("=II")

    def fields(self) -> tuple:
        return (self.index, self.num)


@dataclass
class VringAddr(Body):
    """``struct vhost_vring_addr``: ring addresses in the front-end's address space."""
    index: int
    flags: int
    desc: int
    used: int
    avail: int
    log: int
    FMT: ClassVar[struct.Struct] = struct.Struct("=IIQQQQ")

    def fields(self) -> tuple:
        return (self.index, self.flags, self.desc, self.used, self.avail, self.log)

    def validate(self) -> None:
        if self.flags & ~VRING_F_LOG:
            raise ProtocolError(f"SET_VRING_ADDR: unknown flags {self.flags:#x}")


@dataclass
class MemRegion:
    """One ``VhostUserMemoryRegion``."""
    guest_phys_addr: int
    memory_size: int
    userspace_addr: int
    mmap_offset: int
    FMT: ClassVar[struct.Struct] = struct.Struct("=QQQQ")

    def pack(self) -> bytes:
        return self.FMT.pack(self.guest_phys_addr, self.memory_size, self.userspace_addr,
                             self.mmap_offset)

    def validate(self) -> None:
        if self.memory_size == 0:
            raise ProtocolError("memory region of size 0")
        for what, base in (("guest_phys_addr", self.guest_phys_addr),
                           ("userspace_addr", self.userspace_addr),
                           ("mmap_offset", self.mmap_offset)):
            if base + self.memory_size > 1 << 64:
                raise ProtocolError(f"memory region {what} {base:#x} + size "
                                    f"{self.memory_size:#x} wraps 64 bits")

    def overlaps(self, other: "MemRegion") -> bool:
        a0, a1 = self.guest_phys_addr, self.guest_phys_addr + self.memory_size
        b0, b1 = other.guest_phys_addr, other.guest_phys_addr + other.memory_size
        return a0 < b1 and b0 < a1


@dataclass
class MemTable(Body):
    """``VhostUserMemory``: SET_MEM_TABLE (one fd per region)."""
    regions: list[MemRegion] = field(default_factory=list)
    HEAD: ClassVar[struct.Struct] = struct.Struct("=II")

    @classmethod
    def unpack(cls, data: bytes) -> "MemTable":
        if len(data) < cls.HEAD.size:
            raise ProtocolError(f"SET_MEM_TABLE: body of {len(data)} bytes is too short")
        n, _pad = cls.HEAD.unpack_from(data)
        if not 1 <= n <= MAX_MEM_TABLE_REGIONS:
            raise ProtocolError(f"SET_MEM_TABLE: {n} regions (1..{MAX_MEM_TABLE_REGIONS})")
        # QEMU sends the full 8-region array; accept exactly n or the full array
        need = cls.HEAD.size + n * MemRegion.FMT.size
        full = cls.HEAD.size + MAX_MEM_TABLE_REGIONS * MemRegion.FMT.size
        if len(data) not in (need, full):
            raise ProtocolError(f"SET_MEM_TABLE: {len(data)} bytes for {n} regions "
                                f"(expected {need} or {full})")
        regions = [MemRegion(*MemRegion.FMT.unpack_from(data, cls.HEAD.size + i * 32))
                   for i in range(n)]
        table = cls(regions)
        table.validate()
        return table

    def pack(self) -> bytes:
        body = self.HEAD.pack(len(self.regions), 0) + b"".join(r.pack() for r in self.regions)
        return body + bytes(32 * (MAX_MEM_TABLE_REGIONS - len(self.regions)))

    def validate(self) -> None:
        for i, r in enumerate(self.regions):
            r.validate()
            for other in self.regions[:i]:
                if r.overlaps(other):
                    raise ProtocolError(f"memory regions overlap: {r} and {other}")


@dataclass
class SingleMemRegion(Body):
    """``VhostUserSingleMemRegion``: ADD_MEM_REG / REM_MEM_REG."""
    region: MemRegion
    FMT: ClassVar[struct.Struct] = struct.Struct("=QQQQQ")

    @classmethod
    def unpack(cls, data: bytes) -> "SingleMemRegion":
        if len(data) != cls.FMT.size:
            raise ProtocolError(f"memory region message of {len(data)} bytes, expected {cls.FMT.size}")
        _pad, *vals = cls.FMT.unpack(data)
        obj = cls(MemRegion(*vals))
        obj.region.validate()
        return obj

    def pack(self) -> bytes:
        return struct.pack("=Q", 0) + self.region.pack()


@dataclass
class ConfigSpace(Body):
    """``VhostUserConfig``: GET_CONFIG / SET_CONFIG."""
    offset: int
    size: int
    flags: int
    payload: bytes = b""
    HEAD: ClassVar[struct.Struct] = struct.Struct("=III")

    @classmethod
    def unpack(cls, data: bytes) -> "ConfigSpace":
        if len(data) < cls.HEAD.size:
            raise ProtocolError(f"config message of {len(data)} bytes is too short")
        offset, size, flags = cls.HEAD.unpack_from(data)
        payload = bytes(data[cls.HEAD.size:])
        if size != len(payload):
            raise ProtocolError(f"config message says {size} bytes but carries {len(payload)}")
        if size > 4096 or offset > 4096:
            raise ProtocolError(f"config access [{offset}, +{size}) out of range")
        return cls(offset, size, flags, payload)

    def pack(self) -> bytes:
        return self.HEAD.pack(self.offset, self.size, self.flags) + bytes(self.payload)


@dataclass
class LogBase(Body):
    """``VhostUserLog``: SET_LOG_BASE."""
    mmap_size: int
    mmap_offset: int
    FMT: ClassVar[struct.Struct] = struct.Struct("=QQ")

    def fields(self) -> tuple:
        return (self.mmap_size, self.mmap_offset)


#: what body each request carries (None: no body); replies in REPLY_BODY
REQUEST_BODY: dict[Request, type | None] = {
    Request.GET_FEATURES: None,
    Request.SET_FEATURES: U64,
    Request.SET_OWNER: None,
    Request.RESET_OWNER: None,
    Request.SET_MEM_TABLE: MemTable,
    Request.SET_LOG_BASE: LogBase,
    Request.SET_LOG_FD: None,
    Request.SET_VRING_NUM: VringState,
    Request.SET_VRING_ADDR: VringAddr,
    Request.SET_VRING_BASE: VringState,
    Request.GET_VRING_BASE: VringState,
    Request.SET_VRING_KICK: U64,
    Request.SET_VRING_CALL: U64,
    Request.SET_VRING_ERR: U64,
    Request.GET_PROTOCOL_FEATURES: None,
    Request.SET_PROTOCOL_FEATURES: U64,
    Request.GET_QUEUE_NUM: None,
    Request.SET_VRING_ENABLE: VringState,
    Request.SEND_RARP: U64,
    Request.NET_SET_MTU: U64,
    Request.GET_CONFIG: ConfigSpace,
    Request.SET_CONFIG: ConfigSpace,
    Request.RESET_DEVICE: None,
    Request.GET_MAX_MEM_SLOTS: None,
    Request.ADD_MEM_REG: SingleMemRegion,
    Request.REM_MEM_REG: SingleMemRegion,
    Request.SET_STATUS: U64,
    Request.GET_STATUS: None,
}

#: how many fds each request must carry: an int, or a range (lo, hi) inclusive
REQUEST_FDS: dict[Request, int | tuple[int, int]] = {
    Request.SET_MEM_TABLE: (1, MAX_MEM_TABLE_REGIONS),
    Request.SET_LOG_BASE: 1,
    Request.SET_LOG_FD: 1,
    Request.SET_VRING_KICK: (0, 1),
    Request.SET_VRING_CALL: (0, 1),
    Request.SET_VRING_ERR: (0, 1),
    Request.ADD_MEM_REG: 1,
    Request.REM_MEM_REG: (0, 1),   # QEMU sends the region's fd again; it is closed
    Request.SET_BACKEND_REQ_FD: 1,
    Request.SET_INFLIGHT_FD: 1,
}


@dataclass
class Message:
    """One message: request, flags, body bytes and the fds that came with it."""
    request: int
    flags: int = VERSION
    body: bytes = b""
    fds: list[int] = field(default_factory=list)

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & FLAG_NEED_REPLY)

    @property
    def is_reply(self) -> bool:
        return bool(self.flags & FLAG_REPLY)

    def name(self) -> str:
        try:
            return Request(self.request).name
        except ValueError:
            return f"request {self.request}"

    def header(self) -> bytes:
        return HEADER.pack(self.request, self.flags, len(self.body))


def vring_index_payload(index: int, fd: bool) -> U64:
    """The u64 of SET_VRING_KICK/CALL/ERR: the index, and the no-fd bit."""
    return U64(index | (0 if fd else VRING_NOFD_MASK))


# ---- SET_VRING_BASE / GET_VRING_BASE ------------------------------------------------------
#
# The ``num`` of a vring state carries a ring's position. Split ring: bits 0-15 the next
# available index (free-running), bits 16-31 reserved (zero). Packed ring (QEMU's
# virtio_queue_packed_{get,set}_last_avail_idx, vhost-user.rst "Vring descriptor indices
# for packed virtqueues"): bits 0-14 the next descriptor slot the device reads, bit 15
# the avail wrap counter, bits 16-30 the next slot the device writes a used element to,
# bit 31 the used wrap counter. A front-end that knows only the first half (DPDK, or
# QEMU relaying a back-end that answered GET_VRING_BASE with 16 bits) sends bits 16-31
# zero: the used position is then taken to be the avail one, as DPDK does.


def packed_ring_distance(ahead: int, behind: int, size: int) -> int:
    """How many slots position ``ahead`` is past ``behind`` (both slot | wrap << 15) on
    a packed ring of ``size``: 0 .. 2*size-1; at most ``size`` for a consistent pair."""
    def linear(v: int) -> int:
        return (v & PACKED_SLOT_MASK) + (0 if v & PACKED_WRAP else size)
    return (linear(ahead) - linear(behind)) % (2 * size)


def encode_vring_base(avail: int, used: int, *, packed: bool) -> int:
    """The ``num`` of SET/GET_VRING_BASE for a ring whose device side is at ``avail``
    (next available index; packed: slot | wrap << 15) and ``used`` (packed only)."""
    if packed:
        return (avail & 0xFFFF) | (used & 0xFFFF) << 16
    return avail & 0xFFFF


def decode_vring_base(num: int, *, packed: bool, size: int | None = None
                      ) -> tuple[int, int | None]:
    """``(avail, used)`` of a SET/GET_VRING_BASE ``num``, every bit checked: split →
    (index, None); packed → (slot | wrap << 15, the same for the used side, or None when
    bits 16-31 are zero). With ``size``, slots must be below it and the used position
    at most ``size`` slots behind the avail one. Raises :class:`ProtocolError`."""
    if not 0 <= num <= 0xFFFFFFFF:
        raise ProtocolError(f"vring base {num:#x} does not fit 32 bits")
    if not packed:
        if num > 0xFFFF:
            raise ProtocolError(f"vring base {num:#x}: a split ring's index has 16 bits "
                                "(bits 16-31 are reserved)")
        return num, None
    avail, used = num & 0xFFFF, num >> 16
    limit = MAX_QUEUE_SIZE if size is None else size
    if (avail & PACKED_SLOT_MASK) >= limit:
        raise ProtocolError(f"vring base {num:#x}: avail slot {avail & PACKED_SLOT_MASK} "
                            f"(bits 0-14) not below the ring size {limit}")
    if used == 0:
        return avail, None
    if (used & PACKED_SLOT_MASK) >= limit:
        raise ProtocolError(f"vring base {num:#x}: used slot {used & PACKED_SLOT_MASK} "
                            f"(bits 16-30) not below the ring size {limit}")
    if size is not None and packed_ring_distance(avail, used, size) > size:
        raise ProtocolError(
            f"vring base {num:#x}: the used position (slot {used & PACKED_SLOT_MASK}, wrap "
            f"{used >> 15}) is not within {size} slots behind the avail position (slot "
            f"{avail & PACKED_SLOT_MASK}, wrap {avail >> 15})")
    return avail, used


__all__ = [n for n in dir() if not n.startswith("_") and n not in ("annotations", "enum",
                                                                    "struct", "dataclass",
                                                                    "field", "ClassVar")]
