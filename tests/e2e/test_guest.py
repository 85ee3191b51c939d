"""End to end: a real Linux guest (QEMU 7.2, the Debian cloud kernel's virtio_net driver)
on QEMU's own TAP backend and on ``pyvirtio net`` over vhost-user.

Every test boots its own guest inside its own network namespace (:mod:`harness`); the
tests that both backends must pass are parametrized over :data:`harness.BACKENDS`, and
the traffic tests also over the ring layout (``packed``: ``packed=on`` or not; every boot
checks in sysfs that the guest negotiated VIRTIO_F_RING_PACKED exactly when asked).
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import shutil
import socket
import subprocess
import threading
import time

import pytest

from pyvirtio.features import NetFeature as N
from pyvirtio.features import Transport as T
from pyvirtio.features import describe
from pyvirtio.net.vhost_user import VHOST_USER_NET_FEATURES
from pyvirtio.vhost_user.messages import F_PROTOCOL_FEATURES

from pyvirtio.guest.harness import (BACKENDS, GUEST_IP, GUEST_MAC, HOST_IP, Qemu, VmConfig,
                                    end_process, ethtool_stats, guest_feature_bits,
                                    iperf3_client, parse_snmp, ring_stop_indices,
                                    tcp_sockets)
from pyvirtio.guest import image as guest_image
from pyvirtio.guest.image import (GuestImageError, kernel_cmdline, module_depends,
                                  module_load_order)

#: the project-wide 600 s timeout applies: a test takes 3-12 s here, but starting
#: `pyvirtio net` from an editable install may first wait minutes for a Cython rebuild
pytestmark = pytest.mark.e2e

MiB = 1 << 20
#: the random file sent each way
FILE_SIZE = 8 * MiB + 4093


@pytest.fixture(params=BACKENDS)
def backend(request) -> str:
    """The NIC backend under test."""
    return request.param


@pytest.fixture
def packed(ring_kind: str) -> bool:
    """Whether the guest is given packed virtqueues (``-device virtio-net-pci,packed=on``)
    or split ones (QEMU's default): over conftest's ``ring_kind``."""
    return ring_kind == "packed"


def check_ring_layout(qemu, config: VmConfig) -> None:
    """The guest negotiated VIRTIO_F_RING_PACKED (feature bit 34 in sysfs) exactly when
    the device was ``packed=on``."""
    features = guest_feature_bits(qemu.features or "")
    assert features & int(T.VERSION_1), qemu.features
    assert bool(features & int(T.RING_PACKED)) == config.packed, (config, qemu.features)


def boot(testbed, config: VmConfig):
    """Boot ``config`` (ready marker seen) and check the ring layout."""
    qemu = testbed.boot(config)
    check_ring_layout(qemu, config)
    return qemu


def boot_with_agent(testbed, config: VmConfig):
    """Boot ``config`` and wait until the guest agent answers."""
    qemu = boot(testbed, config)
    agent = testbed.agent()
    agent.wait(timeout=30)
    return qemu, agent


def ping_both_ways(testbed, agent, *, count: int = 3, size: int = 56) -> None:
    """``count`` pings of ``size`` bytes guest -> host and host -> guest, all answered."""
    r = agent.run(f"ping -c {count} -s {size} -W 10 {HOST_IP}", timeout=60)
    assert f"{count} packets received" in r.text, r.text
    h = testbed.host_ping(GUEST_IP, count=count, size=size)
    assert h.rc == 0 and f"{count} packets received" in h.stdout, h.stdout + h.stderr


def test_one_shot_command(testbed, backend):
    """The kernel command line's ``vq.cmd`` runs after ``VQ-READY``; its exit code comes
    back as ``VQ-END rc=N`` and the guest powers off (QEMU exits, -no-reboot)."""
    qemu = testbed.boot(VmConfig(backend=backend, command=(
        f"ping -c 2 -W 10 {HOST_IP} && cat /sys/class/net/eth0/address && exit 7")))
    assert qemu.wait_end(timeout=60) == 7
    assert qemu.wait_exit(timeout=60) == 0
    text = qemu.text()
    assert "2 packets received" in text
    assert GUEST_MAC in text
    assert text.index("VQ-READY") < text.index("VQ-END rc=7")


def test_ping_both_ways(testbed, backend, packed):
    """ICMP echo guest -> host and host -> guest."""
    _, agent = boot_with_agent(testbed, VmConfig(backend=backend, packed=packed))
    ping_both_ways(testbed, agent)


def test_random_file_both_ways(testbed, backend, packed):
    """8 MiB of random bytes host -> guest and guest -> host, sha256 checked both ends."""
    _, agent = boot_with_agent(testbed, VmConfig(backend=backend, packed=packed))
    data = os.urandom(FILE_SIZE)
    with testbed.timed("host_to_guest"):
        r = agent.run("cat > /tmp/in && wc -c < /tmp/in && sha256sum /tmp/in",
                      stdin=data, timeout=180)
    size, digest = r.text.split()[:2]
    assert int(size) == FILE_SIZE
    assert digest == hashlib.sha256(data).hexdigest()

    r = agent.run(f"head -c {FILE_SIZE} /dev/urandom > /tmp/out && sha256sum /tmp/out",
                  timeout=120)
    guest_digest = r.text.split()[0]
    with testbed.timed("guest_to_host"):
        back = agent.run("cat /tmp/out", timeout=180).output
    assert len(back) == FILE_SIZE
    assert hashlib.sha256(back).hexdigest() == guest_digest


def tcp_buffer_max(text: str) -> tuple[int, int]:
    """``(tcp_wmem[2], tcp_rmem[2])`` from ``cat tcp_wmem tcp_rmem`` output."""
    values = [int(v) for v in text.split()]
    return values[2], values[5]


def test_iperf3_tcp_both_ways(testbed, backend, packed):
    """iperf3 TCP host -> guest and guest -> host (-R) of 128 MiB each: the sender wrote
    them all; the receiver got all but what may still have been in the sender's socket
    buffer or in flight when the sender reported its end over the control connection
    (iperf3 stops counting then): at most the sender's tcp_wmem[2] plus the receiver's
    tcp_rmem[2]; and the TAP's byte counter in that direction saw at least what the
    receiver got."""
    _, agent = boot_with_agent(testbed, VmConfig(backend=backend, packed=packed))
    agent.start_iperf3_server()
    sysctls = "cat /proc/sys/net/ipv4/tcp_wmem /proc/sys/net/ipv4/tcp_rmem"
    guest_wmem, guest_rmem = tcp_buffer_max(agent.run(sysctls).text)
    host_wmem, host_rmem = tcp_buffer_max(testbed.host(sysctls.split(), check=True).stdout)
    nbytes = 128 * MiB
    for reverse in (False, True):
        before = testbed.tap_counters()
        data = testbed.iperf3(nbytes=nbytes, reverse=reverse)
        after = testbed.tap_counters()
        end = data["end"]
        sent, received = end["sum_sent"]["bytes"], end["sum_received"]["bytes"]
        direction = "guest_to_host" if reverse else "host_to_guest"
        counter = "rx_bytes" if reverse else "tx_bytes"
        wire = after[counter] - before[counter]
        slack = guest_wmem + host_rmem if reverse else host_wmem + guest_rmem
        testbed.timings[f"{direction}_gbps"] = end["sum_received"]["bits_per_second"] / 1e9
        testbed.timings[f"{direction}_missing_mib"] = (sent - received) / MiB
        assert sent >= nbytes, (direction, sent)
        assert sent - slack <= received <= sent, (direction, sent, received, slack)
        assert wire >= received, (direction, wire, received)


def test_guest_reboot(testbed, backend, packed):
    """``reboot -f`` in the guest (QEMU without -no-reboot): the machine resets, the
    driver comes up again on the same backend (packed: the rings start again from slot
    0 with both wrap counters 1) and traffic works."""
    config = VmConfig(backend=backend, no_reboot=False, packed=packed)
    qemu, agent = boot_with_agent(testbed, config)
    ping_both_ways(testbed, agent, count=2)
    first = qemu.wait_ready()
    agent.run("(sleep 0.3; reboot -f) </dev/null >/dev/null 2>&1 &")
    with testbed.timed("reboot_to_ready"):
        qemu.wait_ready(start=first)
    assert qemu.alive
    agent.wait(timeout=30)
    assert qemu.text().count("VQ-READY") == 2     # /init ran again: the machine reset
    check_ring_layout(qemu, config)
    ping_both_ways(testbed, agent, count=2)
    data = os.urandom(MiB)
    r = agent.run("sha256sum", stdin=data)
    assert r.text.split()[0] == hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------------------------------
# vhost-user only

def vhost_user_offered(queues: int = 1) -> int:
    """The virtio features ``pyvirtio net --queues N`` offers (GET_FEATURES)."""
    offered = int(VHOST_USER_NET_FEATURES) | F_PROTOCOL_FEATURES
    if queues > 1:
        offered |= int(N.MQ)
    return offered


def wait_backend_log(testbed, pattern: str, count: int = 1, timeout: float = 15.0) -> str:
    """The backend log's complete lines once ``pattern`` occurs ``count`` times in them
    (bounded wait; a line the backend is still writing is left for the next look)."""
    deadline = time.monotonic() + timeout
    while True:
        text = testbed.backend.log_text()
        text = text[:text.rfind("\n") + 1]
        if len(re.findall(pattern, text, re.M)) >= count:
            return text
        if time.monotonic() > deadline:
            raise AssertionError(f"backend log: {pattern!r} x{count} not seen within "
                                 f"{timeout:.0f} s:\n{text[-3000:]}")
        time.sleep(0.1)


def test_negotiated_features(testbed):
    """The guest's negotiated features (sysfs) agree with what ``pyvirtio net`` offered
    and what QEMU passed on to it (SET_FEATURES): every data-plane bit the guest has the
    backend has, and the reverse; the offloads, MRG_RXBUF, EVENT_IDX and INDIRECT_DESC
    are on; the control bits stay with QEMU."""
    qemu, agent = boot_with_agent(testbed, VmConfig(backend="vhost-user"))
    sysfs = agent.run("cat /sys/class/net/eth0/device/features").text.strip()
    assert sysfs == qemu.features            # the same at VQ-READY and now
    guest = guest_feature_bits(sysfs)
    backend = testbed.backend.session()["features"]      # (the control socket)
    offered = vhost_user_offered()

    data_plane = int(N.CSUM | N.GUEST_CSUM | N.GUEST_TSO4 | N.GUEST_TSO6 | N.GUEST_ECN
                     | N.GUEST_UFO | N.HOST_TSO4 | N.HOST_TSO6 | N.HOST_ECN | N.HOST_UFO
                     | N.MRG_RXBUF | N.MTU | N.MQ | T.INDIRECT_DESC | T.EVENT_IDX
                     | T.VERSION_1 | T.RING_PACKED)
    assert backend & ~offered == 0, describe(backend & ~offered)
    assert guest & data_plane == backend & data_plane, (
        "guest only: " + describe(guest & data_plane & ~backend)
        + "; backend only: " + describe(backend & data_plane & ~guest))
    required = int(N.MRG_RXBUF | T.EVENT_IDX | T.INDIRECT_DESC | T.VERSION_1 | N.CSUM
                   | N.GUEST_CSUM | N.GUEST_TSO4 | N.GUEST_TSO6 | N.HOST_TSO4
                   | N.HOST_TSO6)
    assert guest & required == required, describe(required & ~guest)
    assert backend & int(T.PROTOCOL_FEATURES)
    # QEMU keeps the control queue, the MAC and the link status to itself
    qemu_only = int(N.CTRL_VQ | N.MAC | N.STATUS)
    assert guest & qemu_only == qemu_only
    assert backend & qemu_only == 0
    # and the guest really uses the offloads: TSO on eth0
    k = agent.run("ethtool -k eth0").text
    assert re.search(r"tcp-segmentation-offload: on", k), k
    assert re.search(r"rx-checksumming: on", k), k


def test_two_queue_pairs(testbed, backend, packed):
    """``-smp 2`` and 2 queue pairs: the guest runs 2 combined channels; a TCP sender
    pinned to each vCPU moves traffic through both pairs, as the guest's per-queue
    counters show, and for vhost-user the backend's per-pair counters too (QEMU 7.2
    sends ADD_MEM_REG of the same region once per pair: the backend takes the copy)."""
    qemu = boot(testbed, VmConfig(backend=backend, queues=2, smp=2, packed=packed))
    agent = testbed.agent()
    agent.wait(timeout=30)
    channels = agent.run("ethtool -l eth0").text
    assert re.search(r"Current hardware settings:.*?Combined:\s+2", channels, re.S), channels
    assert agent.run("ls /sys/class/net/eth0/queues").text.split() == [
        "rx-0", "rx-1", "tx-0", "tx-1"]
    before = ethtool_stats(agent.run("ethtool -S eth0").text)
    for port in (5201, 5202):
        testbed.host_iperf3_server(port)
    agent.run(f"iperf3 -c {HOST_IP} -p 5201 -A 0 -t 2 >/dev/null & "
              f"iperf3 -c {HOST_IP} -p 5202 -A 1 -t 2 >/dev/null & wait", timeout=120)
    after = ethtool_stats(agent.run("ethtool -S eth0").text)
    delta = {k: after[k] - before.get(k, 0) for k in after}
    testbed.timings.update({k: v for k, v in delta.items() if k.endswith("_packets")})
    for q in (0, 1):
        for d in ("rx", "tx"):
            assert delta[f"{d}_queue_{q}_packets"] >= 100, delta
    if backend != "vhost-user":
        return
    assert "refused" not in testbed.backend.log_text()
    qemu.stop()                 # QEMU stops the rings (GET_VRING_BASE) as it exits
    text = wait_backend_log(testbed, r"ring \d+ stopped at index", count=4)
    assert sorted(ring_stop_indices(text)) == [0, 1, 2, 3]
    stats = testbed.backend.pair_stats("last")
    assert sorted(stats) == [0, 1], stats
    for p in (0, 1):
        for d in ("rx", "tx"):
            assert stats[p][d]["packets"] >= 100, stats


def test_packed_ring_negotiated_end_to_end(testbed):
    """``packed=on`` over vhost-user: the guest (sysfs bit 34), QEMU's SET_FEATURES to
    the backend and the backend's rings are all packed; when QEMU stops the rings,
    GET_VRING_BASE answers QEMU's packed format (avail and used slot with their wrap
    counters), and the backend's counters saw the traffic."""
    assert vhost_user_offered() & int(T.RING_PACKED)
    qemu, agent = boot_with_agent(testbed, VmConfig(backend="vhost-user", packed=True))
    assert testbed.backend.session()["features"] & int(T.RING_PACKED)
    ping_both_ways(testbed, agent, count=2)
    data = os.urandom(2 * MiB)
    r = agent.run("sha256sum", stdin=data)
    assert r.text.split()[0] == hashlib.sha256(data).hexdigest()
    qemu.stop()
    text = wait_backend_log(testbed, r"pair 0 stats \(connection ended\)")
    stops = re.findall(r"ring (\d) stopped at index \d+ \(0x[0-9a-f]+: avail slot (\d+) "
                       r"wrap ([01]), used slot (\d+) wrap ([01])\)", text)
    assert {int(s[0]) for s in stops} == {0, 1}, text[-3000:]
    stats = testbed.backend.pair_stats("last")[0]
    assert stats["rx"]["packets"] >= 10 and stats["tx"]["packets"] >= 10, stats


