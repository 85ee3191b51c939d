"""virtio-net end to end through a real multiqueue TAP in a network namespace.

Every test builds its own :class:`Rig`: a fresh namespace (:mod:`nettools`) holding a TAP,
a :class:`~pyvirtio.net.device.NetDevice` whose backend is that TAP (one worker thread per
queue pair, the control-queue thread), and the engine's driver side
(:class:`~pyvirtio.net.driver.NetDriver`) playing the guest in its own guest memory. The
namespace side is reached with ``AF_PACKET`` and UDP sockets opened inside the namespace;
nothing touches the root namespace. The rig is torn down (device, TAP, namespace) when the
test ends, also after a failure.

Negative checks ("this frame was dropped") never wait for a timeout: on one queue the TAP
delivers in order, so a frame is known to be dropped once a later *sentinel* frame
arrived without it.
"""

from __future__ import annotations

import math
import socket
import struct
import threading
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np
import pytest

import nettools as nt
import vqcore
from pyvirtio.backends.tap import TUN_F_CSUM, TUN_F_USO4, TUN_F_USO6, Tap
from pyvirtio.features import FeatureDependencyError, NetFeature as N, Transport
from pyvirtio.net import ctrl as C
from pyvirtio.net.device import CTRL_FEATURES, DEFAULT_FEATURES, NetDevice
from pyvirtio.net.driver import NetDriver, NetDriverError
from pyvirtio.net.header import (HDR_LEN, VIRTIO_NET_HDR_F_NEEDS_CSUM,
                                 VIRTIO_NET_HDR_GSO_NONE, VIRTIO_NET_HDR_GSO_UDP_L4)
from pyvirtio.netns import NetNamespace
from pyvirtio.status import DeviceStateError, DeviceStatus as S, StatusTransitionError

pytestmark = nt.needs_tap

TAP = "tap0"
#: guest RX buffer size the driver uses with MRG_RXBUF
RX_BUF = 1536
#: a unicast MAC that is neither the guest's nor the TAP's
OTHER_MAC = bytes.fromhex("02aabbccdd77")
THIRD_MAC = bytes.fromhex("02aabbccdd78")
NEW_MAC = bytes.fromhex("525400aabbcc")
MCAST_MAC = bytes.fromhex("01005e0000fb")
#: UDP_SEGMENT (linux/udp.h); not in every Python's socket module
UDP_SEGMENT = getattr(socket, "UDP_SEGMENT", 103)
SOL_UDP = getattr(socket, "SOL_UDP", 17)
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)
GSO_SIZE = 1400
GUEST_USO = N.GUEST_USO4 | N.GUEST_USO6
#: every feature bit: the guest accepts whatever the device offers
EVERYTHING = (1 << 64) - 1
#: the guest offloads CTRL_GUEST_OFFLOADS_SET may switch
ALL_GUEST_OFFLOADS = int(C.GUEST_OFFLOADS)


# ---------------------------------------------------------------------------------------
# the rig

class GuestDriver(NetDriver):
    """A :class:`NetDriver` whose guest can hold back RX buffers: with ``rx_budget``
    set, :meth:`post_rx` posts at most that many more (0: none at all)."""

    def __init__(self, *args, rx_budget: int | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.rx_budget = rx_budget

    def post_rx(self, pair: int) -> int:
        if self.rx_budget is None:
            return super().post_rx(pair)
        dq = self.rx[pair]
        held = dq.free[self.rx_budget:]
        del dq.free[self.rx_budget:]
        try:
            posted = super().post_rx(pair) if dq.free else 0
        finally:
            dq.free += held
        self.rx_budget -= posted
        return posted


@dataclass
class Rig:
    """A namespace with a TAP, a NetDevice over it and a guest driving the device."""
    ns: NetNamespace
    tap: Tap
    device: NetDevice
    driver: GuestDriver
    features: int

    @property
    def pairs(self) -> int:
        return self.driver.pairs

    def ctrl(self, cls: int, cmd: int, data: bytes = b"") -> int:
        """One control command through the device's control-queue thread; the ack."""
        return self.driver.ctrl_command(cls, cmd, data)

    def rx_packets(self) -> list[int]:
        return [s["rx"]["packets"] for s in self.device.pair_stats()]

    def tx_packets(self) -> list[int]:
        return [s["tx"]["packets"] for s in self.device.pair_stats()]


def counters(rig: Rig, pair: int, direction: str, *names: str) -> tuple[int, ...]:
    """Some counters of one direction of one pair."""
    stats = rig.device.pair_stats()[pair][direction]
    return tuple(stats[n] for n in names)


def guest_memory(pairs: int, queue_size: int) -> vqcore.GuestMemory:
    """Room for every queue's rings and buffer slots (RX slots of a whole GSO frame
    without MRG_RXBUF; numpy's zeroed pages are only touched when used)."""
    size = pairs * queue_size * 2 * 65562 + (4 << 20)
    return vqcore.GuestMemory([(0, np.zeros(size, np.uint8))])


@contextmanager
def open_rig(pairs: int = 1, *, mtu: int | None = None, features: int | None = None,
             queue_size: int = 256, rx_budget: int | None = None, attach: bool = True,
             txqueuelen: int | None = None, ring_kind: str = "split") -> Iterator[Rig]:
    """A :class:`Rig`; ``features``: what the guest accepts of what the device offers
    (default: everything); ``ring_kind`` "packed": the device also offers
    VIRTIO_F_RING_PACKED (the guest then takes it unless ``features`` leaves it out)."""
    offered = None
    if ring_kind == "packed":
        offered = int(DEFAULT_FEATURES | CTRL_FEATURES | Transport.RING_PACKED
                      | (N.MQ if pairs > 1 else 0))
    with ExitStack() as stack:
        ns = stack.enter_context(nt.namespace())
        tap = stack.enter_context(Tap.create(TAP, pairs, netns=ns, mtu=mtu, mac=nt.HOST_MAC))
        if txqueuelen is not None:
            with ns.iproute() as ipr:
                ipr.link("set", index=tap.ifindex, txqlen=txqueuelen)
        device = stack.enter_context(NetDevice(tap, mac=nt.GUEST_MAC, mtu=mtu or 1500,
                                               max_pairs=pairs, queue_size=queue_size,
                                               features=offered))
        driver = GuestDriver(guest_memory(pairs, queue_size), pairs=pairs,
                             queue_size=queue_size, rx_budget=rx_budget)
        negotiated = driver.attach(device, features) if attach else 0
        if attach:
            packed = bool(negotiated & Transport.RING_PACKED)
            assert packed == (ring_kind == "packed") or features is not None
            assert all(isinstance(q, vqcore.PackedDeviceQueue if packed
                                  else vqcore.SplitDeviceQueue)
                       for q in device.queues if q is not None)
        yield Rig(ns, tap, device, driver, negotiated)


def packet_socket(ns: NetNamespace) -> nt.PacketSocket:
    """An AF_PACKET socket on the TAP with a receive buffer that holds every frame a test
    sends and receives (it also sees its own outgoing frames)."""
    ps = nt.PacketSocket(ns, TAP)
    ps.sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 8 << 20)
    return ps


