"""Differential tests: the Cython engine against the pure-Python model (vqcore.model).

Each operation is applied to four *worlds*, each with its own guest memory built the
same way:

* engine driver + engine device,   * model driver + model device,
* model driver + engine device,    * engine driver + model device (interop on one memory).

After every step the worlds must agree on the return value or exception (class, code,
index, address, length), on the batch a pop or reclaim filled, on the queues' state and on
every byte of guest memory (descriptor table, rings, indirect tables). On top of that the
harness keeps its own account of what must happen (a FIFO of chains offered, the heads
the device holds, a FIFO of chains used) and checks the reference world against it, so a
bug shared by both implementations still shows.

Then hostile rings: bad descriptor tables (loops, next >= size, nested indirect, ...)
written into two identical memories must make engine and model raise the same exception
and leave both queues broken; and random descriptor tables and used rings must get the
same answer from both.
"""

from __future__ import annotations

import struct
from collections import deque

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from conftest import IMPLEMENTATIONS, build_guest, implementations
from vqcore.errors import (AddressOutOfBounds, AddressOverflow, BatchTooSmall, ChainTooLong,
                           ChainLengthOverflow, HeadInUse, IndirectLengthError,
                           IndirectTableNotContiguous, IndirectTableTooLong, IndirectWithNext,
                           InvalidAvailRingIndex, InvalidChain, InvalidDescriptorIndex,
                           InvalidHeadIndex, InvalidUsedId, InvalidUsedLength,
                           InvalidUsedRingIndex, NestedIndirectDescriptor, NotInFlight,
                           QueueBroken, QueueError, RingViolation, WritableBeforeReadable)

NEXT, WRITE, INDIRECT = 1, 2, 4
DATA_SIZE = 1 << 14
WORLDS = [("engine", "engine"), ("model", "model"), ("model", "engine"), ("engine", "model")]


def outcome(fn):
    """What a call did: ("ok", value) or ("raise", class, code, index, addr, length)."""
    try:
        return ("ok", fn())
    except QueueError as exc:
        return ("raise", type(exc), exc.code, exc.index, exc.addr, exc.length)
    except (ValueError, OverflowError, TypeError, IndexError) as exc:
        return ("raise", type(exc))


def popped_snapshot(guest, batch):
    """Everything a pop put in ``batch``; host addresses are checked against the world's
    own memory (they differ between worlds) and replaced by the bytes they point at."""
    n = batch.count
    seg_addr, seg_host = batch.seg_addr.tolist(), batch.seg_host.tolist()
    for gpa, host in zip(seg_addr, seg_host):
        r = next(r for r in guest.memory.regions if r.gpa <= gpa < r.gpa + r.size)
        assert host == r.host_addr + (gpa - r.gpa)
    return dict(
        count=n, nseg=batch.num_segments, heads=batch.heads.tolist(),
        seg_start=batch.seg_start.tolist(), nread=batch.readable_segments.tolist(),
        rbytes=batch.readable_bytes.tolist(), wbytes=batch.writable_bytes.tolist(),
        ndesc=batch.descriptors_used.tolist(), seg_addr=seg_addr,
        seg_len=batch.seg_len.tolist(), chains=[tuple(batch.chain(i)[:4]) for i in range(n)],
        data=[(batch.chain_bytes(i), batch.chain_bytes(i, True)) for i in range(n)])


def reclaimed_snapshot(batch):
    return dict(count=batch.count, heads=batch.heads.tolist(), tokens=batch.tokens.tolist(),
                used_len=batch.used_len.tolist())


class World:
    """One guest memory with a driver queue and a device queue on it (a split ring, or a
    packed one with ``layout="packed"``)."""

    def __init__(self, drv, dev, size, event_idx, indirect_max, layout="split"):
        self.name = f"{drv}-driver/{dev}-device"
        impls = implementations(layout)
        self.drv_impl, self.dev_impl = impls[drv], impls[dev]
        self.guest = build_guest(size, data_size=DATA_SIZE, indirect_max=indirect_max,
                                 layout=layout)
        self.drv = self.guest.driver(self.drv_impl, event_idx=event_idx)
        self.dev = self.guest.device(self.dev_impl, event_idx=event_idx)
        self.pop_batches = {}
        self.reclaim_batches = {}
        self.last_pop = None

    def pop_batch(self, key):
        if key not in self.pop_batches:
            self.pop_batches[key] = self.dev_impl.ChainBatch(*key)
        return self.pop_batches[key]

    def reclaim_batch(self, n):
        if n not in self.reclaim_batches:
            self.reclaim_batches[n] = self.drv_impl.ChainBatch(n)
        return self.reclaim_batches[n]

    def state(self):
        d, v = self.drv, self.dev
        return (d.num_free, d.in_flight, d.next_avail, d.last_used, d.broken, d.violations,
                v.next_avail, v.next_used, v.in_flight, v.broken, v.violations, v.pending())


