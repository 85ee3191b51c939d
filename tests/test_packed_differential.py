"""Differential tests of the packed ring: the Cython engine against vqcore.model_packed.

The harness of test_model_differential.py runs here with ``layout="packed"``: every
operation goes to four worlds (engine driver + engine device, model + model, and the two
mixed pairs on one memory each), which must agree on every return value or exception
(class, code, index, address, length), every batch, the queues' state and every byte of
guest memory (descriptor ring, event areas, indirect tables); the harness's own FIFO
account checks the reference world. Then hostile packed rings (random descriptors with
random AVAIL/USED bits, ids, NEXT runs and indirect tables, from any position and wrap
counter) and hostile used descriptors (for the driver) must get the same answer from
engine and model.
"""

from __future__ import annotations

import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from conftest import PACKED_IMPLEMENTATIONS, build_guest
from test_model_differential import DATA_SIZE, Harness, outcome, popped_snapshot, \
    reclaimed_snapshot, run_random_ops
from vqcore.errors import (InvalidUsedId, InvalidUsedLength, QueueBroken, RingViolation)

NEXT, WRITE, INDIRECT = 1, 2, 4
AVAIL, USED = 1 << 7, 1 << 15


@pytest.mark.parametrize("event_idx", [False, True], ids=["flags", "event_idx"])
@pytest.mark.parametrize("size", [1, 2, 7, 64])
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_packed_random_operation_sequences(size, event_idx, data):
    indirect_max = data.draw(st.sampled_from(sorted({0, 1, min(4, size), min(size, 8)})),
                             label="indirect_max")
    h = Harness(size, event_idx, indirect_max, layout="packed")
    run_random_ops(h, data, data.draw(st.integers(10, 60), label="steps"))
    # drain: everything offered comes back, in every world alike
    while h.offered or h.held or h.used:
        h.pop(h.size)
        heads = sorted(h.held)
        h.push(heads, [h.held[x][1] for x in heads])
        h.reclaim(h.size)
    assert h.ref.drv.num_free == size and h.ref.dev.in_flight == 0


