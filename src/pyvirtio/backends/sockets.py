"""SocketBackend: a packet end made of one AF_UNIX datagram socket per queue pair.

The base of :mod:`~pyvirtio.backends.sink` and :mod:`~pyvirtio.backends.loopback`:
it owns the sockets, hands out their fds, records offloads, active queues and MTU (there
is no link to configure), and closes everything. A subclass says how a socket is opened
(:meth:`SocketBackend._open`) and what injecting a frame means.
"""

from __future__ import annotations

import socket
from typing import Sequence

from vqcore.errors import VirtioError


class SocketBackendError(VirtioError, OSError):
    """A socket backend is used after close, or got a bad argument."""


class SocketBackend:
    """One datagram socket per queue pair (see the subclasses)."""

    kind = "sockets"
    error: type[SocketBackendError] = SocketBackendError

    def __init__(self, queues: int = 1, *, mtu: int = 1500) -> None:
        if not isinstance(queues, int) or queues < 1:
            raise self.error(f"queue count {queues!r} must be >= 1")
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

    def _open(self) -> socket.socket:
        """A new non-blocking socket for one queue pair."""
        s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        s.setblocking(False)
        return s

    @property
    def fds(self) -> Sequence[int]:
        """One fd per queue pair."""
        self._check_open()
        return tuple(s.fileno() for s in self._socks)

    @property
    def tx_fds(self) -> Sequence[int]:
        """Where TX frames go: the sockets themselves (a subclass may say otherwise)."""
        return self.fds

    @property
    def queues(self) -> int:
        """How many queue pairs the backend serves."""
        return len(self._socks)

    def _check_open(self) -> None:
        if self._closed:
            raise self.error(f"the {self.kind} is closed")

    def set_offloads(self, features: int) -> int:
        """Accept any offloads (frames are not parsed); returns ``features``."""
        self.offloads = int(features)
        return self.offloads

    def set_active_queues(self, n: int) -> None:
        """Record how many queue pairs carry traffic."""
        if not 1 <= n <= len(self._socks):
            raise self.error(f"cannot activate {n} queues of {len(self._socks)}")
        self.active_queues = n

    def set_mtu(self, mtu: int) -> None:
        """Record the MTU."""
        self.mtu = int(mtu)

    def close(self) -> None:
        """Close the sockets (frames still in them are dropped). Idempotent."""
        if self._closed:
            return
        self._closed = True
        for s in self._socks:
            s.close()
        self._socks = []

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"<{type(self).__name__} queues={len(self._socks)}"
                f"{' closed' if self._closed else ''}>")


__all__ = ["SocketBackend", "SocketBackendError"]
