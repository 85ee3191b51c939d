"""A front-end's memory table, mapped in the back-end (SET_MEM_TABLE, ADD_MEM_REG,
REM_MEM_REG).

Each region is mapped from its fd (``mmap(mmap_offset + memory_size)``, the region at
``mmap_offset`` in it) after :func:`pyvirtio.fds.check_memory_fd` made sure the fd is
a file that holds that much; the regions make one :class:`vqcore.GuestMemory`, which
translates guest-physical addresses (descriptors) and the front-end's user addresses
(SET_VRING_ADDR).

A change is two steps, because running rings must move over with it: ``prepare_*``
maps what is new and builds the new GuestMemory (nothing changes yet, a failure
unmaps what it mapped), the handler stops the rings and :meth:`MemoryTable.commit`
swaps the table in, the rings are rebuilt over it, and :meth:`MemoryTable.release`
unmaps what the old table alone held.

QEMU before 8.0 sends ADD_MEM_REG and REM_MEM_REG once per vhost device, and a net
device with N queue pairs is N vhost devices on one connection: an ADD_MEM_REG
identical to a mapped region (gpa, size, user address, mmap offset) is a copy,
acknowledged and counted (``copies`` at most: one per vhost device); the first
REM_MEM_REG unmaps the region and as many REM_MEM_REGs of it as there were copies are
acknowledged after it (meanwhile another vhost device may add a region overlapping
the old one). A REM_MEM_REG of any other region that is not mapped is refused.
"""

from __future__ import annotations

import logging
import mmap
from dataclasses import dataclass, field

from vqcore import GuestMemory

from pyvirtio.fds import check_memory_fd
from pyvirtio.vhost_user.messages import MAX_MEM_SLOTS, MemRegion, ProtocolError

log = logging.getLogger(__name__)


def region_key(r: MemRegion) -> tuple[int, int, int]:
    """What REM_MEM_REG names a region by: (gpa, size, user address)."""
    return r.guest_phys_addr, r.memory_size, r.userspace_addr


@dataclass(eq=False)
class MappedRegion:
    """One memory region and its mapping (``mm`` covers ``mmap_offset + size``).

    ``adds`` counts the ADD_MEM_REGs that named this very mapping (QEMU before 8.0
    sends one per vhost device)."""
    region: MemRegion
    mm: mmap.mmap
    adds: int = 1

    def same(self, other: MemRegion) -> bool:
        """Whether ``other`` names this region (REM_MEM_REG: gpa, uva and size)."""
        return region_key(self.region) == region_key(other)

    def identical(self, other: MemRegion) -> bool:
        """Whether ``other`` describes this very mapping (ADD_MEM_REG: gpa, size, uva
        and mmap offset)."""
        return self.region == other


@dataclass
class TableChange:
    """A memory table built by ``prepare_*``, not in force yet."""
    memory: GuestMemory
    regions: list[MappedRegion]
    #: REM_MEM_REG copies owed once it is in force (region key -> count)
    owed: dict[tuple[int, int, int], int] = field(default_factory=dict)
    #: True for SET_MEM_TABLE: the owed copies of the old table are forgotten
    replaces: bool = False


