"""The virtio-net device: configuration space, control queue, N queue pairs, each served
by its own worker thread moving frames between the guest's rings and a packet backend
(a TAP's queue fds, or anything with the same few methods).

Queue numbering follows the spec (5.1.2): receiveq1, transmitq1, ..., receiveqN,
transmitqN, then the control queue when VIRTIO_NET_F_CTRL_VQ is offered.
"""

from __future__ import annotations

import logging
import os
import select
import threading
from typing import Protocol, Sequence

from vqcore.net import NetRxFilter, NetStats

from pyvirtio.device import VirtioDevice, Vring
from pyvirtio.features import NET_DEPENDENCIES, NetFeature, Transport
from pyvirtio.net.config import NetConfig
from pyvirtio.net.ctrl import ControlQueue
from pyvirtio.net.header import HDR_LEN
from pyvirtio import fds
from pyvirtio.runtime import (TX_COALESCE_US, QueuePairConfig, check_tx_coalesce_us,
                              QueuePairWorker)

log = logging.getLogger(__name__)

VIRTIO_ID_NET = 1

#: guest offloads that let the backend hand the guest frames of up to 64 KiB
GUEST_GSO = (NetFeature.GUEST_TSO4 | NetFeature.GUEST_TSO6 | NetFeature.GUEST_UFO
             | NetFeature.GUEST_USO4 | NetFeature.GUEST_USO6)
#: largest frame a GSO-capable TAP delivers: 64 KiB of IP packet + Ethernet + VLAN tag
GSO_FRAME_MAX = 65535 + 14 + 4

#: what a device offers by default (the control-queue bits and MQ are added as configured)
DEFAULT_FEATURES = (Transport.VERSION_1 | Transport.EVENT_IDX | Transport.INDIRECT_DESC
                    | NetFeature.MRG_RXBUF | NetFeature.CSUM | NetFeature.GUEST_CSUM
                    | NetFeature.HOST_TSO4 | NetFeature.HOST_TSO6 | NetFeature.HOST_ECN
                    | NetFeature.HOST_UFO | NetFeature.HOST_USO
                    | NetFeature.GUEST_TSO4 | NetFeature.GUEST_TSO6 | NetFeature.GUEST_ECN
                    | NetFeature.GUEST_UFO | NetFeature.GUEST_USO4 | NetFeature.GUEST_USO6
                    | NetFeature.MTU | NetFeature.MAC | NetFeature.STATUS)
#: the control-queue features offered with a control queue
CTRL_FEATURES = (NetFeature.CTRL_VQ | NetFeature.CTRL_RX | NetFeature.CTRL_RX_EXTRA
                 | NetFeature.CTRL_VLAN | NetFeature.CTRL_MAC_ADDR | NetFeature.GUEST_ANNOUNCE
                 | NetFeature.CTRL_GUEST_OFFLOADS)


class PacketBackend(Protocol):
    """Where frames go: one non-blocking fd per queue pair carrying frames with a
    12-byte virtio-net header (a TAP opened with IFF_VNET_HDR, a socketpair, ...)."""

    @property
    def fds(self) -> Sequence[int]:
        """One fd per queue pair."""

    @property
    def tx_fds(self) -> Sequence[int]:
        """Where each pair's TX frames go: ``fds`` itself, or the sink's
        :data:`vqcore.net.DISCARD_FD` (consumed with no syscall)."""

    def set_offloads(self, features: int) -> int:
        """Enable the offloads matching the guest features; returns what was set."""

    def set_active_queues(self, n: int) -> None:
        """Only the first ``n`` queue fds carry traffic from now on."""


