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

from pyvirtio.backends.sockets import SocketBackend, SocketBackendError

log = logging.getLogger(__name__)


class SinkError(SocketBackendError):
    """The sink is used after :meth:`Sink.close`, or got a bad argument."""


class Sink(SocketBackend):
    """A :class:`~pyvirtio.net.device.PacketBackend` that drops every frame.

    Args:
        queues: queue pairs (one fd each).
        mtu: the MTU it reports (it has no link; :meth:`set_mtu` records a new one).
    """

    kind = "sink"
    error = SinkError

    def __init__(self, queues: int = 1, *, mtu: int = 1500) -> None:
        #: frames given to :meth:`inject`
        self.injected = 0
        super().__init__(queues, mtu=mtu)

    def inject(self, frame: bytes) -> None:
        """A frame the device itself sends to the network (e.g. RARP): counted, dropped."""
        self._check_open()
        self.injected += 1
        log.debug("sink: dropped an injected frame of %d bytes", len(frame))


__all__ = ["Sink", "SinkError"]
