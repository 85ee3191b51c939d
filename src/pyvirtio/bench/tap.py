"""The TAP datapath level of ``pyvirtio bench``: TX and RX frames per second through a
real multiqueue TAP, ours against the kernel's own ceiling measured in the same run.

Everything happens inside a network namespace this module creates and removes; the
frames never leave it. Every rate is counted **on the namespace side**, from the TAP
interface's own counters (``IFLA_STATS64``): ``rx_packets`` for TX (frames the kernel
accepted from the queue fds into its stack) and ``tx_packets`` for RX (frames the
kernel handed to a reader of the queue fds).

* **TX, ours**: a :class:`~pyvirtio.net.device.NetDevice` (its worker threads and the
  nogil burst kernels) fed by a :class:`~pyvirtio.net.driver.NetDriver` as the guest,
  which keeps the TX rings full by re-adding pre-written slots a chunk at a time
  (:meth:`~pyvirtio.net.driver.NetDriver.replay`; nothing per frame in Python).
  **Baseline**: :func:`vqcore.netbench.writev_loop`, the same ``writev`` (12-byte
  virtio-net header + frame) in a plain C loop on the same queue fd.
* **RX, ours**: an injector (:func:`vqcore.netbench.send_loop` on an ``AF_PACKET``
  socket bound to the TAP inside the namespace, one thread per queue pair, GIL
  released) floods the TAP while the device's workers ``readv`` into guest buffers and
  the guest re-posts them per batch. **Baseline**: the same injector against
  :func:`vqcore.netbench.readv_loop`, a plain C loop of ``readv`` on the same fd(s).

Ours and the baseline alternate (A B A B ...); with ``poll`` the device's workers
busy-poll instead of sleeping in epoll (a second "ours" figure against the same
baseline samples).
"""

from __future__ import annotations

import errno
import logging
import os
import select
import socket
import struct
import threading
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

import vqcore
from vqcore import netbench

from pyvirtio.backends.tap import TUN_DEVICE, Tap
from pyvirtio.bench.figures import Figure
from pyvirtio.features import NetFeature
from pyvirtio.net.ctrl import VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET, VIRTIO_NET_OK
from pyvirtio.net.device import GUEST_GSO, NetDevice
from pyvirtio.net.driver import NetDriver
from pyvirtio.netns import NetNamespace, entered

log = logging.getLogger("pyvirtio.bench")

#: Ethernet frame sizes measured (bytes on the wire without FCS, vnet header excluded)
FRAME_SIZES = (64, 1500)
#: queue pairs measured
PAIRS = (1, 2)
#: virtqueue size of the device and the guest (QEMU's largest tx/rx_queue_size)
QUEUE_SIZE = 1024
#: the TAP inside the benchmark namespace
TAP_NAME = "pvbench0"
HOST_MAC = bytes.fromhex("02aabbccdd01")     # the TAP's own address
GUEST_MAC = bytes.fromhex("525400123456")    # the device's address
OTHER_MAC = bytes.fromhex("02aabbccdd99")    # nobody's: TX frames stop in the kernel
GUEST_IP, HOST_IP = "10.77.0.2", "10.77.0.1"
#: IEEE 802 local experimental EtherType: no protocol handler, no reply, no forwarding
ETH_P_EXPERIMENTAL = 0x88B5
ETH_P_IP = 0x0800
#: the TAP's queue length (frames), so an RX burst of the injector is not dropped at once
TAP_QUEUE_LEN = 32768
#: guest features left out: no guest offloads (an RX buffer of 1536 bytes then holds
#: any frame, one buffer per frame with MRG_RXBUF), everything else as offered
WITHOUT = int(GUEST_GSO | NetFeature.GUEST_CSUM | NetFeature.GUEST_ECN)
#: the guest's TX slot (vnet header + the largest frame measured)
TX_SLOT = 2048

NOTE_TX = ("TX: device worker writev()s straight from guest memory (one syscall per frame) "
           "vs a C writev loop on the same fd; counted as the TAP's rx_packets in the "
           "namespace; bounded by the kernel's per-frame TAP receive path (tun_get_user + "
           "netif_rx) on one core; the guest refills the ring from the other core")
NOTE_RX = ("RX: device worker readv()s straight into guest buffers vs a C readv loop, with "
           "an AF_PACKET injector in the namespace on the other core; counted as the TAP's "
           "tx_packets; bounded by the injector or the reader, whichever is slower (both "
           "share 2 vCPUs with the guest thread)")


def skip_reason() -> str | None:
    """Why the level cannot run here, or ``None``."""
    if os.geteuid() != 0:
        return "needs root (a network namespace and a TAP device)"
    if not os.path.exists(TUN_DEVICE):
        return f"{TUN_DEVICE} does not exist"
    return None


