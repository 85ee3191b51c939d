"""The virtio-rng device core (pyvirtio.rng): an in-process driver (RngDriver over a
vqcore driver queue in the same numpy guest memory) brings the device up and reads
from it, for split and packed rings; the rate limit, the worker's life cycle (no thread
or fd left behind), a disabled ring, a broken ring, a failing source, and the failure
discipline of runtime.Worker."""

from __future__ import annotations

import logging
import os
import select
import threading
import time

import numpy as np
import pytest

import vqcore
from vqcore import ChainBatch
from pyvirtio.device import Vring
from pyvirtio.features import Transport
from pyvirtio.rng import DEFAULT_FEATURES, VIRTIO_ID_RNG, RngDevice, RngDriver, TokenBucket
from pyvirtio.rng import device as rng_device
from pyvirtio.status import DeviceStateError, DeviceStatus

EVENT_IDX = int(Transport.EVENT_IDX)
PACKED = int(Transport.RING_PACKED)
V1 = int(Transport.VERSION_1)
EVENTFD_MAX = 0xFFFFFFFFFFFFFFFE
QSIZE = 64


def open_fds() -> set[int]:
    return {int(x) for x in os.listdir("/proc/self/fd")}


def rng_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("vq-rng")]


def guest_memory(size: int = 4 << 20) -> vqcore.GuestMemory:
    return vqcore.GuestMemory([(0, np.zeros(size, np.uint8))])


def readable(fd: int) -> bool:
    return bool(select.select([fd], [], [], 0)[0])


