"""The control virtqueue of virtio-net (VIRTIO 1.2 section 5.1.6.5).

Each driver command is one chain: device-readable ``struct virtio_net_ctrl`` header
(``u8 class; u8 command``) and command data, then one device-writable ``u8 ack``
(VIRTIO_NET_OK or VIRTIO_NET_ERR)::

    class                          command                 data                   needs
    VIRTIO_NET_CTRL_RX (0)         PROMISC, ALLMULTI       u8 on                  CTRL_RX
                                   ALLUNI, NOMULTI,        u8 on                  CTRL_RX_EXTRA
                                   NOUNI, NOBCAST
    VIRTIO_NET_CTRL_MAC (1)        TABLE_SET               le32 n, n*6, le32 m, m*6  CTRL_RX
                                   ADDR_SET                u8 mac[6]              CTRL_MAC_ADDR
    VIRTIO_NET_CTRL_VLAN (2)       ADD, DEL                le16 vid (< 4096)      CTRL_VLAN
    VIRTIO_NET_CTRL_ANNOUNCE (3)   ACK                     (none)                 GUEST_ANNOUNCE
    VIRTIO_NET_CTRL_MQ (4)         VQ_PAIRS_SET            le16 pairs, 1..max     MQ
    VIRTIO_NET_CTRL_GUEST_OFFLOADS (5)  SET                le64 offloads          CTRL_GUEST_OFFLOADS

:class:`ControlQueue` pops every available command per :meth:`~ControlQueue.process`
call, checks it and applies it to a :class:`NetControlTarget` (the net device), writes
the ack into the first device-writable byte and returns the chain with used length 1.

What counts as malformed (answered VIRTIO_NET_ERR, never raised):

* fewer than two readable bytes (no complete header: the chain is empty of readable
  data, or the header sits in device-writable descriptors);
* data shorter or longer than the command's fixed layout (the spec gives each command
  an exact layout, so trailing bytes are an error too), a MAC table whose counts do
  not match its length;
* an unknown class or command, or one whose feature was not negotiated;
* values out of range (VLAN id >= 4096, pairs outside 1..max_virtqueue_pairs, an offload
  bit that is not a negotiated GUEST_* offload) or refused by the target.

A chain with no device-writable byte gets no ack: its command is not applied, and it is
returned with used length 0 and logged. A guest that breaks the ring itself (:class:`~vqcore.errors.RingViolation`)
breaks the queue: the commands popped before the bad chain are still answered, the
error is reported to ``on_error`` (the device sets DEVICE_NEEDS_RESET) and
:meth:`~ControlQueue.process` returns normally.

VIRTIO_NET_CTRL_ANNOUNCE_ACK is answered OK whether or not the ANNOUNCE bit was set
(the spec only says the device clears it; QEMU answers ERR when it was clear).
GUEST_OFFLOADS_SET checks that the offloads are a subset of the negotiated GUEST_*
offload features, not their mutual dependencies (as QEMU and the spec's device
requirements do).
"""

from __future__ import annotations

import enum
import logging
import struct
from typing import Callable, Protocol, Sequence

import vqcore
from vqcore.errors import QueueError, RingViolation

from pyvirtio.features import NetFeature
from pyvirtio.net.config import (ETH_ALEN, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_MAX,
                                 VIRTIO_NET_CTRL_MQ_VQ_PAIRS_MIN)

log = logging.getLogger(__name__)

VIRTIO_NET_OK = 0
VIRTIO_NET_ERR = 1

VIRTIO_NET_CTRL_RX = 0
VIRTIO_NET_CTRL_RX_PROMISC = 0
VIRTIO_NET_CTRL_RX_ALLMULTI = 1
VIRTIO_NET_CTRL_RX_ALLUNI = 2
VIRTIO_NET_CTRL_RX_NOMULTI = 3
VIRTIO_NET_CTRL_RX_NOUNI = 4
VIRTIO_NET_CTRL_RX_NOBCAST = 5

VIRTIO_NET_CTRL_MAC = 1
VIRTIO_NET_CTRL_MAC_TABLE_SET = 0
VIRTIO_NET_CTRL_MAC_ADDR_SET = 1

