"""A zero-copy forwarder between two vhost-user ports: what a guest bridging two NICs
would do, with no copy at all.

Both ports' front-ends lay their rings out in ONE shared memfd
(:class:`~pyvirtio.vhost_user.memfd.SharedGuestMemory`), and both back-ends got the same
memory table, so a guest-physical address is valid in every ring of either port. A
frame that port A's back-end wrote into one of A's RX buffers is therefore posted, as
it is, as a TX chain on port B: the chain's segments are A's RX buffers (virtio-net
header included, so a GSO frame crosses whole; with MRG_RXBUF a frame spread over
several buffers becomes a multi-segment chain). When B's back-end has used the chain,
the buffers go back to A's receive queue.

Everything is per batch: one reclaim per ring, numpy to turn used buffers into chains,
one ``add`` per ring and a kick when the ring asks for one. Only frames spread over
several buffers are grouped in a Python loop (per frame, not per buffer; they are big).

A port's queues belong to the forwarder while it runs: do not call the port's
``send``/``recv`` on the rings it forwards.
"""

from __future__ import annotations

import logging
import os
import select
import threading
import time
from dataclasses import dataclass

import numpy as np

from vqcore import ChainBatch
from vqcore.errors import VirtioError

from pyvirtio.features import NetFeature
from pyvirtio.net.driver import DriverQueue
from pyvirtio.net.header import HDR_LEN
from pyvirtio.net.frontend import VhostUserNetFrontend

log = logging.getLogger(__name__)

#: a token bit marking a chain made of several RX buffers (a merged frame)
MULTI = np.uint64(1 << 63)
#: frames shorter than this (header + Ethernet header) are not forwarded
MIN_FORWARD = HDR_LEN + 14

#: guest (RX) offload -> the host (TX) offload the other port needs to take such frames
_OFFLOAD_PAIRS = (
    (NetFeature.GUEST_CSUM, NetFeature.CSUM),
    (NetFeature.GUEST_TSO4, NetFeature.HOST_TSO4),
    (NetFeature.GUEST_TSO6, NetFeature.HOST_TSO6),
    (NetFeature.GUEST_ECN, NetFeature.HOST_ECN),
    (NetFeature.GUEST_UFO, NetFeature.HOST_UFO),
    (NetFeature.GUEST_USO4, NetFeature.HOST_USO),
    (NetFeature.GUEST_USO6, NetFeature.HOST_USO),
)


class ForwarderError(VirtioError, RuntimeError):
    """The two ports cannot be forwarded between (memory, features, state)."""


@dataclass
class PathStats:
    """Counters of one direction."""
    frames: int = 0
    bytes: int = 0            # virtio-net headers included
    buffers: int = 0          # RX buffers forwarded (> frames with merged frames)
    multi: int = 0            # frames spread over several buffers
    dropped: int = 0          # runts given straight back to the RX queue
    returned: int = 0         # buffers back in the RX queue


