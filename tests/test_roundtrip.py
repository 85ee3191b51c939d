"""Driver <-> device round trips of the split ring engine.

Both sides of one ring run in this process over one numpy-backed :class:`GuestMemory`:
a :class:`SplitDriverQueue` plays the guest, a :class:`SplitDeviceQueue` the device
(``run_roundtrip(..., layout="packed")`` runs the same on a packed ring, see
test_packed_roundtrip.py). The
driver writes a unique byte pattern into every readable segment; the device checks the
popped segments (guest address, host address, length, readable/writable split) and the
bytes, writes a response into the first ``used_len`` bytes of the writable segments and
pushes; the driver checks tokens, heads, used lengths and the response bytes (and that the
rest of the writable area was left alone). Every check is vectorised per batch with numpy.

The notification protocol runs along: each side sleeps only after the race-free
enable/re-check, and a side that sleeps must be woken (kick / interrupt), otherwise the
loop stalls and the test fails.
"""

from dataclasses import dataclass
from itertools import cycle

import numpy as np
import pytest

from conftest import ring_features, ring_index, used_waiting
from vqcore import (ChainBatch, GuestMemory, SplitDeviceQueue, device_queue, driver_queue,
                    ring_addresses)
from vqcore.errors import NotInFlight

GPA_BASE = 0x4000_0000            # guest memory starts at 1 GiB (gpa != buffer offset)
PAGE = 4096
POISON = 0xEE                     # what the driver leaves in device-writable bytes
TOKEN_BASE = 0xA5C3_0000_0000_0000
TOKEN_STEP = 7919                 # tokens are sparse 64-bit values, not indices
SALT_REQUEST = 0x1234_5678
SALT_RESPONSE = 0x0BAD_CAFE


def _align(n, a=PAGE):
    return (n + a - 1) // a * a


def spans(starts, lens):
    """Concatenation of ``arange(starts[i], starts[i] + lens[i])`` as one int64 array."""
    lens = np.asarray(lens, np.int64)
    total = int(lens.sum())
    if total == 0:
        return np.zeros(0, np.int64)
    first = np.cumsum(lens) - lens
    return np.repeat(np.asarray(starts, np.int64) - first, lens) + np.arange(total, dtype=np.int64)


def stream_pos(lens):
    """For bytes grouped per chain (``lens`` bytes each): position inside the chain."""
    lens = np.asarray(lens, np.int64)
    total = int(lens.sum())
    first = np.cumsum(lens) - lens
    return np.arange(total, dtype=np.int64) - np.repeat(first, lens)


def pattern(tokens, pos, salt):
    """One byte per (token, position): what a chain's byte at ``pos`` must hold."""
    x = (tokens.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
         + pos.astype(np.uint64) * np.uint64(0xC2B2AE3D27D4EB4F) + np.uint64(salt))
    x ^= x >> np.uint64(29)
    x *= np.uint64(0xBF58476D1CE4E5B9)
    return (x >> np.uint64(56)).astype(np.uint8)


def eq(a, b):
    """Arrays equal in shape and values (a cheaper np.array_equal for the hot loop)."""
    return a.shape == b.shape and bool((a == b).all())


def excl_cumsum(a):
    a = np.asarray(a, np.int64)
    return np.cumsum(a) - a


class Rig:
    """One ring, both sides, on one numpy buffer: ring, indirect tables, data arena."""

    def __init__(self, size, *, event_idx, indirect_max=0, arena=1 << 20, layout="split"):
        self.size = size
        self.layout = layout
        features = ring_features(layout, event_idx)
        self.addrs = ring_addresses(GPA_BASE, size, features)
        self.ind_gpa = _align(self.addrs.end)
        self.arena_gpa = _align(self.ind_gpa + size * indirect_max * 16)
        self.arena_off = self.arena_gpa - GPA_BASE
        self.arena_size = arena
        self.buf = np.zeros(self.arena_off + arena, np.uint8)
        self.base = self.buf.ctypes.data
        self.mem = GuestMemory([(GPA_BASE, self.buf)])
        self.drv = driver_queue(self.mem, size, *self.addrs[:3], features=features,
                                indirect_addr=self.ind_gpa if indirect_max else None,
                                indirect_max=indirect_max)
        self.dev = device_queue(self.mem, size, *self.addrs[:3], features=features)

    def used_idx(self):
        """used->idx as it is in memory (split rings)."""
        return int(self.mem.array(self.addrs.used + 2, 1, "<u2")[0])

    def index(self, chains, slots):
        """next_avail / next_used after ``chains`` chains of ``slots`` descriptors."""
        return ring_index(self.layout, self.size, chains, slots)

    def pending(self, chains):
        """What dev.pending() says with ``chains`` chains available (packed: 0 or 1)."""
        return min(chains, 1) if self.layout == "packed" else chains


