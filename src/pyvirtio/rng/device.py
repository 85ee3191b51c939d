"""The virtio-rng device core: one request queue whose buffers a worker thread fills
from an entropy source (``/dev/urandom`` by default), optionally rate-limited.

VIRTIO 1.2 section 5.4: device id 4, one virtqueue (requestq), no feature bits of its
own, no configuration space. The driver offers device-writable buffers; the device
writes random bytes into them and returns each with the number of bytes written (at
most the buffer's size, possibly fewer).

The device knows no transport: a Python VMM or a test drives it in process (its own
kick and call eventfds, :meth:`~pyvirtio.device.VirtioDevice.write_status` with
DRIVER_OK starts the worker over queue 0); a transport adapter (vhost-user) calls
:meth:`RngDevice.start_queue` with a :class:`~pyvirtio.device.Vring` of its own.

The worker (:class:`RngWorker`) runs the race-free loop of DESIGN.md around one
:func:`vqcore.fill.fill_burst` call per burst (no Python per request): disable
notifications, fill, enable, and fill again if requests arrived meanwhile; only then
sleep on the kick eventfd. With ``max_bytes_per_s`` a :class:`TokenBucket` bounds the
bytes delivered; a worker whose budget ran out leaves the requests in the ring (none is
completed empty) and sleeps until enough budget returns. A source that fails or hits
end of file breaks nothing: the requests wait, the failure is counted
(``read_errors``) and logged once, and the source is tried again every
:data:`SOURCE_RETRY` seconds.
"""

from __future__ import annotations

import logging
import math
import os
import select
import threading
import time
from typing import Callable

from vqcore import ChainBatch
from vqcore.errors import QueueBroken, RingViolation
from vqcore.fill import FillStats, fill_burst

from pyvirtio import fds
from pyvirtio.device import InvalidQueueIndex, VirtioDevice, Vring
from pyvirtio.features import Transport
from pyvirtio.runtime import BURSTS_PER_TURN, Worker
from pyvirtio.status import DeviceStateError

log = logging.getLogger(__name__)

VIRTIO_ID_RNG = 4

#: what the device offers by default (the spec defines no virtio-rng feature bits)
DEFAULT_FEATURES = (Transport.VERSION_1 | Transport.EVENT_IDX | Transport.INDIRECT_DESC
                    | Transport.RING_PACKED)

DEFAULT_SOURCE = "/dev/urandom"

#: the smallest token bucket (bytes): one request of a typical driver (Linux's hwrng
#: reads 64 bytes at a time)
MIN_BUCKET = 64
#: a rate-limited worker whose budget ran out waits until 1/THROTTLE_HZ second's worth
#: returned (at least :data:`MIN_BUCKET` bytes, at most a whole bucket) before it fills
#: requests again: at most this many timer wake-ups a second, whatever the rate. (A kick that finds
#: less budget waits the same way; kicks stay off meanwhile. A guest whose ring holds
#: less than that, QEMU's vhost-user-rng has 4 requests of 64 bytes, gets a burst per
#: kick and one wait per burst: a few hundred wake-ups a second at 64 KiB/s.)
THROTTLE_HZ = 100
#: request chains one burst pops at most
BURST = 64
#: seconds between two tries of a source that failed or hit end of file
SOURCE_RETRY = 1.0
#: seconds between two tries of a source that had nothing and cannot be polled
SOURCE_POLL = 0.01


