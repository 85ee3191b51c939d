"""Notification suppression of the split ring, with and without VIRTIO_F_EVENT_IDX.

Device side: ``disable_notification`` / ``enable_notification`` (used->flags NO_NOTIFY,
or avail_event) and the race-free loop (disable, drain, enable, re-check); driver side:
``kick_needed``. Driver side: ``disable_interrupts`` / ``enable_interrupts`` (avail->flags
NO_INTERRUPT, or used_event); device side: ``needs_notification``. The ring headers are
read straight from guest memory, and with event idx the decisions are checked against
the spec's vring_need_event for every event position around each publish, across the
16-bit wrap.
"""

import numpy as np
import pytest

from vqcore import (ChainBatch, GuestMemory, SplitDeviceQueue, SplitDriverQueue,
                    need_event, split_addresses)

VIRTQ_USED_F_NO_NOTIFY = 1
VIRTQ_AVAIL_F_NO_INTERRUPT = 1
GPA_BASE = 0x10_0000
SIZE = 256


class Ring:
    """Both sides of one ring; chains are one writable 16-byte descriptor each."""

    def __init__(self, event_idx, size=SIZE):
        self.size = size
        self.addrs = split_addresses(GPA_BASE, size)
        self.data = (self.addrs.end + 4095) // 4096 * 4096
        self.buf = np.zeros(self.data - GPA_BASE + 16 * size, np.uint8)
        self.mem = GuestMemory([(GPA_BASE, self.buf)])
        self.drv = SplitDriverQueue(self.mem, size, *self.addrs[:3], event_idx=event_idx)
        self.dev = SplitDeviceQueue(self.mem, size, *self.addrs[:3], event_idx=event_idx)
        self.db = ChainBatch(size)
        self.pb = ChainBatch(size)
        self.rb = ChainBatch(size)
        self.sent = 0
        self.got = 0
        self.held = []           # heads popped by the device and not pushed yet

    # ---- the ring headers as they are in memory
    def _u16(self, gpa):
        return self.mem.array(gpa, 1, "<u2")

    def used_flags(self):
        return int(self._u16(self.addrs.used)[0])

    def avail_flags(self):
        return int(self._u16(self.addrs.avail)[0])

    def avail_event(self):
        return int(self._u16(self.addrs.used + 4 + 8 * self.size)[0])

    def used_event(self):
        return int(self._u16(self.addrs.avail + 4 + 2 * self.size)[0])

    def set_avail_event(self, v):
        self._u16(self.addrs.used + 4 + 8 * self.size)[0] = v & 0xFFFF

    def set_used_event(self, v):
        self._u16(self.addrs.avail + 4 + 2 * self.size)[0] = v & 0xFFFF

    # ---- moving chains
    def add(self, n, *, publish=True):
        seqs = np.arange(self.sent, self.sent + n, dtype=np.uint64)
        gpa = self.data + (seqs % np.uint64(self.size)) * np.uint64(16)
        self.db.load(gpa, np.full(n, 16), np.ones(n), np.zeros(n), seqs)
        assert self.drv.add(self.db, publish=publish) == n
        self.sent += n

    def pop(self):
        n = self.dev.pop(self.pb)
        self.held += self.pb.heads.tolist()
        return n

    def push(self, k=None):
        k = len(self.held) if k is None else k
        heads, self.held = self.held[:k], self.held[k:]
        self.dev.push(heads, [8] * len(heads))
        return len(heads)

    def serve(self):
        """Device: pop everything pending and push it."""
        n = 0
        while self.pop():
            pass
        n = self.push()
        return n

    def reclaim(self):
        total = 0
        while (n := self.drv.reclaim(self.rb)):
            assert self.rb.tokens.tolist() == list(range(self.got, self.got + n))
            self.got += n
            total += n
        return total

    def advance(self, count):
        """Move ``count`` chains through both sides, leaving the ring idle."""
        while count:
            k = min(count, self.size)
            self.add(k)
            self.serve()
            assert self.reclaim() == k
            count -= k
        self.drv.kick_needed()
        self.dev.needs_notification()


# ---- device notifications / driver kicks ---------------------------------------------

