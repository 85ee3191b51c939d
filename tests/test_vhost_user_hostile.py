"""A hostile front-end: every kind of bad input of issue 4 item 5, one test each.

Each bad message must get an error reply (a NACK, when REPLY_ACK was negotiated and the
message asked for a reply) or close the connection, with exactly one log line; the fds
that came with it are closed (checked with the write end of a pipe: once every copy is
closed the read end sees EOF); and the back-end then serves the next connection.
Finally the fds of a ``pyvirtio net --sink`` process are counted around 1000
connect/disconnect cycles, some of them cut short with fds in flight.
"""

from __future__ import annotations

import logging
import os
import select
import socket
import subprocess
import sys
from collections.abc import Callable

import pytest

from vhost_user_peer import DEVICE_KINDS, NET_OFFERED
from pyvirtio.vhost_user.messages import (HEADER, MAX_BODY, VERSION, VRING_NOFD_MASK,
                                          ConfigSpace, MemRegion, MemTable, Request,
                                          SingleMemRegion, U64, VringAddr, VringState)
from vhost_user_peer import (STARTUP, GPA_BASE, GuestRam, Peer, ring_features, serving,
                             start_net, wait_for)

REPLY_ACK = [pytest.param(True, id="reply-ack"), pytest.param(False, id="no-reply-ack")]


@pytest.fixture
def ram():
    r = GuestRam(2 << 20, name="vu-hostile")
    yield r
    r.close()


@pytest.fixture(params=DEVICE_KINDS)
def backend(request, tmp_path):
    """The generic handler over each device kind (net over a sink, the dummy, ...)."""
    with serving(tmp_path, "sink" if request.param == "net" else request.param,
                 message_timeout=0.5) as s:
        yield s


@pytest.fixture
def net(tmp_path):
    """A net back-end over a sink (for the tests that need net traffic)."""
    with serving(tmp_path, "sink", message_timeout=0.5) as s:
        yield s


def _warnings(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records
            if r.levelno >= logging.WARNING and r.name.startswith("pyvirtio")]


def _still_serving(s) -> None:
    with s.connect() as p:
        assert p.get_features() == s.offered


def _pipe_fd() -> tuple[int, int]:
    """(read end, write end): send the write end, close ours, watch the read end."""
    return os.pipe()


def _all_closed(read_fd: int, timeout: float = 5.0) -> bool:
    """Whether every copy of the pipe's write end was closed (EOF on ``read_fd``)."""
    if not select.select([read_fd], [], [], timeout)[0]:
        return False
    return os.read(read_fd, 1) == b""


def _open(s, reply_ack: bool, *, features: bool = False, memory: GuestRam | None = None,
          packed: bool = False) -> Peer:
    """A connection, with REPLY_ACK negotiated or no protocol features at all
    (``features``: SET_FEATURES of every offered bit, VIRTIO_F_RING_PACKED only with
    ``packed``)."""
    p = s.connect()
    offered = ring_features(p.get_features(), packed)
    if reply_ack:
        p.negotiate_protocol()
    if features:
        p.set_features(offered if reply_ack else offered & ~(1 << 30))
    if memory is not None:
        p.set_mem_table([memory])
    return p


def _refused(s, caplog, p: Peer, request: Request, reply_ack: bool,
             pipe_read: int | None = None, kept: Callable[[], bool] | None = None) -> None:
    """The last message was refused: a NACK (and the connection goes on) with
    REPLY_ACK, else the connection closed; one log line; fds closed; still serving.
    ``kept``: with REPLY_ACK, checked while the connection goes on (the refused
    message changed nothing)."""
    if reply_ack:
        reply = p.recv()
        assert reply.is_reply and reply.request == request
        assert U64.unpack(reply.body).value != 0
        assert p.get_features() == s.offered     # goes on
        if kept is not None:
            assert kept()
    else:
        assert p.closed_by_peer()
    p.close()
    if pipe_read is not None:
        assert _all_closed(pipe_read), "the back-end kept an fd of a refused message"
        os.close(pipe_read)
    assert len(_warnings(caplog)) == 1, [r.getMessage() for r in _warnings(caplog)]
    _still_serving(s)


