"""Worker threads: one per virtio-net queue pair, epoll over the kick eventfds and the
packet fd, calling the nogil burst kernels of :mod:`vqcore.net` once per burst.

The loop is the race-free one of DESIGN.md: disable notifications, drain, enable, and
drain again if something arrived meanwhile; only then sleep. When the guest has no RX
buffers the worker stops watching the packet fd (the frames wait in the TAP's own
queue) until the guest kicks the RX queue. With ``poll=True`` the worker never sleeps
(busy-poll: the lowest latency and the highest rate, one core spent).

TX kick coalescing: a kick costs a guest vCPU an exit (under TCG, and through QEMU's
BQL, far more than the frame itself), and a worker that answers every kick at once
drains one or two frames per kick. So after a drain that moved a small stream (two
frames or more but less than a quarter ring, and no RX traffic in the last
:data:`RX_QUIET` seconds, which would mean request/response traffic whose replies must
not wait), the worker asks for the next kick only once a quarter of the ring waits
(event index set ahead: ``enable_notification_after``) and looks at the ring again after
``tx_coalesce_us`` anyway, whichever comes first. A drain of a quarter ring or more asks
for every kick again: such a driver fills the ring faster than a hold would gather it.
Like QEMU's ``tx=timer`` but bounded by a count too, and like vhost-net's busy-loop but
sleeping. ``tx_coalesce_us=0`` turns it off.
"""

from __future__ import annotations

import logging
import math
import os
import select
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from vqcore import ChainBatch, DeviceQueue
from vqcore.errors import QueueBroken, RingViolation
from vqcore.net import NetRxFilter, NetStats, rx_burst, tx_burst

from pyvirtio import fds

log = logging.getLogger("pyvirtio.runtime")

#: frames an RX burst may move before the worker looks at TX again
RX_BUDGET = 64
#: bursts in a row in one direction before the worker turns to the other
BURSTS_PER_TURN = 16
#: RX chains one burst pops at most (a larger ring is not walked whole every burst: that
#: cost 100-150 ns per 64-byte frame with 1024 buffers); enough for RX_BUDGET frames
#: with room for one 64 KiB frame ahead in 1536-byte buffers. A guest whose buffers
#: that many chains cannot fill gets its whole ring popped (see _serve_rx).
RX_POP = 256
#: TX kick coalescing (see above): the default wait, in microseconds
TX_COALESCE_US = 100
#: ... after a drain of at least this many frames (and less than a quarter ring) ...
TX_COALESCE_MIN = 2
#: ... with no RX frame for this long (seconds)
RX_QUIET = 0.001
#: the largest wait accepted (a frame held longer would look like a lost one)
MAX_TX_COALESCE_US = 10_000


def check_tx_coalesce_us(us: int, name: str = "tx_coalesce_us") -> None:
    """:class:`ValueError` (naming the setting ``name``) unless ``us`` is a wait the
    workers accept: 0 (off) up to :data:`MAX_TX_COALESCE_US`."""
    if not 0 <= us <= MAX_TX_COALESCE_US:
        raise ValueError(f"{name} {us}: must be 0..{MAX_TX_COALESCE_US}")


def _wait(ep: select.epoll, timeout: float) -> list[tuple[int, int]]:
    """``ep.poll(timeout)``, but a short timeout is kept to the microsecond
    (epoll_wait counts whole milliseconds): select() on the epoll fd itself. An epoll
    fd numbered 1024 or more is beyond select(): then the wait is epoll's, rounded up
    to 1 ms."""
    if 0 < timeout < 0.002 and ep.fileno() < 1024:
        ready, _, _ = select.select([ep.fileno()], [], [], timeout)
        return ep.poll(0) if ready else []
    return ep.poll(timeout)


#: seconds a stopping worker gets before the eventfds it may be stuck on are unblocked
STOP_GRACE = 0.1