# ---------------------------------------------------------------------------------------
# frames

def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def tx_frame(size: int) -> bytes:
    """A ``size``-byte frame from the guest: to a MAC nobody owns, EtherType
    :data:`ETH_P_EXPERIMENTAL` (the kernel counts it received, then drops it)."""
    head = OTHER_MAC + GUEST_MAC + struct.pack("!H", ETH_P_EXPERIMENTAL)
    return head + bytes((i * 7) & 0xFF for i in range(size - len(head)))


def rx_frame(size: int, sport: int) -> bytes:
    """A ``size``-byte Ethernet/IPv4/UDP frame for the guest (UDP source port ``sport``
    picks the flow, and so the TAP queue)."""
    payload = bytes((i * 3) & 0xFF for i in range(size - 14 - 20 - 8))
    udp = struct.pack("!HHHH", sport, 5000, 8 + len(payload), 0) + payload
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0, 64, 17, 0,
                     socket.inet_aton(HOST_IP), socket.inet_aton(GUEST_IP))
    ip = ip[:10] + struct.pack("!H", _checksum(ip)) + ip[12:]
    return GUEST_MAC + HOST_MAC + struct.pack("!H", ETH_P_IP) + ip + udp


# ---------------------------------------------------------------------------------------
# the namespace and its TAP

class TapBench:
    """A namespace holding a 2-queue TAP, for the whole level (a context manager)."""

    def __init__(self, queues: int = max(PAIRS)) -> None:
        self.ns = NetNamespace(prefix="pvbench")
        self.ns.open()
        try:
            with entered(self.ns.name):
                for key in ("default", "all"):
                    with open(f"/proc/sys/net/ipv6/conf/{key}/disable_ipv6", "w") as fh:
                        fh.write("1")
            self.tap = Tap.create(TAP_NAME, queues, netns=self.ns, mac=HOST_MAC)
            with self.tap.iproute() as ipr:
                ipr.link("set", index=self.tap.ifindex, txqlen=TAP_QUEUE_LEN)
            self._flows: dict[int, list[int]] = {}
        except BaseException:
            self.ns.remove()
            raise

    def close(self) -> None:
        """Remove the TAP and the namespace."""
        try:
            self.tap.close()
        finally:
            self.ns.remove()

    def __enter__(self) -> "TapBench":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def counters(self) -> dict[str, int]:
        """The TAP's interface counters as the namespace sees them."""
        with self.tap.iproute() as ipr:
            link = ipr.get_links(self.tap.ifindex)[0]
        stats = link.get_attr("IFLA_STATS64") or link.get_attr("IFLA_STATS")
        return {k: int(stats[k]) for k in ("rx_packets", "rx_bytes", "rx_dropped",
                                           "tx_packets", "tx_bytes", "tx_dropped")}

    def fill(self, size: int, pairs: int, per_queue: int) -> int:
        """Queue ``per_queue`` frames of ``size`` bytes on each of the first ``pairs``
        TAP queues while nobody reads them; returns how many the TAP holds."""
        sports = self.flows(pairs)
        c0 = self.counters()
        with self.injector() as sock:
            for sport in sports:
                netbench.send_loop(sock.fileno(), rx_frame(size, sport), per_queue)
        dropped = self.counters()["tx_dropped"] - c0["tx_dropped"]
        return pairs * per_queue - dropped

    def injector(self) -> socket.socket:
        """An ``AF_PACKET`` socket on the TAP inside the namespace that only sends
        (protocol 0: it receives nothing)."""
        with entered(self.ns.name):
            sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
        try:
            sock.bind((TAP_NAME, 0))
        except OSError:
            sock.close()
            raise
        return sock

    def flows(self, pairs: int) -> list[int]:
        """UDP source ports whose frames the TAP queues on queue 0, 1, ... ``pairs - 1``
        (the TAP picks a queue by flow hash; found by probing, once)."""
        if pairs in self._flows:
            return self._flows[pairs]
        self.tap.set_active_queues(pairs)
        fds = self.tap.fds[:pairs]
        found: dict[int, int] = {}
        with self.injector() as sock:
            for sport in range(40000, 40256):
                if len(found) == pairs:
                    break
                sock.send(rx_frame(64, sport))
                deadline = time.monotonic() + 0.5
                queue = None
                while queue is None and time.monotonic() < deadline:
                    ready, _, _ = select.select(fds, [], [], 0.05)
                    for fd in ready:
                        try:
                            os.read(fd, 65536)
                        except BlockingIOError:
                            continue
                        queue = fds.index(fd)
                if queue is not None:
                    found.setdefault(queue, sport)
        if len(found) < pairs:
            raise RuntimeError(f"no flow found for every one of {pairs} TAP queues: {found}")
        self._flows[pairs] = [found[q] for q in range(pairs)]
        log.debug("TAP flows per queue: %s", self._flows[pairs])
        return self._flows[pairs]