VIRTIO_NET_CTRL_VLAN = 2
VIRTIO_NET_CTRL_VLAN_ADD = 0
VIRTIO_NET_CTRL_VLAN_DEL = 1

VIRTIO_NET_CTRL_ANNOUNCE = 3
VIRTIO_NET_CTRL_ANNOUNCE_ACK = 0

VIRTIO_NET_CTRL_MQ = 4
VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET = 0
VIRTIO_NET_CTRL_MQ_RSS_CONFIG = 1
VIRTIO_NET_CTRL_MQ_HASH_CONFIG = 2

VIRTIO_NET_CTRL_GUEST_OFFLOADS = 5
VIRTIO_NET_CTRL_GUEST_OFFLOADS_SET = 0

#: VLAN ids are 12 bits (802.1Q)
VLAN_ID_LIMIT = 4096

#: the GUEST_* features VIRTIO_NET_CTRL_GUEST_OFFLOADS_SET may turn on and off
GUEST_OFFLOADS = (NetFeature.GUEST_CSUM | NetFeature.GUEST_TSO4 | NetFeature.GUEST_TSO6
                  | NetFeature.GUEST_ECN | NetFeature.GUEST_UFO | NetFeature.GUEST_USO4
                  | NetFeature.GUEST_USO6)

#: a command with more readable bytes is refused without being copied (a MAC table of
#: about 87000 entries; the largest real command)
MAX_COMMAND_LEN = 1 << 19

#: RX class command -> (NetRxFilter attribute, feature it needs)
RX_COMMANDS: dict[int, tuple[str, NetFeature]] = {
    VIRTIO_NET_CTRL_RX_PROMISC: ("promisc", NetFeature.CTRL_RX),
    VIRTIO_NET_CTRL_RX_ALLMULTI: ("allmulti", NetFeature.CTRL_RX),
    VIRTIO_NET_CTRL_RX_ALLUNI: ("alluni", NetFeature.CTRL_RX_EXTRA),
    VIRTIO_NET_CTRL_RX_NOMULTI: ("nomulti", NetFeature.CTRL_RX_EXTRA),
    VIRTIO_NET_CTRL_RX_NOUNI: ("nouni", NetFeature.CTRL_RX_EXTRA),
    VIRTIO_NET_CTRL_RX_NOBCAST: ("nobcast", NetFeature.CTRL_RX_EXTRA),
}

_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


class CtrlError(enum.Enum):
    """Why a command was answered VIRTIO_NET_ERR (kept in :attr:`ControlQueue.errors`)."""
    NO_HEADER = "no complete class/command header in the readable part"
    TOO_LONG = "more readable bytes than any command has"
    UNKNOWN_CLASS = "unknown class"
    UNKNOWN_COMMAND = "unknown command"
    NOT_NEGOTIATED = "the command's feature was not negotiated"
    BAD_LENGTH = "command data of the wrong length"
    BAD_VALUE = "a value out of range"
    REFUSED = "the device refused the command"
    NO_ACK_BYTE = "no device-writable byte for the ack"


class RxFilter(Protocol):
    """What the control queue changes in the RX filter (``vqcore.net.NetRxFilter``)."""
    mac: bytes
    promisc: bool
    allmulti: bool
    alluni: bool
    nomulti: bool
    nouni: bool
    nobcast: bool

    def set_mac_table(self, unicast: Sequence[bytes], multicast: Sequence[bytes]) -> None:
        """Replace the MAC filter tables."""

    def vlan_add(self, vid: int) -> None:
        """Accept VLAN ``vid``."""

    def vlan_del(self, vid: int) -> None:
        """Stop accepting VLAN ``vid``."""


class NetControlTarget(Protocol):
    """The device the control queue acts on (the virtio-net device implements it).

    The handler checks each command's form, feature and range before it calls a method;
    a method that raises (any exception) makes the command answer VIRTIO_NET_ERR.
    """

    @property
    def negotiated_features(self) -> int:
        """The negotiated feature bits."""

    @property
    def max_virtqueue_pairs(self) -> int:
        """``max_virtqueue_pairs`` of the configuration space."""

    @property
    def rx_filter(self) -> RxFilter:
        """The RX filter that RX, MAC and VLAN commands change."""

    def mac_address_set(self, mac: bytes) -> None:
        """VIRTIO_NET_CTRL_MAC_ADDR_SET was applied to the RX filter: reflect ``mac`` in
        the configuration space (spec 5.1.6.5.2)."""

    def set_queue_pairs(self, pairs: int) -> None:
        """VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET: use ``pairs`` queue pairs from now on."""

    def ack_announce(self) -> None:
        """VIRTIO_NET_CTRL_ANNOUNCE_ACK: clear VIRTIO_NET_S_ANNOUNCE."""

    def set_guest_offloads(self, offloads: int) -> None:
        """VIRTIO_NET_CTRL_GUEST_OFFLOADS_SET: the GUEST_* offloads now enabled."""