def _closed(s, caplog, p: Peer, pipe_read: int | None = None) -> None:
    """The back-end closed the connection with one log line and serves the next."""
    assert p.closed_by_peer()
    p.close()
    if pipe_read is not None:
        assert _all_closed(pipe_read)
        os.close(pipe_read)
    assert len(_warnings(caplog)) == 1, [r.getMessage() for r in _warnings(caplog)]
    _still_serving(s)


# ---- framing --------------------------------------------------------------------------------

@pytest.mark.parametrize("how", ["eof", "stall"])
def test_truncated_header(backend, caplog, how):
    p = backend.connect()
    p.send_raw(HEADER.pack(Request.GET_FEATURES, VERSION, 0)[:6])
    if how == "eof":
        p.sock.shutdown(socket.SHUT_WR)
    _closed(backend, caplog, p)             # EOF at once, a stall after the timeout


@pytest.mark.parametrize("reply_ack", REPLY_ACK)
def test_body_shorter_than_size(backend, caplog, reply_ack):
    # on the stream: the header promises 8 bytes, 4 come, then the end
    p = _open(backend, reply_ack)
    p.send(Request.SET_FEATURES, U64(1).pack()[:4], size=8)
    p.sock.shutdown(socket.SHUT_WR)
    _closed(backend, caplog, p)
    caplog.clear()
    # a body shorter than the request's struct
    p = _open(backend, reply_ack)
    p.send(Request.SET_FEATURES, U64(1).pack()[:4], need_reply=reply_ack)
    _refused(backend, caplog, p, Request.SET_FEATURES, reply_ack)


@pytest.mark.parametrize("reply_ack", REPLY_ACK)
def test_body_longer_than_size(backend, caplog, reply_ack):
    # a body longer than the request's struct
    p = _open(backend, reply_ack)
    p.send(Request.SET_VRING_NUM, VringState(0, 256).pack() + bytes(8), need_reply=reply_ack)
    _refused(backend, caplog, p, Request.SET_VRING_NUM, reply_ack)
    caplog.clear()
    # on the stream: more bytes than the header says; the rest is a broken next header
    p = _open(backend, reply_ack)
    p.send_raw(HEADER.pack(Request.GET_FEATURES, VERSION, 0) + b"\x01\x02\x03\x04\x05")
    reply = p.recv()
    assert U64.unpack(reply.body).value == backend.offered
    _closed(backend, caplog, p)             # the 5 stray bytes never make a header


@pytest.mark.parametrize("reply_ack", REPLY_ACK)
def test_size_over_the_limit(backend, caplog, reply_ack):
    p = _open(backend, reply_ack)
    read, write = _pipe_fd()
    p.send_raw(HEADER.pack(Request.SET_CONFIG, VERSION | 0x8, MAX_BODY + 1), [write])
    os.close(write)
    _closed(backend, caplog, p, read)       # the body cannot be skipped: connection ends


@pytest.mark.parametrize("reply_ack", REPLY_ACK)
def test_unknown_request(backend, caplog, reply_ack):
    p = _open(backend, reply_ack)
    p.send(999, U64(0).pack(), need_reply=reply_ack)
    _refused(backend, caplog, p, 999, reply_ack)
    caplog.clear()
    # known to the protocol but not served by this back-end (no IOMMU support)
    p = _open(backend, reply_ack)
    p.send(Request.IOTLB_MSG, bytes(32), need_reply=reply_ack)
    _refused(backend, caplog, p, Request.IOTLB_MSG, reply_ack)


@pytest.mark.parametrize("reply_ack", REPLY_ACK)
@pytest.mark.parametrize("case", ["fd-on-get-features", "kick-without-fd",
                                  "call-nofd-with-fd", "table-fd-count", "add-reg-no-fd",
                                  "nine-fds"])
