"""GuestMemory: backing buffers, the region table, translation, zero-copy access and
the lifetime of the objects that back guest memory."""

from __future__ import annotations

import ctypes
import gc
import mmap
import os
import weakref

import numpy as np
import pytest

from vqcore import (ChainBatch, GuestMemory, SplitDeviceQueue, SplitDriverQueue,
                    split_addresses)
from vqcore.errors import AddressOutOfBounds, AddressOverflow, MemoryRegionError

TOP = 2**64
PAGE = mmap.PAGESIZE


def addr_of(arr: np.ndarray) -> int:
    return arr.ctypes.data


# ---- backing buffers ------------------------------------------------------------------------

def test_numpy_region():
    buf = np.zeros(0x1000, np.uint8)
    mem = GuestMemory([(0x10000, buf)])
    assert len(mem) == 1 and mem.size == 0x1000
    (r,) = mem.regions
    assert (r.gpa, r.size, r.uva, r.host_addr) == (0x10000, 0x1000, 0x10000, addr_of(buf))
    assert r.owner is buf
    mem.write(0x10010, b"hello")
    assert bytes(buf[0x10:0x15]) == b"hello"
    buf[0x20:0x23] = [1, 2, 3]
    assert mem.read(0x1001F, 5) == b"\x00\x01\x02\x03\x00"


def test_numpy_region_of_wider_items():
    buf = np.zeros(256, np.uint32)              # C-contiguous: taken as its 1024 bytes
    mem = GuestMemory([(0, buf)])
    assert mem.size == 1024
    mem.write(4 * 7, (0xDEADBEEF).to_bytes(4, "little"))
    assert buf[7] == 0xDEADBEEF


def test_bytearray_region():
    buf = bytearray(100)
    mem = GuestMemory([(0x2000, buf)])
    mem.write(0x2000 + 98, b"xy")
    assert buf[98:] == b"xy"
    assert mem.translate(0x2000, 100) == [(ctypes.addressof((ctypes.c_char * 100).from_buffer(buf)), 100)]


def test_anonymous_mmap_region():
    m = mmap.mmap(-1, 4 * PAGE)
    mem = GuestMemory()
    mem.add_region(0x100000, m)
    mem.write(0x100000 + 3 * PAGE, b"page3")
    assert m[3 * PAGE:3 * PAGE + 5] == b"page3"
    m[5:8] = b"abc"
    assert mem.read(0x100005, 3) == b"abc"
    mem.close()
    m.close()


def test_memfd_mapping_region():
    """A memfd mapping: what vhost-user hands us. A second mapping of the same file
    (another process would do the same) sees what we write through guest memory."""
    fd = os.memfd_create("vq-test")
    try:
        os.ftruncate(fd, 8 * PAGE)
        ours = mmap.mmap(fd, 8 * PAGE)
        theirs = mmap.mmap(fd, 4 * PAGE, offset=4 * PAGE)
        mem = GuestMemory()
        mem.add_region(0x4000_0000, ours, offset=4 * PAGE, size=4 * PAGE, uva=0x7F00_0000_0000)
        mem.write(0x4000_0000 + 10, b"shared!")
        assert theirs[10:17] == b"shared!"
        theirs[100:103] = b"abc"
        assert mem.read(0x4000_0000 + 100, 3) == b"abc"
        assert os.pread(fd, 7, 4 * PAGE + 10) == b"shared!"
        assert mem.uva_to_gpa(0x7F00_0000_0000 + 100, 3) == 0x4000_0000 + 100
        mem.close()
        ours.close()
        theirs.close()
    finally:
        os.close(fd)


def test_offset_and_size():
    buf = np.zeros(0x3000, np.uint8)
    mem = GuestMemory()
    mem.add_region(0x0, buf, offset=0x1000, size=0x800)
    mem.add_region(0x10000, buf, offset=0x2000)            # size: to the buffer's end
    assert [(r.gpa, r.size) for r in mem.regions] == [(0, 0x800), (0x10000, 0x1000)]
    assert mem.host_address(0x0) == addr_of(buf) + 0x1000
    assert mem.host_address(0x10000) == addr_of(buf) + 0x2000
    mem.write(0x7FF, b"\x11")
    assert buf[0x17FF] == 0x11 and buf[0x1800] == 0
    with pytest.raises(AddressOutOfBounds):
        mem.translate(0x7FF, 2)                             # the region ends at size
    with pytest.raises(MemoryRegionError):
        mem.add_region(0x20000, buf, offset=0x3001)         # offset beyond the buffer
    with pytest.raises(MemoryRegionError):
        mem.add_region(0x20000, buf, offset=0x2000, size=0x1001)


