"""Network helpers for tests: namespaces with a TAP, raw sockets, hand-built frames.

Everything is scoped to a network namespace the test creates (:func:`tap_namespace`)
and removes afterwards; no address or packet ever touches the root namespace.

* :func:`tap_namespace` — a fresh namespace with a multiqueue TAP in it, IPv6 off on
  the TAP (so the kernel sends no router solicitations or MLD reports of its own).
* :class:`PacketSocket` — an ``AF_PACKET`` raw socket bound to an interface inside a
  namespace: :meth:`~PacketSocket.send` a frame out of it, :meth:`~PacketSocket.recv`
  frames the interface received, with a timeout and a filter.
* Frame builders with correct checksums (:func:`ethernet`, :func:`ipv4`, :func:`udp`,
  :func:`udp_frame`) and a parser that checks them (:func:`parse_udp_frame`).
* TAP queue fd I/O with the 12-byte ``virtio_net_hdr``: :func:`tap_write`,
  :func:`tap_read`.
* Namespace-scoped configuration: :func:`add_address`, :func:`set_neighbour`,
  :func:`set_sysctl`.
* :data:`TAP_SKIP_REASON` / :data:`needs_tap`: skip only when root or ``/dev/net/tun``
  is truly absent.
"""

from __future__ import annotations

import os
import select
import socket
import struct
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import pytest

from pyvirtio.backends.tap import TUN_DEVICE, VIRTIO_NET_HDR_SIZE, Tap
from pyvirtio.netns import NetNamespace, entered

ETH_P_ALL = 0x0003
ETH_P_IP = 0x0800
#: IEEE 802 "local experimental" EtherType: frames nobody else sends
ETH_P_EXPERIMENTAL = 0x88B5
PACKET_OUTGOING = 4
IPPROTO_UDP = 17
ETH_HLEN = 14
#: minimum Ethernet frame without FCS
ETH_ZLEN = 60
BROADCAST = b"\xff" * 6

#: deterministic locally administered MACs and addresses for tests
GUEST_MAC = bytes.fromhex("525400123456")
HOST_MAC = bytes.fromhex("02aabbccdd01")
GUEST_IP = "10.77.0.2"
HOST_IP = "10.77.0.1"


def _tap_skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root (network namespaces and TAP devices)"
    if not os.path.exists(TUN_DEVICE):
        return f"{TUN_DEVICE} does not exist"
    return None


#: why TAP tests cannot run here, or ``None``
TAP_SKIP_REASON = _tap_skip_reason()
#: ``@needs_tap`` skips a test (with the reason) when root or /dev/net/tun is missing
needs_tap = pytest.mark.skipif(TAP_SKIP_REASON is not None,
                               reason=TAP_SKIP_REASON or "")


# ---------------------------------------------------------------------------------------
# namespaces

def set_sysctl(ns: NetNamespace | str, key: str, value: str | int) -> None:
    """Write ``/proc/sys/<key with dots as slashes>`` inside namespace ``ns`` (the
    ``net.*`` tree is per namespace and resolved for the writing thread)."""
    path = "/proc/sys/" + key.replace(".", "/")
    with entered(_name(ns)):
        with open(path, "w") as f:
            f.write(str(value))


def get_sysctl(ns: NetNamespace | str, key: str) -> str:
    """Read a sysctl inside namespace ``ns``."""
    path = "/proc/sys/" + key.replace(".", "/")
    with entered(_name(ns)):
        with open(path) as f:
            return f.read().strip()


def _name(ns: NetNamespace | str) -> str:
    return ns.name if isinstance(ns, NetNamespace) else ns


@contextmanager
def namespace(prefix: str = "pvtest") -> Iterator[NetNamespace]:
    """A fresh namespace with IPv6 off by default (no autoconfiguration chatter) and
    ``lo`` up; removed with everything in it on exit."""
    with NetNamespace(prefix=prefix) as ns:
        set_sysctl(ns, "net.ipv6.conf.default.disable_ipv6", 1)
        set_sysctl(ns, "net.ipv6.conf.all.disable_ipv6", 1)
        with ns.iproute() as ipr:
            ipr.link("set", index=1, state="up")
        yield ns


@contextmanager
def tap_namespace(queues: int = 1, *, name: str = "tap0", prefix: str = "pvtest",
                  mtu: int | None = None, mac: bytes | None = HOST_MAC,
                  ) -> Iterator[tuple[NetNamespace, Tap]]:
    """``(namespace, tap)``: a fresh namespace holding TAP ``name`` with ``queues``
    queue fds, up, IPv6 off. Both are removed on exit (fixture-friendly:
    ``with tap_namespace(4) as (ns, tap): yield ns, tap``)."""
    with namespace(prefix) as ns:
        with Tap.create(name, queues, netns=ns, mtu=mtu, mac=mac) as tap:
            yield ns, tap