class TokenBucket:
    """A token bucket of ``rate`` bytes per second, refilled continuously, holding at
    most one second's worth (at least :data:`MIN_BUCKET` bytes); it starts full.

    ``clock`` (seconds, monotonic) is for tests."""

    def __init__(self, rate: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        if not rate > 0 or math.isinf(rate):
            raise ValueError(f"rate {rate!r}: must be a positive number of bytes per second")
        self.rate = float(rate)
        self.capacity = max(self.rate, float(MIN_BUCKET))
        #: the budget a waiting worker waits for (see :data:`THROTTLE_HZ`)
        self.grant = int(min(self.capacity, max(MIN_BUCKET, self.rate / THROTTLE_HZ)))
        self._clock = clock
        self._tokens = self.capacity
        self._last = clock()

    def _refill(self) -> None:
        now = self._clock()
        self._tokens = min(self.capacity, self._tokens + (now - self._last) * self.rate)
        self._last = now

    def available(self) -> int:
        """Whole bytes that may be delivered now."""
        self._refill()
        return int(self._tokens)

    def consume(self, n: int) -> None:
        """``n`` bytes were delivered (at most :meth:`available`)."""
        self._tokens -= n

    def wait_time(self) -> float:
        """Seconds until :attr:`grant` bytes are available (0 if they are now)."""
        self._refill()
        return max(0.0, (self.grant - self._tokens) / self.rate)


class RngWorker(Worker):
    """Serves the request queue of an :class:`RngDevice` (one :class:`Vring`) until
    :meth:`stop`. A disabled ring is not served: its requests stay in the ring until
    it is enabled (:meth:`RngDevice.set_ring_enabled`)."""

    def __init__(self, device: RngDevice, vring: Vring) -> None:
        super().__init__(f"vq-rng{vring.index}")
        self.device = device
        self.vring = vring
        size = vring.queue.size
        self._batch = ChainBatch(min(BURST, size), max(4 * size, 1024))
        # a ring found broken before (by an earlier worker) stays out, without a report
        self._dead = vring.queue.broken
        #: the source fd in the epoll set (None: not tried yet; False: it cannot be)
        self._source_polled: bool | None = None

    def peer_fds(self) -> list[tuple[int, bool]]:
        v = self.vring
        return [(v.kick_fd, True), (v.call_fd, False), (v.err_fd, False)]

    def _break_all(self, exc: BaseException) -> None:
        if not self._dead:
            self._violation(exc, quiet=True)

    def _violation(self, exc: BaseException, quiet: bool = False) -> None:
        """The ring is broken: stop serving it, report it to the device, then signal
        its error fd (whoever the signal wakes finds DEVICE_NEEDS_RESET already set)
        (``quiet``: without the debug line; the queue logged the violation once)."""
        v = self.vring
        if not quiet:
            log.debug("%s: request queue broken: %s", self.device.name, exc)
        self._dead = True
        self.device.needs_reset(f"request queue: {exc}")
        if v.err_fd >= 0 and not fds.signal(v.err_fd):
            log.warning("%s: cannot signal the request queue's error fd", self.device.name)

    # ---- the loop -------------------------------------------------------------------------

    def _loop(self) -> None:
        v = self.vring
        never_sleep = self.device.poll or v.kick_fd < 0
        ep = select.epoll()
        try:
            ep.register(self._stop_fd, select.EPOLLIN)
            if v.kick_fd >= 0:
                ep.register(v.kick_fd, select.EPOLLIN)
            wait: float | None = 0.0   # look at the ring once before sleeping: a kick
            while not self._stopping:  # drained by a worker stopped meanwhile is not lost
                for fd, _ in ep.poll(-1 if wait is None else wait):
                    if fd == v.kick_fd or fd == self._stop_fd:
                        fds.drain(fd)
                if self._stopping:
                    break
                wait = self._serve(ep)
                if wait is None and never_sleep and v.enabled and not self._dead:
                    wait = 0.0
        finally:
            ep.close()

    def _serve(self, ep: select.epoll) -> float | None:
        """Fill requests. Returns when to look again: None at the next kick (or wake),
        else after that many seconds."""
        v, dev = self.vring, self.device
        if self._dead or not v.enabled:
            return None
        q, st, bucket = v.queue, dev.fill_stats, dev.bucket
        try:
            for _ in range(BURSTS_PER_TURN):
                budget = None
                if bucket is not None:
                    budget = bucket.available()
                    if budget < bucket.grant:
                        # no kicks while throttled: the timer looks at the ring
                        q.disable_notification()
                        dev.throttled += 1
                        return bucket.wait_time()
                q.disable_notification()
                before = st.bytes
                fill_burst(q, self._batch, dev.source_fd, st, max_bytes=budget,
                           call_fd=v.call_fd)
                if bucket is not None:
                    bucket.consume(st.bytes - before)
                if st.fd_failed:
                    dev.source_failed(st.last_errno)
                    return SOURCE_RETRY
                if st.fd_empty:
                    return self._watch_source(ep)
                if st.ring_empty and not q.enable_notification():
                    return None
            return 0.0
        except (RingViolation, QueueBroken) as exc:
            self._violation(exc)
            return None

    def _watch_source(self, ep: select.epoll) -> float | None:
        """The source had nothing (a pipe, /dev/random): wake when it is readable (once:
        /dev/urandom is always readable, so it is not watched for good)."""
        fd = self.device.source_fd
        mask = select.EPOLLIN | select.EPOLLONESHOT
        if self._source_polled is None:
            try:
                ep.register(fd, mask)
                self._source_polled = True
            except OSError:
                self._source_polled = False
        elif self._source_polled:
            ep.modify(fd, mask)
        return None if self._source_polled else SOURCE_POLL


class RngDevice(VirtioDevice):
    """A virtio-rng device.

    Args:
        source: the file random bytes are read from (opened once, non-blocking).
        max_bytes_per_s: the most bytes a second the guest gets (None: no limit), as a
            token bucket holding one second's worth (at least 64 bytes).
        queue_size: the largest size of the request queue.
        features: the features offered (default :data:`DEFAULT_FEATURES`).
        poll: busy-poll the ring (never sleep waiting for a kick; a worker waiting for
            the rate limit's budget or for a failed source still sleeps, on a timer).
        name: for log messages and queue names.
    """

    def __init__(self, *, source: str | os.PathLike = DEFAULT_SOURCE,
                 max_bytes_per_s: int | None = None, queue_size: int = 256,
                 features: int | None = None, poll: bool = False,
                 name: str = "virtio-rng") -> None:
        self.bucket = None if max_bytes_per_s is None else TokenBucket(max_bytes_per_s)
        super().__init__(VIRTIO_ID_RNG,
                         features=int(DEFAULT_FEATURES if features is None else features),
                         num_queues=1, queue_size=queue_size, name=name)
        self.max_bytes_per_s = max_bytes_per_s
        self.poll = poll
        self.source = os.fspath(source)
        self.source_fd = os.open(self.source, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        flags = os.EFD_NONBLOCK | os.EFD_CLOEXEC
        #: the eventfd the driver kicks and the one we signal, per queue (in process)
        self.kick_fds = [os.eventfd(0, flags)]
        self.call_fds = [os.eventfd(0, flags)]
        #: an eventfd signalled when the queue is found broken, or -1 (in process)
        self.err_fds = [-1]
        self.worker: RngWorker | None = None
        #: the counters of the request queue, kept across workers
        self.fill_stats = FillStats()
        #: how often a worker waited for the rate limit's budget
        self.throttled = 0
        self._source_reported = False
        self._lock = threading.RLock()
        self._closed = False

    # ---- life cycle ------------------------------------------------------------------------

    def on_driver_ok(self) -> None:
        if self.queues[0] is not None:
            self.start_queue()

    def on_reset(self) -> None:
        self.stop_queue()

    def start_queue(self, vring: Vring | None = None) -> None:
        """Serve the request queue: ``vring`` (a transport's ring and eventfds), or by
        default the device's own queue 0 and eventfds. A worker already running is
        stopped first. A ring that is not ``enabled`` is not served until
        :meth:`set_ring_enabled`."""
        with self._lock:
            if self._closed:
                raise DeviceStateError(f"{self.name}: closed")
            if vring is None:
                queue = self.queues[0]
                if queue is None:
                    raise DeviceStateError(f"{self.name}: the request queue is not running")
                vring = Vring(0, queue, self.kick_fds[0], self.call_fds[0], self.err_fds[0])
            elif vring.index != 0:
                raise InvalidQueueIndex(f"{self.name}: no queue {vring.index} (the device "
                                        "has one, the request queue)")
            self.stop_queue()
            self.worker = RngWorker(self, vring)
            self.worker.start()

    def stop_queue(self) -> None:
        """Stop serving the request queue (the queue keeps its state)."""
        with self._lock:
            worker, self.worker = self.worker, None
            if worker is not None:
                worker.stop()

    def set_ring_enabled(self, index: int, enabled: bool) -> None:
        """vhost-user SET_VRING_ENABLE: a disabled ring completes nothing (its requests
        stay in the ring); enabling it makes the worker look at the ring again."""
        self.queue_config(index)
        with self._lock:
            if self.worker is not None:
                self.worker.vring.enabled = bool(enabled)
                self.worker.wake()

    def kick(self, index: int = 0) -> None:
        """The driver notifies the request queue (in-process drivers and tests)."""
        os.eventfd_write(self.kick_fds[index], 1)

    def close(self) -> None:
        """Stop, and close the eventfds and the source the device owns."""
        with self._lock:
            if self._closed:
                return
            self.stop_queue()
            for fd in self.kick_fds + self.call_fds + self.err_fds + [self.source_fd]:
                if fd >= 0:
                    os.close(fd)
            self.kick_fds, self.call_fds, self.err_fds = [-1], [-1], [-1]
            self.source_fd = -1
            self._closed = True

    def __enter__(self) -> RngDevice:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- what the worker reports -----------------------------------------------------------

    def source_failed(self, errno_: int) -> None:
        """A read of the source hit end of file (``errno_`` 0) or failed: logged once
        (the worker counts every failure in ``read_errors``)."""
        if not self._source_reported:
            self._source_reported = True
            why = os.strerror(errno_) if errno_ else "end of file"
            log.warning("%s: entropy source %s: %s; requests wait, retried every %g s",
                        self.name, self.source, why, SOURCE_RETRY)

    def stats(self) -> dict[str, int]:
        """The request queue's counters: requests, bytes, bursts, notifications,
        errors, read_errors (see :class:`vqcore.fill.FillStats`) and throttled (waits
        for the rate limit's budget)."""
        return {**self.fill_stats.as_dict(), "throttled": self.throttled}


__all__ = ["RngDevice", "RngWorker", "TokenBucket", "DEFAULT_FEATURES", "DEFAULT_SOURCE",
           "VIRTIO_ID_RNG", "MIN_BUCKET", "SOURCE_RETRY"]