def pairs_set(rig: Rig, n: int) -> int:
    """VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET ``n``; the ack."""
    return rig.ctrl(C.VIRTIO_NET_CTRL_MQ, C.VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET,
                    struct.pack("<H", n))


# ---------------------------------------------------------------------------------------
# frames and collection

def to_guest(size: int, seed: int, *, sport: int = 5000, dport: int = 4000,
             dst_mac: bytes = nt.GUEST_MAC) -> bytes:
    """A namespace -> guest UDP frame of ``size`` bytes."""
    return nt.udp_frame_of_size(size, dst_mac=dst_mac, src_mac=nt.HOST_MAC, src_ip=nt.HOST_IP,
                                dst_ip=nt.GUEST_IP, sport=sport, dport=dport, seed=seed)


def from_guest(size: int, seed: int, *, sport: int = 4000) -> bytes:
    """A guest -> namespace UDP frame of ``size`` bytes."""
    return nt.udp_frame_of_size(size, dst_mac=nt.HOST_MAC, src_mac=nt.GUEST_MAC,
                                src_ip=nt.GUEST_IP, dst_ip=nt.HOST_IP, sport=sport,
                                dport=5000, seed=seed)


def sent_by_guest(frame: bytes) -> bool:
    return frame[6:12] == nt.GUEST_MAC


_probe_seq = iter(range(1, 1 << 30))
ETHERTYPE_PROBE = struct.pack("!H", nt.ETH_P_EXPERIMENTAL)
ETHERTYPE_VLAN = struct.pack("!H", 0x8100)


def probe_frame(dst: bytes, *, vlan: int | None = None) -> bytes:
    """A 60-byte experimental-EtherType frame to ``dst`` with a unique tag, optionally
    802.1Q-tagged with VLAN id ``vlan``."""
    payload = b"PROBE" + next(_probe_seq).to_bytes(4, "big")
    payload += bytes(46 - len(payload))
    if vlan is None:
        return nt.ethernet(dst, nt.HOST_MAC, nt.ETH_P_EXPERIMENTAL, payload)
    return dst + nt.HOST_MAC + ETHERTYPE_VLAN + struct.pack("!H", vlan) + ETHERTYPE_PROBE \
        + payload[:42]


def collect(driver: NetDriver, pairs: Sequence[int], count: int,
            match: Callable[[bytes], bool], timeout: float = 5.0,
            ) -> dict[int, list[tuple[bytes, bytes]]]:
    """``(header, frame)`` of ``count`` matching frames received on any of ``pairs``, by
    pair, in arrival order (fewer if ``timeout`` passes first)."""
    out: dict[int, list[tuple[bytes, bytes]]] = {p: [] for p in pairs}
    total = 0
    deadline = time.monotonic() + timeout
    while total < count and time.monotonic() < deadline:
        for p in pairs:
            for hdr, frame in driver.recv(p, timeout=0.01 if len(pairs) > 1 else 0.05):
                if match(frame):
                    out[p].append((hdr, frame))
                    total += 1
    return out


def frames_of(got: dict[int, list[tuple[bytes, bytes]]]) -> list[bytes]:
    return [f for p in sorted(got) for _, f in got[p]]


def probe(rig: Rig, ps: nt.PacketSocket, frames: Sequence[bytes], *,
          sentinel_dst: bytes = nt.GUEST_MAC) -> list[bool]:
    """Inject ``frames`` then a sentinel (pair 0, one queue: in order); which of
    ``frames`` reached the guest."""
    sentinel = probe_frame(sentinel_dst)
    for frame in list(frames) + [sentinel]:
        ps.send(frame)
    seen: list[bytes] = []
    deadline = time.monotonic() + 5.0
    while sentinel not in seen:
        assert time.monotonic() < deadline, "the sentinel frame never reached the guest"
        seen += [f for _, f in rig.driver.recv(0, timeout=0.1)
                 if f[12:14] in (ETHERTYPE_PROBE, ETHERTYPE_VLAN)]
    return [f in seen for f in frames]


def unpack_hdr(hdr: bytes) -> tuple[int, int, int, int, int, int, int]:
    """``(flags, gso_type, hdr_len, gso_size, csum_start, csum_offset, num_buffers)``."""
    return struct.unpack("<BBHHHHH", hdr)


def link_stats(rig: Rig) -> dict[str, int]:
    with rig.ns.iproute() as ipr:
        link = ipr.get_links(rig.tap.ifindex)[0]
    return dict(link.get_attr("IFLA_STATS64"))


def settled(fn: Callable[[], object], expected: object, timeout: float = 5.0) -> object:
    """``fn()`` once it equals ``expected`` (or its last value after ``timeout``): the
    burst kernels add to their counters after they pushed the chains, so a counter may
    lag the frames the guest already sees."""
    deadline = time.monotonic() + timeout
    value = fn()
    while value != expected and time.monotonic() < deadline:
        time.sleep(0.002)
        value = fn()
    return value


