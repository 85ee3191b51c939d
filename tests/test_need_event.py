"""vring_need_event (VIRTIO 1.2 section 2.7.10) and event-index notification at queue level.

The spec's expression ``(u16)(new - event - 1) < (u16)(new - old)`` is checked against an
independent statement of what it means: the indices ``old, old+1, ..., new-1`` were just
used (or made available), and the other side asked to be told when index ``event`` is
passed, so a notification is due exactly when ``event`` is one of them, i.e. when
``(event - old) mod 2**16 < (new - old) mod 2**16``. Exhaustive around both wrap points
(0xFFFF -> 0 and 0x7FFF -> 0x8000, where a signed comparison would go wrong).

At queue level the ring is written by a hand-made stand-in for the other side (plain
struct writes into guest memory), so neither implementation checks the other.
"""

import struct

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import vqcore
import vqcore.model

U16 = 0x10000


def expected_need_event(event, new, old):
    """Independent formula: is ``event`` among the indices old .. new-1 (mod 2**16)?"""
    return (event - old) % U16 < (new - old) % U16


@pytest.mark.parametrize("center", [0x0000, 0x8000])
def test_need_event_exhaustive_around_wrap(impl, center):
    window, span = 24, 40                      # olds, news within ±span, events around
    need = impl.need_event
    events = np.arange(center - window - span - 2, center + window + span + 2) % U16
    checked = 0
    for old in range(center - window, center + window):
        old %= U16
        for d in range(-span, span + 1):
            new = (old + d) % U16
            want = (events - old) % U16 < (new - old) % U16
            got = [need(int(e), new, old) for e in events]
            assert got == want.tolist(), (old, new)
            checked += len(events)
    assert checked > 200_000


def test_need_event_examples(impl):
    need = impl.need_event
    assert need(0, 1, 0) is True               # the first used index was asked for
    assert need(1, 1, 0) is False              # event = new: not passed yet
    assert need(0xFFFF, 0, 0xFFFF) is True     # across the wrap
    assert need(0xFFFF, 1, 0xFFFE) is True
    assert need(0, 1, 0xFFFF) is True
    assert need(1, 1, 0xFFFF) is False
    assert need(0x7FFF, 0x8000, 0x7FFF) is True
    assert need(0x8000, 0x8000, 0x7FFF) is False
    assert need(5, 5, 5) is False              # nothing new: never
    assert need(0x8005, 5, 5) is False


@settings(max_examples=3000, deadline=None)
@given(st.integers(0, 0xFFFF), st.integers(0, 0xFFFF), st.integers(0, 0xFFFF))
def test_need_event_random(event, new, old):
    want = expected_need_event(event, new, old)
    assert vqcore.need_event(event, new, old) is want
    assert vqcore.model.need_event(event, new, old) is want


# ---- queue level ---------------------------------------------------------------------------

def u16(guest, gpa):
    return struct.unpack("<H", guest.at(gpa, 2).tobytes())[0]


def put16(guest, gpa, value):
    guest.at(gpa, 2)[:] = np.frombuffer(struct.pack("<H", value % U16), np.uint8)


class RawDriver:
    """The driver's half of the ring written by hand: each descriptor i is a one-buffer
    chain (16 writable bytes); ``offer`` puts heads on the avail ring and publishes."""

    def __init__(self, guest, start):
        self.g, self.n = guest, guest.size
        self.avail_idx = start
        self.free = list(range(self.n))
        for i in range(self.n):
            guest.at(guest.ring.desc + 16 * i, 16)[:] = np.frombuffer(
                struct.pack("<QIHH", guest.data_addr + 16 * i, 16, 2, 0), np.uint8)
        put16(guest, guest.ring.avail + 2, start)

    def offer(self, m):
        heads, self.free = self.free[:m], self.free[m:]
        for h in heads:
            put16(self.g, self.g.ring.avail + 4 + 2 * (self.avail_idx % self.n), h)
            self.avail_idx = (self.avail_idx + 1) % U16
        put16(self.g, self.g.ring.avail + 2, self.avail_idx)
        return heads

    def set_used_event(self, value):
        put16(self.g, self.g.ring.avail + 4 + 2 * self.n, value)