class Harness:
    """Runs each operation in every world, compares, and keeps its own account."""

    def __init__(self, size, event_idx, indirect_max, worlds=WORLDS, layout="split"):
        self.size, self.indirect_max = size, indirect_max
        self.worlds = [World(a, b, size, event_idx, indirect_max, layout) for a, b in worlds]
        self.ref = self.worlds[0]
        self.next_token = 1
        self.offered = deque()      # (token, [(gpa, len, writable)], indirect), in add order
        self.held = {}              # head -> (token, writable bytes): popped, not pushed
        self.used = deque()         # (head, token, used_len): pushed, not reclaimed
        self.last_pop_heads = None  # heads in the last pop's batch

    # ---- comparing ----------------------------------------------------------------------

    def run(self, what, call):
        """``call(world)`` in every world; all must return the same; returns it."""
        results = [call(w) for w in self.worlds]
        for w, r in zip(self.worlds[1:], results[1:]):
            assert r == results[0], f"{what}: {w.name} differs from {self.ref.name}"
        self.compare_state(what)
        return results[0]

    def compare_state(self, what):
        ref_state, ref_mem = self.ref.state(), self.ref.guest.buffer
        for w in self.worlds[1:]:
            assert w.state() == ref_state, f"after {what}: {w.name} state differs"
            if not np.array_equal(w.guest.buffer, ref_mem):
                diff = np.flatnonzero(w.guest.buffer != ref_mem)
                raise AssertionError(f"after {what}: {w.name} memory differs at guest "
                                     f"{[hex(self.ref.guest.base + int(o)) for o in diff[:8]]}")

    # ---- operations ------------------------------------------------------------------------

    def add(self, chains, *, indirect=False, publish=True, start=0, use_load=False):
        """``chains``: list of (readable [(gpa, len)], writable [(gpa, len)])."""
        tokens = list(range(self.next_token, self.next_token + len(chains)))
        self.next_token += len(chains)

        def call(w):
            batch = w.drv_impl.ChainBatch(len(chains))
            if use_load:
                segs = [s for r, wr in chains for s in r + wr]
                batch.load([a for a, _ in segs], [n for _, n in segs],
                           [len(r) + len(wr) for r, wr in chains], [len(r) for r, _ in chains],
                           tokens)
            else:
                for (r, wr), t in zip(chains, tokens):
                    batch.append(readable=r, writable=wr, token=t)
            return outcome(lambda: w.drv.add(batch, indirect=indirect, publish=publish,
                                             start=start))

        res = self.run("add", call)
        limit = self.indirect_max if indirect else self.size
        first = chains[start] if start < len(chains) else None
        if indirect and self.indirect_max == 0:
            assert res[:3] == ("raise", InvalidChain, -24)
        elif first is not None and len(first[0]) + len(first[1]) > limit:
            assert res[:3] == ("raise", InvalidChain, -23)
        else:
            assert res[0] == "ok"
            for k in range(start, start + res[1]):
                r, wr = chains[k]
                self.offered.append((tokens[k], [(a, n, False) for a, n in r]
                                     + [(a, n, True) for a, n in wr], indirect))
        return res

    def pop(self, max_chains, max_segments=None):
        key = (max_chains, max_segments)

        def call(w):
            batch = w.pop_batch(key)
            w.last_pop = batch
            return outcome(lambda: w.dev.pop(batch)), popped_snapshot(w.guest, batch)

        res, snap = self.run("pop", call)
        if res[0] == "raise":
            assert res[1] is BatchTooSmall and snap["count"] == 0
        for i in range(snap["count"]):
            token, segs, indirect = self.offered.popleft()
            head, segments, readable, writable = snap["chains"][i]
            assert segments == [s for s in segs if s[1]]            # zero lengths dropped
            assert readable == sum(n for _, n, wr in segs if not wr)
            assert writable == sum(n for _, n, wr in segs if wr)
            assert snap["ndesc"][i] == (1 if indirect else len(segs))
            guest = self.ref.guest
            assert snap["data"][i] == tuple(
                b"".join(guest.at(a, n).tobytes() for a, n, wr in segments if wr == side)
                for side in (False, True))
            assert head not in self.held
            self.held[head] = (token, writable)
        self.last_pop_heads = snap["heads"]
        return res, snap

    def push(self, heads, lens):
        res = self.run("push", lambda w: outcome(lambda: w.dev.push(heads, lens)))
        self._account_push(res, heads, lens)
        return res

    def push_used(self, lens, count):
        def call(w):
            w.last_pop.used_len[:] = lens
            return outcome(lambda: w.dev.push_used(w.last_pop, count))

        res = self.run("push_used", call)
        n = len(lens) if count is None else count
        self._account_push(res, self.last_pop_heads[:n], lens[:n])
        return res

    def _account_push(self, res, heads, lens):
        valid = len(set(heads)) == len(heads) and all(h in self.held for h in heads)
        if not valid:
            assert res[:3] == ("raise", NotInFlight, -20)
            return
        assert res == ("ok", None)
        for h, n in zip(heads, lens):
            token, _ = self.held.pop(h)
            self.used.append((h, token, n))

    def reclaim(self, max_chains):
        def call(w):
            batch = w.reclaim_batch(max_chains)
            return outcome(lambda: w.drv.reclaim(batch)), reclaimed_snapshot(batch)

        res, snap = self.run("reclaim", call)
        k = min(len(self.used), max_chains)
        assert res == ("ok", k)
        want = [self.used.popleft() for _ in range(k)]
        assert list(zip(snap["heads"], snap["tokens"], snap["used_len"])) == want
        return res

    def simple(self, name, *args):
        """A call without a batch: on the driver or the device by name."""
        side, method = name.split(".")
        return self.run(name, lambda w: outcome(lambda: getattr(getattr(w, side), method)(*args)))


