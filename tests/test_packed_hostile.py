"""Hostile-guest tests of the packed ring: DESIGN.md's rules adapted to section 2.8.

The guest memory map, guard pages and the healthy queue pair are those of
test_hostile.py (``Env``), with packed rings in place of the split ones. A hostile guest
writes descriptors the driver API would never build (any address, length, id, flags,
including AVAIL/USED bits that lie about the wrap counter); for each violation we check

* the exact exception class, and that vqcore.model_packed raises the same (class, code,
  index, address, length) on the same ring, with the same chains left in the batch;
* the queue is broken: further pops raise :class:`QueueBroken` (and nothing else);
* exactly one log line on ``vqcore.packed``, and ``violations == 1``;
* no byte outside the guest memory regions changed (guard bytes);
* an independent packed queue pair on the same memory keeps moving data.

Rules of the split ring with no packed counterpart: ``next`` beyond the table (a packed
chain continues in the next slot) and ``avail->idx`` jumps (there is no index). The
packed ring adds one: a chain may only run into descriptors that are available for
their slot's wrap counter (section 2.8.6, "flags ... must be set/cleared correctly in
all descriptors in the list"): :class:`DescriptorNotAvailable`. A head that is not
available (used, zero, the other wrap counter, a stale one from the previous lap) is
simply not popped.
"""

from __future__ import annotations

import gc
import logging
import mmap
import os
import struct
import time

import numpy as np
import pytest

import vqcore
import vqcore.model_packed as model_packed
from test_hostile import (BUF, DRV_BUF, GAP, HUGE_GPA, HUGE_SIZE, IND, IND2, NOWHERE, Q, R0_END,
                          R1_END, R2_END, Env, device_touch)
from vqcore import ChainBatch, GuestMemory, PackedDeviceQueue, PackedDriverQueue, packed_addresses
from vqcore.errors import (AddressOutOfBounds, AddressOverflow, BatchTooSmall, ChainLengthOverflow,
                           ChainTooLong, DescriptorNotAvailable, HeadInUse, IndirectLengthError,
                           IndirectTableNotContiguous, IndirectTableTooLong, IndirectWithNext,
                           InvalidHeadIndex, InvalidUsedId, InvalidUsedLength,
                           NestedIndirectDescriptor, NotInFlight, QueueBroken, QueueError,
                           RingViolation, WritableBeforeReadable)

NEXT, WRITE, INDIRECT = 1, 2, 4
AVAIL, USED = 1 << 7, 1 << 15
LOGGER = "vqcore.packed"

PRING = packed_addresses(0x0400, Q)       # the hostile device queue
PHEALTHY = packed_addresses(0x1400, Q)    # the independent pair that must keep working
PDRV_RING = packed_addresses(0x3400, Q)   # driver queue facing a hostile device


class PackedEnv(Env):
    """test_hostile's memory map with packed queues: the hostile device (engine, or
    the model with ``impl=model_packed``) and the healthy engine pair."""

    def __init__(self, impl=vqcore, huge: bool = True):
        super().__init__(huge)
        self.impl = impl
        self.dev = impl.PackedDeviceQueue(self.mem, Q, *PRING[:3], name="hostile")
        self.ok_drv = PackedDriverQueue(self.mem, Q, *PHEALTHY[:3], name="healthy-driver")
        self.ok_dev = PackedDeviceQueue(self.mem, Q, *PHEALTHY[:3], name="healthy-device")

    def image(self):
        return self.backing.tobytes()


@pytest.fixture
def env():
    e = PackedEnv()
    yield e
    e.close()


@pytest.fixture
def log(caplog):
    caplog.set_level(logging.WARNING, logger=LOGGER)
    return caplog


def violation_records(caplog):
    return [r for r in caplog.records if r.name == LOGGER and r.levelno >= logging.WARNING]


# ---- writing a hostile driver's descriptors -----------------------------------------------------

def avail_bits(wrap):
    return AVAIL if wrap else USED


def raw(mem, slot, addr, length, id_=0, flags=0, table=PRING.desc):
    """Descriptor ``slot`` of ``table`` with exactly these fields (no AVAIL/USED added)."""
    mem.write(table + 16 * slot, struct.pack("<QIHH", addr % 2**64, length % 2**32,
                                              id_ % 2**16, flags % 2**16))


def chain(mem, first, entries, id_=0, wrap=1):
    """A chain in consecutive ring slots from ``first`` (wrapping at the end, where the
    wrap counter flips): ``entries`` of (addr, len[, flags]); NEXT on all but the last,
    the id in each, AVAIL/USED for each slot's wrap counter; the head's flags last."""
    slot, head_flags = first, None
    for k, (addr, length, *flags) in enumerate(entries):
        f = (flags[0] if flags else 0) | avail_bits(wrap) | (NEXT if k + 1 < len(entries) else 0)
        if k == 0:
            head_flags = f
            raw(mem, slot, addr, length, id_, 0)
        else:
            raw(mem, slot, addr, length, id_, f)
        slot += 1
        if slot == Q:
            slot, wrap = 0, wrap ^ 1
    mem.write(PRING.desc + 16 * first + 14, struct.pack("<H", head_flags))
    return slot, wrap


def table(mem, gpa, entries):
    """An indirect table: ``entries`` of (addr, len[, flags]), used in order."""
    mem.write(gpa, b"".join(struct.pack("<QIHH", a % 2**64, n % 2**32, 0, f[0] if f else 0)
                            for a, n, *f in entries))


