"""The vhost-user level of ``pyvirtio bench``: our front-end driving ``pyvirtio net``
back-ends over Unix sockets, as issue 4 measures it.

Three parts, each against a baseline measured in the same run (A B A B ...):

* **ring rate** (no root needed): the front-end
  (:class:`~pyvirtio.net.frontend.VhostUserNetFrontend`) replays 64 B frames into
  ``pyvirtio net --sink --poll`` (a busy-polling worker that counts and drops every
  frame): the pure cross-process ring rate, in Mpps, counted as the TX chains the
  back-end used. Baseline: the same into ``pyvirtio net --sink`` without ``--poll``
  (eventfd notifications), so the ratio is what busy-polling buys.
* **generator into a TAP**: the front-end replays frames of 64 B, 1500 B and a 64 KiB
  TCP GSO frame (virtio-net header ``GSO_TCPV4``, the back-end's TAP takes it whole)
  into ``pyvirtio net --tap`` on a multiqueue TAP in a namespace this level creates,
  1 and 2 queue pairs, counted on the namespace side (the TAP's ``rx_packets``).
  Baseline: a plain C ``writev`` loop (:func:`vqcore.netbench.writev_loop`) on queue
  fds of the same TAP, one thread per pair: the kernel's own TAP ceiling.
* **PVP over TAP**: iperf3 client in namespace A -> TAP A -> back-end A -> our
  forwarding front-end (:class:`~pyvirtio.net.forwarder.Forwarder`, both ways,
  no copy) -> back-end B -> TAP B -> iperf3 server in namespace B, one L2 segment,
  offloads negotiated end to end so that GSO frames cross whole. TCP Gbit/s with 1 and
  2 queue pairs (1 and 4 streams) and 64 B UDP (received) pps. Baseline: the same
  iperf3 runs over a veth pair between the same two namespaces: the kernel's own L2
  path, a kernel-only ceiling, not like for like (no process boundary, no rings, no
  TAP). The published vhost-net and target figures are set next to these in the suite's
  "vs vhost-net" section.

Every namespace, TAP and address lives inside namespaces this module creates and
removes; every process it starts is ended by pid.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vqcore import netbench

from pyvirtio.backends.tap import Tap
from pyvirtio.bench.figures import Figure, skip
from pyvirtio.bench.guest import IPERF_PORT, UDP64_PAYLOAD, udp_pps
from pyvirtio.bench.tap import (OTHER_MAC, Sample, ip_checksum, quiet_loggers, run_threads,
                                thread_cpu_ns, tx_frame)
from pyvirtio.bench.tap import skip_reason as tap_skip_reason
from pyvirtio.guest.harness import end_process, iperf3_client, tcp_sockets, wait_while_running
from pyvirtio.net.driver import wait_used
from pyvirtio.net.header import (HDR_LEN, VIRTIO_NET_HDR_F_NEEDS_CSUM,
                                 VIRTIO_NET_HDR_GSO_TCPV4, VirtioNetHdr)
from pyvirtio.netns import NetNamespace

if TYPE_CHECKING:
    from pyvirtio.bench.suite import Settings

__all__ = [
    "FRAME_SIZES",
    "GSO_FRAME",
    "PAIRS",
    "BackendProcess",
    "Sizes",
    "VhostUserBenchError",
    "generate",
    "gso_frame",
    "gso_header",
    "iperf3_rate",
    "level_vhost_user",
    "needs_root_reason",
]

log = logging.getLogger("pyvirtio.bench")

#: the 64 KiB TCP GSO frame: Ethernet + IPv4 (total length 65535) = 65549 bytes
GSO_FRAME = 14 + 65535
#: frame sizes of the generator-into-TAP part
FRAME_SIZES = (64, 1500, GSO_FRAME)
#: queue pairs measured
PAIRS = (1, 2)
#: ring size of the generator (QEMU's largest tx_queue_size) and of the PVP ports
QUEUE_SIZE = 1024
#: ring size when the slots must hold a 64 KiB frame (memory: 256 x 64 KiB per ring)
GSO_QUEUE_SIZE = 256
#: a TX slot for frames up to 1500 B (header + frame, rounded up)
SMALL_SLOT = 2048
#: the largest TX slot (header + 64 KiB frame)
GSO_SLOT = 65562
#: seconds any one generator run may take
RUN_TIMEOUT = 30.0
#: how long PVP waits for iperf3's server to see its last client go before the path goes
IDLE_WAIT = 5.0
#: how long a back-end may take to listen (an editable install may rebuild on import)
BACKEND_START = 120.0
TAP_NAME = "pvbvu0"
PVP_TAP_A, PVP_TAP_B = "pvpa0", "pvpb0"
PVP_VETH_A, PVP_VETH_B = "pvpva", "pvpvb"
PVP_NET = "10.79.0."          # TAPs (through our forwarder)
VETH_NET = "10.79.1."         # the veth pair (the kernel's path)

NOTE_RING = ("the front-end (Python, one thread, per-chunk replay of pre-written slots; it "
             "spins against --poll) against pyvirtio net --sink (TX through vqcore's "
             "DISCARD_FD: no syscall per frame) in a second process over shared memfd "
             "memory; frames counted as used TX chains; baseline: the same back-end "
             "without --poll (eventfd kicks and calls): the ratio is what busy-polling "
             "buys. Profiled (perf, --poll): the back-end worker spends most of its time in "
             "the split-ring code (pop, push used), the front-end in its Python loop; two "
             "spinning threads on 2 shared vCPUs make it swing with any other load")
NOTE_GEN = ("front-end -> pyvirtio net --tap (its worker writev()s each frame into the "
            "TAP), counted as the TAP's rx_packets in the namespace; baseline: a C writev "
            "loop on queue fds of the same TAP (the kernel's TAP ceiling on one core per "
            "pair); the 64 KiB frame is one TCP GSO frame (GSO_TCPV4, gso_size 1448)")
NOTE_PVP_TCP = ("iperf3 TCP from namespace A to B through TAP A, back-end A, our "
                "zero-copy forwarder, back-end B, TAP B (offloads end to end: GSO frames "
                "cross whole); 1 pair = 1 stream, 2 pairs = 4 streams (the TAPs spread "
                "flows by hash); baseline: the same iperf3 over a veth pair between the "
                "same namespaces, the kernel's own L2 path: a kernel-only ceiling, not like "
                "for like; everything shares 2 vCPUs (iperf3 client and server, 2 back-end "
                "processes, the forwarder)")
NOTE_PVP_UDP = ("iperf3 UDP, 22-byte payload (64 B frames), unlimited rate, packets the "
                "server received per second; baseline: the same over the veth pair")


class VhostUserBenchError(RuntimeError):
    """A vhost-user benchmark run could not be set up or did not complete."""


def needs_root_reason() -> str | None:
    """Why the TAP and PVP parts cannot run here, or ``None``: the tap level's reasons
    (root, ``/dev/net/tun``), and iproute2."""
    reason = tap_skip_reason()
    if reason is not None:
        return reason
    if shutil.which("ip") is None:
        return "needs iproute2's ip command"
    return None


def pvp_reason() -> str | None:
    """Why the PVP part cannot run here, or ``None``."""
    reason = needs_root_reason()
    if reason is None and shutil.which("iperf3") is None:
        reason = "needs iperf3 (Debian package iperf3)"
    return reason


@dataclass(frozen=True)
class Sizes:
    """How much each run moves: frames for the ring rate and the generator (per run, in
    all), seconds per iperf3 run, repetitions of the iperf3 runs."""
    ring: int
    gen_small: int
    gen_gso: int
    iperf_seconds: int          # iperf3 -t takes whole seconds (-t 0: no end)
    pvp_repeats: int

    @classmethod
    def of(cls, tiny: bool, quick: bool) -> Sizes:
        if tiny:
            return cls(ring=20_000, gen_small=4_000, gen_gso=300, iperf_seconds=1,
                       pvp_repeats=1)
        if quick:
            return cls(ring=300_000, gen_small=100_000, gen_gso=4_000, iperf_seconds=1,
                       pvp_repeats=2)
        return cls(ring=2_000_000, gen_small=400_000, gen_gso=15_000, iperf_seconds=3,
                   pvp_repeats=5)


# ---------------------------------------------------------------------------------------
# frames

def gso_header(mss: int = 1448) -> bytes:
    """A virtio-net header (12 bytes, VERSION_1) for an IPv4 TCP GSO frame:
    NEEDS_CSUM over the TCP header and payload, GSO_TCPV4."""
    return VirtioNetHdr(flags=VIRTIO_NET_HDR_F_NEEDS_CSUM, gso_type=VIRTIO_NET_HDR_GSO_TCPV4,
                        hdr_len=14 + 20 + 20, gso_size=mss, csum_start=14 + 20,
                        csum_offset=16).pack()


def gso_frame(size: int = GSO_FRAME) -> bytes:
    """An Ethernet + IPv4 + TCP frame of ``size`` bytes (up to :data:`GSO_FRAME`) to a
    MAC nobody owns (the kernel counts it, then drops it whole)."""
    ip_len = size - 14
    if not 40 < ip_len <= 65535:
        raise ValueError(f"a TCP/IPv4 frame has 55..{GSO_FRAME} bytes, not {size}")
    payload = bytes((i * 11) & 0xFF for i in range(ip_len - 40))
    src, dst = socket.inet_aton("10.79.9.1"), socket.inet_aton("10.79.9.2")
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, ip_len, 1, 0x4000, 64, socket.IPPROTO_TCP,
                     0, src, dst)
    ip = ip[:10] + struct.pack("!H", ip_checksum(ip)) + ip[12:]
    # the pseudo-header sum (folded, not inverted) goes in the TCP checksum field
    # (NEEDS_CSUM convention)
    pseudo = ~ip_checksum(src + dst + struct.pack("!HH", socket.IPPROTO_TCP, ip_len - 20)) & 0xFFFF
    tcp = struct.pack("!HHIIBBHHH", 40001, 5201, 1, 0, 5 << 4, 0x18, 65535, pseudo, 0)
    eth = OTHER_MAC + bytes.fromhex("525400123456") + struct.pack("!H", 0x0800)
    return eth + ip + tcp + payload


def frame_and_header(size: int) -> tuple[bytes, bytes]:
    """(frame, virtio-net header) of the generator for ``size``."""
    if size == GSO_FRAME:
        return gso_frame(size), gso_header()
    return tx_frame(size), bytes(HDR_LEN)


# ---------------------------------------------------------------------------------------
# processes

class BackendProcess:
    """``python -m pyvirtio net --socket-path DIR/NAME.sock ARGS`` until :meth:`stop`."""

    def __init__(self, sockdir: str | Path, name: str, args: Sequence[str]) -> None:
        self.path = str(Path(sockdir) / f"{name}.sock")
        self.log_path = Path(sockdir) / f"{name}.log"
        self.argv = [sys.executable, "-m", "pyvirtio", "net", "--socket-path", self.path,
                     *args]
        with open(self.log_path, "wb") as out:
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=subprocess.STDOUT)
        try:
            wait_while_running(self.proc, lambda: os.path.exists(self.path), BACKEND_START,
                               f"pyvirtio net listening on {self.path}", VhostUserBenchError,
                               self.tail)
        except BaseException:
            self.stop()
            raise

    def tail(self, lines: int = 8) -> str:
        try:
            return " | ".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        """SIGTERM (a clean shutdown: socket and any TAP it created removed), then SIGKILL
        after 15 s; only this process."""
        end_process(self.proc, "pyvirtio net", term_timeout=15)


def _ip(*argv: str) -> str:
    """``ip ARGV`` (iproute2); its output. :class:`VhostUserBenchError` on failure."""
    proc = subprocess.run(["ip", *argv], capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        raise VhostUserBenchError(f"ip {' '.join(argv)}: {proc.stderr.strip()}")
    return proc.stdout


def _quiet_namespace(ns: NetNamespace) -> None:
    """``lo`` up, IPv6 off (no router solicitations or DAD on the TAPs)."""
    _ip("-n", ns.name, "link", "set", "lo", "up")
    for key in ("all", "default"):
        subprocess.run(["ip", "netns", "exec", ns.name, "sysctl", "-qw",
                        f"net.ipv6.conf.{key}.disable_ipv6=1"], capture_output=True,
                       timeout=30)


def link_counters(ns: str, ifname: str) -> dict[str, int]:
    """``rx_packets``, ``rx_bytes``, ``tx_packets``, ``tx_bytes`` of ``ifname`` as
    namespace ``ns`` sees them."""
    data = json.loads(_ip("-n", ns, "-j", "-s", "link", "show", "dev", ifname))[0]
    st = data["stats64"]
    return {f"{d}_{k}": int(st[d][k]) for d in ("rx", "tx") for k in ("packets", "bytes")}


# ---------------------------------------------------------------------------------------
# the generator

@contextlib.contextmanager
def frontend(path: str, pairs: int, *, queue_size: int = QUEUE_SIZE,
             tx_buffer: int = SMALL_SLOT, name: str = "bench", **kwargs: Any
             ) -> Iterator[Any]:
    """A started :class:`VhostUserNetFrontend` on the back-end at ``path`` (closed after)."""
    from pyvirtio.net.frontend import VhostUserNetFrontend
    fe = VhostUserNetFrontend(pairs=pairs, queue_size=queue_size, tx_buffer=tx_buffer,
                           name=name, **kwargs)
    try:
        fe.connect(path, timeout=30)
        fe.start()
        yield fe
    finally:
        fe.close()


def generate(fe, frame: bytes, header: bytes, frames: int, *, spin: bool = False,
             mark: Callable[[], object] | None = None) -> Sample:
    """Keep every TX ring of ``fe`` full of ``header + frame`` (pre-written slots
    re-added a chunk at a time: nothing per frame in Python) until about ``frames``
    chains came back, spread over the pairs. A warm-up of one ring per pair goes first
    and is waited for; then ``mark()`` (e.g. read the TAP's counters, which then stand
    still) and the timed run, from the first chain added to the last one back.
    ``spin``: never sleep (for a polling back-end)."""
    drv = fe.driver
    tx = [2 * p + 1 for p in range(fe.pairs)]
    queues = [drv.tx[p] for p in range(fe.pairs)]
    for i in tx:
        drv.replay_start(i, frame, header=header)
    per_pair = max(frames // fe.pairs, 1)
    deadline = time.perf_counter() + RUN_TIMEOUT

    def check(counts: list[int], goal: int) -> None:
        if time.perf_counter() > deadline:
            raise VhostUserBenchError(f"{sum(counts)} of {goal * fe.pairs} frames in "
                                      f"{RUN_TIMEOUT:.0f} s")

    def pump(counts: list[int], goal: int) -> None:
        while True:
            for p, i in enumerate(tx):
                counts[p] += drv.replay(i, refill=counts[p] < goal)
            if min(counts) >= goal:
                break
            check(counts, goal)
            if not spin:
                wait_used(queues, 0.05)
        while any(dq.queue.in_flight for dq in queues):    # what is in flight comes back
            for p, i in enumerate(tx):
                counts[p] += drv.replay(i, refill=False)
            check(counts, goal)
            if not spin and any(dq.queue.in_flight for dq in queues):
                wait_used(queues, 0.05)

    pump([0] * fe.pairs, min(per_pair, queues[0].slots))   # pages faulted, rings primed
    if mark is not None:
        mark()
    done = [0] * fe.pairs
    cpu0 = thread_cpu_ns()[0]
    t0 = time.perf_counter()
    pump(done, per_pair)
    t1 = time.perf_counter()
    cpu1 = thread_cpu_ns()[0]
    for i in tx:
        drv.replay_stop(i)
    total = sum(done)
    return Sample(total, t1 - t0, {"frontend_cpu_ns_per_frame": (cpu1 - cpu0) / max(total, 1)})


def _writev_threads(fds: Sequence[int], frame: bytes, frames: int) -> tuple[float, int]:
    """C ``writev`` loops, one thread per fd (``frame`` carries its own header):
    (seconds of the slowest, frames written)."""
    per = max(frames // len(fds), 1)
    results = run_threads(lambda k: netbench.writev_loop(fds[k], frame, per, hdr_len=0,
                                                      timeout=RUN_TIMEOUT), len(fds))
    return max(r[0][2] for r in results), sum(r[0][0] for r in results)


# ---------------------------------------------------------------------------------------
# iperf3

def iperf3_rate(ns: str, address: str, seconds: int, *, udp: bool = False,
                streams: int = 1, port: int = IPERF_PORT) -> tuple[float, dict]:
    """iperf3 client in namespace ``ns`` to ``address``: (TCP bit/s received, or UDP
    packets received per second; the JSON)."""
    if int(seconds) < 1:
        raise ValueError("iperf3 runs last whole seconds, at least 1")
    argv = ["ip", "netns", "exec", ns, "iperf3", "-c", address, "-p", str(port), "-J",
            "-t", str(int(seconds))]
    if streams > 1:
        argv += ["-P", str(streams)]
    if udp:
        argv += ["-u", "-l", str(UDP64_PAYLOAD), "-b", "0"]

    def run() -> tuple[str, str, int]:
        try:
            proc = subprocess.run(argv, capture_output=True, text=True,
                                  timeout=seconds + 30)
        except subprocess.TimeoutExpired as exc:
            raise VhostUserBenchError(f"iperf3 to {address} did not end") from exc
        return proc.stdout, proc.stderr, proc.returncode
    data = iperf3_client(run, VhostUserBenchError)
    if udp:
        return udp_pps(data), data
    return float(data["end"]["sum_received"]["bits_per_second"]), data


class Iperf3Server:
    """``iperf3 -s`` in namespace ``ns`` until :meth:`stop` (ended by pid)."""

    def __init__(self, ns: str, port: int = IPERF_PORT, log_path: Path | None = None) -> None:
        self.port = port
        with contextlib.ExitStack() as stack:
            out = stack.enter_context(open(log_path, "wb")) if log_path else subprocess.DEVNULL
            # `ip netns exec` execs iperf3: the pid is iperf3's
            self.proc = subprocess.Popen(["ip", "netns", "exec", ns, "iperf3", "-s", "-p",
                                          str(port)], stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=subprocess.STDOUT)
        try:
            wait_while_running(self.proc, lambda: tcp_sockets(self.proc.pid, port, "0A") > 0,
                               30, "iperf3 server", VhostUserBenchError)
        except BaseException:
            self.stop()
            raise

    def wait_idle(self, timeout: float = IDLE_WAIT) -> bool:
        """Wait until no client is connected and the server closed its side of every
        connection (no socket established or in close-wait); False after ``timeout``.
        A path torn down before that strands the server in its test ("the server is
        busy") for the next client."""
        deadline = time.monotonic() + timeout
        while tcp_sockets(self.proc.pid, self.port, "01", "08"):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return True

    def stop(self) -> None:
        end_process(self.proc, "iperf3 server")


# ---------------------------------------------------------------------------------------
# the parts

def _row(name: str, unit: str, baseline: str, note: str = "") -> Figure:
    return Figure("vhost-user", name, unit, True, baseline=baseline, note=note)


def part_ring(s: Settings, n: Sizes, sockdir: str, progress: Callable[[str], None]
              ) -> list[Figure]:
    """The ring rate: 64 B frames into ``--sink --poll`` vs ``--sink``."""
    frame = tx_frame(64)
    f = _row("ring rate: front-end -> pyvirtio net --sink --poll, 64 B, 1 pair", "Mpps",
             "same into --sink without --poll", NOTE_RING)
    polled = BackendProcess(sockdir, "sinkpoll", ["--sink", "--poll"])
    try:
        plain = BackendProcess(sockdir, "sink", ["--sink"])
        try:
            for rep in range(s.repeats):
                # one connection per run: an idle polling worker would spin through
                # the baseline's run
                with frontend(polled.path, 1, name="gen-poll") as fe:
                    f.samples.append(generate(fe, frame, bytes(HDR_LEN), n.ring,
                                              spin=True).pps / 1e6)
                with frontend(plain.path, 1, name="gen") as fe:
                    f.baseline_samples.append(generate(fe, frame, bytes(HDR_LEN),
                                                       n.ring).pps / 1e6)
                progress(f"vhost-user: ring rate [{rep + 1}/{s.repeats}]")
        finally:
            plain.stop()
    finally:
        polled.stop()
    return [f]


def part_generator(s: Settings, n: Sizes, sockdir: str, progress: Callable[[str], None]
                   ) -> list[Figure]:
    """The generator into a back-end with a TAP, vs C writev loops on the same TAP."""
    figures: list[Figure] = []
    with NetNamespace(prefix="pvbvu") as ns:
        _quiet_namespace(ns)
        # our handle creates the TAP (and deletes it); the back-end attaches its own
        # queues to it; ours serve the baseline's writev loops
        with Tap.create(TAP_NAME, max(PAIRS), netns=ns) as tap:
            be = BackendProcess(sockdir, "gen", ["--tap", TAP_NAME, "--netns", ns.name,
                                                 "--queues", str(max(PAIRS))])
            try:
                for size in FRAME_SIZES:
                    frame, header = frame_and_header(size)
                    gso = size == GSO_FRAME
                    count = n.gen_gso if gso else n.gen_small
                    label = "64 KiB TCP GSO" if gso else f"{size} B"
                    for pairs in PAIRS:
                        what = f"generator -> TAP, {label}, {pairs} pair{'s' * (pairs > 1)}"
                        mpps = _row(what, "Mpps", "C writev loop, same TAP", NOTE_GEN)
                        gbps = _row(what, "Gbit/s", "C writev loop, same TAP")
                        for rep in range(s.repeats):
                            marks: list[dict[str, int]] = []
                            with frontend(be.path, pairs,
                                          queue_size=GSO_QUEUE_SIZE if gso else QUEUE_SIZE,
                                          tx_buffer=GSO_SLOT if gso else SMALL_SLOT,
                                          name="gen") as fe:
                                g = generate(fe, frame, header, count, mark=lambda: marks.append(
                                    link_counters(ns.name, TAP_NAME)))
                                c1 = link_counters(ns.name, TAP_NAME)
                            c0 = marks[0]
                            frames = c1["rx_packets"] - c0["rx_packets"]
                            if frames < g.frames:
                                log.warning("%s: the back-end used %d chains, the TAP "
                                            "counted %d frames", what, g.frames, frames)
                            mpps.samples.append(frames / g.seconds / 1e6)
                            gbps.samples.append(frames * size * 8 / g.seconds / 1e9)
                            c0 = link_counters(ns.name, TAP_NAME)
                            secs, _ = _writev_threads(tap.fds[:pairs], header + frame, count)
                            c1 = link_counters(ns.name, TAP_NAME)
                            frames = c1["rx_packets"] - c0["rx_packets"]
                            mpps.baseline_samples.append(frames / secs / 1e6)
                            gbps.baseline_samples.append(frames * size * 8 / secs / 1e9)
                            progress(f"vhost-user: {what} [{rep + 1}/{s.repeats}]")
                        figures += [mpps, gbps]
            finally:
                be.stop()
    return figures


class _Pvp:
    """Namespaces A and B, a TAP in each behind its own ``pyvirtio net`` (``--queues
    2``), addresses :data:`PVP_NET` 1 (A) and 2 (B) on the TAPs, a veth pair between
    them with :data:`VETH_NET` 1 and 2, and an iperf3 server in B."""

    def __init__(self, sockdir: str) -> None:
        self.sockdir = sockdir
        self.ns_a = NetNamespace(prefix="pvbvu")
        self.ns_b = NetNamespace(prefix="pvbvu")
        self.backends: list[BackendProcess] = []
        self.server: Iperf3Server | None = None
        try:
            for ns in (self.ns_a, self.ns_b):
                ns.open()
                _quiet_namespace(ns)
            for ns, tap, name in ((self.ns_a, PVP_TAP_A, "pvpa"), (self.ns_b, PVP_TAP_B, "pvpb")):
                self.backends.append(BackendProcess(
                    sockdir, name, ["--tap", tap, "--netns", ns.name, "--queues",
                                    str(max(PAIRS))]))
            _ip("-n", self.ns_a.name, "addr", "add", f"{PVP_NET}1/24", "dev", PVP_TAP_A)
            _ip("-n", self.ns_b.name, "addr", "add", f"{PVP_NET}2/24", "dev", PVP_TAP_B)
            _ip("-n", self.ns_a.name, "link", "add", PVP_VETH_A, "type", "veth", "peer",
                "name", PVP_VETH_B, "netns", self.ns_b.name)
            for ns, dev, host in ((self.ns_a, PVP_VETH_A, 1), (self.ns_b, PVP_VETH_B, 2)):
                _ip("-n", ns.name, "addr", "add", f"{VETH_NET}{host}/24", "dev", dev)
                _ip("-n", ns.name, "link", "set", dev, "up")
            self.server = Iperf3Server(self.ns_b.name,
                                       log_path=Path(sockdir) / "iperf3-server.log")
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self.server is not None:
            self.server.stop()
        for be in self.backends:
            be.stop()
        for ns in (self.ns_b, self.ns_a):
            ns.remove()

    @contextlib.contextmanager
    def forwarding(self, pairs: int, *, queue_size: int = QUEUE_SIZE,
                   rx_buffer: int | None = None) -> Iterator[Any]:
        """Both ports connected (one shared memfd) and a both-ways forwarder on
        ``pairs`` pairs; the forwarder is yielded. ``rx_buffer``: RX buffer size
        (default: the front-end's choice, 1536 bytes with MRG_RXBUF)."""
        from pyvirtio.net.forwarder import Forwarder
        from pyvirtio.net.frontend import driver_area_size
        from pyvirtio.vhost_user.memfd import SharedGuestMemory
        need = driver_area_size(pairs, queue_size, rx_buffer or 1536, SMALL_SLOT)
        shm = SharedGuestMemory(2 * need + (16 << 20), name="pyvirtio-pvp")
        with contextlib.ExitStack() as stack:
            stack.callback(shm.close)
            a, b = (stack.enter_context(frontend(be.path, pairs, queue_size=queue_size,
                                                 rx_buffer=rx_buffer, memory=shm, name=name))
                    for be, name in zip(self.backends, ("a", "b")))
            with Forwarder(a, b, both_ways=True) as fwd:
                yield fwd
                # the path stays up until iperf3's server saw its last client go: torn
                # down earlier, it strands the server in that test ("the server is busy")
                if self.server is not None and not self.server.wait_idle(IDLE_WAIT):
                    log.warning("PVP: iperf3's server still has a client %.0f s after the "
                                "test; tearing the path down anyway", IDLE_WAIT)
            if fwd.errors:
                raise VhostUserBenchError(f"forwarder failed: {fwd.errors[0]!r}")


def _tcp_and_udp(ns: str, address: str, seconds: int, tcp_streams: int, udp_streams: int,
                 gbps: list[float], mpps: list[float]) -> None:
    """One iperf3 TCP run (Gbit/s appended to ``gbps``), then one 64 B UDP run (Mpps
    received appended to ``mpps``), from namespace ``ns`` to ``address``."""
    bps, _ = iperf3_rate(ns, address, seconds, streams=tcp_streams)
    gbps.append(bps / 1e9)
    pps, _ = iperf3_rate(ns, address, seconds, udp=True, streams=udp_streams)
    mpps.append(pps / 1e6)


def part_pvp(s: Settings, n: Sizes, sockdir: str, progress: Callable[[str], None]
             ) -> list[Figure]:
    """PVP over TAP vs the veth pair: TCP Gbit/s (1 and 2 pairs) and 64 B UDP pps."""
    figures: list[Figure] = []
    pvp = _Pvp(sockdir)
    try:
        for pairs in PAIRS:
            streams = 1 if pairs == 1 else 4
            tag = f"{pairs} pair{'s' * (pairs > 1)}"
            tcp = _row(f"PVP TCP, {tag} ({streams} stream{'s' * (streams > 1)})", "Gbit/s",
                       "veth pair, same namespaces (kernel only)", NOTE_PVP_TCP)
            udp = _row(f"PVP UDP 64 B, {tag}", "Mpps",
                       "veth pair, same namespaces (kernel only)", NOTE_PVP_UDP)
            per_path: list[float] = []
            for rep in range(n.pvp_repeats):
                with pvp.forwarding(pairs) as fwd:
                    _tcp_and_udp(pvp.ns_a.name, f"{PVP_NET}2", n.iperf_seconds, streams,
                                 pairs, tcp.samples, udp.samples)
                    stats = fwd.stats()
                    per_path = [row["a->b"].frames for row in stats]
                    big = [row["a->b"].bytes / max(row["a->b"].frames, 1) for row in stats]
                _tcp_and_udp(pvp.ns_a.name, f"{VETH_NET}2", n.iperf_seconds, streams,
                             pairs, tcp.baseline_samples, udp.baseline_samples)
                progress(f"vhost-user: PVP {tag} [{rep + 1}/{n.pvp_repeats}]")
            tcp.note += (f" [last run: frames A->B per pair {per_path}, mean bytes per "
                         f"forwarded frame {[round(b) for b in big]}]")
            figures += [tcp, udp]
    finally:
        pvp.close()
    return figures


def level_vhost_user(s: Settings, progress: Callable[[str], None]) -> list[Figure]:
    """The ring rate (always), the generator into a TAP and PVP over TAP (root, and
    iperf3 for PVP); parts that cannot run are reported as skipped, a part that fails
    as skipped with its error (the other parts' figures stay)."""
    n = Sizes.of(s.tiny, s.quick)
    figures: list[Figure] = []
    parts = [("ring rate", part_ring, lambda: None),
             ("generator -> TAP", part_generator, needs_root_reason),
             ("PVP over TAP", part_pvp, pvp_reason)]
    sockdir = tempfile.mkdtemp(prefix="pvbvu")        # short: a socket path <= 107 bytes
    try:
        with quiet_loggers(("pyvirtio.net", "pyvirtio.backends", "pyvirtio.device",
                     "pyvirtio.vhost_user", "pyvirtio.netns")):
            for part, fn, check in parts:
                reason = check()
                if reason:
                    skip("vhost-user", part, reason)
                    continue
                try:
                    figures += fn(s, n, sockdir, progress)
                except Exception as exc:  # the other parts still run
                    log.exception("vhost-user: %s failed", part)
                    skip("vhost-user", part, f"FAILED: {type(exc).__name__}: {exc}")
    finally:
        shutil.rmtree(sockdir, ignore_errors=True)
    return figures