# ---- random operation sequences ------------------------------------------------------------

OPS = (["add"] * 5 + ["pop"] * 4 + ["push"] * 3 + ["push_used"] + ["reclaim"] * 3
       + ["dev.needs_notification", "dev.enable_notification", "dev.disable_notification",
          "drv.kick_needed", "drv.enable_interrupts", "drv.disable_interrupts",
          "drv.publish", "dev.pending"])


def draw_chain(data, limit, data_addr):
    big = data.draw(st.integers(0, 19)) == 19            # rarely: a chain at the limit
    nseg = data.draw(st.sampled_from([limit, limit + 1])) if big else \
        data.draw(st.integers(1, min(limit, 4)))
    nread = data.draw(st.integers(0, nseg))
    segs = []
    for _ in range(nseg):
        off = data.draw(st.integers(0, DATA_SIZE - 64))
        length = data.draw(st.sampled_from([0, 1, 7, 16, 33, 64]))
        segs.append((data_addr + off, length))
    return segs[:nread], segs[nread:]


def run_random_ops(h: Harness, data, steps):
    data_addr = h.ref.guest.data_addr
    for _ in range(steps):
        op = data.draw(st.sampled_from(OPS))
        if op == "add":
            indirect = data.draw(st.sampled_from([False, False, True]))
            limit = max(h.indirect_max, 1) if indirect else h.size
            nchains = data.draw(st.integers(1, 4))
            chains = [draw_chain(data, limit, data_addr) for _ in range(nchains)]
            h.add(chains, indirect=indirect,
                  publish=data.draw(st.sampled_from([True, True, True, False])),
                  start=data.draw(st.sampled_from([0, 0, 0, 1])) if nchains > 1 else 0,
                  use_load=data.draw(st.booleans()))
        elif op == "pop":
            h.pop(data.draw(st.sampled_from([1, 2, 3, h.size, h.size + 5])),
                  data.draw(st.sampled_from([None, None, 1, 2, 5])))
        elif op == "push":
            held = sorted(h.held)
            heads = data.draw(st.lists(st.sampled_from(held), unique=True)) if held else []
            heads = data.draw(st.permutations(heads))
            if data.draw(st.integers(0, 9)) == 9:                 # a head not in flight
                heads.insert(data.draw(st.integers(0, len(heads))),
                             data.draw(st.integers(0, h.size + 2)))
            lens = [data.draw(st.integers(0, h.held[x][1])) if x in h.held else 0
                    for x in heads]
            h.push(heads, lens)
        elif op == "push_used":
            if h.last_pop_heads is None:
                continue
            n = len(h.last_pop_heads)
            lens = [data.draw(st.integers(0, h.held[x][1])) if x in h.held else 0
                    for x in h.last_pop_heads]
            h.push_used(lens, data.draw(st.one_of(st.none(), st.integers(0, n))))
        elif op == "reclaim":
            h.reclaim(data.draw(st.sampled_from([1, 2, h.size, h.size + 3])))
        else:
            h.simple(op)