# ---- rejected regions -----------------------------------------------------------------------

@pytest.mark.parametrize("gpa, size", [
    (0x1000, 0x1000), (0x1800, 0x100), (0x0800, 0x1000), (0x1FFF, 1), (0x0, 0x10000),
    (0x1FFF, 0x1000),
])
def test_overlapping_gpa_rejected(gpa, size):
    mem = GuestMemory([(0x1000, np.zeros(0x1000, np.uint8))])
    with pytest.raises(MemoryRegionError, match="overlaps"):
        mem.add_region(gpa, np.zeros(size, np.uint8))
    assert len(mem) == 1


def test_touching_regions_accepted():
    mem = GuestMemory([(0x1000, np.zeros(0x1000, np.uint8))])
    mem.add_region(0x0, np.zeros(0x1000, np.uint8))
    mem.add_region(0x2000, np.zeros(0x1000, np.uint8))
    assert [r.gpa for r in mem.regions] == [0, 0x1000, 0x2000]
    assert mem.size == 0x3000


def test_overlapping_uva_rejected():
    mem = GuestMemory()
    mem.add_region(0x0, np.zeros(0x1000, np.uint8), uva=0x7000_0000)
    with pytest.raises(MemoryRegionError, match="uva"):
        mem.add_region(0x10000, np.zeros(0x1000, np.uint8), uva=0x7000_0FFF)
    with pytest.raises(MemoryRegionError, match="uva"):
        mem.add_region(0x10000, np.zeros(0x2000, np.uint8), uva=0x6FFF_F000)
    mem.add_region(0x10000, np.zeros(0x1000, np.uint8), uva=0x7000_1000)
    assert len(mem) == 2


@pytest.mark.parametrize("make", [
    pytest.param(lambda: (np.zeros(0, np.uint8), {}), id="empty-array"),
    pytest.param(lambda: (bytearray(), {}), id="empty-bytearray"),
    pytest.param(lambda: (np.zeros(16, np.uint8), {"size": 0}), id="size-0"),
    pytest.param(lambda: (np.zeros(16, np.uint8), {"offset": 16}), id="offset-at-end"),
])
def test_empty_region_rejected(make):
    buf, kw = make()
    mem = GuestMemory()
    with pytest.raises(MemoryRegionError):
        mem.add_region(0x1000, buf, **kw)
    assert len(mem) == 0


def _readonly_array():
    a = np.zeros(16, np.uint8)
    a.flags.writeable = False
    return a


@pytest.mark.parametrize("make", [
    pytest.param(lambda: bytes(16), id="bytes"),
    pytest.param(lambda: memoryview(bytes(16)), id="memoryview-of-bytes"),
    pytest.param(_readonly_array, id="readonly-numpy"),
    pytest.param(lambda: np.zeros(32, np.uint8)[::2], id="non-contiguous"),
    pytest.param(lambda: "a string", id="not-a-buffer"),
    pytest.param(lambda: mmap.mmap(-1, PAGE, prot=mmap.PROT_READ), id="readonly-mmap"),
])
def test_unusable_buffer_rejected(make):
    mem = GuestMemory()
    with pytest.raises(MemoryRegionError):
        mem.add_region(0, make())
    assert len(mem) == 0


def test_region_wrapping_2_64_rejected():
    mem = GuestMemory()
    with pytest.raises(MemoryRegionError, match="wraps"):
        mem.add_region(TOP - 0x800, np.zeros(0x1000, np.uint8))
    with pytest.raises(MemoryRegionError, match="wraps"):
        mem.add_region(0, np.zeros(0x1000, np.uint8), uva=TOP - 0x800)
    mem.add_region(TOP - 0x1000, np.zeros(0x1000, np.uint8))  # ends exactly at 2**64
    assert mem.regions[0].gpa == TOP - 0x1000


def test_region_table_limit():
    mem = GuestMemory()
    buf = np.zeros(512 * 16, np.uint8)
    for i in range(512):
        mem.add_region(i * 0x1000, buf, offset=16 * i, size=16)
    with pytest.raises(MemoryRegionError):
        mem.add_region(0x1000_0000, np.zeros(16, np.uint8))
    assert len(mem) == 512
    assert mem.host_address(511 * 0x1000 + 15) == addr_of(buf) + 16 * 511 + 15


# ---- translation ----------------------------------------------------------------------------