def test_wrong_number_of_fds(backend, caplog, ram, case, reply_ack):
    p = _open(backend, reply_ack, features=True)
    read, write = _pipe_fd()
    fds = [write]
    if case == "fd-on-get-features":
        request, body = Request.SET_OWNER, b""
    elif case == "kick-without-fd":
        request, body, fds = Request.SET_VRING_KICK, U64(0).pack(), []
    elif case == "call-nofd-with-fd":
        request, body = Request.SET_VRING_CALL, U64(0 | VRING_NOFD_MASK).pack()
    elif case == "table-fd-count":
        request, body = Request.SET_MEM_TABLE, MemTable([ram.region()]).pack()
        fds = [ram.fd, write]
    elif case == "add-reg-no-fd":
        request, body, fds = Request.ADD_MEM_REG, SingleMemRegion(ram.region()).pack(), []
    else:                                     # more fds than a message may carry
        request, body, fds = Request.SET_OWNER, b"", [write] * 9
    p.send(request, body, fds, need_reply=reply_ack)
    os.close(write)
    if case == "nine-fds":                    # control data truncated: cannot be trusted
        _closed(backend, caplog, p, read)
        return
    _refused(backend, caplog, p, request, reply_ack, read)


# ---- memory ----------------------------------------------------------------------------------

@pytest.mark.parametrize("reply_ack", REPLY_ACK)
@pytest.mark.parametrize("case", ["size-0", "overlap", "fd-too-small", "pipe-fd",
                                  "add-overlapping"])
def test_bad_memory_region(backend, caplog, ram, case, reply_ack):
    p = _open(backend, reply_ack, features=True)
    read, write = _pipe_fd()
    small = os.memfd_create("vu-small")
    os.ftruncate(small, 4096)
    try:
        if case == "size-0":
            regions = [MemRegion(GPA_BASE, 0, ram.uva, 0)]
            request, body, fds = Request.SET_MEM_TABLE, MemTable(regions).pack(), [write]
        elif case == "overlap":
            regions = [ram.region(), MemRegion(GPA_BASE + 4096, 4096, ram.uva + (1 << 40), 0)]
            request, body = Request.SET_MEM_TABLE, MemTable(regions).pack()
            fds = [ram.fd, write]
        elif case == "fd-too-small":          # a 4 KiB memfd for a 1 MiB region
            regions = [MemRegion(GPA_BASE, 1 << 20, ram.uva, 0)]
            request, body, fds = Request.SET_MEM_TABLE, MemTable(regions).pack(), [small]
        elif case == "pipe-fd":               # an fd that cannot be mapped at all
            regions = [MemRegion(GPA_BASE, 1 << 20, ram.uva, 0)]
            request, body, fds = Request.SET_MEM_TABLE, MemTable(regions).pack(), [write]
        else:                                 # ADD_MEM_REG over an existing region
            assert p.add_mem_reg(ram.region(), ram.fd) == 0
            caplog.clear()
            region = MemRegion(GPA_BASE + 8192, 4096, ram.uva + (1 << 40), 0)
            request, body = Request.ADD_MEM_REG, SingleMemRegion(region).pack()
            fds = [write]
        p.send(request, body, fds, need_reply=reply_ack)
        os.close(write)
        mapped = 1 if case == "add-overlapping" else 0
        _refused(backend, caplog, p, request, reply_ack, read,
                 kept=lambda: len(backend.handler.regions) == mapped)
    finally:
        os.close(small)


# ---- rings ----------------------------------------------------------------------------------

