"""The driver side of a virtio-net device: what a guest's virtio-net driver does, over
vqcore's driver-side queues in a guest memory.

:class:`NetDriver` lays out the rings and packet buffers in a :class:`vqcore.GuestMemory`,
posts RX buffers, sends frames, receives frames (reassembling MRG_RXBUF chains), and
talks to the control queue. It is the guest of the tests, the load generator of the
benchmarks and the data path of the vhost-user frontend. How the device learns about the
rings is the transport's business: :meth:`NetDriver.attach` brings up an in-process
:class:`~pyvirtio.device.VirtioDevice` through its status/feature/queue calls.

Buffers are fixed slots: slot ``i`` of a queue's buffer area is the buffer of token
``i``; per-batch calls only, nothing per descriptor in Python.
"""

from __future__ import annotations

import logging
import os
import select
import time
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

import vqcore
from vqcore import ChainBatch, GuestMemory

from pyvirtio.driver import driver_ok, negotiate
from pyvirtio.features import NetFeature, Transport
from pyvirtio.net.header import HDR_LEN

log = logging.getLogger(__name__)

RING_ALIGN = 4096


class NetDriverError(vqcore.VirtioError, RuntimeError):
    """The device refused something the driver needs (features, status, a command)."""


@dataclass
class DriverQueue:
    """One driver-side queue with its buffer slots."""
    index: int
    queue: vqcore.DriverQueue       # split or packed, as the features say
    buf_addr: int                 # guest address of slot 0
    slot_size: int
    slots: int
    kick_fd: int = -1
    call_fd: int = -1
    free: list[int] = field(default_factory=list)     # free slot tokens
    kicks: int = 0
    replay: Replay | None = None                       # the load-generation fast path

    def slot(self, token: int) -> int:
        return self.buf_addr + token * self.slot_size


def wait_used(queues: Sequence[DriverQueue], timeout: float) -> None:
    """Sleep until one of ``queues`` interrupts (up to ``timeout`` seconds), unless used
    chains already wait in one of them; interrupts stay enabled on return."""
    for dq in queues:
        if dq.queue.enable_interrupts():
            return
    ready, _, _ = select.select([dq.call_fd for dq in queues], [], [], timeout)
    for fd in ready:
        try:
            os.eventfd_read(fd)
        except BlockingIOError:
            pass


@dataclass
class Replay:
    """The load-generation fast path of one queue (:meth:`NetDriver.replay_start`):
    pre-built chains over every slot, ``chunk`` slots per template batch, re-added per
    batch in slot order; the device must use them in order (this library's does)."""
    templates: list[ChainBatch]   # template j covers slots [j*chunk, (j+1)*chunk)
    scratch: ChainBatch           # reclaim target
    chunk: int
    next_add: int = 0             # template to add next
    next_back: int = 0            # slot expected back next


class Allocator:
    """A bump allocator over guest-physical space."""

    def __init__(self, base: int, size: int) -> None:
        self.base = self.next = base
        self.end = base + size

    def take(self, n: int, align: int = 64) -> int:
        addr = (self.next + align - 1) // align * align
        if addr + n > self.end:
            raise MemoryError(f"guest memory exhausted: need {n} bytes at {addr:#x}, "
                              f"end {self.end:#x}")
        self.next = addr + n
        return addr