class ForwardPath:
    """One direction: ``src``'s receiveq ``pair`` → ``dst``'s transmitq ``pair``."""

    def __init__(self, src: VhostUserNetFrontend, dst: VhostUserNetFrontend, pair: int,
                 name: str = "") -> None:
        if src.driver is None or dst.driver is None:
            raise ForwarderError("both ports must be started")
        self.src, self.dst, self.pair = src, dst, pair
        self.name = name or f"{src.name}->{dst.name}[{pair}]"
        self.rx: DriverQueue = src.driver.rx[pair]
        self.tx: DriverQueue = dst.driver.tx[pair]
        self.memory = src.driver.memory
        self.mrg = bool(src.features & NetFeature.MRG_RXBUF)
        n = self.rx.slots
        self._used = ChainBatch(n)
        self._add = ChainBatch(n, n)
        self._done = ChainBatch(self.tx.queue.size)
        self._repost = ChainBatch(n)
        self._pend_tok = np.zeros(0, np.uint64)
        self._pend_len = np.zeros(0, np.int64)
        #: first buffer of a merged frame -> all its buffers
        self._multi: dict[int, np.ndarray] = {}
        self.stats = PathStats()

    # ---- helpers ---------------------------------------------------------------------------

    @staticmethod
    def _kick(dq: DriverQueue) -> None:
        if dq.queue.kick_needed():
            os.eventfd_write(dq.kick_fd, 1)
            dq.kicks += 1

    def _slots(self) -> np.ndarray:
        rx = self.rx
        return self.memory.array(rx.buf_addr, rx.slots * rx.slot_size).reshape(
            rx.slots, rx.slot_size)

    def _give_back(self, slots: np.ndarray) -> None:
        """Post RX buffers ``slots`` to the source's receiveq again."""
        n = len(slots)
        if not n:
            return
        rx = self.rx
        b = self._repost
        b.load(rx.buf_addr + slots * np.uint64(rx.slot_size), np.full(n, rx.slot_size),
               np.ones(n), np.zeros(n), slots)
        added = rx.queue.add(b)
        if added != n:      # cannot happen: these buffers' descriptors are free
            raise ForwarderError(f"{self.name}: receiveq took {added} of {n} buffers")
        self.stats.returned += n
        self._kick(rx)

    # ---- the work ----------------------------------------------------------------------------

    def recycle(self) -> int:
        """Buffers the destination has sent go back to the source's receiveq; returns
        how many chains completed."""
        n = self.tx.queue.reclaim(self._done)
        if not n:
            return 0
        tokens = self._done.tokens[:n].copy()
        multi = (tokens & MULTI) != 0
        if multi.any():
            parts = [tokens[~multi]]
            for t in tokens[multi].tolist():
                parts.append(self._multi.pop(int(t) & ~(1 << 63)))
            tokens = np.concatenate(parts)
        self._give_back(tokens)
        return n

    def step(self) -> int:
        """One round: recycle, take what the source received, post it on the
        destination. Returns the work done (chains recycled + frames forwarded)."""
        work = self.recycle()
        n = self.rx.queue.reclaim(self._used)
        if n:
            tok = self._used.tokens[:n]
            ln = self._used.used_len[:n].astype(np.int64)
            if len(self._pend_tok):
                self._pend_tok = np.concatenate([self._pend_tok, tok])
                self._pend_len = np.concatenate([self._pend_len, ln])
            else:
                self._pend_tok, self._pend_len = tok.copy(), ln
        if len(self._pend_tok):
            work += self._forward()
        return work

    def _frames(self) -> tuple[np.ndarray, np.ndarray]:
        """Group the pending buffers into frames: (index of each frame's first buffer,
        buffers per frame); buffers of an incomplete last frame are left out."""
        count = len(self._pend_tok)
        if not self.mrg:
            return np.arange(count), np.ones(count, np.int64)
        slots = self._slots()
        idx = self._pend_tok.astype(np.int64)
        nbuf = slots[idx, 10].astype(np.int64) | (slots[idx, 11].astype(np.int64) << 8)
        del slots
        if np.all(nbuf == 1):
            return np.arange(count), nbuf
        starts, per = [], []
        i = 0
        while i < count:
            k = min(max(int(nbuf[i]), 1), self.rx.slots)   # a sane count, whatever it says
            if i + k > count:
                break
            starts.append(i)
            per.append(k)
            i += k
        return np.array(starts, np.int64), np.array(per, np.int64)

    def _forward(self) -> int:
        """Post the complete pending frames on the destination's transmitq."""
        tok, ln = self._pend_tok, self._pend_len
        starts, per = self._frames()
        if len(starts) == 0:
            return 0
        complete = int(starts[-1] + per[-1])        # pending buffers in whole frames
        if np.all(per == 1):
            seg_idx = starts
            runt = ln[seg_idx] < MIN_FORWARD
            if runt.any():
                self._give_back(tok[seg_idx[runt]])
                self.stats.dropped += int(runt.sum())
                seg_idx = seg_idx[~runt]
            counts = np.ones(len(seg_idx), np.int64)
            chain_tok = tok[seg_idx]
        else:
            parts, count_list, tok_list, runts = [], [], [], []
            for s, k in zip(starts.tolist(), per.tolist()):
                r = np.arange(s, s + k)
                if int(ln[r].sum()) < MIN_FORWARD:
                    runts.append(r)
                    continue
                parts.append(r)
                count_list.append(k)
                first = int(tok[s])
                if k == 1:
                    tok_list.append(first)
                else:
                    self._multi[first] = tok[r].copy()
                    tok_list.append(first | (1 << 63))
            if runts:
                self._give_back(tok[np.concatenate(runts)])
                self.stats.dropped += len(runts)
            seg_idx = np.concatenate(parts) if parts else np.zeros(0, np.int64)
            counts = np.array(count_list, np.int64)
            chain_tok = np.array(tok_list, np.uint64)
        added = 0
        if len(chain_tok):
            b = self._add
            b.load(self.rx.buf_addr + tok[seg_idx] * np.uint64(self.rx.slot_size),
                   ln[seg_idx], counts, counts, chain_tok)
            added = self.tx.queue.add(b)
            if added:
                self._kick(self.tx)
        segs = int(counts[:added].sum())
        for t in chain_tok[added:].tolist():       # not posted: no longer a chain
            if t & (1 << 63):
                self._multi.pop(t & ~(1 << 63), None)
        rest = np.concatenate([seg_idx[segs:], np.arange(complete, len(tok))])
        self._pend_tok, self._pend_len = tok[rest], ln[rest]
        self.stats.frames += added
        self.stats.buffers += segs
        self.stats.bytes += int(ln[seg_idx[:segs]].sum())
        self.stats.multi += int((counts[:added] > 1).sum())
        return added

    # ---- notifications ----------------------------------------------------------------------

    def arm(self) -> bool:
        """Ask both rings to interrupt; True when work already waits."""
        a = self.rx.queue.enable_interrupts()
        b = self.tx.queue.enable_interrupts()
        return a or b

    def disarm(self) -> None:
        self.rx.queue.disable_interrupts()
        self.tx.queue.disable_interrupts()

    @property
    def in_flight(self) -> int:
        """Chains on the destination's transmitq not used yet."""
        return self.tx.queue.in_flight

    def drain(self) -> None:
        """Give every buffer the path holds back to the source's receiveq: the pending
        ones at once, the in-flight ones as the destination completes them (call
        :meth:`recycle` until :attr:`in_flight` is 0)."""
        if len(self._pend_tok):
            self._give_back(self._pend_tok)
            self._pend_tok = np.zeros(0, np.uint64)
            self._pend_len = np.zeros(0, np.int64)