@pytest.mark.parametrize("reply_ack", REPLY_ACK)
def test_ring_address_outside_every_region(backend, caplog, ram, reply_ack):
    p = _open(backend, reply_ack, features=True, memory=ram)
    p.call(Request.SET_VRING_NUM, VringState(0, 256).pack())
    outside = ram.uva + ram.size + 4096
    body = VringAddr(0, 0, outside, ram.uva + 8192, ram.uva + 4096, 0).pack()
    p.send(Request.SET_VRING_ADDR, body, need_reply=reply_ack)
    _refused(backend, caplog, p, Request.SET_VRING_ADDR, reply_ack)
    caplog.clear()
    # the used ring straddles the end of the region
    p = _open(backend, reply_ack, features=True, memory=ram)
    p.call(Request.SET_VRING_NUM, VringState(0, 256).pack())
    body = VringAddr(0, 0, ram.uva, ram.uva + ram.size - 64, ram.uva + 4096, 0).pack()
    p.send(Request.SET_VRING_ADDR, body, need_reply=reply_ack)
    _refused(backend, caplog, p, Request.SET_VRING_ADDR, reply_ack)


@pytest.mark.parametrize("reply_ack", REPLY_ACK)
@pytest.mark.parametrize("request_", [Request.SET_VRING_NUM, Request.SET_VRING_BASE,
                                      Request.SET_VRING_ENABLE, Request.SET_VRING_ADDR,
                                      Request.SET_VRING_KICK, Request.SET_VRING_CALL,
                                      Request.SET_VRING_ERR])
def test_queue_index_out_of_range(backend, caplog, ram, request_, reply_ack):
    p = _open(backend, reply_ack, features=True, memory=ram)
    fds: list[int] = []
    read = None
    if request_ in (Request.SET_VRING_NUM, Request.SET_VRING_BASE, Request.SET_VRING_ENABLE):
        body = VringState(backend.num_queues, 1).pack()     # one past the last ring
    elif request_ is Request.SET_VRING_ADDR:
        body = VringAddr(backend.num_queues + 5, 0, ram.uva, ram.uva + 8192, ram.uva + 4096,
                         0).pack()
    else:
        read, write = _pipe_fd()
        body, fds = U64(200).pack(), [write]
    p.send(request_, body, fds, need_reply=reply_ack)
    if fds:
        os.close(fds[0])
    _refused(backend, caplog, p, request_, reply_ack, read)


def test_get_vring_base_index_out_of_range(backend, caplog):
    # a request with a reply of its own cannot be NACKed: the connection ends
    p = _open(backend, True)
    p.send(Request.GET_VRING_BASE, VringState(9, 0).pack(), need_reply=True)
    _closed(backend, caplog, p)


@pytest.mark.parametrize("reply_ack", REPLY_ACK)
@pytest.mark.parametrize("num", [0, 100, 65536])
def test_set_vring_num_not_a_power_of_two_or_too_big(backend, caplog, num, reply_ack):
    p = _open(backend, reply_ack, features=True)
    p.send(Request.SET_VRING_NUM, VringState(0, num).pack(), need_reply=reply_ack)
    _refused(backend, caplog, p, Request.SET_VRING_NUM, reply_ack,
             kept=lambda: backend.handler.rings[0].num is None)


@pytest.mark.parametrize("reply_ack", REPLY_ACK)
def test_set_vring_base_beyond_the_ring(backend, caplog, reply_ack):
    p = _open(backend, reply_ack, features=True)
    p.send(Request.SET_VRING_BASE, VringState(1, 0x10000).pack(), need_reply=reply_ack)
    _refused(backend, caplog, p, Request.SET_VRING_BASE, reply_ack)


@pytest.mark.parametrize("reply_ack", REPLY_ACK)
@pytest.mark.parametrize("request_", [Request.SET_VRING_ADDR, Request.SET_VRING_KICK])
def test_rings_before_the_memory_table(backend, caplog, ram, request_, reply_ack):
    p = _open(backend, reply_ack, features=True)
    p.call(Request.SET_VRING_NUM, VringState(0, 256).pack())
    fds: list[int] = []
    read = None
    if request_ is Request.SET_VRING_ADDR:
        body = VringAddr(0, 0, ram.uva, ram.uva + 8192, ram.uva + 4096, 0).pack()
    else:
        read, write = _pipe_fd()
        body, fds = U64(0).pack(), [write]
    p.send(request_, body, fds, need_reply=reply_ack)
    if fds:
        os.close(fds[0])
    _refused(backend, caplog, p, request_, reply_ack, read,
             kept=lambda: not backend.handler.rings[0].started)


