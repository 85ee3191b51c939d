"""The vhost-user front-end of a virtio-rng device: the generic client
(:class:`~pyvirtio.vhost_user.client.VhostUserClient`) with the request queue laid out by
:class:`~pyvirtio.rng.driver.RngDriver` in shared memory.

:class:`VhostUserRngFrontend` is what QEMU's vhost-user-rng-pci does for a guest, done
for a Python program: it connects to any vhost-user-rng back-end (``pyvirtio rng``, the
README's example device, a C daemon) and reads random bytes from it
(:meth:`VhostUserRngFrontend.read`).
"""

from __future__ import annotations

import os

from pyvirtio.features import Transport
from pyvirtio.rng.driver import RngDriver
from pyvirtio.vhost_user.client import FrontendError, VhostUserClient
from pyvirtio.vhost_user.memfd import PAGE_SIZE, SharedGuestMemory

#: what the front-end asks for by default (each bit only if the back-end offers it)
DEFAULT_FEATURES = (Transport.VERSION_1 | Transport.EVENT_IDX | Transport.INDIRECT_DESC
                    | Transport.PROTOCOL_FEATURES)

_EFD_FLAGS = os.EFD_NONBLOCK | os.EFD_CLOEXEC


class VhostUserRngFrontend(VhostUserClient):
    """The front-end of one vhost-user-rng back-end.

    Args:
        queue_size: size of the request queue.
        buffer_size: bytes of each request buffer.
        features: virtio features wanted (default :data:`DEFAULT_FEATURES`; add
            ``Transport.RING_PACKED`` for a packed ring).
        protocol_features, memory, reply_timeout, disable_before_stop, err_fds, name: as
            :class:`~pyvirtio.vhost_user.client.VhostUserClient`.
    """

    def __init__(self, *, queue_size: int = 64, buffer_size: int = 4096,
                 features: int | None = None, name: str = "vhost-user-rng",
                 memory: SharedGuestMemory | None = None, **kwargs) -> None:
        super().__init__(num_queues=1,
                         features=int(DEFAULT_FEATURES if features is None else features),
                         memory=memory, name=name, **kwargs)
        self.queue_size = queue_size
        self.buffer_size = buffer_size
        self.driver: RngDriver | None = None

    def _layout(self) -> list:
        if self.driver is None:
            need = (64 << 10) + self.queue_size * (16 + self.buffer_size) + 2 * PAGE_SIZE
            if self.memory is None:
                self.memory = SharedGuestMemory(need, name=f"pyvirtio-{self.name}")
                self._owns_memory = True
            driver = RngDriver(self.memory.memory, queue_size=self.queue_size,
                               buffer_size=self.buffer_size, base=self.memory.reserve(need))
            driver.setup(self.features)
            driver.kick_fd = os.eventfd(0, _EFD_FLAGS)
            driver.call_fd = os.eventfd(0, _EFD_FLAGS)
            self.driver = driver
        return [_Ring(self.driver)]

    def _reset_rings(self) -> None:
        assert self.driver is not None and self.driver.queue is not None
        self.driver.queue.reset()
        self.driver.free = list(range(self.queue_size))

    def _release_rings(self) -> None:
        if self.driver is not None:
            for fd in (self.driver.kick_fd, self.driver.call_fd):
                if fd >= 0:
                    os.close(fd)
            self.driver = None

    def read(self, nbytes: int, timeout: float = 10.0) -> bytes:
        """``nbytes`` random bytes from the back-end (fewer if ``timeout`` passes
        first)."""
        if self.driver is None or not self.running:
            raise FrontendError(f"{self.name}: not started")
        return self.driver.read(nbytes, timeout)


class _Ring:
    """The request queue as the client sets it up (index, queue, kick and call fds)."""

    def __init__(self, driver: RngDriver) -> None:
        self.index = 0
        self.queue = driver.queue
        self.kick_fd = driver.kick_fd
        self.call_fd = driver.call_fd


__all__ = ["VhostUserRngFrontend", "DEFAULT_FEATURES"]