@pytest.mark.heavy
def test_qemu_killed_mid_transfer(testbed):
    """SIGKILL QEMU while iperf3 pushes data into the guest; the same running backend
    then serves a new QEMU: traffic works."""
    qemu, agent = boot_with_agent(testbed, VmConfig(backend="vhost-user"))
    backend = testbed.backend
    agent.start_iperf3_server()
    client = testbed.host_popen(["iperf3", "-c", GUEST_IP, "-t", "60"], "iperf3-client")
    start = testbed.tap_counters()["tx_bytes"]
    deadline = time.monotonic() + 30
    while testbed.tap_counters()["tx_bytes"] - start < 20 * MiB:
        assert time.monotonic() < deadline, "no transfer within 30 s"
        assert client.poll() is None, "iperf3 client ended early"
        time.sleep(0.1)
    qemu.kill()
    client.kill()
    client.wait(timeout=30)
    wait_backend_log(testbed, r"front-end disconnected")
    assert backend.alive

    qemu2, agent2 = boot_with_agent(testbed, VmConfig(backend="vhost-user"))
    assert testbed.backend is backend and backend.alive
    ping_both_ways(testbed, agent2, count=2)
    agent2.start_iperf3_server()
    data = testbed.iperf3(nbytes=32 * MiB)
    assert data["end"]["sum_received"]["bytes"] >= 16 * MiB
    assert len(re.findall(r"front-end connected", backend.log_text())) == 2