def test_bad_messages_leave_a_running_device_running(net, caplog, ram):
    """NACKed messages in the middle of traffic do not disturb the rings."""
    with net.connect() as p:
        g = start_net(p, ram)
        for body, request in ((VringState(0, 100).pack(), Request.SET_VRING_NUM),
                              (VringState(0, 3).pack(), Request.SET_VRING_BASE),
                              (ConfigSpace(0, 6, 0, bytes(6)).pack(), Request.SET_CONFIG)):
            assert p.call(request, body, check=False) != 0
        assert len(_warnings(caplog)) == 3
        frames = [bytes(60) for _ in range(50)]
        assert g.driver.send(0, frames) == 50
        assert g.driver.wait_tx_done(0)
        assert p.get_vring_base(1) == 50
        g.close()


# ---- fds of the back-end process ----------------------------------------------------------

def _proc_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _probe(path: str, pid: int) -> int:
    """The back-end's fd count with exactly one idle connection (after a round trip:
    the server serves one connection at a time, so every earlier one is finished)."""
    with Peer(path) as p:
        assert p.get_features() == NET_OFFERED
        return _proc_fds(pid)


def _cycle(i: int, path: str, ram: GuestRam) -> None:
    """One connect/disconnect cycle of kind ``i % 10``."""
    kind = i % 10
    p = Peer(path)
    try:
        if kind == 1:
            p.get_features()
        elif kind == 2:                      # half a header
            p.send_raw(HEADER.pack(Request.SET_FEATURES, VERSION, 8)[:7])
        elif kind == 3:                      # header and fds of a table, half its body
            body = MemTable([ram.region()]).pack()
            p.send_raw(HEADER.pack(Request.SET_MEM_TABLE, VERSION, len(body)) + body[:20],
                       [ram.fd])
        elif kind == 4:                      # an eventfd the back-end keeps, then gone
            efd = os.eventfd(0)
            p.send(Request.SET_VRING_CALL, U64(0).pack(), [efd])
            os.close(efd)
            p.get_features()
        elif kind == 5:                      # fds on a message that takes none
            efd = os.eventfd(0)
            p.send(Request.GET_FEATURES, b"", [efd, efd])
            os.close(efd)
        elif kind == 6:                      # a header with fds and nothing after it
            efd = os.eventfd(0)
            p.send_raw(HEADER.pack(Request.SET_VRING_KICK, VERSION, 8), [efd, efd, efd])
            os.close(efd)
        elif kind == 7:
            if i % 50 == 7:                  # a running device torn down by the close
                g = start_net(p, ram, protocol=0)
                g.driver.send(0, [bytes(60)] * 8)
                g.close()
            else:                            # memory and a ring set up, never started
                p.get_features()
                p.set_mem_table([ram])
                p.vring_num(0, 256)
                p.vring_addr(0, ram.uva, ram.uva + 8192, ram.uva + 4096)
                p.get_features()
        elif kind == 8:                      # a mapped table
            p.set_mem_table([ram])
            p.get_features()
        elif kind == 9:                      # a size over the limit
            p.send_raw(HEADER.pack(Request.SET_CONFIG, VERSION, MAX_BODY * 4))
    finally:
        p.close()


# ---- packed rings: SET_VRING_BASE and friends ----------------------------------------------

PACKED_BAD_BASES = [
    pytest.param(0x8000 | 256, id="avail-slot-at-size"),
    pytest.param(0x7FFF, id="avail-slot-max"),
    pytest.param((0x8000 | 256) << 16 | 0x8000, id="used-slot-at-size"),
    pytest.param((0x8000 | 10) << 16 | 0x8000 | 5, id="used-ahead-of-avail"),
    pytest.param(4 << 16 | 0x8000 | 5, id="used-more-than-a-lap-behind"),
    pytest.param(0xFFFFFFFF, id="all-ones"),
]