@dataclass
class Workload:
    """Everything about the chains of one run, generated up front (per chain / segment)."""
    size: int
    total: int
    add_batches: tuple          # driver batch sizes, cycled
    indirect: str = "off"       # "off" | "on" | "mixed" (alternating driver batches)
    indirect_max: int = 0
    short_max: int = 4          # most chains have 1..short_max descriptors ...
    long_every: int = 0         # ... every long_every-th one 1..cap (0: all 1..short_max)
    full_every: int = 0         # every full_every-th direct batch starts with a size chain
    seg_bytes: int = 64         # segment lengths 1..seg_bytes
    zero_frac: float = 0.0      # fraction of zero-length descriptors
    seed: int = 1

    def generate(self):
        rng = np.random.default_rng(self.seed)
        n = self.total
        sizes = []
        acc = 0
        for b in cycle(self.add_batches):
            b = min(b, n - acc)
            sizes.append(b)
            acc += b
            if acc == n:
                break
        self.batch_sizes = np.array(sizes, np.int64)
        self.batch_start = np.concatenate(([0], np.cumsum(self.batch_sizes)))
        nb = len(sizes)
        if self.indirect == "off":
            self.batch_ind = np.zeros(nb, bool)
        elif self.indirect == "on":
            self.batch_ind = np.ones(nb, bool)
        else:
            self.batch_ind = np.arange(nb) % 2 == 1
        cap = np.where(self.batch_ind, self.indirect_max, self.size)
        cap = np.repeat(cap, self.batch_sizes)
        short = np.minimum(cap, self.short_max)
        length = (rng.integers(0, 1 << 30, n) % short) + 1
        if self.long_every:
            pick = np.arange(n) % self.long_every == self.long_every // 2
            length[pick] = (rng.integers(0, 1 << 30, int(pick.sum())) % cap[pick]) + 1
            # the longest chain the indirect table allows, now and then
            pick = np.arange(n) % (self.long_every * 3) == 1
            length[pick] = cap[pick]
        if self.full_every:
            direct = np.flatnonzero(~self.batch_ind)
            full = direct[::self.full_every]
            length[self.batch_start[full]] = self.size   # a chain of exactly `size`
        self.length = length.astype(np.int64)
        self.nread = (rng.random(n) * (self.length + 1)).astype(np.int64)
        self.chain_s0 = np.concatenate(([0], np.cumsum(self.length)))
        nseg = int(self.chain_s0[-1])
        self.seg_len = rng.integers(1, self.seg_bytes + 1, nseg).astype(np.int64)
        if self.zero_frac:
            self.seg_len[rng.random(nseg) < self.zero_frac] = 0
        seg_chain = np.repeat(np.arange(n), self.length)
        self.seg_w = (np.arange(nseg) - self.chain_s0[seg_chain]) >= self.nread[seg_chain]
        self.rbytes = np.add.reduceat(np.where(self.seg_w, 0, self.seg_len), self.chain_s0[:-1])
        self.wbytes = np.add.reduceat(np.where(self.seg_w, self.seg_len, 0), self.chain_s0[:-1])
        self.tokens = (np.uint64(TOKEN_BASE) + np.arange(n, dtype=np.uint64) * np.uint64(TOKEN_STEP))
        # what the device will report as written: a little less than the writable room
        self.used = np.maximum(self.wbytes - np.arange(n) % 5, 0).astype(np.int64)
        self.seg_off = np.full(nseg, -1, np.int64)    # buffer offset, filled when built
        self.chain_off = np.zeros(n, np.int64)
        self.ind = np.zeros(n, bool)                  # added through an indirect table
        self.head = np.full(n, -1, np.int64)          # head id the device saw
        self.done = np.zeros(n, bool)
        return self