def readable(count, length=16, base=BUF):
    return [(base + 32 * i, length) for i in range(count)]


# ---- the device-side rules --------------------------------------------------------------------
# Each case writes a hostile ring from the device's position (slot 0, wrap 1 unless it
# moves the device); the generic test pops it.

def _id(value):
    def build(e):
        chain(e.mem, 0, [(BUF, 16)], id_=value)
    return build


def _id_in_last_descriptor(e):
    # the id is taken from the last descriptor of the chain: the first two name 0
    chain(e.mem, 0, readable(3), id_=0)
    raw(e.mem, 2, BUF + 64, 16, Q, avail_bits(1))


def _next_all_around(e):
    chain(e.mem, 0, readable(Q))
    raw(e.mem, Q - 1, BUF, 16, 0, NEXT | avail_bits(1))   # the last one continues too


def _next_all_around_from_mid_ring(e):
    e.dev.next_avail = 5 | 1 << 15
    chain(e.mem, 5, readable(Q))
    raw(e.mem, 4, BUF, 16, 0, NEXT | avail_bits(0))       # slot 4 is in lap 2: wrap 0


def _nested_indirect(e):
    table(e.mem, IND2, [(BUF, 16)])
    table(e.mem, IND, [(IND2, 16, INDIRECT)])
    chain(e.mem, 0, [(IND, 16, INDIRECT)])


def _nested_indirect_later_entry(e):
    table(e.mem, IND2, [(BUF, 16)])
    table(e.mem, IND, [(BUF, 16), (IND2, 16, INDIRECT | NEXT), (BUF + 32, 16)])
    chain(e.mem, 0, [(IND, 48, INDIRECT)])


def _indirect_len(length):
    def build(e):
        table(e.mem, IND, readable(Q + 1))
        chain(e.mem, 0, [(IND, length, INDIRECT)])
    return build


def _indirect_with_next(e):
    table(e.mem, IND, readable(2))
    chain(e.mem, 0, [(IND, 32, INDIRECT), (BUF, 16)])


def _indirect_table_at(addr, length=32):
    def build(e):
        chain(e.mem, 0, [(addr, length, INDIRECT)])
    return build


def _buffer_at(addr, length, flags=0):
    def build(e):
        chain(e.mem, 0, [(BUF, 16), (addr, length, flags)])
    return build


def _buffer_in_indirect_at(addr, length):
    def build(e):
        table(e.mem, IND, [(BUF, 16), (addr, length)])
        chain(e.mem, 0, [(IND, 32, INDIRECT)])
    return build


def _chain_len_over_4g(flags, via_indirect=False):
    def build(e):
        entries = [(HUGE_GPA, 0xFFFFFFFF, flags), (HUGE_GPA, 0xFFFFFFFF, flags)]
        if via_indirect:
            table(e.mem, IND, entries)
            chain(e.mem, 0, [(IND, 32, INDIRECT)])
        else:
            chain(e.mem, 0, entries)
    return build


def _chain_len_one_over(e):
    chain(e.mem, 0, [(HUGE_GPA, 0xFFFFFFFF), (HUGE_GPA, 1)])


def _writable_before_readable(e):
    chain(e.mem, 0, [(BUF, 16, WRITE), (BUF + 16, 16)])


def _empty_writable_before_readable(e):
    chain(e.mem, 0, [(BUF, 16), (BUF + 16, 0, WRITE), (BUF + 32, 16)])


def _writable_before_readable_in_indirect(e):
    table(e.mem, IND, [(BUF, 16), (BUF + 16, 16, WRITE), (BUF + 32, 16)])
    chain(e.mem, 0, [(IND, 48, INDIRECT)])


def _writable_then_indirect_readable(e):
    table(e.mem, IND, [(BUF + 64, 16)])
    chain(e.mem, 0, [(BUF, 16, WRITE), (IND, 16, INDIRECT)])


def _id_in_use_across_pops(e):
    chain(e.mem, 0, [(BUF, 16)], id_=3)
    assert e.dev.pop(e.impl.ChainBatch(Q)) == 1 and e.dev.in_flight == 1
    chain(e.mem, 1, [(BUF + 16, 16)], id_=3)              # id 3 again, still in flight


def _id_twice_in_one_batch(e):
    chain(e.mem, 0, readable(2), id_=3)
    chain(e.mem, 2, [(BUF + 64, 16)], id_=3)


def _mid_chain_flags(flags):
    """A 3-descriptor chain whose middle descriptor's AVAIL/USED bits are ``flags``."""
    def build(e):
        chain(e.mem, 0, readable(3))
        raw(e.mem, 1, BUF + 32, 16, 0, NEXT | flags)
    return build


def _wrap_not_flipped_at_the_ring_end(e):
    # a chain from slot 14 crossing the end: slot 0 must carry the wrap-0 bits
    e.dev.next_avail = 14 | 1 << 15
    chain(e.mem, 14, readable(3))
    raw(e.mem, 0, BUF + 64, 16, 0, avail_bits(1))


