"""The virtio-net device served over vhost-user: :class:`VhostUserNetDevice` adapts a
:class:`~pyvirtio.net.device.NetDevice` over a packet backend (a TAP, a
:class:`~pyvirtio.backends.sink.Sink` or a :class:`~pyvirtio.backends.loopback.Loopback`)
to the device protocol of :mod:`pyvirtio.vhost_user.device`; the generic handler does
the rest.

Only the data queue pairs live here: the front-end (QEMU) keeps the control queue,
the MAC and STATUS bits and the control-queue features to itself. Receive and transmit
ring of a pair (rings 2p and 2p+1) are one group, served by one worker. A disabled
ring (SET_VRING_ENABLE 0) has its TX chains discarded and gets no RX. The packet
backend's queues are attached up to the last pair with an enabled ring.

The device's own requests: NET_SET_MTU (the MTU in the configuration space and on the
TAP; given back when the connection ends) and SEND_RARP (QEMU's announcement after a
migration, sent to the packet backend). SET_CONFIG is taken only from the front-end
restoring state (VHOST_SET_CONFIG_TYPE_MIGRATION): every virtio_net_config field is
read-only to a driver.
"""

from __future__ import annotations

import logging
import os
import struct
from typing import Any, Mapping, Sequence

from vqcore import GuestMemory

from pyvirtio.device import ConfigAccessError, Vring
from pyvirtio.features import NET_DEPENDENCIES, NetFeature, Transport
from pyvirtio.net.device import GUEST_GSO, NetDevice, PacketBackend
from pyvirtio.net.header import HDR_LEN
from pyvirtio.runtime import TX_COALESCE_US, check_tx_coalesce_us
from pyvirtio.vhost_user.device import CoreDevice, RequestHandler
from pyvirtio.vhost_user.messages import (MAX_QUEUE_SIZE, Message, ProtocolError,
                                          ProtocolFeature, Request, U64)

log = logging.getLogger(__name__)

N = NetFeature
#: virtio features offered by default (VIRTIO_NET_F_MQ is added with more than one pair)
VHOST_USER_NET_FEATURES = (
    Transport.VERSION_1 | Transport.EVENT_IDX | Transport.INDIRECT_DESC
    | Transport.RING_PACKED
    | N.MRG_RXBUF | N.CSUM | N.GUEST_CSUM | N.MTU
    | N.HOST_TSO4 | N.HOST_TSO6 | N.HOST_ECN | N.HOST_UFO
    | N.GUEST_TSO4 | N.GUEST_TSO6 | N.GUEST_ECN | N.GUEST_UFO)
del N

#: protocol features the net device's own requests need
NET_PROTOCOL_FEATURES = ProtocolFeature.NET_MTU | ProtocolFeature.RARP

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

ETH_P_RARP = 0x8035
ETH_P_IP = 0x0800
ARPHRD_ETHER = 1
ARPOP_RREQUEST = 3
ETH_ZLEN = 60


def rarp_frame(mac: bytes) -> bytes:
    """The broadcast RARP request QEMU's announce sends for ``mac`` (60 bytes)."""
    mac = bytes(mac)
    if len(mac) != 6:
        raise ValueError(f"a MAC address has 6 bytes, not {len(mac)}")
    arp = struct.pack("!HHBBH6s4s6s4s", ARPHRD_ETHER, ETH_P_IP, 6, 4, ARPOP_RREQUEST,
                      mac, bytes(4), mac, bytes(4))
    frame = b"\xff" * 6 + mac + struct.pack("!H", ETH_P_RARP) + arp
    return frame + bytes(ETH_ZLEN - len(frame))


