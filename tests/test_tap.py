"""The TAP backend (pyvirtio.backends.tap) and the namespace helpers (pyvirtio.netns).

Every test that touches the network works in a namespace it creates and removes
(:mod:`nettools`); nothing is configured in the root namespace.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import threading
from collections import Counter

import pytest
from pyroute2 import IPRoute
from pyroute2.ethtool import Ethtool

import nettools as nt
from pyvirtio import netns
from pyvirtio.backends import tap as T
from pyvirtio.backends.tap import Tap
from pyvirtio.features import NetFeature as N
from vqcore.errors import VirtioError

pytestmark = nt.needs_tap

#: a name no other test or host interface is likely to use (checked absent from root)
TAP_NAME = f"pvt{os.getpid() % 100000}"


@pytest.fixture
def ns():
    """A fresh namespace (IPv6 off), removed afterwards."""
    with nt.namespace() as namespace:
        yield namespace


@pytest.fixture
def tap4(ns):
    """``(namespace, tap)``: TAP_NAME with 4 queue fds in a fresh namespace."""
    with Tap.create(TAP_NAME, 4, netns=ns, mac=nt.HOST_MAC) as tap:
        yield ns, tap


def link_info(ns, ifname):
    """The TUN attributes of ``ifname`` in ``ns`` as netlink reports them."""
    with ns.iproute() as ipr:
        link = ipr.get_links(ifname=ifname)[0]
    info = T._tun_info(link)
    info["mtu"] = link.get("mtu")
    return info


def links_in(ns):
    return set(ns.links())


def thread_netns() -> str:
    return os.readlink("/proc/thread-self/ns/net")


def ethtool_features(ns, ifname) -> dict[str, bool]:
    """``ethtool -k`` of ``ifname`` inside ``ns`` (pyroute2's ethtool ioctls)."""
    with netns.entered(ns.name):
        eth = Ethtool()
    try:
        return {k: v.enable for k, v in eth.get_features(ifname).features.items()}
    finally:
        eth.close()


def udp_flow(i: int, tag: bytes) -> bytes:
    """Namespace -> guest UDP frame of flow ``i`` (source port varies)."""
    return nt.udp_frame(nt.GUEST_MAC, nt.HOST_MAC, nt.HOST_IP, nt.GUEST_IP, 1000 + i, 2000,
                        tag + bytes([i]))


def tagged(tag: bytes):
    def match(frame: bytes) -> bool:
        parsed = nt.parse_udp_frame(frame)
        return parsed is not None and parsed.payload.startswith(tag)
    return match


# ---------------------------------------------------------------------------------------
# pure functions

OFFLOAD_CASES = [
    (0, 0),
    (N.GUEST_TSO4 | N.GUEST_TSO6 | N.GUEST_UFO, 0),       # nothing without GUEST_CSUM
    (N.GUEST_CSUM, T.TUN_F_CSUM),
    (N.GUEST_CSUM | N.GUEST_TSO4, T.TUN_F_CSUM | T.TUN_F_TSO4),
    (N.GUEST_CSUM | N.GUEST_TSO6, T.TUN_F_CSUM | T.TUN_F_TSO6),
    (N.GUEST_CSUM | N.GUEST_ECN, T.TUN_F_CSUM),            # ECN only with a TSO
    (N.GUEST_CSUM | N.GUEST_TSO4 | N.GUEST_ECN,
     T.TUN_F_CSUM | T.TUN_F_TSO4 | T.TUN_F_TSO_ECN),
    (N.GUEST_CSUM | N.GUEST_UFO, T.TUN_F_CSUM | T.TUN_F_UFO),
    (N.GUEST_CSUM | N.GUEST_USO4, T.TUN_F_CSUM | T.TUN_F_USO4),
    (N.GUEST_CSUM | N.GUEST_USO6, T.TUN_F_CSUM | T.TUN_F_USO6),
    (N.GUEST_CSUM | N.GUEST_TSO4 | N.GUEST_TSO6 | N.GUEST_ECN | N.GUEST_UFO
     | N.GUEST_USO4 | N.GUEST_USO6, T.TUN_F_ALL),
    # what QEMU 7.2 offered a vhost-user backend with a Linux guest (NOTES.md)
    (0x17020E783, T.TUN_F_CSUM | T.TUN_F_TSO4 | T.TUN_F_TSO6 | T.TUN_F_TSO_ECN
     | T.TUN_F_UFO),
    # host-side (TX) offloads do not touch the TAP's offloads
    (N.CSUM | N.HOST_TSO4 | N.HOST_TSO6 | N.HOST_UFO | N.HOST_USO, 0),
]


@pytest.mark.parametrize("features, flags", OFFLOAD_CASES)
def test_tap_offloads_maps_guest_features(features, flags):
    assert T.tap_offloads(int(features)) == flags


def test_constants_match_linux_if_tun():
    def ioc(direction, nr):  # _IOC(dir, 'T', nr, sizeof(int))
        return direction << 30 | 4 << 16 | ord("T") << 8 | nr
    assert T.TUNSETIFF == ioc(1, 202)
    assert T.TUNGETFEATURES == ioc(2, 207)
    assert T.TUNSETOFFLOAD == ioc(1, 208)
    assert T.TUNGETIFF == ioc(2, 210)
    assert T.TUNSETVNETHDRSZ == ioc(1, 216)
    assert T.TUNSETQUEUE == ioc(1, 217)
    assert T._IFREQ.size == T.IFREQ_SIZE == 40


@pytest.mark.parametrize("name, problem", [
    ("a" * 16, "16 bytes long, the limit is 15"),
    ("", "empty"),
    ("bad/name", "'/'"),
    ("tap 0", "whitespace"),
    ("tap%d", "'%'"),
    ("täp", "not ASCII"),
])
def test_check_ifname_rejects(name, problem):
    with pytest.raises(T.TapNameError) as info:
        T.check_ifname(name)
    assert problem in str(info.value)
    assert repr(name) in str(info.value)
    assert info.value.errno == errno.EINVAL
    assert isinstance(info.value, (ValueError, OSError, VirtioError))


def test_check_ifname_accepts_fifteen_bytes():
    assert T.check_ifname("a" * 15) == b"a" * 15


def test_kernel_supports_multiqueue_vnet_hdr_taps():
    features = T.tun_features()
    for flag in (T.IFF_TAP, T.IFF_NO_PI, T.IFF_VNET_HDR, T.IFF_MULTI_QUEUE):
        assert features & flag
    T.check_tun_features(features, "tap0")     # does not raise


def test_multiqueue_unsupported_is_reported_before_opening():
    old_kernel = T.IFF_TUN | T.IFF_TAP | T.IFF_NO_PI | T.IFF_VNET_HDR   # no IFF_MULTI_QUEUE
    with pytest.raises(T.TapMultiqueueUnsupported) as info:
        T.check_tun_features(old_kernel, "tap0")
    message = str(info.value)
    assert "tap0" in message and "TUNGETFEATURES" in message
    assert "IFF_MULTI_QUEUE" in message and "IFF_VNET_HDR" not in message
    assert info.value.errno == errno.EOPNOTSUPP


# ---------------------------------------------------------------------------------------
# creating and inspecting

def test_create_in_fresh_namespace_with_four_queues(tap4):
    ns, tap = tap4
    assert tap.created and tap.netns == ns.name
    fds = tap.fds
    assert len(fds) == len(set(fds)) == 4 == tap.queues == tap.active_queues
    for fd in fds:
        assert fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_NONBLOCK
        assert fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
        assert T.get_vnet_hdr_size(fd, tap.name) == 12
        name, flags = T.get_iff(fd, tap.name)         # TUNGETIFF
        assert name == TAP_NAME
        assert flags & T.TAP_QUEUE_FLAGS == T.TAP_QUEUE_FLAGS
        assert not flags & T.IFF_TUN
    info = link_info(ns, TAP_NAME)
    assert info["kind"] == "tun" and info["type"] == 2          # a TAP
    assert info["multi_queue"] == 1 and info["vnet_hdr"] == 1 and info["pi"] == 0
    assert info["num_queues"] == 4 and info["num_disabled_queues"] == 0
    assert tap.link_info()["state"] == "up"
    assert tap.link_info()["address"] == nt.mac_text(nt.HOST_MAC)
    # it lives in the test's namespace only
    assert TAP_NAME in links_in(ns)
    with IPRoute() as root:
        assert not root.link_lookup(ifname=TAP_NAME)


def test_create_with_mtu_and_set_mtu(ns):
    with Tap.create(TAP_NAME, 1, netns=ns, mtu=9000) as tap:
        assert link_info(ns, TAP_NAME)["mtu"] == 9000
        tap.set_mtu(1500)
        assert link_info(ns, TAP_NAME)["mtu"] == 1500
        with pytest.raises(T.TapLinkError) as info:
            tap.set_mtu(70000)
        message = str(info.value)
        assert TAP_NAME in message and "MTU 70000" in message and "EINVAL" in message
        assert link_info(ns, TAP_NAME)["mtu"] == 1500


def test_offloads_set_from_features(tap4):
    ns, tap = tap4
    assert tap.offloads == 0
    off = ethtool_features(ns, TAP_NAME)
    assert not off["tx-checksum-ip-generic"] and not off["tx-tcp-segmentation"]

    features = int(N.GUEST_CSUM | N.GUEST_TSO4 | N.GUEST_TSO6 | N.GUEST_ECN)
    assert tap.set_offloads(features) == (T.TUN_F_CSUM | T.TUN_F_TSO4 | T.TUN_F_TSO6
                                          | T.TUN_F_TSO_ECN) == tap.offloads
    on = ethtool_features(ns, TAP_NAME)
    assert on["tx-checksum-ip-generic"]
    assert on["tx-tcp-segmentation"] and on["tx-tcp6-segmentation"]
    assert on["tx-tcp-ecn-segmentation"]
    assert not on["tx-udp-segmentation"]

    assert tap.set_offloads(int(N.GUEST_CSUM | N.GUEST_USO4 | N.GUEST_USO6)) == (
        T.TUN_F_CSUM | T.TUN_F_USO4 | T.TUN_F_USO6)
    uso = ethtool_features(ns, TAP_NAME)
    assert uso["tx-udp-segmentation"] and not uso["tx-tcp-segmentation"]

    assert tap.set_offloads(0) == 0
    off = ethtool_features(ns, TAP_NAME)
    assert not off["tx-checksum-ip-generic"] and not off["tx-udp-segmentation"]


def test_offloads_fall_back_when_the_kernel_refuses_uso4_alone(tap4):
    ns, tap = tap4
    flags = tap.set_offloads(int(N.GUEST_CSUM | N.GUEST_TSO4 | N.GUEST_USO4))
    # Linux's TUN takes TUN_F_USO4 only together with TUN_F_USO6; then USO is dropped
    # (QEMU does the same) and the rest stays
    assert flags in (T.TUN_F_CSUM | T.TUN_F_TSO4 | T.TUN_F_USO4,
                     T.TUN_F_CSUM | T.TUN_F_TSO4)
    assert tap.offloads == flags
    features = ethtool_features(ns, TAP_NAME)
    assert features["tx-tcp-segmentation"]
    assert features["tx-udp-segmentation"] == bool(flags & T.TUN_F_USO4)


# ---------------------------------------------------------------------------------------
# data path with the 12-byte vnet header

@pytest.mark.parametrize("size", [60, 1514])
def test_frame_written_with_vnet_header_arrives_byte_exact(tap4, size):
    ns, tap = tap4
    with nt.PacketSocket(ns, TAP_NAME) as ps:
        for q, fd in enumerate(tap.fds):
            frame = nt.udp_frame_of_size(size, seed=q)
            nt.tap_write(fd, frame)                    # zero 12-byte virtio_net_hdr
            assert ps.recv(2.0, lambda f: f[:12] == frame[:12] and len(f) >= 42) == frame


def test_frame_sent_in_namespace_is_read_with_vnet_header(tap4):
    ns, tap = tap4
    with nt.PacketSocket(ns, TAP_NAME) as ps:
        for size in (60, 1514):
            frame = nt.udp_frame_of_size(size, dst_mac=nt.GUEST_MAC, src_mac=nt.HOST_MAC,
                                         src_ip=nt.HOST_IP, dst_ip=nt.GUEST_IP)
            ps.send(frame)
            got = nt.tap_read(tap.fds, 2.0, match=lambda f: f == frame)
            assert got is not None, f"{size}-byte frame not read from any queue"
            _, header, data = got
            assert data == frame
            # flags, gso_type, hdr_len, gso_size, csum_start, csum_offset: all zero for a
            # plain frame; num_buffers (bytes 10-11) is the reader's to fill
            assert header[:10] == bytes(10)


def test_udp_through_tap_both_directions(ns):
    """The frame builders make packets the kernel accepts, and parse what it sends."""
    with Tap.create(TAP_NAME, 2, netns=ns, mac=nt.HOST_MAC) as tap:
        nt.add_address(ns, TAP_NAME, nt.HOST_IP, 24)
        nt.set_neighbour(ns, TAP_NAME, nt.GUEST_IP, nt.GUEST_MAC)
        sock = ns.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with sock:
            sock.bind((nt.HOST_IP, 5000))
            sock.settimeout(2.0)
            # guest -> namespace: the kernel checks our IPv4 and UDP checksums
            frame = nt.udp_frame(nt.HOST_MAC, nt.GUEST_MAC, nt.GUEST_IP, nt.HOST_IP, 4000,
                                 5000, b"hello from the guest")
            nt.tap_write(tap.fds[1], frame)
            data, addr = sock.recvfrom(2048)
            assert data == b"hello from the guest" and addr == (nt.GUEST_IP, 4000)
            # a corrupted UDP checksum is dropped by the kernel: the check is real
            bad = bytearray(nt.udp_frame(nt.HOST_MAC, nt.GUEST_MAC, nt.GUEST_IP,
                                         nt.HOST_IP, 4000, 5000, b"corrupt"))
            bad[40] ^= 0xFF
            nt.tap_write(tap.fds[0], bytes(bad))
            nt.tap_write(tap.fds[0], frame)
            assert sock.recvfrom(2048)[0] == b"hello from the guest"
            # namespace -> guest, through the static neighbour entry (no ARP)
            sock.sendto(b"hello guest", (nt.GUEST_IP, 4000))
            got = nt.tap_read(tap.fds, 2.0, match=tagged(b"hello guest"))
            assert got is not None
            parsed = nt.parse_udp_frame(got[2])
            assert parsed.dst_mac == nt.GUEST_MAC and parsed.src_mac == nt.HOST_MAC
            assert (parsed.src_ip, parsed.dst_ip) == (nt.HOST_IP, nt.GUEST_IP)
            assert (parsed.sport, parsed.dport) == (5000, 4000)
            assert parsed.ip_checksum_ok and parsed.udp_checksum_ok


def test_set_active_queues_detaches_and_attaches(tap4):
    ns, tap = tap4
    with nt.PacketSocket(ns, TAP_NAME) as ps:
        def send_flows(tag):
            frames = [udp_flow(i, tag) for i in range(32)]
            for frame in frames:
                ps.send(frame)
            got = nt.tap_read_all(tap.fds, 0.5, match=tagged(tag))
            assert sorted(f for _, _, f in got) == sorted(frames)   # each exactly once
            return Counter(q for q, _, _ in got)

        spread = send_flows(b"four")
        assert len(spread) > 1, "32 flows over 4 queues all hashed to one queue"

        tap.set_active_queues(1)
        assert tap.active_queues == 1
        info = link_info(ns, TAP_NAME)
        assert info["num_queues"] == 1 and info["num_disabled_queues"] == 3
        assert send_flows(b"one") == Counter({0: 32})
        for fd in tap.fds[1:]:                         # detached: nothing to read
            with pytest.raises(BlockingIOError):
                os.read(fd, 65536)
        for frame in (udp_flow(i, b"late") for i in range(8)):
            ps.send(frame)
        assert nt.tap_read(tap.fds[1:], 0.3) is None
        assert len(nt.tap_read_all(tap.fds[:1], 0.5, match=tagged(b"late"))) == 8

        tap.set_active_queues(1)                       # no change: no ioctl, no error
        tap.set_active_queues(4)
        info = link_info(ns, TAP_NAME)
        assert info["num_queues"] == 4 and info["num_disabled_queues"] == 0
        assert len(send_flows(b"again")) > 1


@pytest.mark.parametrize("n", [0, 5, -1])
def test_set_active_queues_out_of_range(tap4, n):
    _, tap = tap4
    with pytest.raises(T.TapQueueError) as info:
        tap.set_active_queues(n)
    assert TAP_NAME in str(info.value) and "1..4" in str(info.value)
    assert tap.active_queues == 4


def test_tunsetqueue_error_is_typed(tap4):
    _, tap = tap4
    with pytest.raises(T.TapQueueError) as info:
        T.set_queue(tap.fds[1], True, tap.name)        # already attached
    message = str(info.value)
    assert message.startswith(f"TUNSETQUEUE(IFF_ATTACH_QUEUE) on {TAP_NAME} failed: "
                              "Invalid argument (EINVAL)")
    assert "already attached" in message


# ---------------------------------------------------------------------------------------
# error paths

def test_name_too_long(ns):
    with pytest.raises(T.TapNameError) as info:
        Tap.create("x" * 16, 1, netns=ns)
    assert "limit is 15" in str(info.value)
    assert isinstance(info.value, T.TapError) and isinstance(info.value, ValueError)
    assert links_in(ns) == {"lo"}


@pytest.mark.parametrize("ifr, reason", [
    ({"no_pi": 1, "vnet_hdr": 1}, "not multi_queue"),
    ({"no_pi": 1, "multi_queue": 1}, "not vnet_hdr"),
    ({"vnet_hdr": 1, "multi_queue": 1}, "packet information"),
])
def test_existing_incompatible_tap(ns, ifr, reason):
    with ns.iproute() as ipr:
        ipr.link("add", ifname="old0", kind="tuntap", mode="tap", ifr=ifr)
    before = nt.open_fd_count()
    for opener in (Tap.create, Tap.open):
        with pytest.raises(T.TapSetIffError) as info:
            opener("old0", 2, netns=ns)
        message = str(info.value)
        assert "TUNSETIFF on old0" in message and reason in message
        assert info.value.errno == errno.EINVAL
    assert nt.open_fd_count() == before
    assert "old0" in links_in(ns)                      # not ours: left alone


def test_kernel_refuses_multiqueue_fd_on_single_queue_tap(ns):
    with ns.iproute() as ipr:
        ipr.link("add", ifname="old0", kind="tuntap", mode="tap",
                 ifr={"no_pi": 1, "vnet_hdr": 1})
    with pytest.raises(T.TapSetIffError) as info:
        ns.run(T.open_queue, "old0")
    assert str(info.value) == "TUNSETIFF on old0 failed: Invalid argument (EINVAL)"


def test_existing_non_tap_interface(ns):
    with ns.iproute() as ipr:
        ipr.link("add", ifname="veth0", kind="veth", peer="veth1")
    with pytest.raises(T.TapSetIffError) as info:
        Tap.create("veth0", 1, netns=ns)
    assert "not a TUN/TAP device (kind 'veth')" in str(info.value)
    assert {"veth0", "veth1"} <= links_in(ns)


def test_invalid_offload_flags(tap4):
    _, tap = tap4
    tap.set_tap_offloads(T.TUN_F_CSUM)
    for flags, hint in ((0x80, "unknown flag 0x80"),
                        (T.TUN_F_TSO4, "need TUN_F_CSUM"),
                        (T.TUN_F_CSUM | 0x100, "unknown flag 0x100")):
        with pytest.raises(T.TapOffloadError) as info:
            tap.set_tap_offloads(flags)
        message = str(info.value)
        assert f"on {TAP_NAME} failed: Invalid argument (EINVAL)" in message
        assert message.startswith("TUNSETOFFLOAD(") and hint in message
        assert info.value.errno == errno.EINVAL and info.value.operation.startswith(
            "TUNSETOFFLOAD")
        assert tap.offloads == T.TUN_F_CSUM            # unchanged


def test_nonexistent_namespace():
    name = f"pyvirtio-nonexistent-{os.getpid()}"
    with pytest.raises(T.TapNamespaceNotFound) as info:
        Tap.create("tap0", 1, netns=name)
    assert repr(name) in str(info.value) and "does not exist" in str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    assert isinstance(info.value, netns.NamespaceNotFound)
    assert not netns.exists(name)                      # and it was not created


def test_open_requires_existing_tap(ns):
    with pytest.raises(T.TapNotFound) as info:
        Tap.open("absent0", 1, netns=ns)
    assert "absent0 does not exist" in str(info.value) and ns.name in str(info.value)
    assert "absent0" not in links_in(ns)


def test_open_error_names_the_device():
    with pytest.raises(T.TapOpenError) as info:
        T.open_queue("tap0", device="/nonexistent/net/tun")
    assert str(info.value) == ("opening /nonexistent/net/tun for tap0 failed: "
                               "No such file or directory (ENOENT)")


def test_vnet_header_size_errors(tap4):
    ns, tap = tap4
    with pytest.raises(T.TapVnetHdrError) as info:
        T.set_vnet_hdr_size(tap.fds[0], 4, tap.name)   # below sizeof(virtio_net_hdr)
    assert str(info.value).startswith(f"TUNSETVNETHDRSZ(4) on {TAP_NAME} failed: "
                                      "Invalid argument (EINVAL)")
    assert T.get_vnet_hdr_size(tap.fds[0]) == 12
    with pytest.raises(T.TapArgumentError):
        Tap.create("tap1", 1, netns=ns, vnet_hdr_size=8)


@pytest.mark.parametrize("queues", [0, 257])
def test_queue_count_out_of_range(ns, queues):
    with pytest.raises(T.TapArgumentError) as info:
        Tap.create("tap1", queues, netns=ns)
    assert "1..256" in str(info.value)
    assert "tap1" not in links_in(ns)


def test_failed_setup_removes_what_it_created(ns):
    before = nt.open_fd_count()
    with pytest.raises(T.TapLinkError) as info:
        Tap.create(TAP_NAME, 3, netns=ns, mtu=70000)
    assert "MTU 70000" in str(info.value) and "68..65521" in str(info.value)
    assert TAP_NAME not in links_in(ns)
    assert nt.open_fd_count() == before


# ---------------------------------------------------------------------------------------
# closing

def test_close_removes_only_a_tap_we_created(ns):
    tap = Tap.create(TAP_NAME, 2, netns=ns)
    assert tap.created
    tap.close()
    assert tap.closed and TAP_NAME not in links_in(ns)
    tap.close()                                        # idempotent
    with pytest.raises(T.TapError):
        tap.fds

    with ns.iproute() as ipr:
        ipr.link("add", ifname="theirs0", kind="tuntap", mode="tap",
                 ifr={"no_pi": 1, "vnet_hdr": 1, "multi_queue": 1})
    for opener in (Tap.open, Tap.create):
        with opener("theirs0", 3, netns=ns) as tap:
            assert not tap.created
            assert link_info(ns, "theirs0")["num_queues"] == 3
        assert "theirs0" in links_in(ns)
        assert link_info(ns, "theirs0")["num_queues"] == 0     # our fds are closed


def test_close_after_namespace_is_gone():
    with nt.namespace() as ns:
        tap = Tap.create(TAP_NAME, 2, netns=ns)
    assert not netns.exists(ns.name)
    tap.close()                                        # nothing left to delete: no error
    assert tap.closed


def test_no_fd_leak():
    def cycle():
        with nt.tap_namespace(4, name=TAP_NAME) as (ns, tap):
            tap.set_offloads(int(N.GUEST_CSUM | N.GUEST_TSO4))
            tap.set_active_queues(2)
            tap.set_active_queues(4)
            with nt.PacketSocket(ns, TAP_NAME) as ps:
                ps.send(udp_flow(0, b"leak"))
                assert nt.tap_read(tap.fds, 2.0, match=tagged(b"leak")) is not None
            tap.link_info()
            with pytest.raises(T.TapOffloadError):
                tap.set_tap_offloads(0x80)
    cycle()                                            # warm up lazy imports and caches
    before = nt.open_fd_count()
    for _ in range(3):
        cycle()
    assert nt.open_fd_count() == before


# ---------------------------------------------------------------------------------------
# namespace helpers

def test_namespace_removed_with_its_interfaces_after_an_error():
    with pytest.raises(RuntimeError, match="boom"):
        with netns.NetNamespace(prefix="pvtest") as ns:
            tap = Tap.create(TAP_NAME, 2, netns=ns)    # fds still open at removal
            assert netns.exists(ns.name)
            raise RuntimeError("boom")
    assert not netns.exists(ns.name) and not ns.active
    tap.close()


def test_run_in_restores_the_thread_namespace():
    home = thread_netns()
    with nt.namespace() as ns:
        inside = ns.run(thread_netns)
        assert inside != home
        with pytest.raises(ZeroDivisionError):
            ns.run(lambda: 1 / 0)
        assert thread_netns() == home
        with pytest.raises(netns.NamespaceNotFound):
            netns.run_in(f"pyvirtio-nonexistent-{os.getpid()}", thread_netns)
        assert thread_netns() == home


def test_entering_a_namespace_moves_only_the_calling_thread():
    home = thread_netns()
    seen: dict[str, str] = {}
    inside = threading.Event()
    release = threading.Event()
    with nt.namespace() as ns:
        def worker():
            with ns.entered():
                seen["worker"] = thread_netns()
                inside.set()
                release.wait(5)
            seen["worker_after"] = thread_netns()
        thread = threading.Thread(target=worker)
        thread.start()
        assert inside.wait(5)
        seen["main"] = thread_netns()
        release.set()
        thread.join(5)
    assert seen["main"] == home and seen["worker"] != home
    assert seen["worker_after"] == home


def test_iproute_and_sockets_are_bound_to_the_namespace():
    with nt.namespace() as ns:
        with ns.iproute() as ipr:
            assert [link.get("ifname") for link in ipr.get_links()] == ["lo"]
        fd = ns.open_file("/proc/thread-self/ns/net", os.O_RDONLY)
        try:
            assert os.readlink(f"/proc/self/fd/{fd}") == ns.run(thread_netns)
        finally:
            os.close(fd)
        with ns.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.bind(("127.0.0.1", 0))                # lo is up in the namespace
        with pytest.raises(netns.NamespaceNotFound):
            netns.iproute(f"pyvirtio-nonexistent-{os.getpid()}")
        assert not netns.exists(f"pyvirtio-nonexistent-{os.getpid()}")
