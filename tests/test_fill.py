"""The fill burst kernel (vqcore.fill): request chains filled from a fd, for split and
packed rings, direct and indirect chains. The engine's driver side plays the guest; a
regular file or a pipe of known bytes stands in for /dev/urandom, so every byte that
lands in guest memory can be checked. Hostile rings reuse test_hostile's and
test_packed_hostile's cases and checks, with the fill burst in place of the pop."""

from __future__ import annotations

import errno
import logging
import os

import numpy as np
import pytest

import test_hostile
import test_packed_hostile
import vqcore
from conftest import build_guest
from ringwriter import (VIRTQ_DESC_F_WRITE as WRITE, offer, read_used_elem, read_used_idx,
                        write_descs)
from vqcore import ChainBatch
from vqcore.errors import AddressOutOfBounds, QueueBroken
from vqcore.fill import MAX_IOV, FillStats, fill_burst

EVENTFD_MAX = 0xFFFFFFFFFFFFFFFE


@pytest.fixture(params=["split", "packed"])
def layout(request) -> str:
    return request.param


@pytest.fixture(params=[False, True], ids=["direct", "indirect"])
def indirect(request) -> bool:
    return request.param


class Rig:
    """A guest (driver queue) and the device queue of one ring in a numpy guest memory
    whose data area starts zeroed; requests are laid out one after the other."""

    def __init__(self, layout: str, *, size: int = 64, indirect: bool = False,
                 event_idx: bool = True, data_size: int = 1 << 20) -> None:
        self.g = build_guest(size, data_size=data_size, indirect_max=8 if indirect else 0,
                             layout=layout)
        self.g.at(self.g.data_addr, data_size)[:] = 0
        self.mem = self.g.memory
        self.drv = self.g.driver(vqcore, event_idx=event_idx)
        self.dev = self.g.device(vqcore, event_idx=event_idx)
        self.indirect = indirect
        self.next = self.g.data_addr
        self.tokens = 0

    def alloc(self, n: int) -> int:
        addr = self.next
        self.next += (n + 63) // 64 * 64
        assert self.next <= self.g.data_addr + self.g.data_size
        return addr

    def post(self, *chains: tuple) -> list[list[tuple[int, int]]]:
        """Offer chains, each a tuple of writable segment sizes (or ``(readable,
        writable)`` size tuples); returns each chain's writable (addr, len) segments."""
        b = ChainBatch(len(chains), 4096)
        out = []
        for c in chains:
            rd, wr = c if c and isinstance(c[0], tuple) else ((), c)
            rsegs = [(self.alloc(n), n) for n in rd]
            for a, n in rsegs:
                self.mem.write(a, bytes([0xEE]) * n)
            wsegs = [(self.alloc(n), n) for n in wr]
            b.append(readable=rsegs, writable=wsegs, token=self.tokens)
            self.tokens += 1
            out.append(wsegs)
        assert self.drv.add(b, indirect=self.indirect) == len(chains)
        return out

    def completed(self) -> list[tuple[int, int]]:
        """(token, used length) of each chain the device returned, in order."""
        b = ChainBatch(self.g.size)
        n = self.drv.reclaim(b)
        return [(int(b.tokens[i]), int(b.used_len[i])) for i in range(n)]

    def read(self, segs: list[tuple[int, int]], length: int) -> bytes:
        """The first ``length`` bytes of a chain's writable segments."""
        data = b"".join(self.mem.read(a, n) for a, n in segs)
        return data[:length]


def random_bytes(n: int, seed: int = 1) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


@pytest.fixture
def source(tmp_path):
    """``source(n)``: a non-blocking fd of a regular file of ``n`` known bytes, and the
    bytes."""
    opened = []

    def make(n: int, seed: int = 1) -> tuple[int, bytes]:
        data = random_bytes(n, seed)
        path = tmp_path / f"source{len(opened)}"
        path.write_bytes(data)
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        opened.append(fd)
        return fd, data

    yield make
    for fd in opened:
        os.close(fd)


@pytest.fixture
def pipe():
    r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    yield r, w
    os.close(r)
    os.close(w)


