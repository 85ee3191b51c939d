"""Shared fixtures of the test suite.

* ``impl``: the implementation under test, parametrized over the Cython engine (the
  ``vqcore`` package) and the pure-Python reference model (``vqcore.model``). Both
  expose ``GuestMemory``, ``ChainBatch``, ``SplitDeviceQueue``, ``SplitDriverQueue``,
  ``split_layout``, ``split_addresses``, ``need_event`` and the exception classes, so a
  test written against ``impl.X`` runs on both.
* ``make_guest``: builds a :class:`Guest`: one numpy buffer as guest memory holding a
  split ring laid out by ``split_addresses`` (or, with ``layout="packed"``, a packed
  ring laid out by ``packed_addresses``), an optional indirect-table area and a data
  area filled with a known pattern.
* ``implementations(layout)``: the engine and the model of a ring layout (the packed
  ring's model is ``vqcore.model_packed``); ``ring_index`` / ``used_waiting``: the
  layout-specific index arithmetic and "a used chain waits" test shared by the suites
  that run for both layouts.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

import vqcore
import vqcore.model
import vqcore.model_packed

#: name -> module exposing the queue API
IMPLEMENTATIONS = {"engine": vqcore, "model": vqcore.model}
#: the same for packed rings (PackedDeviceQueue, PackedDriverQueue, ...)
PACKED_IMPLEMENTATIONS = {"engine": vqcore, "model": vqcore.model_packed}

LAYOUTS = ("split", "packed")


def implementations(layout: str) -> dict:
    """name -> module with the queue classes of ``layout`` ("split" or "packed")."""
    return PACKED_IMPLEMENTATIONS if layout == "packed" else IMPLEMENTATIONS


def ring_features(layout: str, event_idx: bool = False) -> int:
    """The feature bits that make vqcore.device_queue/driver_queue build ``layout``."""
    return ((vqcore.VIRTIO_F_RING_PACKED if layout == "packed" else 0)
            | (vqcore.VIRTIO_RING_F_EVENT_IDX if event_idx else 0))


def ring_index(layout: str, size: int, chains: int, slots: int) -> int:
    """What next_avail / next_used / last_used read after ``chains`` chains taking
    ``slots`` ring descriptors went by: split, the 16-bit chain count; packed, the slot
    with the wrap counter (1 at the start, flipped at each lap) in bit 15."""
    if layout == "split":
        return chains % 65536
    laps, pos = divmod(slots, size)
    return pos | (1 ^ (laps & 1)) << 15


def used_waiting(memory, drv) -> bool:
    """Does a used chain wait for driver queue ``drv`` (read from ring memory, as a
    watchdog does)? Split: used->idx differs from last_used; packed: the descriptor at
    last_used is used for its wrap counter."""
    if isinstance(drv, (vqcore.PackedDriverQueue, vqcore.model_packed.PackedDriverQueue)):
        pos, wrap = drv.last_used & 0x7FFF, drv.last_used >> 15
        flags = int(memory.array(drv.desc_addr + 16 * pos + 14, 1, "<u2")[0])
        return vqcore.model_packed.is_used(flags, wrap)
    return int(memory.array(drv.used_addr + 2, 1, "<u2")[0]) != drv.last_used

#: guest-physical address where make_guest puts the ring
RING_BASE = 0x10000


@pytest.fixture(params=LAYOUTS)
def ring_kind(request) -> str:
    """The ring layout the whole stack runs with: "split" or "packed" (the caller
    negotiates VIRTIO_F_RING_PACKED for the latter, nothing else changes)."""
    return request.param


@pytest.fixture(params=sorted(IMPLEMENTATIONS))
def impl(request):
    """The implementation under test: ``vqcore`` (engine) or ``vqcore.model``."""
    return IMPLEMENTATIONS[request.param]


@dataclass
class Guest:
    """Guest memory with a ring (split or packed), an indirect area and a data area, in
    one region."""

    memory: vqcore.GuestMemory
    buffer: np.ndarray            # the region's backing (uint8), buffer[0] is at `base`
    base: int
    size: int                     # queue size
    ring: tuple                   # SplitAddresses (desc, avail, used, end) or
                                  # PackedAddresses (desc, driver, device, end)
    indirect_addr: int | None
    indirect_max: int
    data_addr: int
    data_size: int
    layout: str = "split"

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
        """``(memory, size, desc, avail, used)`` (packed: ``desc, driver, device``): the
        positional arguments of a queue."""
        return (self.memory, self.size, *self.ring[:3])

    def device(self, impl, **kwargs):
        """A device queue of ``impl`` on this ring."""
        cls = impl.PackedDeviceQueue if self.layout == "packed" else impl.SplitDeviceQueue
        return cls(*self.queue_args(), **kwargs)

    def driver(self, impl, **kwargs):
        """A driver queue of ``impl`` on this ring (with the indirect area, if any)."""
        if self.indirect_addr is not None:
            kwargs.setdefault("indirect_addr", self.indirect_addr)
            kwargs.setdefault("indirect_max", self.indirect_max)
        cls = impl.PackedDriverQueue if self.layout == "packed" else impl.SplitDriverQueue
        return cls(*self.queue_args(), **kwargs)


def data_pattern(n: int, seed: int = 0) -> np.ndarray:
    """``n`` bytes of a deterministic, position-dependent pattern."""
    i = np.arange(n, dtype=np.uint64)
    return ((i * 2654435761 + seed * 97 + (i >> 8)) >> 3).astype(np.uint8)


def build_guest(size: int, *, data_size: int = 1 << 16, indirect_max: int = 0,
                base: int = RING_BASE, seed: int = 0, layout: str = "split") -> Guest:
    """A :class:`Guest` for a queue of ``size``; ``indirect_max > 0`` adds an indirect
    area of ``size * indirect_max`` descriptors; the data area is 4 KiB aligned."""
    ring = vqcore.ring_addresses(base, size, ring_features(layout))
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
                 data_size, layout)


@pytest.fixture
def make_guest():
    """The :func:`build_guest` factory."""
    return build_guest