def _chain_into_slots_in_flight(e):
    # chain A (slots 0-1) popped and in flight; chain B fills slots 2..15 and runs on
    # into slot 0, which still holds A's head: available for wrap 1, not for wrap 0
    chain(e.mem, 0, readable(2), id_=0)
    assert e.dev.pop(e.impl.ChainBatch(Q)) == 1
    chain(e.mem, 2, readable(Q - 2), id_=1)
    raw(e.mem, Q - 1, BUF, 16, 1, NEXT | avail_bits(1))


HOSTILE = [
    # buffer ids
    ("id_eq_size", InvalidHeadIndex, _id(Q)),
    ("id_ffff", InvalidHeadIndex, _id(0xFFFF)),
    ("id_eq_size_in_last_descriptor", InvalidHeadIndex, _id_in_last_descriptor),
    ("id_in_use_across_pops", HeadInUse, _id_in_use_across_pops),
    ("id_twice_in_one_batch", HeadInUse, _id_twice_in_one_batch),
    # chain length: a NEXT run all round the ring
    ("next_all_around_the_ring", ChainTooLong, _next_all_around),
    ("next_all_around_from_mid_ring", ChainTooLong, _next_all_around_from_mid_ring),
    # wrap-counter confusion inside a chain
    ("mid_chain_flags_used", DescriptorNotAvailable, _mid_chain_flags(AVAIL | USED)),
    ("mid_chain_flags_other_wrap", DescriptorNotAvailable, _mid_chain_flags(USED)),
    ("mid_chain_flags_zero", DescriptorNotAvailable, _mid_chain_flags(0)),
    ("wrap_not_flipped_at_the_ring_end", DescriptorNotAvailable,
     _wrap_not_flipped_at_the_ring_end),
    ("chain_into_slots_in_flight", DescriptorNotAvailable, _chain_into_slots_in_flight),
    # indirect tables
    ("nested_indirect", NestedIndirectDescriptor, _nested_indirect),
    ("nested_indirect_later_entry", NestedIndirectDescriptor, _nested_indirect_later_entry),
    ("indirect_len_0", IndirectLengthError, _indirect_len(0)),
    ("indirect_len_8", IndirectLengthError, _indirect_len(8)),
    ("indirect_len_24", IndirectLengthError, _indirect_len(24)),
    ("indirect_len_17", IndirectLengthError, _indirect_len(17)),
    ("indirect_more_entries_than_queue", IndirectTableTooLong, _indirect_len(16 * (Q + 1))),
    ("indirect_len_4g_minus_16", IndirectTableTooLong, _indirect_len(0xFFFFFFF0)),
    ("indirect_with_next", IndirectWithNext, _indirect_with_next),
    ("indirect_table_in_gap", AddressOutOfBounds, _indirect_table_at(GAP)),
    ("indirect_table_nowhere", AddressOutOfBounds, _indirect_table_at(NOWHERE)),
    ("indirect_table_past_region_end", AddressOutOfBounds, _indirect_table_at(R1_END - 16)),
    ("indirect_table_across_adjacent_regions", IndirectTableNotContiguous,
     _indirect_table_at(R0_END - 16)),
    ("indirect_table_across_gap", IndirectTableNotContiguous,
     _indirect_table_at(R2_END - 16, 128)),
    ("indirect_table_addr_overflow", AddressOverflow, _indirect_table_at(2**64 - 16, 32)),
    # buffers
    ("buffer_in_gap", AddressOutOfBounds, _buffer_at(GAP, 16)),
    ("buffer_nowhere", AddressOutOfBounds, _buffer_at(NOWHERE, 1)),
    ("writable_buffer_nowhere", AddressOutOfBounds, _buffer_at(NOWHERE, 16, WRITE)),
    ("buffer_straddling_region_end", AddressOutOfBounds, _buffer_at(R1_END - 8, 16)),
    ("buffer_across_gap", AddressOutOfBounds, _buffer_at(R2_END - 8, 128)),
    ("buffer_past_huge_region", AddressOutOfBounds, _buffer_at(HUGE_GPA + HUGE_SIZE - 1, 2)),
    ("buffer_in_indirect_in_gap", AddressOutOfBounds, _buffer_in_indirect_at(GAP, 16)),
    ("buffer_addr_overflow", AddressOverflow, _buffer_at(2**64 - 8, 16)),
    ("buffer_addr_overflow_max", AddressOverflow, _buffer_at(2**64 - 1, 2)),
    ("buffer_addr_overflow_4g", AddressOverflow, _buffer_at(2**64 - 0x1000, 0xFFFFFFFF)),
    ("buffer_in_indirect_addr_overflow", AddressOverflow, _buffer_in_indirect_at(2**64 - 4, 8)),
    # chain totals and order
    ("chain_len_over_4g_readable", ChainLengthOverflow, _chain_len_over_4g(0)),
    ("chain_len_over_4g_writable", ChainLengthOverflow, _chain_len_over_4g(WRITE)),
    ("chain_len_over_4g_indirect", ChainLengthOverflow, _chain_len_over_4g(0, True)),
    ("chain_len_4g_exactly", ChainLengthOverflow, _chain_len_one_over),
    ("writable_before_readable", WritableBeforeReadable, _writable_before_readable),
    ("empty_writable_before_readable", WritableBeforeReadable, _empty_writable_before_readable),
    ("writable_before_readable_in_indirect", WritableBeforeReadable,
     _writable_before_readable_in_indirect),
    ("writable_then_indirect_readable", WritableBeforeReadable, _writable_then_indirect_readable),
]