class MemoryTable:
    """The mapped regions of one connection.

    Args:
        name: for log lines.
        copies: identical ADD_MEM_REGs accepted per region (the number of vhost
            devices the front-end runs on this connection: a net device's queue
            pairs).
    """

    def __init__(self, name: str = "vhost-user", copies: int = 1) -> None:
        self.name = name
        self.copies = max(1, copies)
        self.memory: GuestMemory | None = None
        self.regions: list[MappedRegion] = []
        #: region key -> REM_MEM_REGs still to come for copies of an unmapped region
        self.copies_to_remove: dict[tuple[int, int, int], int] = {}

    # ---- building a change -------------------------------------------------------------

    def _map(self, region: MemRegion, fd: int) -> MappedRegion:
        """Map ``region`` from ``fd`` (which stays the caller's)."""
        length = region.mmap_offset + region.memory_size
        what = (f"memory region gpa {region.guest_phys_addr:#x} size {region.memory_size:#x} "
                f"mmap_offset {region.mmap_offset:#x}")
        check_memory_fd(fd, length, what)
        try:
            mm = mmap.mmap(fd, length, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except (OSError, ValueError, OverflowError) as exc:
            raise ProtocolError(f"{what} cannot be mapped: {exc}") from None
        return MappedRegion(region, mm)

    def _build(self, regions: list[MappedRegion], fresh: list[MappedRegion]) -> GuestMemory:
        """The GuestMemory of ``regions``; on failure ``fresh`` (mapped for this
        change) is unmapped."""
        memory = GuestMemory()
        try:
            for m in regions:
                r = m.region
                memory.add_region(r.guest_phys_addr, m.mm, offset=r.mmap_offset,
                                  size=r.memory_size, uva=r.userspace_addr)
        except BaseException:
            memory.close()
            self._unmap(fresh)
            raise
        return memory

    def prepare_table(self, regions: list[MemRegion], fds: list[int]) -> TableChange:
        """SET_MEM_TABLE: every region mapped anew from its fd."""
        if len(fds) != len(regions):
            raise ProtocolError(f"{len(regions)} regions but {len(fds)} fds")
        mapped: list[MappedRegion] = []
        try:
            for region, fd in zip(regions, fds):
                mapped.append(self._map(region, fd))
        except BaseException:
            self._unmap(mapped)
            raise
        return TableChange(self._build(mapped, mapped), mapped, replaces=True)

    def prepare_add(self, region: MemRegion, fd: int) -> TableChange | None:
        """ADD_MEM_REG; None when it is another vhost device's copy of a mapped region
        (counted: nothing else to do)."""
        same = [m for m in self.regions if m.identical(region)]
        if same:
            if same[0].adds >= self.copies:
                raise ProtocolError(f"ADD_MEM_REG of gpa {region.guest_phys_addr:#x} size "
                                    f"{region.memory_size:#x}: already added {same[0].adds} "
                                    f"time(s), once per vhost device at most")
            same[0].adds += 1
            log.debug("%s: ADD_MEM_REG of the region already mapped at gpa %#x size %#x "
                      "(another vhost device's copy, %d adds): acknowledged", self.name,
                      region.guest_phys_addr, region.memory_size, same[0].adds)
            return None
        if len(self.regions) >= MAX_MEM_SLOTS:
            raise ProtocolError(f"all {MAX_MEM_SLOTS} memory slots are in use")
        m = self._map(region, fd)
        regions = self.regions + [m]
        return TableChange(self._build(regions, [m]), regions)

    def prepare_remove(self, region: MemRegion) -> TableChange | None:
        """REM_MEM_REG; None when it removes a copy of a region already unmapped."""
        key = region_key(region)
        pending = self.copies_to_remove.get(key, 0)
        if pending:
            if pending > 1:
                self.copies_to_remove[key] = pending - 1
            else:
                del self.copies_to_remove[key]
            log.debug("%s: REM_MEM_REG of gpa %#x size %#x: another vhost device's copy of "
                      "a region already unmapped: acknowledged", self.name,
                      region.guest_phys_addr, region.memory_size)
            return None
        found = [m for m in self.regions if m.same(region)]
        if not found:
            raise ProtocolError(f"REM_MEM_REG of gpa {region.guest_phys_addr:#x} size "
                                f"{region.memory_size:#x} uva {region.userspace_addr:#x}: no "
                                f"such region is mapped")
        regions = [m for m in self.regions if m is not found[0]]
        owed = {key: found[0].adds - 1} if found[0].adds > 1 else {}
        return TableChange(self._build(regions, []), regions, owed)

    def discard(self, change: TableChange) -> None:
        """Drop a change that will not be committed (unmap what it alone maps)."""
        self._release(change.memory, change.regions, keep=self.regions)

    # ---- swapping -----------------------------------------------------------------------

    def commit(self, change: TableChange) -> tuple[GuestMemory | None, list[MappedRegion]]:
        """Put ``change`` in force; returns the old (memory, regions) for
        :meth:`release` once nothing uses them."""
        old = self.memory, self.regions
        self.memory, self.regions = change.memory, change.regions
        if change.replaces:
            self.copies_to_remove.clear()
        self.copies_to_remove.update(change.owed)
        return old

    def release(self, old: tuple[GuestMemory | None, list[MappedRegion]]) -> None:
        """Unmap what the old table held and the current one does not."""
        self._release(old[0], old[1], keep=self.regions)

    def clear(self) -> None:
        """Unmap everything (the connection is over; no ring uses the memory)."""
        old = self.memory, self.regions
        self.memory, self.regions = None, []
        self.copies_to_remove.clear()
        self._release(old[0], old[1], keep=[])

    # ---- unmapping ----------------------------------------------------------------------

    def _unmap(self, regions: list[MappedRegion]) -> None:
        self._release(None, regions, keep=[])

    def _release(self, memory: GuestMemory | None, regions: list[MappedRegion],
                 keep: list[MappedRegion]) -> None:
        """Let go of ``memory`` and of the mappings of ``regions`` not in ``keep``.

        Nothing is unmapped by force: a mapping goes when the last object that can
        touch it does (the GuestMemory exporting it, and through it every queue and
        every popped ChainBatch holding that GuestMemory). The handler stops the rings
        and drops their queues first, so this is at once in the normal case; a user
        that outlives it (a batch a caller kept) delays the unmap, never turns it into
        a fault."""
        if memory is not None and not memory.attached:
            memory.close()             # its exports go now rather than with the object
        dropped = [m for m in regions if not any(m is k for k in keep)]
        log.debug("%s: %d mapping(s) released%s", self.name, len(dropped),
                  f" (still used: {memory.attached})" if memory is not None
                  and memory.attached else "")

    def __len__(self) -> int:
        return len(self.regions)


__all__ = ["MemoryTable", "MappedRegion", "TableChange", "region_key"]
