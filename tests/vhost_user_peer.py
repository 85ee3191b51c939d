"""A tiny raw vhost-user front-end for the back-end's tests.

It speaks the wire format directly (the structs of :mod:`pyvirtio.vhost_user.messages`,
``socket.send_fds``), so a test can send anything: well-formed sequences, messages cut
short, wrong fd counts, bodies of the wrong size. Guest memory is a ``memfd``
(:class:`GuestRam`) whose ``userspace_addr`` is this process's mapping.

* :class:`Peer` — one connection: ``send`` / ``recv`` messages, ``ask`` (a request with
  a reply), ``call`` (a request with ``need_reply``, returning the ack), and the
  requests of the protocol as small methods.
* :func:`start_net` — QEMU's start sequence for N queue pairs, rings laid out by a
  :class:`pyvirtio.net.driver.NetDriver` over the memfd, an eventfd per kick and call;
  returns the driver, ready to send and receive.
* :func:`serving` — a back-end with its server in a thread (context manager).
"""

from __future__ import annotations

import gc
import logging
import mmap
import os
import re
import select
import socket
import struct
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np

import vqcore
from pyvirtio.backends.loopback import Loopback
from pyvirtio.backends.sink import Sink
from pyvirtio.net.driver import NetDriver
from pyvirtio.status import DeviceStatus
from pyvirtio.net.vhost_user import VHOST_USER_NET_FEATURES, VhostUserNetDevice
from pyvirtio.vhost_user.device import VhostUserDevice
from pyvirtio.vhost_user.handler import VhostUserHandler
from pyvirtio.vhost_user.connection import Connection
from pyvirtio.vhost_user.messages import (F_PROTOCOL_FEATURES, FLAG_NEED_REPLY, HEADER,
                                          VERSION, VRING_NOFD_MASK, ConfigSpace, MemRegion,
                                          MemTable, Message, ProtocolFeature, Request,
                                          SingleMemRegion, U64, VringAddr, VringState,
                                          encode_vring_base)
from pyvirtio.vhost_user.server import Port, VhostUserServer

#: seconds a new ``pyvirtio net`` process may take to start: importing vqcore from an
#: editable install rebuilds it first, which takes minutes on a busy 2-core machine
STARTUP = 300
#: guest-physical base of test memory: neither 0 nor the mapping's own address
GPA_BASE = 1 << 32
#: what GET_FEATURES answers from a net back-end with its default features
NET_OFFERED = int(VHOST_USER_NET_FEATURES) | F_PROTOCOL_FEATURES
#: the protocol features the tests' front-end asks for
ALL_PROTOCOL = int(ProtocolFeature.MQ | ProtocolFeature.REPLY_ACK | ProtocolFeature.CONFIG
                   | ProtocolFeature.NET_MTU | ProtocolFeature.RARP
                   | ProtocolFeature.CONFIGURE_MEM_SLOTS | ProtocolFeature.STATUS
                   | ProtocolFeature.RESET_DEVICE)


class Nack(AssertionError):
    """The back-end answered a request with a non-zero ack."""


# ---------------------------------------------------------------------------------------
# guest memory