def outcome(fn):
    try:
        return ("ok", fn())
    except QueueError as exc:
        return ("raise", type(exc), exc.code, exc.index, exc.addr, exc.length)


def snapshot(batch):
    return (batch.count, batch.heads.tolist(),
            [tuple(batch.chain(i)[:4]) for i in range(batch.count)],
            batch.seg_addr.tolist(), batch.seg_len.tolist())


def expect_violation(env: PackedEnv, log, queue, exc_cls, op, batch):
    """Run ``op(batch)`` and check everything a violation must leave behind. Returns
    the exception and what the failing call left: the batch and the queue's state."""
    assert not queue.broken
    with pytest.raises(RingViolation) as info:
        op(batch)
    exc = info.value
    assert type(exc) is exc_cls, f"expected {exc_cls.__name__}, got {type(exc).__name__}: {exc}"
    assert exc.code < 0
    left = (snapshot(batch), state(queue))
    assert queue.broken
    assert type(queue.error) is exc_cls and str(queue.error) == str(exc)
    assert queue.error.__traceback__ is None
    assert queue.violations == 1
    records = violation_records(log)
    assert len(records) == 1 and str(exc) in records[0].getMessage()
    device_touch(batch)              # the chains popped before the bad one are usable
    env.check_segments(batch)
    for _ in range(2):
        with pytest.raises(QueueBroken) as again:
            op(batch)
        assert type(again.value) is QueueBroken and again.value.code == -22
        assert batch.count == 0
    assert queue.violations == 1
    assert len(violation_records(log)) == 1
    env.check_guards()
    env.check_healthy()
    env.check_guards()
    return exc, left


def state(queue):
    if hasattr(queue, "next_used"):
        return (queue.broken, queue.in_flight, queue.next_avail, queue.next_used)
    return (queue.broken, queue.in_flight, queue.num_free, queue.next_avail, queue.last_used)


def as_outcome(exc):
    return ("raise", type(exc), exc.code, exc.index, exc.addr, exc.length)


@pytest.mark.parametrize("build, exc_cls", [pytest.param(b, c, id=n) for n, c, b in HOSTILE])
def test_device_violation(env, log, build, exc_cls):
    build(env)
    exc, left = expect_violation(env, log, env.dev, exc_cls, env.dev.pop, ChainBatch(Q))
    # the model gives the same verdict on the same ring, leaving the same behind
    m_first, m_snap, m_state, m_second = model_verdict(build)
    assert (m_first, m_snap, m_state) == (as_outcome(exc), *left)
    assert m_second[:3] == ("raise", QueueBroken, -22)


def model_verdict(build):
    """The same hostile ring, popped by vqcore.model_packed: outcome, batch, state and
    the second pop's outcome."""
    e = PackedEnv(impl=model_packed)
    try:
        build(e)
        batch = model_packed.ChainBatch(Q)
        first = outcome(lambda: e.dev.pop(batch))
        left = (snapshot(batch), state(e.dev))
        second = outcome(lambda: e.dev.pop(batch))
        e.check_guards()
        return first, *left, second
    finally:
        e.close()


# ---- wrap-counter confusion at the head: not available, so not popped ----------------------------

def pop_nothing(env, log):
    batch = ChainBatch(Q)
    assert env.dev.pending() == 0
    assert env.dev.pop(batch) == 0 and batch.count == 0
    assert not env.dev.broken and env.dev.violations == 0 and not violation_records(log)
    assert not env.dev.enable_notification()
    env.check_guards()


@pytest.mark.parametrize("flags", [AVAIL | USED, USED, 0, AVAIL | USED | NEXT | WRITE],
                         ids=["used", "other_wrap", "zero", "used_with_next"])
def test_head_that_is_not_available_is_not_popped(env, log, flags):
    """A descriptor whose AVAIL/USED bits say "used" or "available in the other lap"
    (or were never set) is not available, whatever else it holds."""
    raw(env.mem, 0, GAP, 0xFFFFFFFF, 0xFFFF, flags | INDIRECT)     # hostile, but not offered
    pop_nothing(env, log)
    for impl in (model_packed,):
        e = PackedEnv(impl=impl, huge=False)
        raw(e.mem, 0, GAP, 0xFFFFFFFF, 0xFFFF, flags | INDIRECT)
        assert e.dev.pop(impl.ChainBatch(Q)) == 0 and not e.dev.broken
        e.close()


