"""The virtio-net burst kernels (vqcore.net) over a datagram socketpair standing in for
a TAP queue fd (one datagram = one frame with its virtio-net header); the engine's
driver side plays the guest. The TAP itself is exercised in test_net_tap.py."""

import os
import socket

import numpy as np
import pytest

from vqcore import ChainBatch, GuestMemory, SplitDeviceQueue, SplitDriverQueue, split_addresses
from vqcore.errors import NetHeaderError, QueueBroken
from vqcore.net import DISCARD_FD, NetRxFilter, NetStats, rx_burst, tx_burst

HDR = 12
DATA = 0x100000
SIZE = 64


class Guest:
    """One TX and one RX ring in a fresh guest memory, both sides."""

    def __init__(self, size=SIZE, event_idx=True):
        self.buf = np.zeros(16 << 20, np.uint8)
        self.mem = GuestMemory([(0, self.buf)])
        tx, rx = split_addresses(0x1000, size), split_addresses(0x20000, size)
        self.gtx = SplitDriverQueue(self.mem, size, *tx[:3], event_idx=event_idx)
        self.dtx = SplitDeviceQueue(self.mem, size, *tx[:3], event_idx=event_idx)
        self.grx = SplitDriverQueue(self.mem, size, *rx[:3], event_idx=event_idx)
        self.drx = SplitDeviceQueue(self.mem, size, *rx[:3], event_idx=event_idx)
        self.next = DATA

    def alloc(self, n):
        addr = self.next
        self.next += (n + 63) // 64 * 64
        return addr

    def send(self, frames, split_at=None):
        """Queue frames (each with a zero vnet header) on the TX ring."""
        b = ChainBatch(len(frames))
        for i, f in enumerate(frames):
            data = bytes(HDR) + f
            a = self.alloc(len(data))
            self.mem.write(a, data)
            cut = split_at if split_at is not None else HDR
            segs = [(a, cut), (a + cut, len(data) - cut)] if 0 < cut < len(data) else [(a, len(data))]
            b.append(segs, token=i)
        assert self.gtx.add(b) == len(frames)

    def post_rx(self, count, size):
        b = ChainBatch(count)
        addrs = []
        for i in range(count):
            a = self.alloc(size)
            addrs.append(a)
            b.append(writable=[(a, size)], token=a)
        assert self.grx.add(b) == count
        return addrs

    def received(self):
        out = ChainBatch(256)
        n = self.grx.reclaim(out)
        return [(int(out.tokens[i]), int(out.used_len[i])) for i in range(n)]


@pytest.fixture
def pair():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    a.setblocking(False)
    b.setblocking(False)
    yield a, b
    a.close()
    b.close()


def frame(n, seed):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, n, dtype=np.uint8).tobytes()


@pytest.mark.parametrize("size", [60, 1514, 9000])
def test_tx_frames_leave_byte_exact(pair, size):
    g = Guest()
    frames = [frame(size, i) for i in range(5)]
    g.send(frames)
    st = NetStats()
    assert tx_burst(g.dtx, ChainBatch(64), pair[0].fileno(), st) == 5
    for f in frames:
        got = pair[1].recv(70000)
        assert got == bytes(HDR) + f
    assert st.packets == 5 and st.bytes == 5 * size and st.errors == 0
    done = ChainBatch(16)
    assert g.gtx.reclaim(done) == 5
    assert list(done.used_len) == [0] * 5           # TX: the device wrote nothing


@pytest.mark.parametrize("fd", [DISCARD_FD, -1])
def test_tx_without_an_fd_consumes_every_chain(fd):
    """DISCARD_FD (a sink) counts frames as sent; -1 (a disabled ring) as dropped.
    Either way every chain goes back to the guest, with nothing written into it."""
    g = Guest()
    frames = [frame(60 + 100 * i, i) for i in range(5)]
    g.send(frames)
    st = NetStats()
    sent = tx_burst(g.dtx, ChainBatch(64), fd, st)
    if fd == DISCARD_FD:
        assert sent == 5 and st.packets == 5 and st.dropped == 0
        assert st.bytes == sum(len(f) for f in frames)
    else:
        assert sent == 0 and st.packets == 0 and st.dropped == 5 and st.bytes == 0
    assert st.errors == 0
    done = ChainBatch(16)
    assert g.gtx.reclaim(done) == 5
    assert list(done.used_len) == [0] * 5