@pytest.mark.parametrize("start", [0xFFE0, 0x7FF0, 0])
@pytest.mark.parametrize("size", [1, 4, 16])
def test_device_needs_notification_honours_used_event(impl, make_guest, size, start):
    guest = make_guest(size, data_size=4096)
    drv = RawDriver(guest, start)
    dev = guest.device(impl, event_idx=True)
    dev.next_avail = start                     # restore, as after SET_VRING_BASE
    dev.next_used = start
    put16(guest, guest.ring.used + 2, start)
    assert dev.needs_notification() is True    # the first decision after a restore
    assert dev.needs_notification() is False   # nothing used since
    batch = impl.ChainBatch(size)
    rng = np.random.default_rng(size * 7 + start)
    old = start
    for step in range(60):
        m = int(rng.integers(1, size + 1))
        heads = drv.offer(m)
        assert dev.pop(batch) == m and batch.heads.tolist() == heads
        new = (old + m) % U16
        # ask for an event just before, at, inside, at the end of, and past the batch
        event = (old + int(rng.choice([-2, -1, 0, m // 2, m - 1, m, m + 1, 0x8000]))) % U16
        drv.set_used_event(event)
        dev.push(heads, [16] * m)
        assert u16(guest, guest.ring.used + 2) == new == dev.next_used
        assert dev.needs_notification() is expected_need_event(event, new, old), (old, new, event)
        assert dev.needs_notification() is False          # nothing new since the decision
        drv.free += heads
        old = new
    assert old != start and (start + 60 * size >= U16) == (old < start) or start == 0


def test_device_needs_notification_accumulates_pushes(impl, make_guest):
    """Pushes between two decisions are judged together: old is the used index at the
    last decision, not before the last push."""
    guest = make_guest(8, data_size=4096)
    drv = RawDriver(guest, 0xFFFE)
    dev = guest.device(impl, event_idx=True)
    dev.next_avail = dev.next_used = 0xFFFE
    put16(guest, guest.ring.used + 2, 0xFFFE)
    dev.needs_notification()
    batch = impl.ChainBatch(8)
    heads = drv.offer(4)
    assert dev.pop(batch) == 4
    drv.set_used_event(0xFFFF)                 # the second used index
    dev.push(heads[:2], [0, 0])                # 0xFFFE, 0xFFFF
    dev.push(heads[2:], [0, 0])                # 0x0000, 0x0001
    assert dev.next_used == 2
    assert dev.needs_notification() is True    # 0xFFFF was passed by the first push


def test_device_without_event_idx_honours_no_interrupt(impl, make_guest):
    guest = make_guest(4, data_size=4096)
    drv = RawDriver(guest, 0)
    dev = guest.device(impl)
    batch = impl.ChainBatch(4)
    for flags, want in [(1, False), (0, True), (1, False)]:
        put16(guest, guest.ring.avail, flags)  # VIRTQ_AVAIL_F_NO_INTERRUPT
        heads = drv.offer(2)
        dev.pop(batch)
        dev.push(heads, [0, 0])
        assert dev.needs_notification() is want
        assert dev.needs_notification() is False
        drv.free += heads


def test_device_enable_notification_writes_avail_event(impl, make_guest):
    guest = make_guest(4, data_size=4096)
    drv = RawDriver(guest, 0xFFFE)
    dev = guest.device(impl, event_idx=True)
    dev.next_avail = 0xFFFE
    avail_event = guest.ring.used + 4 + 8 * 4
    assert dev.enable_notification() is False and u16(guest, avail_event) == 0xFFFE
    drv.offer(3)
    assert dev.enable_notification() is True and u16(guest, avail_event) == 0xFFFE
    assert dev.pop(impl.ChainBatch(4)) == 3 and dev.next_avail == 1
    assert dev.enable_notification() is False and u16(guest, avail_event) == 1
    dev.disable_notification()                 # a no-op with event idx
    assert u16(guest, avail_event) == 1 and u16(guest, guest.ring.used) == 0


class RawDevice:
    """The device's half of the ring by hand: returns every available head as used."""

    def __init__(self, guest):
        self.g, self.n = guest, guest.size
        self.last_avail = 0
        self.used_idx = 0

    def complete_all(self):
        avail_idx = u16(self.g, self.g.ring.avail + 2)
        ring = self.g.at(self.g.ring.avail + 4, 2 * self.n).view("<u2")
        used = self.g.at(self.g.ring.used + 4, 8 * self.n).view("<u4").reshape(self.n, 2)
        count = (avail_idx - self.last_avail) % U16
        pos = (self.last_avail + np.arange(count)) % U16
        used[(self.used_idx + np.arange(count)) % self.n, 0] = ring[pos % self.n]
        used[(self.used_idx + np.arange(count)) % self.n, 1] = 0
        self.last_avail = avail_idx
        self.used_idx = (self.used_idx + count) % U16
        put16(self.g, self.g.ring.used + 2, self.used_idx)

    def set_avail_event(self, value):
        put16(self.g, self.g.ring.used + 4 + 8 * self.n, value)


@pytest.mark.parametrize("size", [64])
def test_driver_kick_needed_honours_avail_event_across_wrap(impl, make_guest, size):
    guest = make_guest(size, data_size=4096)
    drv = guest.driver(impl, event_idx=True)
    dev = RawDevice(guest)
    # one segment per chain, a whole ring per round, up to just before the wrap
    full = impl.ChainBatch(size)
    full.load(np.full(size, guest.data_addr), np.full(size, 16), np.ones(size), np.zeros(size),
              np.arange(size))
    back = impl.ChainBatch(size)
    target = U16 - 3 * size
    while drv.next_avail < target:
        assert drv.add(full) == size
        dev.complete_all()
        assert drv.reclaim(back) == size
    drv.kick_needed()
    rng = np.random.default_rng(1)
    crossed = False
    small = impl.ChainBatch(size)
    for step in range(200):
        m = int(rng.integers(1, 9))
        old = drv.next_avail
        new = (old + m) % U16
        crossed |= new < old
        event = (old + int(rng.choice([-2, -1, 0, m // 2, m - 1, m, m + 1, 0x8000]))) % U16
        dev.set_avail_event(event)
        small.load(np.full(m, guest.data_addr), np.full(m, 16), np.ones(m), np.zeros(m),
                   np.arange(m))
        assert drv.add(small) == m and drv.next_avail == new
        assert drv.kick_needed() is expected_need_event(event, new, old), (old, new, event)
        assert drv.kick_needed() is False      # nothing added since the last decision
        dev.complete_all()
        assert drv.reclaim(back) == m
    assert crossed


def test_driver_kick_without_event_idx_honours_no_notify(impl, make_guest):
    guest = make_guest(4, data_size=4096)
    drv = guest.driver(impl)
    dev = RawDevice(guest)
    batch = impl.ChainBatch(1)
    batch.append(readable=[(guest.data_addr, 8)])
    back = impl.ChainBatch(4)
    for flags, want in [(1, False), (0, True), (1, False), (0, True)]:
        put16(guest, guest.ring.used, flags)   # VIRTQ_USED_F_NO_NOTIFY
        assert drv.add(batch) == 1
        assert drv.kick_needed() is want
        assert drv.kick_needed() is False
        dev.complete_all()
        drv.reclaim(back)


def test_driver_interrupt_suppression_with_event_idx(impl, make_guest):
    guest = make_guest(4, data_size=4096)
    drv = guest.driver(impl, event_idx=True)
    dev = RawDevice(guest)
    used_event = guest.ring.avail + 4 + 2 * 4
    batch = impl.ChainBatch(1)
    batch.append(writable=[(guest.data_addr, 8)])
    back = impl.ChainBatch(4)
    for _ in range(3):
        drv.add(batch)
        dev.complete_all()
        assert drv.reclaim(back) == 1
    drv.disable_interrupts()
    assert u16(guest, used_event) == (3 + 0x8000) % U16   # parked at last_used + 0x8000
    drv.add(batch)
    dev.complete_all()
    assert drv.enable_interrupts() is True                 # a used chain already waits
    assert u16(guest, used_event) == 3
    assert drv.reclaim(back) == 1
    assert drv.enable_interrupts() is False and u16(guest, used_event) == 4
