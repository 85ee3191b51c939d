"""The back-end (device) side of vhost-user-net (QEMU docs/interop/vhost-user.rst).

:class:`VhostUserNetBackend` serves one front-end connection at a time: one handler
method per request (``_on_get_features``, ``_on_set_mem_table``, ...), driving a
:class:`~pyvirtio.net.device.NetDevice` over a packet backend (a TAP, a
:class:`~pyvirtio.backends.sink.Sink` or a :class:`~pyvirtio.backends.loopback.Loopback`).
Only the data queue pairs live here: the front-end (QEMU) keeps the control queue.

Ring life cycle, as the protocol defines it:

* a ring is *stopped* until SET_VRING_KICK (which needs the memory table, SET_VRING_NUM
  and SET_VRING_ADDR first); it is then *started*, and served by the worker of its
  queue pair; GET_VRING_BASE stops it again and answers the next available index;
* with VHOST_USER_F_PROTOCOL_FEATURES (bit 30) negotiated a started ring is disabled
  (TX processed and discarded, no RX) until SET_VRING_ENABLE(1); the enable state may
  arrive before the ring starts (QEMU sends it first) and is applied when it does. The
  change takes effect before the reply (the pair's worker is restarted around it, and a
  new worker looks at its rings once before it sleeps), so a kick or a buffer that
  arrived while the ring was disabled is not lost, and no burst that read the old state
  can discard a frame added after the reply;
* SET_VRING_KICK with the no-fd flag (bit 8) starts the ring without a kick fd: the
  pair's worker busy-polls its rings; SET_VRING_CALL with it gives the worker an eventfd
  nobody reads (the front-end polls the used ring);
* a started ring resumes from SET_VRING_BASE's index when the used ring's index in
  memory agrees; otherwise (chains were in flight when the previous owner stopped) it
  resumes from the used index, as libvhost-user and DPDK do: frames are processed in
  order, so nothing is lost;
* packed rings (VIRTIO_F_RING_PACKED, offered by default): SET_VRING_ADDR's avail and
  used fields are the driver and device event areas; SET/GET_VRING_BASE carry the
  avail slot and wrap counter in bits 0-15 and the used ones in bits 16-31, as QEMU
  does (:func:`~pyvirtio.vhost_user.messages.decode_vring_base`). A used position
  behind the avail one (chains in flight) is where the ring resumes, if the descriptor
  there is still available; a front-end that sends bits 16-31 zero (DPDK's format)
  resumes with the used position equal to the avail one. QEMU 7.2 cannot restore a
  packed ring's position after losing its back-end (no GET_VRING_BASE): it sends the
  base of the previous start again. A base the descriptors contradict (it claims a
  fresh ring where slots were used, or its slot was used in this lap or made
  available for the next) is replaced by the position the descriptor flags show
  (:func:`vqcore.packed.packed_ring_position`), when they show one;
* a new memory table (SET_MEM_TABLE, ADD_MEM_REG, REM_MEM_REG) is swapped in with every
  worker stopped: the running rings are rebuilt over the new mapping with their indices,
  then the old mapping is released. QEMU before 8.0 sends ADD_MEM_REG and REM_MEM_REG
  once per queue pair (each pair is a vhost device of its own on the one connection):
  an ADD_MEM_REG identical to a mapped region (gpa, size, user address, mmap offset) is
  acknowledged, counted and its fd closed; the first REM_MEM_REG unmaps the region and
  the copies' REM_MEM_REGs that follow are acknowledged, as many as there were copies
  (meanwhile the first pair may add a region overlapping the old one). A REM_MEM_REG of
  any other region that is not mapped is refused.

The per-pair counters (:meth:`VhostUserNetBackend.pair_stats`) are logged when a
front-end disconnects (:meth:`VhostUserNetBackend.log_pair_stats`).

Ring addresses (SET_VRING_ADDR) are the front-end's user addresses, translated through
each region's ``userspace_addr``; descriptor addresses are guest-physical.

Errors: a message that is malformed, out of place or fails gets a NACK (u64 1) when
REPLY_ACK was negotiated and the message asked for a reply; otherwise the connection is
closed. Either way one line is logged, every fd that came with the message and that the
backend did not keep is closed, and the backend is ready for the next connection.
"""

from __future__ import annotations

import gc
import logging
import mmap
import os
import select
import struct
from dataclasses import dataclass
from typing import Callable

import vqcore
from vqcore.packed import (PACKED_SLOT_MASK, PACKED_WRAP, packed_desc_flags,
                           packed_ring_is_fresh, packed_ring_position, packed_slot_state)
from vqcore import GuestMemory
from vqcore.errors import MemoryRegionError, VirtioError

from pyvirtio.device import ConfigAccessError
from pyvirtio.fds import check_eventfd, check_memory_fd
from pyvirtio.features import NET_DEPENDENCIES, NetFeature, Transport, describe
from pyvirtio.net.device import GUEST_GSO, NetDevice, PacketBackend
from pyvirtio.net.header import HDR_LEN
from pyvirtio.runtime import TX_COALESCE_US
from pyvirtio.status import DeviceStatus
from pyvirtio.vhost_user.connection import Connection, PeerClosed, close_fds
from pyvirtio.vhost_user.messages import (F_PROTOCOL_FEATURES, MAX_MEM_SLOTS,
                                          MAX_QUEUE_SIZE, REQUEST_BODY, REQUEST_FDS, VRING_IDX_MASK,
                                          VRING_NOFD_MASK, ConfigSpace, MemRegion, MemTable,
                                          Message, ProtocolError, ProtocolFeature, Request,
                                          SingleMemRegion, U64, VhostUserError, VringAddr,
                                          VringState, decode_vring_base, encode_vring_base,
                                          packed_ring_distance)

log = logging.getLogger(__name__)

N = NetFeature
#: virtio features offered by default (VIRTIO_NET_F_MQ is added with more than one pair)
VHOST_USER_NET_FEATURES = (
    Transport.VERSION_1 | Transport.EVENT_IDX | Transport.INDIRECT_DESC
    | Transport.PROTOCOL_FEATURES | Transport.RING_PACKED
    | N.MRG_RXBUF | N.CSUM | N.GUEST_CSUM | N.MTU
    | N.HOST_TSO4 | N.HOST_TSO6 | N.HOST_ECN | N.HOST_UFO
    | N.GUEST_TSO4 | N.GUEST_TSO6 | N.GUEST_ECN | N.GUEST_UFO)