class Forwarder:
    """Forward frames from ``port_a``'s RX to ``port_b``'s TX (and, with
    ``both_ways``, from B's RX to A's TX), pair by pair, without copying.

    The ports must share one :class:`~pyvirtio.vhost_user.memfd.SharedGuestMemory` and be
    started; each pair of A is forwarded to the same pair of B. :meth:`start` runs one
    thread per pair, :meth:`step` does one round by hand. ``poll``: never sleep.
    """

    def __init__(self, port_a: VhostUserNetFrontend, port_b: VhostUserNetFrontend, *,
                 both_ways: bool = False, pairs: int | None = None, poll: bool = False,
                 check_offloads: bool = True) -> None:
        if port_a.memory is None or port_a.memory is not port_b.memory:
            raise ForwarderError("the ports must share one SharedGuestMemory (pass the same "
                                 "memory= to both front-ends)")
        if not (port_a.running and port_b.running):
            raise ForwarderError("both ports must be started")
        npairs = min(port_a.pairs, port_b.pairs) if pairs is None else pairs
        if npairs > min(port_a.pairs, port_b.pairs):
            raise ForwarderError(f"{npairs} pairs, the ports have {port_a.pairs} and "
                                 f"{port_b.pairs}")
        if check_offloads:
            self._check_offloads(port_a, port_b)
            if both_ways:
                self._check_offloads(port_b, port_a)
        self.port_a, self.port_b = port_a, port_b
        self.poll = poll
        self.paths: list[list[ForwardPath]] = []
        for p in range(npairs):
            port_a.repost_rx(p)
            row = [ForwardPath(port_a, port_b, p)]
            if both_ways:
                port_b.repost_rx(p)
                row.append(ForwardPath(port_b, port_a, p))
            self.paths.append(row)
        self._threads: list[threading.Thread] = []
        self._stop = threading.Event()
        self._wake: list[int] = []
        self.errors: list[BaseException] = []

    @staticmethod
    def _check_offloads(src: VhostUserNetFrontend, dst: VhostUserNetFrontend) -> None:
        missing = [f"{g.name}->{h.name}" for g, h in _OFFLOAD_PAIRS
                   if src.features & g and not dst.features & h]
        if missing:
            raise ForwarderError(
                f"{src.name} may receive frames {dst.name} cannot send (guest offload "
                f"without the matching host offload: {', '.join(missing)}); negotiate "
                "matching features or pass check_offloads=False")

    # ---- by hand -------------------------------------------------------------------------------

    def step(self) -> int:
        """One round over every path; returns the work done."""
        return sum(path.step() for row in self.paths for path in row)

    def stats(self) -> list[dict[str, PathStats]]:
        """Per pair: {"a->b": counters[, "b->a": counters]}."""
        return [{("a->b" if i == 0 else "b->a"): path.stats for i, path in enumerate(row)}
                for row in self.paths]

    # ---- threads ---------------------------------------------------------------------------------

    def start(self) -> None:
        """One thread per pair, until :meth:`stop`."""
        if self._threads:
            raise ForwarderError("already running")
        self._stop.clear()
        for p, row in enumerate(self.paths):
            wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            self._wake.append(wake)
            t = threading.Thread(target=self._run, args=(row, wake), name=f"fwd-pair{p}",
                                 daemon=True)
            self._threads.append(t)
            t.start()
        log.info("forwarder: %d pair(s) %s -> %s%s", len(self.paths), self.port_a.name,
                 self.port_b.name, " and back" if len(self.paths[0]) > 1 else "")

    def _run(self, paths: list[ForwardPath], wake: int) -> None:
        ep = select.epoll()
        try:
            ep.register(wake, select.EPOLLIN)
            for path in paths:
                for fd in (path.rx.call_fd, path.tx.call_fd):
                    try:
                        ep.register(fd, select.EPOLLIN)
                    except FileExistsError:
                        pass
            for path in paths:
                path.disarm()
            while not self._stop.is_set():
                if sum(path.step() for path in paths):
                    continue
                if self.poll:
                    continue
                if any([path.arm() for path in paths]):
                    for path in paths:
                        path.disarm()
                    continue
                for fd, _ in ep.poll(0.2):
                    try:
                        os.eventfd_read(fd)
                    except BlockingIOError:
                        pass
                for path in paths:
                    path.disarm()
        except BaseException as exc:    # never die silently
            self.errors.append(exc)
            log.exception("forwarder thread failed")
        finally:
            ep.close()

    def stop(self, timeout: float = 5.0) -> bool:
        """Stop the threads, then hand every buffer back to its receive queue (waiting
        up to ``timeout`` for chains still in flight). True when nothing is left in
        flight."""
        self._stop.set()
        for fd in self._wake:
            try:
                os.eventfd_write(fd, 1)
            except OSError:
                pass
        for t in self._threads:
            t.join(timeout)
        self._threads.clear()
        for fd in self._wake:
            os.close(fd)
        self._wake.clear()
        return self.drain(timeout)

    def drain(self, timeout: float = 5.0) -> bool:
        """Hand back every buffer the paths hold (see :meth:`ForwardPath.drain`)."""
        deadline = time.monotonic() + timeout
        paths = [p for row in self.paths for p in row]
        for path in paths:
            path.recycle()
            path.drain()
        while any(p.in_flight for p in paths):
            if time.monotonic() > deadline:
                log.warning("forwarder: %d chain(s) still in flight",
                            sum(p.in_flight for p in paths))
                return False
            for path in paths:
                if path.in_flight and not path.recycle():
                    if not path.tx.queue.enable_interrupts():
                        select.select([path.tx.call_fd], [], [], 0.05)
                    path.tx.queue.disable_interrupts()
        return True

    def __enter__(self) -> "Forwarder":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


__all__ = ["Forwarder", "ForwardPath", "ForwarderError", "PathStats", "MULTI"]
