"""The queue-pair worker's control calls (:class:`pyvirtio.runtime.QueuePairWorker`):
``wake`` and ``stop`` from other threads, during and after a stop."""

from __future__ import annotations

import os
import threading

from pyvirtio.runtime import QueuePairConfig, QueuePairWorker


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