def test_no_notify_flag_and_kicks():
    r = Ring(event_idx=False)
    drv, dev = r.drv, r.dev
    assert r.used_flags() == 0
    r.add(1)
    assert drv.kick_needed()                    # notifications enabled after reset
    assert not drv.kick_needed()                # nothing new published since
    dev.disable_notification()
    assert r.used_flags() == VIRTQ_USED_F_NO_NOTIFY
    dev.disable_notification()                  # idempotent
    assert r.used_flags() == VIRTQ_USED_F_NO_NOTIFY
    r.add(2)
    assert not drv.kick_needed()                # NO_NOTIFY: no kick
    assert dev.pop(r.pb) == 3
    r.held += r.pb.heads.tolist()
    r.add(1)                                    # arrives after the drain
    assert not drv.kick_needed()
    assert dev.enable_notification()            # ... so the re-check reports it
    assert r.used_flags() == 0
    assert dev.pending() == 1
    assert r.pop() == 1
    assert not dev.enable_notification()        # drained: safe to sleep
    assert r.used_flags() == 0
    r.add(1)
    assert drv.kick_needed()
    # several adds published at once give one kick decision
    r.add(2, publish=False)
    assert not drv.kick_needed()                # not published yet
    r.add(1, publish=False)
    drv.publish()
    assert drv.kick_needed()
    assert not drv.kick_needed()
    assert r.serve() == 8


@pytest.mark.parametrize("event_idx", [False, True])
def test_kick_decision_counts_published_chains_only(event_idx):
    """Chains added with publish=False do not count until published: a kick decided
    before the publish must not swallow the kick they need (a lost wakeup)."""
    r = Ring(event_idx=event_idx)
    drv, dev = r.drv, r.dev
    assert not dev.enable_notification()        # the device sleeps
    r.add(3, publish=False)
    assert not drv.kick_needed()                # nothing published: nothing to kick for
    assert dev.pending() == 0
    drv.publish()
    assert dev.pending() == 3
    assert drv.kick_needed()                    # the sleeping device must be woken
    assert not drv.kick_needed()


def test_event_idx_avail_event_and_kicks():
    r = Ring(event_idx=True)
    drv, dev = r.drv, r.dev
    r.advance(300)
    a = dev.next_avail
    assert a == 300
    assert not dev.enable_notification()
    assert r.avail_event() == a                 # avail_event = next_avail
    dev.disable_notification()
    assert r.used_flags() == 0                  # event idx: flags untouched ...
    assert r.avail_event() == a                 # ... and avail_event stays behind
    r.add(1)
    assert drv.kick_needed()                    # avail idx crossed avail_event
    r.add(3)
    assert not drv.kick_needed()                # avail_event (a) already behind old idx
    assert dev.pop(r.pb) == 4
    r.held += r.pb.heads.tolist()
    assert r.avail_event() == a                 # popping does not move it
    assert not dev.enable_notification()
    assert r.avail_event() == a + 4
    r.add(2)
    assert drv.kick_needed()
    # chains that arrive between the drain and enable are reported by enable
    r.serve()
    r.reclaim()
    assert not dev.enable_notification()
    assert r.avail_event() == a + 6
    r.add(5)
    assert drv.kick_needed()
    assert r.pop() == 5
    r.add(2)                                    # after the drain, before enable
    assert not drv.kick_needed()
    assert dev.enable_notification()
    assert r.avail_event() == dev.next_avail == a + 11
    assert r.pop() == 2
    assert not dev.enable_notification()
    assert r.avail_event() == a + 13
    assert r.push() == 7


@pytest.mark.parametrize("start", [300, 65536 - 6, 65536 - 1])
def test_event_idx_kick_exactly_when_avail_crosses_avail_event(start):
    """For every avail_event within a few places of a publish of k chains, the driver
    kicks iff avail_event is in [old, new) (the spec's vring_need_event), across the
    16-bit wrap."""
    r = Ring(event_idx=True)
    drv = r.drv
    r.advance(start)
    checked = kicks = 0
    for k in (1, 2, 3, 7, 32):
        for d in range(-4, k + 4):
            old = drv.next_avail
            ev = (old + d) & 0xFFFF
            r.set_avail_event(ev)
            r.add(k)
            new = drv.next_avail
            assert new == (old + k) & 0xFFFF
            kick = drv.kick_needed()
            assert kick == need_event(ev, new, old) == (0 <= d < k), (start, k, d)
            assert not drv.kick_needed()
            kicks += kick
            checked += 1
            r.serve()
            r.reclaim()
    assert checked > 40 and kicks == 1 + 2 + 3 + 7 + 32