del N

#: protocol features offered
PROTOCOL_FEATURES = (ProtocolFeature.MQ | ProtocolFeature.REPLY_ACK | ProtocolFeature.CONFIG
                     | ProtocolFeature.NET_MTU | ProtocolFeature.RARP
                     | ProtocolFeature.CONFIGURE_MEM_SLOTS | ProtocolFeature.STATUS
                     | ProtocolFeature.RESET_DEVICE)

#: feature dependencies of a vhost-user net device: the front-end keeps the control
#: queue, so the rules that need VIRTIO_NET_F_CTRL_VQ (or CTRL_RX) do not apply here
VHOST_USER_NET_RULES = {
    feature: needs for feature, needs in NET_DEPENDENCIES.items()
    if not any(n in (NetFeature.CTRL_VQ, NetFeature.CTRL_RX) for n in needs)}

#: the guest offloads that decide the packet backend's offloads
GUEST_OFFLOADS = int(GUEST_GSO | NetFeature.GUEST_CSUM | NetFeature.GUEST_ECN)

DEFAULT_MAC = b"\x52\x54\x00\x12\x34\x56"
#: a ring index has 8 bits in SET_VRING_KICK/CALL/ERR: at most 256 rings
MAX_QUEUE_PAIRS = 128
MTU_MIN, MTU_MAX = 68, 65535

#: requests whose reply carries a body (REPLY_ACK adds nothing to them)
EXPLICIT_REPLY = frozenset({Request.GET_FEATURES, Request.GET_PROTOCOL_FEATURES,
                            Request.GET_VRING_BASE, Request.GET_QUEUE_NUM, Request.GET_CONFIG,
                            Request.GET_MAX_MEM_SLOTS, Request.GET_STATUS})

#: features whose change would re-lay out a running ring
RING_LAYOUT_FEATURES = int(Transport.RING_PACKED | Transport.EVENT_IDX)

#: SET_CONFIG flags (VHOST_SET_CONFIG_TYPE_*)
CONFIG_TYPE_FRONTEND = 0
CONFIG_TYPE_MIGRATION = 1

ETH_P_RARP = 0x8035
ETH_P_IP = 0x0800
ARPHRD_ETHER = 1
ARPOP_RREQUEST = 3
ETH_ZLEN = 60

#: errors a request may fail with (anything else is a bug: logged with its traceback)
_EXPECTED = (VirtioError, OSError, ValueError, BufferError, OverflowError)


class BackendStateError(VhostUserError, RuntimeError):
    """The back-end is used after :meth:`VhostUserNetBackend.close`."""


def rarp_frame(mac: bytes) -> bytes:
    """The broadcast RARP request QEMU's announce sends for ``mac`` (60 bytes)."""
    mac = bytes(mac)
    if len(mac) != 6:
        raise ValueError(f"a MAC address has 6 bytes, not {len(mac)}")
    arp = struct.pack("!HHBBH6s4s6s4s", ARPHRD_ETHER, ETH_P_IP, 6, 4, ARPOP_RREQUEST,
                      mac, bytes(4), mac, bytes(4))
    frame = b"\xff" * 6 + mac + struct.pack("!H", ETH_P_RARP) + arp
    return frame + bytes(ETH_ZLEN - len(frame))


def protocol_names(value: int) -> str:
    """``"MQ, REPLY_ACK, ..."`` for a protocol feature set."""
    names = [f.name for f in ProtocolFeature if value & f]
    unknown = value & ~sum(int(f) for f in ProtocolFeature)
    if unknown:
        names.append(f"unknown bits {unknown:#x}")
    return ", ".join(names) or "none"


def capabilities() -> dict[str, object]:
    """What ``--print-capabilities`` prints (vhost-user.rst, backend program
    conventions; ``@VHostUserBackendCapabilities`` of vhost-user.json): the type and
    the protocol features offered, in lower case with dashes."""
    names = [f.name.lower().replace("_", "-") for f in ProtocolFeature
             if f & PROTOCOL_FEATURES]
    return {"type": "net", "features": names}


def _new_eventfd() -> int:
    return os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)


@dataclass
class RingState:
    """What the front-end told the back-end about one ring."""
    index: int
    num: int | None = None            # SET_VRING_NUM
    addr: VringAddr | None = None     # SET_VRING_ADDR (user addresses)
    base: int = 0                     # SET_VRING_BASE's num / the base at the last stop
    enable: bool | None = None        # SET_VRING_ENABLE (None: never sent)
    started: bool = False             # between SET_VRING_KICK and GET_VRING_BASE
    poll: bool = False                # started without a kick fd: the worker polls


def region_key(r: MemRegion) -> tuple[int, int, int]:
    """What REM_MEM_REG names a region by: (gpa, size, user address)."""
    return r.guest_phys_addr, r.memory_size, r.userspace_addr


@dataclass(eq=False)
class MappedRegion:
    """One memory region and its mapping (``mm`` covers ``mmap_offset + size``).

    ``adds`` counts the ADD_MEM_REGs that named this very mapping (QEMU before 8.0
    sends one per queue pair)."""
    region: MemRegion
    mm: mmap.mmap
    adds: int = 1

    def same(self, other: MemRegion) -> bool:
        """Whether ``other`` names this region (REM_MEM_REG: gpa, uva and size)."""
        return region_key(self.region) == region_key(other)

    def identical(self, other: MemRegion) -> bool:
        """Whether ``other`` describes this very mapping (ADD_MEM_REG: gpa, size, uva
        and mmap offset)."""
        return self.region == other


