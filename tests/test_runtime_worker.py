"""The queue-pair worker's control calls (:class:`pyvirtio.runtime.QueuePairWorker`):
``wake`` and ``stop`` from other threads, during and after a stop; a worker whose loop
fails, and one stuck on a peer's eventfd."""

from __future__ import annotations

import logging
import os
import threading
import time

import numpy as np

from pyvirtio import runtime
from pyvirtio.runtime import QueuePairConfig, QueuePairWorker
from vqcore import ChainBatch, GuestMemory, SplitDeviceQueue, SplitDriverQueue, split_addresses
from vqcore.net import DISCARD_FD


def idle_worker() -> tuple[QueuePairWorker, int]:
    """A worker with no rings (it sleeps on its stop eventfd alone) and the stand-in
    packet fd its config names (the caller closes it)."""
    fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    worker = QueuePairWorker(QueuePairConfig(index=0, rx=None, tx=None, fd=fd,
                                             rx_kick=-1, tx_kick=-1))
    return worker, fd


def test_wake_after_stop_never_writes_to_a_reused_fd_number():
    worker, packet_fd = idle_worker()
    worker.start()
    number = worker._stop_fd
    worker.stop()
    assert not worker.is_alive()
    reused = []
    try:
        while True:                     # take fd numbers until the closed one comes back
            fd = os.eventfd(0, os.EFD_NONBLOCK)
            reused.append(fd)
            if fd == number or len(reused) > 64:
                break
        assert reused[-1] == number
        worker.wake()
        worker.stop()                   # a second stop does nothing
        try:
            count = os.eventfd_read(number)
        except BlockingIOError:
            count = 0
        assert count == 0               # nothing was written to the new owner's eventfd
    finally:
        for fd in reused:
            os.close(fd)
        os.close(packet_fd)


def race_once() -> None:
    """Wakes from three threads while this one stops the worker."""
    worker, packet_fd = idle_worker()
    worker.start()
    errors: list[BaseException] = []
    go = threading.Event()

    def waker() -> None:
        go.wait()
        try:
            for _ in range(200):
                worker.wake()
        except BaseException as exc:           # noqa: BLE001 (reported below)
            errors.append(exc)

    threads = [threading.Thread(target=waker) for _ in range(3)]
    for t in threads:
        t.start()
    go.set()
    worker.stop()
    for t in threads:
        t.join(5)
    os.close(packet_fd)
    assert not errors
    assert not worker.is_alive() and worker.error is None
    assert worker._stop_fd == -1


def test_wake_and_stop_race_from_many_threads():
    """Wakes from several threads while another stops the worker: no error, no hang,
    the worker ends and its eventfd is closed once."""
    for _ in range(20):
        race_once()


# ---- a worker that fails, a worker stuck on a peer's eventfd --------------------------------

EVENTFD_MAX = 0xFFFFFFFFFFFFFFFE


class Rings:
    """One RX/TX pair of split rings in numpy memory, the driver side of TX, and the
    eventfds a worker config names (kicks, calls, errors)."""

    def __init__(self) -> None:
        self.mem = GuestMemory([(0, np.zeros(1 << 20, np.uint8))])
        self.rx = SplitDeviceQueue(self.mem, 64, *split_addresses(0x1000, 64)[:3],
                                   event_idx=False)
        tx = split_addresses(0x4000, 64)
        self.tx = SplitDeviceQueue(self.mem, 64, *tx[:3], event_idx=False)
        self.driver = SplitDriverQueue(self.mem, 64, *tx[:3], event_idx=False)
        self.fds = {k: os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
                    for k in ("rx_kick", "tx_kick", "rx_err", "tx_err", "packet")}
        self.broken: list[str] = []

    def config(self, **kw) -> QueuePairConfig:
        f = self.fds
        return QueuePairConfig(index=0, rx=self.rx, tx=self.tx, fd=f["packet"],
                               tx_fd=DISCARD_FD, rx_kick=f["rx_kick"], tx_kick=f["tx_kick"],
                               rx_err=f["rx_err"], tx_err=f["tx_err"], tx_coalesce_us=0,
                               on_violation=lambda i, which, exc: self.broken.append(which),
                               **kw)

    def send(self) -> None:
        """One 72-byte frame (header and 60 bytes) on TX, and a kick."""
        b = ChainBatch(1)
        b.append(readable=[(0x10000, 72)], token=1)
        assert self.driver.add(b) == 1
        os.eventfd_write(self.fds["tx_kick"], 1)

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)


def test_a_failing_worker_marks_its_rings_broken_and_ends(monkeypatch, caplog):
    """Whatever makes the loop fail (here a burst that raises), the worker logs one
    line, reports both rings broken (the device sets NEEDS_RESET), signals their error
    fds and ends; it keeps the exception without a traceback (whose frames would keep
    the queues and their memory alive)."""
    def boom(*args, **kwargs):
        raise RuntimeError("boom")
    monkeypatch.setattr(runtime, "tx_burst", boom)
    rings = Rings()
    worker = QueuePairWorker(rings.config())
    with caplog.at_level(logging.INFO, logger="pyvirtio.runtime"):
        worker.start()
        rings.send()
        worker.join(5)
    try:
        assert not worker.is_alive()
        assert sorted(rings.broken) == ["rx", "tx"]
        assert os.eventfd_read(rings.fds["rx_err"]) == 1
        assert os.eventfd_read(rings.fds["tx_err"]) == 1
        assert isinstance(worker.error, RuntimeError) and worker.error.__traceback__ is None
        errors = [r for r in caplog.records if r.levelno >= logging.WARNING]
        assert len(errors) == 1 and "RuntimeError: boom" in errors[0].getMessage()
        assert "Traceback" not in caplog.text
        worker.stop()                             # a dead worker stops at once
    finally:
        rings.close()


def test_stop_frees_a_worker_blocked_on_a_peers_full_eventfd():
    """A peer that cleared O_NONBLOCK on its call eventfd and filled its counter blocks
    the worker's interrupt write (in C, without the GIL): stop() unblocks it by
    reading the counter and the worker ends."""
    rings = Rings()
    call = os.eventfd(0)                          # blocking, as the peer left it
    os.eventfd_write(call, EVENTFD_MAX)
    worker = QueuePairWorker(rings.config(tx_call=call))
    try:
        worker.start()
        rings.send()
        deadline = time.monotonic() + 5
        while rings.tx.next_avail == 0 and time.monotonic() < deadline:
            time.sleep(0.01)                      # the frame is taken, the write blocks
        time.sleep(0.1)
        assert worker.is_alive()
        t0 = time.monotonic()
        worker.stop(timeout=5)
        assert not worker.is_alive()
        assert time.monotonic() - t0 < 2
    finally:
        os.close(call)
        rings.close()
