"""The TAP datapath level of ``pyvirtio bench``: TX and RX frames per second through a
real multiqueue TAP, ours against the kernel's own ceiling measured in the same run.

Everything happens inside a network namespace this module creates and removes; no frame
leaves it. Every rate is counted **on the namespace side**, from the TAP interface's own
counters (``IFLA_STATS64``): ``rx_packets`` for TX (frames the kernel accepted from the
queue fds into its stack) and ``tx_packets`` for RX (frames the kernel handed to a
reader of the queue fds).

* **TX**, ours: a :class:`~pyvirtio.net.device.NetDevice` (its worker threads and the
  nogil burst kernels) fed by a :class:`~pyvirtio.net.driver.NetDriver` as the guest,
  which keeps the TX rings full by re-adding pre-written slots a chunk at a time
  (:meth:`~pyvirtio.net.driver.NetDriver.replay`: nothing per frame in Python).
  Baseline: :func:`vqcore.netbench.writev_loop`, the same ``writev`` (12-byte
  virtio-net header + frame) in a plain C loop on the same queue fd(s).
* **RX, live injector**: an injector (:func:`vqcore.netbench.send_loop` on an
  ``AF_PACKET`` socket bound to the TAP inside the namespace, one thread per queue pair,
  GIL released) floods the TAP while the device's workers ``readv`` into guest buffers
  and the guest re-posts them per batch. Baseline: the same injectors against
  :func:`vqcore.netbench.readv_loop`, a plain C loop of ``readv`` on the same fd(s).
  This figure is bounded by whichever side is slower, often the injector.
* **RX, drain**: the injector first fills the TAP queues (nobody reading), then the
  reader alone empties them: ours (the guest posts its buffers and kicks) against the
  ``readv`` loop. This is the reader's own ceiling on one core.

Ours and the baseline alternate (A B A B ...). For TX and the RX drain the CPU time
per frame of the threads doing the work (the device's workers, the C loop's threads) is
a figure too: unlike the rates it hardly moves when other work shares the machine.
The functions take ``poll=True`` for busy-polling workers (``NetDevice(poll=True)``);
the suite does not report them, as they gain nothing here (the workers never run dry).
"""

from __future__ import annotations

import logging
import os
import select
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Self

import numpy as np

import vqcore
from vqcore import netbench
from vqcore.errors import VirtioError

from pyvirtio.backends.tap import TUN_DEVICE, Tap
from pyvirtio.bench.figures import Figure, LevelSkipped
from pyvirtio.features import NetFeature
from pyvirtio.net.ctrl import VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET, VIRTIO_NET_OK
from pyvirtio.net.device import GUEST_GSO, NetDevice
from pyvirtio.net.driver import NetDriver, wait_used
from pyvirtio.netns import NetNamespace, entered

if TYPE_CHECKING:
    from pyvirtio.bench.suite import Settings

__all__ = [
    "FRAME_SIZES",
    "PAIRS",
    "QUEUE_SIZE",
    "Guest",
    "Sample",
    "Sizes",
    "TapBench",
    "TapBenchError",
    "ip_checksum",
    "level_tap",
    "quiet_loggers",
    "readv_drain",
    "run_threads",
    "rx_drain_baseline",
    "rx_drain_ours",
    "rx_frame",
    "rx_live_baseline",
    "rx_live_ours",
    "skip_reason",
    "thread_cpu_ns",
    "tx_baseline",
    "tx_frame",
    "tx_ours",
]

log = logging.getLogger("pyvirtio.bench")

#: Ethernet frame sizes measured (bytes of the frame without FCS; the 12-byte
#: virtio-net header in front of it is not counted)
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
IPPROTO_UDP = 17
#: the TAP's queue length in frames (per queue): the most an RX drain can pre-fill
TAP_QUEUE_LEN = 32768
#: guest features left out: no guest offloads (a 1536-byte RX buffer then holds any
#: frame, one buffer per frame with MRG_RXBUF); everything else as offered
WITHOUT = int(GUEST_GSO | NetFeature.GUEST_CSUM | NetFeature.GUEST_ECN)
#: the guest's buffer slots (vnet header + the largest frame measured)
TX_SLOT = 2048
RX_SLOT = 1536
#: how long any one run may take before it is abandoned
RUN_TIMEOUT = 30.0

