"""Event suppression of the packed ring (VIRTIO 1.2 section 2.8.10), engine and model.

Each side writes its wishes into its own area (the device into the device area: kicks;
the driver into the driver area: interrupts): RING_EVENT_FLAGS_ENABLE, _DISABLE, or,
with VIRTIO_F_EVENT_IDX, _DESC with a descriptor offset and a wrap counter. The other
side reads them after publishing: ``kick_needed`` (driver) and ``needs_notification``
(device). The areas are read straight from guest memory, and the DESC decisions are
checked against an oracle written on *absolute* slot numbers (slot s of the stream
lies at ring offset s % size with wrap counter 1 - (s // size) % 2), so the modular
arithmetic of the implementations is not trusted to check itself; thousands of random
and edge events, across many laps, for queue sizes that are and are not powers of two.
"""

import numpy as np
import pytest

import vqcore
import vqcore.model_packed as model_packed
from conftest import PACKED_IMPLEMENTATIONS

ENABLE, DISABLE, DESC = 0, 1, 2
GPA_BASE = 0x20_0000


@pytest.fixture(params=sorted(PACKED_IMPLEMENTATIONS))
def impl(request):
    return PACKED_IMPLEMENTATIONS[request.param]


def slot_of(s, size):
    """(offset, wrap counter) of absolute slot ``s``."""
    return s % size, 1 ^ (s // size) & 1


def passes(off_wrap, start, end, size):
    """Does the window of absolute slots [start, end) hold the event's slot?"""
    return any(slot_of(s, size) == (off_wrap & 0x7FFF, off_wrap >> 15)
               for s in range(start, end))


class PRing:
    """Both sides of one packed ring of ``impl``; absolute slot counters on the side."""

    def __init__(self, impl, size, event_idx):
        self.impl, self.size = impl, size
        self.addrs = impl.packed_addresses(GPA_BASE, size)
        self.data = (self.addrs.end + 4095) // 4096 * 4096
        self.buf = np.zeros(self.data - GPA_BASE + 64 * size, np.uint8)
        self.mem = vqcore.GuestMemory([(GPA_BASE, self.buf)])
        self.drv = impl.PackedDriverQueue(self.mem, size, *self.addrs[:3], event_idx=event_idx)
        self.dev = impl.PackedDeviceQueue(self.mem, size, *self.addrs[:3], event_idx=event_idx)
        self.pb, self.rb = impl.ChainBatch(size), impl.ChainBatch(size)
        self.avail = 0          # absolute slots made available
        self.used = 0           # absolute slots the device used (pushed)
        self.held = []          # (id, slots) popped and not pushed

    def area(self, which):
        """(off_wrap, flags) of the driver or the device area, from memory."""
        gpa = self.addrs.driver if which == "driver" else self.addrs.device
        off_wrap, flags = self.mem.array(gpa, 2, "<u2").tolist()
        return off_wrap, flags

    def set_area(self, which, off_wrap, flags):
        gpa = self.addrs.driver if which == "driver" else self.addrs.device
        self.mem.array(gpa, 2, "<u2")[:] = (off_wrap, flags)

    def add(self, lengths):
        """Chains of ``lengths`` descriptors each (one writable byte per descriptor)."""
        b = self.impl.ChainBatch(len(lengths), max_segments=sum(lengths))
        for n in lengths:
            b.append(writable=[(self.data + i, 1) for i in range(n)], token=n)
        assert self.drv.add(b) == len(lengths)
        self.avail += sum(lengths)

    def pop(self):
        n = self.dev.pop(self.pb)
        self.held += list(zip(self.pb.heads.tolist(), self.pb.descriptors_used.tolist()))
        return n

    def push(self, k=None):
        k = len(self.held) if k is None else k
        done, self.held = self.held[:k], self.held[k:]
        self.dev.push([h for h, _ in done], [1] * len(done))
        self.used += sum(n for _, n in done)

    def reclaim(self):
        total = 0
        while (n := self.drv.reclaim(self.rb)):
            total += n
        return total

    def cycle(self, lengths):
        """Add, pop, push, reclaim: the ring moves on by sum(lengths) slots."""
        self.add(lengths)
        assert self.pop() == len(lengths)
        self.push()
        assert self.reclaim() == len(lengths)


# ---- ENABLE / DISABLE ------------------------------------------------------------------------

def test_flags_mode_areas_and_decisions(impl):
    """Without event idx: DISABLE / ENABLE land in the areas, kicks and interrupts
    follow them, and nothing new means no notification."""
    r = PRing(impl, 7, event_idx=False)
    assert r.area("driver") == (0, ENABLE) and r.area("device") == (0, ENABLE)
    assert not r.drv.kick_needed()                    # nothing added yet
    r.add([2])
    assert r.drv.kick_needed()                        # device area: ENABLE
    assert not r.drv.kick_needed()                    # nothing new since
    r.dev.disable_notification()
    assert r.area("device") == (0, DISABLE)
    r.add([1, 1])
    assert not r.drv.kick_needed()
    assert r.dev.enable_notification()                # work arrived while disabled
    assert r.area("device") == (0, ENABLE)
    r.add([1])
    assert r.drv.kick_needed()
    assert r.pop() == 4
    assert not r.dev.enable_notification()            # drained
    # interrupts
    assert r.dev.needs_notification()                 # the first decision after reset
    r.push(1)
    assert r.dev.needs_notification()                 # driver area: ENABLE
    assert not r.dev.needs_notification()             # nothing pushed since
    r.drv.disable_interrupts()
    assert r.area("driver") == (0, DISABLE)
    r.push(1)
    assert not r.dev.needs_notification()
    assert r.drv.enable_interrupts()                  # used chains wait
    assert r.area("driver") == (0, ENABLE)
    r.push()
    assert r.dev.needs_notification()
    assert r.reclaim() == 4
    assert not r.drv.enable_interrupts()


def test_first_decision_and_nothing_new(impl):
    """needs_notification: the first decision after reset (or a restore) notifies
    unless DISABLE; afterwards only when something was pushed since the last one."""
    for event_idx in (False, True):
        r = PRing(impl, 5, event_idx)
        assert r.dev.needs_notification()             # after reset, ENABLE in memory
        assert not r.dev.needs_notification()
        r.set_area("driver", 3 | 1 << 15, DESC)       # an event far ahead
        r.dev.next_used = r.dev.next_used             # a restore: the next decision is first
        assert r.dev.needs_notification()             # the first decision
        assert not r.dev.needs_notification()
        r.set_area("driver", 0, DISABLE)
        r.dev.next_avail = 0x8000
        assert not r.dev.needs_notification()         # DISABLE wins even the first time


def test_reserved_flags_value_and_desc_without_event_idx_notify(impl):
    """The reserved flags value 3, and DESC when event idx was not negotiated, are
    treated as "enabled": a wakeup is never lost to a value the side may not use."""
    r = PRing(impl, 4, event_idx=False)
    r.set_area("device", 2 | 1 << 15, 3)
    r.add([1])
    assert r.drv.kick_needed()
    r.set_area("device", 3 | 0 << 15, DESC)           # an event that is not passed
    r.add([1])
    assert r.drv.kick_needed()
    r.pop()
    r.dev.needs_notification()
    r.set_area("driver", 3 | 0 << 15, DESC)
    r.push(1)
    assert r.dev.needs_notification()


# ---- DESC (event idx), against the absolute-slot oracle -----------------------------------------

def edge_events(start, end, size, rng):
    """Events just before, at, inside and just after [start, end), plus random ones,
    each with both wrap counters."""
    slots = {start - 1, start, end - 1, end, end + 1, start + size - 1, start + size}
    slots |= {int(x) for x in rng.integers(start - 2 * size, end + 2 * size, 4)}
    out = []
    for s in slots:
        off, wrap = slot_of(s % (2 * size), size)
        out += [off | wrap << 15, off | (wrap ^ 1) << 15]
    return out


@pytest.mark.parametrize("size", [1, 2, 7, 16, 100])
def test_kick_decision_with_event_idx_across_laps(impl, size):
    """kick_needed with DESC: True exactly when the descriptors made available since the
    last decision include the event's slot (offset and wrap counter)."""
    r = PRing(impl, size, event_idx=True)
    rng = np.random.default_rng(size)
    checked = kicks = 0
    for _ in range(300 if size < 100 else 60):
        # one decision window: add some chains (at most the free slots), then decide
        r.drv.kick_needed()                           # sync: the window starts here
        start = r.avail
        lengths = []
        while sum(lengths) < size and rng.random() < 0.7:
            lengths.append(int(rng.integers(1, size - sum(lengths) + 1)))
        lengths = lengths or [1]
        r.add(lengths)
        events = edge_events(start, r.avail, size, rng)
        event = events[int(rng.integers(0, len(events)))]
        r.set_area("device", event, DESC)
        want = passes(event, start, r.avail, size)
        assert r.drv.kick_needed() == want, (start, r.avail, hex(event))
        assert not r.drv.kick_needed()                # nothing new since
        checked += 1
        kicks += want
        assert r.pop() == len(lengths)
        r.push()
        r.reclaim()
    assert r.avail > 20 * size                        # many laps
    assert 0 < kicks < checked                        # both answers were exercised


@pytest.mark.parametrize("size", [1, 3, 7, 64])
def test_interrupt_decision_with_event_idx_across_laps(impl, size):
    """needs_notification with DESC: True exactly when the slots used since the last
    decision (chains of several descriptors skip several slots) include the event."""
    r = PRing(impl, size, event_idx=True)
    rng = np.random.default_rng(100 + size)
    r.dev.needs_notification()                        # the first decision is always True
    checked = irqs = 0
    for _ in range(300):
        lengths = []
        while sum(lengths) < size and rng.random() < 0.6:
            lengths.append(int(rng.integers(1, min(3, size - sum(lengths)) + 1)))
        lengths = lengths or [1]
        r.add(lengths)
        assert r.pop() == len(lengths)
        # push in one or two steps, one decision per step
        parts = [len(lengths)] if len(lengths) == 1 or rng.random() < 0.5 else \
            [1, len(lengths) - 1]
        for k in parts:
            start = r.used
            r.push(k)
            events = edge_events(start, r.used, size, rng)
            event = events[int(rng.integers(0, len(events)))]
            r.set_area("driver", event, DESC)
            want = passes(event, start, r.used, size)
            assert r.dev.needs_notification() == want, (start, r.used, hex(event))
            assert not r.dev.needs_notification()
            checked += 1
            irqs += want
        r.reclaim()
    assert r.used > 10 * size                         # many laps
    assert 0 < irqs < checked


@pytest.mark.parametrize("size", [3, 7, 32])
def test_enable_writes_own_position_and_reports_pending_work_across_laps(impl, size):
    """enable_notification / enable_interrupts with event idx write DESC with the side's
    next position and wrap counter (read back from memory), return True when work is
    already there, and the other side then notifies exactly on the next descriptor."""
    r = PRing(impl, size, event_idx=True)
    rng = np.random.default_rng(7 * size)
    for _ in range(8 * size):
        # the device drains and goes to sleep
        r.dev.disable_notification()
        assert r.area("device")[1] == DISABLE
        assert not r.dev.enable_notification()
        off, wrap = slot_of(r.avail, size)
        assert r.area("device") == (off | wrap << 15, DESC)
        assert r.dev.next_avail == off | wrap << 15
        # the driver sleeps too
        r.drv.disable_interrupts()
        assert not r.drv.enable_interrupts()
        assert r.area("driver") == (off | wrap << 15, DESC)   # all used: same position
        # chains arrive: the first add kicks, a second one (same sleep) does not
        r.add([1])
        assert r.drv.kick_needed()
        if size > 2:
            r.add([1])
            assert not r.drv.kick_needed()
        # the device wakes: disable, re-enable reports the pending work
        r.dev.disable_notification()
        assert r.dev.enable_notification()
        while r.pop():
            pass
        # completion: the first push interrupts, a later one in the same sleep does not
        r.push(1)
        assert r.dev.needs_notification()
        if r.held:
            r.push()
            assert not r.dev.needs_notification()
        r.drv.disable_interrupts()
        assert r.drv.enable_interrupts()              # used chains wait
        assert r.reclaim() >= 1
        r.cycle([int(rng.integers(1, size + 1))])     # move round the ring unevenly
    assert r.avail > 5 * size


def test_kick_and_interrupt_decisions_agree_between_engine_and_model():
    """The same random sequence of adds, pops, pushes and suppression calls (both
    modes) gives the same decisions and the same event areas in engine and model."""
    rng_seed = 99
    runs = []
    for impl in (vqcore, model_packed):
        rng = np.random.default_rng(rng_seed)
        out = []
        for event_idx in (False, True):
            r = PRing(impl, 6, event_idx)
            for _ in range(400):
                op = int(rng.integers(0, 9))
                if op == 0 and r.drv.num_free:
                    r.add([int(rng.integers(1, r.drv.num_free + 1))])
                elif op == 1:
                    r.pop()
                elif op == 2 and r.held:
                    r.push(int(rng.integers(1, len(r.held) + 1)))
                elif op == 3:
                    out.append(r.reclaim())
                elif op == 4:
                    out.append(r.drv.kick_needed())
                elif op == 5:
                    out.append(r.dev.needs_notification())
                elif op == 6:
                    out.append((r.dev.enable_notification(), r.drv.enable_interrupts()))
                elif op == 7:
                    r.dev.disable_notification()
                    r.drv.disable_interrupts()
                else:
                    out.append(r.dev.pending())
                out.append((r.area("driver"), r.area("device")))
        runs.append(out)
    assert runs[0] == runs[1]