@pytest.fixture
def eventfd():
    fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    yield fd
    os.close(fd)


# ---- the bytes land where the guest asked, split and packed, direct and indirect ---------------

def test_requests_are_filled_byte_exact(layout, indirect, source):
    rig = Rig(layout, indirect=indirect)
    sizes = [64, 1, 4096, 333, 16, 2048]
    segs = rig.post(*[(n,) for n in sizes])
    fd, data = source(10000)
    st = FillStats()
    assert fill_burst(rig.dev, ChainBatch(64), fd, st) == len(sizes)
    assert rig.completed() == [(i, n) for i, n in enumerate(sizes)]
    pos = 0
    for s, n in zip(segs, sizes):
        assert rig.read(s, n) == data[pos:pos + n]
        pos += n
    assert st.as_dict() == {"requests": 6, "bytes": sum(sizes), "bursts": 1,
                            "notifications": 0, "errors": 0, "read_errors": 0}
    assert st.ring_empty and not st.fd_empty and not st.fd_failed
    assert rig.dev.in_flight == 0


def test_multi_segment_chains_and_readable_segments_are_skipped(layout, indirect, source):
    """Writable segments are filled in order; readable ones (which the spec's requests
    do not have) are skipped and not counted."""
    rig = Rig(layout, indirect=indirect)
    chains = [(7, 100, 3), ((32,), (50, 50)), ((16, 16), (1,)), (4000, 96)]
    segs = rig.post(*chains)
    fd, data = source(10000)
    st = FillStats()
    assert fill_burst(rig.dev, ChainBatch(64), fd, st) == 4
    want = [110, 100, 1, 4096]
    assert rig.completed() == list(enumerate(want))
    pos = 0
    for s, n in zip(segs, want):
        assert rig.read(s, n) == data[pos:pos + n]
        pos += n
    assert st.bytes == sum(want) and st.errors == 0


def test_readable_segments_keep_their_bytes(layout, source):
    rig = Rig(layout)
    rd_addr = rig.next
    segs = rig.post(((48,), (64,)))
    fd, data = source(1000)
    assert fill_burst(rig.dev, ChainBatch(8), fd, FillStats()) == 1
    assert rig.mem.read(rd_addr, 48) == bytes([0xEE]) * 48
    assert rig.read(segs[0], 64) == data[:64]


def test_a_chain_beyond_one_readv_is_filled_in_several(source):
    """A chain of more segments than one readv takes (MAX_IOV) is filled in pieces."""
    n = MAX_IOV + 300
    rig = Rig("split", size=2048)
    segs = rig.post(tuple([3] * n))
    fd, data = source(4 * n)
    st = FillStats()
    assert fill_burst(rig.dev, ChainBatch(8, 4096), fd, st) == 1
    assert rig.completed() == [(0, 3 * n)]
    assert rig.read(segs[0], 3 * n) == data[:3 * n]


def test_a_writable_buffer_across_adjacent_regions_is_filled_in_both(source):
    """Guest-adjacent regions that are not host-adjacent (test_hostile's memory map): the
    buffer is two iovecs, each in its own region; no guard byte changes."""
    env = test_hostile.Env(huge=False)
    try:
        start = test_hostile.R0_END - 24
        write_descs(env.mem, test_hostile.RING.desc, [(start, 64, WRITE)])
        offer(env.mem, test_hostile.RING.avail, test_hostile.Q, [0])
        fd, data = source(200)
        st = FillStats()
        assert fill_burst(env.dev, ChainBatch(4), fd, st) == 1
        assert env.mem.read(start, 64) == data[:64]
        env.check_guards()
    finally:
        env.close()


# ---- the byte budget: nothing completed empty because of it; unpop gives the rest back ----------

@pytest.mark.parametrize("budget, first", [(250, [100, 100, 50]), (200, [100, 100]),
                                           (1, [1]), (99, [99])])