@pytest.mark.parametrize("reply_ack", REPLY_ACK)
@pytest.mark.parametrize("base", PACKED_BAD_BASES)
def test_packed_set_vring_base_out_of_range(backend, caplog, ram, base, reply_ack):
    """A packed ring of 256: a slot (avail, bits 0-14, or used, bits 16-30) not below
    the size, or a used position ahead of the avail one or more than a lap behind it,
    is refused; the ring keeps the base it had."""
    p = _open(backend, reply_ack, features=True, memory=ram, packed=True)
    p.vring_num(0, 256)
    p.vring_base(0, 0x80008000)
    p.send(Request.SET_VRING_BASE, VringState(0, base).pack(), need_reply=reply_ack)
    _refused(backend, caplog, p, Request.SET_VRING_BASE, reply_ack,
             kept=lambda: backend.handler.rings[0].base == 0x80008000)


def test_packed_set_vring_base_values_accepted(backend, ram, caplog):
    """What QEMU and DPDK send: a fresh ring (0x80008000), a position with the used half
    behind the avail one (chains in flight), the used half zero (DPDK's 16-bit
    format); and the bases are checked again when the ring starts (SET_VRING_NUM may
    come after SET_VRING_BASE)."""
    p = _open(backend, True, features=True, memory=ram, packed=True)
    try:
        for base in (0x80008000, 0x0003_0005, (0x8000 | 250) << 16 | 4, 0x8000 | 17, 0,
                     5 << 16 | 0x8000 | 5):         # the last: a whole lap in flight
            assert p.vring_base(0, base, check=False) == 0, hex(base)
        last = backend.num_queues - 1                    # (ring 1, or ring 0 again)
        assert p.vring_base(last, 0x8000 | 300) == 0     # no size yet: 32768 the limit
        p.vring_num(last, 256)
        p.vring_addr(last, ram.uva, ram.uva + 4096, ram.uva + 4100)
        efd = os.eventfd(0)
        try:
            assert p.call(Request.SET_VRING_KICK, U64(last).pack(), [efd],
                          check=False) != 0
        finally:
            os.close(efd)
        assert "not below the ring size 256" in caplog.text
        assert not backend.handler.rings[last].started
        assert p.get_features() == backend.offered
    finally:
        p.close()


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_base_before_features_is_checked_when_the_ring_starts(backend, ram, packed):
    """SET_VRING_BASE before SET_FEATURES (not QEMU's order) is kept as it came; the
    ring's start checks it against the layout then: QEMU's packed fresh base
    0x80008000 starts a packed ring and is refused for a split one."""
    p = _open(backend, True)
    try:
        assert p.vring_base(0, 0x80008000) == 0
        p.set_features(ring_features(p.get_features(), packed))
        p.set_mem_table([ram])
        p.vring_num(0, 256)
        p.vring_addr(0, ram.uva, ram.uva + 8192, ram.uva + 12288)
        efd = os.eventfd(0)
        try:
            ack = p.call(Request.SET_VRING_KICK, U64(0).pack(), [efd], check=False)
        finally:
            os.close(efd)
        assert (ack == 0) == packed
        assert backend.handler.rings[0].started == packed
        if packed:
            assert backend.handler.rings[0].queue.next_avail == 0x8000
        assert p.get_features() == backend.offered
    finally:
        p.close()


def test_split_set_vring_base_reserved_bits(backend, caplog, ram):
    """A split ring's base has 16 bits: anything in bits 16-31 is refused."""
    p = _open(backend, True, features=True, memory=ram)
    p.send(Request.SET_VRING_BASE, VringState(0, 0x80008000).pack(), need_reply=True)
    _refused(backend, caplog, p, Request.SET_VRING_BASE, True)