@pytest.mark.parametrize("event_idx", [False, True])
def test_race_free_device_loop(event_idx):
    """disable, drain, enable, re-check: chains published at any point of the loop are
    served; the device sleeps only when the re-check finds nothing, and then the next
    publish kicks it."""
    r = Ring(event_idx=event_idx, size=16)
    drv, dev = r.drv, r.dev
    rng = np.random.default_rng(5)
    sleeping = True                             # after reset: notifications enabled
    served = 0
    for step in range(3000):
        if sleeping:
            assert dev.pending() == 0
        # the driver publishes at a random moment of the device's loop
        when = int(rng.integers(0, 4))
        k = int(rng.integers(1, 4))

        def publish():
            nonlocal sleeping
            if drv.num_free >= k:
                r.add(k)
                kick = drv.kick_needed()
                if sleeping:
                    assert kick, "a sleeping device was not kicked"
                if not event_idx:
                    assert kick == sleeping
                if kick:
                    sleeping = False
        if when == 0:
            publish()
        if sleeping:
            continue
        dev.disable_notification()
        if not event_idx:
            assert r.used_flags() == VIRTQ_USED_F_NO_NOTIFY
        while True:
            if when == 1:
                publish()
                when = 3
            while r.pop():
                pass
            if when == 2:
                publish()                       # between the drain and enable
                when = 3
            served += r.push()
            r.reclaim()
            pending = dev.pending()
            again = dev.enable_notification()
            assert again == (pending > 0)
            if event_idx:
                assert r.avail_event() == dev.next_avail
            else:
                assert r.used_flags() == 0
            if not again:
                sleeping = True
                break
            dev.disable_notification()
            when = 3
    assert served == r.got
    assert served + dev.pending() == r.sent
    assert not sleeping or dev.pending() == 0


# ---- driver interrupts / device notifications -----------------------------------------

def test_no_interrupt_flag_and_needs_notification():
    r = Ring(event_idx=False)
    drv, dev = r.drv, r.dev
    assert r.avail_flags() == 0
    r.add(4)
    assert r.pop() == 4
    r.push(1)
    assert dev.needs_notification()             # interrupts enabled after reset
    assert not dev.needs_notification()         # nothing new pushed since
    drv.disable_interrupts()
    assert r.avail_flags() == VIRTQ_AVAIL_F_NO_INTERRUPT
    r.push(1)
    assert not dev.needs_notification()         # NO_INTERRUPT
    assert drv.enable_interrupts()              # two used chains already wait
    assert r.avail_flags() == 0
    assert r.reclaim() == 2
    assert not drv.enable_interrupts()          # nothing waits: safe to sleep
    r.push(2)
    assert dev.needs_notification()
    drv.disable_interrupts()
    assert r.reclaim() == 2
    assert not dev.needs_notification()
    assert r.avail_flags() == VIRTQ_AVAIL_F_NO_INTERRUPT
    assert not drv.enable_interrupts()
    assert r.avail_flags() == 0


