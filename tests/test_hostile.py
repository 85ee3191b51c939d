"""Hostile-guest tests: one per rule of DESIGN.md "The guest is untrusted" (issue 2).

A guest driver (or, for a driver queue, a device) writes rings the API would never build;
``ringwriter`` writes them raw. For every violation we check that

* the specific exception class is raised (the exact class, not just a parent);
* the queue is then ``broken`` and a further pop raises :class:`QueueBroken`;
* the violation is logged exactly once on ``vqcore.split`` and counted (``violations``);
* no byte outside the guest memory regions changed (guard bytes around and between the
  regions, which all live in one numpy buffer);
* a second, independent queue pair on the same memory keeps moving data.

The guest memory map (queue size 16 everywhere)::

    R0   [0x00000, 0x10000)   rings, indirect tables, buffers
    R1   [0x10000, 0x14000)   adjacent to R0 in guest space, NOT in host space
    gap  [0x14000, 0x20000)
    R2   [0x20000, 0x21000)
    gap  [0x21000, 0x21040)   64 bytes
    R3   [0x21040, 0x22040)
    TOP  [2**64 - 0x1000, 2**64)
    HUGE [2**40, 2**40 + 2**32)  anonymous mmap, never touched (lazily backed)

In the host buffer the regions lie in the order R1 R0 R3 R2 TOP with a guard page before,
between and after them, so code that assumed guest-adjacent meant host-adjacent would
write into a guard.
"""

from __future__ import annotations

import ctypes
import gc
import logging
import mmap
import os
import time

import numpy as np
import pytest

from ringwriter import (VIRTQ_DESC_F_INDIRECT as INDIRECT, VIRTQ_DESC_F_NEXT as NEXT,
                        VIRTQ_DESC_F_WRITE as WRITE, complete, offer, pack_desc, write_avail_idx,
                        write_desc, write_descs, write_used_idx)
from vqcore import (ChainBatch, GuestMemory, SplitDeviceQueue, SplitDriverQueue,
                    split_addresses)
from vqcore.errors import (AddressOutOfBounds, AddressOverflow, BatchTooSmall,
                           ChainLengthOverflow, ChainTooLong, HeadInUse, IndirectLengthError,
                           IndirectTableNotContiguous, IndirectTableTooLong, IndirectWithNext,
                           InvalidAvailRingIndex, InvalidDescriptorIndex, InvalidHeadIndex,
                           InvalidUsedId, InvalidUsedLength, InvalidUsedRingIndex,
                           NestedIndirectDescriptor, NotInFlight, QueueBroken, RingViolation,
                           WritableBeforeReadable)

Q = 16
GUARD = 0x1000
GUARD_BYTE = 0xA5

R0 = (0x00000, 0x10000)
R1 = (0x10000, 0x04000)
R2 = (0x20000, 0x01000)
R3 = (0x21040, 0x01000)
TOP = (2**64 - 0x1000, 0x1000)
HOST_ORDER = (R1, R0, R3, R2, TOP)
HUGE_GPA = 1 << 40
HUGE_SIZE = 1 << 32

R0_END = R0[0] + R0[1]
R1_END = R1[0] + R1[1]
R2_END = R2[0] + R2[1]
GAP = 0x14000                   # unmapped
NOWHERE = 0x8000_0000           # unmapped, far from everything

RING = split_addresses(0x0000, Q)      # the hostile device queue
HEALTHY = split_addresses(0x1000, Q)   # the independent pair that must keep working
IND = 0x2000                           # indirect tables written by the hostile guest
IND2 = 0x2800
DRV_RING = split_addresses(0x3000, Q)  # driver queue facing a hostile device
BUF = 0x4000                           # buffers of the hostile guest
HEALTHY_BUF = 0x8000
DRV_BUF = 0xC000

LOGGER = "vqcore.split"