@pytest.mark.heavy
def test_backend_restart_under_running_qemu(testbed, packed):
    """The backend ends (SIGTERM) and a new one starts on the same socket while QEMU
    (``reconnect=1``) keeps running: QEMU reconnects, and traffic resumes within a few
    seconds."""
    qemu, agent = boot_with_agent(testbed, VmConfig(backend="vhost-user", reconnect=True,
                                                    packed=packed))
    ping_both_ways(testbed, agent, count=2)
    first = testbed.backend
    assert first.stop() == 0
    assert qemu.alive
    second = testbed.start_backend()
    assert second is not first
    t0 = time.monotonic()
    resumed = None
    while time.monotonic() - t0 < 20:           # bounded: 20 one-second pings at most
        if testbed.host_ping(GUEST_IP, count=1, wait=1).rc == 0:
            resumed = time.monotonic() - t0
            break
    assert resumed is not None, "no ping answered within 20 s of the restart\n" + (
        second.log_text()[-3000:])
    testbed.timings["resumed_after"] = resumed
    ping_both_ways(testbed, agent, count=2)
    data = os.urandom(2 * MiB)
    r = agent.run("sha256sum", stdin=data)
    assert r.text.split()[0] == hashlib.sha256(data).hexdigest()
    assert "front-end connected" in second.log_text()