def test_stale_descriptors_of_the_previous_lap_are_not_popped(env, log):
    """After a full lap the device's wrap counter is 0: the descriptors the driver made
    available in lap 1, and the used ones the device wrote over them, are not
    available any more; the ones of lap 2 (wrap-0 bits) are."""
    slot = 0
    for k in range(Q // 2):                           # a full lap of 2-descriptor chains
        slot, wrap = chain(env.mem, slot, readable(2), id_=k)
    assert (slot, wrap) == (0, 0)
    batch = ChainBatch(Q)
    assert env.dev.pop(batch) == Q // 2
    assert env.dev.next_avail == 0                    # slot 0, wrap counter 0
    pop_nothing(env, log)                             # lap-1 descriptors: stale
    batch.used_len[:] = 0
    env.dev.push_used(batch)                          # used descriptors over them
    assert env.dev.next_used == 0
    flags = struct.unpack("<H", env.mem.read(PRING.desc + 14, 2))[0]
    assert flags == AVAIL | USED                      # used in lap 1
    pop_nothing(env, log)
    chain(env.mem, 0, readable(3), id_=9, wrap=0)     # lap 2: a real one
    assert env.dev.pop(batch) == 1 and batch.heads.tolist() == [9]
    assert env.dev.next_avail == 3


# ---- the valid side of each boundary -------------------------------------------------------------

def pop_ok(env, count, batch=None):
    batch = batch or ChainBatch(Q)
    assert env.dev.pop(batch) == count
    assert not env.dev.broken and env.dev.violations == 0
    env.check_segments(batch)
    device_touch(batch)
    env.check_guards()
    return batch


@pytest.mark.parametrize("first", [0, 9])
def test_chain_of_exactly_queue_size_descriptors(env, log, first):
    """Q descriptors (from slot 9 it crosses the end: slots 0..8 carry wrap-0 bits);
    a zero-length one makes no segment but counts."""
    env.dev.next_avail = env.dev.next_used = first | 1 << 15
    entries = [(BUF + 32 * i, 16, WRITE if i >= Q - 4 else 0) for i in range(Q)]
    entries[3] = (BUF + 96, 0, 0)
    chain(env.mem, first, entries, id_=Q - 1)
    batch = pop_ok(env, 1)
    c = batch.chain(0)
    assert c.head == Q - 1 and len(c.segments) == Q - 1
    assert batch.descriptors_used.tolist() == [Q]
    assert c.readable == 16 * (Q - 5) and c.writable == 16 * 4
    assert env.dev.next_avail == first                # a full lap: wrap counter 0 now
    batch.used_len[:] = 64
    env.dev.push_used(batch)
    assert env.dev.next_used == first
    assert not violation_records(log)


def test_indirect_table_of_exactly_queue_size_entries(env):
    table(env.mem, IND, readable(Q))
    chain(env.mem, 0, [(IND, 16 * Q, INDIRECT | WRITE)], id_=4)    # WRITE here is ignored
    batch = pop_ok(env, 1)
    assert batch.heads.tolist() == [4] and batch.descriptors_used.tolist() == [1]
    assert [s[:2] for s in batch.chain(0).segments] == readable(Q)
    assert batch.writable_bytes.tolist() == [0]


def test_direct_descriptors_then_an_indirect_table_are_accepted(env):
    """Section 2.8.8 says a driver does not put INDIRECT in a NEXT list; the device is
    lenient (as for split rings): the chain is read, with every check applied."""
    table(env.mem, IND, [(BUF + 64, 16), (BUF + 96, 16, WRITE | NEXT)])   # NEXT ignored
    chain(env.mem, 0, [(BUF, 16), (IND, 32, INDIRECT)], id_=2)
    batch = pop_ok(env, 1)
    assert batch.descriptors_used.tolist() == [2]
    assert batch.chain(0).segments == [(BUF, 16, False), (BUF + 64, 16, False),
                                       (BUF + 96, 16, True)]


def test_buffer_crossing_adjacent_regions_and_ending_at_2_64(env):
    data = bytes((i * 13) & 0xFF for i in range(200))
    env.mem.write(R0_END - 100, data)
    chain(env.mem, 0, [(R0_END - 100, 200), (2**64 - 16, 16, WRITE)])
    batch = pop_ok(env, 1)
    assert batch.chain(0).segments == [(R0_END - 100, 100, False), (R0_END, 100, False),
                                       (2**64 - 16, 16, True)]
    assert batch.chain_bytes(0) == data


def test_chain_totals_at_the_2_32_limit(env):
    chain(env.mem, 0, [(HUGE_GPA, 0x80000000), (HUGE_GPA, 0x7FFFFFFF),
                       (HUGE_GPA, 0xFFFFFFFF, WRITE)])
    batch = ChainBatch(Q)
    assert env.dev.pop(batch) == 1 and not env.dev.broken
    assert batch.readable_bytes.tolist() == [0xFFFFFFFF]
    assert batch.writable_bytes.tolist() == [0xFFFFFFFF]


@pytest.mark.parametrize("bad, exc_cls", [
    pytest.param([(BUF, 16, NEXT | WRITE), (BUF, 16)], WritableBeforeReadable, id="order"),
    pytest.param([(GAP, 16)], AddressOutOfBounds, id="outside"),
    pytest.param([(BUF, 16)], InvalidHeadIndex, id="id"),
])
def test_chains_before_the_bad_one_stay_in_the_batch(env, log, bad, exc_cls):
    slot, _ = chain(env.mem, 0, [(BUF + 0x100, 32), (BUF + 0x200, 64, WRITE)], id_=5)
    slot, _ = chain(env.mem, slot, [(BUF + 0x300, 8)], id_=0)
    chain(env.mem, slot, [b[:2] + ((b[2] & WRITE,) if len(b) > 2 else ()) for b in bad],
          id_=Q if exc_cls is InvalidHeadIndex else 1)
    batch = ChainBatch(Q)
    with pytest.raises(exc_cls):
        env.dev.pop(batch)
    assert batch.count == 2 and batch.heads.tolist() == [5, 0]
    assert batch.chain(0).segments == [(BUF + 0x100, 32, False), (BUF + 0x200, 64, True)]
    assert batch.chain(1).segments == [(BUF + 0x300, 8, False)]
    assert env.dev.in_flight == 2 and env.dev.next_avail == 0x8000 | 3
    batch.used_len[:] = [64, 0]
    env.dev.push_used(batch)                          # what was popped may be completed
    assert env.dev.in_flight == 0 and env.dev.next_used == 0x8000 | 3
    with pytest.raises(QueueBroken):
        env.dev.pop(batch)
    assert env.dev.violations == 1 and len(violation_records(log)) == 1
    env.check_guards()
    env.check_healthy()


# ---- caller errors: the queue is not broken ------------------------------------------------------

def test_push_of_an_id_never_popped(env, log):
    with pytest.raises(NotInFlight) as info:
        env.dev.push([3], [0])
    assert type(info.value) is NotInFlight and info.value.index == 3
    with pytest.raises(NotInFlight):
        env.dev.push([Q + 5], [0])
    assert not env.dev.broken and env.dev.error is None and not violation_records(log)
    chain(env.mem, 0, [(BUF, 16, WRITE)], id_=3)
    batch = pop_ok(env, 1)
    before = env.mem.read(PRING.desc, 16)
    with pytest.raises(NotInFlight):
        env.dev.push([3, 3], [16, 16])                # twice: refused, nothing written
    assert env.mem.read(PRING.desc, 16) == before
    assert env.dev.next_used == 0x8000 and env.dev.in_flight == 1
    env.dev.push([3], [16])
    assert env.dev.next_used == 0x8000 | 1
    with pytest.raises(NotInFlight):
        env.dev.push_used(batch)                      # already pushed
    assert not env.dev.broken and not violation_records(log)
    env.check_guards()


def test_chain_that_cannot_fit_an_empty_batch(env, log):
    slot, _ = chain(env.mem, 0, readable(3), id_=0)
    chain(env.mem, slot, readable(5), id_=1)
    small = ChainBatch(4, max_segments=4)
    assert env.dev.pop(small) == 1 and small.heads.tolist() == [0]   # the 5-segment one waits
    with pytest.raises(BatchTooSmall) as info:
        env.dev.pop(small)
    assert type(info.value) is BatchTooSmall and info.value.index == 3   # its head slot
    assert small.count == 0 and not env.dev.broken and not violation_records(log)
    assert env.dev.next_avail == 0x8000 | 3
    big = ChainBatch(4, max_segments=8)
    assert env.dev.pop(big) == 1 and big.heads.tolist() == [1]
    assert env.dev.next_avail == 0x8000 | 8
    env.check_guards()


# ---- time of check, time of use ------------------------------------------------------------------

def test_guest_rewriting_after_pop_changes_nothing_popped(env, log):
    table(env.mem, IND, [(BUF + 0x100, 48), (BUF + 0x200, 40, WRITE)])
    chain(env.mem, 0, [(BUF, 64), (IND, 32, INDIRECT)], id_=6)
    batch = pop_ok(env, 1)
    before = (batch.chain(0), batch.seg_addr.copy(), batch.seg_len.copy(), batch.seg_host.copy())
    # the guest scribbles over everything the device read, flags included
    raw(env.mem, 0, NOWHERE, 0xFFFFFFFF, 0xFFFF, WRITE | NEXT | INDIRECT | AVAIL)
    raw(env.mem, 1, GAP, 7, 0xFFFF, INDIRECT | NEXT | AVAIL)
    table(env.mem, IND, [(2**64 - 1, 0xFFFFFFFF, INDIRECT | NEXT)] * 2)
    assert batch.chain(0) == before[0]
    for a, b in zip((batch.seg_addr, batch.seg_len, batch.seg_host), before[1:]):
        assert np.array_equal(a, b)
    assert before[0].segments == [(BUF, 64, False), (BUF + 0x100, 48, False),
                                  (BUF + 0x200, 40, True)]
    batch.used_len[:] = 40
    env.dev.push_used(batch)
    assert env.dev.pop(batch) == 0                    # slot 2 was never offered
    assert not env.dev.broken and not violation_records(log)
    env.check_guards()


def test_guest_flipping_a_descriptor_concurrently():
    """Another process flips a one-descriptor chain between a valid and a hostile
    value (flags included; torn writes too) while we pop it again and again: every pop
    gives nothing, exactly the valid segment, or a RingViolation; never a mixture."""
    size = 0x10000
    fd = os.memfd_create("vq-packed-toctou")
    os.ftruncate(fd, size)
    shared = mmap.mmap(fd, size)
    os.close(fd)
    arr = np.frombuffer(shared, np.uint8)
    mem = GuestMemory([(0, arr)])
    dev = PackedDeviceQueue(mem, Q, *PRING[:3], name="toctou")
    good = np.frombuffer(struct.pack("<QIHH", BUF, 16, 3, AVAIL), np.uint8).copy()
    bad = np.frombuffer(struct.pack("<QIHH", 0x1234_5678_0000, 0xFFFFFFF0, 0xFFFF,
                                    AVAIL | WRITE | NEXT | INDIRECT), np.uint8).copy()
    gone = np.frombuffer(struct.pack("<QIHH", NOWHERE, 0xFFFFFFFF, 0xFFFF, USED | WRITE),
                         np.uint8).copy()                 # not available (wrap counter 0)
    stop = PRING.end + 0x800
    d0 = PRING.desc
    arr[d0:d0 + 16] = good
    arr[d0 + 16:d0 + 32] = np.frombuffer(struct.pack("<QIHH", GAP, 16, 0, USED), np.uint8)
    pid = os.fork()
    if pid == 0:                              # the hostile guest
        try:
            d64 = arr[d0:d0 + 16].view(np.uint64)
            g64, b64, n64 = good.view(np.uint64), bad.view(np.uint64), gone.view(np.uint64)
            deadline = time.monotonic() + 30
            while arr[stop] == 0 and time.monotonic() < deadline:
                for _ in range(100):
                    d64[0] = g64[0]; d64[1] = g64[1]      # noqa: E702
                    d64[1] = b64[1]; d64[0] = b64[0]      # noqa: E702
                    d64[0] = g64[0]; d64[1] = g64[1]      # noqa: E702
                    d64[1] = n64[1]; d64[0] = n64[0]      # noqa: E702
        finally:
            os._exit(0)
    outcomes = {"ok": 0, "none": 0}
    try:
        batch = ChainBatch(Q)
        for _ in range(20000):
            dev.reset()                       # slot 0, wrap counter 1, nothing in flight
            try:
                n = dev.pop(batch)
            except RingViolation as exc:
                outcomes[type(exc).__name__] = outcomes.get(type(exc).__name__, 0) + 1
                continue
            if n == 0:
                outcomes["none"] += 1
                continue
            assert n == 1 and batch.heads.tolist() == [3]
            assert batch.chain(0).segments == [(BUF, 16, False)]
            assert batch.seg_host.tolist() == [mem.host_address(BUF, 16)]
            outcomes["ok"] += 1
    finally:
        arr[stop] = 1
        _, status = os.waitpid(pid, 0)
        del dev, batch
        gc.collect()
        if not mem.attached:
            mem.close()
    assert os.waitstatus_to_exitcode(status) == 0
    print("flipping packed descriptor:", outcomes)
    # the flips really raced the pops: at least two different outcomes were seen (which
    # ones, and how often, is up to the scheduler)
    assert len([k for k, v in outcomes.items() if v]) >= 2, outcomes


# ---- driver side: a hostile device ---------------------------------------------------------------

def victim_driver(env, impl):
    drv = impl.PackedDriverQueue(env.mem, Q, *PDRV_RING[:3], name="victim-driver")
    b = impl.ChainBatch(4)
    b.append(readable=[(DRV_BUF, 16)], writable=[(DRV_BUF + 64, 100)], token=41)   # id 0, 2 slots
    b.append(readable=[(DRV_BUF + 256, 16)], token=42)            # id 1, 1 slot, no writable
    assert drv.add(b) == 2
    return drv


def used(mem, slot, id_, length, flags=AVAIL | USED):
    """A used descriptor at ``slot`` (by default used for wrap counter 1)."""
    raw(mem, slot, 0, length, id_, flags, table=PDRV_RING.desc)


DRIVER_CASES = [
    ("id_never_added", [(0, 5, 0, AVAIL | USED)], InvalidUsedId),
    ("id_eq_size", [(0, Q, 0, AVAIL | USED)], InvalidUsedId),
    ("id_ffff", [(0, 0xFFFF, 0, AVAIL | USED)], InvalidUsedId),
    ("id_twice", [(0, 0, 10, AVAIL | USED | WRITE), (2, 0, 10, AVAIL | USED | WRITE)],
     InvalidUsedId),
    ("len_over_writable", [(0, 0, 101, AVAIL | USED | WRITE)], InvalidUsedLength),
    ("len_on_readable_only", [(0, 1, 1, AVAIL | USED | WRITE)], InvalidUsedLength),
    ("len_ffffffff", [(0, 0, 0xFFFFFFFF, AVAIL | USED | WRITE)], InvalidUsedLength),
]


@pytest.mark.parametrize("elems, exc_cls", [pytest.param(e, c, id=n) for n, e, c in DRIVER_CASES])
def test_driver_violation(env, log, elems, exc_cls):
    drv = victim_driver(env, vqcore)
    for elem in elems:
        used(env.mem, *elem)
    exc, left = expect_violation(env, log, drv, exc_cls, drv.reclaim, ChainBatch(Q))
    with pytest.raises(QueueBroken):
        drv.add(ChainBatch(1))
    # the model driver gives the same verdict
    e = PackedEnv(impl=model_packed, huge=False)
    try:
        m = victim_driver(e, model_packed)
        for elem in elems:
            used(e.mem, *elem)
        batch = model_packed.ChainBatch(Q)
        assert outcome(lambda: m.reclaim(batch)) == as_outcome(exc)
        assert (snapshot(batch), state(m)) == left
        assert outcome(lambda: m.reclaim(batch))[:3] == ("raise", QueueBroken, -22)
    finally:
        e.close()
    del drv


def test_driver_accepts_exact_length_and_ignores_length_without_write(env, log):
    drv = victim_driver(env, vqcore)
    used(env.mem, 0, 1, 0xFFFFFFFF, AVAIL | USED)            # no WRITE: length ignored
    used(env.mem, 1, 0, 100, AVAIL | USED | WRITE)           # exactly the writable bytes
    batch = ChainBatch(Q)
    assert drv.reclaim(batch) == 2
    assert batch.tokens.tolist() == [42, 41] and batch.used_len.tolist() == [0, 100]
    assert drv.num_free == Q and not drv.broken and not violation_records(log)
    del drv


@pytest.mark.parametrize("flags", [AVAIL, USED, 0, USED | WRITE])
def test_driver_does_not_reclaim_descriptors_that_are_not_used(env, log, flags):
    """Used-descriptor bits that do not match the driver's wrap counter (here 1) are
    not a used descriptor: nothing is reclaimed, nothing breaks."""
    drv = victim_driver(env, vqcore)
    used(env.mem, 0, 5, 0xFFFFFFFF, flags)                   # hostile content, not used
    batch = ChainBatch(Q)
    assert drv.reclaim(batch) == 0 and not drv.broken and not violation_records(log)
    assert drv.in_flight == 2 and not drv.enable_interrupts()
    del drv


# ---- random rings --------------------------------------------------------------------------------

def test_random_packed_rings(log):
    """Random descriptor rings (raw bytes, mostly valid chains, or edge values; AVAIL/
    USED bits in any state) and indirect tables, popped from a random slot and wrap
    counter: a pop succeeds with every segment inside guest memory or raises a
    RingViolation; the popped segments are read and written through their host
    pointers; guard bytes never change."""
    env = PackedEnv(huge=False)
    rng = np.random.default_rng(20261128)
    regions = env.mem.regions
    small = [r for r in regions if r.size <= 0x10000]
    ends = [r.gpa + r.size for r in regions]
    addr_pool = np.array([BUF, BUF + 0x800, IND, IND + 16, IND2, GAP, NOWHERE, 2**64 - 16,
                          2**64 - 1] + [r.gpa for r in regions]
                         + [e - d for e in ends for d in (1, 8, 16, 64)], dtype=np.uint64)
    len_pool = np.array([0, 1, 8, 15, 16, 17, 32, 48, 64, 128, 256, 16 * Q, 16 * (Q + 1),
                         0x1000, 0xFFFFFFF0, 0xFFFFFFFF], dtype=np.uint32)
    dtype = np.dtype([("addr", "<u8"), ("len", "<u4"), ("id", "<u2"), ("flags", "<u2")])

    def descriptors(n, wrap):
        mode = rng.random()
        if mode < 0.1:
            return rng.integers(0, 256, 16 * n, dtype=np.uint8).tobytes()
        d = np.zeros(n, dtype)
        if mode < 0.6:                        # mostly valid chains for this wrap counter
            r = [small[k] for k in rng.integers(0, len(small), n)]
            d["len"] = rng.integers(0, 300, n)
            d["addr"] = [x.gpa + int(rng.integers(0, x.size)) for x in r]
            nxt = rng.random(n) < 0.6
            wr = np.sort(rng.random(n)) > rng.random()
            ind = rng.random(n) < 0.08
            d["addr"][ind] = np.where(rng.random(ind.sum()) < 0.5, IND, IND2)
            d["len"][ind] = 16 * rng.integers(1, Q + 1, ind.sum())
            good = np.where(rng.random(n) < 0.9, AVAIL if wrap else USED,
                            rng.choice([0, AVAIL, USED, AVAIL | USED], n))
            d["flags"] = nxt * NEXT + wr * WRITE + ind * INDIRECT + good
            d["flags"][ind] &= 0xFFFF ^ NEXT
            d["id"] = np.where(rng.random(n) < 0.9, rng.permutation(n) % Q,
                               rng.integers(0, 2**16, n))
            return d.tobytes()
        d["addr"] = addr_pool[rng.integers(0, len(addr_pool), n)]
        d["len"] = np.where(rng.random(n) < 0.8, len_pool[rng.integers(0, len(len_pool), n)],
                            rng.integers(0, 2**32, n, dtype=np.uint32))
        d["flags"] = rng.integers(0, 8, n) | rng.choice([0, AVAIL, USED, AVAIL | USED], n)
        d["id"] = np.where(rng.random(n) < 0.8, rng.integers(0, Q, n), rng.integers(0, 2**16, n))
        return d.tobytes()

    batch = ChainBatch(Q, max_segments=8 * Q * Q)
    outcomes: dict[str, int] = {}
    popped = 0
    for it in range(3000):
        env.dev.reset()
        start, wrap = int(rng.integers(0, Q)), int(rng.integers(0, 2))
        env.dev.next_avail = env.dev.next_used = start | wrap << 15
        env.mem.write(PRING.desc, descriptors(Q, wrap))
        env.mem.write(IND, descriptors(Q + 4, 1))
        env.mem.write(IND2, descriptors(Q + 4, 1))
        try:
            n = env.dev.pop(batch)
            kind = "ok" if n else "none"
        except RingViolation as exc:
            kind = type(exc).__name__
            assert env.dev.broken and type(env.dev.error) is type(exc)
            n = batch.count
        outcomes[kind] = outcomes.get(kind, 0) + 1
        assert n == batch.count <= Q
        env.check_segments(batch)
        assert int(batch.descriptors_used.sum()) <= Q
        assert len(set(batch.heads.tolist())) == n and all(h < Q for h in batch.heads.tolist())
        device_touch(batch)
        if n:
            popped += n
            batch.used_len[:] = 0
            env.dev.push_used(batch)
        if it % 50 == 0:
            env.check_guards()
    env.check_guards()
    print("random packed rings:", popped, "chains popped;", outcomes)
    assert outcomes.get("ok", 0) >= 200 and popped >= 500, outcomes
    assert outcomes.get("DescriptorNotAvailable", 0) > 0, outcomes
    assert len(outcomes) >= 10, outcomes
    env.close()