class NetDriver:
    """The guest side of a virtio-net device.

    Args:
        memory: guest memory to lay everything out in (from ``base`` on).
        pairs: queue pairs to set up.
        queue_size: size of every queue.
        ctrl: whether to set up the control queue.
        rx_buffer: size of each RX buffer (header included). Default: 1536 with
            MRG_RXBUF, else 65562 when guest GSO offloads are negotiated, else 1536.
        tx_buffer: size of each TX slot (default 65562: a whole GSO frame).

    The rings are split or packed, with or without the event index, as the features
    given to :meth:`setup` (or negotiated by :meth:`attach`) say.
    """

    def __init__(self, memory: GuestMemory, *, pairs: int = 1, queue_size: int = 256,
                 ctrl: bool = True, rx_buffer: int | None = None, tx_buffer: int = 65562,
                 base: int = 0, size: int | None = None) -> None:
        self.memory = memory
        self.pairs = pairs
        self.queue_size = queue_size
        self.has_ctrl = ctrl
        self.rx_buffer = rx_buffer
        self.tx_buffer = tx_buffer
        self.alloc = Allocator(base, size if size is not None else memory.size - base)
        self.features = 0
        self.rx: list[DriverQueue] = []
        self.tx: list[DriverQueue] = []
        self.ctrlq: DriverQueue | None = None
        self._pending: dict[int, list[tuple[int, int]]] = {}

    # ---- layout ------------------------------------------------------------------------

    @property
    def mrg_rxbuf(self) -> bool:
        return bool(self.features & NetFeature.MRG_RXBUF)

    @property
    def packed(self) -> bool:
        """Whether the rings are packed (VIRTIO_F_RING_PACKED in the features)."""
        return bool(self.features & Transport.RING_PACKED)

    def ring_addresses(self, index: int) -> vqcore.SplitAddresses | vqcore.PackedAddresses:
        """Where queue ``index``'s ring is (after :meth:`setup`): a
        :class:`~vqcore.SplitAddresses` (desc, avail, used, end) or a
        :class:`~vqcore.PackedAddresses` (desc, driver, device, end); either way the
        first three are the descriptor area, driver area and device area."""
        q = self._queue(index).queue
        return vqcore.ring_addresses(q.desc_addr, q.size, self.features)

    def _queue(self, index: int) -> DriverQueue:
        if self.has_ctrl and index == 2 * self.pairs:
            assert self.ctrlq is not None
            return self.ctrlq
        return (self.rx if index % 2 == 0 else self.tx)[index // 2]

    def setup(self, features: int) -> None:
        """Lay out the rings and buffers for the negotiated ``features``."""
        self.features = int(features)
        if self.rx_buffer is None:
            gso = features & (NetFeature.GUEST_TSO4 | NetFeature.GUEST_TSO6 | NetFeature.GUEST_UFO
                              | NetFeature.GUEST_USO4 | NetFeature.GUEST_USO6)
            self.rx_buffer = 1536 if (self.mrg_rxbuf or not gso) else 65562
        n = self.queue_size
        for p in range(self.pairs):
            for kind, slot in (("rx", self.rx_buffer), ("tx", self.tx_buffer)):
                index = 2 * p + (kind == "tx")
                q = self._new_queue(n, f"guest-{kind}{p}")
                buf = self.alloc.take(n * slot, 4096)
                dq = DriverQueue(index, q, buf, slot, n, free=list(range(n)))
                (self.rx if kind == "rx" else self.tx).append(dq)
        if self.has_ctrl:
            q = self._new_queue(64, "guest-ctrl")
            self.ctrlq = DriverQueue(2 * self.pairs, q, self.alloc.take(64 * 4096, 4096), 4096, 64,
                                     free=list(range(64)))

    def _new_queue(self, size: int, name: str) -> vqcore.DriverQueue:
        """A driver queue of ``size`` laid out at the next aligned address, split or
        packed (and with or without the event index) as :attr:`features` say."""
        f = self.features
        ring = vqcore.ring_addresses(
            self.alloc.take(vqcore.ring_addresses(0, size, f).end, RING_ALIGN), size, f)
        return vqcore.driver_queue(self.memory, size, *ring[:3], features=f, name=name)

    def all_queues(self) -> list[DriverQueue]:
        """Every queue in the spec's order (rx0, tx0, rx1, tx1, ..., ctrl)."""
        out: list[DriverQueue] = []
        for p in range(self.pairs):
            out += [self.rx[p], self.tx[p]]
        if self.ctrlq is not None:
            out.append(self.ctrlq)
        return out

    def attach(self, device, features: int | None = None) -> int:
        """Bring an in-process :class:`~pyvirtio.device.VirtioDevice` up the way a
        driver does (status, features, queues, DRIVER_OK) and wire its eventfds.

        ``features``: what to accept (default: everything the device offers).
        Returns the negotiated features."""
        self.setup(negotiate(device, features, NetDriverError))
        device.memory = self.memory
        for dq in self.all_queues():
            desc, driver_area, device_area = self.ring_addresses(dq.index)[:3]
            device.configure_queue(dq.index, size=dq.queue.size, desc=desc,
                                   avail=driver_area, used=device_area, enabled=True)
            dq.kick_fd = device.kick_fds[dq.index]
            dq.call_fd = device.call_fds[dq.index]
        driver_ok(device, NetDriverError)
        for p in range(self.pairs):
            self.post_rx(p)
        return self.features

    # ---- notifications -------------------------------------------------------------------

    def _kick(self, dq: DriverQueue) -> None:
        if dq.queue.kick_needed() and dq.kick_fd >= 0:
            os.eventfd_write(dq.kick_fd, 1)
            dq.kicks += 1

    @staticmethod
    def wait(fd: int, timeout: float) -> bool:
        """Wait for an eventfd (an interrupt); True if it fired."""
        r, _, _ = select.select([fd], [], [], timeout)
        if r:
            try:
                os.eventfd_read(fd)
            except BlockingIOError:
                pass
            return True
        return False

    # ---- RX -----------------------------------------------------------------------------

    def post_rx(self, pair: int) -> int:
        """Offer every free RX slot of ``pair`` to the device; returns how many."""
        dq = self.rx[pair]
        if not dq.free:
            return 0
        tokens = np.array(dq.free, dtype=np.uint64)
        n = len(tokens)
        b = ChainBatch(n)
        b.load(dq.buf_addr + tokens * dq.slot_size, np.full(n, dq.slot_size), np.ones(n),
               np.zeros(n), tokens)
        added = dq.queue.add(b)
        del dq.free[:added]
        self._kick(dq)
        return added

    def recv(self, pair: int, timeout: float = 0.0, max_frames: int | None = None
             ) -> list[tuple[bytes, bytes]]:
        """Frames received on ``pair`` as ``(header, frame)``; waits up to ``timeout``
        for the first one. Buffers are re-posted."""
        dq = self.rx[pair]
        deadline = time.monotonic() + timeout
        out: list[tuple[bytes, bytes]] = []
        pending = self._pending.setdefault(pair, [])
        b = ChainBatch(dq.slots)
        while True:
            dq.queue.disable_interrupts()
            n = dq.queue.reclaim(b)
            pending += [(int(t), int(ln)) for t, ln in zip(b.tokens[:n], b.used_len[:n])]
            out += self._assemble(dq, pending)
            if n:
                self.post_rx(pair)
            if out and (max_frames is None or len(out) >= max_frames):
                break
            if n:
                continue
            left = deadline - time.monotonic()
            if left <= 0:
                break
            if not dq.queue.enable_interrupts():
                self.wait(dq.call_fd, min(left, 0.05))
        return out

    def _assemble(self, dq: DriverQueue, pending: list[tuple[int, int]]) -> list[tuple[bytes, bytes]]:
        out = []
        while pending:
            token, length = pending[0]
            first = self.memory.read(dq.slot(token), length)
            count = int.from_bytes(first[10:12], "little") if self.mrg_rxbuf else 1
            if count < 1:
                count = 1
            if len(pending) < count:
                break                      # the rest of the frame has not arrived yet
            data = bytearray(first)
            for tok, ln in pending[1:count]:
                data += self.memory.read(dq.slot(tok), ln)
            for tok, _ in pending[:count]:
                dq.free.append(tok)
            del pending[:count]
            out.append((bytes(data[:HDR_LEN]), bytes(data[HDR_LEN:])))
        return out

    # ---- TX -----------------------------------------------------------------------------

    def reclaim_tx(self, pair: int) -> int:
        """Collect sent TX chains; returns how many."""
        dq = self.tx[pair]
        b = ChainBatch(dq.slots)
        n = dq.queue.reclaim(b)
        dq.free += b.tokens[:n].astype(int).tolist()
        return n

    def send(self, pair: int, frames: Sequence[bytes], header: bytes = bytes(HDR_LEN),
             *, headers: Sequence[bytes] | None = None) -> int:
        """Queue ``frames`` (each preceded by ``header`` or its own of ``headers``) on
        ``pair``'s TX queue and kick; returns how many fit."""
        dq = self.tx[pair]
        self.reclaim_tx(pair)
        n = min(len(frames), len(dq.free))
        if n == 0:
            return 0
        tokens = dq.free[:n]
        del dq.free[:n]
        lens = []
        for i in range(n):
            hdr = headers[i] if headers is not None else header
            data = bytes(hdr) + bytes(frames[i])
            if len(data) > dq.slot_size:
                raise ValueError(f"frame of {len(data)} bytes exceeds the {dq.slot_size}-byte slot")
            self.memory.write(dq.slot(tokens[i]), data)
            lens.append(len(data))
        tok = np.array(tokens, dtype=np.uint64)
        b = ChainBatch(n)
        b.load(dq.buf_addr + tok * dq.slot_size, np.array(lens), np.ones(n), np.ones(n), tok)
        added = dq.queue.add(b)
        assert added == n, (added, n)
        self._kick(dq)
        return n

    def wait_tx_done(self, pair: int, timeout: float = 5.0) -> bool:
        """Wait until every TX chain of ``pair`` was returned."""
        dq = self.tx[pair]
        deadline = time.monotonic() + timeout
        while dq.queue.in_flight:
            self.reclaim_tx(pair)
            if not dq.queue.in_flight:
                break
            if time.monotonic() > deadline:
                return False
            if not dq.queue.enable_interrupts():
                self.wait(dq.call_fd, 0.05)
            dq.queue.disable_interrupts()
        return True

    # ---- load generation: pre-written slots re-used per batch ------------------------------

    def replay_start(self, index: int, frame: bytes | None = None, *,
                     header: bytes = bytes(HDR_LEN), chunk: int | None = None) -> None:
        """Turn queue ``index`` (rx = ``2*pair``, tx = ``2*pair + 1``) into a load
        generator for :meth:`replay`: nothing per frame in Python afterwards.

        TX: ``header + frame`` is written once into every slot; nothing may be in
        flight. RX: every slot must be posted in slot order (as :meth:`attach` leaves
        it), or none (the first :meth:`replay` posts them); frames received are never
        looked at. ``chunk`` (a divisor of the queue size; default: a quarter of the
        queue for TX, a sixteenth for RX) is how many slots are added at a time: less
        than the whole queue, so the device finds chains while the guest refills."""
        dq = self._queue(index)
        is_tx = index % 2 == 1 and dq is not self.ctrlq
        n = dq.slots
        chunk = chunk or max(1, n // 4 if is_tx else n // 16)
        if n % chunk:
            raise ValueError(f"chunk {chunk} does not divide the queue size {n}")
        if is_tx:
            if frame is None:
                raise ValueError("a TX replay needs a frame")
            if dq.queue.in_flight or len(dq.free) != n:
                raise NetDriverError(f"queue {index}: TX replay needs an idle queue")
            data = np.frombuffer(bytes(header) + bytes(frame), np.uint8)
            if len(data) > dq.slot_size:
                raise ValueError(f"frame of {len(data)} bytes exceeds the "
                                 f"{dq.slot_size}-byte slot")
            slots = self.memory.array(dq.buf_addr, n * dq.slot_size).reshape(n, dq.slot_size)
            slots[:, :len(data)] = data
            length, readable, first_back = len(data), 1, 0
            dq.free.clear()
        else:
            if dq.free == list(range(n)) and not dq.queue.in_flight:
                dq.free.clear()       # nothing posted yet: the first replay() posts all
            elif dq.free or dq.queue.in_flight != n:
                raise NetDriverError(f"queue {index}: RX replay needs every buffer posted "
                                     "in slot order, or none")
            length, readable, first_back = dq.slot_size, 0, 0
        templates = []
        for j in range(n // chunk):
            tokens = np.arange(j * chunk, (j + 1) * chunk, dtype=np.uint64)
            b = ChainBatch(chunk)
            b.load(dq.buf_addr + tokens * dq.slot_size, np.full(chunk, length),
                   np.ones(chunk), np.full(chunk, readable), tokens)
            templates.append(b)
        dq.replay = Replay(templates, ChainBatch(n), chunk, next_back=first_back)

    def replay(self, index: int, refill: bool = True) -> int:
        """Reclaim what the device used on queue ``index`` and (with ``refill``) re-add
        the same slots, a chunk at a time, kicking when needed; returns how many chains
        came back. Raises :class:`NetDriverError` when the device used the chains out of
        order."""
        dq = self._queue(index)
        r = dq.replay
        if r is None:
            raise NetDriverError(f"queue {index}: replay_start() first")
        q = dq.queue
        got = q.reclaim(r.scratch)
        if got:
            if int(r.scratch.tokens[0]) != r.next_back:
                raise NetDriverError(f"queue {index}: chains used out of order, replay "
                                     "needs in-order use")
            r.next_back = (r.next_back + got) % dq.slots
        added = False
        while refill and q.num_free >= r.chunk:
            q.add(r.templates[r.next_add], publish=False)
            r.next_add = (r.next_add + 1) % len(r.templates)
            added = True
        if added:
            q.publish()
            self._kick(dq)
        return got

    def replay_stop(self, index: int, timeout: float = 5.0) -> bool:
        """End the fast path on queue ``index``: a TX queue waits until everything sent
        came back (False on timeout); then every slot is free again (TX) or still
        posted (RX) for the ordinary calls."""
        dq = self._queue(index)
        r = dq.replay
        if r is None:
            return True
        is_tx = index % 2 == 1 and dq is not self.ctrlq
        deadline = time.monotonic() + timeout
        while is_tx and dq.queue.in_flight:
            q = dq.queue
            if not q.reclaim(r.scratch):
                if time.monotonic() > deadline:
                    return False
                if not q.enable_interrupts():
                    self.wait(dq.call_fd, 0.05)
                q.disable_interrupts()
        dq.replay = None
        if is_tx:
            dq.free = list(range(dq.slots))
        return True

    # ---- control queue ----------------------------------------------------------------------

    def ctrl_command(self, cls: int, cmd: int, data: bytes = b"", timeout: float = 5.0) -> int:
        """Send one control command and wait for its ack (VIRTIO_NET_OK = 0)."""
        dq = self.ctrlq
        if dq is None:
            raise NetDriverError("no control queue")
        if len(data) + 2 > dq.slot_size - 1:
            raise ValueError("command too long")
        token = dq.free.pop(0)
        addr = dq.slot(token)
        self.memory.write(addr, bytes([cls, cmd]) + bytes(data) + b"\xff")
        b = ChainBatch(1)
        b.append([(addr, 2 + len(data))], [(addr + 2 + len(data), 1)], token=token)
        dq.queue.add(b)
        self._kick(dq)
        out = ChainBatch(8)
        deadline = time.monotonic() + timeout
        while True:
            n = dq.queue.reclaim(out)
            if n:
                dq.free += out.tokens[:n].astype(int).tolist()
                ack = self.memory.read(addr + 2 + len(data), 1)[0]
                return ack
            if time.monotonic() > deadline:
                raise TimeoutError("control command not answered")
            if not dq.queue.enable_interrupts():
                self.wait(dq.call_fd, 0.05)
            dq.queue.disable_interrupts()


__all__ = ["Allocator", "DriverQueue", "NetDriver", "NetDriverError", "Replay"]