@pytest.fixture
def two():
    """Regions A [0x10000, 0x11000) and B [0x11000, 0x13000) adjacent in guest space
    but separate buffers; C [0x20000, 0x21000) after a gap."""
    a, b, c = (np.zeros(n, np.uint8) for n in (0x1000, 0x2000, 0x1000))
    mem = GuestMemory([(0x11000, b), (0x20000, c), (0x10000, a)])
    return mem, a, b, c


def test_regions_sorted(two):
    mem, a, b, c = two
    assert [(r.gpa, r.size) for r in mem.regions] == [(0x10000, 0x1000), (0x11000, 0x2000),
                                                      (0x20000, 0x1000)]
    assert [r.owner for r in mem.regions] == [a, b, c]
    assert mem.size == 0x4000 and "3 regions" in repr(mem)


def test_translation_bounds(two):
    mem, a, b, c = two
    assert mem.translate(0x20000, 1) == [(addr_of(c), 1)]                 # first byte
    assert mem.translate(0x20FFF, 1) == [(addr_of(c) + 0xFFF, 1)]         # last byte
    assert mem.translate(0x20000, 0x1000) == [(addr_of(c), 0x1000)]       # all of it
    with pytest.raises(AddressOutOfBounds):
        mem.translate(0x21000, 1)                                         # one past the end
    with pytest.raises(AddressOutOfBounds):
        mem.translate(0x20000, 0x1001)                                    # one byte too long
    with pytest.raises(AddressOutOfBounds):
        mem.translate(0x1FFFF, 1)                                         # one before
    with pytest.raises(AddressOutOfBounds):
        mem.translate(0xFFFF, 2)                                          # into the start
    assert mem.translate(0x50000, 0) == []                                # empty: no pieces
    assert mem.host_address(0x20FFF) == addr_of(c) + 0xFFF
    with pytest.raises(AddressOutOfBounds):
        mem.host_address(0x21000)
    with pytest.raises(AddressOutOfBounds):
        mem.read(0x20FFF, 2)
    with pytest.raises(AddressOutOfBounds):
        mem.write(0x20FFF, b"ab")
    assert c[0xFFF] == 0                           # a refused write wrote nothing


def test_range_across_adjacent_regions_gives_two_pieces(two):
    mem, a, b, c = two
    assert mem.translate(0x10F00, 0x200) == [(addr_of(a) + 0xF00, 0x100), (addr_of(b), 0x100)]
    assert mem.translate(0x10000, 0x3000) == [(addr_of(a), 0x1000), (addr_of(b), 0x2000)]
    data = bytes(range(256)) * 2
    mem.write(0x10F00, data)
    assert bytes(a[0xF00:]) == data[:256] and bytes(b[:256]) == data[256:]
    assert mem.read(0x10F00, 512) == data
    # a pointer (host_address, view) needs one region
    with pytest.raises(AddressOutOfBounds):
        mem.host_address(0x10F00, 0x200)
    with pytest.raises(AddressOutOfBounds):
        mem.view(0x10F00, 0x200)


def test_gap_between_regions(two):
    mem, *_ = two
    with pytest.raises(AddressOutOfBounds):
        mem.translate(0x12F00, 0x200)              # B's end runs into the gap
    with pytest.raises(AddressOutOfBounds):
        mem.translate(0x13000, 1)
    with pytest.raises(AddressOutOfBounds):
        mem.translate(0x12000, 0xF000)             # B, the gap, then C


def test_64_bit_overflow():
    mem = GuestMemory([(0, np.zeros(16, np.uint8))])
    top = np.zeros(0x1000, np.uint8)
    mem.add_region(TOP - 0x1000, top)
    for gpa, n in ((TOP - 1, 2), (TOP - 16, 17), (TOP - 0x1000, 2**64 - 1), (2, 2**64 - 1),
                   (TOP - 1, 2**64 - 1)):
        with pytest.raises(AddressOverflow):
            mem.translate(gpa, n)
        with pytest.raises(AddressOverflow):
            mem.host_address(gpa, n)
        with pytest.raises(AddressOverflow):
            mem.view(gpa, n)
    # a range may end exactly at 2**64
    assert mem.translate(TOP - 16, 16) == [(addr_of(top) + 0x1000 - 16, 16)]
    assert mem.translate(TOP - 1, 1) == [(addr_of(top) + 0xFFF, 1)]
    mem.write(TOP - 4, b"last")
    assert mem.read(TOP - 4, 4) == b"last" and bytes(top[-4:]) == b"last"
    assert mem.host_address(TOP - 0x1000, 0x1000) == addr_of(top)
    with pytest.raises(AddressOutOfBounds):
        mem.translate(1, 2**64 - 1)                # ends at 2**64: no overflow, a gap