class NetDevice(VirtioDevice):
    """A virtio-net device over a :class:`PacketBackend`.

    Args:
        backend: the packet backend (e.g. :class:`pyvirtio.backends.tap.Tap`) with at
            least ``max_pairs`` fds.
        mac: the MAC address in the configuration space and the RX filter.
        mtu: the MTU in the configuration space (VIRTIO_NET_F_MTU).
        max_pairs: queue pairs (VIRTIO_NET_F_MQ is offered when > 1).
        queue_size: the largest size of each queue.
        features: the features offered; default :data:`DEFAULT_FEATURES` plus the
            control-queue features when ``ctrl_queue``, plus MQ when ``max_pairs > 1``.
        ctrl_queue: whether the device has a control queue.
        poll: busy-poll workers (never sleep) instead of epoll waits.
        tx_coalesce_us: TX kick coalescing of the workers: the longest a drained TX
            ring waits for more frames before the worker looks again (0: off; see
            :mod:`pyvirtio.runtime`).
        rules: feature dependency rules (default :data:`NET_DEPENDENCIES`; a vhost-user
            backend drops the control-queue ones, since the front-end keeps that queue).
    """

    def __init__(self, backend: PacketBackend, *, mac: bytes = b"\x52\x54\x00\x12\x34\x56",
                 mtu: int = 1500, max_pairs: int = 1, queue_size: int = 256,
                 features: int | None = None, ctrl_queue: bool = True, poll: bool = False,
                 tx_coalesce_us: int = TX_COALESCE_US, rules: dict | None = None,
                 name: str = "virtio-net") -> None:
        if max_pairs < 1:
            raise ValueError("max_pairs must be >= 1")
        if len(backend.fds) < max_pairs:
            raise ValueError(f"the backend has {len(backend.fds)} fds for {max_pairs} pairs")
        if features is None:
            features = int(DEFAULT_FEATURES)
            if ctrl_queue:
                features |= int(CTRL_FEATURES)
                if max_pairs > 1:
                    features |= int(NetFeature.MQ)
        self.backend = backend
        self.max_pairs = max_pairs
        self.has_ctrl = bool(ctrl_queue)
        self.poll = poll
        check_tx_coalesce_us(tx_coalesce_us)
        self.tx_coalesce_us = tx_coalesce_us
        self.net_config = NetConfig(features, mac=mac, max_virtqueue_pairs=max_pairs, mtu=mtu)
        self.rx_filter = NetRxFilter(mac)
        num_queues = 2 * max_pairs + (1 if ctrl_queue else 0)
        super().__init__(VIRTIO_ID_NET, features=features, num_queues=num_queues,
                         queue_size=queue_size,
                         rules=NET_DEPENDENCIES if rules is None else rules, name=name)
        self.net_config.on_change = self.config_changed
        flags = os.EFD_NONBLOCK | os.EFD_CLOEXEC
        #: per queue: the eventfd the driver kicks and the one we signal (interrupt)
        self.kick_fds = [os.eventfd(0, flags) for _ in range(num_queues)]
        self.call_fds = [os.eventfd(0, flags) for _ in range(num_queues)]
        self.workers: dict[int, QueuePairWorker] = {}
        self._pair_stats: list[tuple[NetStats, NetStats]] = [
            (NetStats(), NetStats()) for _ in range(max_pairs)]
        self.active_pairs = 1
        self.guest_offloads = 0
        self.ctrl: ControlQueue | None = None
        self._ctrl_thread: threading.Thread | None = None
        self._ctrl_stop = -1
        self._lock = threading.RLock()
        self._closed = False

    # ---- queue numbering -----------------------------------------------------------------

    @staticmethod
    def rx_index(pair: int) -> int:
        """Queue index of receiveq(pair+1)."""
        return 2 * pair

    @staticmethod
    def tx_index(pair: int) -> int:
        """Queue index of transmitq(pair+1)."""
        return 2 * pair + 1

    @property
    def ctrl_index(self) -> int | None:
        """Queue index of the control queue, or None."""
        return 2 * self.max_pairs if self.has_ctrl else None

    # ---- configuration space ----------------------------------------------------------

    @property
    def config_size(self) -> int:
        return self.net_config.size

    def _read_config(self, offset: int, length: int) -> bytes:
        return self.net_config.read(offset, length)

    def _write_config(self, offset: int, data: bytes) -> None:
        if self.net_config.write(offset, data, features=self.negotiated_features):
            self.rx_filter.mac = self.net_config.mac

    # ---- NetControlTarget (what the control queue acts on) ------------------------------

    @property
    def max_virtqueue_pairs(self) -> int:
        return self.net_config.max_virtqueue_pairs

    def mac_address_set(self, mac: bytes) -> None:
        self.net_config.mac = mac

    def ack_announce(self) -> None:
        self.net_config.ack_announce()

    def set_guest_offloads(self, offloads: int) -> None:
        self.guest_offloads = int(offloads)
        self.backend.set_offloads(self.guest_offloads)
        for w in list(self.workers.values()):
            w.cfg.max_frame = self._max_frame()

    def set_queue_pairs(self, pairs: int) -> None:
        """Use ``pairs`` queue pairs from now on (VQ_PAIRS_SET): workers and TAP queues
        beyond it stop, those within start."""
        if not 1 <= pairs <= self.max_pairs:
            raise ValueError(f"queue pairs {pairs} not in 1..{self.max_pairs}")
        with self._lock:
            for p in sorted(self.workers):
                if p >= pairs:
                    self._stop_worker(p)
            self.backend.set_active_queues(pairs)
            self.active_pairs = pairs
            if self.driver_ok:
                for p in range(pairs):
                    self.start_pair(p)
        log.info("%s: %d queue pair(s) active", self.name, pairs)

    # ---- life cycle ------------------------------------------------------------------------

    def on_driver_ok(self) -> None:
        feats = self.negotiated_features
        self.guest_offloads = feats & int(GUEST_GSO | NetFeature.GUEST_CSUM | NetFeature.GUEST_ECN)
        self.backend.set_offloads(self.guest_offloads)
        self.rx_filter.vlan_filtering = bool(feats & NetFeature.CTRL_VLAN)
        with self._lock:
            self.active_pairs = 1
            self.backend.set_active_queues(1)
            self.start_pair(0)
            if self.has_ctrl and self.queues[self.ctrl_index] is not None:
                self._start_ctrl()

    def on_reset(self) -> None:
        self.stop()
        self.rx_filter.reset()
        self.guest_offloads = 0
        self.active_pairs = 1

    def stop(self) -> None:
        """Stop every worker (the device keeps its state)."""
        # the control thread first, and outside the lock: a VQ_PAIRS_SET it is running
        # takes the lock itself
        self._stop_ctrl()
        with self._lock:
            for p in list(self.workers):
                self._stop_worker(p)

    def close(self) -> None:
        """Stop and close the eventfds the device owns (not the backend)."""
        if self._closed:
            return
        self.stop()
        for fd in self.kick_fds + self.call_fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self._closed = True

    def __enter__(self) -> "NetDevice":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def kick(self, index: int) -> None:
        """The driver notifies queue ``index`` (for in-process drivers and tests)."""
        os.eventfd_write(self.kick_fds[index], 1)

    # ---- workers -------------------------------------------------------------------------

    def _max_frame(self) -> int:
        if self.guest_offloads & int(GUEST_GSO):
            return GSO_FRAME_MAX + HDR_LEN
        return self.net_config.mtu + 14 + 4 + HDR_LEN

    def own_vring(self, index: int) -> Vring | None:
        """Queue ``index`` as the device itself runs it for an in-process driver (its
        own kick and call eventfds), or None when it does not run."""
        queue = self.queues[index]
        if queue is None:
            return None
        return Vring(index, queue, self.kick_fds[index], self.call_fds[index])

    def start_pair(self, pair: int, rx: Vring | None = None, tx: Vring | None = None
                   ) -> None:
        """Start the worker of ``pair`` over ``rx`` and ``tx`` (the receive and
        transmit ring; one may be None), or, with neither given, over whichever of the
        device's own queues run. A ring without a kick fd is busy-polled."""
        with self._lock:
            if rx is None and tx is None:
                rx, tx = self.own_vring(self.rx_index(pair)), self.own_vring(self.tx_index(pair))
            self._start_worker(pair, rx, tx)

    def stop_pair(self, pair: int) -> None:
        """Stop the worker of ``pair`` (its queues keep their state)."""
        with self._lock:
            self._stop_worker(pair)

    def _start_worker(self, pair: int, rx: Vring | None, tx: Vring | None) -> None:
        if pair in self.workers:
            return
        if rx is None and tx is None:
            log.debug("%s: pair %d not started (queues not enabled)", self.name, pair)
            return
        rx_stats, tx_stats = self._pair_stats[pair]
        cfg = QueuePairConfig(
            index=pair, rx=None, tx=None, fd=self.backend.fds[pair],
            tx_fd=self.backend.tx_fds[pair], rx_kick=-1, tx_kick=-1, rx_filter=self.rx_filter,
            mrg_rxbuf=bool(self.negotiated_features & NetFeature.MRG_RXBUF),
            max_frame=self._max_frame(),
            poll=self.poll or any(v.kick_fd < 0 for v in (rx, tx) if v is not None),
            tx_coalesce_us=self.tx_coalesce_us, on_violation=self._on_violation,
            rx_stats=rx_stats, tx_stats=tx_stats)
        for side, v in (("rx", rx), ("tx", tx)):
            if v is not None:
                for attr, value in (("", v.queue), ("_kick", v.kick_fd), ("_call", v.call_fd),
                                    ("_err", v.err_fd), ("_enabled", v.enabled)):
                    setattr(cfg, side + attr, value)
        worker = QueuePairWorker(cfg)
        self.workers[pair] = worker
        worker.start()

    def _stop_worker(self, pair: int) -> None:
        worker = self.workers.pop(pair, None)
        if worker is not None:
            worker.stop()

    def _on_violation(self, pair: int, which: str, exc: BaseException) -> None:
        self.needs_reset(f"queue pair {pair} {which}: {exc}")

    def pair_stats(self) -> list[dict[str, dict[str, int]]]:
        """Per queue pair: {"rx": counters, "tx": counters}."""
        return [{"rx": rx.as_dict(), "tx": tx.as_dict()} for rx, tx in self._pair_stats]

    # ---- control queue --------------------------------------------------------------------

    def _start_ctrl(self) -> None:
        queue = self.queues[self.ctrl_index]
        self.ctrl = ControlQueue(queue, self, on_error=lambda exc: self.needs_reset(
            f"control queue: {exc}"))
        self._ctrl_stop = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._ctrl_thread = threading.Thread(target=self._ctrl_loop, name="vq-ctrl", daemon=True)
        self._ctrl_thread.start()

    def _ctrl_loop(self) -> None:
        kick, stop, call = (self.kick_fds[self.ctrl_index], self._ctrl_stop,
                            self.call_fds[self.ctrl_index])
        ctrl = self.ctrl
        queue = ctrl.queue
        ep = select.epoll()
        try:
            ep.register(kick, select.EPOLLIN)
            ep.register(stop, select.EPOLLIN)
            while True:
                events = ep.poll()
                if any(fd == stop for fd, _ in events):
                    return
                fds.drain(kick)
                while True:
                    queue.disable_notification()
                    if ctrl.process() and queue.needs_notification():
                        fds.signal(call)
                    if queue.broken or not queue.enable_notification():
                        break
        except Exception:
            log.exception("%s: control queue thread failed", self.name)
        finally:
            ep.close()

    def _stop_ctrl(self) -> None:
        if self._ctrl_thread is not None:
            os.eventfd_write(self._ctrl_stop, 1)
            self._ctrl_thread.join(5)
            os.close(self._ctrl_stop)
            self._ctrl_thread = None
            self._ctrl_stop = -1
        self.ctrl = None


__all__ = ["NetDevice", "PacketBackend", "DEFAULT_FEATURES", "CTRL_FEATURES", "GUEST_GSO",
           "VIRTIO_ID_NET"]