class Env:
    """One guest memory map, a hostile device queue and an independent healthy pair."""

    def __init__(self, huge: bool = True):
        self.backing = np.full(GUARD * (len(HOST_ORDER) + 1) + sum(s for _, s in HOST_ORDER),
                               GUARD_BYTE, np.uint8)
        self.guard = np.ones(self.backing.shape, bool)
        self.mem = GuestMemory()
        off = GUARD
        for gpa, size in HOST_ORDER:
            self.backing[off:off + size] = 0
            self.guard[off:off + size] = False
            self.mem.add_region(gpa, self.backing, offset=off, size=size)
            off += size + GUARD
        self.huge = None
        if huge:
            self.huge = mmap.mmap(-1, HUGE_SIZE)
            self.mem.add_region(HUGE_GPA, self.huge)
        self.guard_image = self.backing[self.guard].copy()
        self.dev = SplitDeviceQueue(self.mem, Q, RING.desc, RING.avail, RING.used,
                                    name="hostile")
        self.ok_drv = SplitDriverQueue(self.mem, Q, HEALTHY.desc, HEALTHY.avail, HEALTHY.used,
                                       name="healthy-driver")
        self.ok_dev = SplitDeviceQueue(self.mem, Q, HEALTHY.desc, HEALTHY.avail, HEALTHY.used,
                                       name="healthy-device")
        self.rounds = 0

    # ---- checks ---------------------------------------------------------------------

    def check_guards(self):
        """No byte outside the regions changed."""
        now = self.backing[self.guard]
        bad = np.flatnonzero(now != self.guard_image)
        assert bad.size == 0, f"{bad.size} guard bytes changed"

    def check_segments(self, batch: ChainBatch):
        """Every segment of ``batch`` lies inside one region, at the right host address."""
        regions = self.mem.regions
        for gpa, length, host in zip(batch.seg_addr.tolist(), batch.seg_len.tolist(),
                                     batch.seg_host.tolist()):
            assert length > 0
            for r in regions:
                if r.gpa <= gpa and gpa - r.gpa + length <= r.size:
                    assert host == r.host_addr + (gpa - r.gpa)
                    break
            else:
                raise AssertionError(f"segment {gpa:#x}+{length} is outside guest memory")

    def check_healthy(self):
        """The independent queue pair moves four chains with content checks."""
        self.rounds += 1
        b = ChainBatch(8)
        requests = []
        for i in range(4):
            rd, wr = HEALTHY_BUF + i * 512, HEALTHY_BUF + i * 512 + 256
            payload = bytes([(self.rounds * 31 + i * 7 + k) & 0xFF for k in range(64)])
            self.mem.write(rd, payload)
            b.append(readable=[(rd, 64)], writable=[(wr, 128)], token=1000 * self.rounds + i)
            requests.append((payload, wr))
        assert self.ok_drv.add(b) == 4
        got = ChainBatch(8)
        assert self.ok_dev.pop(got) == 4
        for i, (payload, _) in enumerate(requests):
            assert got.chain_bytes(i) == payload
            c = got.chain(i)
            wgpa, wlen, writable = c.segments[1]
            assert writable and wlen == 128
            host = int(got.seg_host[got.seg_start[i] + 1])
            ctypes.memmove(host, payload[::-1], 64)
        got.used_len[:] = 64
        self.ok_dev.push_used(got)
        back = ChainBatch(8)
        assert self.ok_drv.reclaim(back) == 4
        assert sorted(back.tokens.tolist()) == [1000 * self.rounds + i for i in range(4)]
        assert back.used_len.tolist() == [64] * 4
        for payload, wr in requests:
            assert self.mem.read(wr, 64) == payload[::-1]
        assert not self.ok_dev.broken and not self.ok_drv.broken

    def close(self):
        del self.dev, self.ok_drv, self.ok_dev
        # A broken queue keeps its violation, whose traceback refers back to frames
        # that held the queue; pytest also keeps the log record (which holds the
        # exception) until after fixture teardown. The collector frees them later.
        gc.collect()
        if not self.mem.attached:
            self.mem.close()


@pytest.fixture
def env():
    e = Env()
    yield e
    e.close()


@pytest.fixture
def log(caplog):
    caplog.set_level(logging.WARNING, logger=LOGGER)
    return caplog


def device_touch(batch: ChainBatch, limit: int = 1 << 20):
    """Use the popped chains as a device would: read every readable segment and fill
    every writable one through its host pointer (segments longer than ``limit`` are
    skipped: they point into the lazily backed huge region)."""
    host, length = batch.seg_host.tolist(), batch.seg_len.tolist()
    for i in range(batch.count):
        s0, s1 = int(batch.seg_start[i]), int(batch.seg_start[i + 1])
        nread = int(batch.readable_segments[i])
        for s in range(s0, s1):
            if length[s] > limit:
                continue
            if s - s0 < nread:
                ctypes.string_at(host[s], length[s])
            else:
                ctypes.memset(host[s], 0x5A, length[s])


def violation_records(caplog):
    return [r for r in caplog.records if r.name == LOGGER and r.levelno >= logging.WARNING]


def expect_violation(env: Env, log, queue, exc_cls, op, batch: ChainBatch):
    """Run ``op(batch)`` and check everything a violation must leave behind."""
    assert not queue.broken
    with pytest.raises(RingViolation) as info:
        op(batch)
    exc = info.value
    assert type(exc) is exc_cls, f"expected {exc_cls.__name__}, got {type(exc).__name__}: {exc}"
    assert queue.broken
    # the queue keeps a traceback-free copy of the violation
    assert type(queue.error) is exc_cls and str(queue.error) == str(exc)
    assert queue.error.__traceback__ is None
    assert queue.violations == 1
    records = violation_records(log)
    assert len(records) == 1 and str(exc) in records[0].getMessage()
    device_touch(batch)              # the chains popped before the bad one are usable
    for _ in range(2):
        with pytest.raises(QueueBroken):
            op(batch)
        assert batch.count == 0
    assert queue.violations == 1
    assert len(violation_records(log)) == 1
    env.check_guards()
    env.check_healthy()
    env.check_guards()
    return exc


def linear(base, count, length=16, last_flags=0, flags=0):
    """``count`` descriptors chained 0 -> 1 -> ... (indices relative to the table)."""
    out = []
    for i in range(count):
        f = flags | (NEXT if i + 1 < count else last_flags)
        out.append((base + 32 * i, length, f, i + 1 if i + 1 < count else 0))
    return out


# ---- the device-side rules --------------------------------------------------------------
# Each case writes a hostile ring into guest memory; the generic test pops it.

def _self_loop(e):
    write_desc(e.mem, RING.desc, 0, BUF, 16, NEXT, 0)
    return [0]


def _two_cycle(e):
    write_descs(e.mem, RING.desc, [(BUF, 16, NEXT, 1), (BUF + 16, 16, NEXT, 0)])
    return [0]


def _full_table_cycle(e):
    write_descs(e.mem, RING.desc, [(BUF + 16 * i, 16, NEXT, (i + 1) % Q) for i in range(Q)])
    return [5]


