"""The vhost-user front-end (:mod:`pyvirtio.net.frontend`) and the zero-copy
forwarder (:mod:`pyvirtio.net.forwarder`).

Two kinds of peer:

* a scripted fake back-end (:class:`FakeBackend`: a thread reading the front-end's
  messages with :class:`~pyvirtio.vhost_user.connection.Connection` over a socketpair)
  checks the exact message sequences, flags, fds and bodies, and how the front-end takes
  a NACK, a hang-up, a wrong reply, a silence;
* the real back-end, ``python -m pyvirtio net`` in a subprocess on a Unix socket
  (:func:`backend`), with ``--loopback`` (every TX frame comes back as RX), ``--tap``
  in a network namespace the test creates, and two of them joined by the forwarder.

Frames carry a sequence number and a payload derived from it; every received frame is
compared, byte for byte, with what its sequence number says it must be — per batch,
with numpy — and the sequence numbers must arrive exactly once, in order.

Covered against the real back-end: negotiation (features, protocol features, config
space, status, NACK), narrower feature sets and ADD_MEM_REG, 1,000,000 frames each way,
4 queue pairs, merged RX buffers, a TAP in a namespace, resuming on a fresh back-end
process (SET_VRING_BASE), guest reboots, a broken ring reported on its error fd, fds
after 20 sessions; the forwarder: zero copy (the addresses posted on B are A's RX
buffers), merged frames as multi-segment chains, both ways between two TAPs, TCP with
GSO frames crossing whole.
"""

from __future__ import annotations

import hashlib
import os
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import pytest

import nettools as nt
from pyvirtio.features import NetFeature as N, Transport as T
from pyvirtio.net.header import HDR_LEN
from pyvirtio.netns import socket_in
from pyvirtio.status import DeviceStatus as S
from pyvirtio.vhost_user.connection import Connection, PeerClosed, close_fds
from pyvirtio.net.forwarder import Forwarder, ForwarderError
from pyvirtio.net.frontend import (DEFAULT_FEATURES, BackendClosed, BackendNack,
                                          BackendTimeout, FrontendError, RxFrames,
                                          VhostUserNetFrontend)
from pyvirtio.vhost_user.memfd import SharedGuestMemory
from pyvirtio.vhost_user.messages import (F_PROTOCOL_FEATURES, FLAG_NEED_REPLY, ConfigSpace,
                                          MemTable, Message, ProtocolFeature as PF,
                                          Request as R, U64, VringAddr, VringState)
from vhost_user_peer import ring_base

ETH_P_EXPERIMENTAL = 0x88B5
DST_MAC = bytes.fromhex("02aabbccdd02")
SRC_MAC = bytes.fromhex("525400123456")
#: frame lengths used in turn, CHUNK frames each (so every sequence number has one length)
LENGTHS = (60, 128, 514, 1514)
CHUNK = 64
#: a stalled exchange fails after this many seconds without a frame (never a timing check)
STALL = 15.0
#: how long a back-end process may take to listen
BACKEND_START = 120.0


# ---------------------------------------------------------------------------------------
# frames