def test_the_budget_never_completes_a_request_empty(layout, indirect, source, budget, first):
    rig = Rig(layout, indirect=indirect)
    segs = rig.post(*[(100,)] * 8)
    fd, data = source(10000)
    st = FillStats()
    assert fill_burst(rig.dev, ChainBatch(64), fd, st, max_bytes=budget) == len(first)
    assert rig.completed() == list(enumerate(first))
    assert st.bytes == budget and not st.ring_empty
    # what was not served went back to the ring, not into flight
    assert rig.dev.in_flight == 0
    # the next burst serves the rest, continuing the stream
    rest = fill_burst(rig.dev, ChainBatch(64), fd, st)
    assert rest == 8 - len(first)
    done = rig.completed()
    assert [t for t, _ in done] == list(range(len(first), 8))
    assert all(n > 0 for _, n in done)
    assert [n for _, n in done] == [100] * rest
    got = b"".join(rig.read(s, n) for s, n in zip(segs, first + [n for _, n in done]))
    assert got == data[:len(got)]
    assert st.ring_empty and st.requests == 8


def test_a_zero_budget_pops_nothing(layout, source):
    rig = Rig(layout)
    rig.post((100,), (100,))
    fd, _ = source(1000)
    st = FillStats()
    start = rig.dev.next_avail
    assert fill_burst(rig.dev, ChainBatch(8), fd, st, max_bytes=0) == 0
    assert rig.dev.in_flight == 0 and rig.dev.next_avail == start and not st.ring_empty
    assert rig.completed() == []
    with pytest.raises(ValueError):
        fill_burst(rig.dev, ChainBatch(8), fd, st, max_bytes=-1)


def test_a_small_batch_leaves_the_rest_for_the_next_burst(layout, source):
    rig = Rig(layout)
    rig.post(*[(10,)] * 10)
    fd, _ = source(1000)
    st = FillStats()
    assert fill_burst(rig.dev, ChainBatch(4), fd, st) == 4
    assert not st.ring_empty
    assert fill_burst(rig.dev, ChainBatch(4), fd, st) == 4
    assert fill_burst(rig.dev, ChainBatch(4), fd, st) == 2
    assert st.ring_empty and st.requests == 10 and st.bursts == 3
    assert fill_burst(rig.dev, ChainBatch(4), fd, st) == 0 and st.ring_empty
    assert st.bursts == 3


# ---- the fd: end of file, nothing to read, errors -----------------------------------------------

def test_end_of_file_completes_what_it_got_and_leaves_the_rest(layout, source):
    rig = Rig(layout)
    segs = rig.post((100,), (100,), (100,))
    fd, data = source(150)
    st = FillStats()
    assert fill_burst(rig.dev, ChainBatch(8), fd, st) == 2
    assert rig.completed() == [(0, 100), (1, 50)]     # the second got what there was
    assert rig.read(segs[1], 50) == data[100:150]
    assert st.fd_failed and st.last_errno == 0 and st.read_errors == 1 and st.errors == 1
    assert not st.ring_empty and rig.dev.in_flight == 0
    # at end of file a request gets nothing: it stays in the ring
    assert fill_burst(rig.dev, ChainBatch(8), fd, st) == 0
    assert rig.completed() == [] and st.fd_failed and st.read_errors == 2
    assert rig.dev.in_flight == 0 and not rig.dev.broken


def test_an_empty_pipe_leaves_requests_waiting(layout, pipe):
    r, w = pipe
    rig = Rig(layout)
    segs = rig.post((100,), (100,), (100,))
    st = FillStats()
    assert fill_burst(rig.dev, ChainBatch(8), r, st) == 0
    assert st.fd_empty and not st.fd_failed and st.errors == 0
    assert rig.dev.in_flight == 0 and rig.completed() == []
    # a short read fills part of a request, completes it, and the rest waits
    data = random_bytes(150)
    os.write(w, data)
    assert fill_burst(rig.dev, ChainBatch(8), r, st) == 2
    assert rig.completed() == [(0, 100), (1, 50)]
    assert rig.read(segs[0], 100) + rig.read(segs[1], 50) == data
    assert st.fd_empty and st.errors == 0
    os.write(w, data[:100])
    assert fill_burst(rig.dev, ChainBatch(8), r, st) == 1
    assert rig.completed() == [(2, 100)] and st.ring_empty