def wait_for(cond: Callable[[], bool], timeout: float = 5.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


# ---------------------------------------------------------------------------------------
# byte-exact frames, both directions

@pytest.mark.parametrize("size", [60, 1514, 9000])
def test_frames_byte_exact_both_directions(size, ring_kind):
    mtu = 9000 if size > 1514 else None
    with open_rig(mtu=mtu, ring_kind=ring_kind) as rig, packet_socket(rig.ns) as ps:
        assert rig.tap.link_info()["mtu"] == (mtu or 1500)
        assert rig.device.net_config.mtu == (mtu or 1500)
        assert rig.features & N.MRG_RXBUF

        # guest -> namespace
        out = [from_guest(size, seed) for seed in range(8)]
        assert rig.driver.send(0, out) == len(out)
        got = ps.recv_many(len(out), 3.0, sent_by_guest)
        assert got == out
        assert rig.driver.wait_tx_done(0)
        tx = (len(out), size * len(out))
        assert settled(lambda: counters(rig, 0, "tx", "packets", "bytes"), tx) == tx

        # namespace -> guest
        into = [to_guest(size, seed) for seed in range(10, 18)]
        for frame in into:
            ps.send(frame)
        received = collect(rig.driver, [0], len(into), lambda f: f[6:12] == nt.HOST_MAC)[0]
        assert [f for _, f in received] == into
        for hdr, _ in received:
            _, gso_type, *_, num_buffers = unpack_hdr(hdr)
            assert gso_type == VIRTIO_NET_HDR_GSO_NONE
            # MRG_RXBUF: the frame spans as many 1536-byte buffers as it needs
            assert num_buffers == math.ceil((HDR_LEN + size) / RX_BUF)
        rx = (len(into), size * len(into))
        assert settled(lambda: counters(rig, 0, "rx", "packets", "bytes"), rx) == rx


# ---------------------------------------------------------------------------------------
# UDP segmentation offload, both directions

def gso_udp_frame(payload: bytes, sport: int, dport: int) -> tuple[bytes, bytes]:
    """``(vnet header, frame)`` of one guest -> namespace UDP GSO frame: the UDP checksum
    field holds the pseudo-header sum (NEEDS_CSUM), the kernel segments."""
    length = 8 + len(payload)
    pseudo = (socket.inet_aton(nt.GUEST_IP) + socket.inet_aton(nt.HOST_IP)
              + struct.pack("!BBH", 0, nt.IPPROTO_UDP, length))
    partial = ~nt.inet_checksum(pseudo) & 0xFFFF
    udp = struct.pack("!HHHH", sport, dport, length, partial) + payload
    frame = nt.ethernet(nt.HOST_MAC, nt.GUEST_MAC, nt.ETH_P_IP,
                        nt.ipv4(nt.GUEST_IP, nt.HOST_IP, nt.IPPROTO_UDP, udp))
    hdr = nt.vnet_hdr(flags=VIRTIO_NET_HDR_F_NEEDS_CSUM, gso_type=VIRTIO_NET_HDR_GSO_UDP_L4,
                      hdr_len=14 + 20 + 8, gso_size=GSO_SIZE, csum_start=14 + 20,
                      csum_offset=6)
    return hdr, frame


def pattern(n: int, seed: int) -> bytes:
    return bytes((i * 131 + seed + (i >> 8)) & 0xFF for i in range(n))


def test_guest_udp_gso_frame_arrives_as_datagrams():
    with open_rig() as rig:
        assert rig.features & N.HOST_USO and rig.features & N.CSUM
        # the device handed the negotiated guest offloads to the TAP (USO4 with USO6)
        assert rig.tap.offloads & (TUN_F_CSUM | TUN_F_USO4 | TUN_F_USO6) == \
            TUN_F_CSUM | TUN_F_USO4 | TUN_F_USO6
        nt.add_address(rig.ns, TAP, nt.HOST_IP)
        with rig.ns.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.bind((nt.HOST_IP, 5000))
            sock.settimeout(3.0)
            payload = pattern(65000, 1)
            hdr, frame = gso_udp_frame(payload, 4000, 5000)
            assert len(frame) > 65000
            assert rig.driver.send(0, [frame], header=hdr) == 1
            expected = math.ceil(len(payload) / GSO_SIZE)
            datagrams = []
            while len(datagrams) < expected:
                data, addr = sock.recvfrom(65536)
                assert addr == (nt.GUEST_IP, 4000)
                datagrams.append(data)
            assert [len(d) for d in datagrams] == [GSO_SIZE] * (expected - 1) + [
                len(payload) - GSO_SIZE * (expected - 1)]
            assert b"".join(datagrams) == payload
            sock.settimeout(0.2)
            with pytest.raises(socket.timeout):
                sock.recvfrom(65536)
        assert settled(lambda: counters(rig, 0, "tx", "packets", "errors"), (1, 0)) == (1, 0)


def send_udp_segment(rig: Rig, payload: bytes, dport: int) -> None:
    """One ``UDP_SEGMENT`` send of ``payload`` from the namespace to the guest."""
    with rig.ns.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((nt.HOST_IP, 5001))
        sock.setsockopt(SOL_UDP, UDP_SEGMENT, GSO_SIZE)
        assert sock.sendto(payload, (nt.GUEST_IP, dport)) == len(payload)


#: the port of the datagram sent after the one under test
MARKER_PORT = 6999


def udp_frames_until_marker(rig: Rig, timeout: float = 5.0) -> list[tuple[bytes, bytes]]:
    """Send a marker datagram after what was sent, then every UDP frame the guest
    receives before the marker (one queue: in order), so nothing goes unseen."""
    send_udp_segment(rig, b"marker", MARKER_PORT)
    got: list[tuple[bytes, bytes]] = []
    deadline = time.monotonic() + timeout
    while True:
        for hdr, frame in rig.driver.recv(0, timeout=0.1):
            parsed = nt.parse_udp_frame(frame)
            if parsed is None:
                continue
            if parsed.dport == MARKER_PORT:
                return got
            got.append((hdr, frame))
        assert time.monotonic() < deadline, f"no marker after {len(got)} UDP frames"


def check_one_gso_frame(got: list[tuple[bytes, bytes]], payload: bytes, dport: int) -> None:
    assert len(got) == 1, f"{len(got)} frames instead of one GSO frame"
    hdr, frame = got[0]
    flags, gso_type, _, gso_size, csum_start, csum_offset, num_buffers = unpack_hdr(hdr)
    assert gso_type == VIRTIO_NET_HDR_GSO_UDP_L4
    assert gso_size == GSO_SIZE
    assert flags & VIRTIO_NET_HDR_F_NEEDS_CSUM
    assert (csum_start, csum_offset) == (14 + 20, 6)
    # MRG_RXBUF: one frame spanning many merged buffers
    assert num_buffers == math.ceil((HDR_LEN + len(frame)) / RX_BUF) > 1
    parsed = nt.parse_udp_frame(frame)
    assert parsed.ip_checksum_ok
    assert (parsed.src_ip, parsed.dst_ip) == (nt.HOST_IP, nt.GUEST_IP)
    assert (parsed.sport, parsed.dport) == (5001, dport)
    assert parsed.payload == payload


def check_segments(got: list[tuple[bytes, bytes]], payload: bytes, dport: int) -> None:
    expected = math.ceil(len(payload) / GSO_SIZE)
    assert len(got) == expected, f"{len(got)} frames instead of {expected} segments"
    parts = []
    for hdr, frame in got:
        assert unpack_hdr(hdr)[1] == VIRTIO_NET_HDR_GSO_NONE
        assert unpack_hdr(hdr)[6] == 1                   # num_buffers
        parsed = nt.parse_udp_frame(frame)
        assert parsed.ip_checksum_ok and (parsed.sport, parsed.dport) == (5001, dport)
        parts.append(parsed.payload)
    assert [len(p) for p in parts[:-1]] == [GSO_SIZE] * (expected - 1)
    assert b"".join(parts) == payload


@pytest.mark.parametrize("uso", [True, False], ids=["guest-uso", "no-guest-uso"])
def test_host_udp_segment_send_reaches_guest(uso):
    with open_rig(features=None if uso else EVERYTHING & ~int(GUEST_USO)) as rig:
        assert bool(rig.features & N.GUEST_USO4) == uso
        assert bool(rig.features & N.GUEST_USO6) == uso
        assert rig.features & N.MRG_RXBUF
        assert bool(rig.tap.offloads & TUN_F_USO4) == uso
        nt.add_address(rig.ns, TAP, nt.HOST_IP)
        nt.set_neighbour(rig.ns, TAP, nt.GUEST_IP, nt.GUEST_MAC)
        payload = pattern(64000, 2)
        send_udp_segment(rig, payload, 6000)
        if not uso:
            # one frame per segment
            check_segments(udp_frames_until_marker(rig), payload, 6000)
            return
        # one GSO frame with a correct vnet header
        check_one_gso_frame(udp_frames_until_marker(rig), payload, 6000)

        # VIRTIO_NET_CTRL_GUEST_OFFLOADS_SET without USO: the TAP segments again
        no_uso = rig.features & ALL_GUEST_OFFLOADS & ~int(GUEST_USO)
        assert rig.ctrl(C.VIRTIO_NET_CTRL_GUEST_OFFLOADS, C.VIRTIO_NET_CTRL_GUEST_OFFLOADS_SET,
                        struct.pack("<Q", no_uso)) == C.VIRTIO_NET_OK
        assert not rig.tap.offloads & (TUN_F_USO4 | TUN_F_USO6)
        payload2 = pattern(64000, 3)
        send_udp_segment(rig, payload2, 6002)
        check_segments(udp_frames_until_marker(rig), payload2, 6002)
        # and back on
        assert rig.ctrl(C.VIRTIO_NET_CTRL_GUEST_OFFLOADS, C.VIRTIO_NET_CTRL_GUEST_OFFLOADS_SET,
                        struct.pack("<Q", rig.features & ALL_GUEST_OFFLOADS)
                        ) == C.VIRTIO_NET_OK
        assert rig.tap.offloads & TUN_F_USO4
        send_udp_segment(rig, payload, 6003)
        check_one_gso_frame(udp_frames_until_marker(rig), payload, 6003)


# ---------------------------------------------------------------------------------------
# multiqueue

def flows_to_guest(tag: bytes, n: int, base_port: int) -> list[bytes]:
    """``n`` namespace -> guest UDP flows (source ports vary), tagged."""
    return [nt.udp_frame(nt.GUEST_MAC, nt.HOST_MAC, nt.HOST_IP, nt.GUEST_IP,
                         base_port + i, 2000, tag + bytes([i])) for i in range(n)]


def tagged(tag: bytes) -> Callable[[bytes], bool]:
    def match(frame: bytes) -> bool:
        parsed = nt.parse_udp_frame(frame)
        return parsed is not None and parsed.payload.startswith(tag)
    return match


def inject_and_collect(rig: Rig, ps: nt.PacketSocket, tag: bytes, n: int, base_port: int
                       ) -> dict[int, list[tuple[bytes, bytes]]]:
    frames = flows_to_guest(tag, n, base_port)
    for frame in frames:
        ps.send(frame)
    got = collect(rig.driver, range(rig.pairs), n, tagged(tag))
    assert sorted(frames_of(got)) == sorted(frames)     # each exactly once
    return got


def test_four_queue_pairs_in_parallel(ring_kind):
    with open_rig(4, ring_kind=ring_kind) as rig, packet_socket(rig.ns) as ps:
        assert rig.features & N.MQ and rig.features & N.CTRL_VQ
        assert sorted(rig.device.workers) == [0]          # one pair until VQ_PAIRS_SET
        assert pairs_set(rig, 4) == C.VIRTIO_NET_OK
        assert sorted(rig.device.workers) == [0, 1, 2, 3]
        assert rig.tap.active_queues == 4
        assert all(w.is_alive() for w in rig.device.workers.values())

        # every guest queue transmits while flows from the namespace come in; the flows
        # spread over the TAP queues, each to its pair
        sent = {p: [from_guest(200 + 100 * p, seed, sport=4000 + p) for seed in range(16)]
                for p in range(4)}
        flows = flows_to_guest(b"mq", 96, 10000)
        for p in range(4):
            assert rig.driver.send(p, sent[p]) == 16
        for frame in flows:
            ps.send(frame)
        got_tx = ps.recv_many(64, 3.0, sent_by_guest)
        got = collect(rig.driver, range(4), len(flows), tagged(b"mq"))
        assert sorted(got_tx) == sorted(f for frames in sent.values() for f in frames)
        for p in range(4):                              # each queue's frames in order
            assert [f for f in got_tx if f in sent[p]] == sent[p]
        assert settled(rig.tx_packets, [16] * 4) == [16] * 4
        assert sorted(frames_of(got)) == sorted(flows)  # each exactly once
        per_pair = [len(got[p]) for p in range(4)]
        assert all(per_pair), f"a pair received nothing: {per_pair}"
        assert settled(rig.rx_packets, per_pair) == per_pair
        # a flow stays on one queue
        again = inject_and_collect(rig, ps, b"MQ", 96, 10000)
        assert {p: [f[-1] for _, f in v] for p, v in got.items()} == \
            {p: [f[-1] for _, f in v] for p, v in again.items()}


def test_vq_pairs_set_four_one_four():
    with open_rig(4) as rig, packet_socket(rig.ns) as ps:
        assert pairs_set(rig, 4) == C.VIRTIO_NET_OK
        old = dict(rig.device.workers)
        spread = inject_and_collect(rig, ps, b"four", 64, 20000)
        assert sum(1 for v in spread.values() if v) > 1
        counts = [len(spread[p]) for p in range(4)]
        assert settled(rig.rx_packets, counts) == counts

        assert pairs_set(rig, 1) == C.VIRTIO_NET_OK
        assert sorted(rig.device.workers) == [0]
        assert rig.device.workers[0] is old[0]
        for p in (1, 2, 3):
            assert not old[p].is_alive() and old[p].error is None
        assert rig.tap.active_queues == 1
        assert rig.device.active_pairs == 1
        before = rig.rx_packets()
        got = inject_and_collect(rig, ps, b"one", 64, 20000)
        assert len(got[0]) == 64
        expected = [before[0] + 64] + before[1:]
        assert settled(rig.rx_packets, expected) == expected
        # pair 0 still transmits
        assert rig.driver.send(0, [from_guest(100, 1)]) == 1
        assert ps.recv(3.0, sent_by_guest) == from_guest(100, 1)

        assert pairs_set(rig, 4) == C.VIRTIO_NET_OK
        assert sorted(rig.device.workers) == [0, 1, 2, 3]
        assert all(rig.device.workers[p] is not old[p] and rig.device.workers[p].is_alive()
                   for p in (1, 2, 3))
        assert rig.tap.active_queues == 4
        before = rig.rx_packets()
        got = inject_and_collect(rig, ps, b"back", 64, 20000)
        moved = [len(got[p]) for p in range(4)]
        assert sum(1 for m in moved if m) > 1, f"traffic on one queue only: {moved}"
        expected = [b + m for b, m in zip(before, moved)]
        assert settled(rig.rx_packets, expected) == expected
        # the restarted workers transmit too
        for p in (1, 2, 3):
            assert rig.driver.send(p, [from_guest(100, 50 + p)]) == 1
        assert sorted(ps.recv_many(3, 3.0, sent_by_guest)) == sorted(
            from_guest(100, 50 + p) for p in (1, 2, 3))

        # out of range: refused, nothing changes
        for n in (0, 5, 0xFFFF):
            assert pairs_set(rig, n) == C.VIRTIO_NET_ERR
        assert sorted(rig.device.workers) == [0, 1, 2, 3]


# ---------------------------------------------------------------------------------------
# control queue

def rx_mode(rig: Rig, cmd: int, on: bool) -> int:
    return rig.ctrl(C.VIRTIO_NET_CTRL_RX, cmd, bytes([on]))


def mac_table(unicast: Sequence[bytes], multicast: Sequence[bytes]) -> bytes:
    return (struct.pack("<I", len(unicast)) + b"".join(unicast)
            + struct.pack("<I", len(multicast)) + b"".join(multicast))


def test_ctrl_rx_modes_and_mac_filtering(ring_kind):
    """(The control queue is packed too with ``ring_kind`` "packed".)"""
    with open_rig(ring_kind=ring_kind) as rig, packet_socket(rig.ns) as ps:
        f = rig.device.rx_filter
        ok = C.VIRTIO_NET_OK
        # promiscuous after reset: a frame to another MAC reaches the guest
        assert probe(rig, ps, [probe_frame(OTHER_MAC)]) == [True]

        assert rx_mode(rig, C.VIRTIO_NET_CTRL_RX_PROMISC, False) == ok
        assert not f.promisc
        filtered = rig.device.pair_stats()[0]["rx"]["filtered"]
        assert probe(rig, ps, [probe_frame(OTHER_MAC), probe_frame(nt.GUEST_MAC),
                               probe_frame(nt.BROADCAST), probe_frame(MCAST_MAC)]
                     ) == [False, True, True, False]
        assert rig.device.pair_stats()[0]["rx"]["filtered"] == filtered + 2

        assert rx_mode(rig, C.VIRTIO_NET_CTRL_RX_ALLMULTI, True) == ok
        assert probe(rig, ps, [probe_frame(MCAST_MAC), probe_frame(OTHER_MAC)]) == [True, False]
        assert rx_mode(rig, C.VIRTIO_NET_CTRL_RX_ALLMULTI, False) == ok

        # the MAC table admits its addresses
        assert rig.ctrl(C.VIRTIO_NET_CTRL_MAC, C.VIRTIO_NET_CTRL_MAC_TABLE_SET,
                        mac_table([OTHER_MAC], [MCAST_MAC])) == ok
        assert f.unicast_table == [OTHER_MAC] and f.multicast_table == [MCAST_MAC]
        assert probe(rig, ps, [probe_frame(OTHER_MAC), probe_frame(MCAST_MAC),
                               probe_frame(THIRD_MAC)]) == [True, True, False]

        assert rx_mode(rig, C.VIRTIO_NET_CTRL_RX_ALLUNI, True) == ok
        assert probe(rig, ps, [probe_frame(THIRD_MAC)]) == [True]
        assert rx_mode(rig, C.VIRTIO_NET_CTRL_RX_ALLUNI, False) == ok
        assert probe(rig, ps, [probe_frame(THIRD_MAC)]) == [False]

        assert rx_mode(rig, C.VIRTIO_NET_CTRL_RX_NOBCAST, True) == ok
        assert probe(rig, ps, [probe_frame(nt.BROADCAST)]) == [False]
        assert rx_mode(rig, C.VIRTIO_NET_CTRL_RX_NOBCAST, False) == ok
        assert probe(rig, ps, [probe_frame(nt.BROADCAST)]) == [True]

        assert rx_mode(rig, C.VIRTIO_NET_CTRL_RX_NOMULTI, True) == ok
        assert probe(rig, ps, [probe_frame(MCAST_MAC)]) == [False]      # even in the table
        assert rx_mode(rig, C.VIRTIO_NET_CTRL_RX_NOMULTI, False) == ok

        assert rx_mode(rig, C.VIRTIO_NET_CTRL_RX_NOUNI, True) == ok
        assert probe(rig, ps, [probe_frame(nt.GUEST_MAC), probe_frame(OTHER_MAC)],
                     sentinel_dst=nt.BROADCAST) == [False, False]
        assert rx_mode(rig, C.VIRTIO_NET_CTRL_RX_NOUNI, False) == ok

        # an emptied table stops admitting
        assert rig.ctrl(C.VIRTIO_NET_CTRL_MAC, C.VIRTIO_NET_CTRL_MAC_TABLE_SET,
                        mac_table([], [])) == ok
        assert probe(rig, ps, [probe_frame(OTHER_MAC), probe_frame(MCAST_MAC)]) == [False, False]

        # the address itself: frames to the new one pass, to the old one not
        assert rig.ctrl(C.VIRTIO_NET_CTRL_MAC, C.VIRTIO_NET_CTRL_MAC_ADDR_SET, NEW_MAC) == ok
        assert rig.device.read_config(0, 6) == NEW_MAC and f.mac == NEW_MAC
        assert probe(rig, ps, [probe_frame(NEW_MAC), probe_frame(nt.GUEST_MAC)],
                     sentinel_dst=NEW_MAC) == [True, False]

        assert rx_mode(rig, C.VIRTIO_NET_CTRL_RX_PROMISC, True) == ok
        assert probe(rig, ps, [probe_frame(THIRD_MAC)], sentinel_dst=NEW_MAC) == [True]
        assert not rig.device.status & S.DEVICE_NEEDS_RESET


def test_ctrl_vlan_filter():
    with open_rig() as rig, packet_socket(rig.ns) as ps:
        ok = C.VIRTIO_NET_OK
        assert rig.features & N.CTRL_VLAN and rig.device.rx_filter.vlan_filtering

        def vlan(cmd: int, vid: int) -> int:
            return rig.ctrl(C.VIRTIO_NET_CTRL_VLAN, cmd, struct.pack("<H", vid))

        assert rx_mode(rig, C.VIRTIO_NET_CTRL_RX_PROMISC, False) == ok
        assert probe(rig, ps, [probe_frame(nt.GUEST_MAC, vlan=100)]) == [False]
        assert vlan(C.VIRTIO_NET_CTRL_VLAN_ADD, 100) == ok
        assert vlan(C.VIRTIO_NET_CTRL_VLAN_ADD, 4095) == ok
        assert rig.device.rx_filter.vlans() == [100, 4095]
        tagged_frames = [probe_frame(nt.GUEST_MAC, vlan=100), probe_frame(nt.GUEST_MAC, vlan=101),
                         probe_frame(nt.GUEST_MAC, vlan=4095), probe_frame(nt.GUEST_MAC)]
        assert probe(rig, ps, tagged_frames) == [True, False, True, True]
        # a VLAN-tagged frame reaches the guest byte-exact, tag included
        assert vlan(C.VIRTIO_NET_CTRL_VLAN_DEL, 100) == ok
        assert rig.device.rx_filter.vlans() == [4095]
        assert probe(rig, ps, [probe_frame(nt.GUEST_MAC, vlan=100),
                               probe_frame(nt.GUEST_MAC, vlan=4095)]) == [False, True]
        # deleting a VID that is not there is harmless
        assert vlan(C.VIRTIO_NET_CTRL_VLAN_DEL, 7) == ok
        assert vlan(C.VIRTIO_NET_CTRL_VLAN_DEL, 4095) == ok
        assert rig.device.rx_filter.vlans() == []


def raw_ctrl(driver: NetDriver, readable: Sequence[bytes], writable: int = 1,
             timeout: float = 5.0) -> tuple[int, bytes]:
    """Put one hand-made chain on the control queue: ``readable`` segments then one
    writable segment of ``writable`` bytes (none if 0). Returns ``(used length, the
    writable bytes afterwards)``."""
    dq = driver.ctrlq
    token = dq.free.pop(0)
    addr = dq.slot(token)
    segs, pos = [], addr
    for data in readable:
        driver.memory.write(pos, data)
        segs.append((pos, len(data)))
        pos += len(data) + 16
    if writable:
        driver.memory.write(pos, b"\xee" * writable)
    b = vqcore.ChainBatch(1)
    b.append(segs, [(pos, writable)] if writable else [], token=token)
    assert dq.queue.add(b) == 1
    driver._kick(dq)
    out = vqcore.ChainBatch(8)
    deadline = time.monotonic() + timeout
    while True:
        n = dq.queue.reclaim(out)
        if n:
            assert n == 1 and int(out.tokens[0]) == token
            dq.free.append(token)
            return int(out.used_len[0]), driver.memory.read(pos, writable) if writable else b""
        assert time.monotonic() < deadline, "control chain not returned"
        time.sleep(0.002)


def test_ctrl_other_commands_and_malformed_ones():
    with open_rig() as rig, packet_socket(rig.ns) as ps:
        ok, err = C.VIRTIO_NET_OK, C.VIRTIO_NET_ERR
        dev = rig.device
        ctrl = dev.ctrl
        assert dev.ctrl_index == 2 and ctrl is not None

        # ANNOUNCE ack clears VIRTIO_NET_S_ANNOUNCE
        dev.net_config.announce = True
        assert rig.ctrl(C.VIRTIO_NET_CTRL_ANNOUNCE, C.VIRTIO_NET_CTRL_ANNOUNCE_ACK) == ok
        assert not dev.net_config.announce
        # guest offloads: a subset of the negotiated GUEST_* offloads reaches the TAP
        assert rig.ctrl(C.VIRTIO_NET_CTRL_GUEST_OFFLOADS, C.VIRTIO_NET_CTRL_GUEST_OFFLOADS_SET,
                        struct.pack("<Q", int(N.GUEST_CSUM))) == ok
        assert rig.tap.offloads == TUN_F_CSUM
        assert rig.ctrl(C.VIRTIO_NET_CTRL_GUEST_OFFLOADS, C.VIRTIO_NET_CTRL_GUEST_OFFLOADS_SET,
                        struct.pack("<Q", 0)) == ok
        assert rig.tap.offloads == 0
        # MQ is not negotiated with one pair
        assert not rig.features & N.MQ
        assert pairs_set(rig, 1) == err
        assert ctrl.last[3] is C.CtrlError.NOT_NEGOTIATED

        assert rx_mode(rig, C.VIRTIO_NET_CTRL_RX_PROMISC, False) == ok
        ok_count = ctrl.ok
        malformed = [
            ((77, 0, b""), C.CtrlError.UNKNOWN_CLASS),
            ((C.VIRTIO_NET_CTRL_RX, 42, b"\x01"), C.CtrlError.UNKNOWN_COMMAND),
            ((C.VIRTIO_NET_CTRL_RX, C.VIRTIO_NET_CTRL_RX_PROMISC, b""), C.CtrlError.BAD_LENGTH),
            ((C.VIRTIO_NET_CTRL_RX, C.VIRTIO_NET_CTRL_RX_PROMISC, b"\x01\x01"),
             C.CtrlError.BAD_LENGTH),
            ((C.VIRTIO_NET_CTRL_MAC, C.VIRTIO_NET_CTRL_MAC_TABLE_SET,
              struct.pack("<I", 3) + OTHER_MAC + struct.pack("<I", 0)), C.CtrlError.BAD_LENGTH),
            ((C.VIRTIO_NET_CTRL_MAC, C.VIRTIO_NET_CTRL_MAC_TABLE_SET,
              mac_table([OTHER_MAC], []) + b"\x00"), C.CtrlError.BAD_LENGTH),
            ((C.VIRTIO_NET_CTRL_MAC, C.VIRTIO_NET_CTRL_MAC_ADDR_SET, OTHER_MAC[:5]),
             C.CtrlError.BAD_LENGTH),
            ((C.VIRTIO_NET_CTRL_MAC, 9, b""), C.CtrlError.UNKNOWN_COMMAND),
            ((C.VIRTIO_NET_CTRL_VLAN, C.VIRTIO_NET_CTRL_VLAN_ADD, struct.pack("<H", 4096)),
             C.CtrlError.BAD_VALUE),
            ((C.VIRTIO_NET_CTRL_VLAN, C.VIRTIO_NET_CTRL_VLAN_ADD, b"\x01"),
             C.CtrlError.BAD_LENGTH),
            ((C.VIRTIO_NET_CTRL_VLAN, 2, struct.pack("<H", 1)), C.CtrlError.UNKNOWN_COMMAND),
            ((C.VIRTIO_NET_CTRL_ANNOUNCE, C.VIRTIO_NET_CTRL_ANNOUNCE_ACK, b"\x00"),
             C.CtrlError.BAD_LENGTH),
            ((C.VIRTIO_NET_CTRL_GUEST_OFFLOADS, C.VIRTIO_NET_CTRL_GUEST_OFFLOADS_SET,
              b"\x02" * 7), C.CtrlError.BAD_LENGTH),
            ((C.VIRTIO_NET_CTRL_GUEST_OFFLOADS, C.VIRTIO_NET_CTRL_GUEST_OFFLOADS_SET,
              struct.pack("<Q", int(N.HOST_TSO4))), C.CtrlError.BAD_VALUE),
        ]
        for (cls, cmd, data), reason in malformed:
            assert rig.ctrl(cls, cmd, data) == err, (cls, cmd, data)
            assert ctrl.last == (cls, cmd, err, reason), (cls, cmd, data)
        # chains that are malformed as chains
        assert raw_ctrl(rig.driver, [b"\x00"]) == (1, bytes([err]))           # no full header
        assert ctrl.last[3] is C.CtrlError.NO_HEADER
        assert raw_ctrl(rig.driver, [], writable=3)[0] == 1                    # header unreadable
        assert ctrl.last[3] is C.CtrlError.NO_HEADER
        # no ack byte: returned with length 0 and *not* applied
        promisc_on = bytes([C.VIRTIO_NET_CTRL_RX, C.VIRTIO_NET_CTRL_RX_PROMISC, 1])
        assert raw_ctrl(rig.driver, [promisc_on], writable=0) == (0, b"")
        assert ctrl.last[3] is C.CtrlError.NO_ACK_BYTE
        # a well-formed command split over segments is fine
        assert raw_ctrl(rig.driver, [bytes([C.VIRTIO_NET_CTRL_RX]),
                                     bytes([C.VIRTIO_NET_CTRL_RX_ALLUNI]), b"\x00"]) == (1, b"\x00")
        assert ctrl.ok == ok_count + 1

        # nothing above changed the filter or hurt the device; traffic still flows
        f = dev.rx_filter
        assert not f.promisc and not f.alluni and f.unicast_table == [] and f.vlans() == []
        assert f.mac == nt.GUEST_MAC and dev.read_config(0, 6) == nt.GUEST_MAC
        assert not dev.status & S.DEVICE_NEEDS_RESET
        assert all(w.is_alive() and w.error is None for w in dev.workers.values())
        assert probe(rig, ps, [probe_frame(OTHER_MAC), probe_frame(nt.GUEST_MAC)]) == [False, True]
        assert rig.driver.send(0, [from_guest(300, 9)]) == 1
        assert ps.recv(3.0, sent_by_guest) == from_guest(300, 9)


def test_ctrl_commands_need_their_features():
    without = N.CTRL_RX_EXTRA | N.CTRL_VLAN | N.CTRL_MAC_ADDR | N.GUEST_ANNOUNCE
    with open_rig(features=EVERYTHING & ~int(without)) as rig, \
            packet_socket(rig.ns) as ps:
        assert rig.features & N.CTRL_RX and not rig.features & without
        assert not rig.device.rx_filter.vlan_filtering
        err = C.VIRTIO_NET_ERR
        assert rx_mode(rig, C.VIRTIO_NET_CTRL_RX_PROMISC, False) == C.VIRTIO_NET_OK
        for cls, cmd, data in [
                (C.VIRTIO_NET_CTRL_RX, C.VIRTIO_NET_CTRL_RX_NOBCAST, b"\x01"),
                (C.VIRTIO_NET_CTRL_RX, C.VIRTIO_NET_CTRL_RX_ALLUNI, b"\x01"),
                (C.VIRTIO_NET_CTRL_VLAN, C.VIRTIO_NET_CTRL_VLAN_ADD, b"\x05\x00"),
                (C.VIRTIO_NET_CTRL_MAC, C.VIRTIO_NET_CTRL_MAC_ADDR_SET, NEW_MAC),
                (C.VIRTIO_NET_CTRL_ANNOUNCE, C.VIRTIO_NET_CTRL_ANNOUNCE_ACK, b"")]:
            assert rig.ctrl(cls, cmd, data) == err, (cls, cmd)
            assert rig.device.ctrl.last[3] is C.CtrlError.NOT_NEGOTIATED, (cls, cmd)
        # none of them took effect: broadcast passes, VLANs are not filtered, same MAC
        assert probe(rig, ps, [probe_frame(nt.BROADCAST), probe_frame(nt.GUEST_MAC, vlan=5),
                               probe_frame(OTHER_MAC)]) == [True, True, False]
        assert rig.device.rx_filter.mac == nt.GUEST_MAC


# ---------------------------------------------------------------------------------------
# the guest out of RX buffers

def test_guest_without_rx_buffers_loses_nothing_up_to_the_tap_queue():
    qlen = 32
    with open_rig(rx_budget=0, txqueuelen=qlen) as rig, packet_socket(rig.ns) as ps:
        assert rig.driver.rx[0].queue.in_flight == 0           # the guest posted nothing
        base = link_stats(rig)
        frames = [to_guest(200, seed, sport=7000 + seed) for seed in range(qlen + 16)]
        for frame in frames:
            ps.send(frame)
        # the TAP holds qlen of them (it counts a frame as sent when it is read) and
        # drops what does not fit its queue; once it dropped the excess it saw them all
        wait_for(lambda: link_stats(rig)["tx_dropped"] - base["tx_dropped"] >= 16,
                 what="the TAP to fill its queue")
        stats = link_stats(rig)
        assert stats["tx_dropped"] - base["tx_dropped"] == len(frames) - qlen
        assert stats["tx_packets"] == base["tx_packets"]
        assert rig.device.pair_stats()[0]["rx"]["packets"] == 0
        assert rig.driver.recv(0, timeout=0.05) == []

        # buffers arrive: the queued frames follow, in order, nothing lost in between
        rig.driver.rx_budget = None
        assert rig.driver.post_rx(0) == rig.driver.queue_size
        got = collect(rig.driver, [0], qlen, lambda f: f[6:12] == nt.HOST_MAC)[0]
        assert [f for _, f in got] == frames[:qlen]
        assert settled(lambda: rig.rx_packets()[0], qlen) == qlen
        assert link_stats(rig)["tx_packets"] - base["tx_packets"] == qlen
        # and the path stays open
        late = to_guest(200, 99, sport=7999)
        ps.send(late)
        assert [f for _, f in collect(rig.driver, [0], 1, lambda f: f[6:12] == nt.HOST_MAC)[0]
                ] == [late]


def test_guest_buffers_run_out_mid_stream():
    """The guest posts a few buffers only; the rest of the burst waits in the TAP."""
    with open_rig(rx_budget=0, queue_size=64, txqueuelen=256) as rig, \
            packet_socket(rig.ns) as ps:
        drv = rig.driver
        frames = [to_guest(1514, seed, sport=7100 + seed) for seed in range(100)]
        for frame in frames:
            ps.send(frame)
        got: list[bytes] = []
        deadline = time.monotonic() + 10
        while len(got) < len(frames):
            assert time.monotonic() < deadline, f"{len(got)} of {len(frames)} frames"
            drv.rx_budget = 8                  # eight buffers at a time, no more
            drv.post_rx(0)
            got += [f for _, f in drv.recv(0, timeout=0.2) if f[6:12] == nt.HOST_MAC]
        assert got == frames
        assert rig.device.pair_stats()[0]["rx"]["no_room"] > 0


# ---------------------------------------------------------------------------------------
# feature negotiation and the status machine

@pytest.mark.parametrize("features, missing", [
    (N.GUEST_TSO4, N.GUEST_CSUM),
    (N.GUEST_USO4, N.GUEST_CSUM),
    (N.HOST_TSO6, N.CSUM),
    (N.HOST_USO, N.CSUM),
    (N.MQ, N.CTRL_VQ),
    (N.CTRL_RX, N.CTRL_VQ),
    (N.CTRL_RX_EXTRA | N.CTRL_VQ, N.CTRL_RX),
], ids=lambda v: getattr(v, "name", None))
def test_features_ok_refused_for_missing_dependency(features, missing):
    with open_rig(2, attach=False) as rig:
        dev = rig.device
        assert dev.device_features & features == features
        dev.write_status(S.ACKNOWLEDGE)
        dev.write_status(S.ACKNOWLEDGE | S.DRIVER)
        dev.write_driver_features(int(features | Transport.VERSION_1))
        st = dev.write_status(S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK)
        assert not st & S.FEATURES_OK                    # the driver reads it back unset
        assert isinstance(dev.negotiation_error, FeatureDependencyError)
        assert missing.name in str(dev.negotiation_error)
        assert dev.negotiated_features == 0
        # DRIVER_OK without FEATURES_OK is refused, nothing starts
        with pytest.raises(StatusTransitionError):
            dev.write_status(S.ACKNOWLEDGE | S.DRIVER | S.DRIVER_OK)
        assert dev.status == S.ACKNOWLEDGE | S.DRIVER and dev.workers == {}
        # the guest driver sees the refusal as an error too
        dev.write_status(0)
        with pytest.raises(NetDriverError, match=missing.name):
            GuestDriver(guest_memory(2, 64), pairs=2, queue_size=64).attach(
                dev, int(features | Transport.VERSION_1))
        # and a reset then a valid set of features brings the device up
        dev.write_status(0)
        rig.driver.attach(dev)
        assert dev.driver_ok and sorted(dev.workers) == [0]


def test_status_machine_errors():
    with open_rig(attach=False) as rig, packet_socket(rig.ns) as ps:
        dev = rig.device
        with pytest.raises(StatusTransitionError):
            dev.write_status(S.DRIVER_OK)                          # from 0
        with pytest.raises(StatusTransitionError):
            dev.write_status(S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK)   # features unwritten
        assert dev.status == 0
        with pytest.raises(DeviceStateError):
            dev.write_driver_features(int(Transport.VERSION_1))     # before DRIVER
        dev.write_status(S.ACKNOWLEDGE)
        dev.write_status(S.ACKNOWLEDGE | S.DRIVER)
        dev.write_driver_features(dev.device_features)
        with pytest.raises(StatusTransitionError):
            dev.write_status(S.ACKNOWLEDGE | S.DRIVER | S.DRIVER_OK)    # before FEATURES_OK
        with pytest.raises(StatusTransitionError):                      # in the same write
            dev.write_status(S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK | S.DRIVER_OK)
        assert dev.status == S.ACKNOWLEDGE | S.DRIVER and not dev.workers
        assert dev.write_status(S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK) & S.FEATURES_OK
        with pytest.raises(DeviceStateError):
            dev.write_driver_features(dev.device_features)          # after FEATURES_OK
        with pytest.raises(StatusTransitionError):
            dev.write_status(S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK | S.DEVICE_NEEDS_RESET)
        # FAILED: only a reset is accepted afterwards
        dev.write_status(S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK | S.FAILED)
        with pytest.raises(StatusTransitionError):
            dev.write_status(S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK | S.FAILED | S.DRIVER_OK)
        assert not dev.workers and not dev.driver_ok
        assert not any(t.name.startswith("vq-") for t in threading.enumerate())
        # reset, then the ordinary sequence works and so does traffic
        dev.write_status(0)
        assert dev.status == 0
        rig.driver.attach(dev)
        assert rig.driver.send(0, [from_guest(100, 3)]) == 1
        assert ps.recv(3.0, sent_by_guest) == from_guest(100, 3)
        # a reset stops the workers and the control thread
        dev.write_status(0)
        assert dev.workers == {} and not dev.driver_ok
        assert not any(t.name.startswith("vq-") for t in threading.enumerate())


# ---------------------------------------------------------------------------------------
# a hostile guest

def test_tx_chain_shorter_than_header_needs_reset_and_spares_other_pairs():
    with open_rig(2) as rig, packet_socket(rig.ns) as ps:
        dev, drv = rig.device, rig.driver
        resets: list[int] = []
        dev.config_change_callback = lambda: resets.append(1)
        assert pairs_set(rig, 2) == C.VIRTIO_NET_OK
        worker1 = dev.workers[1]
        # pair 1 sends a 6-byte chain: no room for the 12-byte virtio-net header
        assert drv.send(1, [b"\x01\x02\x03\x04\x05\x06"], header=b"") == 1
        wait_for(lambda: bool(dev.status & S.DEVICE_NEEDS_RESET), what="DEVICE_NEEDS_RESET")
        assert "pair 1" in dev.needs_reset_reason and "tx" in dev.needs_reset_reason
        assert resets, "no configuration change notification for DEVICE_NEEDS_RESET"
        assert drv.wait_tx_done(1)                        # the bad chain came back
        assert dev.pair_stats()[1]["tx"]["errors"] == 1
        assert dev.pair_stats()[1]["tx"]["packets"] == 0
        # the worker neither crashed nor died
        assert worker1.is_alive() and worker1.error is None
        assert all(w.error is None for w in dev.workers.values())
        # pair 0 keeps moving frames both ways; so does pair 1's RX
        out = [from_guest(500, seed) for seed in range(8)]
        assert drv.send(0, out) == 8
        assert ps.recv_many(8, 3.0, sent_by_guest) == out
        got = inject_and_collect(rig, ps, b"alive", 32, 30000)
        assert sum(len(v) for v in got.values()) == 32
        # the driver resets the device: it comes back whole
        dev.write_status(0)
        assert not worker1.is_alive() and dev.workers == {}
        assert dev.status == 0
        drv2 = GuestDriver(guest_memory(2, 256), pairs=2)
        drv2.attach(dev)
        rig.driver = drv2
        assert pairs_set(rig, 2) == C.VIRTIO_NET_OK
        assert drv2.send(1, [from_guest(100, 77, sport=4001)]) == 1
        assert ps.recv(3.0, sent_by_guest) == from_guest(100, 77, sport=4001)
        assert not dev.status & S.DEVICE_NEEDS_RESET


# ---------------------------------------------------------------------------------------
# clean stop

def vq_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("vq-")]