def _cycle_in_indirect_table(e):
    entries = linear(BUF, Q)
    entries[-1] = (BUF, 16, NEXT, 0)            # the last entry loops back to the first
    write_descs(e.mem, IND, entries)
    write_desc(e.mem, RING.desc, 0, IND, 16 * Q, INDIRECT)
    return [0]


def _self_loop_in_indirect_table(e):
    write_descs(e.mem, IND, [(BUF, 16, NEXT, 1), (BUF + 16, 16, NEXT, 1)])
    write_desc(e.mem, RING.desc, 0, IND, 32, INDIRECT)
    return [0]


def _next_beyond_table(nxt):
    def build(e):
        write_descs(e.mem, RING.desc, [(BUF, 16, NEXT, 1), (BUF + 16, 16, NEXT, nxt)])
        return [0]
    return build


def _next_beyond_indirect_table(e):
    # next = 2 is below the queue size but beyond this 2-entry table
    write_descs(e.mem, IND, [(BUF, 16, NEXT, 1), (BUF + 16, 16, NEXT, 2)])
    write_desc(e.mem, RING.desc, 0, IND, 32, INDIRECT)
    return [0]


def _head_beyond(head):
    def build(e):
        write_desc(e.mem, RING.desc, 0, BUF, 16)
        return [head]
    return build


def _avail_idx_jump(idx, start=0):
    def build(e):
        e.dev.next_avail = start
        write_avail_idx(e.mem, RING.avail, idx)
        return None
    return build


def _nested_indirect(e):
    write_desc(e.mem, IND2, 0, BUF, 16)
    write_descs(e.mem, IND, [(IND2, 16, INDIRECT)])
    write_desc(e.mem, RING.desc, 0, IND, 16, INDIRECT)
    return [0]


def _nested_indirect_later_entry(e):
    write_desc(e.mem, IND2, 0, BUF, 16)
    write_descs(e.mem, IND, [(BUF, 16, NEXT, 1), (IND2, 16, INDIRECT | NEXT, 2),
                             (BUF + 32, 16)])
    write_desc(e.mem, RING.desc, 0, IND, 48, INDIRECT)
    return [0]


def _indirect_len(length):
    def build(e):
        write_descs(e.mem, IND, linear(BUF, Q + 1))
        write_desc(e.mem, RING.desc, 0, IND, length, INDIRECT)
        return [0]
    return build


def _indirect_with_next(e):
    write_descs(e.mem, IND, linear(BUF, 2))
    write_descs(e.mem, RING.desc, [(IND, 32, INDIRECT | NEXT, 1), (BUF, 16)])
    return [0]


def _indirect_table_at(addr, length=32):
    def build(e):
        write_desc(e.mem, RING.desc, 0, addr, length, INDIRECT)
        return [0]
    return build


def _buffer_at(addr, length, flags=0):
    def build(e):
        write_descs(e.mem, RING.desc, [(BUF, 16, NEXT, 1), (addr, length, flags)])
        return [0]
    return build


def _buffer_in_indirect_at(addr, length):
    def build(e):
        write_descs(e.mem, IND, [(BUF, 16, NEXT, 1), (addr, length)])
        write_desc(e.mem, RING.desc, 0, IND, 32, INDIRECT)
        return [0]
    return build


def _chain_len_over_4g(flags, via_indirect=False):
    def build(e):
        entries = [(HUGE_GPA, 0xFFFFFFFF, flags | NEXT, 1), (HUGE_GPA, 0xFFFFFFFF, flags)]
        if via_indirect:
            write_descs(e.mem, IND, entries)
            write_desc(e.mem, RING.desc, 0, IND, 32, INDIRECT)
        else:
            write_descs(e.mem, RING.desc, entries)
        return [0]
    return build


def _chain_len_one_over(e):
    write_descs(e.mem, RING.desc, [(HUGE_GPA, 0xFFFFFFFF, NEXT, 1), (HUGE_GPA, 1)])
    return [0]


def _writable_before_readable(e):
    write_descs(e.mem, RING.desc, [(BUF, 16, WRITE | NEXT, 1), (BUF + 16, 16)])
    return [0]


def _empty_writable_before_readable(e):
    # zero-length descriptors make no segment but still count for the order rule
    write_descs(e.mem, RING.desc, [(BUF, 16, NEXT, 1), (BUF + 16, 0, WRITE | NEXT, 2),
                                   (BUF + 32, 16)])
    return [0]


def _writable_before_readable_in_indirect(e):
    write_descs(e.mem, IND, [(BUF, 16, NEXT, 1), (BUF + 16, 16, WRITE | NEXT, 2),
                             (BUF + 32, 16)])
    write_desc(e.mem, RING.desc, 0, IND, 48, INDIRECT)
    return [0]


def _writable_then_indirect_readable(e):
    write_descs(e.mem, IND, [(BUF + 64, 16)])
    write_descs(e.mem, RING.desc, [(BUF, 16, WRITE | NEXT, 1), (IND, 16, INDIRECT)])
    return [0]


def _head_in_use_across_pops(e):
    write_desc(e.mem, RING.desc, 0, BUF, 16)
    offer(e.mem, RING.avail, Q, [0])
    b = ChainBatch(Q)
    assert e.dev.pop(b) == 1 and e.dev.in_flight == 1
    return [0]                       # the guest offers head 0 again, still in flight