def test_event_idx_used_event_and_needs_notification():
    r = Ring(event_idx=True)
    drv, dev = r.drv, r.dev
    assert dev.needs_notification()             # the first decision after reset
    assert not dev.needs_notification()
    r.advance(1000)
    assert not drv.enable_interrupts()
    assert r.used_event() == drv.last_used == 1000
    assert r.avail_flags() == 0                 # event idx: flags untouched
    r.add(SIZE)
    assert r.pop() == SIZE
    r.push(1)
    assert dev.needs_notification()             # used idx crossed used_event
    r.push(1)
    assert not dev.needs_notification()         # used_event already behind
    assert drv.enable_interrupts()              # two used chains wait
    assert r.used_event() == 1000               # last_used: nothing reclaimed yet
    assert r.reclaim() == 2
    assert not drv.enable_interrupts()
    assert r.used_event() == 1002
    # disabled: no interrupt for a whole ring's worth of pushes
    drv.disable_interrupts()
    assert r.used_event() != drv.last_used
    assert r.avail_flags() == 0
    for _ in range(SIZE - 2):
        r.push(1)
        assert not dev.needs_notification()
    assert drv.enable_interrupts()
    assert r.reclaim() == SIZE - 2
    assert not drv.enable_interrupts()
    # a restored device decides "notify" once, whatever used_event says
    r.add(1)
    r.serve()
    assert dev.needs_notification()
    used = dev.next_used
    dev.next_used = used
    r.set_used_event(used + 100)
    assert dev.needs_notification()
    assert not dev.needs_notification()


@pytest.mark.parametrize("start", [500, 65536 - 5, 65536 - 1])
def test_event_idx_interrupt_exactly_when_used_crosses_used_event(start):
    """For every used_event within a few places of a push of k chains the device asks
    for an interrupt iff used_event is in [old, new), across the 16-bit wrap."""
    r = Ring(event_idx=True)
    dev = r.dev
    r.advance(start)
    checked = irqs = 0
    for k in (1, 2, 3, 7, 32):
        for d in range(-4, k + 4):
            if len(r.held) < k:
                r.push()
                dev.needs_notification()        # (decision point moves along)
                r.reclaim()
                r.add(r.drv.num_free)
                while r.pop():
                    pass
            old = dev.next_used
            ev = (old + d) & 0xFFFF
            r.set_used_event(ev)
            r.push(k)
            new = dev.next_used
            assert new == (old + k) & 0xFFFF
            irq = dev.needs_notification()
            assert irq == need_event(ev, new, old) == (0 <= d < k), (start, k, d)
            assert not dev.needs_notification()
            irqs += irq
            checked += 1
    assert checked > 40 and irqs == 1 + 2 + 3 + 7 + 32


@pytest.mark.parametrize("event_idx", [False, True])
def test_race_free_driver_loop(event_idx):
    """The driver's mirror of the device loop: disable interrupts, reclaim, enable,
    re-check. Used chains pushed at any moment are reclaimed; the driver sleeps only
    when the re-check finds nothing, and then the next push interrupts it."""
    r = Ring(event_idx=event_idx, size=16)
    drv, dev = r.drv, r.dev
    rng = np.random.default_rng(11)
    sleeping = True
    dev.needs_notification()                    # consume the first decision after reset
    for step in range(3000):
        if sleeping:
            assert drv.last_used == r.mem.array(r.addrs.used + 2, 1, "<u2")[0]
        if drv.num_free:
            r.add(int(rng.integers(1, drv.num_free + 1)))
        while r.pop():
            pass
        when = int(rng.integers(0, 3))

        def complete():
            nonlocal sleeping
            if not r.held:
                return
            r.push(int(rng.integers(1, len(r.held) + 1)))
            irq = dev.needs_notification()
            if sleeping:
                assert irq, "a sleeping driver was not interrupted"
            if not event_idx:
                assert irq == sleeping
            if irq:
                sleeping = False
        if when == 0:
            complete()
        if sleeping:
            continue
        drv.disable_interrupts()
        while True:
            r.reclaim()
            if when == 1:
                complete()                      # between the drain and enable
                when = 2
            waiting = r.got < r.sent - len(r.held) - dev.pending()
            again = drv.enable_interrupts()
            assert again == waiting
            if not again:
                sleeping = True
                break
            drv.disable_interrupts()
    r.push()
    r.reclaim()
    assert r.got == r.sent - dev.pending()


# ---- enable_notification_more: split and packed, engine and model ---------------------