def wait_for(cond, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


@pytest.fixture
def source_file(tmp_path):
    """``source_file(n)``: path of a file of ``n`` known bytes, and the bytes."""
    def make(n: int, seed: int = 3):
        data = np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()
        path = tmp_path / f"entropy-{n}-{seed}"
        path.write_bytes(data)
        return path, data
    return make


@pytest.fixture(params=[("split", False), ("split", True), ("packed", False), ("packed", True)],
                ids=["split", "split-event_idx", "packed", "packed-event_idx"])
def ring_features(request) -> int:
    kind, event_idx = request.param
    return V1 | (PACKED if kind == "packed" else 0) | (EVENT_IDX if event_idx else 0)


@pytest.fixture
def eventfds():
    """``eventfds(n, blocking=False)``: new eventfds, closed after the test."""
    made: list[int] = []

    def make(n: int, blocking: bool = False) -> list[int]:
        flags = os.EFD_CLOEXEC | (0 if blocking else os.EFD_NONBLOCK)
        fds = [os.eventfd(0, flags) for _ in range(n)]
        made.extend(fds)
        return fds

    yield make
    for fd in made:
        os.close(fd)


# ---- the device -------------------------------------------------------------------------------

def test_the_device_is_what_section_5_4_says():
    with RngDevice() as dev:
        assert dev.device_id == VIRTIO_ID_RNG == 4
        assert dev.num_queues == 1 and dev.config_size == 0
        assert dev.device_features == int(DEFAULT_FEATURES) == int(
            Transport.VERSION_1 | Transport.EVENT_IDX | Transport.INDIRECT_DESC
            | Transport.RING_PACKED)
        assert dev.source == "/dev/urandom" and dev.bucket is None
        assert dev.stats() == {"requests": 0, "bytes": 0, "bursts": 0, "notifications": 0,
                               "errors": 0, "read_errors": 0, "throttled": 0}


def test_bad_arguments_leak_nothing(tmp_path):
    before = open_fds()
    for rate in (0, -5, float("inf")):
        with pytest.raises(ValueError):
            RngDevice(max_bytes_per_s=rate)
    with pytest.raises(FileNotFoundError):
        RngDevice(source=tmp_path / "missing")
    with pytest.raises(vqcore.LayoutError):
        RngDevice(queue_size=100)
    assert open_fds() == before


def test_requests_are_filled_from_the_source(ring_features, source_file):
    path, data = source_file(1 << 20)
    with RngDevice(source=path, queue_size=QSIZE) as dev:
        drv = RngDriver(guest_memory(), queue_size=QSIZE, buffer_size=1000)
        assert drv.attach(dev, ring_features) == ring_features
        got = drv.read(200_000)
        assert got == data[:200_000]            # in order, byte exact
        st = dev.stats()
        assert st["bytes"] >= 200_000 and st["requests"] >= 200 and st["errors"] == 0
        assert dev.status & DeviceStatus.DRIVER_OK
        assert not dev.status & DeviceStatus.DEVICE_NEEDS_RESET


def test_urandom_by_default():
    with RngDevice(queue_size=QSIZE) as dev:
        drv = RngDriver(guest_memory(), queue_size=QSIZE)
        drv.attach(dev)
        got = drv.read(1 << 16)
        assert len(got) == 1 << 16
        assert len(set(got)) > 200 and got != bytes(len(got))


def test_partial_requests_sizes_are_respected(source_file):
    path, data = source_file(4096)
    with RngDevice(source=path, queue_size=QSIZE) as dev:
        drv = RngDriver(guest_memory(), queue_size=QSIZE, buffer_size=256)
        drv.attach(dev)
        assert drv.request(count=5, size=32) == 5
        got = []
        assert wait_for(lambda: got.extend(drv.collect()) or len(got) == 5)
        assert got == [data[32 * i:32 * (i + 1)] for i in range(5)]


# ---- the rate limit ---------------------------------------------------------------------------

def test_token_bucket_arithmetic():
    now = [100.0]
    b = TokenBucket(1000, clock=lambda: now[0])
    assert b.capacity == 1000 and b.available() == 1000      # one second's worth, full
    b.consume(1000)
    assert b.available() == 0 and b.wait_time() == pytest.approx(b.grant / 1000)
    now[0] += 0.25
    assert b.available() == 250                               # refilled continuously
    now[0] += 10
    assert b.available() == 1000                              # never beyond a second's worth
    small = TokenBucket(10, clock=lambda: now[0])
    assert small.capacity == 64 and small.available() == 64   # at least 64 bytes
    assert small.grant == 64
    assert TokenBucket(65536).grant == 655                    # at most ~100 waits a second


def test_the_rate_limit_bounds_what_the_guest_gets(source_file):
    """max_bytes_per_s=65536: bytes delivered never pass a full bucket (one second's
    worth) plus what accrued since the bucket was made, so 256 KiB take at least three
    seconds' worth of budget; no request is completed empty; the worker waits for the
    budget instead of spinning: with requests larger than the budget it waits for
    (4 KiB here, 64 of them), at most about THROTTLE_HZ times a second."""
    rate, want = 65536, 256 << 10
    path, data = source_file(want + (1 << 16))
    t0 = time.monotonic()
    with RngDevice(source=path, queue_size=QSIZE, max_bytes_per_s=rate) as dev:
        drv = RngDriver(guest_memory(), queue_size=QSIZE, buffer_size=4096)
        drv.attach(dev)
        got = bytearray()
        samples = []
        deadline = time.monotonic() + 30
        while len(got) < want and time.monotonic() < deadline:
            drv.request()
            for chunk in drv.collect(0.2):
                assert len(chunk) > 0               # never completed empty
                got += chunk
            samples.append((time.monotonic(), len(got)))
        elapsed = time.monotonic() - t0
        assert len(got) >= want
        assert bytes(got) == data[:len(got)]
        for t, n in samples:
            assert n <= rate + rate * (t - t0), (t - t0, n)
        assert elapsed >= (want - rate) / rate                # follows from the bound
        st = dev.stats()
        assert st["throttled"] > 0
        assert st["throttled"] <= rng_device.THROTTLE_HZ * elapsed + 10
        assert not dev.status & DeviceStatus.DEVICE_NEEDS_RESET


# ---- life cycle: nothing left behind ---------------------------------------------------------

def test_stop_start_close_leave_no_threads_or_fds(ring_features, source_file):
    path, data = source_file(1 << 16)
    before_fds, before_threads = open_fds(), set(threading.enumerate())
    dev = RngDevice(source=path, queue_size=QSIZE)
    drv = RngDriver(guest_memory(), queue_size=QSIZE, buffer_size=512)
    drv.attach(dev, ring_features)
    assert len(rng_threads()) == 1
    assert drv.read(1024) == data[:1024]
    dev.stop_queue()
    drv.collect()                               # (the rest of what the device filled)
    used = dev.stats()["bytes"]
    assert rng_threads() == []
    dev.stop_queue()                            # a second stop does nothing
    drv.request(count=2)                        # requests while stopped wait in the ring
    dev.start_queue()
    dev.start_queue()                           # a second start replaces the worker
    assert len(rng_threads()) == 1
    assert drv.read(1024) == data[used:used + 1024]
    dev.write_status(0)                         # reset stops the worker too
    assert rng_threads() == [] and dev.worker is None
    dev.close()
    dev.close()
    assert set(threading.enumerate()) == before_threads
    assert open_fds() == before_fds
    with pytest.raises(DeviceStateError):
        dev.start_queue()


def test_start_queue_without_a_running_queue_is_refused():
    with RngDevice() as dev:
        with pytest.raises(DeviceStateError):
            dev.start_queue()


def test_a_transports_vring_with_its_own_fds(source_file, eventfds):
    """What the vhost-user adapter does: the device's queue (built by the transport)
    served through eventfds the transport owns; the device closes none of them."""
    path, data = source_file(1 << 16)
    kick, call, err = eventfds(3)
    with RngDevice(source=path, queue_size=QSIZE) as dev:
        drv = RngDriver(guest_memory(), queue_size=QSIZE, buffer_size=512)
        drv.attach(dev)
        dev.stop_queue()
        drv.kick_fd, drv.call_fd = kick, call
        dev.start_queue(Vring(0, dev.queues[0], kick_fd=kick, call_fd=call, err_fd=err))
        assert drv.read(4096) == data[:4096]
    for fd in (kick, call, err):
        os.fstat(fd)                            # still open: they are the transport's


def test_a_disabled_ring_completes_nothing_until_enabled(source_file, eventfds):
    path, data = source_file(1 << 16)
    kick, call = eventfds(2)
    with RngDevice(source=path, queue_size=QSIZE) as dev:
        drv = RngDriver(guest_memory(), queue_size=QSIZE, buffer_size=512)
        drv.attach(dev)
        dev.stop_queue()
        drv.kick_fd, drv.call_fd = kick, call
        dev.start_queue(Vring(0, dev.queues[0], kick, call, enabled=False))
        assert drv.request(count=4) == 4
        os.eventfd_write(kick, 1)
        time.sleep(0.2)
        assert drv.collect() == [] and dev.queues[0].in_flight == 0
        assert dev.stats()["requests"] == 0
        dev.set_ring_enabled(0, True)
        got = []
        assert wait_for(lambda: got.extend(drv.collect()) or len(got) == 4)
        assert b"".join(got) == data[:2048]


def test_poll_mode_and_no_kick_fd_serve_without_kicks(source_file):
    path, data = source_file(1 << 16)
    with RngDevice(source=path, queue_size=QSIZE, poll=True) as dev:
        drv = RngDriver(guest_memory(), queue_size=QSIZE, buffer_size=512)
        drv.attach(dev)
        drv.kick_fd = -1                        # this guest never kicks
        assert drv.read(8192, timeout=5) == data[:8192]
    path2, data2 = source_file(1 << 16, seed=4)
    with RngDevice(source=path2, queue_size=QSIZE) as dev:
        drv = RngDriver(guest_memory(), queue_size=QSIZE, buffer_size=512)
        drv.attach(dev)
        dev.stop_queue()
        dev.start_queue(Vring(0, dev.queues[0], kick_fd=-1, call_fd=dev.call_fds[0]))
        drv.kick_fd = -1
        assert drv.read(8192, timeout=5) == data2[:8192]


# ---- the source: end of file, nothing to read ------------------------------------------------

def test_a_source_at_end_of_file_breaks_nothing(source_file, caplog, monkeypatch):
    monkeypatch.setattr(rng_device, "SOURCE_RETRY", 0.02)
    path, data = source_file(100)
    caplog.set_level(logging.WARNING, logger="pyvirtio.rng.device")
    with RngDevice(source=path, queue_size=QSIZE) as dev:
        drv = RngDriver(guest_memory(), queue_size=QSIZE, buffer_size=64)
        drv.attach(dev)
        drv.request(count=4)
        got = []
        assert wait_for(lambda: got.extend(drv.collect()) or len(got) == 2)
        assert got == [data[:64], data[64:100]]
        assert wait_for(lambda: dev.stats()["read_errors"] >= 3)      # retried, counted
        assert drv.collect() == []                                   # the rest wait
        assert dev.queues[0].in_flight == 0 and not dev.queues[0].broken
        assert not dev.status & DeviceStatus.DEVICE_NEEDS_RESET
        lines = [r for r in caplog.records if "entropy source" in r.getMessage()]
        assert len(lines) == 1 and "end of file" in lines[0].getMessage()


def test_a_source_with_nothing_to_read_wakes_the_worker_when_it_has(tmp_path):
    """A FIFO: EAGAIN leaves the requests waiting; the worker sleeps on the source and
    fills them as soon as bytes arrive (no kick, no timer)."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with RngDevice(source=fifo, queue_size=QSIZE) as dev:
        writer = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            drv = RngDriver(guest_memory(), queue_size=QSIZE, buffer_size=64)
            drv.attach(dev)
            drv.request(count=3)
            time.sleep(0.1)
            assert drv.collect() == [] and dev.stats()["read_errors"] == 0
            os.write(writer, b"x" * 100)
            got = []
            assert wait_for(lambda: got.extend(drv.collect()) or len(got) == 2)
            assert got == [b"x" * 64, b"x" * 36]
            os.write(writer, b"y" * 64)
            assert wait_for(lambda: got.extend(drv.collect()) or len(got) == 3)
            assert got[2] == b"y" * 64
        finally:
            os.close(writer)


# ---- a broken ring, a failing worker, a stuck one --------------------------------------------

def offer_hostile_request(drv: RngDriver) -> None:
    """A request whose buffer lies outside guest memory, and a kick."""
    b = ChainBatch(1)
    b.append(writable=[(0xDEAD_0000_0000, 64)], token=0)
    assert drv.queue.add(b) == 1
    os.eventfd_write(drv.kick_fd, 1)


def test_a_broken_ring_sets_needs_reset_and_signals_the_err_fd(ring_features, eventfds,
                                                              caplog):
    kick, call, err = eventfds(3)
    with RngDevice(queue_size=QSIZE) as dev:
        changes = []
        dev.config_change_callback = lambda: changes.append(1)
        drv = RngDriver(guest_memory(), queue_size=QSIZE)
        drv.attach(dev, ring_features)
        dev.stop_queue()
        drv.kick_fd, drv.call_fd = kick, call
        dev.start_queue(Vring(0, dev.queues[0], kick, call, err))
        offer_hostile_request(drv)
        assert select.select([err], [], [], 5)[0] and os.eventfd_read(err) == 1
        # (set before the signal: whoever the error fd wakes sees it)
        assert dev.status & DeviceStatus.DEVICE_NEEDS_RESET
        assert "request queue" in dev.needs_reset_reason
        assert "outside guest memory" in dev.needs_reset_reason
        assert changes == [1] and dev.queues[0].broken
        worker = dev.worker
        assert worker.is_alive() and worker.error is None   # idle, not failed
        # a new worker over the broken ring reports nothing again
        dev.start_queue(Vring(0, dev.queues[0], kick, call, err))
        time.sleep(0.05)
        assert not readable(err)
    # the in-process path too (no err fd): the device needs a reset
    with RngDevice(queue_size=QSIZE) as dev:
        drv = RngDriver(guest_memory(), queue_size=QSIZE)
        drv.attach(dev, ring_features)
        offer_hostile_request(drv)
        assert wait_for(lambda: dev.status & DeviceStatus.DEVICE_NEEDS_RESET)
        dev.write_status(0)                   # the driver resets: back to work
        drv2 = RngDriver(guest_memory(), queue_size=QSIZE)
        drv2.attach(dev, ring_features)
        assert len(drv2.read(1000)) == 1000


def test_a_failing_worker_reports_its_ring_broken_and_ends(monkeypatch, eventfds, caplog):
    """runtime.Worker's failure discipline: whatever makes the loop fail (here a burst
    that raises), the worker logs one line, signals the error fd, the device needs a
    reset, and the worker ends keeping its exception without a traceback."""
    def boom(*args, **kwargs):
        raise RuntimeError("boom")
    kick, call, err = eventfds(3)
    caplog.set_level(logging.INFO, logger="pyvirtio.runtime")
    with RngDevice(queue_size=QSIZE) as dev:
        drv = RngDriver(guest_memory(), queue_size=QSIZE)
        drv.attach(dev)
        dev.stop_queue()
        monkeypatch.setattr(rng_device, "fill_burst", boom)
        dev.start_queue(Vring(0, dev.queues[0], kick, call, err))
        worker = dev.worker
        drv.kick_fd = kick
        drv.request(count=1)
        os.eventfd_write(kick, 1)
        worker.join(5)
        assert not worker.is_alive()
        assert os.eventfd_read(err) == 1
        assert dev.status & DeviceStatus.DEVICE_NEEDS_RESET
        assert "boom" in dev.needs_reset_reason
        assert isinstance(worker.error, RuntimeError) and worker.error.__traceback__ is None
        errors = [r for r in caplog.records
                  if r.levelno >= logging.ERROR and r.name == "pyvirtio.runtime"]
        assert len(errors) == 1 and "RuntimeError: boom" in errors[0].getMessage()
        assert "Traceback" not in caplog.text
        t0 = time.monotonic()
        dev.stop_queue()                           # a dead worker stops at once
        assert time.monotonic() - t0 < 1


def test_stop_frees_a_worker_blocked_on_a_peers_full_call_eventfd(eventfds):
    """A peer that cleared O_NONBLOCK on its call eventfd and filled its counter blocks
    the burst's interrupt write (in C, without the GIL): stop_queue() unblocks it."""
    kick, err = eventfds(2)
    (call,) = eventfds(1, blocking=True)
    os.eventfd_write(call, EVENTFD_MAX)
    with RngDevice(queue_size=QSIZE) as dev:
        drv = RngDriver(guest_memory(), queue_size=QSIZE)
        drv.attach(dev, V1)                     # no event index: every burst interrupts
        dev.stop_queue()
        dev.start_queue(Vring(0, dev.queues[0], kick, call, err))
        drv.kick_fd = kick
        drv.queue.enable_interrupts()
        drv.request(count=1)
        os.eventfd_write(kick, 1)
        assert wait_for(lambda: dev.stats()["requests"] == 1)
        time.sleep(0.1)
        worker = dev.worker
        assert worker.is_alive()
        t0 = time.monotonic()
        dev.stop_queue()
        assert not worker.is_alive() and time.monotonic() - t0 < 2
    assert rng_threads() == []