@pytest.mark.parametrize("event_idx", [False, True], ids=["flags", "event_idx"])
@pytest.mark.parametrize("size", [1, 2, 8, 256])
@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_random_operation_sequences(size, event_idx, data):
    indirect_max = data.draw(st.sampled_from(sorted({0, 1, min(4, size), min(size, 8)})),
                             label="indirect_max")
    h = Harness(size, event_idx, indirect_max)
    run_random_ops(h, data, data.draw(st.integers(10, 60), label="steps"))
    # drain: everything offered comes back, in every world alike
    h.simple("drv.publish")
    while h.offered or h.held or h.used:
        h.pop(h.size)
        heads = sorted(h.held)
        h.push(heads, [h.held[x][1] for x in heads])
        h.reclaim(h.size)
    assert h.ref.drv.num_free == size and h.ref.dev.in_flight == 0


# ---- a long sequence across the 16-bit index wrap ------------------------------------------

def test_long_sequence_wraps_indices():
    """More than 65536 chains through a 256-entry ring (avail, used and descriptor
    indices all wrap), batches of random sizes, chains of 1..4 segments, direct and
    indirect, pushed back in random order, notifications toggled on the way."""
    size, indirect_max = 256, 4
    h = Harness(size, True, indirect_max)
    rng = np.random.default_rng(2024)
    data_addr = h.ref.guest.data_addr
    total = 0
    while total < 66_000:
        m = int(rng.integers(1, size + 1))
        indirect = bool(rng.random() < 0.3)
        nseg = rng.integers(1, 5, m)
        offs = rng.integers(0, DATA_SIZE - 64, int(nseg.sum()))
        lens = rng.integers(1, 65, int(nseg.sum()))
        nread = rng.integers(0, nseg + 1)
        chains, s = [], 0
        for c in range(m):
            segs = [(data_addr + int(o), int(n)) for o, n in zip(offs[s:s + nseg[c]],
                                                                 lens[s:s + nseg[c]])]
            chains.append((segs[:nread[c]], segs[nread[c]:]))
            s += nseg[c]
        added = h.add(chains, indirect=indirect, use_load=True)[1]
        total += added
        h.simple("drv.kick_needed")
        while h.offered:
            h.pop(int(rng.choice([1, 7, 64, size])))
        heads = list(h.held)
        rng.shuffle(heads)
        for part in np.array_split(np.array(heads, dtype=int), int(rng.integers(1, 4))):
            part = part.tolist()
            h.push(part, [int(rng.integers(0, h.held[x][1] + 1)) for x in part])
            h.simple("dev.needs_notification")
        if rng.random() < 0.2:
            h.simple("drv.disable_interrupts")
            h.simple("dev.disable_notification")
        else:
            h.simple("drv.enable_interrupts")
            h.simple("dev.enable_notification")
        while h.used:
            h.reclaim(int(rng.choice([3, size])))
    assert total > 65536 and h.ref.drv.next_avail == total % 65536
    assert h.ref.dev.next_used == total % 65536 and h.ref.drv.num_free == size


# ---- hostile rings -------------------------------------------------------------------------