def test_tx_header_split_across_segments(pair):
    g = Guest()
    f = frame(100, 7)
    g.send([f], split_at=5)                          # header itself split 5 + 7
    assert tx_burst(g.dtx, ChainBatch(8), pair[0].fileno(), NetStats()) == 1
    assert pair[1].recv(1000) == bytes(HDR) + f


def test_tx_chain_shorter_than_header_is_a_violation(pair):
    g = Guest()
    # a good frame, then a chain of 8 bytes (shorter than the 12-byte header)
    g.send([frame(60, 1)])
    b = ChainBatch(1)
    b.append([(g.alloc(8), 8)], token=99)
    g.gtx.add(b)
    st = NetStats()
    with pytest.raises(NetHeaderError):
        tx_burst(g.dtx, ChainBatch(8), pair[0].fileno(), st)
    assert pair[1].recv(1000)[HDR:] == frame(60, 1)  # the good one was still sent
    assert g.dtx.broken and st.errors == 1
    done = ChainBatch(8)
    assert g.gtx.reclaim(done) == 2                  # both returned to the guest
    with pytest.raises(QueueBroken):
        tx_burst(g.dtx, ChainBatch(8), pair[0].fileno(), st)


def test_tx_full_fd_gives_chains_back(pair):
    g = Guest(size=128)
    a, b = pair
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    frames = [frame(1000, i) for i in range(40)]
    g.send(frames)
    st = NetStats()
    sent = tx_burst(g.dtx, ChainBatch(64), a.fileno(), st)
    assert 0 < sent < 40
    assert g.dtx.in_flight == 0 and g.dtx.next_avail == sent   # the rest stays available
    got = []
    while True:
        try:
            got.append(b.recv(2000))
        except BlockingIOError:
            break
    total = sent
    while total < 40:
        total += tx_burst(g.dtx, ChainBatch(64), a.fileno(), st)
        while True:
            try:
                got.append(b.recv(2000))
            except BlockingIOError:
                break
    assert [x[HDR:] for x in got] == frames           # nothing lost, nothing repeated
    assert st.packets == 40


def test_tx_interrupt_through_call_fd(pair):
    g = Guest()
    call = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        g.gtx.enable_interrupts()
        g.send([frame(60, 1)])
        st = NetStats()
        tx_burst(g.dtx, ChainBatch(8), pair[0].fileno(), st, call_fd=call)
        assert st.notifications == 1 and os.eventfd_read(call) == 1
        g.gtx.disable_interrupts()
        g.send([frame(60, 2)])
        tx_burst(g.dtx, ChainBatch(8), pair[0].fileno(), st, call_fd=call)
        assert st.notifications == 1
        with pytest.raises(BlockingIOError):
            os.eventfd_read(call)
    finally:
        os.close(call)


@pytest.mark.parametrize("size", [60, 1514, 9000])
def test_rx_frames_arrive_byte_exact(pair, size):
    g = Guest()
    addrs = g.post_rx(8, 9100)
    frames = [frame(size, 10 + i) for i in range(3)]
    for f in frames:
        pair[1].send(bytes(HDR) + f)
    st = NetStats()
    assert rx_burst(g.drx, ChainBatch(64), pair[0].fileno(), st, max_frame=9100) == 3
    got = g.received()
    assert [a for a, _ in got] == addrs[:3]
    for (a, n), f in zip(got, frames):
        assert n == HDR + size
        data = g.mem.read(a, n)
        assert data[HDR:] == f
        assert data[10:12] == (1).to_bytes(2, "little")      # num_buffers = 1
    assert st.tap_empty and g.drx.in_flight == 0
    assert g.drx.next_avail == 3                              # unused buffers stay available