def test_mtu_9000(testbed):
    """``host_mtu=9000``: QEMU gives the guest MTU 9000 and sends NET_SET_MTU, on which
    the backend sets the TAP's MTU; 8000-byte pings cross both ways unfragmented."""
    qemu, agent = boot_with_agent(testbed, VmConfig(backend="vhost-user", host_mtu=9000))
    assert agent.run("cat /sys/class/net/eth0/mtu").text.strip() == "9000"
    assert testbed.tap_mtu() == 9000
    host_before = testbed.host_snmp()
    guest_before = parse_snmp(agent.run("cat /proc/net/snmp").text)
    ping_both_ways(testbed, agent, count=3, size=8000)
    host_after = testbed.host_snmp()
    guest_after = parse_snmp(agent.run("cat /proc/net/snmp").text)
    for key in ("ReasmReqds", "FragCreates"):
        assert host_after[key] == host_before[key], (key, host_before, host_after)
        assert guest_after[key] == guest_before[key], (key, guest_before, guest_after)


# ---------------------------------------------------------------------------------------
# the harness's own helpers (no QEMU)

def test_module_load_order_follows_depends():
    """Each module after what it depends on; a missing dependency or a cycle fails."""

    image = b"\x7fELF...\x00license=GPL\x00depends=virtio_ring,virtio\x00vermagic=6.1\x00"
    assert module_depends(image) == ["virtio_ring", "virtio"]
    assert module_depends(b"\x00depends=\x00") == []
    order = module_load_order({"virtio_net": ["virtio_ring", "virtio", "net_failover"],
                               "net_failover": ["failover"], "failover": [],
                               "virtio": ["virtio_ring"], "virtio_ring": []})
    assert order == ["virtio_ring", "virtio", "failover", "net_failover", "virtio_net"]
    with pytest.raises(GuestImageError, match="not in the image"):
        module_load_order({"a": ["b"]})
    with pytest.raises(GuestImageError, match="cycle"):
        module_load_order({"a": ["b"], "b": ["a"]})