def put_desc(guest, gpa, addr, length, flags=0, nxt=0):
    guest.at(gpa, 16)[:] = np.frombuffer(struct.pack("<QIHH", addr % 2**64, length, flags,
                                                     nxt), np.uint8)


def put16(guest, gpa, value):
    guest.at(gpa, 2)[:] = np.frombuffer(struct.pack("<H", value % 65536), np.uint8)


def hostile_guest(seed=0):
    """Size-8 ring with an 8x8 indirect area and a data area, plus a region adjacent to
    it (buffers and tables may straddle the boundary) and one after a gap."""
    g = build_guest(8, data_size=8192, indirect_max=8, seed=seed)
    top = g.base + g.buffer.size
    g.extra = [np.full(4096, 0x5A, np.uint8), np.full(4096, 0xA5, np.uint8)]
    g.memory.add_region(top, g.extra[0])                  # adjacent
    g.memory.add_region(top + 8192, g.extra[1])           # after a 4 KiB gap
    g.top = top
    return g


class Ring:
    """Writes a driver's side of the ring by hand (hostile or not)."""

    def __init__(self, g):
        self.g = g
        self.table = [g.indirect_addr + 128 * t for t in range(8)]

    def desc(self, i, addr, length, flags=0, nxt=0):
        put_desc(self.g, self.g.ring.desc + 16 * i, addr, length, flags, nxt)

    def ind(self, t, i, addr, length, flags=0, nxt=0):
        put_desc(self.g, self.table[t] + 16 * i, addr, length, flags, nxt)

    def offer(self, heads, idx=None):
        for k, h in enumerate(heads):
            put16(self.g, self.g.ring.avail + 4 + 2 * (k % 8), h)
        put16(self.g, self.g.ring.avail + 2, len(heads) if idx is None else idx)

    def buf(self, k=0):
        return self.g.data_addr + 64 * k


def sc_good_then_self_loop(r):
    r.desc(0, r.buf(0), 16)
    r.desc(1, r.buf(1), 16, NEXT, 1)
    r.offer([0, 1])


def sc_two_cycle(r):
    r.desc(0, r.buf(0), 16, NEXT, 1)
    r.desc(1, r.buf(1), 16, NEXT, 0)
    r.offer([0])


def sc_full_table_cycle(r):
    for i in range(8):
        r.desc(i, r.buf(i), 8, NEXT, (i + 1) % 8)
    r.offer([3])


def sc_exactly_size_is_valid(r):
    for i in range(8):
        r.desc(i, r.buf(i), 8, (NEXT if i < 7 else 0) | (WRITE if i >= 5 else 0), i + 1)
    r.offer([0])


def sc_next_out_of_range(r):
    r.desc(0, r.buf(0), 16, NEXT, 8)
    r.offer([0])


def sc_head_out_of_range(r):
    r.desc(0, r.buf(0), 16)
    r.offer([0, 8])


def sc_avail_idx_jump(r):
    r.desc(0, r.buf(0), 16)
    r.offer([0], idx=9)


def sc_head_in_use(r):
    r.desc(0, r.buf(0), 16)
    r.offer([0, 0])


def sc_nested_indirect(r):
    r.desc(0, r.table[0], 32, INDIRECT)
    r.ind(0, 0, r.buf(0), 16, NEXT, 1)
    r.ind(0, 1, r.table[1], 16, INDIRECT)
    r.offer([0])


def sc_indirect_len_zero(r):
    r.desc(0, r.table[0], 0, INDIRECT)
    r.offer([0])


def sc_indirect_len_not_multiple(r):
    r.desc(0, r.table[0], 24, INDIRECT)
    r.offer([0])


def sc_indirect_too_long(r):
    r.desc(0, r.table[0], 16 * 9, INDIRECT)
    r.offer([0])


def sc_indirect_with_next(r):
    r.desc(0, r.table[0], 16, INDIRECT | NEXT, 1)
    r.desc(1, r.buf(1), 16)
    r.offer([0])


def sc_indirect_next_out_of_range(r):
    r.desc(0, r.table[0], 32, INDIRECT)
    r.ind(0, 0, r.buf(0), 16, NEXT, 2)
    r.offer([0])


def sc_indirect_loop(r):
    r.desc(0, r.table[0], 48, INDIRECT)
    r.ind(0, 0, r.buf(0), 16, NEXT, 1)
    r.ind(0, 1, r.buf(1), 16, NEXT, 0)
    r.offer([0])