@pytest.mark.parametrize("event_idx", [True, False], ids=["evidx", "flags"])
@pytest.mark.parametrize("which", ["engine", "model"])
def test_enable_notification_more_kicks_on_the_next_buffer(ring_kind, make_guest, which,
                                                           event_idx):
    """A device that cannot use the buffers there (an RX ring with too little room for
    the next frame) arms with enable_notification_more: the driver's next add must kick,
    even though buffers were already pending. Plain enable_notification with event idx
    asks for a kick at the first *unpopped* buffer, which the driver passed long ago: it
    reports "work waits" instead, and the device would have to spin."""
    from conftest import implementations
    impl = implementations(ring_kind)[which]
    g = make_guest(16, layout=ring_kind)
    drv, dev = g.driver(impl, event_idx=event_idx), g.device(impl, event_idx=event_idx)

    def add(n):
        b = impl.ChainBatch(n)
        for i in range(n):
            b.append(writable=[(g.data_addr + 64 * i, 64)], token=i)
        assert drv.add(b) == n

    add(3)
    assert drv.kick_needed()                 # notifications start enabled
    dev.disable_notification()
    add(2)                                   # 5 pending, never popped
    if event_idx:
        assert not drv.kick_needed()
        assert dev.enable_notification()     # "work waits": the device would spin
        add(1)
        assert not drv.kick_needed()         # and no kick would wake it
    dev.disable_notification()
    add(1)
    assert dev.enable_notification_more() is True
    add(1)                                   # the next buffer beyond those there kicks
    assert drv.kick_needed()
    add(1)          # flags and packed (ENABLE) kick again; split event idx kicked once
    assert drv.kick_needed() == (not event_idx or ring_kind == "packed")
    batch = impl.ChainBatch(16)
    assert dev.pop(batch) == (9 if event_idx else 8)   # nothing was lost


# ---- enable_notification_after: coalesced kicks, split and packed, engine and model ---

@pytest.mark.parametrize("event_idx", [True, False], ids=["evidx", "flags"])
@pytest.mark.parametrize("which", ["engine", "model"])
def test_enable_notification_after_kicks_once_n_wait(ring_kind, make_guest, which, event_idx):
    """A device coalescing kicks (its TX worker after a drain) asks for the next kick only
    once n chains wait: the driver's first n-1 adds do not kick, the n-th does (with
    event idx; without it nothing kicks and the device's timer collects them). Round
    after round across the ring's wrap (packed: the wrap counter of the event slot),
    nothing is lost, and the return value says when n already wait."""
    from conftest import implementations
    impl = implementations(ring_kind)[which]
    size, n = 16, 5
    g = make_guest(size, layout=ring_kind)
    drv, dev = g.driver(impl, event_idx=event_idx), g.device(impl, event_idx=event_idx)
    popped, reclaim = impl.ChainBatch(size), impl.ChainBatch(size)
    token = 0

    def add(k):
        nonlocal token
        b = impl.ChainBatch(k)
        for _ in range(k):
            b.append(writable=[(g.data_addr + 64 * (token % size), 64)], token=token)
            token += 1
        assert drv.add(b) == k

    for rnd in range(7):                       # 35 chains through a 16-slot ring
        assert dev.enable_notification_after(n) is False, rnd
        for i in range(n - 1):
            add(1)
            assert not drv.kick_needed(), (rnd, i)
        assert dev.enable_notification_after(n) is False
        assert dev.enable_notification_after(n - 1) is True     # n-1 wait already
        assert dev.enable_notification_after(n) is False        # re-armed at n
        add(1)
        assert drv.kick_needed() == event_idx, rnd
        assert dev.enable_notification_after(n) is True
        assert dev.pop(popped) == n
        dev.push_used(popped)
        assert drv.reclaim(reclaim) == n
    # n = 1 is enable_notification: the next add kicks, flags or event idx
    assert dev.enable_notification_after(1) is False
    add(1)
    assert drv.kick_needed()
    assert dev.pop(popped) == 1
    dev.push_used(popped)
    assert drv.reclaim(reclaim) == 1
    # beyond the ring: clamped to its size, a full ring kicks (event idx)
    dev.disable_notification()
    assert dev.enable_notification_after(10 * size) is False
    add(size - 1)
    assert not drv.kick_needed()
    add(1)
    assert drv.kick_needed() == event_idx
    assert dev.enable_notification_after(10 * size) is True
    assert dev.pop(popped) == size