def add_address(ns: NetNamespace | str, ifname: str, address: str, prefixlen: int = 24
                ) -> None:
    """Add an IPv4/IPv6 address to ``ifname`` inside namespace ``ns``."""
    ns = _ns(ns)
    with ns.iproute() as ipr:
        index = ipr.link_lookup(ifname=ifname)[0]
        ipr.addr("add", index=index, address=address, prefixlen=prefixlen)


def set_neighbour(ns: NetNamespace | str, ifname: str, address: str, mac: bytes | str
                  ) -> None:
    """A permanent neighbour entry ``address -> mac`` on ``ifname`` inside ``ns`` (so the
    namespace sends to the "guest" without ARP)."""
    ns = _ns(ns)
    lladdr = mac_text(mac) if isinstance(mac, (bytes, bytearray)) else mac
    with ns.iproute() as ipr:
        index = ipr.link_lookup(ifname=ifname)[0]
        ipr.neigh("replace", dst=address, lladdr=lladdr, ifindex=index,
                  state=0x80)   # NUD_PERMANENT


def _ns(ns: NetNamespace | str) -> NetNamespace:
    return ns if isinstance(ns, NetNamespace) else NetNamespace(ns)


# ---------------------------------------------------------------------------------------
# frames

def mac_text(mac: bytes) -> str:
    """``02:aa:...`` for 6 bytes."""
    return ":".join(f"{b:02x}" for b in mac)


def inet_checksum(data: bytes) -> int:
    """The Internet checksum (RFC 1071) of ``data``."""
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def ethernet(dst: bytes, src: bytes, ethertype: int, payload: bytes) -> bytes:
    """An Ethernet II frame (no padding, no FCS)."""
    assert len(dst) == 6 and len(src) == 6
    return dst + src + struct.pack("!H", ethertype) + payload


def ipv4(src: str, dst: str, proto: int, payload: bytes, *, ttl: int = 64,
         ident: int = 0, tos: int = 0) -> bytes:
    """An IPv4 packet (20-byte header with a correct checksum, DF clear) + ``payload``."""
    total = 20 + len(payload)
    assert total <= 0xFFFF
    header = struct.pack("!BBHHHBBH4s4s", 0x45, tos, total, ident, 0, ttl, proto, 0,
                         socket.inet_aton(src), socket.inet_aton(dst))
    csum = inet_checksum(header)
    return header[:10] + struct.pack("!H", csum) + header[12:] + payload


def udp(src: str, dst: str, sport: int, dport: int, payload: bytes) -> bytes:
    """A UDP datagram with the checksum over the IPv4 pseudo header."""
    length = 8 + len(payload)
    pseudo = socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack(
        "!BBH", 0, IPPROTO_UDP, length)
    header = struct.pack("!HHHH", sport, dport, length, 0)
    csum = inet_checksum(pseudo + header + payload) or 0xFFFF
    return struct.pack("!HHHH", sport, dport, length, csum) + payload


def udp_frame(dst_mac: bytes, src_mac: bytes, src_ip: str, dst_ip: str, sport: int,
              dport: int, payload: bytes, *, ttl: int = 64, ident: int = 0) -> bytes:
    """Ethernet / IPv4 / UDP with correct checksums."""
    return ethernet(dst_mac, src_mac, ETH_P_IP,
                    ipv4(src_ip, dst_ip, IPPROTO_UDP,
                         udp(src_ip, dst_ip, sport, dport, payload),
                         ttl=ttl, ident=ident))


def udp_frame_of_size(size: int, *, dst_mac: bytes = HOST_MAC, src_mac: bytes = GUEST_MAC,
                      src_ip: str = GUEST_IP, dst_ip: str = HOST_IP, sport: int = 4000,
                      dport: int = 5000, seed: int = 0) -> bytes:
    """A UDP frame of exactly ``size`` bytes (>= 42) with a position-dependent payload."""
    n = size - ETH_HLEN - 20 - 8
    assert n >= 0, "a UDP frame has at least 42 bytes"
    payload = bytes((i * 7 + seed) & 0xFF for i in range(n))
    return udp_frame(dst_mac, src_mac, src_ip, dst_ip, sport, dport, payload)


@dataclass
class UdpFrame:
    """A parsed Ethernet/IPv4/UDP frame and whether its checksums hold."""
    dst_mac: bytes
    src_mac: bytes
    src_ip: str
    dst_ip: str
    sport: int
    dport: int
    payload: bytes
    ip_checksum_ok: bool
    udp_checksum_ok: bool


def parse_udp_frame(frame: bytes) -> UdpFrame | None:
    """Parse an Ethernet/IPv4/UDP frame (``None`` if it is something else)."""
    if len(frame) < ETH_HLEN + 28 or struct.unpack_from("!H", frame, 12)[0] != ETH_P_IP:
        return None
    ip = frame[ETH_HLEN:]
    ihl = (ip[0] & 0x0F) * 4
    if ip[0] >> 4 != 4 or ip[9] != IPPROTO_UDP:
        return None
    total = struct.unpack_from("!H", ip, 2)[0]
    src, dst = ip[12:16], ip[16:20]
    seg = ip[ihl:total]
    sport, dport, length, csum = struct.unpack_from("!HHHH", seg)
    pseudo = src + dst + struct.pack("!BBH", 0, IPPROTO_UDP, length)
    udp_ok = csum == 0 or inet_checksum(pseudo + seg[:length]) == 0
    return UdpFrame(frame[:6], frame[6:12], socket.inet_ntoa(src), socket.inet_ntoa(dst),
                    sport, dport, bytes(seg[8:length]), inet_checksum(ip[:ihl]) == 0,
                    udp_ok)