def frame_length(seq: np.ndarray | int, lengths: Sequence[int] = LENGTHS) -> np.ndarray:
    """The length of frame ``seq``: LENGTHS in turn, CHUNK frames each."""
    return np.asarray(lengths)[(np.asarray(seq) // CHUNK) % len(lengths)]


def make_frames(seq0: int, n: int, length: int, tag: int = 0) -> np.ndarray:
    """``n`` frames of ``length`` bytes, sequence numbers ``seq0..``: Ethernet header
    (EtherType 0x88B5), the u64 sequence number, the tag, then a payload that is a
    function of both."""
    seq = np.arange(seq0, seq0 + n, dtype=np.uint64)
    return _pattern(seq, np.full(n, length), length, tag)


def _pattern(seq: np.ndarray, lengths: np.ndarray, width: int, tag: int) -> np.ndarray:
    j = np.arange(width, dtype=np.uint64)
    data = ((seq[:, None] * np.uint64(131) + j[None, :] * np.uint64(7) + np.uint64(tag))
            & np.uint64(0xFF)).astype(np.uint8)
    data[:, 0:6] = np.frombuffer(DST_MAC, np.uint8)
    data[:, 6:12] = np.frombuffer(SRC_MAC, np.uint8)
    data[:, 12:14] = (ETH_P_EXPERIMENTAL >> 8, ETH_P_EXPERIMENTAL & 0xFF)
    data[:, 14:22] = seq.astype("<u8").view(np.uint8).reshape(len(seq), 8)
    data[:, 22] = tag
    data[j[None, :] >= lengths[:, None].astype(np.uint64)] = 0
    return data


def frame_seqs(data: np.ndarray) -> np.ndarray:
    """The sequence numbers of frames (rows) built by :func:`make_frames`."""
    return np.ascontiguousarray(data[:, 14:22]).view("<u8").ravel()


def check_frames(rx: RxFrames, seq0: int, tag: int = 0,
                 lengths: Sequence[int] = LENGTHS) -> None:
    """``rx`` holds exactly frames ``seq0, seq0+1, ...`` with the right bytes."""
    n = len(rx)
    expect_seq = np.arange(seq0, seq0 + n, dtype=np.uint64)
    got_seq = frame_seqs(rx.data)
    if not np.array_equal(got_seq, expect_seq):
        bad = int(np.nonzero(got_seq != expect_seq)[0][0])
        raise AssertionError(f"frame {bad} of the batch has sequence number {got_seq[bad]}, "
                             f"expected {expect_seq[bad]} (lost, repeated or reordered)")
    want_len = frame_length(expect_seq, lengths)
    assert np.array_equal(rx.lengths, want_len), "frame lengths differ"
    expect = _pattern(expect_seq, want_len, rx.data.shape[1], tag)
    rows = np.nonzero((rx.data != expect).any(axis=1))[0]
    assert len(rows) == 0, f"frame {expect_seq[rows[0]]} has other bytes than were sent"


class Pump:
    """Moves ``count`` frames through ``pair`` of a front-end whose back-end loops them
    back, ``window`` at most in flight, checking every frame received."""

    def __init__(self, fe: VhostUserNetFrontend, pair: int, count: int, *, seq0: int = 0,
                 tag: int = 0, window: int = 192, lengths: Sequence[int] = LENGTHS,
                 check_headers: bool = True) -> None:
        self.fe, self.pair, self.count = fe, pair, count
        self.seq0, self.tag, self.window, self.lengths = seq0, tag, window, lengths
        self.check_headers = check_headers
        self.sent = self.received = 0

    @property
    def done(self) -> bool:
        return self.received >= self.count

    def send(self) -> int:
        room = min(self.window - (self.sent - self.received), self.count - self.sent)
        if room <= 0:
            return 0
        seq = self.seq0 + self.sent
        room = min(room, CHUNK - seq % CHUNK)
        n = self.fe.send_array(self.pair, make_frames(seq, room, int(frame_length(
            seq, self.lengths)), self.tag))
        self.sent += n
        return n

    def step(self, timeout: float = 0.0) -> int:
        """Send what the window allows, take what arrived; returns frames received."""
        self.send()
        rx = self.fe.recv_array(self.pair, timeout)
        if len(rx):
            assert self.received + len(rx) <= self.count, "more frames than were sent"
            check_frames(rx, self.seq0 + self.received, self.tag, self.lengths)
            if self.check_headers:
                check_rx_headers(rx, self.fe.features)
            self.received += len(rx)
        return len(rx)


def check_rx_headers(rx: RxFrames, features: int) -> None:
    """Loopback headers: sent as zeros, so zeros but num_buffers (1 with MRG_RXBUF)."""
    assert not rx.headers[:, :10].any(), "the header came back changed"
    nb = rx.headers[:, 10].astype(int) | (rx.headers[:, 11].astype(int) << 8)
    if features & N.MRG_RXBUF:
        assert np.array_equal(nb, rx.buffers), "num_buffers differs from the buffers used"


def run_pumps(pumps: Sequence[Pump]) -> None:
    """Run every pump to the end; fails when nothing arrives for STALL seconds."""
    last = time.monotonic()
    single = len(pumps) == 1
    idle = False
    while not all(p.done for p in pumps):
        got = 0
        for p in pumps:
            if not p.done:
                got += p.step(0.2 if single else (0.002 if idle else 0.0))
        idle = not got
        if got:
            last = time.monotonic()
        elif time.monotonic() - last > STALL:
            state = ", ".join(f"pair {p.pair}: sent {p.sent} received {p.received}"
                              for p in pumps)
            raise AssertionError(f"no frame for {STALL} s ({state})")


# ---------------------------------------------------------------------------------------
# the real back-end

@dataclass
class Backend:
    """A ``pyvirtio net`` process."""
    proc: subprocess.Popen
    path: str
    log: str

    def output(self) -> str:
        with open(self.log) as f:
            return f.read()


@pytest.fixture
def sockdir() -> Iterator[str]:
    """A short directory for sockets (a Unix socket path has at most 107 bytes)."""
    d = tempfile.mkdtemp(prefix="vufe")
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@contextmanager
def backend(sockdir: str, *args: str, name: str = "be") -> Iterator[Backend]:
    """``python -m pyvirtio net --socket-path <sockdir>/<name>.sock <args>``, ended with
    SIGTERM (and checked to exit cleanly)."""
    path = os.path.join(sockdir, f"{name}.sock")
    log = os.path.join(sockdir, f"{name}.log")
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "pyvirtio", "net", "--socket-path",
                                 path, *args], stdout=out, stderr=subprocess.STDOUT)
    be = Backend(proc, path, log)
    try:
        # generous: an editable install may rebuild vqcore when the process imports it
        deadline = time.monotonic() + BACKEND_START
        while not os.path.exists(path):
            if proc.poll() is not None:
                pytest.fail(f"pyvirtio net exited with {proc.returncode}:\n{be.output()}")
            if time.monotonic() > deadline:
                pytest.fail(f"pyvirtio net did not listen within {BACKEND_START} s:\n"
                            f"{be.output()}")
            time.sleep(0.02)
        yield be
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                pytest.fail(f"pyvirtio net ignored SIGTERM:\n{be.output()}")
        assert proc.returncode == 0, f"pyvirtio net exited with {proc.returncode}:\n{be.output()}"


def ring_kwargs(ring_kind: str) -> dict:
    """VhostUserNetFrontend arguments for ``ring_kind``: packed asks for
    VIRTIO_F_RING_PACKED on top of the defaults, split takes the defaults."""
    if ring_kind == "packed":
        return {"features": int(DEFAULT_FEATURES | T.RING_PACKED)}
    return {}


def bases_after(fe: VhostUserNetFrontend, chains: int, rings: Sequence[int] = (0, 1)
                ) -> dict[int, int]:
    """GET_VRING_BASE of ``rings`` after ``chains`` one-descriptor chains each, none in
    flight (split: the index; packed: slot and wrap counter, avail and used halves)."""
    packed = bool(fe.features & T.RING_PACKED)
    return {i: ring_base(packed, fe.queue_size, chains) for i in rings}


@contextmanager
def frontend(be: Backend, **kwargs) -> Iterator[VhostUserNetFrontend]:
    """A started front-end on ``be``."""
    fe = VhostUserNetFrontend(**kwargs)
    try:
        fe.connect(be.path, timeout=30)
        fe.start()
        yield fe
    finally:
        fe.close()


def open_fds() -> set[int]:
    return {int(x) for x in os.listdir("/proc/self/fd")}


# ---------------------------------------------------------------------------------------
# the fake back-end

ALL_PF = (PF.MQ | PF.REPLY_ACK | PF.CONFIG | PF.NET_MTU | PF.RARP | PF.STATUS
          | PF.RESET_DEVICE | PF.CONFIGURE_MEM_SLOTS)
FULL_FEATURES = int(DEFAULT_FEATURES) | F_PROTOCOL_FEATURES


@dataclass
class Seen:
    """A message the fake back-end received."""
    request: R
    flags: int
    body: bytes
    fds: list[str]          # what each fd was (readlink of /proc/self/fd/N)
    fd_sizes: list[int]

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & FLAG_NEED_REPLY)


