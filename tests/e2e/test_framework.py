"""End to end, the vhost-user framework with real guests: a back-end in client mode
under QEMU as the listening side (killed and restarted), two ports of one process
serving two guests at once, and the second device type, vhost-user-rng.
"""

from __future__ import annotations

import hashlib
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from pyvirtio.control import request
from pyvirtio.guest.harness import HOST_IP, PREFIXLEN, Agent, VmConfig

pytestmark = pytest.mark.e2e

HERE = Path(__file__).resolve().parent


def wait_ping(testbed, address: str, limit: float = 20.0) -> float:
    """Seconds until ``address`` answers a ping from the host (one-second pings,
    ``limit`` seconds at most: AssertionError after)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < limit:
        if testbed.host_ping(address, count=1, wait=1).rc == 0:
            return time.monotonic() - t0
    raise AssertionError(f"{address} answered no ping within {limit:.0f} s")


def test_client_mode_backend_killed_and_restarted(testbed):
    """QEMU listens (``-chardev socket,server=on,wait=off``) and ``pyvirtio net
    --client`` connects to it; the back-end is killed with SIGKILL three times and a new
    one started each time: it connects again, QEMU sets the device up again, and the
    guest answers pings again each time."""
    sock = testbed.socket("net-client.sock")
    config = VmConfig(backend="vhost-user", server=True, socket=sock)
    qemu = testbed.boot(config, wait=False)
    backend = testbed.start_backend(socket=sock, client=True)
    qemu.wait_ready()
    agent = testbed.agent()
    agent.wait(timeout=30)
    r = agent.run(f"ping -c 2 -W 10 {HOST_IP}", timeout=60)
    assert "2 packets received" in r.text, r.text
    for round_ in range(3):
        t0 = time.monotonic()
        backend.proc.send_signal(signal.SIGKILL)
        backend.proc.wait(30)
        assert qemu.alive
        backend = testbed.start_backend(socket=sock, client=True)
        wait_ping(testbed, config.ip)
        # the gap: from the kill to the first answered ping (a new process included)
        testbed.timings[f"gap_{round_ + 1}"] = time.monotonic() - t0
        assert backend.session()["features"], backend.show()
    data = os.urandom(1 << 20)
    r = agent.run("sha256sum", stdin=data)
    assert r.text.split()[0] == hashlib.sha256(data).hexdigest()


def test_two_ports_in_one_process_serve_two_guests(testbed):
    """One process, two ports (each a net device over its own TAP), two guests at
    once: both ping their host address and move a file through it, both ports'
    counters show it, and the ports are served independently (guest A shut down while
    B goes on)."""
    testbed.open_namespace(multiqueue_tap=True)           # vqtap0 with 10.0.2.1/24
    ns = testbed.netns
    for argv in (["tuntap", "add", "dev", "vqtap1", "mode", "tap", "vnet_hdr",
                  "multi_queue"],
                 ["addr", "add", f"10.0.3.1/{PREFIXLEN}", "dev", "vqtap1"],
                 ["link", "set", "vqtap1", "up"]):
        testbed._ip(["-n", ns, *argv])
    socks = [testbed.socket("a.sock"), testbed.socket("b.sock")]
    ctl = testbed.socket("two.ctl")
    proc = testbed.host_popen([sys.executable, str(HERE / "two_ports.py"), str(ctl),
                               str(socks[0]), "vqtap0", str(socks[1]), "vqtap1"], "two-ports")
    deadline = time.monotonic() + 120
    while not ctl.exists() or not all(s.exists() for s in socks):
        assert proc.poll() is None and time.monotonic() < deadline, "two_ports.py died"
        time.sleep(0.1)
    guests = [VmConfig(backend="vhost-user", socket=socks[0]),
              VmConfig(backend="vhost-user", socket=socks[1], ip="10.0.3.15",
                       mac="52:54:00:12:34:57")]
    qemus = [testbed.boot(c, wait=False) for c in guests]
    agents = []
    for qemu, config in zip(qemus, guests):
        qemu.wait_ready()
        agent = Agent(ns, config.ip)
        agent.wait(timeout=30)
        agents.append(agent)
    for agent, host in zip(agents, (HOST_IP, "10.0.3.1")):
        r = agent.run(f"ping -c 3 -W 10 {host}", timeout=60)
        assert "3 packets received" in r.text, r.text
    data = os.urandom(2 << 20)
    digest = hashlib.sha256(data).hexdigest()
    for agent in agents:
        assert agent.run("sha256sum", stdin=data).text.split()[0] == digest
    shown = {p["name"]: p for p in request(str(ctl), "show")}
    assert set(shown) == {"vqtap0", "vqtap1"}
    for p in shown.values():
        assert p["connected"], p
        pair = p["current"]["stats"]["pairs"][0]      # (rx: towards the guest)
        assert pair["rx"]["bytes"] >= len(data) and pair["tx"]["packets"] >= 10, p
    qemus[0].stop()                                        # A goes away, B goes on
    deadline = time.monotonic() + 30
    while request(str(ctl), "show", port="vqtap0")[0]["connected"]:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert agents[1].run("sha256sum", stdin=data).text.split()[0] == digest
    assert request(str(ctl), "show", port="vqtap1")[0]["connections"] == 1


def test_rng_device_feeds_the_guest_and_survives_restarts(testbed):
    """``pyvirtio rng`` behind QEMU's vhost-user-rng-pci: the guest's virtio_rng driver
    becomes the hwrng, 1 MiB comes out of /dev/hwrng, and after the back-end is killed
    (SIGKILL) and restarted, three times, reads go on. QEMU 7.2 cannot start this device
    without its back-end, and aborts with reconnect=1: it listens (server=on, waiting
    for the back-end), and the back-end connects (--client)."""
    sock = testbed.socket("rng.sock")
    qemu = testbed.boot(VmConfig(backend="qemu-tap", server=True, rng_socket=sock),
                        wait=False)
    backend = testbed.start_backend(kind="rng", socket=sock, client=True)
    qemu.wait_ready()
    agent = testbed.agent()
    agent.wait(timeout=30)
    current = agent.run("cat /sys/class/misc/hw_random/rng_current").text.strip()
    assert current.startswith("virtio_rng."), current
    with testbed.timed("hwrng_1MiB"):
        r = agent.run("dd if=/dev/hwrng bs=1024 count=1024 2>/dev/null | wc -c", timeout=180)
    assert r.text.strip() == str(1 << 20), r.text
    served = backend.session()["stats"]["requestq"]["bytes"]
    assert served >= 1 << 20, served
    for round_ in range(3):
        backend.proc.send_signal(signal.SIGKILL)
        backend.proc.wait(30)
        assert qemu.alive
        backend = testbed.start_backend(kind="rng", socket=sock, client=True)
        t0 = time.monotonic()
        r = agent.run("dd if=/dev/hwrng bs=1024 count=64 2>/dev/null | wc -c", timeout=120)
        assert r.text.strip() == str(64 << 10), r.text
        testbed.timings[f"read_after_restart_{round_ + 1}"] = time.monotonic() - t0
        assert backend.session()["stats"]["requestq"]["bytes"] >= 64 << 10