HOSTILE = [
    # loops and chain length
    ("self_loop", ChainTooLong, _self_loop),
    ("two_cycle", ChainTooLong, _two_cycle),
    ("full_table_cycle", ChainTooLong, _full_table_cycle),
    ("cycle_in_indirect_table", ChainTooLong, _cycle_in_indirect_table),
    ("self_loop_in_indirect_table", ChainTooLong, _self_loop_in_indirect_table),
    # indices
    ("next_eq_size", InvalidDescriptorIndex, _next_beyond_table(Q)),
    ("next_ffff", InvalidDescriptorIndex, _next_beyond_table(0xFFFF)),
    ("next_beyond_indirect_table", InvalidDescriptorIndex, _next_beyond_indirect_table),
    ("head_eq_size", InvalidHeadIndex, _head_beyond(Q)),
    ("head_ffff", InvalidHeadIndex, _head_beyond(0xFFFF)),
    ("avail_idx_size_plus_1", InvalidAvailRingIndex, _avail_idx_jump(Q + 1)),
    ("avail_idx_half_way", InvalidAvailRingIndex, _avail_idx_jump(0x8000)),
    ("avail_idx_backwards", InvalidAvailRingIndex, _avail_idx_jump(0xFFFF)),
    ("avail_idx_jump_across_wrap", InvalidAvailRingIndex, _avail_idx_jump(Q + 1 - 8, 0xFFF8)),
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
    ("buffer_past_region_end", AddressOutOfBounds, _buffer_at(R1_END - 8, 16)),
    ("buffer_across_gap", AddressOutOfBounds, _buffer_at(R2_END - 8, 128)),
    ("buffer_past_huge_region", AddressOutOfBounds, _buffer_at(HUGE_GPA + HUGE_SIZE - 1, 2)),
    ("buffer_in_indirect_in_gap", AddressOutOfBounds, _buffer_in_indirect_at(GAP, 16)),
    ("buffer_addr_overflow", AddressOverflow, _buffer_at(2**64 - 8, 16)),
    ("buffer_addr_overflow_max", AddressOverflow, _buffer_at(2**64 - 1, 2)),
    ("buffer_addr_overflow_4g", AddressOverflow, _buffer_at(2**64 - 0x1000, 0xFFFFFFFF)),
    ("buffer_in_indirect_addr_overflow", AddressOverflow,
     _buffer_in_indirect_at(2**64 - 4, 8)),
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
    # heads
    ("head_in_use_across_pops", HeadInUse, _head_in_use_across_pops),
]


@pytest.mark.parametrize("build, exc_cls", [pytest.param(b, c, id=n) for n, c, b in HOSTILE])
def test_device_violation(env, log, build, exc_cls):
    heads = build(env)
    if heads is not None:
        offer(env.mem, RING.avail, Q, heads)
    batch = ChainBatch(Q)
    exc = expect_violation(env, log, env.dev, exc_cls, env.dev.pop, batch)
    assert exc.code < 0


def test_head_offered_twice_in_one_batch(env, log):
    """The first copy is popped (and stays in the batch), the second is HeadInUse."""
    write_desc(env.mem, RING.desc, 3, BUF, 16)
    offer(env.mem, RING.avail, Q, [3, 3])
    batch = ChainBatch(Q)
    with pytest.raises(HeadInUse) as info:
        env.dev.pop(batch)
    assert info.value.index == 3
    assert batch.count == 1 and batch.heads.tolist() == [3]
    assert env.dev.in_flight == 1 and env.dev.next_avail == 1
    assert env.dev.broken and env.dev.violations == 1
    assert len(violation_records(log)) == 1
    env.check_guards()
    env.check_healthy()


@pytest.mark.parametrize("bad, exc_cls", [
    pytest.param([(BUF, 16, NEXT, 9)], ChainTooLong, id="self_loop"),
    pytest.param([(GAP, 16)], AddressOutOfBounds, id="outside"),
    pytest.param([(BUF, 16, WRITE | NEXT, 10), (BUF + 16, 16)], WritableBeforeReadable,
                 id="order"),
])
def test_chains_before_the_bad_one_stay_in_the_batch(env, log, bad, exc_cls):
    write_descs(env.mem, RING.desc, [(BUF + 0x100, 32, NEXT, 1), (BUF + 0x200, 64, WRITE)])
    write_desc(env.mem, RING.desc, 5, BUF + 0x300, 8)
    write_descs(env.mem, RING.desc, bad, first=9)
    offer(env.mem, RING.avail, Q, [0, 5, 9, 7])
    batch = ChainBatch(Q)
    with pytest.raises(exc_cls):
        env.dev.pop(batch)
    assert batch.count == 2 and batch.heads.tolist() == [0, 5]
    assert batch.chain(0).segments == [(BUF + 0x100, 32, False), (BUF + 0x200, 64, True)]
    assert batch.chain(1).segments == [(BUF + 0x300, 8, False)]
    env.check_segments(batch)
    assert env.dev.in_flight == 2 and env.dev.next_avail == 2
    # the device may still complete what it popped before the violation
    batch.used_len[:] = [64, 0]
    env.dev.push_used(batch)
    assert env.dev.in_flight == 0 and env.dev.next_used == 2
    with pytest.raises(QueueBroken):
        env.dev.pop(batch)
    assert env.dev.violations == 1 and len(violation_records(log)) == 1
    env.check_guards()
    env.check_healthy()


# ---- the valid side of each boundary --------------------------------------------------------