def test_packed_ring_size_and_layout_checks(backend, caplog, ram):
    """Packed: any size 1..32768 (not only powers of two); the avail/used fields of
    SET_VRING_ADDR are 4-byte event areas, and the descriptor ring must fit."""
    p = _open(backend, True, features=True, memory=ram, packed=True)
    try:
        assert p.vring_num(0, 100) == 0
        assert p.vring_num(0, 32769, check=False) != 0
        assert p.vring_num(0, 0, check=False) != 0
        # event areas right at the end of the region: they fit (4 bytes each)
        assert p.vring_addr(0, ram.uva, ram.uva + ram.size - 8, ram.uva + ram.size - 4) == 0
        # the descriptor ring (16 bytes a slot) does not fit at the end
        assert p.vring_addr(0, ram.uva + ram.size - 1024, ram.uva, ram.uva + 4,
                            check=False) != 0
    finally:
        p.close()
    caplog.clear()
    p = _open(backend, True, features=True, memory=ram)      # split: a power of two
    p.send(Request.SET_VRING_NUM, VringState(0, 100).pack(), need_reply=True)
    _refused(backend, caplog, p, Request.SET_VRING_NUM, True)


def test_ring_layout_cannot_change_while_running(net, caplog, tmp_path):
    """SET_FEATURES that turns VIRTIO_F_RING_PACKED on or off while a ring runs is
    refused (the ring would be read with the wrong layout); the rings go on."""
    ram = GuestRam(8 << 20, name="vu-hostile-layout")
    try:
        with net.connect() as p:
            g = start_net(p, ram, packed=True)
            assert all(r.started for r in net.handler.rings)
            p.send(Request.SET_FEATURES, U64(ring_features(g.features, False)).pack(),
                   need_reply=True)
            _refused(net, caplog, p, Request.SET_FEATURES, True)
            g.close()
    finally:
        ram.close()


def test_packed_in_flight_base_that_lies(tmp_path, caplog):
    """SET_VRING_BASE says chains are in flight (used half behind the avail half) but
    the descriptor at the used slot is not available: the ring resumes from the avail
    position (logged), and frames flow."""
    ram = GuestRam(8 << 20, name="vu-hostile-inflight")
    try:
        with serving(tmp_path, "loopback") as s, s.connect() as p:
            g = start_net(p, ram, packed=True)
            for i in range(3):
                g.driver.send(0, [bytes(60)])
                assert g.driver.wait_tx_done(0)
            bases = g.stop()
            assert bases[1] == (0x8000 | 3) << 16 | 0x8000 | 3
            lie = (0x8000 | 1) << 16 | 0x8000 | 3        # "2 chains in flight"
            g.enable(True)
            g.setup_ring(1, base=lie)
            g.setup_ring(0, base=bases[0])
            assert "not available: resuming from the avail position" in caplog.text
            assert s.handler.rings[1].queue.next_avail == 0x8000 | 3
            assert g.driver.send(0, [b"\x02" * 60]) == 1
            assert g.driver.wait_tx_done(0)
            g.close()
    finally:
        ram.close()


def test_backend_fds_equal_before_and_after_1000_connections(tmp_path, ram):
    path = str(tmp_path / "net.sock")
    log_path = tmp_path / "backend.log"
    with open(log_path, "wb") as logf:
        proc = subprocess.Popen([sys.executable, "-m", "pyvirtio", "net", "--socket-path", path,
                                 "--sink", "--message-timeout", "2"], stdout=logf, stderr=logf)
    try:
        wait_for(lambda: os.path.exists(path), STARTUP, "the socket")
        for i in range(20):                   # warm up every path once
            _cycle(i, path, ram)
        before = _probe(path, proc.pid)
        for i in range(1000):
            _cycle(i, path, ram)
        after = _probe(path, proc.pid)
        assert after == before, f"{before} fds before, {after} after"
        assert proc.poll() is None, log_path.read_text()[-2000:]
    finally:
        proc.terminate()
        rc = proc.wait(30)
    assert rc == 0, log_path.read_text()[-2000:]
    log_text = log_path.read_text()
    assert "Traceback" not in log_text
    assert log_text.count("closing the connection") >= 400
