"""Driver <-> device round trips of the packed ring engine (VIRTIO_F_RING_PACKED).

The split suite's machinery (test_roundtrip.py: ``run_roundtrip`` with its per-batch
content checks and notification protocol, ``SeqRing`` for save/restore) runs here on
packed rings: queue sizes that are not powers of two (1, 2, 3, 7, 100) next to 256 and
32768, many laps of the ring (the wrap counters flip at each), batch sizes 1..size,
chain lengths 1..size (a chain of exactly ``size`` descriptors now and then), indirect
on/off, event idx on/off, completion out of order. Chains that cross the end of the
ring, out-of-order completion and save/restore with the wrap counter in bit 15 also
get tests of their own that look at the descriptor ring byte by byte.
"""

import struct

import numpy as np
import pytest

from conftest import ring_index
from test_roundtrip import PAGE, POISON, TOKEN_BASE, Rig, SeqRing, Workload, run_roundtrip
import vqcore
import vqcore.model_packed as model_packed
from vqcore import ChainBatch, PackedDeviceQueue
from vqcore.errors import NotInFlight
from vqcore.packed import (packed_desc_flags, packed_ring_is_fresh, packed_ring_position,
                           packed_slot_state)

NEXT, WRITE, INDIRECT = 1, 2, 4
AVAIL, USED = 1 << 7, 1 << 15