# ---------------------------------------------------------------------------------------
# ours: the device and its guest

class _Driver(NetDriver):
    """A guest that can hold its RX buffers back at bring-up (``hold_rx``)."""
    hold_rx = False

    def post_rx(self, pair: int) -> int:
        return 0 if self.hold_rx else super().post_rx(pair)


class Guest:
    """A :class:`NetDevice` over the bench TAP with ``pairs`` active queue pairs, brought
    up by a :class:`NetDriver` in a fresh guest memory (a context manager). With
    ``hold_rx`` no RX buffer is posted at bring-up.""" 

    def __init__(self, bench: TapBench, pairs: int, poll: bool, hold_rx: bool = False) -> None:
        self.pairs = pairs
        self.buffer = np.zeros(pairs * QUEUE_SIZE * (TX_SLOT + 1536) + (8 << 20), np.uint8)
        self.memory = vqcore.GuestMemory([(0, self.buffer)])
        self.device = NetDevice(bench.tap, mac=GUEST_MAC, max_pairs=pairs,
                                queue_size=QUEUE_SIZE, ctrl_queue=True, poll=poll)
        try:
            self.driver = _Driver(self.memory, pairs=pairs, queue_size=QUEUE_SIZE,
                                  ctrl=True, rx_buffer=1536, tx_buffer=TX_SLOT)
            self.driver.hold_rx = hold_rx
            self.driver.attach(self.device, self.device.device_features & ~WITHOUT)
            if pairs > 1:
                ack = self.driver.ctrl_command(VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET,
                                               struct.pack("<H", pairs))
                if ack != VIRTIO_NET_OK:
                    raise RuntimeError(f"VQ_PAIRS_SET {pairs} refused")
        except BaseException:
            self.device.close()
            raise

    def close(self) -> None:
        """Stop the workers and close the device's eventfds (the TAP stays)."""
        self.device.close()

    def __enter__(self) -> "Guest":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def wait(self, kind: str, timeout: float) -> None:
        """Sleep until one of the pairs' ``"rx"`` or ``"tx"`` queues interrupts (unless
        used chains already wait there)."""
        queues = (self.driver.rx if kind == "rx" else self.driver.tx)[:self.pairs]
        for dq in queues:
            if dq.queue.enable_interrupts():
                return
        ready, _, _ = select.select([dq.call_fd for dq in queues], [], [], timeout)
        for fd in ready:
            try:
                os.eventfd_read(fd)
            except BlockingIOError:
                pass


def _gbps(pps: float, size: int) -> float:
    return pps * size * 8 / 1e9