class VhostUserNetDevice(CoreDevice):
    """A virtio-net device for vhost-user front-ends (one port).

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
        name: for log lines.
    """

    device_type = "net"
    max_queue_size = MAX_QUEUE_SIZE

    def __init__(self, packet: PacketBackend, *, queues: int = 1, mac: bytes = DEFAULT_MAC,
                 mtu: int = 1500, poll: bool = False, tx_coalesce_us: int = TX_COALESCE_US,
                 features: int | None = None, packed: bool = True,
                 name: str = "vhost-user-net") -> None:
        if not isinstance(queues, int) or not 1 <= queues <= MAX_QUEUE_PAIRS:
            raise ValueError(f"queue pairs {queues!r} not in 1..{MAX_QUEUE_PAIRS}")
        if len(packet.fds) < queues:
            raise ValueError(f"the packet backend has {len(packet.fds)} fds for {queues} pairs")
        if len(bytes(mac)) != 6:
            raise ValueError("a MAC address has 6 bytes")
        if not MTU_MIN <= mtu <= MTU_MAX:
            raise ValueError(f"MTU {mtu} not in {MTU_MIN}..{MTU_MAX}")
        check_tx_coalesce_us(tx_coalesce_us)
        if features is None:
            features = int(VHOST_USER_NET_FEATURES)
            if queues > 1:
                features |= int(NetFeature.MQ)
        features &= ~int(Transport.PROTOCOL_FEATURES)       # the handler's bit
        if not packed:
            features &= ~int(Transport.RING_PACKED)
        self.packet = packet
        self.queues = queues
        self.num_queues = 2 * queues
        self.mac = bytes(mac)
        self.mtu = mtu
        self.poll = poll
        self.tx_coalesce_us = tx_coalesce_us
        self.name = name
        self.offered = int(features)
        self._active_pairs: int | None = None
        self._tap_mtu_changed = False
        self.net: NetDevice = self._new_net()

    def _new_net(self) -> NetDevice:
        return NetDevice(self.packet, mac=self.mac, mtu=self.mtu, max_pairs=self.queues,
                         queue_size=MAX_QUEUE_SIZE, features=self.offered, ctrl_queue=False,
                         poll=self.poll, tx_coalesce_us=self.tx_coalesce_us,
                         rules=VHOST_USER_NET_RULES, name=self.name)

    @property
    def core(self) -> NetDevice:
        return self.net

    # ---- negotiation -----------------------------------------------------------------

    def protocol_features(self) -> int:
        return int(NET_PROTOCOL_FEATURES)

    def queue_num(self) -> int:
        # queue *pairs*, as QEMU's vhost-user net client compares it with queues=N
        return self.queues

    def set_features(self, features: int) -> int:
        negotiated = super().set_features(features)
        self.net.set_guest_offloads(negotiated & GUEST_OFFLOADS)
        return negotiated

    def requests(self) -> Mapping[Request, RequestHandler]:
        return {Request.NET_SET_MTU: self._on_net_set_mtu,
                Request.SEND_RARP: self._on_send_rarp}

    # ---- rings ------------------------------------------------------------------------

    def queue_group(self, index: int) -> int:
        return index // 2

    def start_group(self, group: int, vrings: Sequence[Vring]) -> None:
        rx = next((v for v in vrings if v.index % 2 == 0), None)
        tx = next((v for v in vrings if v.index % 2 == 1), None)
        self.net.start_pair(group, rx, tx)

    def stop_group(self, group: int) -> None:
        self.net.stop_pair(group)

    def set_ring_enables(self, enables: Sequence[bool]) -> None:
        """Attach the packet backend's queues up to the last pair with an enabled ring."""
        n = 1
        for p in range(self.queues):
            if enables[2 * p] or enables[2 * p + 1]:
                n = p + 1
        if n == self._active_pairs:
            return
        try:
            self.packet.set_active_queues(n)
            self._active_pairs = n
        except (OSError, ValueError) as exc:
            log.warning("%s: cannot activate %d packet queue(s): %s", self.name, n, exc)

    def update_memory(self, memory: GuestMemory | None) -> None:
        self.net.memory = memory

    # ---- configuration space ------------------------------------------------------------

    def config_size(self) -> int:
        return self.net.config_size

    def read_config(self, offset: int, size: int) -> bytes:
        return self.net.read_config(offset, size)

    def write_config(self, offset: int, data: bytes, *, migration: bool) -> None:
        cfg = self.net.net_config
        if not migration:
            raise ProtocolError("every virtio_net_config field is read-only to the driver "
                                "(SET_CONFIG without the live-migration flag)")
        image = bytearray(cfg.to_bytes())
        if offset + len(data) > len(image):
            raise ConfigAccessError(f"config write [{offset}, {offset + len(data)}) "
                                    f"outside the {len(image)}-byte configuration space")
        image[offset:offset + len(data)] = data
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
        self.net.rx_filter.mac = cfg.mac

    # ---- the device's own requests --------------------------------------------------------

    def _set_packet_mtu(self, mtu: int) -> None:
        set_mtu = getattr(self.packet, "set_mtu", None)
        if set_mtu is not None:
            set_mtu(mtu)

    def _apply_mtu(self, mtu: int) -> None:
        if not MTU_MIN <= mtu <= MTU_MAX:
            raise ProtocolError(f"MTU {mtu} not in {MTU_MIN}..{MTU_MAX}")
        self._set_packet_mtu(mtu)
        self._tap_mtu_changed = mtu != self.mtu
        net = self.net
        net.net_config.mtu = mtu
        net.set_guest_offloads(net.guest_offloads)    # workers take the new frame size

    def _restore_mtu(self) -> None:
        """Give the packet backend its MTU back if NET_SET_MTU changed it."""
        if self._tap_mtu_changed:
            self._tap_mtu_changed = False
            try:
                self._set_packet_mtu(self.mtu)
            except (OSError, ValueError) as exc:
                log.warning("%s: cannot restore the MTU %d: %s", self.name, self.mtu, exc)

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

    # ---- state ------------------------------------------------------------------------

    def reset(self) -> None:
        """A fresh NetDevice (counters too), the packet backend's MTU given back."""
        self.net.close()
        self._restore_mtu()
        self.net = self._new_net()

    def pair_stats(self) -> list[dict[str, dict[str, int]]]:
        """Per queue pair: {"rx": counters, "tx": counters}."""
        return self.net.pair_stats()

    def stats(self) -> dict[str, Any]:
        return {"pairs": self.pair_stats()}

    def log_stats(self, why: str = "", level: int = logging.INFO) -> None:
        """Log each queue pair's RX and TX counters, one line per pair
        (``pair N stats: rx packets=.. bytes=.. ...; tx ...``)."""
        for pair, st in enumerate(self.pair_stats()):
            rx, tx = (" ".join(f"{k}={v}" for k, v in st[d].items()) for d in ("rx", "tx"))
            log.log(level, "%s: pair %d stats%s: rx %s; tx %s", self.name, pair,
                    f" ({why})" if why else "", rx, tx)

    def close(self) -> None:
        self.net.close()
        self._restore_mtu()

    def __repr__(self) -> str:
        return f"<VhostUserNetDevice {self.name} pairs={self.queues}>"


__all__ = ["VhostUserNetDevice", "VHOST_USER_NET_FEATURES", "NET_PROTOCOL_FEATURES",
           "VHOST_USER_NET_RULES", "GUEST_OFFLOADS", "DEFAULT_MAC", "MAX_QUEUE_PAIRS",
           "MTU_MIN", "MTU_MAX", "rarp_frame"]