def sc_indirect_outside_memory(r):
    r.desc(0, r.g.top + 4096, 32, INDIRECT)               # in the gap
    r.offer([0])


def sc_indirect_across_regions(r):
    r.desc(0, r.g.top - 16, 32, INDIRECT)                 # half in each adjacent region
    r.offer([0])


def sc_indirect_overflow(r):
    r.desc(0, 2**64 - 16, 32, INDIRECT)
    r.offer([0])


def sc_buffer_outside_memory(r):
    r.desc(0, r.buf(0), 16, NEXT, 1)
    r.desc(1, 0x10, 16)
    r.offer([0])


def sc_buffer_into_gap(r):
    r.desc(0, r.g.top + 4096 - 8, 16)                     # end of region 2 into the gap
    r.offer([0])


def sc_buffer_across_regions_is_valid(r):
    r.desc(0, r.g.top - 8, 16, NEXT, 1)                   # two segments
    r.desc(1, r.g.top + 8192, 4096, WRITE)                # the whole third region
    r.offer([0])


def sc_addr_overflow(r):
    r.desc(0, 2**64 - 8, 16)
    r.offer([0])


def sc_buffer_ending_at_2_64(r):
    r.desc(0, 2**64 - 16, 16)                             # no overflow, but not memory
    r.offer([0])


def sc_writable_before_readable(r):
    r.desc(0, r.buf(0), 16, WRITE | NEXT, 1)
    r.desc(1, r.buf(1), 16, 0)
    r.offer([0])


def sc_zero_length_readable_after_writable(r):
    r.desc(0, r.buf(0), 16, WRITE | NEXT, 1)
    r.desc(1, 0xDEAD0000, 0, 0)                           # no buffer, but still in order
    r.offer([0])


def sc_writable_before_readable_indirect(r):
    r.desc(0, r.table[0], 32, INDIRECT | WRITE)           # WRITE on INDIRECT is ignored
    r.ind(0, 0, r.buf(0), 16, WRITE | NEXT, 1)
    r.ind(0, 1, r.buf(1), 16)
    r.offer([0])


def sc_direct_then_indirect_is_valid(r):
    r.desc(0, r.buf(0), 16, NEXT, 1)
    r.desc(1, r.table[1], 48, INDIRECT)
    r.ind(1, 0, r.buf(1), 16, NEXT, 2)
    r.ind(1, 2, r.buf(2), 0, WRITE | NEXT, 1)
    r.ind(1, 1, r.buf(3), 16, WRITE)
    r.offer([0])


HOSTILE = [
    (sc_good_then_self_loop, ChainTooLong),
    (sc_two_cycle, ChainTooLong),
    (sc_full_table_cycle, ChainTooLong),
    (sc_exactly_size_is_valid, None),
    (sc_next_out_of_range, InvalidDescriptorIndex),
    (sc_head_out_of_range, InvalidHeadIndex),
    (sc_avail_idx_jump, InvalidAvailRingIndex),
    (sc_head_in_use, HeadInUse),
    (sc_nested_indirect, NestedIndirectDescriptor),
    (sc_indirect_len_zero, IndirectLengthError),
    (sc_indirect_len_not_multiple, IndirectLengthError),
    (sc_indirect_too_long, IndirectTableTooLong),
    (sc_indirect_with_next, IndirectWithNext),
    (sc_indirect_next_out_of_range, InvalidDescriptorIndex),
    (sc_indirect_loop, ChainTooLong),
    (sc_indirect_outside_memory, AddressOutOfBounds),
    (sc_indirect_across_regions, IndirectTableNotContiguous),
    (sc_indirect_overflow, AddressOverflow),
    (sc_buffer_outside_memory, AddressOutOfBounds),
    (sc_buffer_into_gap, AddressOutOfBounds),
    (sc_buffer_across_regions_is_valid, None),
    (sc_addr_overflow, AddressOverflow),
    (sc_buffer_ending_at_2_64, AddressOutOfBounds),
    (sc_writable_before_readable, WritableBeforeReadable),
    (sc_zero_length_readable_after_writable, WritableBeforeReadable),
    (sc_writable_before_readable_indirect, WritableBeforeReadable),
    (sc_direct_then_indirect_is_valid, None),
]