def pop_ok(env, heads, batch=None):
    offer(env.mem, RING.avail, Q, heads)
    batch = batch or ChainBatch(Q)
    assert env.dev.pop(batch) == len(heads)
    assert not env.dev.broken and env.dev.violations == 0
    env.check_segments(batch)
    device_touch(batch)
    env.check_guards()
    return batch


def test_chain_of_exactly_queue_size_descriptors(env, log):
    entries = linear(BUF, Q)
    entries[3] = (BUF + 96, 0, NEXT, 4)         # zero length: no segment, still counted
    entries = [(a, n, f | (WRITE if i >= Q - 4 else 0), x)
               for i, (a, n, f, x) in enumerate(entries)]
    write_descs(env.mem, RING.desc, entries)
    env.mem.write(BUF, bytes(range(256)) * 2)
    batch = pop_ok(env, [0])
    c = batch.chain(0)
    assert len(c.segments) == Q - 1
    assert batch.descriptors_used.tolist() == [Q]
    assert batch.readable_segments.tolist() == [Q - 5]
    assert c.readable == 16 * (Q - 5) and c.writable == 16 * 4
    expected = b"".join(env.mem.read(BUF + 32 * i, 16) for i in range(Q - 4) if i != 3)
    assert batch.chain_bytes(0) == expected
    batch.used_len[:] = 64
    env.dev.push_used(batch)
    assert not violation_records(log)


def test_indirect_table_of_exactly_queue_size_entries(env):
    write_descs(env.mem, IND, linear(BUF, Q, last_flags=0))
    write_desc(env.mem, RING.desc, 0, IND, 16 * Q, INDIRECT)
    batch = pop_ok(env, [0])
    assert batch.descriptors_used.tolist() == [1]
    assert [s[:2] for s in batch.chain(0).segments] == [(BUF + 32 * i, 16) for i in range(Q)]


def test_direct_descriptors_then_an_indirect_table(env):
    write_descs(env.mem, IND, [(BUF + 64, 16, NEXT, 1), (BUF + 96, 16, WRITE)])
    write_descs(env.mem, RING.desc, [(BUF, 16, NEXT, 1), (IND, 32, INDIRECT)])
    batch = pop_ok(env, [0])
    assert batch.descriptors_used.tolist() == [2]
    assert batch.chain(0).segments == [(BUF, 16, False), (BUF + 64, 16, False),
                                       (BUF + 96, 16, True)]


def test_avail_idx_exactly_queue_size_ahead(env):
    for i in range(Q):
        write_desc(env.mem, RING.desc, i, BUF + 16 * i, 16)
    env.dev.next_avail = 0xFFF8                  # and across the 16-bit wrap
    batch = ChainBatch(Q)
    offer(env.mem, RING.avail, Q, list(range(Q)), start=0xFFF8)
    assert env.dev.pop(batch) == Q
    assert batch.heads.tolist() == list(range(Q))
    assert env.dev.next_avail == (0xFFF8 + Q) & 0xFFFF
    env.check_guards()


def test_buffer_crossing_adjacent_regions(env):
    """Valid: one descriptor becomes two segments, one per region."""
    data = bytes((i * 13) & 0xFF for i in range(200))
    env.mem.write(R0_END - 100, data)
    write_desc(env.mem, RING.desc, 0, R0_END - 100, 200)
    batch = pop_ok(env, [0])
    assert batch.chain(0).segments == [(R0_END - 100, 100, False), (R0_END, 100, False)]
    assert batch.readable_segments.tolist() == [2]
    assert batch.readable_bytes.tolist() == [200] and batch.writable_bytes.tolist() == [0]
    assert batch.chain_bytes(0) == data
    # the host pieces are not contiguous (R0 and R1 are apart in the host buffer)
    assert batch.seg_host[1] != batch.seg_host[0] + 100
    # writable: device_touch (in pop_ok) fills both pieces through the host pointers
    write_descs(env.mem, RING.desc, [(BUF, 8, NEXT, 2), (R0_END - 60, 150, WRITE)], first=1)
    batch = pop_ok(env, [1])
    assert batch.chain(0).segments == [(BUF, 8, False), (R0_END - 60, 60, True),
                                       (R0_END, 90, True)]
    assert batch.writable_bytes.tolist() == [150]
    assert env.mem.read(R0_END - 60, 150) == b"\x5a" * 150
    assert env.mem.read(R0_END - 61, 1) == data[39:40]     # untouched just before


def test_buffer_ending_exactly_at_the_top_of_the_address_space(env):
    write_descs(env.mem, RING.desc, [(2**64 - 48, 16, NEXT, 1), (2**64 - 16, 16, WRITE)])
    env.mem.write(2**64 - 48, b"0123456789abcdef")
    batch = pop_ok(env, [0])
    assert batch.chain(0).segments == [(2**64 - 48, 16, False), (2**64 - 16, 16, True)]
    assert batch.chain_bytes(0) == b"0123456789abcdef"
    assert env.mem.read(2**64 - 16, 16) == b"\x5a" * 16      # written by device_touch
    # an indirect table may end there too
    write_descs(env.mem, 2**64 - 32, [(2**64 - 48, 16)])
    write_desc(env.mem, RING.desc, 2, 2**64 - 32, 32, INDIRECT)
    batch = pop_ok(env, [2])
    assert batch.chain(0).segments[0] == (2**64 - 48, 16, False)


