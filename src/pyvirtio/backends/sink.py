"""A packet end that swallows every frame: the ``sink`` of ``pyvirtio net --sink``.

It needs no root and no network: each queue pair gets an AF_UNIX datagram socket that
is neither bound nor connected. Such a socket is never readable, so the device gets no
RX frames and its worker sleeps on it cleanly. TX frames never reach it: the sink's
``tx_fds`` are :data:`vqcore.net.DISCARD_FD`, so the burst kernel consumes each TX
chain without a syscall and counts it as sent in the device's per-pair TX counters
(:meth:`pyvirtio.net.device.NetDevice.pair_stats`, ``tx.packets``/``tx.bytes``). That
makes it the packet end of the pure ring-rate benchmark: the device does everything
but copy.

Frames the device injects itself (a RARP announcement) are counted in
:attr:`Sink.injected`.
"""

from __future__ import annotations

import logging
from typing import Sequence

from vqcore.net import DISCARD_FD

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

    @property
    def tx_fds(self) -> Sequence[int]:
        """Where TX frames go: nowhere (:data:`vqcore.net.DISCARD_FD` per pair)."""
        self._check_open()
        return (DISCARD_FD,) * self.queues

    def inject(self, frame: bytes) -> None:
        """A frame the device itself sends to the network (e.g. RARP): counted, dropped."""
        self._check_open()
        self.injected += 1
        log.debug("sink: dropped an injected frame of %d bytes", len(frame))


__all__ = ["Sink", "SinkError"]