def test_python_ints_beyond_64_bits_rejected():
    mem = GuestMemory([(0, np.zeros(16, np.uint8))])
    with pytest.raises(OverflowError):
        mem.translate(2**64, 1)
    with pytest.raises(OverflowError):
        mem.translate(-1, 1)


# ---- zero-copy access -----------------------------------------------------------------------

def test_view_is_zero_copy(two):
    mem, a, b, c = two
    v = mem.view(0x11010, 32)
    assert isinstance(v, memoryview) and len(v) == 32 and not v.readonly
    v[0:4] = b"abcd"
    assert bytes(b[0x10:0x14]) == b"abcd"
    b[0x14:0x18] = np.frombuffer(b"efgh", np.uint8)
    assert bytes(v[4:8]) == b"efgh"
    del v


def test_view_of_a_region_with_offset():
    buf = np.zeros(0x2000, np.uint8)
    mem = GuestMemory()
    mem.add_region(0x5000, buf, offset=0x1000, size=0x800)
    v = mem.view(0x5004, 4)
    v[:] = b"WXYZ"
    assert bytes(buf[0x1004:0x1008]) == b"WXYZ"
    with pytest.raises(AddressOutOfBounds):
        mem.view(0x57FF, 2)
    del v


def test_array_is_zero_copy(two):
    mem, a, b, c = two
    arr = mem.array(0x20100, 8, np.uint32)
    assert arr.dtype == np.uint32 and arr.shape == (8,)
    assert arr.ctypes.data == addr_of(c) + 0x100
    arr[:] = np.arange(8, dtype=np.uint32) * 0x01010101
    assert bytes(c[0x104:0x108]) == b"\x01\x01\x01\x01"
    c[0x100:0x104] = 0xFF
    assert arr[0] == 0xFFFFFFFF
    le = mem.array(0x20100, 2, "<u8")
    assert le[0] == 0x01010101FFFFFFFF
    with pytest.raises(AddressOutOfBounds):
        mem.array(0x20FFC, 2, np.uint32)
    del arr, le


# ---- uva ------------------------------------------------------------------------------------

def test_uva_to_gpa():
    mem = GuestMemory()
    mem.add_region(0x0, np.zeros(0x1000, np.uint8), uva=0x7F00_0000)
    mem.add_region(0x1000, np.zeros(0x1000, np.uint8), uva=0x5000_0000)
    mem.add_region(0x8000, np.zeros(0x1000, np.uint8))            # uva = gpa
    assert mem.uva_to_gpa(0x7F00_0000) == 0x0
    assert mem.uva_to_gpa(0x7F00_0FFF) == 0xFFF
    assert mem.uva_to_gpa(0x5000_0010, 0x100) == 0x1010
    assert mem.uva_to_gpa(0x5000_0000, 0x1000) == 0x1000
    assert mem.uva_to_gpa(0x8004) == 0x8004
    assert [r.uva for r in mem.regions] == [0x7F00_0000, 0x5000_0000, 0x8000]
    for uva, n in ((0x7F00_1000, 1), (0x7F00_0FFF, 2), (0x4FFF_FFFF, 1),
                   (0x5000_0000, 0x1001), (0x1000, 1)):
        with pytest.raises(AddressOutOfBounds):
            mem.uva_to_gpa(uva, n)


# ---- region removal and lifetime ------------------------------------------------------------

def test_remove_region_returns_the_owner(two):
    mem, a, b, c = two
    assert mem.remove_region(0x11000) is b
    assert [r.gpa for r in mem.regions] == [0x10000, 0x20000]
    assert [r.owner for r in mem.regions] == [a, c]
    with pytest.raises(AddressOutOfBounds):
        mem.translate(0x11000, 1)
    with pytest.raises(AddressOutOfBounds):
        mem.translate(0x10FFF, 2)                  # no longer two pieces
    assert mem.translate(0x20000, 1) == [(addr_of(c), 1)]
    mem.write(0x10000, b"a")
    assert a[0] == ord("a")
    with pytest.raises(MemoryRegionError):
        mem.remove_region(0x11000)
    with pytest.raises(MemoryRegionError):
        mem.remove_region(0x10001)                 # not a region start
    mem.add_region(0x11000, np.zeros(0x100, np.uint8))
    assert mem.translate(0x10FFF, 2)[1][1] == 1