def test_chain_totals_at_the_2_32_limit(env):
    """0xFFFFFFFF readable plus 0xFFFFFFFF writable bytes is valid (per direction)."""
    write_descs(env.mem, RING.desc, [
        (HUGE_GPA, 0x80000000, NEXT, 1), (HUGE_GPA, 0x7FFFFFFF, NEXT, 2),
        (HUGE_GPA, 0xFFFFFFFF, WRITE)])
    batch = pop_ok(env, [0])
    assert batch.readable_bytes.tolist() == [0xFFFFFFFF]
    assert batch.writable_bytes.tolist() == [0xFFFFFFFF]


# ---- caller errors: the queue is not broken ---------------------------------------------------

def test_push_of_a_head_never_popped(env, log):
    with pytest.raises(NotInFlight) as info:
        env.dev.push([3], [0])
    assert type(info.value) is NotInFlight and info.value.index == 3
    with pytest.raises(NotInFlight):
        env.dev.push([Q + 5], [0])              # not even a valid head
    assert not env.dev.broken and env.dev.violations == 0 and env.dev.error is None
    assert not violation_records(log)
    assert env.dev.next_used == 0
    # still fully usable; pushing the same head twice is refused and writes nothing
    write_desc(env.mem, RING.desc, 3, BUF, 16, WRITE)
    batch = pop_ok(env, [3])
    with pytest.raises(NotInFlight):
        env.dev.push([3, 3], [16, 16])
    assert env.dev.next_used == 0 and env.dev.in_flight == 1
    env.dev.push([3], [16])
    assert env.dev.next_used == 1
    with pytest.raises(NotInFlight):
        env.dev.push_used(batch)                # already pushed
    assert not env.dev.broken and not violation_records(log)
    env.check_guards()


def test_chain_that_cannot_fit_an_empty_batch(env, log):
    write_descs(env.mem, RING.desc, linear(BUF, 5))
    write_descs(env.mem, RING.desc, [(BUF, 16, NEXT, 9), (BUF + 16, 16, NEXT, 10),
                                     (BUF + 32, 16)], first=8)
    offer(env.mem, RING.avail, Q, [8, 0])
    small = ChainBatch(4, max_segments=4)
    assert env.dev.pop(small) == 1              # the 5-segment chain waits for the next pop
    assert small.heads.tolist() == [8]
    with pytest.raises(BatchTooSmall) as info:
        env.dev.pop(small)
    assert type(info.value) is BatchTooSmall and info.value.index == 0
    assert small.count == 0
    assert not env.dev.broken and env.dev.violations == 0 and not violation_records(log)
    assert env.dev.next_avail == 1 and env.dev.in_flight == 1
    big = ChainBatch(4, max_segments=8)
    assert env.dev.pop(big) == 1 and big.heads.tolist() == [0]
    assert len(big.chain(0).segments) == 5
    # a buffer split by a region boundary needs two segments
    write_desc(env.mem, RING.desc, 12, R0_END - 8, 16)
    offer(env.mem, RING.avail, Q, [12])
    with pytest.raises(BatchTooSmall):
        env.dev.pop(ChainBatch(1, max_segments=1))
    assert env.dev.pop(ChainBatch(1, max_segments=2)) == 1
    assert not env.dev.broken
    env.check_guards()


# ---- time of check, time of use ------------------------------------------------------------------

def test_guest_rewriting_after_pop_changes_nothing_popped(env, log):
    write_descs(env.mem, IND, [(BUF + 0x100, 48, NEXT, 1), (BUF + 0x200, 40, WRITE)])
    write_descs(env.mem, RING.desc, [(BUF, 64, NEXT, 1), (IND, 32, INDIRECT)])
    env.mem.write(BUF, bytes(range(64)))
    batch = pop_ok(env, [0])
    before = (batch.chain(0), batch.seg_addr.copy(), batch.seg_len.copy(),
              batch.seg_host.copy(), batch.readable_bytes.copy(), batch.writable_bytes.copy())
    # the guest scribbles hostile values over everything the device read
    write_descs(env.mem, RING.desc, [(NOWHERE, 0xFFFFFFFF, WRITE | NEXT, 0),
                                     (GAP, 7, INDIRECT | NEXT, 0)])
    write_descs(env.mem, IND, [(2**64 - 1, 0xFFFFFFFF, INDIRECT | NEXT, 0)] * 2)
    offer(env.mem, RING.avail, Q, [0xFFFF], start=0, publish=False)
    after = (batch.chain(0), batch.seg_addr, batch.seg_len, batch.seg_host,
             batch.readable_bytes, batch.writable_bytes)
    assert after[0] == before[0]
    for a, b in zip(after[1:], before[1:]):
        assert np.array_equal(a, b)
    assert before[0].segments == [(BUF, 64, False), (BUF + 0x100, 48, False),
                                  (BUF + 0x200, 40, True)]
    batch.used_len[:] = 40
    env.dev.push_used(batch)
    assert env.dev.pop(batch) == 0              # nothing new offered: nothing re-read
    assert not env.dev.broken and not violation_records(log)
    env.check_guards()