@dataclass
class QueuePairConfig:
    """What a worker needs for one queue pair."""
    index: int
    rx: DeviceQueue | None               # split or packed; None: not running
    tx: DeviceQueue | None
    fd: int                              # packet fd (TAP queue fd), non-blocking
    rx_kick: int                         # eventfds (the guest's kicks / our interrupts)
    tx_kick: int
    rx_call: int = -1
    tx_call: int = -1
    #: eventfds signalled when a ring is found broken (vhost-user SET_VRING_ERR)
    rx_err: int = -1
    tx_err: int = -1
    #: where TX frames go when not ``fd`` (a sink's :data:`vqcore.net.DISCARD_FD`)
    tx_fd: int | None = None
    rx_filter: NetRxFilter | None = None
    mrg_rxbuf: bool = True
    max_frame: int = 65562               # largest frame incl. header the fd may deliver
    hdr_len: int = 12
    poll: bool = False
    burst: int = 256
    #: TX kick coalescing: longest wait for more frames after a drain (0: off)
    tx_coalesce_us: int = TX_COALESCE_US
    #: a started but disabled ring (vhost-user): TX is discarded, RX supplies nothing
    rx_enabled: bool = True
    tx_enabled: bool = True
    on_violation: Callable[[int, str, BaseException], None] | None = None
    rx_stats: NetStats = field(default_factory=NetStats)
    tx_stats: NetStats = field(default_factory=NetStats)