NOTE_TX = ("the device worker writev()s each frame straight from guest memory, the baseline "
           "is a C writev loop on the same fd; both are bound by the kernel's per-frame TAP "
           "receive path (tun_get_user + netif_rx + the stack dropping the frame) on one "
           "core; the guest refills the ring from the other vCPU")
NOTE_RX_LIVE = ("an AF_PACKET injector per queue in the namespace floods the TAP while the "
                "reader (the device worker / a C readv loop) empties it; bound by the slower "
                "of the two, mostly the injector, and all share the vCPUs: the C loop spins "
                "on an empty TAP and so slows the injectors, the worker sleeps in epoll")
NOTE_RX_DRAIN = ("the TAP queues are filled first, then drained by the reader alone: the "
                 "device worker readv()s into guest buffers (the guest re-posts them per "
                 "batch from the other vCPU), the baseline is a C readv loop; bound by the "
                 "kernel's per-frame tun_do_read + copy on one core")
NOTE_CPU = ("CPU time (the threads' CPU clocks) of the device worker thread(s) per frame "
            "against the C loop's thread(s): the one-core efficiency, unlike the rates "
            "hardly moved by other load; the guest thread's time is not included")


class TapBenchError(VirtioError, RuntimeError):
    """A benchmark run could not be set up or did not complete."""


def skip_reason() -> str | None:
    """Why the level cannot run here, or ``None``."""
    if os.geteuid() != 0:
        return "needs root (a network namespace and a TAP device)"
    if not os.path.exists(TUN_DEVICE):
        return f"{TUN_DEVICE} does not exist"
    return None


@dataclass(frozen=True)
class Sizes:
    """Frames per run: ``tx`` and ``rx_live`` in total, ``drain`` per TAP queue."""
    tx: int
    rx_live: int
    drain: int

    @classmethod
    def of(cls, tiny: bool, quick: bool) -> Sizes:
        if tiny:
            return cls(tx=4_000, rx_live=4_000, drain=1_000)
        if quick:
            return cls(tx=120_000, rx_live=60_000, drain=12_000)
        return cls(tx=500_000, rx_live=250_000, drain=TAP_QUEUE_LEN)


@dataclass
class Sample:
    """One run: ``frames`` counted on the namespace side in ``seconds``, and what the
    device's counters say about it (``info``)."""
    frames: int
    seconds: float
    info: dict[str, float] = field(default_factory=dict)

    @property
    def pps(self) -> float:
        """Frames per second."""
        return self.frames / self.seconds if self.seconds > 0 else 0.0


def thread_cpu_ns(thread: threading.Thread | None = None) -> tuple[int, int]:
    """(ns on a CPU, ns runnable but waiting for one) of ``thread`` (default: the
    calling one). The first is exact (the thread's CPU clock); the second comes from
    ``/proc/self/task/<tid>/schedstat``, which the kernel updates at scheduling events
    only (0 when it does not say)."""
    thread = thread or threading.current_thread()
    if thread.ident is None or thread.native_id is None:
        return 0, 0
    try:
        run = time.clock_gettime_ns(time.pthread_getcpuclockid(thread.ident))
    except OSError:                 # the thread has ended
        return 0, 0
    try:
        with open(f"/proc/self/task/{thread.native_id}/schedstat") as fh:
            wait = int(fh.read().split()[1])
    except (OSError, ValueError, IndexError):
        wait = 0
    return run, wait


# ---------------------------------------------------------------------------------------
# frames

def ip_checksum(data: bytes) -> int:
    """The Internet checksum (RFC 1071) of ``data``, zero-padded to whole 16-bit words."""
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
    if size < len(head):
        raise ValueError(f"a frame has at least {len(head)} bytes")
    return head + bytes((i * 7) & 0xFF for i in range(size - len(head)))


def rx_frame(size: int, sport: int) -> bytes:
    """A ``size``-byte Ethernet/IPv4/UDP frame for the guest; the UDP source port
    ``sport`` picks the flow, and so the TAP queue."""
    n = size - 14 - 20 - 8
    if n < 0:
        raise ValueError("a UDP frame has at least 42 bytes")
    payload = bytes((i * 3) & 0xFF for i in range(n))
    udp = struct.pack("!HHHH", sport, 5000, 8 + n, 0) + payload
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0, 64, IPPROTO_UDP, 0,
                     socket.inet_aton(HOST_IP), socket.inet_aton(GUEST_IP))
    ip = ip[:10] + struct.pack("!H", ip_checksum(ip)) + ip[12:]
    return GUEST_MAC + HOST_MAC + struct.pack("!H", ETH_P_IP) + ip + udp