class FakeBackend(threading.Thread):
    """A scripted back-end on one end of a socketpair: answers the GET_* requests from
    its settings, ``need_reply`` with 0 (or ``nack``'s code), records everything."""

    def __init__(self, sock: socket.socket, *, features: int = FULL_FEATURES,
                 protocol_features: int = int(ALL_PF), queue_num: int = 1,
                 config: bytes = bytes.fromhex("525400abcdef") + struct.pack("<HHH", 1, 1, 1500),
                 nack: dict[R, int] | None = None, hang_up_on: R | None = None,
                 silent_on: R | None = None, wrong_reply_on: R | None = None,
                 bases: dict[int, int] | None = None) -> None:
        super().__init__(daemon=True)
        self.conn = Connection(sock)
        self.features, self.pf, self.queue_num = features, protocol_features, queue_num
        self.config = config
        self.nack = nack or {}
        self.hang_up_on, self.silent_on, self.wrong_reply_on = hang_up_on, silent_on, wrong_reply_on
        self.bases = bases or {}
        self.status = 0
        self.seen: list[Seen] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while True:
                try:
                    msg = self.conn.recv(timeout=20)
                except (PeerClosed, TimeoutError, OSError):
                    return
                req = R(msg.request)
                links, sizes = [], []
                for fd in msg.fds:
                    links.append(os.readlink(f"/proc/self/fd/{fd}"))
                    sizes.append(os.fstat(fd).st_size)
                close_fds(msg.fds)
                self.seen.append(Seen(req, msg.flags, msg.body, links, sizes))
                if req == self.hang_up_on:
                    return
                if req == self.silent_on:
                    continue
                if req == self.wrong_reply_on:     # a reply to another request
                    self.conn.reply(Message(int(R.GET_STATUS), msg.flags), U64(0).pack())
                    continue
                body = self._answer(req, msg.body)
                if body is not None:
                    self.conn.reply(msg, body)
                elif msg.need_reply:
                    self.conn.reply(msg, U64(self.nack.get(req, 0)).pack())
        except BaseException as exc:
            self.error = exc
        finally:
            self.conn.close()

    def _answer(self, req: R, body: bytes) -> bytes | None:
        if req == R.GET_FEATURES:
            return U64(self.features).pack()
        if req == R.GET_PROTOCOL_FEATURES:
            return U64(self.pf).pack()
        if req == R.GET_QUEUE_NUM:
            return U64(self.queue_num).pack()
        if req == R.GET_MAX_MEM_SLOTS:
            return U64(8).pack()
        if req == R.GET_STATUS:
            return U64(self.status).pack()
        if req == R.SET_STATUS:
            self.status = U64.unpack(body).value
        if req == R.GET_CONFIG:
            c = ConfigSpace.unpack(body)
            return ConfigSpace(c.offset, c.size, c.flags,
                               self.config[c.offset:c.offset + c.size]).pack()
        if req == R.GET_VRING_BASE:
            s = VringState.unpack(body)
            return VringState(s.index, self.bases.get(s.index, 0)).pack()
        return None

    def names(self) -> list[str]:
        return [s.request.name for s in self.seen]

    def of(self, req: R) -> list[Seen]:
        return [s for s in self.seen if s.request == req]


def attached(fe: VhostUserNetFrontend, fake_kwargs: dict | None = None):
    """Context: a FakeBackend with ``fake_kwargs``, ``fe`` negotiated on it."""
    @contextmanager
    def cm() -> Iterator[FakeBackend]:
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        fake = FakeBackend(b, **(fake_kwargs or {}))
        fake.start()
        try:
            fe.attach_socket(a)
            yield fake
        finally:
            fe.close()
            a.close()
            fake.join(10)
            assert fake.error is None, fake.error
    return cm()


RING_SETUP = ["SET_VRING_NUM", "SET_VRING_BASE", "SET_VRING_ADDR", "SET_VRING_CALL",
              "SET_VRING_ERR", "SET_VRING_KICK"]
#: with VHOST_USER_F_PROTOCOL_FEATURES: enabled before the KICK that starts it
RING_SETUP_ENABLE = RING_SETUP[:-1] + ["SET_VRING_ENABLE"] + RING_SETUP[-1:]


# ---------------------------------------------------------------------------------------
# message sequences (fake back-end)

def test_sequence_with_every_protocol_feature():
    """The documented order, every non-GET request with need_reply once REPLY_ACK is
    agreed; with ``disable_before_stop`` the rings are disabled before they stop."""
    fe = VhostUserNetFrontend(pairs=2, queue_size=64, name="seq", disable_before_stop=True)
    with attached(fe, dict(queue_num=2, bases={0: 5, 1: 6, 2: 7, 3: 8})) as fake:
        assert fake.names() == ["GET_FEATURES", "GET_PROTOCOL_FEATURES",
                                "SET_PROTOCOL_FEATURES", "GET_QUEUE_NUM", "SET_OWNER",
                                "GET_CONFIG"]
        n_connect = len(fake.seen)
        fe.start()
        bases = fe.stop()
        assert bases == {0: 5, 1: 6, 2: 7, 3: 8}
        names = fake.names()[n_connect:]
        expect = ["SET_STATUS", "SET_STATUS", "SET_FEATURES", "SET_STATUS", "GET_STATUS",
                  "SET_MEM_TABLE"]
        expect += RING_SETUP_ENABLE * 4 + ["SET_STATUS"]
        expect += ["SET_VRING_ENABLE"] * 4 + ["GET_VRING_BASE"] * 4 + ["SET_STATUS"]
        assert names == expect
        gets = {R.GET_FEATURES, R.GET_PROTOCOL_FEATURES, R.GET_QUEUE_NUM, R.GET_CONFIG,
                R.GET_STATUS, R.GET_VRING_BASE}
        for s in fake.seen:
            if s.request in gets or s.request == R.SET_PROTOCOL_FEATURES:
                assert not s.need_reply, s.request.name
            else:
                assert s.need_reply, s.request.name
        # protocol features: what both sides know, minus CONFIGURE_MEM_SLOTS (not asked)
        pf = U64.unpack(fake.of(R.SET_PROTOCOL_FEATURES)[0].body).value
        assert pf == int(ALL_PF & ~PF.CONFIGURE_MEM_SLOTS)
        assert fe.protocol_features == pf
        # features: all wanted were offered
        assert U64.unpack(fake.of(R.SET_FEATURES)[0].body).value == fe.features == FULL_FEATURES
        statuses = [U64.unpack(s.body).value for s in fake.of(R.SET_STATUS)]
        assert statuses == [S.ACKNOWLEDGE, S.ACKNOWLEDGE | S.DRIVER,
                            S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK,
                            S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK | S.DRIVER_OK, 0]
        enables = [VringState.unpack(s.body) for s in fake.of(R.SET_VRING_ENABLE)]
        assert [(e.index, e.num) for e in enables] == \
            [(i, 1) for i in range(4)] + [(i, 0) for i in range(4)]
        # the config space was read and parsed
        assert fe.mac == bytes.fromhex("525400abcdef")
        assert fe.config_field("mtu") == 1500