def test_guest_flipping_a_descriptor_concurrently(tmp_path):
    """Another process flips a descriptor between a valid and a hostile value (torn
    writes included) while we pop it again and again: every pop either gives exactly
    the valid segment or raises a RingViolation; never a mixture of the two."""
    size = 0x10000
    fd = os.memfd_create("vq-toctou")
    os.ftruncate(fd, size)
    shared = mmap.mmap(fd, size)
    os.close(fd)
    arr = np.frombuffer(shared, np.uint8)
    mem = GuestMemory([(0, arr)])
    dev = SplitDeviceQueue(mem, Q, RING.desc, RING.avail, RING.used, name="toctou")
    good = np.frombuffer(pack_desc(BUF, 16), np.uint8).copy()
    bad = np.frombuffer(pack_desc(0x1234_5678_0000, 0xFFFFFFF0, WRITE | NEXT, 0xFFFF),
                        np.uint8).copy()
    stop = RING.used + 0x800                  # a flag byte the child polls
    arr[RING.desc:RING.desc + 16] = good
    pid = os.fork()
    if pid == 0:                              # the hostile guest
        try:
            d = arr[RING.desc:RING.desc + 16]
            d64 = d.view(np.uint64)
            g64, b64 = good.view(np.uint64), bad.view(np.uint64)
            deadline = time.monotonic() + 30
            while arr[stop] == 0 and time.monotonic() < deadline:
                for _ in range(200):
                    d64[0] = g64[0]; d64[1] = g64[1]      # noqa: E702
                    d64[1] = b64[1]; d64[0] = b64[0]      # noqa: E702
        finally:
            os._exit(0)
    outcomes = {"ok": 0}
    try:
        batch = ChainBatch(Q)
        idx = 0
        for _ in range(20000):
            idx = offer(mem, RING.avail, Q, [0], start=idx)
            try:
                n = dev.pop(batch)
            except RingViolation as exc:
                outcomes[type(exc).__name__] = outcomes.get(type(exc).__name__, 0) + 1
                dev.reset()
                idx = 0
                write_avail_idx(mem, RING.avail, 0)
                continue
            assert n == 1
            assert batch.chain(0).segments == [(BUF, 16, False)]
            assert batch.seg_host.tolist() == [mem.host_address(BUF, 16)]
            outcomes["ok"] += 1
            dev.push([0], [0])
    finally:
        arr[stop] = 1
        _, status = os.waitpid(pid, 0)
        del dev, batch
        gc.collect()                          # see Env.close
        if not mem.attached:
            mem.close()
    assert os.waitstatus_to_exitcode(status) == 0
    assert sum(outcomes.values()) == 20000
    # both values were seen (the flipping really raced with the pops)
    print("flipping descriptor:", outcomes)
    assert outcomes["ok"] > 0 and len(outcomes) > 1, outcomes


# ---- driver side: a hostile device ------------------------------------------------------------

@pytest.fixture
def victim(env):
    drv = SplitDriverQueue(env.mem, Q, DRV_RING.desc, DRV_RING.avail, DRV_RING.used,
                           name="victim-driver")
    b = ChainBatch(4)
    b.append(readable=[(DRV_BUF, 16)], writable=[(DRV_BUF + 64, 100)], token=41)
    b.append(readable=[(DRV_BUF + 256, 16)], token=42)       # no writable bytes
    assert drv.add(b) == 2                                  # heads 0 and 2
    yield drv
    del drv


@pytest.mark.parametrize("elems, used_idx, exc_cls", [
    pytest.param([], Q + 1, InvalidUsedRingIndex, id="used_idx_size_plus_1"),
    pytest.param([], 0xFFFF, InvalidUsedRingIndex, id="used_idx_backwards"),
    pytest.param([(5, 0)], None, InvalidUsedId, id="id_never_added"),
    pytest.param([(1, 0)], None, InvalidUsedId, id="id_inside_a_chain"),
    pytest.param([(Q, 0)], None, InvalidUsedId, id="id_eq_size"),
    pytest.param([(0xFFFFFFFF, 0)], None, InvalidUsedId, id="id_ffffffff"),
    pytest.param([(0, 10), (0, 10)], None, InvalidUsedId, id="id_twice"),
    pytest.param([(0, 101)], None, InvalidUsedLength, id="len_over_writable"),
    pytest.param([(2, 1)], None, InvalidUsedLength, id="len_on_readable_only"),
    pytest.param([(0, 0xFFFFFFFF)], None, InvalidUsedLength, id="len_ffffffff"),
])
def test_driver_violation(env, log, victim, elems, used_idx, exc_cls):
    complete(env.mem, DRV_RING.used, Q, elems, start=0)
    if used_idx is not None:
        write_used_idx(env.mem, DRV_RING.used, used_idx)
    batch = ChainBatch(Q)
    expect_violation(env, log, victim, exc_cls, victim.reclaim, batch)
    with pytest.raises(QueueBroken):
        victim.add(ChainBatch(1))


def test_driver_accepts_the_exact_writable_length(env, log, victim):
    complete(env.mem, DRV_RING.used, Q, [(2, 0), (0, 100)], start=0)
    batch = ChainBatch(Q)
    assert victim.reclaim(batch) == 2
    assert batch.tokens.tolist() == [42, 41] and batch.used_len.tolist() == [0, 100]
    assert victim.num_free == Q and not victim.broken and not violation_records(log)


# ---- random rings ------------------------------------------------------------------------------