class Worker(threading.Thread):
    """A device's worker thread: the control every device's workers share.

    :meth:`wake` and :meth:`stop` work from any thread through a stop eventfd the
    loop watches; a loop that fails (:meth:`_fail`) logs once, reports its rings
    broken and ends; :meth:`stop` frees a worker stuck on a peer's eventfd. A subclass
    writes :meth:`_loop` (its epoll loop, which registers :attr:`_stop_fd` and ends
    when :attr:`_stopping` is set), :meth:`peer_fds` and :meth:`_break_all`."""

    def __init__(self, name: str) -> None:
        super().__init__(name=name, daemon=True)
        self._stop_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        #: guards _stop_fd between wake()/stop() callers and its close
        self._fd_lock = threading.Lock()
        self._stopping = False
        #: why the worker failed (the exception, without its traceback), or None
        self.error: BaseException | None = None

    # ---- what a subclass provides --------------------------------------------------------

    def peer_fds(self) -> list[tuple[int, bool]]:
        """The peer's eventfds the loop uses, each with True for those it reads (kicks)
        and False for those it writes (calls, errors): what :meth:`stop` unblocks."""
        return []

    def _loop(self) -> None:
        raise NotImplementedError

    def _break_all(self, exc: BaseException) -> None:
        """Mark every ring the worker serves broken (after a failure)."""

    # ---- control ------------------------------------------------------------------------

    def wake(self) -> None:
        """Make the worker look at its rings and flags again (after enabling a ring).
        Safe from any thread, also during or after :meth:`stop` (never a write to a
        closed, perhaps reused, fd number)."""
        with self._fd_lock:
            if self._stop_fd >= 0:
                try:
                    os.eventfd_write(self._stop_fd, 1)
                except BlockingIOError:
                    pass                        # the counter is full: woken already

    def stop(self, timeout: float = 5.0) -> None:
        """Ask the worker to finish and wait for it; closes its stop eventfd. A second
        call does nothing. A worker that does not end within :data:`STOP_GRACE` is
        stuck on a peer's eventfd (one whose O_NONBLOCK the peer cleared): those are
        unblocked (:func:`pyvirtio.fds.unblock`), then it gets ``timeout``."""
        self._stopping = True
        with self._fd_lock:
            if self._stop_fd < 0:
                return
            try:
                os.eventfd_write(self._stop_fd, 1)
            except BlockingIOError:
                pass
        if self.is_alive() and threading.current_thread() is not self:
            self.join(STOP_GRACE)
            if self.is_alive():
                log.warning("worker %s did not stop within %.1f s: unblocking the "
                            "eventfds it uses", self.name, STOP_GRACE)
                for fd, reader in self.peer_fds():
                    if fd >= 0:
                        fds.unblock(fd, reader)
                self.join(timeout)
            if self.is_alive():
                log.error("worker %s did not stop within %.1f s", self.name, timeout)
                return
        with self._fd_lock:
            if self._stop_fd >= 0:
                os.close(self._stop_fd)
                self._stop_fd = -1

    def run(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # noqa: BLE001 - a worker never dies silently
            self._fail(exc)

    def _fail(self, exc: BaseException) -> None:
        """The loop failed (a bug, or an fd that broke under us): log once, mark the
        rings broken (the device sets DEVICE_NEEDS_RESET, the error fds are
        signalled) and end. The exception is kept without its traceback, whose frames
        would keep the queues, and so the guest memory mappings, alive."""
        log.error("worker %s failed: %s: %s; its rings are marked broken", self.name,
                  type(exc).__name__, exc)
        log.debug("worker %s failure", self.name, exc_info=exc)
        try:
            self._break_all(exc)
        except Exception as again:  # noqa: BLE001 - the report failed too
            log.error("worker %s: reporting the failure failed: %s", self.name, again)
        exc.__traceback__ = None
        exc.__context__ = exc.__cause__ = None
        self.error = exc


class QueuePairWorker(Worker):
    """Serves one RX/TX queue pair until :meth:`stop`."""

    def __init__(self, cfg: QueuePairConfig) -> None:
        super().__init__(f"vq-pair{cfg.index}")
        self.cfg = cfg
        rx_size = cfg.rx.size if cfg.rx is not None else 64
        tx_size = cfg.tx.size if cfg.tx is not None else 64
        self._rx_full = ChainBatch(max(rx_size, 64), max(4 * rx_size, 1024))
        self._rx_batch = (self._rx_full if rx_size <= RX_POP
                          else ChainBatch(RX_POP, max(4 * RX_POP, 1024)))
        self._tx_batch = ChainBatch(min(cfg.burst, tx_size), max(4 * tx_size, 1024))
        # a ring found broken before (by an earlier worker of the pair) stays out
        self._rx_dead = cfg.rx is None or cfg.rx.broken
        self._tx_dead = cfg.tx is None or cfg.tx.broken
        self._fd_watched = True
        #: where TX frames go (the packet fd unless the config names another)
        self._tx_fd = cfg.fd if cfg.tx_fd is None else cfg.tx_fd
        #: TX notifications held off until this time.monotonic() (see _serve_tx)
        self._tx_hold: float | None = None
        #: time.monotonic() when RX last moved a frame
        self._rx_last = -math.inf
        #: with kick coalescing: the wait (s) and the chains a coalesced kick asks for
        self._coalesce = max(0, cfg.tx_coalesce_us) * 1e-6
        self._coalesce_kick = max(TX_COALESCE_MIN, tx_size // 4)

    def peer_fds(self) -> list[tuple[int, bool]]:
        cfg = self.cfg
        return [(cfg.rx_kick, True), (cfg.tx_kick, True), (cfg.rx_call, False),
                (cfg.tx_call, False), (cfg.rx_err, False), (cfg.tx_err, False)]

    def _break_all(self, exc: BaseException) -> None:
        for which, dead in (("rx", self._rx_dead), ("tx", self._tx_dead)):
            if not dead:
                self._violation(which, exc, quiet=True)

    # ---- the loop -------------------------------------------------------------------------

    def _loop(self) -> None:
        cfg = self.cfg
        ep = select.epoll()
        try:
            ep.register(self._stop_fd, select.EPOLLIN)
            if cfg.tx is not None and cfg.tx_kick >= 0:
                ep.register(cfg.tx_kick, select.EPOLLIN)
                cfg.tx.enable_notification()
            if cfg.rx is not None:
                if cfg.rx_kick >= 0:
                    ep.register(cfg.rx_kick, select.EPOLLIN)
                ep.register(cfg.fd, select.EPOLLIN)
                cfg.rx.enable_notification()
            else:
                self._fd_watched = False
            first = True      # look at the rings once before sleeping: a kick drained by
            while not self._stopping:   # a worker stopped meanwhile would be lost
                timeout = 0 if (cfg.poll or first) else -1
                first = False
                if timeout < 0 and self._tx_hold is not None:
                    timeout = max(0.0, self._tx_hold - time.monotonic())
                events = _wait(ep, timeout)
                rx_kicked = False
                for fd, _ in events:
                    if fd == cfg.rx_kick:
                        fds.drain(fd)
                        rx_kicked = True
                    elif fd == cfg.tx_kick:
                        fds.drain(fd)
                    elif fd == self._stop_fd:
                        fds.drain(fd)
                        rx_kicked = True          # woken: look at every ring again
                if self._stopping:
                    break
                if not cfg.rx_enabled and self._fd_watched:
                    ep.modify(cfg.fd, 0)           # disabled RX: leave frames in the fd
                    self._fd_watched = False
                elif ((rx_kicked or cfg.poll) and cfg.rx_enabled and not self._fd_watched
                      and not self._rx_dead):
                    ep.modify(cfg.fd, select.EPOLLIN)
                    self._fd_watched = True
                more = True
                while more and not self._stopping:
                    more = self._serve_tx()
                    more = self._serve_rx(ep) or more
            if self._tx_hold is not None:
                # frames held back by kick coalescing go out before the worker ends: a
                # stop (GET_VRING_BASE, a disconnect) must not strand them
                self._serve_tx()
        finally:
            ep.close()

    def _violation(self, which: str, exc: BaseException, quiet: bool = False) -> None:
        """Ring ``which`` ("rx"/"tx") is broken: stop serving it, signal its error fd
        and report it (``quiet``: without the log line, already written)."""
        cfg = self.cfg
        if not quiet:                  # (the queue logged the violation itself, once)
            log.debug("queue pair %d %s queue broken: %s", cfg.index, which, exc)
        if which == "rx":
            self._rx_dead = True
            err = cfg.rx_err
        else:
            self._tx_dead = True
            self._tx_hold = None       # nothing left to hold for (a hold would spin)
            err = cfg.tx_err
        # the device records DEVICE_NEEDS_RESET first: a front-end woken by the error
        # fd may ask for the status at once
        if cfg.on_violation is not None:
            cfg.on_violation(cfg.index, which, exc)
        if err >= 0 and not fds.signal(err):
            log.warning("queue pair %d %s: cannot signal its error fd", cfg.index, which)

    def _serve_tx(self) -> bool:
        """Drain the TX ring (race-free); True if it should be looked at again soon."""
        cfg = self.cfg
        if self._tx_dead:
            return False
        moved = 0
        try:
            for _ in range(BURSTS_PER_TURN):
                cfg.tx.disable_notification()
                fd = self._tx_fd if cfg.tx_enabled else -1
                moved += tx_burst(cfg.tx, self._tx_batch, fd, cfg.tx_stats,
                                  hdr_len=cfg.hdr_len, call_fd=cfg.tx_call)
                if cfg.tx_stats.ring_empty:
                    now = time.monotonic()
                    small = moved < self._coalesce_kick
                    stream = small and moved >= TX_COALESCE_MIN
                    holding = self._tx_hold is not None and now < self._tx_hold
                    if (self._coalesce and not cfg.poll and now - self._rx_last > RX_QUIET
                            and (stream or (holding and small))):
                        # a stream (or a wake-up by the RX side while holding): the next
                        # kick once a quarter ring waits, or a look after the wait,
                        # whichever comes first (armed again after every burst: a
                        # burst disables a packed ring's kicks)
                        if cfg.tx.enable_notification_after(self._coalesce_kick):
                            continue
                        if stream:
                            self._tx_hold = now + self._coalesce
                        return False
                    self._tx_hold = None
                    if not cfg.tx.enable_notification():
                        return False
            return True
        except (RingViolation, QueueBroken) as exc:
            self._violation("tx", exc)
            return False

    def _serve_rx(self, ep: select.epoll) -> bool:
        """Move frames from the fd into the guest; True if it should be looked at again."""
        cfg = self.cfg
        if self._rx_dead or not self._fd_watched or not cfg.rx_enabled:
            return False
        st = cfg.rx_stats
        batch = self._rx_batch
        armed = False         # asked for a kick at the next buffer beyond those there
        try:
            for _ in range(BURSTS_PER_TURN):
                if not armed:
                    cfg.rx.disable_notification()
                errors, no_room = st.errors, st.no_room
                got = rx_burst(cfg.rx, batch, cfg.fd, st, cfg.rx_filter,
                               mrg_rxbuf=cfg.mrg_rxbuf, max_frame=cfg.max_frame,
                               hdr_len=cfg.hdr_len, max_packets=RX_BUDGET, call_fd=cfg.rx_call)
                if got == 0 and st.errors > errors and not st.ring_empty:
                    # the fd fails (e.g. a detached TAP queue): back off, do not spin
                    log.debug("pair %d: read error %s", cfg.index, os.strerror(st.last_errno))
                    time.sleep(0.001)
                    return False
                if got:
                    armed = False
                    self._rx_last = time.monotonic()
                if st.tap_empty:
                    return False
                if st.ring_empty:
                    if (st.no_room > no_room and batch is not self._rx_full
                            and cfg.rx.pending() >= batch.max_chains):
                        batch = self._rx_full     # small buffers: offer the whole ring
                        continue
                    if st.no_room > no_room:
                        # buffers wait but cannot hold the next frame: ask for a kick
                        # at the next one the guest adds, look once more, then sleep
                        # (enable_notification would say "work waits" and we would spin)
                        if not armed:
                            armed = cfg.rx.enable_notification_more()
                            continue
                    elif cfg.rx.enable_notification():
                        continue              # buffers arrived meanwhile
                    # no room: stop watching the fd until the guest adds buffers
                    ep.modify(cfg.fd, 0)
                    self._fd_watched = False
                    return False
            return True
        except (RingViolation, QueueBroken) as exc:
            self._violation("rx", exc)
            return False