def test_the_image_cache_key_follows_the_module_list(monkeypatch):
    """A new module list (virtio_rng was added for the vhost-user-rng guests) is a new
    image: a cache built with the old list is not reused."""
    versions = {"linux-image-x-cloud-amd64": "1", "busybox-static": "1"}
    assert "virtio_rng" in guest_image.MODULES
    key = guest_image._key(versions, {})
    assert guest_image._key(versions, {}) == key
    monkeypatch.setattr(guest_image, "MODULES",
                        tuple(m for m in guest_image.MODULES if m != "virtio_rng"))
    assert guest_image._key(versions, {}) != key


def test_kernel_cmdline_and_feature_parsers():
    """The kernel command line carries the command base64-encoded and refuses to grow
    past COMMAND_LINE_SIZE; the sysfs, log, snmp and ethtool parsers read what the guest
    and the backend print."""


    line = kernel_cmdline(ip="10.0.2.15/24", command="echo a b | sha256sum")
    cmd = [w for w in line.split() if w.startswith("vq.cmd=")][0][len("vq.cmd="):]
    assert base64.b64decode(cmd).decode() == "echo a b | sha256sum"
    assert "vq.ip=10.0.2.15/24" in line.split()
    with pytest.raises(ValueError, match="too long"):
        kernel_cmdline(command="x" * 2000)
    assert guest_feature_bits("1100" + "0" * 28 + "1") == 0b11 | 1 << 32
    log_text = "x: ring 0 stopped at index 5\nx: ring 0 stopped at index 9\n"
    assert ring_stop_indices(log_text) == {0: 9}
    snmp = ("Ip: Forwarding DefaultTTL ReasmReqds\nIp: 2 64 7\n"
            "Icmp: InMsgs\nIcmp: 3\n")
    assert parse_snmp(snmp) == {"Forwarding": 2, "DefaultTTL": 64, "ReasmReqds": 7}
    assert ethtool_stats("NIC statistics:\n     rx_queue_0_packets: 12\n") == {
        "rx_queue_0_packets": 12}