class GuestRam:
    """A memfd of ``size`` bytes mapped here, guest-physical at ``gpa``; its
    ``userspace_addr`` (:attr:`uva`) is this mapping's address."""

    def __init__(self, size: int = 8 << 20, *, gpa: int = GPA_BASE, name: str = "test-ram"
                 ) -> None:
        self.size = size
        self.gpa = gpa
        self.name = name
        self.fd = os.memfd_create(name, os.MFD_CLOEXEC)
        os.ftruncate(self.fd, size)
        self._mm = mmap.mmap(self.fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.array = np.frombuffer(self._mm, np.uint8)
        self.uva = int(self.array.ctypes.data)
        self.memory = vqcore.GuestMemory()
        self.memory.add_region(gpa, self.array, uva=self.uva)

    def region(self) -> MemRegion:
        """This memory as a vhost-user region."""
        return MemRegion(self.gpa, self.size, self.uva, 0)

    def uva_of(self, gpa: int) -> int:
        """The user address of guest-physical ``gpa``."""
        assert self.gpa <= gpa < self.gpa + self.size
        return self.uva + gpa - self.gpa

    def close(self) -> None:
        """Unmap (every queue over :attr:`memory` must be gone) and close the memfd."""
        if self.fd < 0:
            return
        gc.collect()
        try:
            self.memory.close()
            self.array = None
            self._mm.close()
        except (vqcore.MemoryRegionError, BufferError):
            pass                      # a queue still holds it: the mapping goes with it
        os.close(self.fd)
        self.fd = -1


# ---------------------------------------------------------------------------------------
# the connection

class Peer:
    """A raw front-end connection to a back-end socket."""

    def __init__(self, path: str | socket.socket, timeout: float = 5.0) -> None:
        if isinstance(path, socket.socket):
            self.sock = path                  # an already connected socket
            self.sock.settimeout(timeout)
        else:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(timeout)
            deadline = time.monotonic() + timeout
            while True:
                try:
                    self.sock.connect(path)
                    break
                except BlockingIOError:       # the listen backlog is full: wait a bit
                    if time.monotonic() > deadline:
                        self.sock.close()
                        raise
                    time.sleep(0.001)
        self.timeout = timeout
        self.conn = Connection(self.sock, message_timeout=timeout)
        self.reply_ack = False

    # -- raw ---------------------------------------------------------------------------
    def send_raw(self, data: bytes, fds: Sequence[int] = ()) -> None:
        """Bytes as they are, with ``fds`` riding on the first byte."""
        if fds:
            sent = socket.send_fds(self.sock, [data], list(fds))
            if sent < len(data):
                self.sock.sendall(data[sent:])
        else:
            self.sock.sendall(data)

    def send(self, request: int, body: bytes = b"", fds: Sequence[int] = (), *,
             need_reply: bool = False, flags: int = VERSION, size: int | None = None
             ) -> None:
        """One message (``size`` overrides the header's size field)."""
        flags |= FLAG_NEED_REPLY if need_reply else 0
        header = HEADER.pack(int(request), flags, len(body) if size is None else size)
        self.send_raw(header + bytes(body), fds)

    def recv(self, timeout: float | None = None) -> Message:
        """The next message from the back-end."""
        return self.conn.recv(self.timeout if timeout is None else timeout)

    def closed_by_peer(self, timeout: float = 5.0) -> bool:
        """Whether the back-end closes the connection within ``timeout`` (anything it
        sends meanwhile is skipped)."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            if not select.select([self.sock], [], [], left)[0]:
                return False
            try:
                data = self.sock.recv(4096)
            except ConnectionResetError:
                return True
            if not data:
                return True

    # -- requests ------------------------------------------------------------------------
    def ask(self, request: Request, body: bytes = b"", fds: Sequence[int] = ()) -> Message:
        """A request with a reply of its own; returns the reply (checked)."""
        self.send(request, body, fds)
        reply = self.recv()
        assert reply.is_reply and reply.request == request, reply
        return reply

    def call(self, request: Request, body: bytes = b"", fds: Sequence[int] = (), *,
             check: bool = True) -> int:
        """A request without a reply of its own. With REPLY_ACK it carries need_reply
        and the ack is returned (``check``: raise :class:`Nack` if non-zero)."""
        self.send(request, body, fds, need_reply=self.reply_ack)
        if not self.reply_ack:
            return 0
        reply = self.recv()
        assert reply.is_reply and reply.request == request, reply
        ack = U64.unpack(reply.body).value
        if check and ack:
            raise Nack(f"{request.name} refused ({ack})")
        return ack

    def get_u64(self, request: Request) -> int:
        return U64.unpack(self.ask(request).body).value

    def get_features(self) -> int:
        return self.get_u64(Request.GET_FEATURES)

    def set_features(self, features: int, **kw) -> int:
        return self.call(Request.SET_FEATURES, U64(features).pack(), **kw)

    def negotiate_protocol(self, features: int = ALL_PROTOCOL) -> int:
        """GET/SET_PROTOCOL_FEATURES (offered ∩ ``features``); returns the result."""
        offered = self.get_u64(Request.GET_PROTOCOL_FEATURES)
        pf = offered & features
        self.send(Request.SET_PROTOCOL_FEATURES, U64(pf).pack())
        self.reply_ack = bool(pf & ProtocolFeature.REPLY_ACK)
        return pf

    def set_mem_table(self, rams: Sequence[GuestRam], **kw) -> int:
        table = MemTable([r.region() for r in rams])
        return self.call(Request.SET_MEM_TABLE, table.pack(), [r.fd for r in rams], **kw)

    def add_mem_reg(self, region: MemRegion, fd: int, **kw) -> int:
        return self.call(Request.ADD_MEM_REG, SingleMemRegion(region).pack(), [fd], **kw)

    def rem_mem_reg(self, region: MemRegion, fds: Sequence[int] = (), **kw) -> int:
        return self.call(Request.REM_MEM_REG, SingleMemRegion(region).pack(), fds, **kw)

    def vring_num(self, index: int, num: int, **kw) -> int:
        return self.call(Request.SET_VRING_NUM, VringState(index, num).pack(), **kw)

    def vring_base(self, index: int, base: int, **kw) -> int:
        return self.call(Request.SET_VRING_BASE, VringState(index, base).pack(), **kw)

    def vring_addr(self, index: int, desc: int, avail: int, used: int, flags: int = 0,
                   **kw) -> int:
        body = VringAddr(index, flags, desc, used, avail, 0).pack()
        return self.call(Request.SET_VRING_ADDR, body, **kw)

    def vring_fd(self, request: Request, index: int, fd: int | None, **kw) -> int:
        """SET_VRING_KICK/CALL/ERR: ``fd`` None sends the no-fd flag."""
        value = index | (VRING_NOFD_MASK if fd is None else 0)
        return self.call(request, U64(value).pack(), [] if fd is None else [fd], **kw)

    def vring_enable(self, index: int, on: bool, **kw) -> int:
        return self.call(Request.SET_VRING_ENABLE, VringState(index, int(on)).pack(), **kw)

    def get_vring_base(self, index: int) -> int:
        reply = self.ask(Request.GET_VRING_BASE, VringState(index, 0).pack())
        state = VringState.unpack(reply.body)
        assert state.index == index
        return state.num

    def get_config(self, offset: int, size: int) -> ConfigSpace:
        reply = self.ask(Request.GET_CONFIG, ConfigSpace(offset, size, 0, bytes(size)).pack())
        return ConfigSpace.unpack(reply.body)

    def drain_replies(self) -> int:
        """Read and drop whatever the back-end sent so far; returns the bytes read (0
        also when the back-end closed the connection)."""
        got = 0
        while select.select([self.sock], [], [], 0)[0]:
            try:
                data = self.sock.recv(65536)
            except OSError:
                return got
            if not data:
                return got
            got += len(data)
        return got

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> "Peer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------------------------------
# QEMU's start sequence with a NetDriver over the memfd

@dataclass
class Guest:
    """A started front-end: the driver over the shared memory and its eventfds."""
    peer: Peer
    ram: GuestRam
    driver: NetDriver
    features: int

    @property
    def packed(self) -> bool:
        return bool(self.features & vqcore.VIRTIO_F_RING_PACKED)

    def addresses(self, index: int) -> tuple[int, int, int]:
        """User addresses (desc, avail, used) of ring ``index`` (packed: desc, driver
        event area, device event area, as SET_VRING_ADDR carries them)."""
        desc, drv, dev = self.driver.ring_addresses(index)[:3]
        return self.ram.uva_of(desc), self.ram.uva_of(drv), self.ram.uva_of(dev)

    def base(self, chains: int, index: int = 0) -> int:
        """What GET_VRING_BASE answers for ring ``index`` after ``chains`` chains of one
        descriptor each went through it with none in flight (see :func:`ring_base`)."""
        return ring_base(self.packed, self.driver._queue(index).queue.size, chains)

    def fresh_base(self, index: int) -> int:
        """SET_VRING_BASE of ring ``index`` as its driver queue stands (a fresh ring:
        0 split, 0x80008000 packed, as QEMU sends it)."""
        q = self.driver._queue(index).queue
        return encode_vring_base(q.next_avail, q.last_used, packed=self.packed)

    def setup_ring(self, index: int, *, base: int | None = None, kick: bool = True,
                   poll: bool = False) -> None:
        """SET_VRING_NUM/BASE/ADDR/CALL and (``kick``) SET_VRING_KICK for ring
        ``index`` (``poll``: the no-fd flag instead of the kick eventfd; ``base``:
        default :meth:`fresh_base`)."""
        p = self.peer
        dq = self.driver._queue(index)
        p.vring_num(index, dq.queue.size)
        p.vring_base(index, self.fresh_base(index) if base is None else base)
        p.vring_addr(index, *self.addresses(index))
        p.vring_fd(Request.SET_VRING_CALL, index, dq.call_fd)
        if kick:
            p.vring_fd(Request.SET_VRING_KICK, index, None if poll else dq.kick_fd)

    def enable(self, on: bool = True, indices: Sequence[int] | None = None) -> None:
        for i in (range(2 * self.driver.pairs) if indices is None else indices):
            self.peer.vring_enable(i, on)

    def stop(self) -> dict[int, int]:
        """QEMU's stop: SET_VRING_ENABLE(0), GET_VRING_BASE per ring."""
        self.enable(False)
        return {i: self.peer.get_vring_base(i) for i in range(2 * self.driver.pairs)}

    def close(self) -> None:
        """Close the eventfds and drop the driver (the memory stays)."""
        for dq in self.driver.all_queues():
            for fd in (dq.kick_fd, dq.call_fd):
                if fd >= 0:
                    os.close(fd)
            dq.kick_fd = dq.call_fd = -1
        self.driver = None        # type: ignore[assignment]
        gc.collect()


def ring_features(offered: int, packed: bool) -> int:
    """``offered`` with VIRTIO_F_RING_PACKED only when ``packed``."""
    offered &= ~vqcore.VIRTIO_F_RING_PACKED
    return offered | (vqcore.VIRTIO_F_RING_PACKED if packed else 0)


def ring_base(packed: bool, size: int, chains: int) -> int:
    """SET/GET_VRING_BASE's value for a ring of ``size`` that ``chains`` one-descriptor
    chains went through, none in flight: split, the 16-bit index; packed, the slot and
    wrap counter (1 at the start, flipped each lap) in bits 0-15 and, the same, in
    bits 16-31."""
    if not packed:
        return chains & 0xFFFF
    laps, slot = divmod(chains, size)
    pos = slot | (1 ^ (laps & 1)) << 15
    return pos | pos << 16


def new_driver(ram: GuestRam, features: int, *, pairs: int = 1, queue_size: int = 256,
               base_offset: int = 0) -> NetDriver:
    """A NetDriver laid out in ``ram`` (from ``base_offset``) with fresh eventfds."""
    driver = NetDriver(ram.memory, pairs=pairs, queue_size=queue_size, ctrl=False,
                       base=ram.gpa + base_offset, size=ram.size - base_offset,
                       tx_buffer=2048)
    driver.setup(features)
    for dq in driver.all_queues():
        dq.kick_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        dq.call_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    return driver


def start_net(peer: Peer, ram: GuestRam, *, pairs: int = 1, queue_size: int = 256,
              features: int | None = None, protocol: int = ALL_PROTOCOL,
              enable: bool = True, post_rx: bool = True, memory: str = "table",
              packed: bool = False) -> Guest:
    """QEMU's sequence: features, protocol features, owner, features set, memory
    (``memory``: "table" for SET_MEM_TABLE, "add" for ADD_MEM_REG), per ring
    NUM/BASE/ADDR/CALL/KICK, then SET_VRING_ENABLE(1) (``enable``) and RX buffers
    posted (``post_rx``). ``features`` default: all the back-end offers, with
    VIRTIO_F_RING_PACKED only when ``packed`` (QEMU's packed=on)."""
    offered = peer.get_features()
    want = (ring_features(offered, packed) if features is None else features) & offered
    if want & F_PROTOCOL_FEATURES:
        peer.negotiate_protocol(protocol)
    peer.call(Request.SET_OWNER)
    peer.set_features(want)
    if memory == "table":
        peer.set_mem_table([ram])
    elif memory == "add":
        peer.add_mem_reg(ram.region(), ram.fd)
    driver = new_driver(ram, want, pairs=pairs, queue_size=queue_size)
    guest = Guest(peer, ram, driver, want)
    for i in range(2 * pairs):
        guest.setup_ring(i)
    if enable and want & F_PROTOCOL_FEATURES:
        guest.enable(True)
    if post_rx:
        for p in range(pairs):
            driver.post_rx(p)
    return guest


def split_ring(ram: GuestRam, index: int, size: int = 256) -> vqcore.SplitAddresses:
    """Where ring ``index`` of ``size`` lives in ``ram`` (one 64 KiB slot a ring)."""
    return vqcore.split_addresses(ram.gpa + (index + 1) * 0x10000, size)


def start_rings(peer: Peer, ram: GuestRam, size: int = 256) -> list[int]:
    """Any device: SET_MEM_TABLE, then every ring (as many as GET_QUEUE_NUM's answer
    allows, at most 2: a net back-end answers queue pairs) set up as a split ring in
    ``ram`` (:func:`split_ring`) with a call eventfd and a kick eventfd, enabled.
    Returns the kick eventfds (the caller's to close)."""
    offered = peer.get_features()
    peer.negotiate_protocol()
    peer.set_features(ring_features(offered, False))
    peer.set_mem_table([ram])
    rings = min(2, peer.get_u64(Request.GET_QUEUE_NUM) * 2)
    kicks = []
    for index in range(rings):
        ring = split_ring(ram, index, size)
        peer.vring_num(index, size, check=False)
        if peer.vring_addr(index, ram.uva_of(ring.desc), ram.uva_of(ring.avail),
                           ram.uva_of(ring.used), check=False):
            continue                                     # no such ring
        call, kick = os.eventfd(0, os.EFD_NONBLOCK), os.eventfd(0, os.EFD_NONBLOCK)
        peer.vring_fd(Request.SET_VRING_CALL, index, call)
        os.close(call)
        peer.vring_fd(Request.SET_VRING_KICK, index, kick)
        peer.vring_enable(index, True)
        kicks.append(kick)
    return kicks


def wait_for(predicate: Callable[[], bool], timeout: float = 5.0, what: str = "") -> None:
    """Poll ``predicate`` until it holds; AssertionError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or predicate}")
        time.sleep(0.005)


def recv_frames(driver: NetDriver, pair: int, count: int, timeout: float = 5.0
                ) -> list[bytes]:
    """``count`` frames from ``pair`` (fewer if they do not come within ``timeout``)."""
    out: list[bytes] = []
    deadline = time.monotonic() + timeout
    while len(out) < count:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        out += [f for _, f in driver.recv(pair, timeout=min(left, 0.2))]
    return out


def frame(i: int, size: int = 64, src: bytes = b"\x02\x00\x00\x00\x00\x01") -> bytes:
    """A test Ethernet frame carrying its sequence number ``i`` (experimental type)."""
    head = b"\xff" * 6 + src + b"\x88\xb5" + struct.pack("<I", i)
    return head + bytes((i + k) & 0xFF for k in range(size - len(head)))


# ---------------------------------------------------------------------------------------
# a back-end in a thread

#: the devices the generic tests run against (the handler with each)
DEVICE_KINDS = ("net", "dummy", "rng")


def make_device(kind: str | object, queues: int = 1, **kwargs) -> tuple[VhostUserDevice, object]:
    """(device, what else to close) for ``kind``: "sink" (or "net") and "loopback" (a
    net device over that packet end), a packet backend object (net over it), "dummy"
    (:class:`vhost_user_dummy.DummyDevice`, 2 rings unless ``queues`` says), "rng"."""
    if kind == "dummy":
        from vhost_user_dummy import DummyDevice
        return DummyDevice(max(queues, 2) if queues == 1 else queues), None
    if kind == "rng":
        from pyvirtio.rng.vhost_user import VhostUserRngDevice
        return VhostUserRngDevice(**kwargs), None
    if kind in ("sink", "net"):
        packet: object = Sink(queues)
    elif kind == "loopback":
        packet = Loopback(queues)
    else:
        packet = kind
    return VhostUserNetDevice(packet, queues=queues, **kwargs), packet


@dataclass
class Serving:
    """A port served in a thread: its device, the server and the current handler."""
    path: str
    device: VhostUserDevice
    server: VhostUserServer
    packet: object

    @property
    def port(self) -> Port:
        return self.server.port

    @property
    def handler(self) -> VhostUserHandler:
        """The handler of the connection being served (AssertionError when none)."""
        h = self.port.handler
        assert h is not None, "no front-end connected"
        return h

    @property
    def offered(self) -> int:
        """What GET_FEATURES answers."""
        return int(self.device.features()) | F_PROTOCOL_FEATURES

    @property
    def num_queues(self) -> int:
        return self.device.num_queues

    def connect(self, timeout: float = 5.0) -> Peer:
        return Peer(self.path, timeout)


@contextmanager
def serving(tmp_path, packet: str | object = "sink", *, queues: int = 1,
            message_timeout: float = 1.0, **kwargs) -> Iterator[Serving]:
    """A device (:func:`make_device`: ``packet`` is "sink", "loopback", a packet
    backend, or "dummy") with its server in a thread on ``tmp_path/vhost.sock``."""
    device, packet = make_device(packet, queues, **kwargs)
    path = str(tmp_path / "vhost.sock")
    server = VhostUserServer(device, socket_path=path, message_timeout=message_timeout)
    thread = threading.Thread(target=server.serve_forever, name="vhost-server", daemon=True)
    thread.start()
    try:
        yield Serving(path, device, server, packet)
    finally:
        server.shutdown()
        thread.join(10)
        assert not thread.is_alive(), "the server did not stop"
        server.close()
        device.close()
        if isinstance(packet, (Sink, Loopback)):
            packet.close()


# ---------------------------------------------------------------------------------------
# a back-end process

def _listening(path: str) -> bool:
    """Whether a server accepts connections on ``path`` (the file appears at bind(),
    a moment before listen())."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
        return True
    except OSError:
        return False
    finally:
        probe.close()


def thread_states(pid: int) -> list[str]:
    """What each thread of ``pid`` waits in (its kernel wchan), for a failure message."""
    out = []
    for tid in sorted(os.listdir(f"/proc/{pid}/task")):
        try:
            with open(f"/proc/{pid}/task/{tid}/wchan") as f:
                out.append(f"{tid}:{f.read() or 'running'}")
        except OSError:
            pass
    return out


def process_counts(pid: int) -> tuple[int, int, int]:
    """(open fds, file mappings, threads) of process ``pid``. The mappings counted are
    those of files (guest memory is a memfd or a file): anonymous ones come and go with
    the allocators (pymalloc arenas, glibc's per-thread arenas and its cache of thread
    stacks) whatever the back-end does."""
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    with open(f"/proc/{pid}/maps") as f:
        maps = sum(1 for line in f if len(line.split(maxsplit=5)) == 6
                   and not line.split(maxsplit=5)[5].startswith("["))
    threads = len(os.listdir(f"/proc/{pid}/task"))
    return fds, maps, threads


class BackendProcess:
    """A ``pyvirtio net --socket-path DIR/net.sock ARGS...`` process (context manager).

    :meth:`check_clean` is what every hostile-session test asserts after a session:
    a fresh connection is answered within ``answer_within`` seconds, the process's fd,
    mapping and thread counts equal :attr:`baseline` (taken after a warm-up), and the
    log got no traceback and the expected number of warnings."""

    def __init__(self, tmp_path, *args: str, kind: str = "net",
                 answer_within: float = 0.100) -> None:
        self.kind = kind
        self.path = str(tmp_path / f"{kind}.sock")
        self.log_path = tmp_path / f"{kind}.log"
        common = ["--socket-path", self.path, "--message-timeout", "2", *args]
        if kind == "dummy":
            here = os.path.dirname(os.path.abspath(__file__))
            self.args = [sys.executable, os.path.join(here, "vhost_user_dummy.py"), *common]
        else:
            self.args = [sys.executable, "-m", "pyvirtio", kind, *common]
        self.answer_within = answer_within
        self.proc: subprocess.Popen | None = None
        self.baseline: tuple[int, int, int] | None = None
        self._log_seen = 0

    def __enter__(self) -> "BackendProcess":
        with open(self.log_path, "wb") as logf:
            self.proc = subprocess.Popen(self.args, stdout=logf, stderr=logf)
        try:
            wait_for(lambda: _listening(self.path) or self.proc.poll() is not None,
                     STARTUP, "the socket")
            assert self.proc.poll() is None, self.log_text()
            for _ in range(3):                # warm up: imports, first connection
                self.answer_time()
            self.warm_up()
            self.baseline = self._probe()[1]
            self._log_seen = len(self.log_text())
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)

    def warm_up(self) -> None:
        """Sessions that start a worker on every ring and kick them: the C library
        caches what threads leave behind (their stacks, malloc arenas), so the first
        ones add mappings that stay."""
        ram = GuestRam(4 << 20, name="vu-warm-up")
        try:
            for _ in range(2):
                with Peer(self.path) as p:
                    kicks = start_rings(p, ram)
                    for k in kicks:
                        os.eventfd_write(k, 1)
                    p.get_features()
                    for k in kicks:
                        os.close(k)
        finally:
            ram.close()

    @property
    def offered(self) -> int:
        """What GET_FEATURES answers (the answer of the first connection)."""
        return self._offered

    def answer_time(self) -> float:
        """Seconds from connect() to the answer of GET_FEATURES."""
        t0 = time.monotonic()
        with Peer(self.path) as p:
            self._offered = p.get_features()
            return time.monotonic() - t0

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    @contextmanager
    def session(self, reply_ack: bool = False) -> Iterator[Peer]:
        """A connection (with REPLY_ACK negotiated when ``reply_ack``)."""
        p = Peer(self.path)
        try:
            if reply_ack:
                p.get_features()
                p.negotiate_protocol()
            yield p
        finally:
            p.close()

    def _probe(self, expect: tuple[int, int, int] | None = None
               ) -> tuple[float, tuple[int, int, int]]:
        """The answer time of a fresh connection, and the counts while it is open and
        idle (the server serves one connection at a time: every earlier one is over).
        Counts other than ``expect`` are read again for up to 0.1 s: a worker that was
        joined may still be leaving the kernel (Python threads are detached, join()
        returns before the OS thread is gone)."""
        t0 = time.monotonic()
        with Peer(self.path) as p:
            p.get_features()
            elapsed = time.monotonic() - t0
            counts = process_counts(self.pid)
            for _ in range(20):
                if expect is None or counts == expect:
                    break
                time.sleep(0.005)
                counts = process_counts(self.pid)
            return elapsed, counts

    def check_clean(self, warnings: int | None = 0, where: str = "") -> float:
        """Assert the state after a session (see the class); returns the answer time.
        ``warnings``: WARNING/ERROR lines the session must have logged (None: any)."""
        elapsed, counts = self._probe(self.baseline)
        text = self.log_text()
        new, self._log_seen = text[self._log_seen:], len(text)
        at = f" ({where})" if where else ""
        assert self.proc is not None and self.proc.poll() is None, f"back-end exited{at}:\n{new}"
        assert "Traceback" not in new, f"traceback{at}:\n{new}"
        assert counts == self.baseline, (f"(fds, maps, threads) {counts}, before "
                                         f"{self.baseline}{at}; threads "
                                         f"{thread_states(self.pid)}\n{new[-3000:]}")
        assert elapsed < self.answer_within, (f"a fresh connection waited "
                                              f"{elapsed * 1e3:.0f} ms{at}")
        if warnings is not None:
            lines = re.findall(r" (?:WARNING|ERROR) (.*)", new)
            assert len(lines) == warnings, lines
        return elapsed


def status_bits(*names: str) -> int:
    """``DeviceStatus`` bits by name."""
    value = 0
    for n in names:
        value |= DeviceStatus[n]
    return int(value)


log = logging.getLogger("tests.vhost_user_peer")