def run_roundtrip(wl, *, event_idx, pop_batches, reclaim_max, arena=1 << 20, permute=False,
                  unpublished_every=0, seed=7, layout="split"):
    """Move all chains of ``wl`` through one ring; return the rig for final checks."""
    size = wl.size
    rng = np.random.default_rng(seed)
    rig = Rig(size, event_idx=event_idx, indirect_max=wl.indirect_max, arena=arena,
              layout=layout)
    drv, dev, buf = rig.drv, rig.dev, rig.buf
    n_total = wl.total
    max_chains = int(wl.batch_sizes.max())
    seg_per_batch = np.add.reduceat(wl.length, wl.batch_start[:-1])
    dbatch = ChainBatch(max_chains, max_segments=int(seg_per_batch.max()))
    pop_cycle = cycle([ChainBatch(p, max_segments=max(p * wl.short_max * 2, size, 1024))
                       for p in pop_batches])
    rbatch = ChainBatch(reclaim_max)

    built = 0            # chains written into memory and loaded into dbatch
    added = 0            # chains made available
    popped = 0           # chains the device popped (in avail order)
    added_slots = popped_slots = 0     # ring descriptors they took
    reclaimed = 0
    low = 0              # oldest chain not yet reclaimed (for the arena allocator)
    arena_pos = 0
    next_b = 0
    cur = None           # (batch number, first chain, chains already added)
    expect_used = []     # chains in the order the device pushed them
    num_free = size
    dev_asleep = True    # notifications enabled (as after reset) and nothing pending
    drv_asleep = True    # interrupts enabled (as after reset) and nothing used
    kicked = False
    irq = False
    idle = 0
    iters = 0

    def alloc(nbytes):
        """Place a batch's data in the circular arena without touching live chains."""
        nonlocal arena_pos
        assert nbytes < rig.arena_size, "arena too small for one batch"
        if low == built:
            off = 0
        else:
            a = int(wl.chain_off[low])
            if arena_pos >= a:
                if arena_pos + nbytes <= rig.arena_size:
                    off = arena_pos
                elif nbytes < a:
                    off = 0
                else:
                    return None
            elif arena_pos + nbytes < a:
                off = arena_pos
            else:
                return None
        arena_pos = off + nbytes
        return off

    def build(b):
        c0, c1 = int(wl.batch_start[b]), int(wl.batch_start[b + 1])
        s0, s1 = int(wl.chain_s0[c0]), int(wl.chain_s0[c1])
        lens = wl.seg_len[s0:s1]
        nbytes = int(lens.sum())
        off = alloc(nbytes)
        if off is None:
            return False
        start = rig.arena_off + off
        wl.seg_off[s0:s1] = start + excl_cumsum(lens)
        wl.chain_off[c0:c1] = off + excl_cumsum(wl.rbytes[c0:c1] + wl.wbytes[c0:c1])
        # the whole batch's data is one contiguous range: poison it, then the requests
        buf[start:start + nbytes] = POISON
        r = ~wl.seg_w[s0:s1]
        idx = spans(wl.seg_off[s0:s1][r], lens[r])
        rb = wl.rbytes[c0:c1]
        buf[idx] = pattern(np.repeat(wl.tokens[c0:c1], rb), stream_pos(rb), SALT_REQUEST)
        dbatch.load(GPA_BASE + wl.seg_off[s0:s1].astype(np.uint64), lens, wl.length[c0:c1],
                    wl.nread[c0:c1], wl.tokens[c0:c1])
        assert dbatch.count == c1 - c0
        assert eq(dbatch.readable_bytes, wl.rbytes[c0:c1])
        assert eq(dbatch.writable_bytes, wl.wbytes[c0:c1])
        return True

    def chain_segments(seqs):
        """Global segment numbers of chains ``seqs`` (in order), zero-length dropped,
        and the number of such segments per chain."""
        segs = spans(wl.chain_s0[seqs], wl.length[seqs])
        nz = wl.seg_len[segs] > 0
        per_chain = np.add.reduceat(nz.astype(np.int64), excl_cumsum(wl.length[seqs]))
        return segs[nz], per_chain

    def device_turn():
        nonlocal popped, popped_slots, irq
        pb = next(pop_cycle)
        pending = dev.pending()
        waiting = added - popped
        assert pending == rig.pending(waiting)
        n = dev.pop(pb)
        assert n == min(waiting, pb.max_chains) or (0 < n < waiting), (n, waiting)
        if n == 0:
            return 0
        seqs = np.arange(popped, popped + n)
        # --- the segments are exactly what the driver added (in avail order)
        segs, per_chain = chain_segments(seqs)
        assert pb.count == n
        assert eq(pb.seg_start, np.concatenate(([0], np.cumsum(per_chain))))
        assert eq(pb.seg_addr, GPA_BASE + wl.seg_off[segs])
        assert eq(pb.seg_len, wl.seg_len[segs])
        assert eq(pb.seg_host, rig.base + wl.seg_off[segs])
        w = wl.seg_w[segs]
        nr = np.bincount(np.repeat(np.arange(n), per_chain), weights=~w, minlength=n)
        assert eq(pb.readable_segments, nr)
        assert eq(pb.readable_bytes, wl.rbytes[seqs])
        assert eq(pb.writable_bytes, wl.wbytes[seqs])
        assert eq(pb.descriptors_used, np.where(wl.ind[seqs], 1, wl.length[seqs]))
        heads = pb.heads.astype(np.int64)
        assert len(np.unique(heads)) == n
        wl.head[seqs] = heads
        # --- request bytes, read through the popped segments' own addresses
        rsel = ~w
        idx = spans(pb.seg_host[rsel].astype(np.int64) - rig.base, pb.seg_len[rsel])
        rb = wl.rbytes[seqs]
        want = pattern(np.repeat(wl.tokens[seqs], rb), stream_pos(rb), SALT_REQUEST)
        got = buf[idx]
        if not eq(got, want):
            bad = int(np.flatnonzero(got != want)[0])
            pytest.fail(f"request byte {bad} of popped chains {popped}..: {got[bad]} != {want[bad]}")
        # --- response: the first used_len bytes of the writable stream
        wb = wl.wbytes[seqs]
        widx = spans(pb.seg_host[w].astype(np.int64) - rig.base, pb.seg_len[w])
        pos = stream_pos(wb)
        ul = wl.used[seqs]
        keep = pos < np.repeat(ul, wb)
        buf[widx[keep]] = pattern(np.repeat(wl.tokens[seqs], wb)[keep], pos[keep], SALT_RESPONSE)
        # --- push: in order with push_used, or in a shuffled order by head
        if permute and n > 1:
            order = rng.permutation(n)
            dev.push(pb.heads[order], ul[order])
            expect_used.append(seqs[order])
        else:
            pb.used_len[:] = ul
            dev.push_used(pb)
            expect_used.append(seqs)
        popped += n
        popped_slots += int(pb.descriptors_used.sum())
        assert dev.in_flight == 0
        assert dev.next_used == rig.index(popped, popped_slots)
        assert dev.next_avail == rig.index(popped, popped_slots)
        notify = dev.needs_notification()
        if drv_asleep:
            assert notify, "driver sleeps with interrupts enabled but no interrupt is due"
        if not event_idx:
            assert notify == drv_asleep
        assert not dev.needs_notification(), "nothing was pushed since the last decision"
        irq = irq or notify
        return n

    def driver_reclaim():
        nonlocal reclaimed, drv_asleep, irq, num_free, low
        irq = False
        if drv_asleep:
            drv.disable_interrupts()
            drv_asleep = False
        total = 0
        while True:
            n = drv.reclaim(rbatch)
            if n:
                seqs = np.concatenate(expect_used)[:n]
                rest = np.concatenate(expect_used)[n:]
                expect_used.clear()
                if len(rest):
                    expect_used.append(rest)
                assert eq(rbatch.tokens, wl.tokens[seqs])
                assert eq(rbatch.used_len, wl.used[seqs])
                assert eq(rbatch.heads, wl.head[seqs])
                assert not wl.done[seqs].any()
                wl.done[seqs] = True
                # response bytes: the pattern up to used_len, the rest untouched
                s = spans(wl.chain_s0[seqs], wl.length[seqs])
                ws = s[wl.seg_w[s]]
                widx = spans(wl.seg_off[ws], wl.seg_len[ws])
                wb = wl.wbytes[seqs]
                pos = stream_pos(wb)
                want = np.where(pos < np.repeat(wl.used[seqs], wb),
                                pattern(np.repeat(wl.tokens[seqs], wb), pos, SALT_RESPONSE),
                                np.uint8(POISON))
                assert eq(buf[widx], want), "response bytes differ"
                num_free += int(np.where(wl.ind[seqs], 1, wl.length[seqs]).sum())
                reclaimed += n
                total += n
            waiting = used_waiting(rig.mem, drv)
            assert waiting == (reclaimed < popped)
            if n == rbatch.max_chains and waiting and rng.random() < 0.7:
                continue
            # try to sleep: the re-check must report what is already waiting
            if n == 0 or rng.random() < 0.5:
                if drv.enable_interrupts():
                    assert waiting
                    drv.disable_interrupts()
                    continue
                assert not waiting
                drv_asleep = True
                break
            if not waiting:
                break          # stay awake, polling (interrupts disabled)
        while low < built and wl.done[low]:
            low += 1
        assert drv.num_free == num_free
        return total

    while reclaimed < n_total:
        iters += 1
        progress = 0
        # ---- driver: build the next batch (if there is arena room), add, kick
        if cur is None and next_b < len(wl.batch_sizes):
            if build(next_b):
                cur = [next_b, int(wl.batch_start[next_b]), 0]
                built = int(wl.batch_start[next_b + 1])
                next_b += 1
                progress += 1
        if cur is not None:
            b, c0, done = cur
            ind = bool(wl.batch_ind[b])
            publish = not (unpublished_every and iters % unpublished_every == 0)
            n = drv.add(dbatch, indirect=ind, start=done, publish=publish)
            if not publish:
                drv.publish()
            wl.ind[c0 + done:c0 + done + n] = ind
            slots = int(np.where(ind, 1, wl.length[c0 + done:c0 + done + n]).sum()) if n else 0
            num_free -= slots
            assert drv.num_free == num_free
            added += n
            added_slots += slots
            cur[2] += n
            if cur[2] == dbatch.count:
                cur = None
            assert drv.next_avail == rig.index(added, added_slots)
            kick = drv.kick_needed()
            if n == 0:
                assert not kick, "kick without anything new published"
            if dev_asleep and n:
                assert kick, "device sleeps with notifications enabled but no kick is due"
            if not event_idx:
                assert kick == (dev_asleep and n > 0)
            kicked = kicked or kick
            progress += n
        # ---- device: runs when awake or kicked
        if kicked or not dev_asleep:
            if dev_asleep:
                dev.disable_notification()
                dev_asleep = False
            kicked = False
            progress += device_turn()
            if rng.random() < 0.5:
                pending = dev.pending()
                if dev.enable_notification():
                    assert pending > 0
                    dev.disable_notification()
                else:
                    assert pending == 0
                    dev_asleep = True
        # ---- driver: reclaim when interrupted or polling
        if irq or not drv_asleep:
            progress += driver_reclaim()
        if progress:
            idle = 0
        else:
            idle += 1
            assert idle < 4, (f"stalled (lost wakeup?): added={added} popped={popped} "
                              f"reclaimed={reclaimed} dev_asleep={dev_asleep} "
                              f"drv_asleep={drv_asleep} pending={dev.pending()}")

    assert wl.done.all()
    assert added == popped == reclaimed == n_total
    assert drv.num_free == size
    assert drv.in_flight == 0
    assert dev.in_flight == 0
    assert dev.pending() == 0
    assert added_slots == popped_slots
    assert dev.next_avail == dev.next_used == rig.index(n_total, added_slots)
    assert drv.next_avail == drv.last_used == rig.index(n_total, added_slots)
    assert not dev.broken and not drv.broken
    return rig, iters


