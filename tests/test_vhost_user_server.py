"""Many ports in one process, one event loop (:class:`pyvirtio.vhost_user.server.
VhostUserServer`): each port's front-end is served on its own, one port's stalled or
hostile front-end never delays or hurts another, ports come and go while it runs, and a
client-mode port connects to a listening front-end and again whenever it goes away."""

from __future__ import annotations

import os
import socket
import threading
import time
from contextlib import contextmanager
from typing import Iterator

import pytest

from pyvirtio import control
from pyvirtio.net.frontend import VhostUserNetFrontend
from pyvirtio.vhost_user.messages import HEADER, VERSION, Request
from pyvirtio.vhost_user.server import BACKOFF_MAX, Port, VhostUserServer
from vhost_user_dummy import DummyDevice
from vhost_user_peer import Peer, make_device, wait_for

FRAME = bytes.fromhex("ffffffffffff020000000001") + b"\x88\xb5" + bytes(46)


@contextmanager
def running(*ports: Port, control_path: str | None = None) -> Iterator[VhostUserServer]:
    """A server of ``ports`` in a thread (and its control socket)."""
    server = VhostUserServer(ports=ports)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    ctl = (control.ControlServer(control_path, server.control_commands())
           if control_path else None)
    try:
        yield server
    finally:
        if ctl is not None:
            ctl.close()
        server.shutdown()
        thread.join(10)
        assert not thread.is_alive()
        server.close()


@pytest.fixture
def devices():
    """Two net devices over loopbacks and a dummy, closed at the end."""
    made = [make_device("loopback"), make_device("loopback"), make_device("dummy")]
    yield [d for d, _ in made]
    for d, packet in made:
        d.close()
        if packet is not None:
            packet.close()


def echo(fe: VhostUserNetFrontend, count: int = 20) -> None:
    """``count`` frames through a loopback back-end and back."""
    assert fe.send(0, [FRAME] * count) == count
    got = []
    deadline = time.monotonic() + 5
    while len(got) < count and time.monotonic() < deadline:
        got += fe.recv(0, timeout=0.2)
    assert [f for _, f in got] == [FRAME] * count


def test_two_ports_serve_two_front_ends_at_once(tmp_path, devices):
    a, b = (Port(d, socket_path=str(tmp_path / f"{n}.sock"), name=n)
            for d, n in zip(devices, "ab"))
    with running(a, b, control_path=str(tmp_path / "ctl")):
        fa, fb = VhostUserNetFrontend(name="fa"), VhostUserNetFrontend(name="fb")
        try:
            fa.connect(a.socket_path)
            fb.connect(b.socket_path)
            fa.start()
            fb.start()
            for _ in range(3):                       # interleaved traffic on both
                echo(fa)
                echo(fb)
            shown = control.request(str(tmp_path / "ctl"), "show")
            assert [(p["name"], p["connected"]) for p in shown] == [("a", True), ("b", True)]
            stats = control.request(str(tmp_path / "ctl"), "stats")
            assert stats["a"]["pairs"][0]["tx"]["packets"] == 60
            assert stats["b"]["pairs"][0]["rx"]["packets"] == 60
        finally:
            fa.close()
            fb.close()
        wait_for(lambda: a.handler is None and b.handler is None)
        assert a.last["stats"]["pairs"][0]["tx"]["packets"] == 60
        assert a.connections == b.connections == 1


def test_a_stalled_front_end_delays_no_other_port(tmp_path, devices):
    """Port a's front-end sends half a header and waits: port b answers at once, and a
    is dropped when its message deadline passes (the loop never waited on it)."""
    a = Port(devices[0], socket_path=str(tmp_path / "a.sock"), name="a",
             message_timeout=1.0)
    b = Port(devices[2], socket_path=str(tmp_path / "b.sock"), name="b")
    with running(a, b):
        stalled = Peer(a.socket_path)
        try:
            stalled.send_raw(HEADER.pack(Request.GET_FEATURES, VERSION, 0)[:5])
            t0 = time.monotonic()
            for _ in range(20):
                with Peer(b.socket_path) as p:
                    p.get_features()
            assert time.monotonic() - t0 < 0.5
            assert a.handler is not None                 # a is still waiting for the rest
            assert stalled.closed_by_peer(timeout=3)     # dropped after its 1 s
        finally:
            stalled.close()