CASES = {
    # size 7: batch sizes 1..7, chain lengths 1..7 (indirect too), zero-length
    # descriptors, completion out of order; ~20000 chains = thousands of laps
    "size7-mixed-evidx-shuffled": dict(
        wl=dict(size=7, total=20_000, add_batches=(7, 1, 3, 2, 5, 4, 6), indirect="mixed",
                indirect_max=7, short_max=7, full_every=3, seg_bytes=24, zero_frac=0.1),
        event_idx=True, pop_batches=(7, 3, 1, 5, 2), reclaim_max=4, permute=True),
    "size7-direct-flags": dict(
        wl=dict(size=7, total=15_000, add_batches=(1, 7, 2, 6, 3), short_max=2,
                long_every=5, full_every=2, seg_bytes=32),
        event_idx=False, pop_batches=(7, 1, 4), reclaim_max=7),
    # size 100 (not a power of two): long chains, direct and indirect
    "size100-mixed-flags-shuffled": dict(
        wl=dict(size=100, total=30_000, add_batches=(100, 50, 7, 1, 33), indirect="mixed",
                indirect_max=100, short_max=4, long_every=61, full_every=5, seg_bytes=40,
                zero_frac=0.05),
        event_idx=False, pop_batches=(100, 7, 2, 64), reclaim_max=30, permute=True),
    # size 256: chains up to 256 descriptors, direct and indirect
    "size256-indirect-evidx": dict(
        wl=dict(size=256, total=40_000, add_batches=(256, 128, 7, 1, 2), indirect="on",
                indirect_max=256, short_max=4, long_every=97, seg_bytes=48),
        event_idx=True, pop_batches=(256, 64, 7), reclaim_max=256, permute=True),
    "size256-mixed-flags": dict(
        wl=dict(size=256, total=40_000, add_batches=(256, 7, 128, 1), indirect="mixed",
                indirect_max=16, short_max=3, long_every=151, full_every=5, seg_bytes=40),
        event_idx=False, pop_batches=(128, 256, 2), reclaim_max=100),
    # size 32768: huge batches, a chain of exactly 32768 descriptors; several laps
    "size32768-mixed-evidx-shuffled": dict(
        wl=dict(size=32768, total=150_000, add_batches=(16384, 32768, 256, 7, 1, 2),
                indirect="mixed", indirect_max=8, short_max=2, long_every=1000,
                full_every=2, seg_bytes=24),
        event_idx=True, pop_batches=(4096, 256, 32768, 7), reclaim_max=1024,
        arena=8 << 20, permute=True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_packed_roundtrip(case):
    spec = CASES[case]
    wl = Workload(**spec["wl"]).generate()
    kw = {k: v for k, v in spec.items() if k != "wl"}
    if wl.full_every:
        assert (wl.length == wl.size).any()
    rig, _ = run_roundtrip(wl, layout="packed", **kw)
    assert isinstance(rig.dev, PackedDeviceQueue)
    slots = int(np.where(wl.ind, 1, wl.length).sum())
    assert slots >= 5 * wl.size, "the run must go round the ring several times"


# ---- tiny rings: sizes 1, 2 and 3, thousands of laps ------------------------------------

@pytest.mark.parametrize("size,event_idx,indirect", [(1, False, False), (1, True, True),
                                                      (2, True, False), (3, False, False),
                                                      (3, True, True)])
def test_packed_tiny_rings_many_laps(size, event_idx, indirect):
    """One chain at a time of 1..size descriptors (or one indirect descriptor), each
    checked byte by byte on both sides; the wrap counters flip thousands of times."""
    rig = Rig(size, event_idx=event_idx, indirect_max=size if indirect else 0, arena=PAGE,
              layout="packed")
    drv, dev, mem = rig.drv, rig.dev, rig.mem
    db, pb, rb = ChainBatch(1), ChainBatch(1), ChainBatch(1)
    slots = 0
    total = 6000
    for seq in range(total):
        ndesc = 1 + seq % size
        lens = [1 + (seq * 7 + i) % 29 for i in range(ndesc)]
        nread = seq % (ndesc + 1)
        gpa = rig.arena_gpa + (seq % 8) * 256
        readable, writable, request = [], [], b""
        for i, ln in enumerate(lens):
            (readable if i < nread else writable).append((gpa, ln))
            payload = bytes((seq * 131 + i * 7 + k) & 0xFF for k in range(ln))
            mem.write(gpa, payload if i < nread else bytes([POISON]) * ln)
            request += payload if i < nread else b""
            gpa += ln
        db.clear()
        db.append(readable=readable, writable=writable, token=TOKEN_BASE + seq)
        assert drv.add(db, indirect=indirect) == 1
        assert drv.kick_needed()                # the device always sleeps between rounds
        assert dev.pop(pb) == 1
        c = pb.chain(0)
        assert c.segments == [(g, n, False) for g, n in readable] + \
            [(g, n, True) for g, n in writable]
        assert pb.descriptors_used.tolist() == [1 if indirect else ndesc]
        assert pb.chain_bytes(0) == request
        assert pb.chain_bytes(0, writable=True) == bytes([POISON]) * c.writable
        used = max(c.writable - seq % 3, 0)
        reply = bytes([seq & 0xFF]) * min(used, writable[0][1]) if writable else b""
        if writable:
            mem.write(writable[0][0], reply)
        pb.used_len[0] = used
        dev.push_used(pb)
        assert dev.needs_notification()
        assert not dev.enable_notification()
        drv.disable_interrupts()
        assert drv.reclaim(rb) == 1
        assert rb.tokens.tolist() == [TOKEN_BASE + seq] and rb.used_len.tolist() == [used]
        assert rb.heads.tolist() == [0]          # the id stack hands out 0 again and again
        if writable:
            assert mem.read(writable[0][0], writable[0][1]) == \
                reply + bytes([POISON]) * (writable[0][1] - len(reply))
        assert not drv.enable_interrupts()
        slots += 1 if indirect else ndesc
        want = ring_index("packed", size, seq + 1, slots)
        assert dev.next_avail == dev.next_used == drv.next_avail == drv.last_used == want
    assert slots // size >= 2000                      # laps of the ring
    assert drv.num_free == size and drv.in_flight == 0 and dev.in_flight == 0


# ---- chains crossing the end of the ring, byte by byte -------------------------------------

def read_ring(mem, desc_addr, size):
    """The descriptor ring as a list of (addr, len, id, flags)."""
    raw = mem.read(desc_addr, 16 * size)
    return [struct.unpack_from("<QIHH", raw, 16 * i) for i in range(size)]


def test_chain_crossing_the_end_of_the_ring():
    """A 5-descriptor chain starting at slot 4 of a 7-slot ring: slots 4, 5, 6 carry the
    wrap-1 bits, slots 0 and 1 the wrap-0 bits; the id is in every descriptor; the
    device pops it whole, and its used descriptor goes to slot 4 with the wrap-1 bits;
    the next chain starts at slot 2 with wrap 0."""
    rig = Rig(7, event_idx=False, arena=PAGE, layout="packed")
    drv, dev, mem = rig.drv, rig.dev, rig.mem
    a = rig.arena_gpa
    b = ChainBatch(4)
    b.append(readable=[(a, 8)], writable=[(a + 8, 8)], token=1)                 # slots 0-1
    b.append(readable=[(a + 16, 8), (a + 24, 8)], token=2)                      # slots 2-3
    assert drv.add(b) == 2
    pb = ChainBatch(8)
    assert dev.pop(pb) == 2
    pb.used_len[:] = [8, 0]
    dev.push_used(pb)
    rb = ChainBatch(8)
    assert drv.reclaim(rb) == 2 and rb.heads.tolist() == [0, 1]
    # the crossing chain: 3 readable + 2 writable descriptors from slot 4
    mem.write(a + 0x100, bytes(range(40)))
    b.clear()
    segs = [(a + 0x100 + 8 * i, 8) for i in range(5)]
    b.append(readable=segs[:3], writable=segs[3:], token=3)
    assert drv.add(b) == 1
    assert drv.next_avail == 2                       # slot 2, wrap counter 0
    ring = read_ring(mem, rig.addrs.desc, 7)
    buffer_id = 1                                    # reclaimed last: on top of the id stack
    for k, slot in enumerate([4, 5, 6, 0, 1]):
        addr, ln, id_, flags = ring[slot]
        wrap_bits = AVAIL if slot >= 4 else USED
        assert (addr, ln, id_) == (segs[k][0], 8, buffer_id)
        assert flags == wrap_bits | (WRITE if k >= 3 else 0) | (NEXT if k < 4 else 0)
    assert dev.pending() == 1
    assert dev.pop(pb) == 1
    assert pb.heads.tolist() == [buffer_id] and pb.descriptors_used.tolist() == [5]
    assert pb.chain(0).segments == [(g, n, k >= 3) for k, (g, n) in enumerate(segs)]
    assert pb.chain_bytes(0) == bytes(range(24))
    assert dev.next_avail == 2 and dev.pending() == 0
    pb.used_len[:] = 16
    dev.push_used(pb)
    addr, ln, id_, flags = read_ring(mem, rig.addrs.desc, 7)[4]
    assert (ln, id_, flags) == (16, buffer_id, AVAIL | USED | WRITE)
    assert dev.next_used == 2                        # skipped the chain's 5 slots
    assert drv.reclaim(rb) == 1 and rb.tokens.tolist() == [3] and rb.used_len.tolist() == [16]
    assert drv.last_used == 2 and drv.num_free == 7


def test_out_of_order_completion_and_id_reuse():
    """Four chains of 1, 3, 2 and 1 descriptors completed in the order 2, 0, 3, 1: each
    used descriptor goes to the next used slot and that slot then skips the completed
    chain's length; the driver reclaims them in that order, WRITE only where a length
    was written, and hands the freed ids out again from the top of its stack."""
    size = 8
    rig = Rig(size, event_idx=False, arena=PAGE, layout="packed")
    drv, dev, mem = rig.drv, rig.dev, rig.mem
    a = rig.arena_gpa
    b = ChainBatch(4)
    lengths = [1, 3, 2, 1]
    for t, n in enumerate(lengths):
        b.append(readable=[(a + 64 * t + 8 * i, 8) for i in range(n - 1)],
                 writable=[(a + 64 * t + 56, 8)], token=100 + t)
    assert drv.add(b) == 4 and drv.num_free == 1
    pb = ChainBatch(4)
    assert dev.pop(pb) == 4 and pb.heads.tolist() == [0, 1, 2, 3]
    with pytest.raises(NotInFlight):
        dev.push([2, 2], [1, 1])                      # twice in one call: nothing written
    assert read_ring(mem, rig.addrs.desc, size)[0][3] == AVAIL | WRITE    # still available
    order, used = [2, 0, 3, 1], [5, 0, 8, 1]
    dev.push(order[:2], used[:2])
    dev.push(order[2:], used[2:])
    ring = read_ring(mem, rig.addrs.desc, size)
    slot = 0
    for buffer_id, ln in zip(order, used):
        _, got_len, got_id, flags = ring[slot]
        assert (got_len, got_id) == (ln, buffer_id)
        assert flags == AVAIL | USED | (WRITE if ln else 0)
        slot += lengths[buffer_id]
    assert slot == 7 and dev.next_used == 0x8000 | 7
    rb = ChainBatch(8)
    assert drv.reclaim(rb) == 4
    assert rb.heads.tolist() == order and rb.tokens.tolist() == [100 + i for i in order]
    assert rb.used_len.tolist() == used
    # the id stack: 1 was freed last, so it comes first, then 3, 0, 2, then 4
    b = ChainBatch(8)
    for t in range(5):
        b.append(readable=[(a, 1)], token=200 + t)
    assert drv.add(b) == 5
    assert dev.pop(pb) == 4 and pb.heads.tolist() == [1, 3, 0, 2]
    assert dev.pop(pb) == 1 and pb.heads.tolist() == [4]


# ---- save / restore (vhost-user GET/SET_VRING_BASE: wrap counter in bit 15) -----------------

def run_laps(sr, dev, pb, target):
    """Serve and reclaim until ``target`` chains went round."""
    while sr.got < target:
        sr.add(min(sr.rig.drv.num_free // 2, target - sr.sent))
        while sr.serve(dev, pb):
            pass
        sr.reclaim_all()


@pytest.mark.parametrize("event_idx", [False, True])
@pytest.mark.parametrize("rewind", [False, True])
@pytest.mark.parametrize("size", [64, 7])
def test_packed_save_restore_mid_stream(size, event_idx, rewind):
    """next_avail / next_used read mid-stream (wrap counters in bit 15) and set into a
    fresh PackedDeviceQueue on the same memory: the stream continues over many laps
    with nothing lost or repeated. With ``rewind`` the old device had popped chains it
    never completed: the new one starts from next_used and serves them again, once."""
    sr = SeqRing(size, event_idx, layout="packed")    # chains of 2 descriptors
    rig = sr.rig
    pb, one = ChainBatch(3), ChainBatch(1)
    dev = rig.dev
    run_laps(sr, dev, pb, 81 * size // 2 + 1)          # an odd number of laps: wrap 0 now
    assert dev.next_used >> 15 == 0 and dev.next_avail >> 15 == 0
    first = sr.got
    sr.add(rig.drv.num_free // 2)                      # the ring full
    assert sr.serve(dev, one) == 1 and sr.reclaim_all() == 1
    if rewind:
        assert sr.serve(dev, one, push=False) == 1     # popped, never completed
        assert dev.in_flight == 1
    saved_avail, saved_used = dev.next_avail, dev.next_used
    assert saved_used == ring_index("packed", size, first + 1, 2 * (first + 1))
    assert saved_avail == ring_index("packed", size, sr.popped, 2 * sr.popped)

    new = PackedDeviceQueue(rig.mem, size, *rig.addrs[:3], event_idx=event_idx)
    new.next_avail = saved_used if rewind else saved_avail
    new.next_used = saved_used
    rig.dev = dev = None
    assert new.next_avail == (saved_used if rewind else saved_avail)
    assert new.next_used == saved_used and new.in_flight == 0
    assert new.pending() == 1
    if rewind:
        sr.popped = first + 1                          # the new device serves it again
    if event_idx:
        assert new.needs_notification()               # first decision after a restore
    end = sr.got + 30 * size + 5
    run_laps(sr, new, pb, end)
    assert sr.got == sr.sent == sr.popped == end
    assert new.next_avail == new.next_used == ring_index("packed", size, end, 2 * end)
    assert rig.drv.num_free == size and rig.drv.in_flight == 0 and new.in_flight == 0


@pytest.mark.parametrize("impl", [vqcore, model_packed], ids=["engine", "model"])
@pytest.mark.parametrize("size", [1, 7, 100, 32768])
def test_restore_rejects_invalid_indices(impl, size):
    """A restored index is a slot below the queue size, plus the wrap counter in bit
    15; anything else is refused and leaves the queue as it was."""
    rig = Rig(size, event_idx=False, arena=PAGE, layout="packed")
    dev = impl.PackedDeviceQueue(rig.mem, size, *rig.addrs[:3])
    for good in (0, size - 1, 0x8000, 0x8000 | (size - 1)):
        dev.next_avail = good
        dev.next_used = good
        assert dev.next_avail == dev.next_used == good
    dev.next_avail = dev.next_used = 0x8000
    bad_values = [0x10000, 0x18000, 2**32 - 1]
    if size < 32768:                                  # (slot 32767 exists in a 32768 ring)
        bad_values += [size, 0x8000 | size, 0x7FFF, 0xFFFF]
    for bad in bad_values:
        for attr in ("next_avail", "next_used"):
            with pytest.raises(ValueError):
                setattr(dev, attr, bad)
    for bad in (-1, 2**32):
        with pytest.raises(OverflowError):
            dev.next_avail = bad
    assert dev.next_avail == dev.next_used == 0x8000


def test_restore_then_wrap_counter_in_bit_15_follows_the_laps():
    """After a restore into the middle of lap 0 (wrap counter 0) the device's indices
    flip bit 15 each time they pass the end of the ring, like the driver's."""
    size = 5
    sr = SeqRing(size, False, layout="packed")
    rig = sr.rig
    pb = ChainBatch(2)
    run_laps(sr, rig.dev, pb, 3)                       # 6 slots: slot 1 of lap 1 (wrap 0)
    assert rig.dev.next_avail == rig.drv.next_avail == 1
    new = PackedDeviceQueue(rig.mem, size, *rig.addrs[:3])
    new.next_avail = new.next_used = rig.dev.next_used
    rig.dev = None
    seen = set()
    for _ in range(12):
        run_laps(sr, new, pb, sr.got + 1)
        assert new.next_avail == new.next_used == rig.drv.next_avail == rig.drv.last_used
        seen.add(new.next_used >> 15)
    assert seen == {0, 1}


# ---- where a device stood, read back from the descriptor flags -----------------------------

def test_packed_ring_position_from_descriptor_flags():
    """The device position read from a packed ring's flags (one-descriptor chains):
    A = made available for a lap's wrap counter, U = used with it."""
    pos = packed_ring_position

    def A(w):
        return 0x80 if w else 0x8000

    def U(w):
        return 0x8080 if w else 0
    assert pos([0] * 8) == 0x8000                              # fresh ring
    assert pos([A(1)] * 3 + [0] * 5) == 0x8000                 # buffers, none used
    assert pos([U(1)] * 3 + [0] * 5) == 0x8003                 # three used
    assert pos([A(0)] * 3 + [A(1)] * 5) == 0x8003              # used and given back
    assert pos([A(0)] * 2 + [U(1)] * 3 + [A(1)] * 2 + [U(0)]) == 0x8005
    assert pos([U(1)] * 8) == 0x0000                           # a whole lap: slot 0, wrap 0
    assert pos([U(0)] * 2 + [A(0)] + [U(1)] * 5) == 0x0002     # second lap
    assert pos([A(1), U(1), A(1)] + [0] * 5) is None           # a two-descriptor chain
    assert pos([]) is None
    assert [packed_slot_state(f, 1) for f in (A(1), U(1), U(0), A(0))] == [
        "avail", "used", "old", "next"]
    assert packed_ring_is_fresh([0] * 8) and packed_ring_is_fresh([A(1)] * 3 + [0] * 5)
    assert packed_ring_is_fresh([A(1)] * 8)
    assert not packed_ring_is_fresh([U(1)] + [0] * 7)
    assert not packed_ring_is_fresh([A(0)] + [A(1)] * 7)
    assert not packed_ring_is_fresh([0, A(1)] + [0] * 6)


@pytest.mark.parametrize("size", [1, 2, 3, 7, 8, 100])
def test_ring_position_follows_the_engine(size):
    """Drive the engine (driver and device) with one-descriptor chains in random steps
    over many laps; at every step the position read back from the flags alone is the
    device's used position (next_used): chains popped but not yet used are still marked
    available, so a new owner starts again from the first of them."""
    from test_packed_notifications import PRing
    rng = np.random.default_rng(size)
    r = PRing(vqcore, size, event_idx=False)
    fresh = packed_desc_flags(r.mem, r.addrs.desc, size)
    assert packed_ring_position(fresh) == 0x8000 and packed_ring_is_fresh(fresh)
    for step in range(40 * size + 50):
        free = r.drv.num_free
        if free and rng.random() < 0.6:
            r.add([1] * int(rng.integers(1, free + 1)))
        if rng.random() < 0.6:
            r.pop()
        if r.held and rng.random() < 0.6:
            r.push(int(rng.integers(1, len(r.held) + 1)))
        if rng.random() < 0.5:
            r.reclaim()
        flags = packed_desc_flags(r.mem, r.addrs.desc, size)
        assert packed_ring_position(flags) == r.dev.next_used, (step, flags.tolist())
    assert r.used >= 10 * size, "the walk must go round the ring many times"