def test_stop_without_disable():
    """By default the rings are not disabled before GET_VRING_BASE."""
    fe = VhostUserNetFrontend(queue_size=64, name="stop")
    with attached(fe) as fake:
        fe.start()
        n = len(fake.seen)
        fe.stop()
        assert fake.names()[n:] == ["GET_VRING_BASE", "GET_VRING_BASE", "SET_STATUS"]


def test_sequence_without_protocol_features():
    """A back-end without bit 30: no protocol messages, no ENABLE, no need_reply."""
    fe = VhostUserNetFrontend(queue_size=64, name="plain")
    with attached(fe, dict(features=int(T.VERSION_1 | N.MRG_RXBUF))) as fake:
        fe.start()
        fe.stop()
        assert fake.names() == (["GET_FEATURES", "SET_OWNER", "SET_FEATURES", "SET_MEM_TABLE"]
                                + RING_SETUP * 2 + ["GET_VRING_BASE"] * 2)
        assert not any(s.need_reply for s in fake.seen)
        assert fe.features == T.VERSION_1 | N.MRG_RXBUF
        assert fe.protocol_features == 0
        assert fe.config is None and fe.mac is None


def test_memory_table_and_ring_addresses(ring_kind):
    """SET_MEM_TABLE carries one memfd region whose userspace_addr is our mapping;
    ring addresses are user addresses inside it (packed: the avail and used fields
    carry the driver and device event areas); SET_VRING_BASE is a fresh ring's (0, or
    0x80008000 packed, as QEMU sends it); kick/call/err fds are eventfds."""
    fe = VhostUserNetFrontend(queue_size=128, name="mem", **ring_kwargs(ring_kind))
    with attached(fe, dict(features=int(FULL_FEATURES | T.RING_PACKED))) as fake:
        assert bool(fe.features & T.RING_PACKED) == (ring_kind == "packed")
        fe.start()
        mt = fake.of(R.SET_MEM_TABLE)[0]
        table = MemTable.unpack(mt.body)
        assert len(table.regions) == 1 and len(mt.fds) == 1
        r = table.regions[0]
        shm = fe.memory
        assert (r.guest_phys_addr, r.memory_size, r.userspace_addr, r.mmap_offset) == \
            (shm.gpa, shm.size, shm.uva, 0)
        assert r.userspace_addr != r.guest_phys_addr
        assert mt.fds[0].startswith("/memfd:") and mt.fd_sizes[0] == shm.size
        for s in fake.of(R.SET_VRING_ADDR):
            a = VringAddr.unpack(s.body)
            assert (a.desc, a.avail, a.used) == ring_uvas(fe, a.index)
            for addr in (a.desc, a.avail, a.used):
                assert shm.uva <= addr < shm.uva + shm.size
        for req in (R.SET_VRING_KICK, R.SET_VRING_CALL, R.SET_VRING_ERR):
            for s in fake.of(req):
                assert s.fds == ["anon_inode:[eventfd]"]
                assert U64.unpack(s.body).value < 2        # ring index, fd present
        sizes = [VringState.unpack(s.body) for s in fake.of(R.SET_VRING_NUM)]
        assert [(s.index, s.num) for s in sizes] == [(0, 128), (1, 128)]
        bases = [VringState.unpack(s.body) for s in fake.of(R.SET_VRING_BASE)]
        fresh = 0x80008000 if ring_kind == "packed" else 0
        assert [(s.index, s.num) for s in bases] == [(0, fresh), (1, fresh)]
        if ring_kind == "packed":
            for s in fake.of(R.SET_VRING_ADDR):
                a = VringAddr.unpack(s.body)
                assert a.avail == a.desc + 16 * 128 and a.used == a.avail + 4


def ring_uvas(fe: VhostUserNetFrontend, index: int) -> tuple[int, int, int]:
    """Where ring ``index`` is in our address space (desc, avail, used)."""
    q = fe.queue(index).queue
    shm = fe.memory
    return shm.uva_of(q.desc_addr), shm.uva_of(q.avail_addr), shm.uva_of(q.used_addr)


def test_add_mem_reg_when_mem_slots_negotiated():
    fe = VhostUserNetFrontend(queue_size=64, name="slots",
                           protocol_features=int(ALL_PF))
    with attached(fe) as fake:
        fe.start()
        assert "SET_MEM_TABLE" not in fake.names()
        assert fake.names().count("GET_MAX_MEM_SLOTS") == 1
        add = fake.of(R.ADD_MEM_REG)
        assert len(add) == 1 and add[0].fds[0].startswith("/memfd:") and add[0].need_reply


def test_nack_raises():
    fe = VhostUserNetFrontend(queue_size=64, name="nack")
    with attached(fe, dict(nack={R.SET_VRING_ADDR: 7})) as fake:
        with pytest.raises(BackendNack) as info:
            fe.start()
        assert info.value.request == R.SET_VRING_ADDR and info.value.code == 7
        assert "SET_VRING_ADDR" in str(info.value)
        assert isinstance(info.value, FrontendError)
        assert fake.names()[-1] == "SET_VRING_ADDR"     # nothing sent after the NACK


def test_hang_up_timeout_and_wrong_reply():
    before = open_fds()
    with pytest.raises(BackendClosed):
        with attached(VhostUserNetFrontend(name="hup"), dict(hang_up_on=R.GET_QUEUE_NUM)):
            pass
    with pytest.raises(BackendTimeout):
        with attached(VhostUserNetFrontend(name="mute", reply_timeout=0.3),
                      dict(silent_on=R.GET_PROTOCOL_FEATURES)):
            pass
    with pytest.raises(FrontendError, match="expected the reply to GET_FEATURES"):
        with attached(VhostUserNetFrontend(name="odd"), dict(wrong_reply_on=R.GET_FEATURES)):
            pass
    assert open_fds() == before


