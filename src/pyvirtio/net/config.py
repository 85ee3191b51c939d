"""``virtio_net_config``: the network device's configuration space (VIRTIO 1.2 5.1.4).

Layout (little-endian, as the spec lays it out)::

    offset  0  u8[6]  mac                   always exists (valid with VIRTIO_NET_F_MAC)
            6  le16   status                exists with VIRTIO_NET_F_STATUS
            8  le16   max_virtqueue_pairs   exists with VIRTIO_NET_F_MQ (or _RSS)
           10  le16   mtu                   exists with VIRTIO_NET_F_MTU
           12  le32   speed                 exist with VIRTIO_NET_F_SPEED_DUPLEX
           16  u8     duplex
           17  u8     rss_max_key_size      (RSS / HASH_REPORT: not supported)

Choices where the spec leaves room (they follow QEMU):

* Which fields exist depends on the features the device *offers* (the driver reads the
  configuration before negotiating). The configuration space ends at the end of the
  last existing field: 6 bytes with none of STATUS/MQ/MTU/SPEED_DUPLEX, 17 with
  SPEED_DUPLEX. A field that does not exist but lies before that end reads as zeros.
* VIRTIO_NET_F_RSS and VIRTIO_NET_F_HASH_REPORT are refused (their fields and commands
  are not implemented).
* Every field is read-only for a VERSION_1 driver. Only a legacy driver (VERSION_1 not
  negotiated) that did not negotiate VIRTIO_NET_F_CTRL_MAC_ADDR may write ``mac`` (spec
  5.1.4.3), byte by byte if it likes; every other driver write is ignored and logged.
  The device changes fields through the properties, which call :attr:`NetConfig.on_change`.
"""

from __future__ import annotations

import logging
import struct
from dataclasses import dataclass
from typing import Callable

from vqcore.errors import VirtioError

from pyvirtio.device import ConfigAccessError
from pyvirtio.features import NetFeature, Transport

log = logging.getLogger(__name__)

VIRTIO_NET_S_LINK_UP = 1
VIRTIO_NET_S_ANNOUNCE = 2
#: every defined status bit
VIRTIO_NET_S_MASK = VIRTIO_NET_S_LINK_UP | VIRTIO_NET_S_ANNOUNCE

#: ``speed`` when unknown; a known speed is 0..0x7fffffff Mbit/s
VIRTIO_NET_SPEED_UNKNOWN = 0xFFFFFFFF
VIRTIO_NET_SPEED_MAX = 0x7FFFFFFF
VIRTIO_NET_DUPLEX_HALF = 0
VIRTIO_NET_DUPLEX_FULL = 1
VIRTIO_NET_DUPLEX_UNKNOWN = 0xFF

#: bounds of ``max_virtqueue_pairs`` and of VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET
VIRTIO_NET_CTRL_MQ_VQ_PAIRS_MIN = 1
VIRTIO_NET_CTRL_MQ_VQ_PAIRS_MAX = 0x8000
#: bounds of ``mtu`` (spec 5.1.4.1)
MTU_MIN = 68
MTU_MAX = 65535

ETH_ALEN = 6


class NetConfigError(VirtioError, ValueError):
    """A configuration value is out of range, or a feature set the model cannot serve."""


@dataclass(frozen=True)
class ConfigField:
    """One field of ``virtio_net_config``: offset, size, struct format, the features
    that make it exist (any one; none means it always exists)."""
    name: str
    offset: int
    size: int
    fmt: str
    features: tuple[NetFeature, ...]

    @property
    def end(self) -> int:
        """The offset just after the field."""
        return self.offset + self.size


#: the fields this model supports, in layout order
FIELDS: tuple[ConfigField, ...] = (
    ConfigField("mac", 0, 6, "6s", ()),
    ConfigField("status", 6, 2, "<H", (NetFeature.STATUS,)),
    ConfigField("max_virtqueue_pairs", 8, 2, "<H", (NetFeature.MQ, NetFeature.RSS)),
    ConfigField("mtu", 10, 2, "<H", (NetFeature.MTU,)),
    ConfigField("speed", 12, 4, "<I", (NetFeature.SPEED_DUPLEX,)),
    ConfigField("duplex", 16, 1, "<B", (NetFeature.SPEED_DUPLEX,)),
)
FIELD_BY_NAME = {f.name: f for f in FIELDS}
#: size of the struct through the last supported field (``duplex``)
CONFIG_SIZE = FIELDS[-1].end