def test_one_ports_hostile_front_end_costs_only_itself(tmp_path, devices):
    """While port a streams frames, port b's front-end breaks its ring and sends
    garbage: b's connection ends or its device needs a reset; a loses nothing."""
    a = Port(devices[0], socket_path=str(tmp_path / "a.sock"), name="a")
    b = Port(devices[1], socket_path=str(tmp_path / "b.sock"), name="b")
    with running(a, b):
        fa, fb = VhostUserNetFrontend(name="fa"), VhostUserNetFrontend(name="fb")
        try:
            fa.connect(a.socket_path)
            fa.start()
            fb.connect(b.socket_path)
            fb.start()
            echo(fa)
            # b: a head beyond the TX ring offered, kicked
            q, mem = fb.queue(1).queue, fb.memory.memory
            idx = int.from_bytes(mem.read(q.avail_addr + 2, 2), "little")
            mem.write(q.avail_addr + 4 + 2 * (idx % q.size), (999).to_bytes(2, "little"))
            mem.write(q.avail_addr + 2, ((idx + 1) & 0xFFFF).to_bytes(2, "little"))
            os.eventfd_write(fb.queue(1).kick_fd, 1)
            wait_for(lambda: b.handler is not None and b.handler.needs_reset_reason)
            assert fb.ring_errors() == [1]
            fb.conn.sock.sendall(b"\xff" * 40)        # and garbage on its socket
            wait_for(lambda: b.handler is None)
            for _ in range(5):
                echo(fa)
            assert a.handler is not None and a.handler.needs_reset_reason is None
            assert devices[0].stats()["pairs"][0]["rx"]["packets"] == 120
        finally:
            fa.close()
            fb.close()


def test_ports_added_and_removed_while_running(tmp_path, devices):
    a = Port(devices[2], socket_path=str(tmp_path / "a.sock"), name="a")
    with running(a) as server:
        b = server.add_port(Port(devices[0], socket_path=str(tmp_path / "b.sock"), name="b"))
        wait_for(lambda: b in server.ports)
        fe = VhostUserNetFrontend(name="fb")
        try:
            fe.connect(b.socket_path)
            fe.start()
            echo(fe)
            server.remove_port(b)                 # its connection ends, its socket goes
            assert b not in server.ports and b.handler is None
            assert not os.path.exists(b.socket_path)
            with pytest.raises(OSError):
                fe.stop()
        finally:
            fe.close()
        with Peer(a.socket_path) as p:           # the other port is untouched
            p.get_features()


def test_client_mode_connects_and_reconnects(tmp_path, devices):
    """A client-mode port waits (backing off) for a front-end that is not there yet,
    connects once it listens, and connects again each time the front-end goes away,
    as QEMU with server=on and OVS-DPDK's dpdkvhostuserclient expect."""
    path = str(tmp_path / "qemu.sock")
    port = Port(devices[0], socket_path=path, client=True, name="client")
    with running(port):
        time.sleep(0.3)                               # nobody listens yet: it backs off
        assert port.handler is None and port.connections == 0
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(path)
        listener.listen(1)
        try:
            for round_ in range(3):
                fe = VhostUserNetFrontend(name=f"server-{round_}")
                try:
                    t0 = time.monotonic()
                    fe.accept(listener, timeout=BACKOFF_MAX + 2)
                    assert time.monotonic() - t0 < BACKOFF_MAX + 1
                    fe.start()
                    echo(fe)
                finally:
                    fe.close()                        # the front-end goes away
                wait_for(lambda: port.connections == round_ + 1 and port.handler is None)
        finally:
            listener.close()


def test_client_port_needs_a_path():
    with pytest.raises(ValueError, match="client port connects to a socket_path"):
        Port(DummyDevice(), fd=0, client=True)