WRAPS = 3 * 65536 + 1000      # more than three trips round the 16-bit index
ONE_WRAP = 65536 + 3000       # small rings move few chains per call: one trip

CASES = {
    # size 16: batch sizes 1, 2, 7, size/2, size; chain lengths 1..16 (indirect too);
    # zero-length descriptors; completion out of order; three index wraps
    "size16-mixed-evidx-shuffled": dict(
        wl=dict(size=16, total=ONE_WRAP, add_batches=(16, 1, 8, 2, 7), indirect="mixed",
                indirect_max=16, short_max=16, full_every=3, seg_bytes=24, zero_frac=0.1),
        event_idx=True, pop_batches=(16, 3, 1, 7, 8), reclaim_max=5, permute=True,
        unpublished_every=5),
    "size16-direct": dict(
        wl=dict(size=16, total=ONE_WRAP, add_batches=(16, 8, 7, 2, 1), short_max=3,
                long_every=9, full_every=4, seg_bytes=32),
        event_idx=False, pop_batches=(16, 7, 2), reclaim_max=16),
    # size 256: long chains (up to 256, direct and indirect with indirect_max = size)
    "size256-indirect": dict(
        wl=dict(size=256, total=WRAPS, add_batches=(256, 128, 7, 1, 2), indirect="on",
                indirect_max=256, short_max=4, long_every=97, seg_bytes=48),
        event_idx=False, pop_batches=(256, 64, 7), reclaim_max=256, permute=True),
    "size256-mixed-evidx": dict(
        wl=dict(size=256, total=WRAPS, add_batches=(256, 7, 128, 1), indirect="mixed",
                indirect_max=256, short_max=3, long_every=151, full_every=5, seg_bytes=40),
        event_idx=True, pop_batches=(128, 256, 2), reclaim_max=100),
    # size 32768: huge batches, a chain of exactly 32768 descriptors (direct)
    "size32768-mixed-evidx": dict(
        wl=dict(size=32768, total=WRAPS, add_batches=(16384, 32768, 256, 7, 1, 2),
                indirect="mixed", indirect_max=8, short_max=2, long_every=1000,
                full_every=2, seg_bytes=24),
        event_idx=True, pop_batches=(4096, 256, 32768, 7), reclaim_max=1024,
        arena=8 << 20, permute=True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_roundtrip(case):
    spec = CASES[case]
    wl = Workload(**spec["wl"]).generate()
    kw = {k: v for k, v in spec.items() if k != "wl"}
    if wl.full_every:
        assert (wl.length == wl.size).any()
    run_roundtrip(wl, **kw)


# ---- rings of one and two descriptors, per chain (chain_bytes) -----------------------

def _tiny_chain(seq, size):
    """Segments of chain ``seq`` on a ring of ``size``: [(length, writable), ...]."""
    ndesc = 1 + seq % size
    if ndesc == 1:
        return [(1 + seq % 23, bool(seq % 3 == 0))]        # readable only, or writable only
    return [(1 + seq % 19, False), (1 + seq % 17, True)]


def _tiny_bytes(seq, n, salt):
    return bytes((seq * 131 + i * 7 + salt + (seq >> 8)) & 0xFF for i in range(n))


@pytest.mark.parametrize("size,event_idx,indirect", [(1, False, False), (1, True, True),
                                                      (2, True, False), (2, False, True)])
def test_roundtrip_tiny_ring_index_wrap(size, event_idx, indirect):
    """Rings of size 1 and 2 (a chain of exactly ``size`` descriptors every time the
    chain length allows) across the 16-bit index wrap; content checked per chain."""
    rig = Rig(size, event_idx=event_idx, indirect_max=size if indirect else 0, arena=PAGE)
    drv, dev, mem = rig.drv, rig.dev, rig.mem
    db, pb, rb = ChainBatch(size), ChainBatch(size), ChainBatch(size)
    total = 65536 + 300
    slot = 64                                   # bytes per chain; `size` slots in flight
    seq = 0
    done = 0
    while done < total:
        # driver: as many chains as the ring takes (each chain its own slot)
        db.clear()
        chains = []
        free = drv.num_free
        while seq + len(chains) < total and len(chains) < size:
            s = seq + len(chains)
            segs = _tiny_chain(s, size)
            need = 1 if indirect else len(segs)
            if need > free:
                break
            free -= need
            gpa = rig.arena_gpa + (s % size) * slot
            readable, writable = [], []
            for ln, w in segs:
                (writable if w else readable).append((gpa, ln))
                mem.write(gpa, bytes([POISON]) * ln if w else _tiny_bytes(s, ln, 1))
                gpa += ln
            db.append(readable=readable, writable=writable, token=TOKEN_BASE + s)
            chains.append((s, readable, writable))
        if chains:
            assert drv.add(db, indirect=indirect) == len(chains)
            assert drv.kick_needed()            # the device always sleeps between rounds
        # device: pop, check the segments and bytes, reply, push
        n = dev.pop(pb)
        assert n == len(chains)
        for i, (s, readable, writable) in enumerate(chains):
            c = pb.chain(i)
            assert c.segments == [(g, ln, False) for g, ln in readable] + \
                [(g, ln, True) for g, ln in writable]
            assert pb.descriptors_used[i] == (1 if indirect else len(readable) + len(writable))
            assert pb.chain_bytes(i) == b"".join(_tiny_bytes(s, ln, 1) for _, ln in readable)
            assert pb.chain_bytes(i, writable=True) == bytes([POISON]) * c.writable
            used = c.writable - s % 2 if c.writable else 0
            if writable:
                mem.write(writable[0][0], _tiny_bytes(s, used, 2))
            pb.used_len[i] = used
        dev.push_used(pb)
        assert dev.needs_notification()         # the driver always sleeps between rounds
        assert not dev.enable_notification()
        # driver: reclaim and check
        drv.disable_interrupts()
        assert drv.reclaim(rb) == n
        for i, (s, readable, writable) in enumerate(chains):
            assert rb.tokens[i] == TOKEN_BASE + s
            wbytes = sum(ln for _, ln in writable)
            used = wbytes - s % 2 if wbytes else 0
            assert rb.used_len[i] == used
            if writable:
                assert mem.read(writable[0][0], wbytes) == \
                    _tiny_bytes(s, used, 2) + bytes([POISON]) * (wbytes - used)
        assert not drv.enable_interrupts()
        seq += n
        done += n
    assert drv.num_free == size and drv.in_flight == 0 and dev.in_flight == 0
    assert dev.next_avail == dev.next_used == drv.next_avail == drv.last_used == total % 65536


# ---- save / restore -----------------------------------------------------------------

class SeqRing:
    """A ring whose chains are (8 readable bytes: seq, 8 writable bytes: reply)."""

    def __init__(self, size, event_idx, layout="split"):
        self.size = size
        self.nslots = 4 * size          # 16-byte slots: seq (readable), reply (writable)
        self.rig = Rig(size, event_idx=event_idx, arena=16 * self.nslots, layout=layout)
        self.slots = self.rig.mem.array(self.rig.arena_gpa, 2 * self.nslots, "<u8")
        self.sent = 0       # chains added
        self.popped = 0     # sequence number the next pop must start with
        self.got = 0        # chains reclaimed
        self.batch = ChainBatch(size)
        self.rb = ChainBatch(size)

    def gpa(self, seqs):
        return (self.rig.arena_gpa + (np.asarray(seqs, np.uint64) % np.uint64(self.nslots)) * np.uint64(16))

    def add(self, n):
        seqs = np.arange(self.sent, self.sent + n, dtype=np.uint64)
        k = (seqs % np.uint64(self.nslots)).astype(np.int64)
        self.slots[2 * k] = seqs
        self.slots[2 * k + 1] = 0
        addr = np.empty(2 * n, np.uint64)
        addr[0::2] = self.gpa(seqs)
        addr[1::2] = self.gpa(seqs) + np.uint64(8)
        self.batch.load(addr, np.full(2 * n, 8), np.full(n, 2), np.ones(n), seqs)
        assert self.rig.drv.add(self.batch) == n
        self.sent += n

    def seqs_of(self, pb):
        """Sequence numbers in the readable segments of a popped batch."""
        assert np.all(pb.readable_segments == 1) and np.all(pb.seg_len == 8)
        return self.slots[(pb.seg_addr[0::2] - np.uint64(self.rig.arena_gpa)) // np.uint64(8)]

    def serve(self, dev, pb, push=True):
        """Pop with ``dev`` into ``pb``; check sequence numbers; reply; push."""
        n = dev.pop(pb)
        if n:
            seqs = self.seqs_of(pb)
            assert np.array_equal(seqs, np.arange(self.popped, self.popped + n, dtype=np.uint64))
            self.popped += n
        if n and push:
            self.slots[(pb.seg_addr[1::2] - np.uint64(self.rig.arena_gpa)) // np.uint64(8)] = seqs * np.uint64(3) + np.uint64(1)
            pb.used_len[:] = 8
            dev.push_used(pb)
        return n

    def reclaim_all(self):
        total = 0
        while True:
            n = self.rig.drv.reclaim(self.rb)
            if not n:
                return total
            seqs = self.rb.tokens.copy()
            assert np.array_equal(seqs, np.arange(self.got, self.got + n, dtype=np.uint64))
            assert np.all(self.rb.used_len == 8)
            k = (seqs % np.uint64(self.nslots)).astype(np.int64)
            assert np.array_equal(self.slots[2 * k + 1], seqs * np.uint64(3) + np.uint64(1))
            self.got += n
            total += n


@pytest.mark.parametrize("event_idx", [False, True])
@pytest.mark.parametrize("rewind", [False, True])
def test_save_restore_mid_stream(event_idx, rewind):
    """A new device queue restored from next_avail / next_used continues the stream
    across the 16-bit wrap with nothing lost or repeated. With ``rewind`` the old
    device had popped chains it never completed: the new one starts from next_used
    (an in-order device) and serves them again, exactly once."""
    size = 64
    full = size // 2                                  # chains of 2 descriptors
    sr = SeqRing(size, event_idx)
    rig = sr.rig
    pb = ChainBatch(8)
    dev = rig.dev
    # run close to the wrap through the first device
    target = 65536 - 100
    while sr.got < target:
        sr.add(min(full, target - sr.sent))
        while sr.serve(dev, pb):
            pass
        sr.reclaim_all()
    # a full ring pending; the old device serves part of it (and maybe pops more)
    sr.add(full)
    first = sr.got
    assert sr.serve(dev, pb) == 8 and sr.serve(dev, pb) == 8
    assert sr.reclaim_all() == 16
    if rewind:
        assert sr.serve(dev, pb, push=False) == 8      # popped, never completed
        assert dev.in_flight == 8
    saved_avail, saved_used = dev.next_avail, dev.next_used
    assert saved_used == (first + 16) % 65536
    assert saved_avail == (first + 16 + (8 if rewind else 0)) % 65536
    assert saved_avail < 65536 - 64                   # the wrap is still ahead

    new = SplitDeviceQueue(rig.mem, size, *rig.addrs[:3], event_idx=event_idx)
    new.next_avail = saved_used if rewind else saved_avail
    new.next_used = saved_used
    rig.dev = dev = None                              # the old device is gone
    assert new.next_avail == (saved_used if rewind else saved_avail)
    assert new.next_used == saved_used
    assert new.in_flight == 0
    assert new.pending() == full - 16
    if rewind:
        sr.popped = first + 16                        # the new device serves them again
    if event_idx:
        assert new.needs_notification()              # first decision after a restore
    # continue across the wrap with the new device
    end = 65536 + 500
    while sr.got < end:
        while sr.serve(new, pb):
            pass
        assert sr.reclaim_all() > 0
        if sr.sent < end:
            sr.add(min(rig.drv.num_free // 2, end - sr.sent))
    assert sr.got == sr.sent == sr.popped == end
    assert new.next_avail == new.next_used == end % 65536
    assert rig.drv.num_free == size and rig.drv.in_flight == 0 and new.in_flight == 0


# ---- partial pops, subsets, out-of-order completion -----------------------------------

def test_pop_smaller_than_pending_then_partial_and_out_of_order_push():
    size = 16
    sr = SeqRing(size, False)
    dev, drv = sr.rig.dev, sr.rig.drv
    sr.add(8)                               # 8 chains of 2 descriptors: ring full
    assert drv.num_free == 0
    assert dev.pending() == 8
    pb = ChainBatch(3)
    heads, seqs = [], []
    for want in (3, 3, 2):                  # several pops, each smaller than pending
        assert dev.pop(pb) == want
        heads += pb.heads.tolist()
        seqs += sr.seqs_of(pb).tolist()
        assert dev.pending() == 8 - len(heads)
    assert dev.pop(ChainBatch(3)) == 0
    assert seqs == list(range(8))
    assert len(set(heads)) == 8
    assert dev.in_flight == 8
    token_of = dict(zip(heads, seqs))

    # push_used of a subset of the last popped batch (its first `count` chains)
    assert pb.count == 2
    pb.used_len[:] = [5, 6]
    with pytest.raises(ValueError):
        dev.push_used(pb, count=3)
    dev.push_used(pb, count=1)
    assert dev.in_flight == 7
    rb = ChainBatch(16)
    assert drv.reclaim(rb) == 1
    assert rb.heads.tolist() == [heads[6]]
    assert rb.tokens.tolist() == [token_of[heads[6]]] == [6]
    assert rb.used_len.tolist() == [5]
    assert drv.num_free == 2
    assert drv.reclaim(rb) == 0

    # out-of-order completion: push the other heads in a scrambled order, two calls
    rest = [h for h in heads if h != heads[6]]
    order = [rest[i] for i in (6, 0, 5, 2, 4, 1, 3)]
    lens = [token_of[h] % 8 + 1 for h in order]
    dev.push(order[:4], lens[:4])
    with pytest.raises(NotInFlight):
        dev.push([order[0]], [1])           # already completed
    assert dev.in_flight == 3
    dev.push(order[4:], lens[4:])
    assert dev.in_flight == 0
    got = []
    small = ChainBatch(3)
    while (n := drv.reclaim(small)):
        assert n <= 3
        got += list(zip(small.heads.tolist(), small.tokens.tolist(), small.used_len.tolist()))
    assert got == [(h, token_of[h], ln) for h, ln in zip(order, lens)]
    assert drv.num_free == size and drv.in_flight == 0

    # the descriptors freed out of order are reused correctly: another full round
    sr.popped = sr.got = 8
    sr.add(8)
    assert drv.num_free == 0
    assert sr.serve(dev, ChainBatch(8)) == 8
    assert sr.reclaim_all() == 8
    assert drv.num_free == size
    assert dev.next_avail == dev.next_used == drv.next_avail == drv.last_used == 16
