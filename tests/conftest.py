"""Shared fixtures of the test suite.

* ``impl``: the implementation under test, parametrized over the Cython engine (the
  ``vqcore`` package) and the pure-Python reference model (``vqcore.model``). Both
  expose ``GuestMemory``, ``ChainBatch``, ``SplitDeviceQueue``, ``SplitDriverQueue``,
  ``split_layout``, ``split_addresses``, ``need_event`` and the exception classes, so a
  test written against ``impl.X`` runs on both.
* ``make_guest``: builds a :class:`Guest`: one numpy buffer as guest memory holding a
  split ring laid out by ``split_addresses``, an optional indirect-table area and a
  data area filled with a known pattern.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

import vqcore
import vqcore.model

#: name -> module exposing the queue API
IMPLEMENTATIONS = {"engine": vqcore, "model": vqcore.model}

#: guest-physical address where make_guest puts the ring
RING_BASE = 0x10000


@pytest.fixture(params=sorted(IMPLEMENTATIONS))
def impl(request):
    """The implementation under test: ``vqcore`` (engine) or ``vqcore.model``."""
    return IMPLEMENTATIONS[request.param]


@dataclass
class Guest:
    """Guest memory with a split ring, an indirect area and a data area, in one region."""

    memory: vqcore.GuestMemory
    buffer: np.ndarray            # the region's backing (uint8), buffer[0] is at `base`
    base: int
    size: int                     # queue size
    ring: vqcore.SplitAddresses   # desc, avail, used, end
    indirect_addr: int | None
    indirect_max: int
    data_addr: int
    data_size: int

    def at(self, gpa: int, length: int) -> np.ndarray:
        """numpy view of guest bytes ``[gpa, gpa+length)``."""
        off = gpa - self.base
        assert 0 <= off and off + length <= self.buffer.size
        return self.buffer[off:off + length]

    def ring_image(self) -> bytes:
        """Descriptor table, available and used rings, and indirect area, as bytes."""
        image = self.at(self.ring.desc, self.ring.end - self.ring.desc).tobytes()
        if self.indirect_addr is not None:
            image += self.at(self.indirect_addr, self.size * self.indirect_max * 16).tobytes()
        return image

    def queue_args(self) -> tuple:
        """``(memory, size, desc, avail, used)``: the positional arguments of a queue."""
        return (self.memory, self.size, self.ring.desc, self.ring.avail, self.ring.used)

    def device(self, impl, **kwargs):
        """A device queue of ``impl`` on this ring."""
        return impl.SplitDeviceQueue(*self.queue_args(), **kwargs)

    def driver(self, impl, **kwargs):
        """A driver queue of ``impl`` on this ring (with the indirect area, if any)."""
        if self.indirect_addr is not None:
            kwargs.setdefault("indirect_addr", self.indirect_addr)
            kwargs.setdefault("indirect_max", self.indirect_max)
        return impl.SplitDriverQueue(*self.queue_args(), **kwargs)


def data_pattern(n: int, seed: int = 0) -> np.ndarray:
    """``n`` bytes of a deterministic, position-dependent pattern."""
    i = np.arange(n, dtype=np.uint64)
    return ((i * 2654435761 + seed * 97 + (i >> 8)) >> 3).astype(np.uint8)


def build_guest(size: int, *, data_size: int = 1 << 16, indirect_max: int = 0,
                base: int = RING_BASE, seed: int = 0) -> Guest:
    """A :class:`Guest` for a queue of ``size``; ``indirect_max > 0`` adds an indirect
    area of ``size * indirect_max`` descriptors; the data area is 4 KiB aligned."""
    ring = vqcore.split_addresses(base, size)
    indirect_addr = None
    end = ring.end
    if indirect_max:
        indirect_addr = (end + 15) // 16 * 16
        end = indirect_addr + size * indirect_max * 16
    data_addr = (end + 4095) // 4096 * 4096
    buffer = np.zeros(data_addr + data_size - base, np.uint8)
    buffer[data_addr - base:] = data_pattern(data_size, seed)
    memory = vqcore.GuestMemory([(base, buffer)])
    return Guest(memory, buffer, base, size, ring, indirect_addr, indirect_max, data_addr,
                 data_size)


@pytest.fixture
def make_guest():
    """The :func:`build_guest` factory."""
    return build_guest