def test_random_rings(log):
    """Random bytes (raw, or shaped around the interesting values) over the descriptor
    table, an indirect area and the avail ring, then pop: it succeeds with every segment
    inside guest memory, or raises a RingViolation; never anything else. The popped
    segments are then read and written through their host pointers, and the guard bytes
    must never change."""
    env = Env(huge=False)
    rng = np.random.default_rng(20261127)
    regions = env.mem.regions
    starts = [r.gpa for r in regions]
    ends = [r.gpa + r.size for r in regions]
    addr_pool = np.array(
        [BUF, BUF + 0x800, IND, IND + 16, IND2, RING.desc, GAP, NOWHERE, 2**64 - 16, 2**64 - 1]
        + starts + [e - d for e in ends for d in (1, 8, 16, 64)], dtype=np.uint64)
    len_pool = np.array([0, 1, 8, 15, 16, 17, 32, 48, 64, 128, 256, 16 * Q, 16 * (Q + 1),
                         0x1000, 0x4000, 0x10000, 0xFFFFFFF0, 0xFFFFFFFF], dtype=np.uint32)
    dtype = np.dtype([("addr", "<u8"), ("len", "<u4"), ("flags", "<u2"), ("next", "<u2")])

    small = [r for r in regions if r.size <= 0x10000]

    def descriptors(n):
        """n descriptors: raw random bytes, mostly-valid ones, or edge values."""
        mode = rng.random()
        if mode < 0.1:
            return rng.integers(0, 256, 16 * n, dtype=np.uint8).tobytes()
        d = np.zeros(n, dtype)
        if mode < 0.6:
            # mostly valid: inside a region, small, NEXT links, writable after readable
            r = [small[k] for k in rng.integers(0, len(small), n)]
            d["len"] = rng.integers(0, 300, n)
            d["addr"] = [x.gpa + int(rng.integers(0, x.size)) for x in r]
            nxt = rng.random(n) < 0.7
            wr = np.sort(rng.random(n)) > rng.random()
            ind = rng.random(n) < 0.08
            d["addr"][ind] = np.where(rng.random(ind.sum()) < 0.5, IND, IND2) \
                + 16 * rng.integers(0, 4, ind.sum())
            d["len"][ind] = 16 * rng.integers(1, Q + 1, ind.sum())
            d["flags"] = nxt * NEXT + wr * WRITE + ind * INDIRECT
            d["flags"][ind] &= 0xFFFF ^ NEXT
            d["next"] = (np.arange(n) + rng.integers(1, 4, n)) % n if rng.random() < 0.7 \
                else rng.integers(0, n, n)
            return d.tobytes()
        d["addr"] = addr_pool[rng.integers(0, len(addr_pool), n)]
        d["addr"] += rng.integers(0, 4, n, dtype=np.uint64) * 16 * (rng.random(n) < 0.3)
        d["len"] = np.where(rng.random(n) < 0.8, len_pool[rng.integers(0, len(len_pool), n)],
                            rng.integers(0, 2**32, n, dtype=np.uint32))
        flags = rng.integers(0, 8, n)
        flags[rng.random(n) < 0.5] &= ~INDIRECT
        d["flags"] = np.where(rng.random(n) < 0.95, flags, rng.integers(0, 2**16, n))
        d["next"] = np.where(rng.random(n) < 0.9, rng.integers(0, Q, n),
                             rng.integers(0, 2**16, n))
        return d.tobytes()

    batch = ChainBatch(Q, max_segments=8 * Q * Q)
    outcomes: dict[str, int] = {}
    popped = 0
    for it in range(4000):
        env.dev.reset()
        env.mem.write(RING.used, bytes(6 + 8 * Q))
        env.mem.write(RING.desc, descriptors(Q))
        env.mem.write(IND, descriptors(Q + 4))
        env.mem.write(IND2, descriptors(Q + 4))
        if rng.random() < 0.1:
            avail = rng.integers(0, 256, 6 + 2 * Q, dtype=np.uint8)
        else:
            if rng.random() < 0.6:        # distinct heads, as a sane driver offers
                ring = rng.permutation(Q).astype("<u2")
            else:
                ring = np.where(rng.random(Q) < 0.9, rng.integers(0, Q, Q),
                                rng.integers(0, 2**16, Q)).astype("<u2")
            idx = rng.integers(0, Q + 1) if rng.random() < 0.9 else rng.integers(0, 2**16)
            avail = np.concatenate([np.array([0, idx], "<u2"), ring, np.zeros(1, "<u2")])
        env.mem.write(RING.avail, avail.tobytes())
        pending = env.dev.pending()
        try:
            n = env.dev.pop(batch)
            kind = "ok"
        except RingViolation as exc:
            kind = type(exc).__name__
            assert env.dev.broken and type(env.dev.error) is type(exc)
            n = batch.count
        outcomes[kind] = outcomes.get(kind, 0) + 1
        assert n == batch.count <= min(pending, Q)
        env.check_segments(batch)
        seg_len = batch.seg_len.astype(np.int64)
        for i in range(n):
            s0, s1 = int(batch.seg_start[i]), int(batch.seg_start[i + 1])
            nread = int(batch.readable_segments[i])
            assert 0 <= nread <= s1 - s0
            assert batch.readable_bytes[i] == seg_len[s0:s0 + nread].sum()
            assert batch.writable_bytes[i] == seg_len[s0 + nread:s1].sum()
            assert 1 <= batch.descriptors_used[i] <= Q
        assert len(set(batch.heads.tolist())) == n
        device_touch(batch)
        if n:
            popped += n
            batch.used_len[:] = 0
            env.dev.push_used(batch)
        if it % 50 == 0:
            env.check_guards()
    env.check_guards()
    # the generator reached both sides: real chains and many kinds of violation
    print("random rings:", popped, "chains popped;", outcomes)
    assert outcomes.get("ok", 0) >= 200 and popped >= 1000, outcomes
    assert len(outcomes) >= 10, outcomes
    env.close()