def test_a_failing_fd_is_counted_and_leaves_requests_waiting(layout, tmp_path):
    rig = Rig(layout)
    rig.post((100,), (100,))
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)     # read() fails: EISDIR
    try:
        st = FillStats()
        assert fill_burst(rig.dev, ChainBatch(8), fd, st) == 0
        assert st.fd_failed and st.last_errno == errno.EISDIR
        assert st.read_errors == 1 and st.errors == 1
    finally:
        os.close(fd)
    st2 = FillStats()
    assert fill_burst(rig.dev, ChainBatch(8), -1, st2) == 0
    assert st2.last_errno == errno.EBADF
    assert rig.completed() == [] and rig.dev.in_flight == 0 and not rig.dev.broken


def test_chains_without_a_writable_byte_complete_empty_and_count(layout, indirect, source):
    rig = Rig(layout, indirect=indirect)
    segs = rig.post((64,), ((32,), ()), (64,), ((16, 16), ()), (64,))
    fd, data = source(1000)
    st = FillStats()
    assert fill_burst(rig.dev, ChainBatch(8), fd, st) == 5
    assert rig.completed() == [(0, 64), (1, 0), (2, 64), (3, 0), (4, 64)]
    assert rig.read(segs[2], 64) == data[64:128]
    assert st.errors == 2 and st.read_errors == 0 and st.bytes == 192 and st.requests == 5


def test_a_readable_only_chain_completes_even_without_data(layout, pipe):
    """Empty (0-length) completion is for chains that can never be filled, whatever
    the fd says; a fillable one behind them waits."""
    rig = Rig(layout)
    rig.post(((32,), ()), (64,))
    st = FillStats()
    assert fill_burst(rig.dev, ChainBatch(8), pipe[0], st) == 1
    assert rig.completed() == [(0, 0)] and st.fd_empty and st.errors == 1
    assert rig.dev.in_flight == 0


# ---- notifications ------------------------------------------------------------------------

def test_one_notification_per_burst_with_event_idx(layout, source, eventfd):
    rig = Rig(layout, event_idx=True)
    fd, _ = source(100000)
    st = FillStats()
    rig.drv.enable_interrupts()
    rig.post(*[(16,)] * 8)
    assert fill_burst(rig.dev, ChainBatch(64), fd, st, call_fd=eventfd) == 8
    assert st.notifications == 1 and os.eventfd_read(eventfd) == 1
    # the driver has not looked yet: more completions do not interrupt it again
    rig.post(*[(16,)] * 4)
    assert fill_burst(rig.dev, ChainBatch(64), fd, st, call_fd=eventfd) == 4
    assert st.notifications == 1
    with pytest.raises(BlockingIOError):
        os.eventfd_read(eventfd)
    # it reclaims and asks again: the next burst interrupts once
    assert len(rig.completed()) == 12
    rig.drv.enable_interrupts()
    rig.post(*[(16,)] * 4)
    assert fill_burst(rig.dev, ChainBatch(2), fd, st, call_fd=eventfd) == 2
    assert fill_burst(rig.dev, ChainBatch(2), fd, st, call_fd=eventfd) == 2
    assert st.notifications == 2 and os.eventfd_read(eventfd) == 1


@pytest.mark.parametrize("event_idx", [False, True])
def test_no_notification_when_the_driver_disabled_interrupts(layout, source, eventfd,
                                                             event_idx):
    rig = Rig(layout, event_idx=event_idx)
    fd, _ = source(1000)
    st = FillStats()
    rig.post((16,))             # (the first decision after a start may always signal)
    assert fill_burst(rig.dev, ChainBatch(8), fd, st, call_fd=eventfd) == 1
    before = st.notifications
    rig.drv.disable_interrupts()
    rig.post(*[(16,)] * 4)
    assert fill_burst(rig.dev, ChainBatch(8), fd, st, call_fd=eventfd) == 4
    assert st.notifications == before