def device_run(impl, g, max_chains=8, max_segments=None):
    """Pop, pop again, push what was popped: everything observable, per step."""
    dev = g.device(impl)
    batch = impl.ChainBatch(max_chains, max_segments)
    steps = [(outcome(lambda: dev.pop(batch)), popped_snapshot(g, batch), dev.broken,
              dev.in_flight, dev.violations, dev.next_avail)]
    heads = batch.heads.tolist()
    steps.append((outcome(lambda: dev.pop(batch)), popped_snapshot(g, batch), dev.broken,
                  dev.in_flight, dev.violations, dev.next_avail))
    steps.append((outcome(lambda: dev.push(heads, [0] * len(heads))), dev.in_flight,
                  dev.next_used))
    return steps, g.buffer.tobytes() + g.extra[0].tobytes() + g.extra[1].tobytes()


@pytest.mark.parametrize("scenario,expected", HOSTILE, ids=[s.__name__[3:] for s, _ in HOSTILE])
def test_hostile_ring_same_verdict(scenario, expected):
    runs = {}
    for name, impl in IMPLEMENTATIONS.items():
        g = hostile_guest()
        scenario(Ring(g))
        runs[name] = device_run(impl, g)
    assert runs["engine"] == runs["model"]
    steps, _ = runs["engine"]
    (first, snap, broken, in_flight, violations, _), (second, *_), _ = steps
    if expected is None:
        assert first[0] == "ok" and not broken and violations == 0
        assert first[1] == snap["count"] > 0 and in_flight == snap["count"]
    else:
        assert first[1] is expected
        assert broken and violations == 1 and in_flight == snap["count"]
        assert second[:3] == ("raise", QueueBroken, -22)


def test_chain_length_overflow_same_verdict():
    """Three 2 GiB readable buffers: 6 GiB is more than a chain may carry (2**32 - 1)."""
    big = 1 << 31
    runs = {}
    for name, impl in IMPLEMENTATIONS.items():
        g = hostile_guest()
        g.huge = np.zeros(big, np.uint8)                  # never touched: no real memory
        g.memory.add_region(1 << 40, g.huge)
        r = Ring(g)
        r.desc(0, r.buf(0), 16)
        for i in (1, 2, 3):
            r.desc(i, 1 << 40, big, NEXT if i < 3 else 0, i + 1)
        r.offer([0, 1])
        dev = g.device(impl)
        batch = impl.ChainBatch(8)
        runs[name] = (outcome(lambda: dev.pop(batch)), batch.count, dev.broken)
    assert runs["engine"] == runs["model"]
    assert runs["engine"] == (("raise", ChainLengthOverflow, -12, 1, 0, 3 * big), 1, True)


def test_batch_too_small_same_verdict():
    """A chain that cannot fit an empty batch is the caller's problem, not a violation;
    one that does not fit a partly filled batch waits for the next pop."""
    runs = {}
    for name, impl in IMPLEMENTATIONS.items():
        g = hostile_guest()
        r = Ring(g)
        r.desc(0, r.buf(0), 16)
        r.desc(1, r.g.top - 8, 16, NEXT, 2)               # 2 segments (region boundary)
        r.desc(2, r.buf(2), 16, WRITE)                    # 3rd segment
        r.offer([0, 1])
        runs[name] = device_run(impl, g, max_segments=2)
    assert runs["engine"] == runs["model"]
    (first, snap, broken, *_), (second, snap2, broken2, *_), _ = runs["engine"][0]
    assert first == ("ok", 1) and snap["heads"] == [0] and not broken
    assert second[:3] == ("raise", BatchTooSmall, -21) and snap2["count"] == 0 and not broken2


# random descriptor tables: whatever a guest writes, both implementations agree

