"""TX kick coalescing of the queue-pair workers (:mod:`pyvirtio.runtime`).

After a drain that moved frames of a stream, the worker asks the driver for its next
kick only once a quarter ring waits (the event index set ahead, read here straight from
guest memory) and looks at the ring after ``tx_coalesce_us`` anyway. Each test runs a
:class:`~pyvirtio.net.device.NetDevice` with its worker thread and the engine's driver
side in one process, split and packed rings. The waits are made long (seconds) where a
test looks at the held state, so that no step races the worker's timer.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np
import pytest

import vqcore
from pyvirtio import runtime
from pyvirtio.backends.loopback import Loopback
from pyvirtio.backends.sink import Sink
from pyvirtio.features import Transport
from pyvirtio.net.device import DEFAULT_FEATURES, NetDevice
from pyvirtio.net.driver import NetDriver

SIZE = 64
QUARTER = SIZE // 4
FRAME = bytes.fromhex("525400123456" "02aabbccdd01" "0800") + bytes(50)
#: a wait no test step comes near: the held state stays put while the test looks at it
LONG_US = 2_000_000
#: a wait no test outlives: a step that passes under it did not pass by the worker's
#: timer (the steps' own bound is wait_for's 5 s)
FOREVER_US = 600_000_000
RING_EVENT_FLAGS_DESC = 2


def wait_for(cond: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.001)


@contextmanager
def rig(ring_kind: str, backend, coalesce_us: int, *, event_idx: bool = True
        ) -> Iterator[tuple[NetDevice, NetDriver]]:
    features = int(DEFAULT_FEATURES) | (int(Transport.RING_PACKED) if ring_kind == "packed" else 0)
    if not event_idx:
        features &= ~int(Transport.EVENT_IDX)
    memory = vqcore.GuestMemory([(0, np.zeros(8 << 20, np.uint8))])
    with backend, NetDevice(backend, queue_size=SIZE, features=features,
                            ctrl_queue=False) as device:
        device.tx_coalesce_us = coalesce_us        # beyond the CLI's bound: the test's wait
        driver = NetDriver(memory, queue_size=SIZE, ctrl=False, tx_buffer=2048)
        driver.attach(device)
        assert driver.packed == (ring_kind == "packed")
        yield device, driver


def tx_packets(device: NetDevice) -> int:
    return device.pair_stats()[0]["tx"]["packets"]


def kick_event(driver: NetDriver) -> int | None:
    """Where the device asked for the TX queue's next kick, as a count of chains made
    available since the start (split: avail_event; packed: the DESC event's slot, laps
    counted from the wrap bit, good for the few laps a test makes; None while the
    worker has kicks disabled, mid-drain)."""
    q = driver.tx[0].queue
    if not driver.packed:
        return int(driver.memory.array(q.used_addr + 4 + 8 * SIZE, 1, "<u2")[0])
    off_wrap, flags = (int(v) for v in driver.memory.array(q.used_addr, 2, "<u2"))
    if flags != RING_EVENT_FLAGS_DESC:
        return None
    return off_wrap & 0x7FFF if off_wrap >> 15 else SIZE + (off_wrap & 0x7FFF)


def send(driver: NetDriver, n: int) -> int:
    """Queue n frames in one add; the kicks this took (0 or 1)."""
    before = driver.tx[0].kicks
    assert driver.send(0, [FRAME] * n) == n
    return driver.tx[0].kicks - before


def test_a_stream_asks_for_the_next_kick_a_quarter_ring_ahead(ring_kind):
    """A drain of several frames (fewer than a quarter ring) holds: the next kick is
    asked for at a quarter ring, an RX-side wake-up keeps that, a quarter ring kicks, and
    a drain that large ends the holding at once (the hold's own wait never ends here).
    (The first send's kick is not checked: a worker still busy with its start-up may
    take the frames before the driver looks, and then no kick is due.)"""
    with rig(ring_kind, Sink(), FOREVER_US) as (device, driver):
        send(driver, 4)
        wait_for(lambda: tx_packets(device) == 4, "4 frames sent")
        wait_for(lambda: kick_event(driver) == 4 + QUARTER - 1, "the kick asked a quarter ahead")
        os.eventfd_write(driver.rx[0].kick_fd, 1)      # the worker woken early (RX side) ...
        time.sleep(0.05)
        assert kick_event(driver) == 4 + QUARTER - 1    # ... holds on, its kick still armed
        assert send(driver, QUARTER) == 1               # a quarter ring kicks
        wait_for(lambda: tx_packets(device) == 4 + QUARTER, "sent on the kick")
        # a drain of a quarter ring or more: kicks are cheap enough per frame already,
        # and holding would only idle the device while a fast driver fills the ring
        wait_for(lambda: kick_event(driver) == 4 + QUARTER, "every kick asked for again")
        assert send(driver, 1) == 1


def test_frames_below_the_count_go_out_when_the_wait_ends(ring_kind):
    """Frames that do not reach the quarter-ring kick are sent when the hold's wait
    ends, without a kick, and being a stream they are held again."""
    with rig(ring_kind, Sink(), LONG_US) as (device, driver):
        send(driver, 4)
        wait_for(lambda: kick_event(driver) == 4 + QUARTER - 1, "held")
        assert send(driver, QUARTER - 1) == 0           # below the count: no kick ...
        wait_for(lambda: tx_packets(device) == 4 + QUARTER - 1, "sent when the wait ended",
                 timeout=2 * LONG_US * 1e-6 + 5)        # ... the worker's timer took them
        done = 4 + QUARTER - 1
        wait_for(lambda: kick_event(driver) == done + QUARTER - 1, "held again (a stream)")


def test_without_event_idx_the_wait_alone_ends_a_hold(ring_kind):
    """Without EVENT_IDX no kick can be asked for a quarter ring ahead: a held stream
    keeps kicks off, and the hold's wait sends what came meanwhile."""
    with rig(ring_kind, Sink(), LONG_US, event_idx=False) as (device, driver):
        assert not driver.tx[0].queue.event_idx
        send(driver, 4)
        wait_for(lambda: tx_packets(device) == 4, "4 frames sent")
        time.sleep(0.05)                                 # the worker is holding now ...
        assert send(driver, QUARTER) == 0                # ... with kicks off, even at a quarter
        assert tx_packets(device) == 4
        wait_for(lambda: tx_packets(device) == 4 + QUARTER, "sent when the wait ended",
                 timeout=2 * LONG_US * 1e-6 + 5)


def break_next_chain(driver: NetDriver) -> None:
    """Make the TX ring's next chain a hostile one (buffer id 0xFFFF, beyond the ring),
    published without a kick."""
    q = driver.tx[0].queue
    mem = driver.memory
    if not driver.packed:
        idx = int(mem.array(q.avail_addr + 2, 1, "<u2")[0])
        mem.array(q.avail_addr + 4 + 2 * (idx % SIZE), 1, "<u2")[0] = 0xFFFF
        mem.array(q.avail_addr + 2, 1, "<u2")[0] = (idx + 1) & 0xFFFF
        return
    slot = q.next_avail & 0x7FFF
    desc = mem.array(q.desc_addr + 16 * slot, 8, "<u2")
    desc[6] = 0xFFFF                                    # id
    wrap = q.next_avail >> 15
    desc[7] = 0x80 if wrap else 0x8000                  # made available for this lap


def test_a_ring_broken_while_holding_ends_the_hold(ring_kind, monkeypatch):
    """The guest breaks its TX ring while the worker holds: the device gives the ring
    up (NEEDS_RESET) and the worker goes back to sleep instead of waking, with nothing
    to do, for a hold whose time has passed."""
    waits: list[float] = []
    real_wait = runtime._wait

    def recorded(ep, timeout):
        waits.append(timeout)
        return real_wait(ep, timeout)

    monkeypatch.setattr(runtime, "_wait", recorded)
    with rig(ring_kind, Sink(), 20_000) as (device, driver):
        send(driver, 4)
        wait_for(lambda: kick_event(driver) == 4 + QUARTER - 1, "held")
        break_next_chain(driver)                        # the hold's timer finds it
        wait_for(lambda: device.needs_reset_reason is not None, "the ring given up")
        # asleep: the worker's last wait has no timeout (a stale hold makes every wait
        # one of 0 s, and the worker spins)
        wait_for(lambda: waits[-1] == -1, "the worker asleep (no timeout)")
        assert "queue pair 0 tx" in device.needs_reset_reason


def test_a_lone_frame_and_a_quiet_ring_ask_for_every_kick(ring_kind):
    """One frame per drain is no stream: the next frame kicks. After a held stream
    whose wait ends with nothing new, the ring asks for every kick again."""
    with rig(ring_kind, Sink(), 20_000) as (device, driver):
        for i in range(1, 4):
            assert send(driver, 1) == 1 or i == 1, i     # once asked for, a kick is due
            wait_for(lambda i=i: tx_packets(device) == i, f"frame {i} sent")
            wait_for(lambda i=i: kick_event(driver) == i, "the next kick asked for at once")
        assert send(driver, 3) == 1
        wait_for(lambda: tx_packets(device) == 6, "6 frames sent")
        wait_for(lambda: kick_event(driver) == 6, "every kick again when the wait ended")
        assert send(driver, 1) == 1


def test_coalescing_off(ring_kind):
    """tx_coalesce_us=0: every drain asks for the very next kick."""
    with rig(ring_kind, Sink(), 0) as (device, driver):
        for i in range(3):
            assert send(driver, 5) == 1 or i == 0, i
            wait_for(lambda i=i: tx_packets(device) == 5 * (i + 1), "frames sent")
            wait_for(lambda i=i: kick_event(driver) == 5 * (i + 1), "the next kick asked for")


def test_no_holding_while_frames_come_in(ring_kind, monkeypatch):
    """RX traffic in the last RX_QUIET means request/response (ACKs, ping replies): the
    replies must not wait, so the drain asks for the next kick at once. (RX_QUIET made
    long here, so that the test's own pace does not matter.)"""
    monkeypatch.setattr(runtime, "RX_QUIET", 60.0)
    with rig(ring_kind, Loopback(), FOREVER_US) as (device, driver):
        device.backend.inject(FRAME)
        got = []
        wait_for(lambda: bool(got.extend(driver.recv(0)) or got), "a frame received")
        send(driver, 4)
        wait_for(lambda: tx_packets(device) == 4, "4 frames sent")
        wait_for(lambda: kick_event(driver) == 4, "the next kick asked for at once")
        assert send(driver, 1) == 1


@pytest.mark.parametrize("us", [-1, runtime.MAX_TX_COALESCE_US + 1])
def test_the_wait_is_bounded(us):
    with Sink() as sink, pytest.raises(ValueError, match="tx_coalesce_us"):
        NetDevice(sink, tx_coalesce_us=us)


def test_frames_held_back_go_out_when_the_worker_stops(ring_kind):
    """A stop while holding (GET_VRING_BASE, a disconnect, a reset) does not strand the
    frames the driver was told would go out soon: the worker drains once more."""
    with rig(ring_kind, Sink(), LONG_US) as (device, driver):
        send(driver, 4)
        wait_for(lambda: kick_event(driver) == 4 + QUARTER - 1, "held")
        assert send(driver, 3) == 0
        assert tx_packets(device) == 4
        worker = device.workers[0]
        worker.stop()
        assert not worker.is_alive()
        assert tx_packets(device) == 7