def test_a_full_call_eventfd_counts_as_signalled(layout, source, eventfd):
    os.eventfd_write(eventfd, EVENTFD_MAX)
    rig = Rig(layout)
    rig.drv.enable_interrupts()
    rig.post((16,))
    fd, _ = source(100)
    st = FillStats()
    assert fill_burst(rig.dev, ChainBatch(8), fd, st, call_fd=eventfd) == 1
    assert st.notifications == 1


def test_no_burst_no_notification(layout, source, eventfd):
    rig = Rig(layout)
    rig.drv.enable_interrupts()
    fd, _ = source(100)
    st = FillStats()
    assert fill_burst(rig.dev, ChainBatch(8), fd, st, call_fd=eventfd) == 0
    assert st.notifications == 0 and st.bursts == 0 and st.ring_empty


# ---- hostile rings ----------------------------------------------------------------------------

@pytest.fixture
def split_log(caplog):
    caplog.set_level(logging.WARNING, logger=test_hostile.LOGGER)
    return caplog


@pytest.fixture
def packed_log(caplog):
    caplog.set_level(logging.WARNING, logger=test_packed_hostile.LOGGER)
    return caplog


def filler(env, fd, st):
    return lambda batch: fill_burst(env.dev, batch, fd, st)


@pytest.mark.parametrize("build, exc_cls", [pytest.param(b, c, id=n)
                                            for n, c, b in test_hostile.HOSTILE])
def test_split_violation(split_log, source, build, exc_cls):
    """Each hostile split ring of test_hostile, met by a fill burst: the exact class,
    the queue broken, one log line, no byte outside guest memory, the healthy pair
    unharmed (test_hostile.expect_violation)."""
    env = test_hostile.Env()
    try:
        heads = build(env)
        if heads is not None:
            offer(env.mem, test_hostile.RING.avail, test_hostile.Q, heads)
        fd, _ = source(1 << 16)
        st = FillStats()
        test_hostile.expect_violation(env, split_log, env.dev, exc_cls, filler(env, fd, st),
                                      ChainBatch(test_hostile.Q))
        assert st.bytes == 0 and st.requests == st.errors
    finally:
        env.close()


@pytest.mark.parametrize("build, exc_cls", [pytest.param(b, c, id=n)
                                            for n, c, b in test_packed_hostile.HOSTILE])
def test_packed_violation(packed_log, source, build, exc_cls):
    """The same for each hostile packed ring of test_packed_hostile."""
    env = test_packed_hostile.PackedEnv()
    try:
        build(env)
        fd, _ = source(1 << 16)
        st = FillStats()
        test_packed_hostile.expect_violation(env, packed_log, env.dev, exc_cls,
                                             filler(env, fd, st), ChainBatch(test_hostile.Q))
        # the good chains before a bad one (readable-only here) were completed empty
        assert st.bytes == 0 and st.requests == st.errors
    finally:
        env.close()


def test_requests_before_the_bad_one_are_still_filled(split_log, source):
    """A violation after good requests: those are filled and completed, then the
    violation is raised and the queue is broken."""
    env = test_hostile.Env()
    try:
        buf = test_hostile.BUF
        write_descs(env.mem, test_hostile.RING.desc, [(buf, 64, WRITE), (buf + 64, 32, WRITE),
                                                      (test_hostile.GAP, 16, WRITE)])
        offer(env.mem, test_hostile.RING.avail, test_hostile.Q, [0, 1, 2])
        fd, data = source(1000)
        st = FillStats()
        with pytest.raises(AddressOutOfBounds):
            fill_burst(env.dev, ChainBatch(16), fd, st)
        assert env.dev.broken and st.requests == 2 and st.bytes == 96
        assert env.mem.read(buf, 96) == data[:96]
        assert read_used_idx(env.mem, test_hostile.RING.used) == 2
        assert [read_used_elem(env.mem, test_hostile.RING.used, test_hostile.Q, i)
                for i in range(2)] == [(0, 64), (1, 32)]
        with pytest.raises(QueueBroken):
            fill_burst(env.dev, ChainBatch(16), fd, st)
        env.check_guards()
        env.check_healthy()
    finally:
        env.close()
