"""The C benchmark loops (vqcore.ringbench) move every buffer and leave the rings
consistent; no timing is asserted."""

import numpy as np
import pytest

import vqcore
from vqcore import ringbench
from pyvirtio.bench import engine


@pytest.mark.parametrize("eventfd", [False, True], ids=["busy", "eventfd"])
@pytest.mark.parametrize("event_idx", [False, True], ids=["flags", "event_idx"])
def test_pingpong_moves_every_buffer(eventfd, event_idx):
    ring = engine.make_ring(vqcore, 1, chains=256, event_idx=event_idx)
    total = 300_000
    r = ringbench.pingpong(ring.driver, ring.device, ring.template, total, batch=32,
                           eventfd=eventfd, timeout=60)
    assert r["buffers"] == total and r["seconds"] > 0
    assert ring.driver.num_free == 256 and ring.driver.in_flight == 0
    assert ring.device.in_flight == 0
    assert ring.driver.next_avail == total % 65536 == ring.device.next_avail
    assert ring.device.next_used == total % 65536 == ring.driver.last_used
    if eventfd:
        # notifications are batched: far fewer than one per buffer, but some
        assert 0 < r["kicks"] < total // 8 and 0 < r["calls"] < total // 8


def test_device_loop_replays_the_ring():
    ring = engine.make_ring(vqcore, 1, chains=256)
    engine._fill_avail_for_replay(ring, False)
    b = vqcore.ChainBatch(32)
    secs = ringbench.device_loop(ring.device, b, 1000, 32)
    assert secs > 0
    assert ring.device.next_avail == 32000 % 65536 == ring.device.next_used
    used = ring.memory.array(ring.addrs.used, 2, np.uint16)
    assert used[1] == 32000 % 65536


def test_complete_all_returns_every_chain():
    ring = engine.make_ring(vqcore, 2, chains=16)
    assert ring.driver.add(ring.template) == 16
    a = ring.addrs
    assert ringbench.complete_all(ring.memory, a.avail, a.used, ring.size) == 16
    out = vqcore.ChainBatch(16)
    assert ring.driver.reclaim(out) == 16
    assert sorted(out.tokens.tolist()) == list(range(16))
    assert ring.driver.num_free == ring.size


def test_pingpong_reports_a_broken_ring():
    ring = engine.make_ring(vqcore, 1, chains=16)
    # buffers outside guest memory: the device fails, the driver thread is told to stop
    bad = vqcore.ChainBatch(16)
    for i in range(16):
        bad.append([(1 << 40, 64)], token=i)
    with pytest.raises(ringbench.PingPongError, match="device rc=-10"):
        ringbench.pingpong(ring.driver, ring.device, bad, 1000, timeout=30)
    assert ring.device.broken
