"""A packet end that returns every TX frame as RX: ``pyvirtio net --loopback``.

Each queue pair gets one AF_UNIX datagram socket bound to a kernel-chosen abstract
address and connected to itself: what the device's worker writes (the 12-byte
virtio-net header and the frame, in one datagram) it reads back, frame boundaries and
all. No thread, no root, no network: a frame sent on ``transmitq N`` arrives on
``receiveq N`` of the same guest, with the header it was sent with (``num_buffers``
rewritten by the device). A frame the guest sends with GSO offloads comes back as the
same GSO frame, so a guest that sends them should also accept them (negotiate the
GUEST_* offloads it uses as HOST_*).

A datagram socket connected to itself is not subject to the receive-queue length limit
(``net.unix.max_dgram_qlen``); the send buffer bounds the frames in flight, and a full
buffer makes the device wait (``EAGAIN``) until its RX side drained it.
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Sequence

from vqcore.errors import VirtioError

from pyvirtio.net.header import HDR_LEN

log = logging.getLogger(__name__)

#: send buffer asked for each socket (the kernel caps it at net.core.wmem_max)
SOCKET_BUFFER = 4 << 20


class LoopbackError(VirtioError, OSError):
    """The loopback is used after :meth:`Loopback.close`, or got a bad argument."""


class Loopback:
    """A :class:`~pyvirtio.net.device.PacketBackend` that loops TX back to RX.

    Args:
        queues: queue pairs (one self-connected socket each).
        mtu: the MTU it reports (:meth:`set_mtu` records a new one).
    """

    kind = "loopback"

    def __init__(self, queues: int = 1, *, mtu: int = 1500) -> None:
        if not isinstance(queues, int) or queues < 1:
            raise LoopbackError(f"queue count {queues!r} must be >= 1")
        self._socks: list[socket.socket] = []
        try:
            for _ in range(queues):
                self._socks.append(self._open())
        except BaseException:
            for s in self._socks:
                s.close()
            raise
        self.mtu = mtu
        self.offloads = 0
        self.active_queues = queues
        self._closed = False

    @staticmethod
    def _open() -> socket.socket:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            s.bind("")                   # autobind: a unique abstract address
            s.connect(s.getsockname())
            for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
                s.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER)
            s.setblocking(False)
        except BaseException:
            s.close()
            raise
        return s

    @property
    def fds(self) -> Sequence[int]:
        """One fd per queue pair."""
        self._check_open()
        return tuple(s.fileno() for s in self._socks)

    @property
    def queues(self) -> int:
        """How many queue pairs the loopback serves."""
        return len(self._socks)

    def _check_open(self) -> None:
        if self._closed:
            raise LoopbackError("the loopback is closed")

    def set_offloads(self, features: int) -> int:
        """Frames come back unchanged whatever the offloads; returns ``features``."""
        self.offloads = int(features)
        return self.offloads

    def set_active_queues(self, n: int) -> None:
        """Record how many queue pairs carry traffic (each loops on its own)."""
        if not 1 <= n <= len(self._socks):
            raise LoopbackError(f"cannot activate {n} queues of {len(self._socks)}")
        self.active_queues = n

    def set_mtu(self, mtu: int) -> None:
        """Record the MTU."""
        self.mtu = int(mtu)

    def inject(self, frame: bytes, pair: int = 0) -> None:
        """Send ``frame`` (no virtio-net header) as if the guest had sent it on
        ``pair``: it comes back on that pair's receive queue."""
        self._check_open()
        os.write(self._socks[pair].fileno(), bytes(HDR_LEN) + bytes(frame))

    def close(self) -> None:
        """Close the sockets (frames still in them are dropped). Idempotent."""
        if self._closed:
            return
        self._closed = True
        for s in self._socks:
            s.close()
        self._socks = []

    def __enter__(self) -> "Loopback":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Loopback queues={len(self._socks)}{' closed' if self._closed else ''}>"


__all__ = ["Loopback", "LoopbackError", "SOCKET_BUFFER"]
