"""Guest memory a vhost-user front-end shares with its back-ends: one ``memfd``, mapped
here once, described to every back-end by the same memory table.

The region's ``userspace_addr`` is the address of our own mapping, so a ring address
the front-end sends (SET_VRING_ADDR) is simply where the ring lives in this process,
and a buffer address in a descriptor is the region's guest-physical address plus the
offset. Several front-ends may share one :class:`SharedGuestMemory` (the forwarder
does): each takes its own area with :meth:`SharedGuestMemory.reserve`, and a buffer of
one is valid in the rings of another because every back-end maps the same table.
"""

from __future__ import annotations

import logging
import mmap
import os

import numpy as np

from vqcore import GuestMemory
from vqcore.errors import VirtioError

from pyvirtio.vhost_user.messages import MemRegion, MemTable

log = logging.getLogger(__name__)

PAGE_SIZE = mmap.PAGESIZE
#: where the guest-physical address space of the region starts by default: neither 0
#: nor the mapping's own address, so a back-end that mixes up the two address kinds fails
DEFAULT_GPA = 1 << 32


class SharedMemoryError(VirtioError, MemoryError):
    """The shared memory is exhausted, or an address is outside it."""


class SharedGuestMemory:
    """A ``memfd`` of ``size`` bytes mapped shared, as one guest memory region.

    Args:
        size: bytes (rounded up to whole pages).
        gpa: guest-physical address of the region's first byte.
        name: the memfd's name (shows in ``/proc/<pid>/fd``).

    Attributes:
        fd: the memfd (sent with SET_MEM_TABLE; closed by :meth:`close`).
        memory: the :class:`vqcore.GuestMemory` over the mapping (``uva`` = its address).
        uva: the mapping's address in this process.
    """

    def __init__(self, size: int, *, gpa: int = DEFAULT_GPA, name: str = "pyvirtio-guest"
                 ) -> None:
        if size <= 0:
            raise ValueError(f"shared memory size must be positive, not {size}")
        size = (size + PAGE_SIZE - 1) // PAGE_SIZE * PAGE_SIZE
        self.size = size
        self.gpa = gpa
        self.fd = os.memfd_create(name, os.MFD_CLOEXEC)
        try:
            os.ftruncate(self.fd, size)
            self._mmap: mmap.mmap | None = mmap.mmap(self.fd, size, mmap.MAP_SHARED,
                                                     mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(self.fd)
            raise
        self._array: np.ndarray | None = np.frombuffer(self._mmap, np.uint8)
        self.uva = int(self._array.ctypes.data)
        self.memory = GuestMemory()
        self.memory.add_region(gpa, self._array, uva=self.uva)
        self._next = gpa
        log.debug("memfd %d: %d bytes at gpa %#x, uva %#x", self.fd, size, gpa, self.uva)

    # ---- areas -------------------------------------------------------------------------

    def reserve(self, nbytes: int, align: int = PAGE_SIZE) -> int:
        """Take ``nbytes`` of guest-physical space (for one front-end's rings and
        buffers); returns its first address."""
        addr = (self._next + align - 1) // align * align
        if addr + nbytes > self.gpa + self.size:
            raise SharedMemoryError(
                f"shared memory exhausted: {nbytes} bytes wanted at {addr:#x}, "
                f"{self.gpa + self.size - addr} left of {self.size}")
        self._next = addr + nbytes
        return addr

    @property
    def free(self) -> int:
        """Bytes not reserved yet."""
        return self.gpa + self.size - self._next

    # ---- addresses -----------------------------------------------------------------------

    def uva_of(self, gpa: int, length: int = 1) -> int:
        """The front-end (user) address of guest-physical ``gpa``."""
        if not (self.gpa <= gpa and gpa + length <= self.gpa + self.size):
            raise SharedMemoryError(f"gpa {gpa:#x}+{length} is outside the shared memory")
        return self.uva + (gpa - self.gpa)

    def table(self) -> MemTable:
        """The SET_MEM_TABLE body describing this memory (send it with :attr:`fd`)."""
        return MemTable([MemRegion(self.gpa, self.size, self.uva, 0)])

    # ---- life cycle ------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._mmap is None

    def close(self) -> None:
        """Close the memfd and let go of the mapping: it is unmapped at once unless
        queues or batches over :attr:`memory` are still alive somewhere (then when the
        last of them goes; nothing is unmapped under a user). Idempotent."""
        if self._mmap is None:
            return
        memory, self.memory = self.memory, GuestMemory()
        if not memory.attached:
            memory.close()                # its exports go now
        else:
            log.debug("memfd %d: still in use by %d queue(s) or batch(es); unmapped when "
                      "the last goes", self.fd, memory.attached)
        self._array = None
        self._mmap = None                 # the last reference unmaps (mmap's own dealloc)
        os.close(self.fd)
        self.fd = -1

    def __enter__(self) -> "SharedGuestMemory":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"<SharedGuestMemory fd={self.fd} size={self.size:#x} gpa={self.gpa:#x} "
                f"uva={self.uva:#x}>")


__all__ = ["SharedGuestMemory", "SharedMemoryError", "DEFAULT_GPA", "PAGE_SIZE"]
