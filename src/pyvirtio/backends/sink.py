"""A packet end that swallows every frame: the ``sink`` of ``pyvirtio net --sink``.

It needs no root and no network: each queue pair gets an AF_UNIX datagram socket that
is neither bound nor connected. Such a socket is never readable (the device gets no RX
frames, and its worker sleeps on it cleanly) and refuses every write at once
(``ENOTCONN``, before any buffer is allocated), so each TX frame is returned to the
guest and counted as dropped in the device's per-pair TX counters
(:meth:`pyvirtio.net.device.NetDevice.pair_stats`, ``tx.dropped``). That makes it the
packet end of the pure ring-rate benchmark: the device does everything but copy.

Frames the device injects itself (a RARP announcement) are counted in
:attr:`Sink.injected`.
"""

from __future__ import annotations

import logging
import socket
from typing import Sequence

from vqcore.errors import VirtioError

log = logging.getLogger(__name__)


class SinkError(VirtioError, OSError):
    """The sink is used after :meth:`Sink.close`, or got a bad argument."""


class Sink:
    """A :class:`~pyvirtio.net.device.PacketBackend` that drops every frame.

    Args:
        queues: queue pairs (one fd each).
        mtu: the MTU it reports (it has no link; :meth:`set_mtu` records a new one).
    """

    kind = "sink"

    def __init__(self, queues: int = 1, *, mtu: int = 1500) -> None:
        if not isinstance(queues, int) or queues < 1:
            raise SinkError(f"queue count {queues!r} must be >= 1")
        self._socks = []
        try:
            for _ in range(queues):
                s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                s.setblocking(False)
                self._socks.append(s)
        except BaseException:
            for s in self._socks:
                s.close()
            raise
        self.mtu = mtu
        self.offloads = 0
        self.active_queues = queues
        #: frames given to :meth:`inject`
        self.injected = 0
        self._closed = False

    @property
    def fds(self) -> Sequence[int]:
        """One fd per queue pair."""
        self._check_open()
        return tuple(s.fileno() for s in self._socks)

    @property
    def queues(self) -> int:
        """How many queue pairs the sink serves."""
        return len(self._socks)

    def _check_open(self) -> None:
        if self._closed:
            raise SinkError("the sink is closed")

    def set_offloads(self, features: int) -> int:
        """Accept any offloads (nothing is parsed); returns ``features``."""
        self.offloads = int(features)
        return self.offloads

    def set_active_queues(self, n: int) -> None:
        """Record how many queue pairs carry traffic (all drop alike)."""
        if not 1 <= n <= len(self._socks):
            raise SinkError(f"cannot activate {n} queues of {len(self._socks)}")
        self.active_queues = n

    def set_mtu(self, mtu: int) -> None:
        """Record the MTU."""
        self.mtu = int(mtu)

    def inject(self, frame: bytes) -> None:
        """A frame the device itself sends to the network (e.g. RARP): counted, dropped."""
        self._check_open()
        self.injected += 1
        log.debug("sink: dropped an injected frame of %d bytes", len(frame))

    def close(self) -> None:
        """Close the sockets. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for s in self._socks:
            s.close()
        self._socks = []

    def __enter__(self) -> "Sink":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Sink queues={len(self._socks)}{' closed' if self._closed else ''}>"


__all__ = ["Sink", "SinkError"]