def test_rx_mergeable_buffers_span_chains(pair):
    g = Guest()
    g.post_rx(32, 1536)
    big = frame(4000, 3)
    pair[1].send(bytes(HDR) + big)
    pair[1].send(bytes(HDR) + frame(100, 4))
    st = NetStats()
    assert rx_burst(g.drx, ChainBatch(64), pair[0].fileno(), st, mrg_rxbuf=True,
                    max_frame=9000) == 2
    got = g.received()
    assert [n for _, n in got] == [1536, 1536, 940, 112]
    data = b"".join(g.mem.read(a, n) for a, n in got[:3])
    assert data[10:12] == (3).to_bytes(2, "little")
    assert data[HDR:] == big
    assert g.mem.read(got[3][0], 12)[10:12] == (1).to_bytes(2, "little")


def test_rx_out_of_buffers_leaves_frames_in_fd(pair):
    g = Guest()
    g.post_rx(2, 1536)
    frames = [frame(200, 20 + i) for i in range(5)]
    for f in frames:
        pair[1].send(bytes(HDR) + f)
    st = NetStats()
    assert rx_burst(g.drx, ChainBatch(64), pair[0].fileno(), st, max_frame=1536) == 2
    # no more chains: the burst stops without reading the third frame
    assert rx_burst(g.drx, ChainBatch(64), pair[0].fileno(), st, max_frame=1536) == 0
    assert st.ring_empty and not st.tap_empty
    g.post_rx(8, 1536)
    assert rx_burst(g.drx, ChainBatch(64), pair[0].fileno(), st, max_frame=1536) == 3
    got = g.received()
    assert [g.mem.read(a, n)[HDR:] for a, n in got] == frames   # nothing lost, in order


def test_rx_mergeable_waits_for_room_for_the_largest_frame(pair):
    g = Guest(size=64)
    g.post_rx(4, 1536)                 # 6 KiB: less than a 64 KiB GSO frame
    pair[1].send(bytes(HDR) + frame(100, 1))
    st = NetStats()
    assert rx_burst(g.drx, ChainBatch(64), pair[0].fileno(), st, mrg_rxbuf=True,
                    max_frame=65562) == 0
    assert st.ring_empty and st.no_room == 1 and g.drx.next_avail == 0
    g.post_rx(60, 1536)                # now the whole ring is posted (64 x 1.5 KiB)
    assert rx_burst(g.drx, ChainBatch(64), pair[0].fileno(), st, mrg_rxbuf=True,
                    max_frame=65562) == 1


def test_rx_filter_drops_and_reuses_buffers(pair):
    g = Guest()
    g.post_rx(4, 1536)
    own = bytes.fromhex("020000000001")
    flt = NetRxFilter(own)
    flt.promisc = False
    other = bytes.fromhex("020000000002") + own + b"\x08\x00" + bytes(46)
    mine = own + bytes.fromhex("020000000002") + b"\x08\x00" + bytes(46)
    pair[1].send(bytes(HDR) + other)
    pair[1].send(bytes(HDR) + mine)
    st = NetStats()
    assert rx_burst(g.drx, ChainBatch(64), pair[0].fileno(), st, flt, max_frame=1536) == 1
    assert st.filtered == 1
    got = g.received()
    assert len(got) == 1 and g.mem.read(got[0][0], got[0][1])[HDR:] == mine


def test_rx_chain_without_room_for_header_is_a_violation(pair):
    g = Guest()
    b = ChainBatch(1)
    b.append(writable=[(g.alloc(8), 8)], token=1)
    g.grx.add(b)
    pair[1].send(bytes(HDR) + frame(60, 1))
    with pytest.raises(NetHeaderError):
        rx_burst(g.drx, ChainBatch(8), pair[0].fileno(), NetStats(), max_frame=1536)
    assert g.drx.broken