def tx_ours(bench: TapBench, size: int, pairs: int, poll: bool, frames: int) -> float:
    """Frames/s of ``frames`` frames sent by the guest through the device, counted as
    the TAP's ``rx_packets``."""
    with Guest(bench, pairs, poll) as g:
        drv = g.driver
        tx = [2 * p + 1 for p in range(pairs)]
        frame = tx_frame(size)
        for i in tx:
            drv.replay_start(i, frame)
        per_pair = frames // pairs
        done = [0] * pairs
        c0 = bench.counters()
        t0 = time.perf_counter()
        for i in tx:
            drv.replay(i)
        while min(done) < per_pair:
            for p, i in enumerate(tx):
                done[p] += drv.replay(i)
            g.wait("tx", 0.05)
        t1 = time.perf_counter()
        for i in tx:
            if not drv.replay_stop(i):
                log.warning("TX ring of pair %d did not drain", i // 2)
        c1 = bench.counters()
        sent = sum(g.device.pair_stats()[p]["tx"]["packets"] for p in range(pairs))
    got = c1["rx_packets"] - c0["rx_packets"]
    if got < sent:
        log.warning("TX: device sent %d frames, the TAP counted %d", sent, got)
    return got / (t1 - t0)


def rx_ours(bench: TapBench, size: int, pairs: int, poll: bool, frames: int) -> float:
    """Frames/s moved into guest buffers while injectors flood the TAP, counted as the
    TAP's ``tx_packets`` over the injectors' time."""
    sports = bench.flows(pairs)
    with Guest(bench, pairs, poll) as g:
        drv = g.driver
        rx = [2 * p for p in range(pairs)]
        for i in rx:
            drv.replay_start(i)
        injectors = _Injectors(bench, size, sports, frames // pairs)
        c0 = bench.counters()
        injectors.start()
        received = 0
        while injectors.running():
            for i in rx:
                received += drv.replay(i)
            g.wait("rx", 0.01)
        seconds = injectors.join()
        c1 = bench.counters()
    return (c1["tx_packets"] - c0["tx_packets"]) / seconds


# ---------------------------------------------------------------------------------------
# the baselines

def _threads(fn: Callable[[int], object], n: int) -> list[object]:
    """``fn(0..n-1)`` in ``n`` threads at once; their results."""
    out: list[object] = [None] * n

    def run(k: int) -> None:
        out[k] = fn(k)

    threads = [threading.Thread(target=run, args=(k,), name=f"bench-{k}") for k in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def tx_baseline(bench: TapBench, size: int, pairs: int, frames: int) -> float:
    """The same writev()s in C loops on the same fds (one thread per queue), counted as
    the TAP's ``rx_packets``."""
    bench.tap.set_active_queues(pairs)
    fds = bench.tap.fds[:pairs]
    frame = tx_frame(size)
    c0 = bench.counters()
    results = _threads(lambda k: netbench.writev_loop(fds[k], frame, frames // pairs), pairs)
    c1 = bench.counters()
    seconds = max(r[2] for r in results)  # type: ignore[index]
    return (c1["rx_packets"] - c0["rx_packets"]) / seconds


class _Injectors:
    """One ``send_loop`` thread per TAP queue, each on its own flow (GIL released)."""

    def __init__(self, bench: TapBench, size: int, sports: Sequence[int], count: int) -> None:
        self.socks = [bench.injector() for _ in sports]
        self.frames = [rx_frame(size, sport) for sport in sports]
        self.count = count
        self.results: list[tuple[int, float] | None] = [None] * len(sports)
        self.threads = [threading.Thread(target=self._run, args=(k,), name=f"inject-{k}")
                        for k in range(len(sports))]

    def _run(self, k: int) -> None:
        self.results[k] = netbench.send_loop(self.socks[k].fileno(), self.frames[k], self.count)

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def running(self) -> bool:
        return any(t.is_alive() for t in self.threads)

    def join(self) -> float:
        """Wait for every injector; the longest one's seconds."""
        for t in self.threads:
            t.join()
        for s in self.socks:
            s.close()
        return max(r[1] for r in self.results if r is not None)


def rx_baseline(bench: TapBench, size: int, pairs: int, frames: int) -> float:
    """C readv loops on the same fds while the same injectors run, counted as the TAP's
    ``tx_packets`` over the injectors' time."""
    sports = bench.flows(pairs)
    bench.tap.set_active_queues(pairs)
    fds = bench.tap.fds[:pairs]
    injectors = _Injectors(bench, size, sports, frames // pairs)
    readers = [threading.Thread(target=netbench.readv_loop, args=(fd, 1 << 62),
                                kwargs={"timeout": 60.0, "idle": 0.05}, name=f"readv-{k}")
               for k, fd in enumerate(fds)]
    c0 = bench.counters()
    for t in readers:
        t.start()
    injectors.start()
    seconds = injectors.join()
    c1 = bench.counters()
    for t in readers:
        t.join()
    return (c1["tx_packets"] - c0["tx_packets"]) / seconds


def rx_drain_ours(bench: TapBench, size: int, pairs: int, poll: bool, per_queue: int) -> float:
    """Frames/s moved into guest buffers from TAP queues filled beforehand (the reader
    alone: no injector runs meanwhile), counted as the TAP's ``tx_packets``."""
    with Guest(bench, pairs, poll, hold_rx=True) as g:
        queued = bench.fill(size, pairs, per_queue)
        drv = g.driver
        rx = [2 * p for p in range(pairs)]
        for i in rx:
            drv.replay_start(i)
        c0 = bench.counters()
        t0 = time.perf_counter()
        deadline = t0 + 30.0
        received = 0
        for i in rx:
            drv.replay(i)             # posts every buffer and kicks
        while received < queued and time.perf_counter() < deadline:
            for i in rx:
                received += drv.replay(i)
            if received < queued:
                g.wait("rx", 0.05)
        t1 = time.perf_counter()
        c1 = bench.counters()
    if received < queued:
        log.warning("RX drain: %d of %d frames arrived", received, queued)
    return (c1["tx_packets"] - c0["tx_packets"]) / (t1 - t0)


def rx_drain_baseline(bench: TapBench, size: int, pairs: int, per_queue: int) -> float:
    """C readv loops draining the same filled TAP queues, counted as ``tx_packets``."""
    bench.tap.set_active_queues(pairs)
    fds = bench.tap.fds[:pairs]
    bench.fill(size, pairs, per_queue)
    c0 = bench.counters()
    results = _threads(lambda k: netbench.readv_loop(fds[k], 1 << 62, timeout=30.0,
                                                     idle=0.02), pairs)
    c1 = bench.counters()
    seconds = max(r[2] for r in results)  # type: ignore[index]
    return (c1["tx_packets"] - c0["tx_packets"]) / seconds