@pytest.mark.skipif(shutil.which("iperf3") is None, reason="iperf3 is not installed")
def test_iperf3_client_waits_for_a_server_between_tests(caplog):
    """A client that finds no listener (iperf3's server closes it between two tests) or a
    busy server is started again until the server answers, up to ``retry_for``; any
    other failure is raised at once. Real iperf3 on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    runs: list[str] = []
    server: list[subprocess.Popen] = []

    def client(*extra: str, start_server: bool = False):
        def run():
            p = subprocess.run(["iperf3", "-c", "127.0.0.1", "-p", str(port), "-J",
                                "-t", "1", *extra], capture_output=True, text=True,
                               check=False, timeout=30)
            runs.append(p.stdout)
            if start_server and not server:     # the server comes after the 1st attempt
                server.append(subprocess.Popen(
                    ["iperf3", "-s", "-1", "-p", str(port), "-B", "127.0.0.1"],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            return p.stdout, p.stderr, p.returncode
        return run

    # refused (no server yet), then the one-off server answers
    try:
        with caplog.at_level("INFO", logger="pyvirtio.guest.harness"):
            data = iperf3_client(client(start_server=True), retry_for=30.0)
    finally:
        for proc in server:
            end_process(proc, "iperf3 server")
    assert "Connection refused" in runs[0]
    assert data["end"]["sum_received"]["bytes"] > 0
    assert any("not ready" in r.getMessage() for r in caplog.records)

    # nobody ever listens: the refusal is raised once retry_for has passed
    runs.clear()
    with pytest.raises(RuntimeError, match=r"Connection refused \(after \d+ attempts"):
        iperf3_client(client(), retry_for=2.0)
    assert len(runs) > 1

    # a busy server (still in its last test) is retried like a refusal
    replies = iter(['{"error": "error - the server is busy running a test. try again later"}',
                    '{"start": {}, "end": {"sum_received": {"bytes": 1}}}'])
    runs.clear()

    def busy_then_free():
        runs.append("busy")
        return next(replies), "", 1
    assert iperf3_client(busy_then_free, pause=0.01)["end"]["sum_received"]["bytes"] == 1
    assert len(runs) == 2

    # any other failure is not retried
    runs.clear()
    with pytest.raises(RuntimeError, match="iperf3 printed no JSON"):
        iperf3_client(client("--no-such-option"), retry_for=30.0)
    assert len(runs) == 1


def test_tcp_sockets_counts_by_state():
    """tcp_sockets reads the listening, established and close-wait sockets of a port
    from /proc (what waits on iperf3's server go by). Plain sockets on 127.0.0.1."""
    pid = os.getpid()
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        assert tcp_sockets(pid, port, "0A") == 1
        client = socket.create_connection(("127.0.0.1", port))
        accepted, _ = server.accept()
        with accepted:
            assert tcp_sockets(pid, port, "01") == 1      # the accepted side's port
            client.close()                                 # its FIN: close-wait here
            deadline = time.monotonic() + 10
            while tcp_sockets(pid, port, "08") != 1:
                assert time.monotonic() < deadline, "no close-wait socket"
                time.sleep(0.01)
            assert tcp_sockets(pid, port, "01") == 0
            assert tcp_sockets(pid, port, "01", "08") == 1
        assert tcp_sockets(pid, port, "0A", "01", "08") == 1


def test_console_markers_wait_for_the_whole_line(tmp_path):
    """The console file is read while the guest writes it: a marker line cut short (the
    feature string, the exit code) is not taken until its end of line is there."""
    console = tmp_path / "console.log"
    features = "1110010111111111111101010000110010100000100000000000000000000000"
    console.write_text("boot\r\nVQ-READY features=" + features[:7])
    qemu = Qemu(["qemu"], console, tmp_path / "qemu.log", VmConfig(), "none")
    # the process whose exit the wait watches: one that outlives the wait
    qemu.proc = subprocess.Popen(["sleep", "60"])

    def finish(text: str) -> None:
        time.sleep(0.3)
        with open(console, "a") as f:
            f.write(text)
    try:
        writer = threading.Thread(target=finish, args=(features[7:] + "\r\nVQ-END rc=1",))
        writer.start()
        end = qemu.wait_ready(timeout=30)
        writer.join()
        assert qemu.features == features
        writer = threading.Thread(target=finish, args=("2\r\n",))
        writer.start()
        assert qemu.wait_end(timeout=30, start=end) == 12
        writer.join()
    finally:
        end_process(qemu.proc, "sleep")