def test_queue_pairs_checked():
    with pytest.raises(FrontendError, match="4 queue pairs wanted"):
        with attached(VhostUserNetFrontend(pairs=4, name="mq"), dict(queue_num=2)):
            pass
    with pytest.raises(FrontendError, match="need VHOST_USER_PROTOCOL_F_MQ"):
        with attached(VhostUserNetFrontend(pairs=2, name="nomq"),
                      dict(protocol_features=int(PF.REPLY_ACK))):
            pass


def test_inconsistent_offer_is_trimmed():
    """A bit whose dependency is not offered is not accepted (GUEST_TSO4 without
    GUEST_CSUM); bits not wanted are never accepted."""
    offer = FULL_FEATURES & ~int(N.GUEST_CSUM) | int(N.CTRL_VQ)
    fe = VhostUserNetFrontend(name="trim")
    with attached(fe, dict(features=offer)):
        assert fe.features & (N.GUEST_TSO4 | N.GUEST_TSO6 | N.GUEST_UFO | N.GUEST_USO4) == 0
        assert not fe.features & N.CTRL_VQ
        assert fe.features & N.HOST_TSO4


# ---------------------------------------------------------------------------------------
# the real back-end: negotiation

BACKEND_FEATURES = (T.VERSION_1 | T.EVENT_IDX | T.INDIRECT_DESC | F_PROTOCOL_FEATURES
                    | N.MRG_RXBUF | N.CSUM | N.GUEST_CSUM | N.MTU | N.HOST_TSO4 | N.HOST_TSO6
                    | N.HOST_ECN | N.HOST_UFO | N.GUEST_TSO4 | N.GUEST_TSO6 | N.GUEST_ECN
                    | N.GUEST_UFO)
BACKEND_PF = (PF.MQ | PF.REPLY_ACK | PF.CONFIG | PF.NET_MTU | PF.RARP
              | PF.CONFIGURE_MEM_SLOTS | PF.STATUS | PF.RESET_DEVICE)


def test_negotiation_with_pyvirtio_net(sockdir):
    with backend(sockdir, "--loopback", "--queues", "2", "--mac", "02:11:22:33:44:55",
                 "--mtu", "9000") as be:
        fe = VhostUserNetFrontend(pairs=2, queue_size=64, name="neg")
        try:
            fe.connect(be.path, timeout=30)
            assert fe.offered_features & F_PROTOCOL_FEATURES     # bit 30, as a mask
            assert fe.offered_features == int(BACKEND_FEATURES | N.MQ | T.RING_PACKED)
            assert fe.features == int(BACKEND_FEATURES | N.MQ)      # packed: not asked
            assert fe.offered_protocol_features == int(BACKEND_PF)
            assert fe.protocol_features == int(BACKEND_PF & ~PF.CONFIGURE_MEM_SLOTS)
            assert fe.queue_num == 2
            assert fe.mac == bytes.fromhex("021122334455")
            assert fe.config_field("mtu") == 9000
            assert fe.config_field("max_virtqueue_pairs") == 2
            fe.start()
            assert fe.get_status() == S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK | S.DRIVER_OK
            fe.set_mtu(1400)                       # valid: acked
            with pytest.raises(BackendNack) as info:
                fe.set_mtu(10)                     # below the minimum: NACKed
            assert info.value.request == R.NET_SET_MTU
            run_pumps([Pump(fe, p, 500, tag=p, lengths=(60, 1400)) for p in range(2)])
        finally:
            fe.close()


@pytest.mark.parametrize("variant", ["no-mrg-no-event-idx", "no-protocol-features",
                                     "mem-slots"])
def test_feature_variants_move_frames(sockdir, variant):
    """Narrower feature sets and the ADD_MEM_REG path still move frames both ways."""
    kwargs: dict = {}
    if variant == "no-mrg-no-event-idx":
        kwargs["features"] = int(DEFAULT_FEATURES & ~(N.MRG_RXBUF | T.EVENT_IDX | N.GUEST_TSO4
                                                      | N.GUEST_TSO6 | N.GUEST_UFO))
    elif variant == "no-protocol-features":
        kwargs["protocol_features"] = 0
    else:
        kwargs["protocol_features"] = int(BACKEND_PF)
    with backend(sockdir, "--loopback") as be, frontend(be, name=variant, **kwargs) as fe:
        if variant == "no-mrg-no-event-idx":
            assert not fe.features & (N.MRG_RXBUF | T.EVENT_IDX)
            assert fe.queue(0).slot_size == 1536
        elif variant == "no-protocol-features":
            assert fe.features & F_PROTOCOL_FEATURES == 0 and fe.protocol_features == 0
        else:
            assert fe.protocol_features & PF.CONFIGURE_MEM_SLOTS
        run_pumps([Pump(fe, 0, 3000)])
        bases = fe.stop()
        assert bases == {0: 3000, 1: 3000}


# ---------------------------------------------------------------------------------------
# the real back-end: traffic

def test_million_frames_each_way_through_loopback(sockdir):
    """1,000,000 frames guest -> back-end (TX) and the same frames back-end -> guest
    (RX), every one checked; lengths 60..1514."""
    total = 1_000_000
    with backend(sockdir, "--loopback") as be, frontend(be, name="million") as fe:
        pump = Pump(fe, 0, total, window=224)
        run_pumps([pump])
        assert pump.received == total
        bases = fe.stop()
        assert bases == {0: total % 65536, 1: total % 65536}


def test_four_queue_pairs(sockdir, ring_kind):
    """Four pairs at once, each frame back on the pair it left from."""
    with backend(sockdir, "--loopback", "--queues", "4") as be, \
            frontend(be, pairs=4, name="mq4", **ring_kwargs(ring_kind)) as fe:
        assert bool(fe.features & T.RING_PACKED) == (ring_kind == "packed")
        pumps = [Pump(fe, p, 20000, tag=0x40 + p, window=96) for p in range(4)]
        run_pumps(pumps)
        assert fe.stop() == bases_after(fe, 20000, range(8))


