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

from pyvirtio.backends.sockets import SocketBackend, SocketBackendError
from pyvirtio.net.header import HDR_LEN

log = logging.getLogger(__name__)

#: send buffer asked for each socket (the kernel caps it at net.core.wmem_max)
SOCKET_BUFFER = 4 << 20


class LoopbackError(SocketBackendError):
    """The loopback is used after :meth:`Loopback.close`, or got a bad argument."""


class Loopback(SocketBackend):
    """A :class:`~pyvirtio.net.device.PacketBackend` that loops TX back to RX.

    Args:
        queues: queue pairs (one self-connected socket each).
        mtu: the MTU it reports (:meth:`set_mtu` records a new one).
    """

    kind = "loopback"
    error = LoopbackError

    def _open(self) -> socket.socket:
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

    def inject(self, frame: bytes, pair: int = 0) -> None:
        """Send ``frame`` (no virtio-net header) as if the guest had sent it on
        ``pair``: it comes back on that pair's receive queue."""
        self._check_open()
        os.write(self._socks[pair].fileno(), bytes(HDR_LEN) + bytes(frame))


__all__ = ["Loopback", "LoopbackError", "SOCKET_BUFFER"]