def test_packed_long_sequence_many_laps():
    """Thousands of chains through a 100-slot ring (hundreds of laps, both wrap
    counters flipping), batches of random sizes, chains of 1..4 segments, direct and
    indirect, completed in random order, suppression toggled on the way."""
    size, indirect_max = 100, 4
    h = Harness(size, True, indirect_max, layout="packed")
    rng = np.random.default_rng(2026)
    data_addr = h.ref.guest.data_addr
    total = slots = 0
    while total < 12_000:
        m = int(rng.integers(1, size // 2))
        indirect = bool(rng.random() < 0.3)
        nseg = rng.integers(1, 5, m)
        offs = rng.integers(0, DATA_SIZE - 64, int(nseg.sum()))
        lens = rng.integers(0, 65, int(nseg.sum()))
        nread = rng.integers(0, nseg + 1)
        chains, s = [], 0
        for c in range(m):
            segs = [(data_addr + int(o), int(n)) for o, n in zip(offs[s:s + nseg[c]],
                                                                 lens[s:s + nseg[c]])]
            chains.append((segs[:nread[c]], segs[nread[c]:]))
            s += nseg[c]
        added = h.add(chains, indirect=indirect, use_load=True)[1]
        total += added
        slots += added if indirect else int(nseg[:added].sum())
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
    assert slots > 100 * size
    laps, pos = divmod(slots, size)
    assert h.ref.drv.next_avail == h.ref.dev.next_used == pos | (1 ^ laps & 1) << 15
    assert h.ref.drv.num_free == size


# ---- hostile rings: engine and model give the same verdict ------------------------------------

def packed_hostile_guest(seed=0):
    """Size-8 packed ring with an 8x8 indirect area and a data area, plus a region
    adjacent to it and one after a gap (buffers and tables may straddle them)."""
    g = build_guest(8, data_size=8192, indirect_max=8, seed=seed, layout="packed")
    top = g.base + g.buffer.size
    g.extra = [np.full(4096, 0x5A, np.uint8), np.full(4096, 0xA5, np.uint8)]
    g.memory.add_region(top, g.extra[0])                  # adjacent
    g.memory.add_region(top + 8192, g.extra[1])           # after a 4 KiB gap
    g.top = top
    return g


def put_pdesc(g, gpa, addr, length, id_, flags):
    g.at(gpa, 16)[:] = np.frombuffer(struct.pack("<QIHH", addr % 2**64, length % 2**32,
                                                 id_ % 2**16, flags % 2**16), np.uint8)


def image(g):
    return g.buffer.tobytes() + g.extra[0].tobytes() + g.extra[1].tobytes()


def pdesc_strategy(g):
    addrs = st.sampled_from([g.data_addr, g.data_addr + 100, g.indirect_addr,
                             g.indirect_addr + 128, g.indirect_addr + 1000, g.top - 8,
                             g.top - 16, g.top + 4096 - 8, g.top + 8192, g.top + 4096, 0,
                             2**64 - 16, 2**64 - 1])
    lens = st.sampled_from([0, 1, 8, 16, 32, 48, 128, 144, 4096, 0xFFFFFFFF])
    ids = st.sampled_from([0, 1, 2, 3, 5, 7, 8, 9, 0xFFFF])
    # NEXT / WRITE / INDIRECT, and the AVAIL/USED pair in any of its four states
    flags = st.builds(lambda low, pair: low | pair, st.integers(0, 7),
                      st.sampled_from([AVAIL, USED, 0, AVAIL | USED, AVAIL, USED]))
    return st.tuples(addrs, lens, ids, flags)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_random_packed_rings_agree(data):
    proto = packed_hostile_guest()
    ring = data.draw(st.lists(pdesc_strategy(proto), min_size=8, max_size=8))
    indirect = data.draw(st.lists(pdesc_strategy(proto), min_size=16, max_size=16))
    start = data.draw(st.integers(0, 7)) | data.draw(st.sampled_from([0, 0x8000]))
    max_chains = data.draw(st.integers(1, 9))
    max_segments = data.draw(st.sampled_from([None, 1, 3, 8]))
    event_idx = data.draw(st.booleans())
    runs = {}
    for name, impl in PACKED_IMPLEMENTATIONS.items():
        g = packed_hostile_guest()
        for i, d in enumerate(ring):
            put_pdesc(g, g.ring.desc + 16 * i, *d)
        for i, d in enumerate(indirect):
            put_pdesc(g, g.indirect_addr + 16 * i, *d)
        dev = g.device(impl, event_idx=event_idx)
        dev.next_avail = dev.next_used = start
        batch = impl.ChainBatch(max_chains, max_segments)
        steps = []
        for _ in range(2):
            steps.append((outcome(lambda: dev.pop(batch)), popped_snapshot(g, batch),
                          dev.broken, dev.in_flight, dev.next_avail, dev.violations,
                          dev.pending()))
            got = batch.heads.tolist()
            steps.append((outcome(lambda: dev.push(got, [1] * len(got))), dev.next_used,
                          outcome(dev.needs_notification)))
        runs[name] = steps, image(g)
    assert runs["engine"] == runs["model"]
    for res, snap, broken, *_ in runs["engine"][0][::2]:         # the two pops
        violation = res[0] == "raise" and issubclass(res[1], RingViolation)
        assert broken == (violation or res[1] is QueueBroken)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_random_used_descriptors_agree(data):
    """A hostile device writes any used descriptors (ids, lengths, WRITE, AVAIL/USED in
    any state) over the ring; the drivers reclaim twice and add again, alike."""
    size = 8
    nchains = data.draw(st.integers(1, size // 2))          # two descriptors each
    wlens = data.draw(st.lists(st.sampled_from([0, 1, 16, 100]), min_size=nchains,
                               max_size=nchains))
    used = data.draw(st.lists(st.tuples(
        st.sampled_from([0, 1, 2, 3, 4, 7, 8, 0xFFFF]),
        st.sampled_from([0, 1, 16, 17, 100, 101, 2**32 - 1]),
        st.sampled_from([AVAIL | USED, AVAIL | USED | WRITE, 0, WRITE, AVAIL, USED | WRITE])),
        min_size=size, max_size=size))
    max_chains = data.draw(st.integers(1, size + 1))
    runs = {}
    for name, impl in PACKED_IMPLEMENTATIONS.items():
        g = build_guest(size, data_size=4096, layout="packed")
        drv = g.driver(impl)
        batch = impl.ChainBatch(nchains)
        for i, n in enumerate(wlens):
            batch.append(readable=[(g.data_addr, 8)], writable=[(g.data_addr + 64, n)],
                         token=1000 + i)
        assert drv.add(batch) == nchains
        for k, (i, n, f) in enumerate(used):
            put_pdesc(g, g.ring.desc + 16 * k, 0, n, i, f)
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
        assert first[1] in (InvalidUsedId, InvalidUsedLength) and broken
        assert runs["engine"][0][1][0][:3] == ("raise", QueueBroken, -22)
        assert runs["engine"][0][2][:3] == ("raise", QueueBroken, -22)