# ---------------------------------------------------------------------------------------
# the namespace and its TAP

class TapBench:
    """A fresh namespace holding a TAP with ``queues`` queue fds (a context manager that
    removes both)."""

    def __init__(self, queues: int = max(PAIRS)) -> None:
        self.ns = NetNamespace(prefix="pvbench")
        self.ns.open()
        self._flows: dict[int, list[int]] = {}
        try:
            with entered(self.ns.name):
                for key in ("default", "all"):   # no IPv6 chatter on the TAP
                    with open(f"/proc/sys/net/ipv6/conf/{key}/disable_ipv6", "w") as fh:
                        fh.write("1")
            self.tap = Tap.create(TAP_NAME, queues, netns=self.ns, mac=HOST_MAC)
            with self.tap.iproute() as ipr:
                ipr.link("set", index=self.tap.ifindex, txqlen=TAP_QUEUE_LEN)
        except BaseException:
            self.ns.remove()
            raise

    def close(self) -> None:
        """Remove the TAP and the namespace."""
        try:
            self.tap.close()
        finally:
            self.ns.remove()

    def __enter__(self) -> Self:
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
        """UDP source ports whose frames the TAP queues on queue 0, 1, ..., ``pairs - 1``
        while ``pairs`` queues are attached (the TAP picks a queue by flow hash: found by
        probing, once per count, while nobody else reads the queues)."""
        if pairs in self._flows:
            return self._flows[pairs]
        self.tap.set_active_queues(pairs)
        fds = list(self.tap.fds[:pairs])
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
            raise TapBenchError(f"no UDP flow found for each of {pairs} TAP queues "
                                f"(found {found})")
        self._flows[pairs] = [found[q] for q in range(pairs)]
        log.debug("TAP flows per queue: %s", self._flows[pairs])
        return self._flows[pairs]

    def fill(self, size: int, pairs: int, per_queue: int) -> int:
        """Queue ``per_queue`` frames of ``size`` bytes on each of the first ``pairs``
        TAP queues while nobody reads them; returns how many the TAP holds."""
        sports = self.flows(pairs)
        c0 = self.counters()
        with self.injector() as sock:
            for sport in sports:
                netbench.send_loop(sock.fileno(), rx_frame(size, sport), per_queue,
                                   timeout=RUN_TIMEOUT)
        dropped = self.counters()["tx_dropped"] - c0["tx_dropped"]
        return pairs * per_queue - dropped


# ---------------------------------------------------------------------------------------
# ours: the device and its guest

class _Driver(NetDriver):
    """A guest that can hold its RX buffers back at bring-up (``hold_rx``)."""
    hold_rx = False

    def post_rx(self, pair: int) -> int:
        return 0 if self.hold_rx else super().post_rx(pair)