def test_mmap_pinned_while_its_region_exists():
    m = mmap.mmap(-1, PAGE)
    mem = GuestMemory([(0x0, m)])
    with pytest.raises(BufferError):
        m.close()
    assert not m.closed
    assert mem.remove_region(0x0) is m
    m.close()                                      # released by remove_region
    assert m.closed

    m2 = mmap.mmap(-1, PAGE)
    mem.add_region(0x0, m2, offset=0x100)
    mem.add_region(0x10000, m2, size=0x80)         # the same mapping twice
    with pytest.raises(BufferError):
        m2.close()
    mem.close()                                    # drops every region
    assert len(mem) == 0 and mem.size == 0
    with pytest.raises(AddressOutOfBounds):
        mem.translate(0x100, 1)
    m2.close()

    m3 = mmap.mmap(-1, PAGE)
    mem3 = GuestMemory([(0x0, m3)])
    with pytest.raises(BufferError):
        m3.close()
    del mem3                                       # dropping the GuestMemory releases it
    m3.close()


def test_views_pin_the_mmap_too():
    m = mmap.mmap(-1, PAGE)
    mem = GuestMemory([(0x0, m)])
    v = mem.view(0x10, 16)
    mem.close()
    with pytest.raises(BufferError):
        m.close()                                  # the view still exports the buffer
    v[0:1] = b"z"
    assert m[0x10:0x11] == b"z"
    del v
    m.close()


def _queues(mem, base):
    a = split_addresses(base, 8)
    dev = SplitDeviceQueue(mem, 8, a.desc, a.avail, a.used)
    drv = SplitDriverQueue(mem, 8, a.desc, a.avail, a.used)
    return dev, drv


def test_attached_queue_freezes_the_region_table():
    buf = np.zeros(0x10000, np.uint8)
    mem = GuestMemory([(0x0, buf)])
    dev, drv = _queues(mem, 0x0)
    assert mem.attached == 2
    for op in (lambda: mem.add_region(0x100000, np.zeros(16, np.uint8)),
               lambda: mem.remove_region(0x0),
               mem.close):
        with pytest.raises(MemoryRegionError, match="in use"):
            op()
    assert len(mem) == 1
    # translation and data access still work
    mem.write(0x8000, b"ok")
    assert mem.read(0x8000, 2) == b"ok"
    del dev
    assert mem.attached == 1
    with pytest.raises(MemoryRegionError):
        mem.remove_region(0x0)
    del drv
    assert mem.attached == 0
    mem.add_region(0x100000, np.zeros(16, np.uint8))
    assert mem.remove_region(0x0) is buf
    mem.close()
    assert len(mem) == 0


def test_failed_queue_construction_does_not_attach():
    mem = GuestMemory([(0x0, np.zeros(0x1000, np.uint8))])
    with pytest.raises(AddressOutOfBounds):
        SplitDeviceQueue(mem, 256, 0x0, 0x1000, 0x2000)   # rings beyond the region
    with pytest.raises(ValueError):
        SplitDriverQueue(mem, 3, 0x0, 0x100, 0x200)       # not a power of two
    gc.collect()
    assert mem.attached == 0
    mem.remove_region(0x0)


def test_guest_memory_and_queues_die_cleanly():
    buf = np.zeros(0x10000, np.uint8)
    m = mmap.mmap(-1, 4 * PAGE)
    owner_refs = [weakref.ref(buf), weakref.ref(m)]
    mem = GuestMemory([(0x0, buf), (0x100000, m)])
    dev, drv = _queues(mem, 0x0)
    # use the queues so they hold state
    b = ChainBatch(4)
    b.append(readable=[(0x8000, 16)], writable=[(0x100000, 16)], token=5)
    assert drv.add(b) == 1
    got = ChainBatch(4)
    assert dev.pop(got) == 1
    got.used_len[:] = 16
    dev.push_used(got)
    assert drv.reclaim(ChainBatch(4)) == 1
    view = mem.view(0x10, 4)
    del buf, m, mem, dev, drv, b, got
    gc.collect()
    # the GuestMemory and the mmap's region are gone; the view still pins the array
    assert owner_refs[0]() is not None and owner_refs[1]() is None
    del view
    gc.collect()
    assert all(r() is None for r in owner_refs)


def test_queue_keeps_its_memory_alive():
    buf = np.zeros(0x1000, np.uint8)
    ref = weakref.ref(buf)
    mem = GuestMemory([(0x0, buf)])
    dev, drv = _queues(mem, 0x0)
    del buf, mem
    gc.collect()
    assert ref() is not None                       # the queues still point into it
    assert dev.memory is drv.memory and dev.memory.regions[0].owner is ref()
    del dev
    gc.collect()
    assert ref() is not None
    del drv
    gc.collect()
    assert ref() is None