class _VhostUserNetDevice(NetDevice):
    """A NetDevice that also reports a broken ring to the back-end (SET_VRING_ERR)."""

    def __init__(self, *args, on_ring_error: Callable[[int, BaseException], None],
                 **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._on_ring_error = on_ring_error

    def _on_violation(self, pair: int, which: str, exc: BaseException) -> None:
        super()._on_violation(pair, which, exc)
        self._on_ring_error(self.tx_index(pair) if which == "tx" else self.rx_index(pair), exc)


class VhostUserNetBackend:
    """The device side of vhost-user-net, one front-end connection at a time.

    Args:
        packet: where frames go (TAP, sink, loopback): one fd per queue pair.
        queues: queue pairs offered (1..128).
        mac: the MAC address in the configuration space.
        mtu: the MTU in the configuration space (VIRTIO_NET_F_MTU).
        poll: busy-poll workers.
        tx_coalesce_us: TX kick coalescing (see :mod:`pyvirtio.runtime`; 0: off).
        features: virtio features offered (default :data:`VHOST_USER_NET_FEATURES`,
            plus VIRTIO_NET_F_MQ with more than one pair).
        packed: offer VIRTIO_F_RING_PACKED (the default); False takes it out of
            ``features`` too.
        protocol_features: protocol features offered (default :data:`PROTOCOL_FEATURES`).
        name: for log lines.
    """

    def __init__(self, packet: PacketBackend, *, queues: int = 1, mac: bytes = DEFAULT_MAC,
                 mtu: int = 1500, poll: bool = False, tx_coalesce_us: int = TX_COALESCE_US,
                 features: int | None = None,
                 protocol_features: int = int(PROTOCOL_FEATURES), packed: bool = True,
                 name: str = "vhost-user-net") -> None:
        if not isinstance(queues, int) or not 1 <= queues <= MAX_QUEUE_PAIRS:
            raise ValueError(f"queue pairs {queues!r} not in 1..{MAX_QUEUE_PAIRS}")
        if len(packet.fds) < queues:
            raise ValueError(f"the packet backend has {len(packet.fds)} fds for {queues} pairs")
        if len(bytes(mac)) != 6:
            raise ValueError("a MAC address has 6 bytes")
        if not MTU_MIN <= mtu <= MTU_MAX:
            raise ValueError(f"MTU {mtu} not in {MTU_MIN}..{MTU_MAX}")
        if features is None:
            features = int(VHOST_USER_NET_FEATURES)
            if queues > 1:
                features |= int(NetFeature.MQ)
        if not packed:
            features &= ~int(Transport.RING_PACKED)
        self.packet = packet
        self.queues = queues
        self.mac = bytes(mac)
        self.mtu = mtu
        self.poll = poll
        self.tx_coalesce_us = tx_coalesce_us
        self.name = name
        self.offered_features = int(features)
        self.offered_protocol_features = int(protocol_features)
        self._leaked: list[mmap.mmap] = []
        self._closed = False
        #: connections served so far
        self.connections = 0
        self._tap_mtu_changed = False
        self._init_state()

    # ---- state -----------------------------------------------------------------------------

    def _init_state(self) -> None:
        """A fresh device and no connection state."""
        self.device: _VhostUserNetDevice = _VhostUserNetDevice(
            self.packet, mac=self.mac, mtu=self.mtu, max_pairs=self.queues,
            queue_size=MAX_QUEUE_SIZE, features=self.offered_features, ctrl_queue=False,
            poll=self.poll, tx_coalesce_us=self.tx_coalesce_us,
            rules=VHOST_USER_NET_RULES, name=self.name,
            on_ring_error=self._ring_error)
        self.memory: GuestMemory | None = None
        self.regions: list[MappedRegion] = []
        #: region key -> REM_MEM_REGs still to come for copies of an unmapped region
        #: (QEMU < 8.0: the other queue pairs' removals of what one mapping served)
        self.copies_to_remove: dict[tuple[int, int, int], int] = {}
        self.rings = [RingState(i) for i in range(2 * self.queues)]
        #: negotiated protocol features (SET_PROTOCOL_FEATURES)
        self.protocol_features = 0
        self.owner = False
        #: the device status the front-end set (SET_STATUS)
        self.status = 0
        self._features_ok = False
        #: why the device needs a reset (a broken ring, a memory table it cannot use)
        self.needs_reset_reason: str | None = None
        self._active_pairs: int | None = None

    def _teardown(self) -> None:
        """Stop everything and release every fd and mapping of the connection."""
        dev = self.device
        if dev is not None:
            dev.close()                      # workers stopped, kick/call fds closed
            for i in range(dev.num_queues):
                dev.deactivate_queue(i)
            dev.memory = None
            self.device = None               # type: ignore[assignment]
        self._release_memory(self.memory, self.regions, keep=())
        self.memory = None
        self.regions = []

    def reset(self) -> None:
        """Back to the state before any connection (called after each connection)."""
        if self._closed:
            return
        self._teardown()
        self._restore_mtu()
        self._init_state()

    def _restore_mtu(self) -> None:
        """Give the packet backend its MTU back if NET_SET_MTU changed it."""
        if self._tap_mtu_changed:
            self._tap_mtu_changed = False
            try:
                self._set_packet_mtu(self.mtu)
            except _EXPECTED as exc:
                log.warning("%s: cannot restore the MTU %d: %s", self.name, self.mtu, exc)

    def close(self) -> None:
        """Stop the device and release everything it holds (not the packet backend)."""
        if self._closed:
            return
        self._teardown()
        self._closed = True

    def __enter__(self) -> "VhostUserNetBackend":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def reply_ack(self) -> bool:
        """Whether VHOST_USER_PROTOCOL_F_REPLY_ACK was negotiated."""
        return bool(self.protocol_features & ProtocolFeature.REPLY_ACK)

    def pair_stats(self) -> list[dict[str, dict[str, int]]]:
        """Per queue pair: {"rx": counters, "tx": counters} of the current device
        (empty after :meth:`close`)."""
        dev = self.device
        return dev.pair_stats() if dev is not None else []

    def log_pair_stats(self, why: str = "", level: int = logging.INFO) -> None:
        """Log each queue pair's RX and TX counters, one line per pair
        (``pair N stats: rx packets=.. bytes=.. ...; tx ...``)."""
        for pair, st in enumerate(self.pair_stats()):
            rx, tx = (" ".join(f"{k}={v}" for k, v in st[d].items()) for d in ("rx", "tx"))
            log.log(level, "%s: pair %d stats%s: rx %s; tx %s", self.name, pair,
                    f" ({why})" if why else "", rx, tx)

    # ---- the connection loop -----------------------------------------------------------------

    def serve(self, conn: Connection, wake_fd: int = -1) -> None:
        """Serve one front-end until it disconnects, breaks the protocol, or ``wake_fd``
        becomes readable; then reset for the next connection."""
        if self._closed:
            raise BackendStateError("the back-end is closed")
        self.connections += 1
        log.info("%s: front-end connected", self.name)
        try:
            watch = [conn.fileno()] + ([wake_fd] if wake_fd >= 0 else [])
            while True:
                ready, _, _ = select.select(watch, [], [])
                if wake_fd >= 0 and wake_fd in ready:
                    log.info("%s: shutting down the connection", self.name)
                    return
                try:
                    msg = conn.recv()
                except PeerClosed:
                    log.info("%s: front-end disconnected", self.name)
                    return
                except (ProtocolError, OSError) as exc:
                    log.warning("%s: %s; closing the connection", self.name, exc)
                    return
                try:
                    if not self.handle(conn, msg):
                        return
                except OSError as exc:
                    log.warning("%s: cannot reply to %s (%s); closing the connection",
                                self.name, msg.name(), exc)
                    return
        finally:
            try:
                self.log_pair_stats("connection ended")
            except Exception:  # noqa: BLE001 - the reset below must run
                log.exception("%s: cannot log the pair counters", self.name)
            self.reset()

    def handle(self, conn: Connection, msg: Message) -> bool:
        """Handle one message and send its reply; False when the connection must close.

        Every fd of ``msg`` that the handler did not keep is closed."""
        try:
            reply = self._dispatch(msg)
        except Exception as exc:      # noqa: BLE001 - a request never crashes the back-end
            return self._failed(conn, msg, exc)
        finally:
            close_fds(msg.fds)
            msg.fds.clear()
        if reply is not None:
            conn.reply(msg, reply)
        elif msg.need_reply and self.reply_ack:
            conn.reply(msg, U64(0).pack())
        return True

    def _failed(self, conn: Connection, msg: Message, exc: Exception) -> bool:
        if not isinstance(exc, _EXPECTED):
            log.exception("%s: %s failed unexpectedly", self.name, msg.name())
        if (msg.need_reply and self.reply_ack and msg.request not in EXPLICIT_REPLY):
            if isinstance(exc, _EXPECTED):
                log.warning("%s: %s refused (NACK): %s", self.name, msg.name(), exc)
            conn.reply(msg, U64(1).pack())
            return True
        if isinstance(exc, _EXPECTED):
            log.warning("%s: %s: %s; closing the connection", self.name, msg.name(), exc)
        return False

    def _dispatch(self, msg: Message) -> bytes | None:
        try:
            req = Request(msg.request)
        except ValueError:
            raise ProtocolError(f"unknown request {msg.request}") from None
        if msg.is_reply:
            raise ProtocolError("a request with the reply flag set")
        handler = _HANDLERS.get(req)
        if handler is None:
            raise ProtocolError(f"request {req.name} is not supported")
        want = REQUEST_FDS.get(req, 0)
        lo, hi = (want, want) if isinstance(want, int) else want
        if not lo <= len(msg.fds) <= hi:
            raise ProtocolError(f"{len(msg.fds)} fds, expected "
                                f"{lo if lo == hi else f'{lo} to {hi}'}")
        body_cls = REQUEST_BODY.get(req)
        if body_cls is None:
            if msg.body:
                raise ProtocolError(f"a body of {len(msg.body)} bytes where none is expected")
            body = None
        else:
            body = body_cls.unpack(msg.body)
        log.debug("%s: %s %s fds=%d", self.name, req.name, body if body is not None else "",
                  len(msg.fds))
        return handler(self, msg, body)

    # ---- helpers -----------------------------------------------------------------------------

    def _ring(self, index: int) -> RingState:
        if not 0 <= index < len(self.rings):
            raise ProtocolError(f"ring {index} out of range (the device has "
                                f"{len(self.rings)} rings: {self.queues} queue pairs)")
        return self.rings[index]

    def _ring_payload(self, msg: Message, body: U64) -> tuple[RingState, bool]:
        """SET_VRING_KICK/CALL/ERR: the ring and whether it came without an fd."""
        value = body.value
        if value & ~(VRING_IDX_MASK | VRING_NOFD_MASK):
            raise ProtocolError(f"unknown bits in the ring payload {value:#x}")
        nofd = bool(value & VRING_NOFD_MASK)
        ring = self._ring(value & VRING_IDX_MASK)
        want = 0 if nofd else 1
        if len(msg.fds) != want:
            raise ProtocolError(f"{len(msg.fds)} fds with the no-fd flag "
                                f"{'set' if nofd else 'clear'} (expected {want})")
        return ring, nofd

    def _effective_enable(self, index: int) -> bool:
        ring = self.rings[index]
        if ring.enable is not None:
            return ring.enable
        return not self.device.negotiated_features & F_PROTOCOL_FEATURES

    def _update_active_pairs(self) -> None:
        """Attach the packet backend's queues up to the last pair with an enabled ring."""
        n = 1
        for p in range(self.queues):
            if self._effective_enable(2 * p) or self._effective_enable(2 * p + 1):
                n = p + 1
        if n == self._active_pairs:
            return
        try:
            self.packet.set_active_queues(n)
            self._active_pairs = n
        except _EXPECTED as exc:
            log.warning("%s: cannot activate %d packet queue(s): %s", self.name, n, exc)

    def _resume_pair(self, pair: int) -> None:
        """Start the pair's worker over whichever of its rings run (poll if one of them
        has no kick fd)."""
        dev = self.device
        dev.start_pair(pair)
        worker = dev.workers.get(pair)
        rings = self.rings[2 * pair], self.rings[2 * pair + 1]
        if worker is not None and any(r.started and r.poll for r in rings):
            worker.cfg.poll = True
            worker.wake()

    def _ring_gpas(self, ring: RingState, size: int | None = None) -> tuple[int, int, int]:
        """The guest-physical addresses of the ring's three parts (``size``: checked
        length, default the ring's size)."""
        i = ring.index
        if self.memory is None:
            raise ProtocolError(f"ring {i}: no memory table yet (SET_MEM_TABLE comes first)")
        if ring.addr is None:
            raise ProtocolError(f"ring {i}: no SET_VRING_ADDR")
        n = size if size is not None else ring.num
        a = ring.addr
        if self.device.packed:      # the avail/used fields name the event areas
            lay = vqcore.packed_layout(n)
            parts = (("descriptor ring", a.desc, lay.desc_size),
                     ("driver event area", a.avail, lay.event_size),
                     ("device event area", a.used, lay.event_size))
        else:
            layout = vqcore.split_layout(n)
            parts = (("descriptor table", a.desc, layout.desc_size),
                     ("available ring", a.avail, layout.avail_size),
                     ("used ring", a.used, layout.used_size))
        out = []
        for what, uva, length in parts:
            try:
                out.append(self.memory.uva_to_gpa(uva, length))
            except VirtioError:
                raise ProtocolError(f"ring {i}: {what} at user address {uva:#x} "
                                    f"(+{length}) is outside every memory region") from None
        return out[0], out[1], out[2]

    def _activate(self, ring: RingState, indices: tuple[int, int] | None) -> None:
        """Create the device queue of ``ring`` over the current memory; ``indices``
        (next_avail, next_used) to restore, or None for a fresh start."""
        if ring.num is None:
            raise ProtocolError(f"ring {ring.index}: no SET_VRING_NUM")
        desc, avail, used = self._ring_gpas(ring)
        dev = self.device
        dev.configure_queue(ring.index, size=ring.num, desc=desc, avail=avail, used=used,
                            enabled=True)
        queue = dev.activate_queue(ring.index)
        try:
            if indices is None:
                indices = self._resume_indices(ring, desc, used)
            queue.next_avail, queue.next_used = indices
        except BaseException:
            dev.deactivate_queue(ring.index)
            raise

    def _resume_indices(self, ring: RingState, desc: int, used: int) -> tuple[int, int]:
        """(next_avail, next_used) a started ring begins with: SET_VRING_BASE's, unless
        chains were in flight when the previous owner stopped; then the first of them,
        so that they are processed again (in order: nothing lost, nothing repeated).
        A packed ring's base that its descriptors contradict (a stale one) gives way to
        the position they show."""
        i = ring.index
        try:
            avail, used_pos = decode_vring_base(ring.base, packed=self.device.packed,
                                                size=ring.num)
        except ProtocolError as exc:
            raise ProtocolError(f"ring {i}: {exc}") from None
        if not self.device.packed:
            used_idx = int.from_bytes(self.memory.read(used + 2, 2), "little")
            if used_idx != avail:
                log.warning("%s: ring %d: base %d but the used index is %d; resuming "
                            "from the used index", self.name, i, avail, used_idx)
                avail = used_idx
            return avail, avail
        size = ring.num or 1
        flags = packed_desc_flags(self.memory, desc, size)

        def state(pos: int) -> str:
            return packed_slot_state(int(flags[pos & PACKED_SLOT_MASK]), pos >> 15)

        start = avail
        if used_pos is not None and used_pos != avail:
            # chains in flight: they are still marked available in the ring (the device
            # writes a used element over a chain's first descriptor) unless the
            # previous owner completed them after all
            slot, wrap = used_pos & PACKED_SLOT_MASK, used_pos >> 15
            if state(used_pos) == "avail":
                log.warning("%s: ring %d: %d slot(s) in flight at the stop (base %#x); "
                            "resuming from the used position, slot %d wrap %d", self.name,
                            i, packed_ring_distance(avail, used_pos, size), ring.base,
                            slot, wrap)
                return used_pos, used_pos
            log.warning("%s: ring %d: base %#x says chains are in flight, but the "
                        "descriptor at used slot %d is not available: resuming from the "
                        "avail position", self.name, i, ring.base, slot)
        # QEMU 7.2 keeps, for a packed ring, the base of the last start when the
        # back-end went away without GET_VRING_BASE (it cannot restore it from guest
        # memory as it does a split ring's used index): a new back-end is told "fresh
        # ring" (or an old position) for a ring the guest has long been using. Such a
        # base shows: it claims a fresh ring where descriptors were used already, or
        # the slot at it was used in this lap or made available for the next (at a
        # device's position the slot is available for its lap, or from the last one).
        seen = state(start)
        if start == PACKED_WRAP and not packed_ring_is_fresh(flags):
            seen = "not fresh"
        elif seen in ("avail", "old"):
            return start, start
        derived = packed_ring_position(flags)
        if derived is None:
            log.warning("%s: ring %d: base %#x is stale (slot %d is %s) and the ring does "
                        "not tell where the device was; resuming at the base", self.name,
                        i, ring.base, start & PACKED_SLOT_MASK, seen)
            return start, start
        if derived != start:
            log.warning("%s: ring %d: base %#x is stale (slot %d is %s); resuming where "
                        "the ring shows the device was: slot %d wrap %d", self.name, i,
                        ring.base, start & PACKED_SLOT_MASK, seen,
                        derived & PACKED_SLOT_MASK, derived >> 15)
        return derived, derived

    def _start_ring(self, ring: RingState) -> None:
        """Start ``ring`` (its pair's worker is stopped; the caller resumes it)."""
        self._activate(ring, None)
        ring.started = True
        self.device.set_ring_enabled(ring.index, self._effective_enable(ring.index))
        self._update_active_pairs()
        log.info("%s: ring %d started (size %d, %s%s)", self.name, ring.index, ring.num,
                 "enabled" if self._effective_enable(ring.index) else "disabled",
                 ", polled" if ring.poll else "")

    def _stop_ring(self, ring: RingState) -> int:
        """Stop ``ring``; returns its base for GET_VRING_BASE (split: the next available
        index; packed: both positions, :func:`encode_vring_base`)."""
        if not ring.started:
            return ring.base
        dev = self.device
        pair = ring.index // 2
        dev.stop_pair(pair)
        queue = dev.queues[ring.index]
        avail, used = queue.next_avail, queue.next_used
        base = encode_vring_base(avail, used, packed=dev.packed)
        if queue.in_flight:
            log.warning("%s: ring %d stopped with %d chain(s) in flight", self.name,
                        ring.index, queue.in_flight)
        del queue
        dev.deactivate_queue(ring.index)
        ring.started = False
        ring.poll = False
        ring.base = base
        dev.set_kick_fd(ring.index, _new_eventfd())     # the front-end's kick fd closed
        self._resume_pair(pair)
        if dev.packed:
            log.info("%s: ring %d stopped at index %d (%#x: avail slot %d wrap %d, used "
                     "slot %d wrap %d)", self.name, ring.index, base, base,
                     avail & PACKED_SLOT_MASK, avail >> 15, used & PACKED_SLOT_MASK, used >> 15)
        else:
            log.info("%s: ring %d stopped at index %d", self.name, ring.index, base)
        return base

    def _stop_all_rings(self) -> None:
        for ring in self.rings:
            self._stop_ring(ring)

    def _set_needs_reset(self, reason: str) -> None:
        if self.needs_reset_reason is None:
            self.needs_reset_reason = reason

    def _ring_error(self, index: int, exc: BaseException) -> None:
        """A worker found a ring broken (worker thread; it signalled the error fd)."""
        self._set_needs_reset(f"ring {index}: {exc}")

    def _set_packet_mtu(self, mtu: int) -> None:
        set_mtu = getattr(self.packet, "set_mtu", None)
        if set_mtu is not None:
            set_mtu(mtu)

    # ---- memory ------------------------------------------------------------------------------

    def _map(self, region: MemRegion, fd: int) -> MappedRegion:
        """Map ``region`` from ``fd`` (which stays the caller's)."""
        length = region.mmap_offset + region.memory_size
        what = (f"memory region gpa {region.guest_phys_addr:#x} size {region.memory_size:#x} "
                f"mmap_offset {region.mmap_offset:#x}")
        check_memory_fd(fd, length, what)
        try:
            mm = mmap.mmap(fd, length, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except (OSError, ValueError, OverflowError) as exc:
            raise ProtocolError(f"{what} cannot be mapped: {exc}") from None
        return MappedRegion(region, mm)

    @staticmethod
    def _build_memory(regions: list[MappedRegion]) -> GuestMemory:
        memory = GuestMemory()
        try:
            for m in regions:
                r = m.region
                memory.add_region(r.guest_phys_addr, m.mm, offset=r.mmap_offset,
                                  size=r.memory_size, uva=r.userspace_addr)
        except BaseException:
            memory.close()
            raise
        return memory

    def _install_memory(self, memory: GuestMemory, regions: list[MappedRegion]) -> None:
        """Swap in a new memory table with every worker stopped; the running rings are
        rebuilt over it with their indices; the old mappings are released."""
        dev = self.device
        running = [r for r in self.rings if r.started]
        saved = {r.index: (dev.queues[r.index].next_avail, dev.queues[r.index].next_used)
                 for r in running}
        dev.stop()
        for r in running:
            dev.deactivate_queue(r.index)
        old_memory, old_regions = self.memory, self.regions
        self.memory, self.regions = memory, regions
        dev.memory = memory
        failures = []
        for r in running:
            try:
                self._activate(r, saved[r.index])
            except _EXPECTED as exc:
                failures.append(f"ring {r.index}: {exc}")
                r.started = False
                r.poll = False
                r.base = saved[r.index][0]
        for pair in sorted({r.index // 2 for r in running}):
            self._resume_pair(pair)
        self._release_memory(old_memory, old_regions, keep=regions)
        log.info("%s: memory table of %d region(s) installed%s", self.name, len(regions),
                 f", {len(running)} running ring(s) moved" if running else "")
        if failures:
            reason = "the new memory table does not hold a running ring: " + "; ".join(failures)
            self._set_needs_reset(reason)
            raise ProtocolError(reason)

    def _release_memory(self, memory: GuestMemory | None, regions: list[MappedRegion],
                        keep: list[MappedRegion] | tuple) -> None:
        if memory is not None:
            try:
                memory.close()
            except MemoryRegionError:
                gc.collect()                  # a queue still referenced from a cycle
                try:
                    memory.close()
                except MemoryRegionError as exc:
                    log.error("%s: old guest memory still in use: %s", self.name, exc)
        for m in regions:
            if any(m is k for k in keep):
                continue
            try:
                m.mm.close()
            except BufferError:
                gc.collect()
                try:
                    m.mm.close()
                except BufferError:
                    log.error("%s: a memory mapping is still in use; kept", self.name)
                    self._leaked.append(m.mm)

    # ---- handlers: features ------------------------------------------------------------------

    def _on_get_features(self, msg: Message, body: None) -> bytes:
        return U64(self.offered_features).pack()

    def _on_set_features(self, msg: Message, body: U64) -> None:
        value = body.value
        extra = value & ~self.offered_features
        if extra:
            log.info("%s: SET_FEATURES: ignoring bits not offered: %s", self.name,
                     describe(extra))
        running = [r.index for r in self.rings if r.started]
        changed = (value ^ self.device.negotiated_features) & RING_LAYOUT_FEATURES
        if running and changed & self.offered_features:
            raise ProtocolError(f"SET_FEATURES changes {describe(changed)} while ring(s) "
                                f"{running} run: stop them first (GET_VRING_BASE)")
        negotiated = self.device.negotiate_features(value & self.offered_features)
        self._features_ok = True
        self.device.set_guest_offloads(negotiated & GUEST_OFFLOADS)
        self._update_active_pairs()
        log.info("%s: features %s", self.name, describe(negotiated))

    def _on_get_protocol_features(self, msg: Message, body: None) -> bytes:
        return U64(self.offered_protocol_features).pack()

    def _on_set_protocol_features(self, msg: Message, body: U64) -> None:
        extra = body.value & ~self.offered_protocol_features
        if extra:
            raise ProtocolError(f"protocol features not offered: {extra:#x}")
        self.protocol_features = body.value
        log.info("%s: protocol features %s", self.name, protocol_names(body.value))

    def _on_set_owner(self, msg: Message, body: None) -> None:
        self.owner = True

    def _on_reset_owner(self, msg: Message, body: None) -> None:
        # deprecated; vhost-user.rst recommends ignoring it or disabling every ring
        self._stop_all_rings()

    def _on_get_queue_num(self, msg: Message, body: None) -> bytes:
        # queue *pairs*, as QEMU's vhost-user net client compares it with queues=N
        return U64(self.queues).pack()

    # ---- handlers: memory --------------------------------------------------------------------

    def _on_set_mem_table(self, msg: Message, body: MemTable) -> None:
        if len(msg.fds) != len(body.regions):
            raise ProtocolError(f"{len(body.regions)} regions but {len(msg.fds)} fds")
        mapped: list[MappedRegion] = []
        try:
            for region, fd in zip(body.regions, msg.fds):
                mapped.append(self._map(region, fd))
            memory = self._build_memory(mapped)
        except BaseException:
            self._release_memory(None, mapped, keep=())
            raise
        self.copies_to_remove.clear()
        self._install_memory(memory, mapped)

    def _on_get_max_mem_slots(self, msg: Message, body: None) -> bytes:
        return U64(MAX_MEM_SLOTS).pack()

    def _on_add_mem_reg(self, msg: Message, body: SingleMemRegion) -> None:
        r = body.region
        same = [m for m in self.regions if m.identical(r)]
        if same:
            # QEMU < 8.0: every queue pair's vhost device adds the same region (one
            # copy per pair at most: more is a front-end counting wrong)
            if same[0].adds >= self.queues:
                raise ProtocolError(f"ADD_MEM_REG of gpa {r.guest_phys_addr:#x} size "
                                    f"{r.memory_size:#x}: already added {same[0].adds} "
                                    f"time(s), once per queue pair at most")
            same[0].adds += 1
            log.debug("%s: ADD_MEM_REG of the region already mapped at gpa %#x size %#x "
                      "(another queue pair's copy, %d adds): acknowledged, fd closed",
                      self.name, r.guest_phys_addr, r.memory_size, same[0].adds)
            return                  # handle() closes the fd
        if len(self.regions) >= MAX_MEM_SLOTS:
            raise ProtocolError(f"all {MAX_MEM_SLOTS} memory slots are in use")
        m = self._map(body.region, msg.fds[0])
        regions = self.regions + [m]
        try:
            memory = self._build_memory(regions)
        except BaseException:
            self._release_memory(None, [m], keep=())
            raise
        self._install_memory(memory, regions)

    def _on_rem_mem_reg(self, msg: Message, body: SingleMemRegion) -> None:
        r = body.region
        key = region_key(r)
        pending = self.copies_to_remove.get(key, 0)
        if pending:
            # QEMU < 8.0: another queue pair's vhost device removes its copy of a region
            # that the first removal unmapped (that pair may have added a region
            # overlapping it since, so the first removal cannot wait for the last)
            if pending > 1:
                self.copies_to_remove[key] = pending - 1
            else:
                del self.copies_to_remove[key]
            log.debug("%s: REM_MEM_REG of gpa %#x size %#x: another queue pair's copy of a "
                      "region already unmapped: acknowledged", self.name,
                      r.guest_phys_addr, r.memory_size)
            return
        found = [m for m in self.regions if m.same(r)]
        if not found:
            raise ProtocolError(f"REM_MEM_REG of gpa {r.guest_phys_addr:#x} size "
                                f"{r.memory_size:#x} uva {r.userspace_addr:#x}: no such "
                                f"region is mapped")
        regions = [m for m in self.regions if m is not found[0]]
        memory = self._build_memory(regions)
        if found[0].adds > 1:           # (install may raise after the swap: owed before)
            self.copies_to_remove[key] = found[0].adds - 1
        self._install_memory(memory, regions)

    # ---- handlers: rings ---------------------------------------------------------------------

    def _on_set_vring_num(self, msg: Message, body: VringState) -> None:
        ring = self._ring(body.index)
        if ring.started:
            raise ProtocolError(f"ring {ring.index} is running: stop it before resizing")
        self.device.check_ring_size(body.num)       # as the negotiated layout allows
        ring.num = body.num

    def _on_set_vring_addr(self, msg: Message, body: VringAddr) -> None:
        ring = self._ring(body.index)
        if self.memory is None:
            raise ProtocolError(f"ring {ring.index}: SET_VRING_ADDR before SET_MEM_TABLE")
        if ring.started:
            a = ring.addr
            if (a.desc, a.avail, a.used) != (body.desc, body.avail, body.used):
                raise ProtocolError(f"ring {ring.index} is running: stop it before moving it")
            ring.addr = body                  # only the flags (VHOST_VRING_F_LOG) changed
            return
        old, ring.addr = ring.addr, body
        try:
            self._ring_gpas(ring, ring.num or 1)
        except BaseException:
            ring.addr = old
            raise

    def _on_set_vring_base(self, msg: Message, body: VringState) -> None:
        ring = self._ring(body.index)
        if ring.started:
            raise ProtocolError(f"ring {ring.index} is running: stop it before SET_VRING_BASE")
        # checked against the layout now when the features are known (QEMU sends
        # SET_FEATURES first), and again when the ring starts in any case
        if self._features_ok:
            try:
                decode_vring_base(body.num, packed=self.device.packed, size=ring.num)
            except ProtocolError as exc:
                raise ProtocolError(f"ring {ring.index}: {exc}") from None
        ring.base = body.num

    def _on_get_vring_base(self, msg: Message, body: VringState) -> bytes:
        ring = self._ring(body.index)
        return VringState(ring.index, self._stop_ring(ring)).pack()

    def _on_set_vring_kick(self, msg: Message, body: U64) -> None:
        ring, nofd = self._ring_payload(msg, body)
        if not ring.started:
            if ring.num is None:
                raise ProtocolError(f"ring {ring.index}: SET_VRING_KICK before SET_VRING_NUM")
            self._ring_gpas(ring)         # memory table and addresses first
        if nofd:
            fd = _new_eventfd()           # never signalled: the worker polls the ring
        else:
            check_eventfd(msg.fds[0], f"ring {ring.index} kick")
            fd = msg.fds.pop()
        pair = ring.index // 2
        self.device.stop_pair(pair)           # no worker may use the fd being replaced
        try:
            self.device.set_kick_fd(ring.index, fd)
            ring.poll = nofd
            if not ring.started:
                self._start_ring(ring)
        finally:
            self._resume_pair(pair)

    def _on_set_vring_call(self, msg: Message, body: U64) -> None:
        ring, nofd = self._ring_payload(msg, body)
        if not nofd:
            check_eventfd(msg.fds[0], f"ring {ring.index} call")
        self._replace_ring_fd(ring, self.device.set_call_fd,
                              _new_eventfd() if nofd else msg.fds.pop())

    def _on_set_vring_err(self, msg: Message, body: U64) -> None:
        ring, nofd = self._ring_payload(msg, body)
        if not nofd:
            check_eventfd(msg.fds[0], f"ring {ring.index} error")
        self._replace_ring_fd(ring, self.device.set_err_fd, -1 if nofd else msg.fds.pop())

    def _replace_ring_fd(self, ring: RingState, setter: Callable[[int, int], None],
                         fd: int) -> None:
        """Give ring ``ring`` a new call or error fd (``setter`` takes ownership)."""
        pair = ring.index // 2
        running = pair in self.device.workers
        if running:
            self.device.stop_pair(pair)       # no worker may use the fd being replaced
        try:
            setter(ring.index, fd)
        finally:
            if running:
                self._resume_pair(pair)

    def _on_set_vring_enable(self, msg: Message, body: VringState) -> None:
        ring = self._ring(body.index)
        if body.num not in (0, 1):
            raise ProtocolError(f"ring {ring.index}: SET_VRING_ENABLE {body.num} (0 or 1)")
        ring.enable = bool(body.num)
        if ring.enable:
            self._update_active_pairs()
        # Synchronous: a worker may have read the old flag just before a burst, so a
        # live toggle could still discard a frame added after our ack. Restarting the
        # pair's worker makes the change take effect before the ack (the new worker
        # looks at its rings once at start: no kick is lost).
        pair = ring.index // 2
        running = pair in self.device.workers
        if running:
            self.device.stop_pair(pair)
        try:
            self.device.set_ring_enabled(ring.index, ring.enable)
        finally:
            if running:
                self._resume_pair(pair)
        if not ring.enable:
            self._update_active_pairs()
        log.info("%s: ring %d %s", self.name, ring.index,
                 "enabled" if ring.enable else "disabled")

    # ---- handlers: configuration, status, reset ---------------------------------------------

    def _on_get_config(self, msg: Message, body: ConfigSpace) -> bytes:
        try:
            if body.flags not in (CONFIG_TYPE_FRONTEND, CONFIG_TYPE_MIGRATION):
                raise ProtocolError(f"unknown config flags {body.flags:#x}")
            data = self.device.read_config(body.offset, body.size)
        except (ConfigAccessError, ProtocolError) as exc:
            # vhost-user.rst: a zero-length payload tells the front-end it failed
            log.warning("%s: GET_CONFIG refused: %s", self.name, exc)
            return ConfigSpace(body.offset, 0, body.flags).pack()
        return ConfigSpace(body.offset, body.size, body.flags, data).pack()

    def _on_set_config(self, msg: Message, body: ConfigSpace) -> None:
        cfg = self.device.net_config
        if body.flags == CONFIG_TYPE_FRONTEND:
            raise ProtocolError("every virtio_net_config field is read-only to the driver "
                                "(SET_CONFIG without the live-migration flag)")
        if body.flags != CONFIG_TYPE_MIGRATION:
            raise ProtocolError(f"unknown config flags {body.flags:#x}")
        image = bytearray(cfg.to_bytes())
        if body.offset + body.size > len(image):
            raise ConfigAccessError(f"config write [{body.offset}, {body.offset + body.size}) "
                                    f"outside the {len(image)}-byte configuration space")
        image[body.offset:body.offset + body.size] = body.payload
        pairs = int.from_bytes(image[8:10], "little")
        if cfg.has_field("max_virtqueue_pairs") and pairs != cfg.max_virtqueue_pairs:
            raise ProtocolError(f"max_virtqueue_pairs {pairs} differs from this device's "
                                f"{cfg.max_virtqueue_pairs}")
        mtu = int.from_bytes(image[10:12], "little")
        if cfg.has_field("mtu") and mtu != cfg.mtu:
            self._apply_mtu(mtu)
        if cfg.has_field("status"):
            cfg.status = int.from_bytes(image[6:8], "little")
        cfg.mac = bytes(image[:6])
        self.device.rx_filter.mac = cfg.mac

    def _on_set_status(self, msg: Message, body: U64) -> None:
        value = body.value
        if value > 0xFF:
            raise ProtocolError(f"device status {value:#x} does not fit 8 bits")
        if value & DeviceStatus.FEATURES_OK and not self._features_ok:
            value &= ~DeviceStatus.FEATURES_OK        # refused: the driver reads it back
        if value == 0:
            self._stop_all_rings()                    # indices kept for GET_VRING_BASE
            self.needs_reset_reason = None
        self.status = value

    def _on_get_status(self, msg: Message, body: None) -> bytes:
        value = self.status
        if self.needs_reset_reason is not None:
            value |= DeviceStatus.DEVICE_NEEDS_RESET
        return U64(value).pack()

    def _on_reset_device(self, msg: Message, body: None) -> None:
        protocol, owner = self.protocol_features, self.owner
        self._teardown()
        self._restore_mtu()
        self._init_state()
        self.protocol_features, self.owner = protocol, owner
        log.info("%s: device reset", self.name)

    # ---- handlers: net ------------------------------------------------------------------------

    def _apply_mtu(self, mtu: int) -> None:
        if not MTU_MIN <= mtu <= MTU_MAX:
            raise ProtocolError(f"MTU {mtu} not in {MTU_MIN}..{MTU_MAX}")
        self._set_packet_mtu(mtu)
        self._tap_mtu_changed = mtu != self.mtu
        dev = self.device
        dev.net_config.mtu = mtu
        dev.set_guest_offloads(dev.guest_offloads)    # workers take the new frame size

    def _on_net_set_mtu(self, msg: Message, body: U64) -> None:
        self._apply_mtu(body.value)
        log.info("%s: MTU %d", self.name, body.value)

    def _on_send_rarp(self, msg: Message, body: U64) -> None:
        mac = bytes(msg.body[:6])
        frame = rarp_frame(mac)
        inject = getattr(self.packet, "inject", None)
        if inject is not None:
            inject(frame)
        else:
            data = bytes(HDR_LEN) + frame
            if os.write(self.packet.fds[0], data) != len(data):
                raise OSError("short write of the RARP frame")
        log.info("%s: RARP announcement sent for %s", self.name, mac.hex(":"))

    def __repr__(self) -> str:
        started = sum(r.started for r in self.rings)
        return (f"<VhostUserNetBackend {self.name} pairs={self.queues} "
                f"rings started={started} regions={len(self.regions)}>")


#: request -> handler (one method per request)
_HANDLERS: dict[Request, Callable[[VhostUserNetBackend, Message, object], bytes | None]] = {
    req: getattr(VhostUserNetBackend, f"_on_{req.name.lower()}")
    for req in Request if hasattr(VhostUserNetBackend, f"_on_{req.name.lower()}")}

#: the requests this back-end handles
HANDLED_REQUESTS = tuple(sorted(_HANDLERS, key=int))


__all__ = ["VhostUserNetBackend", "BackendStateError", "RingState", "MappedRegion",
           "region_key", "VHOST_USER_NET_FEATURES", "VHOST_USER_NET_RULES", "PROTOCOL_FEATURES",
           "GUEST_OFFLOADS", "HANDLED_REQUESTS", "MAX_QUEUE_PAIRS", "DEFAULT_MAC",
           "rarp_frame", "capabilities", "protocol_names"]