#: features whose configuration fields or commands this model does not implement
UNSUPPORTED = NetFeature.RSS | NetFeature.HASH_REPORT


class NetConfig:
    """The configuration space of one virtio-net device.

    ``features`` are the features the device offers: they decide which fields exist
    and the size. The keyword arguments are the initial field values.
    """

    def __init__(self, features: int, *, mac: bytes = bytes(6),
                 status: int = VIRTIO_NET_S_LINK_UP, max_virtqueue_pairs: int = 1,
                 mtu: int = 1500, speed: int = VIRTIO_NET_SPEED_UNKNOWN,
                 duplex: int = VIRTIO_NET_DUPLEX_UNKNOWN) -> None:
        if features & UNSUPPORTED:
            raise NetConfigError("VIRTIO_NET_F_RSS and VIRTIO_NET_F_HASH_REPORT are not "
                                 "supported")
        self.features = int(features)
        #: called after the device changed a field's value
        self.on_change: Callable[[], None] | None = None
        self._values: dict[str, int | bytes] = {}
        self.mac = mac
        self.status = status
        self.max_virtqueue_pairs = max_virtqueue_pairs
        self.mtu = mtu
        self.speed = speed
        self.duplex = duplex

    # ---- layout ------------------------------------------------------------------------

    def has_field(self, name: str) -> bool:
        """Whether field ``name`` exists with the offered features."""
        field = FIELD_BY_NAME[name]
        return not field.features or any(self.features & f for f in field.features)

    @property
    def size(self) -> int:
        """Size of the configuration space: the end of the last existing field."""
        return max(f.end for f in FIELDS if self.has_field(f.name))

    def __len__(self) -> int:
        return self.size

    def to_bytes(self) -> bytes:
        """The whole configuration space as the driver reads it."""
        image = bytearray(self.size)
        for field in FIELDS:
            if field.end <= self.size and self.has_field(field.name):
                struct.pack_into(field.fmt, image, field.offset, self._values[field.name])
        return bytes(image)

    def _check_range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise ConfigAccessError(f"virtio_net_config access [{offset}, {offset + length}) "
                                    f"outside its {self.size} bytes")

    def read(self, offset: int, length: int) -> bytes:
        """The driver reads ``length`` bytes at ``offset``."""
        self._check_range(offset, length)
        return self.to_bytes()[offset:offset + length]

    def write(self, offset: int, data: bytes, *, features: int) -> bool:
        """The driver writes ``data`` at ``offset``; ``features`` are the negotiated ones.

        Only a legacy driver without VIRTIO_NET_F_CTRL_MAC_ADDR may write ``mac`` (the
        part of the write inside ``mac`` is applied); everything else is ignored.
        Returns whether the configuration changed.
        """
        data = bytes(data)
        self._check_range(offset, len(data))
        legacy_mac = not features & Transport.VERSION_1 and not features & NetFeature.CTRL_MAC_ADDR
        mac_end = FIELD_BY_NAME["mac"].end
        if not legacy_mac or offset >= mac_end:
            log.debug("driver write to read-only virtio_net_config [%d, %d) ignored",
                      offset, offset + len(data))
            return False
        part = data[:mac_end - offset]
        mac = bytearray(self.mac)
        mac[offset:offset + len(part)] = part
        if len(part) < len(data):
            log.debug("driver write past mac in virtio_net_config ignored")
        changed = bytes(mac) != self.mac
        self._values["mac"] = bytes(mac)
        return changed

    # ---- fields (the device's side) ----------------------------------------------------

    def _set(self, name: str, value: int | bytes) -> None:
        old = self._values.get(name)
        self._values[name] = value
        if old is not None and old != value and self.on_change is not None:
            self.on_change()

    @staticmethod
    def _check_int(name: str, value: int, low: int, high: int) -> int:
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            raise NetConfigError(f"{name} {value!r} is not in {low}..{high}")
        return int(value)

    @property
    def mac(self) -> bytes:
        """The device's MAC address (6 bytes)."""
        return bytes(self._values["mac"])  # type: ignore[arg-type]

    @mac.setter
    def mac(self, value: bytes) -> None:
        value = bytes(value)
        if len(value) != ETH_ALEN:
            raise NetConfigError(f"a MAC address is {ETH_ALEN} bytes, not {len(value)}")
        self._set("mac", value)

    @property
    def status(self) -> int:
        """The ``status`` field: VIRTIO_NET_S_LINK_UP | VIRTIO_NET_S_ANNOUNCE."""
        return int(self._values["status"])  # type: ignore[arg-type]

    @status.setter
    def status(self, value: int) -> None:
        self._check_int("status", value, 0, 0xFFFF)
        if value & ~VIRTIO_NET_S_MASK:
            raise NetConfigError(f"unknown status bits {value & ~VIRTIO_NET_S_MASK:#x}")
        self._set("status", value)

    @property
    def link_up(self) -> bool:
        """VIRTIO_NET_S_LINK_UP."""
        return bool(self.status & VIRTIO_NET_S_LINK_UP)

    @link_up.setter
    def link_up(self, up: bool) -> None:
        self.status = (self.status | VIRTIO_NET_S_LINK_UP if up
                       else self.status & ~VIRTIO_NET_S_LINK_UP)

    @property
    def announce(self) -> bool:
        """VIRTIO_NET_S_ANNOUNCE: the device asks the driver to announce itself."""
        return bool(self.status & VIRTIO_NET_S_ANNOUNCE)

    @announce.setter
    def announce(self, on: bool) -> None:
        self.status = (self.status | VIRTIO_NET_S_ANNOUNCE if on
                       else self.status & ~VIRTIO_NET_S_ANNOUNCE)

    def ack_announce(self) -> None:
        """VIRTIO_NET_CTRL_ANNOUNCE_ACK: clear VIRTIO_NET_S_ANNOUNCE."""
        self.announce = False

    @property
    def max_virtqueue_pairs(self) -> int:
        """How many receive/transmit queue pairs the device has (1..0x8000)."""
        return int(self._values["max_virtqueue_pairs"])  # type: ignore[arg-type]

    @max_virtqueue_pairs.setter
    def max_virtqueue_pairs(self, value: int) -> None:
        self._set("max_virtqueue_pairs", self._check_int(
            "max_virtqueue_pairs", value, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_MIN,
            VIRTIO_NET_CTRL_MQ_VQ_PAIRS_MAX))

    @property
    def mtu(self) -> int:
        """The largest MTU the driver may use (68..65535)."""
        return int(self._values["mtu"])  # type: ignore[arg-type]

    @mtu.setter
    def mtu(self, value: int) -> None:
        self._set("mtu", self._check_int("mtu", value, MTU_MIN, MTU_MAX))

    @property
    def speed(self) -> int:
        """Link speed in Mbit/s (0..0x7fffffff) or VIRTIO_NET_SPEED_UNKNOWN."""
        return int(self._values["speed"])  # type: ignore[arg-type]

    @speed.setter
    def speed(self, value: int) -> None:
        if value != VIRTIO_NET_SPEED_UNKNOWN:
            self._check_int("speed", value, 0, VIRTIO_NET_SPEED_MAX)
        self._set("speed", value)

    @property
    def duplex(self) -> int:
        """VIRTIO_NET_DUPLEX_HALF, _FULL or _UNKNOWN."""
        return int(self._values["duplex"])  # type: ignore[arg-type]

    @duplex.setter
    def duplex(self, value: int) -> None:
        if value not in (VIRTIO_NET_DUPLEX_HALF, VIRTIO_NET_DUPLEX_FULL,
                         VIRTIO_NET_DUPLEX_UNKNOWN):
            raise NetConfigError(f"duplex {value!r} is not 0 (half), 1 (full) or 0xff")
        self._set("duplex", value)

    def __repr__(self) -> str:
        return (f"<NetConfig mac={self.mac.hex(':')} status={self.status:#x} "
                f"pairs={self.max_virtqueue_pairs} mtu={self.mtu} size={self.size}>")


__all__ = ["NetConfig", "NetConfigError", "ConfigField", "FIELDS", "CONFIG_SIZE",
           "VIRTIO_NET_S_LINK_UP", "VIRTIO_NET_S_ANNOUNCE", "VIRTIO_NET_S_MASK",
           "VIRTIO_NET_SPEED_UNKNOWN", "VIRTIO_NET_SPEED_MAX", "VIRTIO_NET_DUPLEX_HALF",
           "VIRTIO_NET_DUPLEX_FULL", "VIRTIO_NET_DUPLEX_UNKNOWN",
           "VIRTIO_NET_CTRL_MQ_VQ_PAIRS_MIN", "VIRTIO_NET_CTRL_MQ_VQ_PAIRS_MAX", "MTU_MIN",
           "MTU_MAX", "ETH_ALEN"]