class _Refused(Exception):
    """Internal: answer VIRTIO_NET_ERR for this reason."""

    def __init__(self, reason: CtrlError, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def _exact(data: bytes, n: int, what: str) -> bytes:
    if len(data) != n:
        raise _Refused(CtrlError.BAD_LENGTH, f"{what}: {len(data)} data bytes, expected {n}")
    return data


def parse_mac_table(data: bytes) -> tuple[list[bytes], list[bytes]]:
    """Parse VIRTIO_NET_CTRL_MAC_TABLE_SET data: two ``le32 entries; u8 macs[entries][6]``
    tables (unicast, then multicast) filling ``data`` exactly. Raises ValueError."""
    tables: list[list[bytes]] = []
    pos = 0
    for kind in ("unicast", "multicast"):
        if len(data) - pos < 4:
            raise ValueError(f"{kind} table: no entry count")
        (count,) = _U32.unpack_from(data, pos)
        pos += 4
        if count > (len(data) - pos) // ETH_ALEN:
            raise ValueError(f"{kind} table: {count} entries do not fit "
                             f"{len(data) - pos} bytes")
        tables.append([data[pos + i * ETH_ALEN:pos + (i + 1) * ETH_ALEN] for i in range(count)])
        pos += count * ETH_ALEN
    if pos != len(data):
        raise ValueError(f"{len(data) - pos} bytes after the multicast table")
    return tables[0], tables[1]


class ControlQueue:
    """Answers the driver's commands on the control virtqueue.

    Args:
        queue: the device side of the control virtqueue.
        target: what the commands act on.
        batch: the batch chains are popped into (default: 64 chains, room for chains of
            up to ``2 * queue.size`` segments).
        on_error: called with the :class:`~vqcore.errors.QueueError` when the queue
            cannot go on: the guest broke the ring (a
            :class:`~vqcore.errors.RingViolation`; the queue is broken until reset) or a
            chain does not fit ``batch`` (:class:`~vqcore.errors.BatchTooSmall`).
    """

    def __init__(self, queue: vqcore.DeviceQueue, target: NetControlTarget, *,
                 batch: vqcore.ChainBatch | None = None,
                 on_error: Callable[[QueueError], None] | None = None) -> None:
        self.queue = queue
        self.target = target
        self.batch = batch if batch is not None else vqcore.ChainBatch(
            64, max(1024, 2 * queue.size + 2))
        self.on_error = on_error
        #: commands answered VIRTIO_NET_OK
        self.ok = 0
        #: reason -> how many commands were answered VIRTIO_NET_ERR (or got no ack)
        self.errors: dict[CtrlError, int] = {}
        #: the last command's outcome: (class, command, ack or None, reason or None)
        self.last: tuple[int, int, int | None, CtrlError | None] | None = None
        self._logged: set[CtrlError] = set()

    # ---- the queue loop ----------------------------------------------------------------

    def process(self) -> int:
        """Answer every available command; returns how many chains were returned.

        Never raises for anything the guest did: malformed commands are answered
        VIRTIO_NET_ERR, ring violations go to ``on_error``.
        """
        total = 0
        batch = self.batch
        while not self.queue.broken:
            violation: QueueError | None = None
            try:
                n = self.queue.pop(batch)
            except RingViolation as exc:
                violation = exc
                n = batch.count
            except QueueError as exc:      # BatchTooSmall: our batch, not the guest
                violation = exc
                n = batch.count
            for i in range(n):
                batch.used_len[i] = self._answer(i)
            if n:
                self.queue.push_used(batch, n)
                total += n
            if violation is not None:
                self._report(violation)
                break
            if n == 0:
                break
        return total

    def _report(self, exc: QueueError) -> None:
        log.warning("%s: control queue stopped: %s", self.queue.name, exc)
        if self.on_error is not None:
            self.on_error(exc)

    def _answer(self, i: int) -> int:
        """Handle chain ``i`` of the batch; returns its used length."""
        batch = self.batch
        nread = int(batch.readable_segments[i])
        start = int(batch.seg_start[i])
        readable = int(batch.readable_bytes[i])
        cls = cmd = -1
        if int(batch.seg_start[i + 1]) - start == nread:
            # no device-writable byte: the command cannot be answered, so it is not run
            if 2 <= readable <= MAX_COMMAND_LEN:
                cls, cmd = batch.chain_bytes(i)[:2]
            return self._no_ack(cls, cmd, "chain has no device-writable byte")
        try:
            if readable > MAX_COMMAND_LEN:
                raise _Refused(CtrlError.TOO_LONG, f"{readable} readable bytes")
            data = batch.chain_bytes(i)
            if len(data) < 2:
                raise _Refused(CtrlError.NO_HEADER, f"{len(data)} readable bytes")
            cls, cmd = data[0], data[1]
            self._execute(cls, cmd, data[2:])
            ack, reason = VIRTIO_NET_OK, None
        except _Refused as exc:
            ack, reason = VIRTIO_NET_ERR, exc.reason
            self._note(reason, cls, cmd, exc.detail)
        except Exception as exc:   # a target method failed: ERR, never out of the loop
            ack, reason = VIRTIO_NET_ERR, CtrlError.REFUSED
            self._note(reason, cls, cmd, f"{type(exc).__name__}: {exc}")
        gpa = int(batch.seg_addr[start + nread])
        try:
            self.queue.memory.write(gpa, bytes((ack,)))
        except Exception as exc:   # the walk checked the segment; be safe anyway
            return self._no_ack(cls, cmd, f"ack write failed: {exc}")
        if ack == VIRTIO_NET_OK:
            self.ok += 1
        self.last = (cls, cmd, ack, reason)
        return 1

    def _no_ack(self, cls: int, cmd: int, detail: str) -> int:
        self._note(CtrlError.NO_ACK_BYTE, cls, cmd, detail)
        self.last = (cls, cmd, None, CtrlError.NO_ACK_BYTE)
        return 0

    def _note(self, reason: CtrlError, cls: int, cmd: int, detail: str) -> None:
        self.errors[reason] = self.errors.get(reason, 0) + 1
        level = logging.DEBUG if reason in self._logged else logging.WARNING
        self._logged.add(reason)
        log.log(level, "%s: ctrl command class %d command %d: %s (%s)", self.queue.name,
                cls, cmd, reason.value, detail)

    # ---- the commands ------------------------------------------------------------------

    def _need(self, feature: NetFeature) -> None:
        if not self.target.negotiated_features & feature:
            raise _Refused(CtrlError.NOT_NEGOTIATED, f"VIRTIO_NET_F_{feature.name} not "
                           "negotiated")

    def _execute(self, cls: int, cmd: int, data: bytes) -> None:
        handler = self._CLASSES.get(cls)
        if handler is None:
            raise _Refused(CtrlError.UNKNOWN_CLASS, f"class {cls}")
        handler(self, cmd, data)

    def _rx(self, cmd: int, data: bytes) -> None:
        entry = RX_COMMANDS.get(cmd)
        if entry is None:
            raise _Refused(CtrlError.UNKNOWN_COMMAND, f"RX command {cmd}")
        attr, feature = entry
        self._need(feature)
        (on,) = _exact(data, 1, f"RX {attr}")
        setattr(self.target.rx_filter, attr, bool(on))

    def _mac(self, cmd: int, data: bytes) -> None:
        if cmd == VIRTIO_NET_CTRL_MAC_TABLE_SET:
            self._need(NetFeature.CTRL_RX)
            try:
                unicast, multicast = parse_mac_table(data)
            except ValueError as exc:
                raise _Refused(CtrlError.BAD_LENGTH, f"MAC_TABLE_SET: {exc}") from None
            self.target.rx_filter.set_mac_table(unicast, multicast)
        elif cmd == VIRTIO_NET_CTRL_MAC_ADDR_SET:
            self._need(NetFeature.CTRL_MAC_ADDR)
            mac = _exact(data, ETH_ALEN, "MAC_ADDR_SET")
            self.target.rx_filter.mac = mac
            self.target.mac_address_set(mac)
        else:
            raise _Refused(CtrlError.UNKNOWN_COMMAND, f"MAC command {cmd}")

    def _vlan(self, cmd: int, data: bytes) -> None:
        if cmd not in (VIRTIO_NET_CTRL_VLAN_ADD, VIRTIO_NET_CTRL_VLAN_DEL):
            raise _Refused(CtrlError.UNKNOWN_COMMAND, f"VLAN command {cmd}")
        self._need(NetFeature.CTRL_VLAN)
        (vid,) = _U16.unpack(_exact(data, 2, "VLAN"))
        if vid >= VLAN_ID_LIMIT:
            raise _Refused(CtrlError.BAD_VALUE, f"VLAN id {vid} >= {VLAN_ID_LIMIT}")
        if cmd == VIRTIO_NET_CTRL_VLAN_ADD:
            self.target.rx_filter.vlan_add(vid)
        else:
            self.target.rx_filter.vlan_del(vid)

    def _announce(self, cmd: int, data: bytes) -> None:
        if cmd != VIRTIO_NET_CTRL_ANNOUNCE_ACK:
            raise _Refused(CtrlError.UNKNOWN_COMMAND, f"ANNOUNCE command {cmd}")
        self._need(NetFeature.GUEST_ANNOUNCE)
        _exact(data, 0, "ANNOUNCE_ACK")
        self.target.ack_announce()

    def _mq(self, cmd: int, data: bytes) -> None:
        if cmd != VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET:   # RSS_CONFIG, HASH_CONFIG: no RSS
            raise _Refused(CtrlError.UNKNOWN_COMMAND, f"MQ command {cmd}")
        self._need(NetFeature.MQ)
        (pairs,) = _U16.unpack(_exact(data, 2, "VQ_PAIRS_SET"))
        high = min(int(self.target.max_virtqueue_pairs), VIRTIO_NET_CTRL_MQ_VQ_PAIRS_MAX)
        if not VIRTIO_NET_CTRL_MQ_VQ_PAIRS_MIN <= pairs <= high:
            raise _Refused(CtrlError.BAD_VALUE, f"{pairs} queue pairs outside "
                           f"{VIRTIO_NET_CTRL_MQ_VQ_PAIRS_MIN}..{high}")
        self.target.set_queue_pairs(pairs)

    def _guest_offloads(self, cmd: int, data: bytes) -> None:
        if cmd != VIRTIO_NET_CTRL_GUEST_OFFLOADS_SET:
            raise _Refused(CtrlError.UNKNOWN_COMMAND, f"GUEST_OFFLOADS command {cmd}")
        self._need(NetFeature.CTRL_GUEST_OFFLOADS)
        (offloads,) = _U64.unpack(_exact(data, 8, "GUEST_OFFLOADS_SET"))
        allowed = int(self.target.negotiated_features) & int(GUEST_OFFLOADS)
        if offloads & ~allowed:
            raise _Refused(CtrlError.BAD_VALUE, f"offloads {offloads & ~allowed:#x} not "
                           "negotiated GUEST_* offloads")
        self.target.set_guest_offloads(offloads)

    _CLASSES: dict[int, Callable[["ControlQueue", int, bytes], None]] = {
        VIRTIO_NET_CTRL_RX: _rx,
        VIRTIO_NET_CTRL_MAC: _mac,
        VIRTIO_NET_CTRL_VLAN: _vlan,
        VIRTIO_NET_CTRL_ANNOUNCE: _announce,
        VIRTIO_NET_CTRL_MQ: _mq,
        VIRTIO_NET_CTRL_GUEST_OFFLOADS: _guest_offloads,
    }


__all__ = [name for name in list(globals()) if name.startswith("VIRTIO_NET_")] + [
    "ControlQueue", "NetControlTarget", "RxFilter", "CtrlError", "GUEST_OFFLOADS",
    "VLAN_ID_LIMIT", "MAX_COMMAND_LEN", "RX_COMMANDS", "parse_mac_table"]