def test_merged_rx_buffers(sockdir, ring_kind):
    """Frames of 9000 and 60000 bytes come back spread over 1536-byte RX buffers
    (MRG_RXBUF) and are joined again."""
    lengths = (9000, 60000)
    with backend(sockdir, "--loopback", "--mtu", "9000") as be, \
            frontend(be, name="mrg", **ring_kwargs(ring_kind)) as fe:
        assert fe.features & N.MRG_RXBUF and fe.queue(0).slot_size == 1536
        pump = Pump(fe, 0, 512, lengths=lengths, window=8)
        seen_buffers = []
        orig = fe.recv_array

        def spy(*a, **k):
            rx = orig(*a, **k)
            seen_buffers.extend(rx.buffers.tolist())
            return rx
        fe.recv_array = spy          # type: ignore[method-assign]
        run_pumps([pump])
        assert set(seen_buffers) == {-(-(9000 + HDR_LEN) // 1536), -(-(60000 + HDR_LEN) // 1536)}


@nt.needs_tap
def test_tap_in_namespace(sockdir):
    """Guest frames reach an AF_PACKET socket in the namespace; frames sent there reach
    the guest."""
    count, batch = 3000, 50
    tap = f"vut{os.getpid() % 100000}"
    with nt.namespace("vufe") as ns, \
            backend(sockdir, "--tap", tap, "--netns", ns.name) as be, \
            frontend(be, name="tap") as fe, \
            nt.PacketSocket(ns, tap) as ps:
        def ours(frame: bytes) -> bool:
            return frame[12:14] == b"\x88\xb5"

        # guest -> namespace
        got = 0
        while got < count:
            n = min(batch, count - got, CHUNK - got % CHUNK)
            frames = make_frames(got, n, int(frame_length(got, (60, 1514))), tag=1)
            assert fe.send_array(0, frames) == n
            for i in range(n):
                frame = ps.recv(5.0, ours)
                assert frame is not None, f"frame {got + i} never reached the namespace"
                assert frame == frames[i].tobytes(), f"frame {got + i} changed on the way"
            got += n
        assert fe.wait_tx_done(0)
        # namespace -> guest
        sent = received = 0
        while received < count:
            n = min(batch, count - sent, CHUNK - sent % CHUNK)
            frames = make_frames(sent, n, int(frame_length(sent, (60, 1514))), tag=2)
            for row in frames:
                ps.send(row.tobytes())
            sent += n
            deadline = time.monotonic() + STALL
            while received < sent:
                rx = fe.recv_array(0, 0.5)
                if len(rx):           # only our frames (the kernel may send its own)
                    mask = (rx.data[:, 12] == 0x88) & (rx.data[:, 13] == 0xB5)
                    rx = RxFrames(rx.headers[mask], rx.data[mask], rx.lengths[mask],
                                  rx.buffers[mask])
                if len(rx):
                    check_frames(rx, received, tag=2, lengths=(60, 1514))
                    received += len(rx)
                assert time.monotonic() < deadline, f"{sent - received} frame(s) never arrived"
        assert received == count


# ---------------------------------------------------------------------------------------
# the real back-end: ring life cycle

def test_resume_on_a_fresh_backend(sockdir, ring_kind):
    """GET_VRING_BASE after traffic, frames queued while no back-end runs, then
    SET_VRING_BASE into a new back-end process: every frame exactly once, in order
    (packed: 3000 chains on a 256-slot ring, so both wrap counters went round)."""
    first, gap, second = 3000, 100, 3000
    fe = VhostUserNetFrontend(name="migrate", **ring_kwargs(ring_kind))
    try:
        with backend(sockdir, "--loopback", name="old") as old:
            fe.connect(old.path, timeout=30)
            fe.start()
            run_pumps([Pump(fe, 0, first)])
            bases = fe.stop()
            assert bases == bases_after(fe, first)
            # the guest keeps queueing while it has no back-end
            assert fe.send_array(0, make_frames(first, gap, 60)) == gap
            fe.disconnect()
        assert fe.queue(1).queue.in_flight == gap
        with backend(sockdir, "--loopback", name="new") as new:
            fe.connect(new.path, timeout=30)
            fe.start(bases)
            pump = Pump(fe, 0, gap + second, seq0=first, lengths=(60,) * 1)
            pump.sent = gap                           # already in the ring
            run_pumps([pump])
            assert fe.stop() == bases_after(fe, first + gap + second)
            assert not fe.queue(0).queue.broken and not fe.queue(1).queue.broken
    finally:
        fe.close()


def test_guest_reboot(sockdir, ring_kind):
    """Stop the rings, set them up again from index 0: traffic works, the indices
    count from 0 again."""
    with backend(sockdir, "--loopback") as be, \
            frontend(be, name="reboot", **ring_kwargs(ring_kind)) as fe:
        run_pumps([Pump(fe, 0, 1000)])
        assert fe.reboot() == bases_after(fe, 1000)
        assert fe.queue(1).queue.next_avail == bases_after(fe, 0)[1] & 0xFFFF
        # every RX buffer posted: a full lap
        assert fe.queue(0).queue.next_avail == bases_after(fe, fe.queue_size)[0] & 0xFFFF
        run_pumps([Pump(fe, 0, 700, seq0=1000)])
        assert fe.reboot() == bases_after(fe, 700)
        run_pumps([Pump(fe, 0, 300, seq0=1700)])
        assert fe.stop() == bases_after(fe, 300)


def test_no_fd_left_behind(sockdir):
    """Connect, start, move frames, stop, close: 20 times, the same fds afterwards."""
    with backend(sockdir, "--loopback") as be:
        before = open_fds()
        for i in range(20):
            with frontend(be, name=f"cycle{i}", queue_size=64) as fe:
                run_pumps([Pump(fe, 0, 50, lengths=(60,))])
                fe.stop()
        assert open_fds() == before


# ---------------------------------------------------------------------------------------
# the forwarder

@contextmanager
def two_ports(sockdir: str, *backend_args: str, pairs: int = 1, **kwargs
              ) -> Iterator[tuple[VhostUserNetFrontend, VhostUserNetFrontend, SharedGuestMemory]]:
    """Two loopback back-ends, two front-ends sharing one memfd."""
    with backend(sockdir, "--loopback", *backend_args, name="a") as be_a, \
            backend(sockdir, "--loopback", *backend_args, name="b") as be_b:
        shm = SharedGuestMemory(256 << 20)
        a = VhostUserNetFrontend(memory=shm, pairs=pairs, name="a", **kwargs)
        b = VhostUserNetFrontend(memory=shm, pairs=pairs, name="b", **kwargs)
        try:
            for fe, be in ((a, be_a), (b, be_b)):
                fe.connect(be.path, timeout=30)
                fe.start()
            yield a, b, shm
        finally:
            a.close()
            b.close()
            shm.close()


class AddSpy:
    """Stands in for a driver queue and records the buffer addresses of every chain
    made available on it."""

    def __init__(self, queue) -> None:
        self.queue = queue
        self.addrs: list[np.ndarray] = []
        self.segments: list[np.ndarray] = []

    def add(self, batch, **kwargs) -> int:
        n = self.queue.add(batch, **kwargs)
        nseg = int(batch.seg_start[n])
        self.addrs.append(batch.seg_addr[:nseg].copy())
        self.segments.append(np.diff(batch.seg_start[:n + 1]))
        return n

    def __getattr__(self, name: str):
        return getattr(self.queue, name)


@contextmanager
def spy_on(dq) -> Iterator[AddSpy]:
    spy = AddSpy(dq.queue)
    dq.queue = spy
    try:
        yield spy
    finally:
        dq.queue = spy.queue
        del spy.queue


def forward_and_check(a: VhostUserNetFrontend, b: VhostUserNetFrontend, count: int,
                      lengths: Sequence[int], window: int) -> None:
    """Send ``count`` frames on A, receive them on B, each checked."""
    sent = received = 0
    last = time.monotonic()
    while received < count:
        if sent - received < window and sent < count:
            n = min(32, window - (sent - received), count - sent, CHUNK - sent % CHUNK)
            sent += a.send_array(0, make_frames(sent, n, int(frame_length(sent, lengths))))
        rx = b.recv_array(0, 0.05)
        if len(rx):
            check_frames(rx, received, lengths=lengths)
            received += len(rx)
            last = time.monotonic()
        assert time.monotonic() - last < STALL, f"stalled at {received}/{sent}"


def test_forwarder_moves_frames_without_copying(sockdir, ring_kind):
    """A's TX -> loopback -> A's RX -> forwarder -> B's TX -> loopback -> B's RX: every
    frame arrives; every chain posted on B's TX is made of A's RX buffers (their
    addresses, as they are), every one of A's RX buffers took part, and B's own TX
    buffers were never written."""
    count = 20000
    with two_ports(sockdir, **ring_kwargs(ring_kind)) as (a, b, shm):
        a_rx, b_tx = a.queue(0), b.queue(1)
        with spy_on(b_tx) as spy:
            fwd = Forwarder(a, b)
            fwd.start()
            try:
                forward_and_check(a, b, count, LENGTHS, 128)
            finally:
                assert fwd.stop()
            addrs = np.concatenate(spy.addrs)
            segments = np.concatenate(spy.segments)
        assert not fwd.errors
        st = fwd.stats()[0]["a->b"]
        assert st.frames == count and st.buffers == count and st.dropped == 0
        assert len(addrs) == count and (segments == 1).all()
        off = addrs.astype(np.int64) - a_rx.buf_addr
        assert (off >= 0).all() and (off % a_rx.slot_size == 0).all()
        slots = off // a_rx.slot_size
        assert (slots < a_rx.slots).all()
        assert len(np.unique(slots)) == a_rx.slots      # every RX buffer went across
        assert not shm.memory.array(b_tx.buf_addr, b_tx.slots * b_tx.slot_size).any(), \
            "the forwarder wrote into B's TX buffers"
        # every RX buffer of A is back in A's receive queue, nothing left on B's TX
        assert a_rx.queue.in_flight == a_rx.slots and b_tx.queue.in_flight == 0


MRG_LENGTHS = (9000, 60000)


def test_forwarder_merged_frames(sockdir, ring_kind):
    """Frames spread over several RX buffers (MRG_RXBUF) cross as one multi-segment TX
    chain each, made of those buffers."""
    count = 400
    with two_ports(sockdir, "--mtu", "9000", **ring_kwargs(ring_kind)) as (a, b, shm):
        a_rx, b_tx = a.queue(0), b.queue(1)
        with spy_on(b_tx) as spy:
            with Forwarder(a, b) as fwd:
                forward_and_check(a, b, count, MRG_LENGTHS, 4)
            addrs = np.concatenate(spy.addrs)
            segments = np.concatenate(spy.segments)
        per_frame = -(-(frame_length(np.arange(count), MRG_LENGTHS) + HDR_LEN) // 1536)
        st = fwd.stats()[0]["a->b"]
        assert st.frames == count and st.multi == count
        assert st.buffers == int(per_frame.sum())
        assert np.array_equal(segments, per_frame)       # one segment per RX buffer
        off = addrs.astype(np.int64) - a_rx.buf_addr
        assert (off >= 0).all() and (off % a_rx.slot_size == 0).all()
        assert (off // a_rx.slot_size < a_rx.slots).all()
        assert a_rx.queue.in_flight == a_rx.slots and b_tx.queue.in_flight == 0


def test_forwarder_refuses_what_it_cannot_do(sockdir):
    """Ports with separate memories, or a destination that cannot send what the source
    may receive (a guest offload without the matching host offload)."""
    with backend(sockdir, "--loopback", name="a") as be_a, \
            backend(sockdir, "--loopback", name="b") as be_b:
        with frontend(be_a, name="a") as a, frontend(be_b, name="b") as b:
            with pytest.raises(ForwarderError, match="share one SharedGuestMemory"):
                Forwarder(a, b)
        with SharedGuestMemory(64 << 20) as shm:
            a = VhostUserNetFrontend(memory=shm, name="a")
            b = VhostUserNetFrontend(memory=shm, name="b",
                                  features=int(DEFAULT_FEATURES & ~N.HOST_TSO4))
            try:
                for fe, be in ((a, be_a), (b, be_b)):
                    fe.connect(be.path, timeout=30)
                    fe.start()
                with pytest.raises(ForwarderError, match="GUEST_TSO4->HOST_TSO4"):
                    Forwarder(a, b)
                Forwarder(b, a)        # the other way round is fine
            finally:
                a.close()
                b.close()


@nt.needs_tap
def test_forwarder_both_ways_between_taps(sockdir):
    """The PVP shape on one L2 segment: frames sent on TAP A cross A's back-end, the
    forwarder and B's back-end to TAP B, and back the other way."""
    count, batch = 600, 50
    ta, tb = f"vua{os.getpid() % 100000}", f"vub{os.getpid() % 100000}"
    with nt.namespace("vufw") as ns, \
            backend(sockdir, "--tap", ta, "--netns", ns.name, name="a") as be_a, \
            backend(sockdir, "--tap", tb, "--netns", ns.name, name="b") as be_b, \
            SharedGuestMemory(256 << 20) as shm:
        a = VhostUserNetFrontend(memory=shm, name="a")
        b = VhostUserNetFrontend(memory=shm, name="b")
        try:
            for fe, be in ((a, be_a), (b, be_b)):
                fe.connect(be.path, timeout=30)
                fe.start()
            with Forwarder(a, b, both_ways=True) as fwd, nt.PacketSocket(ns, ta) as pa, \
                    nt.PacketSocket(ns, tb) as pb:
                for src, dst, tag in ((pa, pb, 3), (pb, pa, 4)):
                    def ours(frame: bytes, tag: int = tag) -> bool:
                        return frame[12:14] == b"\x88\xb5" and frame[22] == tag

                    for start in range(0, count, batch):
                        frames = make_frames(start, batch, int(frame_length(start, (60, 1514))),
                                             tag)
                        for row in frames:
                            src.send(row.tobytes())
                        for i in range(batch):
                            got = dst.recv(5.0, ours)
                            assert got is not None, f"frame {start + i} (tag {tag}) lost"
                            assert got == frames[i].tobytes(), f"frame {start + i} changed"
            assert not fwd.errors
            st = fwd.stats()[0]
            assert st["a->b"].frames == count and st["b->a"].frames == count
        finally:
            a.close()
            b.close()


@nt.needs_tap
def test_forwarder_tcp_gso_frames_cross_whole(sockdir):
    """TCP between two namespaces through TAP A, the forwarder and TAP B, offloads
    negotiated end to end: the kernel hands the TAP 64 KiB TCP frames (GSO), which
    cross the forwarder whole (one chain over several RX buffers); the stream arrives
    intact."""

    size = 16 << 20
    ta, tb = f"vga{os.getpid() % 100000}", f"vgb{os.getpid() % 100000}"
    with nt.namespace("vugA") as ns_a, nt.namespace("vugB") as ns_b, \
            backend(sockdir, "--tap", ta, "--netns", ns_a.name, name="a") as be_a, \
            backend(sockdir, "--tap", tb, "--netns", ns_b.name, name="b") as be_b, \
            SharedGuestMemory(256 << 20) as shm:
        a = VhostUserNetFrontend(memory=shm, name="a")
        b = VhostUserNetFrontend(memory=shm, name="b")
        try:
            for fe, be in ((a, be_a), (b, be_b)):
                fe.connect(be.path, timeout=30)
                fe.start()
                assert fe.features & (N.GUEST_TSO4 | N.HOST_TSO4 | N.MRG_RXBUF) == \
                    N.GUEST_TSO4 | N.HOST_TSO4 | N.MRG_RXBUF
            nt.add_address(ns_a, ta, "10.78.0.1")
            nt.add_address(ns_b, tb, "10.78.0.2")
            with Forwarder(a, b, both_ways=True) as fwd:
                server = socket_in(ns_b.name)
                client = socket_in(ns_a.name)
                try:
                    server.bind(("10.78.0.2", 5201))
                    server.listen(1)
                    result: dict[str, object] = {}

                    def serve() -> None:
                        conn, _ = server.accept()
                        h, n = hashlib.sha256(), 0
                        with conn:
                            while chunk := conn.recv(1 << 20):
                                h.update(chunk)
                                n += len(chunk)
                        result["n"], result["digest"] = n, h.hexdigest()

                    t = threading.Thread(target=serve, daemon=True)
                    t.start()
                    payload = np.random.default_rng(7).integers(0, 256, size, np.uint8).tobytes()
                    client.settimeout(30)
                    client.connect(("10.78.0.2", 5201))
                    client.sendall(payload)
                    client.close()
                    t.join(30)
                    assert result.get("n") == size
                    assert result["digest"] == hashlib.sha256(payload).hexdigest()
                finally:
                    client.close()
                    server.close()
            st = fwd.stats()[0]["a->b"]
            assert not fwd.errors
            assert st.multi > 0, "no frame larger than one RX buffer crossed: no GSO frames"
            assert st.bytes / st.frames > 1514 + HDR_LEN, "frames were segmented on the way"
        finally:
            a.close()
            b.close()


def test_broken_ring_is_reported_and_a_reboot_recovers(sockdir):
    """A transmitq entry naming a head beyond the ring: the back-end signals the ring's
    error eventfd and sets DEVICE_NEEDS_RESET; a reboot brings traffic back."""
    with backend(sockdir, "--loopback") as be, frontend(be, name="broken") as fe:
        run_pumps([Pump(fe, 0, 100, lengths=(60,))])
        assert fe.ring_errors() == []
        q = fe.queue(1).queue
        size, avail = q.size, q.avail_addr
        idx = struct.unpack("<H", fe.memory.memory.read(avail + 2, 2))[0]
        fe.memory.memory.write(avail + 4 + 2 * (idx % size), struct.pack("<H", size + 3))
        fe.memory.memory.write(avail + 2, struct.pack("<H", (idx + 1) & 0xFFFF))
        del q
        os.eventfd_write(fe.queue(1).kick_fd, 1)
        deadline = time.monotonic() + STALL
        errors: list[int] = []
        while not errors:
            assert time.monotonic() < deadline, "the back-end never signalled the error fd"
            select.select([fe.err_fds[1]], [], [], 0.1)
            errors = fe.ring_errors()
        assert errors == [1]
        assert fe.get_status() & S.DEVICE_NEEDS_RESET
        fe.reboot()
        assert not fe.get_status() & S.DEVICE_NEEDS_RESET
        run_pumps([Pump(fe, 0, 500, seq0=100, lengths=(60,))])