def desc_strategy(g):
    addrs = st.sampled_from([g.data_addr, g.data_addr + 100, g.indirect_addr,
                             g.indirect_addr + 128, g.indirect_addr + 1000, g.top - 8,
                             g.top - 16, g.top + 4096 - 8, g.top + 8192, g.top + 4096, 0,
                             2**64 - 16, 2**64 - 1])
    lens = st.sampled_from([0, 1, 8, 16, 32, 48, 128, 144, 4096, 0xFFFFFFFF])
    return st.tuples(addrs, lens, st.integers(0, 7), st.integers(0, 9))


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_random_descriptor_tables_agree(data):
    proto = hostile_guest()
    table = data.draw(st.lists(desc_strategy(proto), min_size=8, max_size=8))
    indirect = data.draw(st.lists(desc_strategy(proto), min_size=16, max_size=16))
    heads = data.draw(st.lists(st.integers(0, 9), min_size=8, max_size=8))
    start = data.draw(st.sampled_from([0, 3, 0xFFFC, 0xFFFF]))
    pending = data.draw(st.integers(0, 9))
    max_chains = data.draw(st.integers(1, 9))
    max_segments = data.draw(st.sampled_from([None, 1, 3, 8]))
    runs = {}
    for name, impl in IMPLEMENTATIONS.items():
        g = hostile_guest()
        r = Ring(g)
        for i, d in enumerate(table):
            r.desc(i, *d)
        for i, d in enumerate(indirect):
            r.ind(i // 8, i % 8, *d)
        for k, h in enumerate(heads):
            put16(g, g.ring.avail + 4 + 2 * ((start + k) % 8), h)
        put16(g, g.ring.avail + 2, start + pending)
        dev = g.device(impl)
        dev.next_avail = start
        batch = impl.ChainBatch(max_chains, max_segments)
        steps = []
        for _ in range(2):
            steps.append((outcome(lambda: dev.pop(batch)), popped_snapshot(g, batch),
                          dev.broken, dev.in_flight, dev.next_avail, dev.violations))
            got = batch.heads.tolist()
            steps.append(outcome(lambda: dev.push(got, [1] * len(got))))
        runs[name] = steps, g.buffer.tobytes()
    assert runs["engine"] == runs["model"]
    for res, snap, broken, *_ in runs["engine"][0][::2]:         # the two pops
        violation = res[0] == "raise" and issubclass(res[1], RingViolation)
        assert broken == (violation or res[1] is QueueBroken)


# the driver facing a hostile device

@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_random_used_rings_agree(data):
    size = 8
    nchains = data.draw(st.integers(1, size // 2))          # two descriptors each
    wlens = data.draw(st.lists(st.sampled_from([0, 1, 16, 100]), min_size=nchains,
                               max_size=nchains))
    elems = data.draw(st.lists(st.tuples(st.integers(0, size + 1),
                                         st.sampled_from([0, 1, 16, 17, 100, 101, 2**32 - 1])),
                               min_size=size, max_size=size))
    used_idx = data.draw(st.integers(0, size + 2) | st.just(0xFFFF))
    max_chains = data.draw(st.integers(1, size + 1))
    runs = {}
    for name, impl in IMPLEMENTATIONS.items():
        g = build_guest(size, data_size=4096)
        drv = g.driver(impl)
        batch = impl.ChainBatch(nchains)
        for i, n in enumerate(wlens):
            batch.append(readable=[(g.data_addr, 8)], writable=[(g.data_addr + 64, n)],
                         token=1000 + i)
        assert drv.add(batch) == nchains
        for k, (i, n) in enumerate(elems):
            g.at(g.ring.used + 4 + 8 * k, 8)[:] = np.frombuffer(struct.pack("<II", i, n),
                                                                np.uint8)
        put16(g, g.ring.used + 2, used_idx)
        back = impl.ChainBatch(max_chains)
        steps = []
        for _ in range(2):
            steps.append((outcome(lambda: drv.reclaim(back)), reclaimed_snapshot(back),
                          drv.broken, drv.num_free, drv.in_flight, drv.last_used,
                          drv.violations))
        steps.append(outcome(lambda: drv.add(batch)))
        runs[name] = steps, g.buffer.tobytes()
    assert runs["engine"] == runs["model"]
    (first, snap, broken, *_), *_ = runs["engine"][0]
    if first[0] == "raise":
        assert first[1] in (InvalidUsedRingIndex, InvalidUsedId, InvalidUsedLength) and broken
        assert runs["engine"][0][1][0][:3] == ("raise", QueueBroken, -22)
        assert runs["engine"][0][2][:3] == ("raise", QueueBroken, -22)
