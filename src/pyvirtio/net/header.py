"""``virtio_net_hdr`` (VIRTIO 1.2 section 5.1.6): the header before every packet.

With VIRTIO_F_VERSION_1 the header is always 12 bytes, ``num_buffers`` included
(whether or not VIRTIO_NET_F_MRG_RXBUF was negotiated), all fields little-endian::

    offset 0  u8    flags
           1  u8    gso_type
           2  le16  hdr_len
           4  le16  gso_size
           6  le16  csum_start
           8  le16  csum_offset
          10  le16  num_buffers

(VIRTIO_NET_F_HASH_REPORT's 20-byte header is not supported.)

:meth:`VirtioNetHdr.check_tx` checks a header the driver sent against the negotiated
features (spec 5.1.6.2.1), :meth:`VirtioNetHdr.check_rx` one the device is about to give
the driver (5.1.6.3.1/5.1.6.4.1); both raise :class:`NetHeaderError` naming the rule.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

from vqcore.errors import VirtioError

from pyvirtio.features import NetFeature

#: the header's size with VIRTIO_F_VERSION_1
HDR_LEN = 12

VIRTIO_NET_HDR_F_NEEDS_CSUM = 1
VIRTIO_NET_HDR_F_DATA_VALID = 2
VIRTIO_NET_HDR_F_RSC_INFO = 4
#: every defined flag
VIRTIO_NET_HDR_F_MASK = (VIRTIO_NET_HDR_F_NEEDS_CSUM | VIRTIO_NET_HDR_F_DATA_VALID
                         | VIRTIO_NET_HDR_F_RSC_INFO)

VIRTIO_NET_HDR_GSO_NONE = 0
VIRTIO_NET_HDR_GSO_TCPV4 = 1
VIRTIO_NET_HDR_GSO_UDP = 3
VIRTIO_NET_HDR_GSO_TCPV6 = 4
VIRTIO_NET_HDR_GSO_UDP_L4 = 5
VIRTIO_NET_HDR_GSO_ECN = 0x80

#: gso_type (without the ECN bit) -> spec name
GSO_NAMES = {
    VIRTIO_NET_HDR_GSO_NONE: "VIRTIO_NET_HDR_GSO_NONE",
    VIRTIO_NET_HDR_GSO_TCPV4: "VIRTIO_NET_HDR_GSO_TCPV4",
    VIRTIO_NET_HDR_GSO_UDP: "VIRTIO_NET_HDR_GSO_UDP",
    VIRTIO_NET_HDR_GSO_TCPV6: "VIRTIO_NET_HDR_GSO_TCPV6",
    VIRTIO_NET_HDR_GSO_UDP_L4: "VIRTIO_NET_HDR_GSO_UDP_L4",
}

#: gso_type -> the feature the driver needs to send it (any one of them)
TX_GSO_FEATURES: dict[int, tuple[NetFeature, ...]] = {
    VIRTIO_NET_HDR_GSO_TCPV4: (NetFeature.HOST_TSO4,),
    VIRTIO_NET_HDR_GSO_TCPV6: (NetFeature.HOST_TSO6,),
    VIRTIO_NET_HDR_GSO_UDP: (NetFeature.HOST_UFO,),
    VIRTIO_NET_HDR_GSO_UDP_L4: (NetFeature.HOST_USO,),
}
#: gso_type -> the feature the device needs to give it to the driver (any one of them)
RX_GSO_FEATURES: dict[int, tuple[NetFeature, ...]] = {
    VIRTIO_NET_HDR_GSO_TCPV4: (NetFeature.GUEST_TSO4,),
    VIRTIO_NET_HDR_GSO_TCPV6: (NetFeature.GUEST_TSO6,),
    VIRTIO_NET_HDR_GSO_UDP: (NetFeature.GUEST_UFO,),
    VIRTIO_NET_HDR_GSO_UDP_L4: (NetFeature.GUEST_USO4, NetFeature.GUEST_USO6),
}

_STRUCT = struct.Struct("<BBHHHHH")
assert _STRUCT.size == HDR_LEN


class NetHeaderError(VirtioError, ValueError):
    """A ``virtio_net_hdr`` is malformed or uses a feature that was not negotiated."""


def _names(features: tuple[NetFeature, ...]) -> str:
    return " or ".join(f"VIRTIO_NET_F_{f.name}" for f in features)


@dataclass
class VirtioNetHdr:
    """One ``virtio_net_hdr`` (VERSION_1 layout, 12 bytes)."""
    flags: int = 0
    gso_type: int = VIRTIO_NET_HDR_GSO_NONE
    hdr_len: int = 0
    gso_size: int = 0
    csum_start: int = 0
    csum_offset: int = 0
    num_buffers: int = 0

    def __post_init__(self) -> None:
        for name, limit in (("flags", 0xFF), ("gso_type", 0xFF), ("hdr_len", 0xFFFF),
                            ("gso_size", 0xFFFF), ("csum_start", 0xFFFF),
                            ("csum_offset", 0xFFFF), ("num_buffers", 0xFFFF)):
            value = getattr(self, name)
            if not isinstance(value, int) or not 0 <= value <= limit:
                raise NetHeaderError(f"{name} {value!r} is not in 0..{limit:#x}")

    # ---- wire format -------------------------------------------------------------------

    def pack(self) -> bytes:
        """The 12 header bytes."""
        return _STRUCT.pack(self.flags, self.gso_type, self.hdr_len, self.gso_size,
                            self.csum_start, self.csum_offset, self.num_buffers)

    def pack_into(self, buffer: Any, offset: int = 0) -> None:
        """Write the header into a writable buffer (memoryview, bytearray, numpy) at
        ``offset``."""
        view = memoryview(buffer).cast("B")
        if offset < 0 or offset + HDR_LEN > view.nbytes:
            raise NetHeaderError(f"no room for a {HDR_LEN}-byte header at offset {offset} "
                                 f"of a {view.nbytes}-byte buffer")
        _STRUCT.pack_into(view, offset, self.flags, self.gso_type, self.hdr_len,
                          self.gso_size, self.csum_start, self.csum_offset, self.num_buffers)

    @classmethod
    def unpack(cls, data: Any) -> "VirtioNetHdr":
        """Parse exactly 12 bytes."""
        view = memoryview(data).cast("B")
        if view.nbytes != HDR_LEN:
            raise NetHeaderError(f"a virtio_net_hdr is {HDR_LEN} bytes, not {view.nbytes}")
        return cls(*_STRUCT.unpack(view))

    @classmethod
    def unpack_from(cls, buffer: Any, offset: int = 0) -> "VirtioNetHdr":
        """Parse the header at ``offset`` of a longer buffer (a packet with its header)."""
        view = memoryview(buffer).cast("B")
        if offset < 0 or offset + HDR_LEN > view.nbytes:
            raise NetHeaderError(f"a {view.nbytes}-byte buffer has no {HDR_LEN}-byte header "
                                 f"at offset {offset}")
        return cls(*_STRUCT.unpack_from(view, offset))

    # ---- meaning -----------------------------------------------------------------------

    @property
    def gso(self) -> int:
        """``gso_type`` without the ECN bit."""
        return self.gso_type & ~VIRTIO_NET_HDR_GSO_ECN

    @property
    def ecn(self) -> bool:
        """Whether the ECN bit of ``gso_type`` is set."""
        return bool(self.gso_type & VIRTIO_NET_HDR_GSO_ECN)

    @property
    def needs_csum(self) -> bool:
        """Whether VIRTIO_NET_HDR_F_NEEDS_CSUM is set."""
        return bool(self.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM)

    def check_format(self, packet_len: int | None = None) -> None:
        """Checks independent of the features: known flags and GSO type, ECN only with a
        GSO type, a GSO header with NEEDS_CSUM and a non-zero ``gso_size``, and the
        checksum field inside the packet (when ``packet_len``, the length after the
        header, is given, and RSC_INFO does not repurpose ``csum_start``/``csum_offset``)."""
        if self.flags & ~VIRTIO_NET_HDR_F_MASK:
            raise NetHeaderError(f"unknown flags {self.flags & ~VIRTIO_NET_HDR_F_MASK:#x}")
        if self.gso not in GSO_NAMES:
            raise NetHeaderError(f"unknown gso_type {self.gso_type:#x}")
        if self.gso == VIRTIO_NET_HDR_GSO_NONE:
            if self.ecn:
                raise NetHeaderError("VIRTIO_NET_HDR_GSO_ECN without a GSO type")
        else:
            if not self.needs_csum:
                raise NetHeaderError(f"{GSO_NAMES[self.gso]} without "
                                     "VIRTIO_NET_HDR_F_NEEDS_CSUM")
            if self.gso_size == 0:
                raise NetHeaderError(f"{GSO_NAMES[self.gso]} with gso_size 0")
        rsc = self.flags & VIRTIO_NET_HDR_F_RSC_INFO   # csum_* then count segments
        if self.needs_csum and not rsc and packet_len is not None:
            end = self.csum_start + self.csum_offset + 2
            if end > packet_len:
                raise NetHeaderError(f"checksum field at {self.csum_start}+{self.csum_offset} "
                                     f"lies outside the {packet_len}-byte packet")

    def check_tx(self, features: int, packet_len: int | None = None) -> None:
        """Check a header the driver sent (spec 5.1.6.2.1) against ``features``."""
        self.check_format(packet_len)
        if self.flags & (VIRTIO_NET_HDR_F_DATA_VALID | VIRTIO_NET_HDR_F_RSC_INFO):
            raise NetHeaderError("the driver must not set VIRTIO_NET_HDR_F_DATA_VALID or "
                                 "VIRTIO_NET_HDR_F_RSC_INFO")
        if self.needs_csum and not features & NetFeature.CSUM:
            raise NetHeaderError("VIRTIO_NET_HDR_F_NEEDS_CSUM without VIRTIO_NET_F_CSUM")
        need = TX_GSO_FEATURES.get(self.gso)
        if need and not any(features & f for f in need):
            raise NetHeaderError(f"{GSO_NAMES[self.gso]} without {_names(need)}")
        if self.ecn and not features & NetFeature.HOST_ECN:
            raise NetHeaderError("VIRTIO_NET_HDR_GSO_ECN without VIRTIO_NET_F_HOST_ECN")

    def check_rx(self, features: int, packet_len: int | None = None) -> None:
        """Check a header the device is about to give the driver (spec 5.1.6.4.1)."""
        self.check_format(packet_len)
        csum_flags = VIRTIO_NET_HDR_F_NEEDS_CSUM | VIRTIO_NET_HDR_F_DATA_VALID
        if self.flags & csum_flags and not features & NetFeature.GUEST_CSUM:
            raise NetHeaderError("checksum flags without VIRTIO_NET_F_GUEST_CSUM")
        if self.flags & VIRTIO_NET_HDR_F_RSC_INFO and not features & NetFeature.RSC_EXT:
            raise NetHeaderError("VIRTIO_NET_HDR_F_RSC_INFO without VIRTIO_NET_F_RSC_EXT")
        need = RX_GSO_FEATURES.get(self.gso)
        if need and not any(features & f for f in need):
            raise NetHeaderError(f"{GSO_NAMES[self.gso]} without {_names(need)}")
        if self.ecn and not features & NetFeature.GUEST_ECN:
            raise NetHeaderError("VIRTIO_NET_HDR_GSO_ECN without VIRTIO_NET_F_GUEST_ECN")
        if features & NetFeature.MRG_RXBUF:
            if self.num_buffers < 1:
                raise NetHeaderError("num_buffers must be at least 1 with "
                                     "VIRTIO_NET_F_MRG_RXBUF")
        elif self.num_buffers != 1:
            raise NetHeaderError("num_buffers must be 1 without VIRTIO_NET_F_MRG_RXBUF")


__all__ = ["VirtioNetHdr", "NetHeaderError", "HDR_LEN", "VIRTIO_NET_HDR_F_NEEDS_CSUM",
           "VIRTIO_NET_HDR_F_DATA_VALID", "VIRTIO_NET_HDR_F_RSC_INFO",
           "VIRTIO_NET_HDR_F_MASK", "VIRTIO_NET_HDR_GSO_NONE", "VIRTIO_NET_HDR_GSO_TCPV4",
           "VIRTIO_NET_HDR_GSO_UDP", "VIRTIO_NET_HDR_GSO_TCPV6",
           "VIRTIO_NET_HDR_GSO_UDP_L4", "VIRTIO_NET_HDR_GSO_ECN", "GSO_NAMES",
           "TX_GSO_FEATURES", "RX_GSO_FEATURES"]