def test_close_leaves_no_threads_and_no_fds():
    with open_rig(2):            # warm-up: lazily opened things stay open from here on
        pass
    threads_before = set(threading.enumerate())
    vq_before = set(vq_threads())
    fds_before = nt.open_fd_count()
    with nt.namespace() as ns:
        tap = Tap.create(TAP, 4, netns=ns, mac=nt.HOST_MAC)
        dev = NetDevice(tap, mac=nt.GUEST_MAC, max_pairs=4)
        drv = GuestDriver(guest_memory(4, 128), pairs=4, queue_size=128)
        drv.attach(dev)
        rig = Rig(ns, tap, dev, drv, drv.features)
        assert pairs_set(rig, 4) == C.VIRTIO_NET_OK
        workers = list(dev.workers.values())
        assert len(set(vq_threads()) - vq_before) == 5      # 4 pairs + the control queue
        with packet_socket(ns) as ps:
            for p in range(4):
                assert drv.send(p, [from_guest(100, p, sport=4000 + p)]) == 1
            assert len(ps.recv_many(4, 3.0, sent_by_guest)) == 4
            inject_and_collect(rig, ps, b"bye", 32, 40000)
        dev.close()
        assert set(vq_threads()) <= vq_before and dev.workers == {}
        assert not any(w.is_alive() for w in workers)
        dev.close()                                       # idempotent
        tap.close()
    assert set(threading.enumerate()) == threads_before
    assert nt.open_fd_count() == fds_before
