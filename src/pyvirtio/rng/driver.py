"""The driver side of a virtio-rng device: what a guest's virtio-rng driver does, over a
vqcore driver-side queue in a guest memory.

:class:`RngDriver` lays out the request queue and its buffers in a
:class:`vqcore.GuestMemory`, offers requests (device-writable buffers), and collects
the random bytes the device wrote. It is the guest of the tests; how the device learns
about the ring is the transport's business: :meth:`RngDriver.attach` brings up an
in-process :class:`~pyvirtio.device.VirtioDevice` through its status, feature and
queue calls.

Buffers are fixed slots: slot ``i`` of the buffer area is the buffer of token ``i``;
per-batch calls only, nothing per descriptor in Python.
"""

from __future__ import annotations

import os
import select
import time

import numpy as np

import vqcore
from vqcore import ChainBatch, GuestMemory

from pyvirtio.driver import driver_ok, negotiate


class RngDriverError(vqcore.VirtioError, RuntimeError):
    """The device refused something the driver needs (features, status)."""


class RngDriver:
    """The guest side of a virtio-rng device: one request queue of ``queue_size``
    buffers of ``buffer_size`` bytes, laid out in ``memory`` from ``base`` on (the ring,
    then the buffers from the next 4 KiB boundary)."""

    def __init__(self, memory: GuestMemory, *, queue_size: int = 256, buffer_size: int = 4096,
                 base: int = 0) -> None:
        self.memory = memory
        self.queue_size = queue_size
        self.buffer_size = buffer_size
        self.base = base
        self.features = 0
        self.queue: vqcore.DriverQueue | None = None
        self.buf_addr = 0
        self.kick_fd = -1
        self.call_fd = -1
        self.kicks = 0
        self.free: list[int] = []

    def setup(self, features: int) -> None:
        """Lay out the ring (split or packed, with or without the event index, as
        ``features`` say) and the buffers."""
        self.features = f = int(features)
        n = self.queue_size
        ring = vqcore.ring_addresses(self.base, n, f)
        self.buf_addr = (ring.end + 4095) // 4096 * 4096
        self.memory.translate(self.buf_addr, n * self.buffer_size)    # (raises if no room)
        self.queue = vqcore.driver_queue(self.memory, n, *ring[:3], features=f,
                                         name="guest-rng")
        self.free = list(range(n))

    def attach(self, device, features: int | None = None) -> int:
        """Bring an in-process device up the way a driver does (status, features, the
        request queue, DRIVER_OK) and use its eventfds (``kick_fds[0]``,
        ``call_fds[0]``). ``features``: what to accept (default: all offered).
        Returns the negotiated features."""
        self.setup(negotiate(device, features, RngDriverError))
        device.memory = self.memory
        q = self.queue
        desc, driver_area, device_area = vqcore.ring_addresses(q.desc_addr, q.size,
                                                               self.features)[:3]
        device.configure_queue(0, size=q.size, desc=desc, avail=driver_area,
                               used=device_area, enabled=True)
        self.kick_fd, self.call_fd = device.kick_fds[0], device.call_fds[0]
        driver_ok(device, RngDriverError)
        return self.features

    def slot(self, token: int) -> int:
        """Guest address of buffer ``token``."""
        return self.buf_addr + token * self.buffer_size

    def request(self, count: int | None = None, size: int | None = None) -> int:
        """Offer up to ``count`` (default: every free) buffers of ``size`` bytes
        (default: the buffer size) as requests and kick if the device wants it;
        returns how many were offered."""
        size = self.buffer_size if size is None else size
        if not 0 < size <= self.buffer_size:
            raise ValueError(f"request size {size}: must be 1..{self.buffer_size}")
        n = len(self.free) if count is None else min(count, len(self.free))
        if n == 0:
            return 0
        tokens = np.array(self.free[:n], dtype=np.uint64)
        b = ChainBatch(n)
        b.load(self.buf_addr + tokens * self.buffer_size, np.full(n, size), np.ones(n),
               np.zeros(n), tokens)
        added = self.queue.add(b)
        del self.free[:added]
        if added and self.queue.kick_needed() and self.kick_fd >= 0:
            os.eventfd_write(self.kick_fd, 1)
            self.kicks += 1
        return added

    def collect(self, timeout: float = 0.0) -> list[bytes]:
        """The requests the device completed, as the bytes it wrote into each (in the
        order it completed them); waits up to ``timeout`` for the first. Their buffers
        are free again."""
        q = self.queue
        b = ChainBatch(self.queue_size)
        deadline = time.monotonic() + timeout
        while True:
            q.disable_interrupts()
            n = q.reclaim(b)
            if n or time.monotonic() >= deadline:
                break
            if not q.enable_interrupts():
                select.select([self.call_fd], [], [], min(deadline - time.monotonic(), 0.05))
                try:
                    os.eventfd_read(self.call_fd)
                except BlockingIOError:
                    pass
        out = [self.memory.read(self.slot(int(t)), int(ln))
               for t, ln in zip(b.tokens[:n], b.used_len[:n])]
        self.free += b.tokens[:n].astype(int).tolist()
        return out

    def read(self, nbytes: int, timeout: float = 10.0, size: int | None = None) -> bytes:
        """``nbytes`` random bytes (or fewer when ``timeout`` passes first), keeping
        every free buffer offered as a request of ``size`` bytes meanwhile."""
        deadline = time.monotonic() + timeout
        got = bytearray()
        while len(got) < nbytes:
            self.request(size=size)
            left = deadline - time.monotonic()
            if left <= 0:
                break
            for data in self.collect(min(left, 0.5)):
                got += data
        return bytes(got[:nbytes])


__all__ = ["RngDriver", "RngDriverError"]