class Guest:
    """A :class:`NetDevice` over the bench TAP with ``pairs`` active queue pairs, brought
    up by a :class:`NetDriver` in a fresh guest memory (a context manager). The RX rings
    are in replay mode from the start; with ``hold_rx`` no RX buffer is posted before
    the first :meth:`receive`."""

    def __init__(self, bench: TapBench, pairs: int, poll: bool = False,
                 hold_rx: bool = False) -> None:
        self.bench = bench
        self.pairs = pairs
        self.buffer = np.zeros(pairs * QUEUE_SIZE * (TX_SLOT + RX_SLOT) + (8 << 20), np.uint8)
        self.buffer.fill(1)                  # fault every page in now, as a running guest has
        self.memory = vqcore.GuestMemory([(0, self.buffer)])
        self.device = NetDevice(bench.tap, mac=GUEST_MAC, max_pairs=pairs,
                                queue_size=QUEUE_SIZE, ctrl_queue=True, poll=poll)
        self._tx_frame: bytes | None = None
        try:
            self.driver = _Driver(self.memory, pairs=pairs, queue_size=QUEUE_SIZE,
                                  ctrl=True, rx_buffer=RX_SLOT, tx_buffer=TX_SLOT)
            self.driver.hold_rx = hold_rx
            self.driver.attach(self.device, self.device.device_features & ~WITHOUT)
            if pairs > 1:
                ack = self.driver.ctrl_command(VIRTIO_NET_CTRL_MQ,
                                               VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET,
                                               struct.pack("<H", pairs))
                if ack != VIRTIO_NET_OK:
                    raise TapBenchError(f"the device refused VQ_PAIRS_SET {pairs}")
            for p in range(pairs):
                self.driver.replay_start(2 * p)
        except BaseException:
            self.device.close()
            raise

    def close(self) -> None:
        """Stop the workers and close the device's eventfds (the TAP stays)."""
        self.device.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _wait(self, kind: str, timeout: float) -> None:
        """Sleep until one of the pairs' ``"rx"`` or ``"tx"`` queues interrupts (unless
        used chains already wait there)."""
        wait_used((self.driver.rx if kind == "rx" else self.driver.tx)[:self.pairs], timeout)

    def worker_cpu_ns(self) -> tuple[int, int]:
        """(ns on a CPU, ns waiting for one) of the device's worker threads, summed."""
        run = wait = 0
        for w in self.device.workers.values():
            r, q = thread_cpu_ns(w)
            run, wait = run + r, wait + q
        return run, wait

    def stats(self, kind: str) -> dict[str, int]:
        """The device's counters of one direction, summed over the pairs."""
        total: dict[str, int] = {}
        for pair in self.device.pair_stats()[:self.pairs]:
            for k, v in pair[kind].items():
                total[k] = total.get(k, 0) + v
        return total

    def _mark(self, kind: str) -> tuple[dict[str, int], tuple[int, int], int]:
        return self.stats(kind), self.worker_cpu_ns(), time.thread_time_ns()

    def _info(self, kind: str, mark: tuple[dict[str, int], tuple[int, int], int]
              ) -> dict[str, float]:
        """What the device's counters and the threads' CPU time say since ``mark``."""
        before, (run0, wait0), guest0 = mark
        after, (run1, wait1), guest1 = self._mark(kind)
        d = {k: after[k] - before[k] for k in after}
        frames = max(d["packets"], 1)
        return {"frames_per_burst": d["packets"] / max(d["bursts"], 1),
                "interrupts_per_kframe": 1000 * d["notifications"] / frames,
                "no_room": float(d["no_room"]), "errors": float(d["errors"]),
                "cpu_ns_per_frame": (run1 - run0) / frames,
                "cpu_wait_ns_per_frame": (wait1 - wait0) / frames,
                "guest_cpu_ns_per_frame": (guest1 - guest0) / frames}

    def send(self, frame: bytes, frames: int) -> Sample:
        """Send about ``frames`` copies of ``frame`` (spread over the pairs), keeping
        every TX ring full; counted as the TAP's ``rx_packets``."""
        tx = [2 * p + 1 for p in range(self.pairs)]
        drv = self.driver
        if self._tx_frame != frame:
            for i in tx:
                drv.replay_stop(i)
                drv.replay_start(i, frame)
            self._tx_frame = frame
        per_pair = max(frames // self.pairs, 1)
        done = [0] * self.pairs
        c0 = self.bench.counters()
        mark = self._mark("tx")
        t0 = time.perf_counter()
        deadline = t0 + RUN_TIMEOUT
        while True:
            for p, i in enumerate(tx):
                done[p] += drv.replay(i, refill=done[p] < per_pair)
            if min(done) >= per_pair:
                break
            if time.perf_counter() > deadline:
                raise TapBenchError(f"TX: {sum(done)} of {frames} frames sent in "
                                    f"{RUN_TIMEOUT:.0f} s")
            self._wait("tx", 0.05)
        for p, i in enumerate(tx):           # let what is in flight come back
            while drv.tx[p].queue.in_flight:
                done[p] += drv.replay(i, refill=False)
                if not drv.tx[p].queue.in_flight:
                    break
                if time.perf_counter() > deadline:
                    raise TapBenchError("TX: the device did not return every chain")
                self._wait("tx", 0.05)
        t1 = time.perf_counter()
        info = self._info("tx", mark)
        c1 = self.bench.counters()
        counted = c1["rx_packets"] - c0["rx_packets"]
        if counted < sum(done):
            log.warning("TX: the guest sent %d frames, the TAP counted %d", sum(done), counted)
        return Sample(counted, t1 - t0, info)

    def receive(self, until: Callable[[int], bool]) -> tuple[int, dict[str, float]]:
        """Re-post RX buffers per batch until ``until(frames received)``; returns the
        frames received and the device's burst figures."""
        rx = [2 * p for p in range(self.pairs)]
        drv = self.driver
        mark = self._mark("rx")
        received = 0
        deadline = time.perf_counter() + RUN_TIMEOUT
        for i in rx:
            drv.replay(i)                    # posts buffers (all of them with hold_rx)
        while not until(received):
            for i in rx:
                received += drv.replay(i)
            if until(received):
                break
            if time.perf_counter() > deadline:
                raise TapBenchError(f"RX: {received} frames in {RUN_TIMEOUT:.0f} s")
            self._wait("rx", 0.01)
        return received, self._info("rx", mark)

    def receive_live(self, size: int, frames: int) -> Sample:
        """Receive while one injector per pair sends ``frames`` frames of ``size`` bytes
        in all; counted as the TAP's ``tx_packets`` over the injectors' time."""
        bench = self.bench
        injectors = _Injectors(bench, size, self.pairs, max(frames // self.pairs, 1))
        c0 = bench.counters()
        injectors.start()
        try:
            _, info = self.receive(lambda n: not injectors.running())
        finally:
            sent, seconds = injectors.join()
        c1 = bench.counters()
        info["injector_pps"] = sent / seconds if seconds else 0.0
        return Sample(c1["tx_packets"] - c0["tx_packets"], seconds, info)

    def drain(self, queued: int) -> Sample:
        """Receive the ``queued`` frames waiting in the TAP queues (a guest made with
        ``hold_rx``: its buffers go out now), from the first post to the last frame;
        counted as the TAP's ``tx_packets``."""
        c0 = self.bench.counters()
        t0 = time.perf_counter()
        _, info = self.receive(lambda n: n >= queued)
        t1 = time.perf_counter()
        c1 = self.bench.counters()
        return Sample(c1["tx_packets"] - c0["tx_packets"], t1 - t0, info)


def tx_ours(bench: TapBench, size: int, pairs: int, frames: int, *,
            poll: bool = False) -> Sample:
    """TX through a fresh device: :meth:`Guest.send`."""
    with Guest(bench, pairs, poll) as g:
        return g.send(tx_frame(size), frames)


class _Injectors:
    """One ``send_loop`` thread per TAP queue, each on its own flow (GIL released)."""

    def __init__(self, bench: TapBench, size: int, pairs: int, count: int) -> None:
        sports = bench.flows(pairs)
        self.socks = [bench.injector() for _ in sports]
        self.frames = [rx_frame(size, sport) for sport in sports]
        self.count = count
        self.results: list[tuple[int, float] | None] = [None] * len(sports)
        self.threads = [threading.Thread(target=self._run, args=(k,), name=f"inject-{k}")
                        for k in range(len(sports))]

    def _run(self, k: int) -> None:
        self.results[k] = netbench.send_loop(self.socks[k].fileno(), self.frames[k],
                                             self.count, timeout=RUN_TIMEOUT)

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def running(self) -> bool:
        return any(t.is_alive() for t in self.threads)

    def join(self) -> tuple[int, float]:
        """Wait for every injector: (frames sent, the longest one's seconds)."""
        for t in self.threads:
            t.join()
        for s in self.socks:
            s.close()
        done = [r for r in self.results if r is not None]
        if len(done) != len(self.results):
            raise TapBenchError("an injector thread failed")
        return sum(r[0] for r in done), max(r[1] for r in done)


def rx_live_ours(bench: TapBench, size: int, pairs: int, frames: int, *,
                 poll: bool = False) -> Sample:
    """RX through a fresh device: :meth:`Guest.receive_live`."""
    bench.flows(pairs)                       # probe the queues while nobody reads them
    with Guest(bench, pairs, poll) as g:
        return g.receive_live(size, frames)


def rx_drain_ours(bench: TapBench, size: int, pairs: int, per_queue: int, *,
                  poll: bool = False) -> Sample:
    """RX through a fresh device holding its buffers back: :meth:`Guest.drain` after
    :meth:`TapBench.fill`."""
    bench.flows(pairs)                       # probe the queues while nobody reads them
    with Guest(bench, pairs, poll, hold_rx=True) as g:
        return g.drain(bench.fill(size, pairs, per_queue))


# ---------------------------------------------------------------------------------------
# the baselines: plain C loops of the same syscalls on the same fds

def run_threads(fn: Callable[[int], object], n: int) -> list[object]:
    """``fn(0..n-1)`` in ``n`` threads at once; their results, each as ``(result,
    (ns on a CPU, ns waiting for one))`` of its thread."""
    out: list[object] = [None] * n

    def run(k: int) -> None:
        r0, w0 = thread_cpu_ns()
        result = fn(k)
        r1, w1 = thread_cpu_ns()
        out[k] = (result, (r1 - r0, w1 - w0))

    threads = [threading.Thread(target=run, args=(k,), name=f"bench-{k}") for k in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if any(r is None for r in out):
        raise TapBenchError("a baseline thread failed")
    return out


def tx_baseline(bench: TapBench, size: int, pairs: int, frames: int) -> Sample:
    """``writev`` loops, one thread per queue fd; counted as the TAP's ``rx_packets``."""
    bench.tap.set_active_queues(pairs)
    fds = bench.tap.fds[:pairs]
    frame = tx_frame(size)
    c0 = bench.counters()
    results = run_threads(lambda k: netbench.writev_loop(fds[k], frame, max(frames // pairs, 1),
                                                      timeout=RUN_TIMEOUT), pairs)
    c1 = bench.counters()
    return _loop_sample(c1["rx_packets"] - c0["rx_packets"], results, 2)


def _loop_sample(frames: int, results: list, seconds_at: int) -> Sample:
    """A baseline sample from :func:`run_threads` results of C loops whose tuple has the
    seconds at ``seconds_at``: timed by the slowest, CPU summed over the threads."""
    seconds = max(r[0][seconds_at] for r in results)
    run = sum(r[1][0] for r in results)
    wait = sum(r[1][1] for r in results)
    n = max(frames, 1)
    return Sample(frames, seconds, {"cpu_ns_per_frame": run / n, "cpu_wait_ns_per_frame": wait / n})


def _readers(fds: Sequence[int]) -> list[threading.Thread]:
    return [threading.Thread(target=netbench.readv_loop, args=(fd, 1 << 62),
                             kwargs={"timeout": RUN_TIMEOUT, "idle": 0.02}, name=f"readv-{k}")
            for k, fd in enumerate(fds)]


def rx_live_baseline(bench: TapBench, size: int, pairs: int, frames: int) -> Sample:
    """``readv`` loops on the queue fds while the same injectors run; counted as the
    TAP's ``tx_packets`` over the injectors' time."""
    bench.tap.set_active_queues(pairs)
    injectors = _Injectors(bench, size, pairs, frames // pairs)
    readers = _readers(bench.tap.fds[:pairs])
    c0 = bench.counters()
    for t in readers:
        t.start()
    injectors.start()
    sent, seconds = injectors.join()
    c1 = bench.counters()
    for t in readers:
        t.join()
    return Sample(c1["tx_packets"] - c0["tx_packets"], seconds,
                  {"injector_pps": sent / seconds if seconds else 0.0})


def rx_drain_baseline(bench: TapBench, size: int, pairs: int, per_queue: int) -> Sample:
    """``readv`` loops draining the same pre-filled TAP queues: :func:`readv_drain`
    after :meth:`TapBench.fill`."""
    bench.tap.set_active_queues(pairs)
    queued = bench.fill(size, pairs, per_queue)
    return readv_drain(bench, pairs, min(per_queue, queued))


def readv_drain(bench: TapBench, pairs: int, per_queue: int) -> Sample:
    """``readv`` loops, one thread per queue fd, each reading ``per_queue`` frames (or
    until its queue stays empty); counted as the TAP's ``tx_packets``, timed from the
    first frame read to the last."""
    fds = bench.tap.fds[:pairs]
    c0 = bench.counters()
    results = run_threads(lambda k: netbench.readv_loop(fds[k], per_queue, timeout=RUN_TIMEOUT,
                                                     idle=0.02), pairs)
    c1 = bench.counters()
    return _loop_sample(c1["tx_packets"] - c0["tx_packets"], results, 2)


# ---------------------------------------------------------------------------------------
# the level

#: loggers that report every device and TAP bring-up (dozens per level): WARNING and up
QUIET_LOGGERS = ("pyvirtio.net", "pyvirtio.backends", "pyvirtio.device")


@contextmanager
def quiet_loggers(names: Sequence[str]) -> Iterator[None]:
    """Raise ``names`` to WARNING for the ``with`` body (the benchmark's own progress
    stays readable), then restore their levels."""
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(max(lg.getEffectiveLevel(), logging.WARNING))
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


class _Row:
    """The Mpps, Gbit/s and (optionally) CPU-per-frame figures of one measurement,
    filled sample by sample."""

    def __init__(self, name: str, size: int, baseline: str, note: str,
                 cpu: bool = False) -> None:
        self.size = size
        self.mpps = Figure("tap", name, "Mpps", True, baseline=baseline, note=note)
        self.gbps = Figure("tap", name, "Gbit/s", True, baseline=baseline)
        self.cpu = Figure("tap", f"{name}, CPU per frame", "ns", False,
                          baseline="the C loop's thread(s)", note=NOTE_CPU) if cpu else None
        self.info: dict[str, float] = {}
        self.base_info: dict[str, float] = {}

    def ours(self, s: Sample) -> None:
        self.mpps.samples.append(s.pps / 1e6)
        self.gbps.samples.append(s.pps * self.size * 8 / 1e9)
        if self.cpu is not None:
            self.cpu.samples.append(s.info["cpu_ns_per_frame"])
        self.info = s.info

    def base(self, s: Sample) -> None:
        self.mpps.baseline_samples.append(s.pps / 1e6)
        self.gbps.baseline_samples.append(s.pps * self.size * 8 / 1e9)
        if self.cpu is not None:
            self.cpu.baseline_samples.append(s.info["cpu_ns_per_frame"])
        self.base_info = s.info

    def figures(self) -> list[Figure]:
        """The figures, the notes completed with what the last runs saw."""
        i, b = self.info, self.base_info
        seen = [f"{i['frames_per_burst']:.0f} frames per burst",
                f"{i['interrupts_per_kframe']:.1f} guest interrupts per 1000 frames"]
        if i.get("no_room"):
            seen.append(f"{i['no_room']:.0f} bursts stopped for want of guest buffers")
        if "injector_pps" in i:
            seen.append(f"injector {i['injector_pps'] / 1e6:.2f} / {b['injector_pps'] / 1e6:.2f}"
                        " Mpps (ours / baseline run)")
        if "cpu_wait_ns_per_frame" in b:
            seen.append(f"waiting for a CPU {i['cpu_wait_ns_per_frame']:.0f} / "
                        f"{b['cpu_wait_ns_per_frame']:.0f} ns per frame (ours / baseline: "
                        "other load)")
        self.mpps.note += f" [last run: {', '.join(seen)}]"
        if self.cpu is not None:
            self.cpu.note += f" [last run: the guest thread {i['guest_cpu_ns_per_frame']:.0f} ns]"
        return [f for f in (self.mpps, self.gbps, self.cpu) if f is not None]


def level_tap(s: Settings, progress: Callable[[str], None]) -> list[Figure]:
    """TX and RX Mpps and Gbit/s through a TAP for 64 B and 1500 B frames and 1 and 2
    queue pairs, each against the plain C syscall loop on the same TAP, measured
    alternately; for TX and the RX drain also the CPU time per frame.
    :class:`LevelSkipped` without root or ``/dev/net/tun``."""
    reason = skip_reason()
    if reason is not None:
        raise LevelSkipped(reason)
    n = Sizes.of(s.tiny, s.quick)
    figures: list[Figure] = []
    with quiet_loggers(QUIET_LOGGERS), TapBench() as bench:
        for size in FRAME_SIZES:
            for pairs in PAIRS:
                what = f"{size} B, {pairs} pair{'s' if pairs > 1 else ''}"
                tx = _Row(f"TX {what}", size, "C writev loop, same TAP fd", NOTE_TX, cpu=True)
                live = _Row(f"RX {what}, live injector", size, "C readv loop, same injector",
                            NOTE_RX_LIVE)
                drain = _Row(f"RX {what}, drain", size, "C readv loop, same TAP fd",
                             NOTE_RX_DRAIN, cpu=True)
                for rep in range(s.repeats):
                    tx.ours(tx_ours(bench, size, pairs, n.tx))
                    tx.base(tx_baseline(bench, size, pairs, n.tx))
                    live.ours(rx_live_ours(bench, size, pairs, n.rx_live))
                    live.base(rx_live_baseline(bench, size, pairs, n.rx_live))
                    drain.ours(rx_drain_ours(bench, size, pairs, n.drain))
                    drain.base(rx_drain_baseline(bench, size, pairs, n.drain))
                    progress(f"tap: {what} [{rep + 1}/{s.repeats}]")
                for row in (tx, live, drain):
                    figures += row.figures()
    return figures