# ---------------------------------------------------------------------------------------
# AF_PACKET

class PacketSocket:
    """An ``AF_PACKET``/``SOCK_RAW`` socket on ``ifname`` inside namespace ``ns``.

    It sees every frame of the interface (``ETH_P_ALL``); :meth:`recv` skips the
    frames the interface sent (``PACKET_OUTGOING``) unless asked.
    """

    def __init__(self, ns: NetNamespace | str, ifname: str, proto: int = ETH_P_ALL
                 ) -> None:
        with entered(_name(ns)):
            self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW,
                                      socket.htons(proto))
            try:
                self.sock.bind((ifname, proto))
            except OSError:
                self.sock.close()
                raise
        self.ifname = ifname

    def send(self, frame: bytes) -> None:
        """Transmit ``frame`` (a whole Ethernet frame) out of the interface."""
        sent = self.sock.send(frame)
        assert sent == len(frame)

    def recv(self, timeout: float = 2.0, match: Callable[[bytes], bool] | None = None,
             *, outgoing: bool = False, bufsize: int = 65536) -> bytes | None:
        """The next received frame for which ``match`` holds, or ``None`` after
        ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            self.sock.settimeout(left)
            try:
                frame, addr = self.sock.recvfrom(bufsize)
            except socket.timeout:
                return None
            if addr[2] == PACKET_OUTGOING and not outgoing:
                continue
            if match is None or match(frame):
                return frame

    def recv_many(self, count: int, timeout: float = 2.0,
                  match: Callable[[bytes], bool] | None = None) -> list[bytes]:
        """Up to ``count`` matching frames, stopping ``timeout`` seconds after the last."""
        out: list[bytes] = []
        while len(out) < count:
            frame = self.recv(timeout, match)
            if frame is None:
                break
            out.append(frame)
        return out

    def drain(self) -> int:
        """Discard what is queued; returns how many frames were discarded."""
        n = 0
        self.sock.setblocking(False)
        try:
            while n < 100000:
                try:
                    self.sock.recv(65536)
                except BlockingIOError:
                    break
                n += 1
        finally:
            self.sock.setblocking(True)
        return n

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> "PacketSocket":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------------------------------
# TAP queue fds

def vnet_hdr(flags: int = 0, gso_type: int = 0, hdr_len: int = 0, gso_size: int = 0,
             csum_start: int = 0, csum_offset: int = 0, num_buffers: int = 0) -> bytes:
    """A 12-byte ``virtio_net_hdr_v1`` (little-endian)."""
    return struct.pack("<BBHHHHH", flags, gso_type, hdr_len, gso_size, csum_start,
                       csum_offset, num_buffers)


def tap_write(fd: int, frame: bytes, header: bytes | None = None) -> None:
    """Write ``header`` (default: a zero 12-byte vnet header) + ``frame`` to a queue fd."""
    data = (vnet_hdr() if header is None else header) + frame
    assert os.write(fd, data) == len(data)


def tap_read(fds: Sequence[int], timeout: float = 2.0, *,
             match: Callable[[bytes], bool] | None = None,
             hdr_size: int = VIRTIO_NET_HDR_SIZE) -> tuple[int, bytes, bytes] | None:
    """``(queue index, vnet header, frame)`` of the next frame read from any of ``fds``
    whose frame satisfies ``match``, or ``None`` after ``timeout`` seconds.

    Reads into a zeroed buffer: the TAP writes only the 10 bytes of the legacy header
    and leaves ``num_buffers`` as it found it.
    """
    poller = select.poll()
    for fd in fds:
        poller.register(fd, select.POLLIN)
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        for fd, _ in poller.poll(left * 1000):
            buf = bytearray(65536 + hdr_size)
            try:
                n = os.readv(fd, [buf])
            except BlockingIOError:
                continue
            frame = bytes(buf[hdr_size:n])
            if match is None or match(frame):
                return fds.index(fd), bytes(buf[:hdr_size]), frame


def tap_read_all(fds: Sequence[int], timeout: float = 0.5, *,
                 match: Callable[[bytes], bool] | None = None, limit: int = 10000,
                 ) -> list[tuple[int, bytes, bytes]]:
    """Every matching frame that arrives until ``timeout`` seconds pass without one."""
    out = []
    while len(out) < limit:
        got = tap_read(fds, timeout, match=match)
        if got is None:
            break
        out.append(got)
    return out


def open_fd_count() -> int:
    """How many fds this process has open."""
    return len(os.listdir("/proc/self/fd"))
