"""Packed ring layout (VIRTIO 1.2 section 2.8.10.1): sizes, offsets and alignment, and
the choice of layout by feature bit.

For the engine and vqcore.model_packed: descriptor ring 16*N bytes (16-aligned), driver
and device event suppression areas 4 bytes each (4-aligned), any queue size 1..32768
(no power of two needed); where each field lands, found by driving the queue API and
reading guest memory; ``vqcore.ring_addresses`` / ``device_queue`` / ``driver_queue``
build a packed ring exactly when VIRTIO_F_RING_PACKED is set.
"""

import struct

import pytest

import vqcore
from conftest import PACKED_IMPLEMENTATIONS, build_guest
from vqcore.errors import AddressOutOfBounds, LayoutError

SIZES = [1, 2, 3, 7, 100, 255, 256, 1000, 32767, 32768]
BAD_SIZES = [0, 32769, 65535, 65536, 1 << 17]


@pytest.fixture(params=sorted(PACKED_IMPLEMENTATIONS))
def impl(request):
    return PACKED_IMPLEMENTATIONS[request.param]


def test_layout_of_every_size(impl):
    for size in range(1, 32769):
        assert impl.packed_layout(size) == (size, 16 * size, 4)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("base", [0, 0x10000, 0x7FFF_FFF0])
def test_packed_addresses(impl, size, base):
    a = impl.packed_addresses(base, size)
    assert (a.desc, a.driver, a.device, a.end) == (base, base + 16 * size,
                                                   base + 16 * size + 4, base + 16 * size + 8)
    assert a.desc % 16 == 0 and a.driver % 4 == 0 and a.device % 4 == 0
    assert a == vqcore.ring_addresses(base, size, vqcore.VIRTIO_F_RING_PACKED)


@pytest.mark.parametrize("size", BAD_SIZES + [-1, 1.5, "8", None])
def test_bad_sizes_rejected(impl, size):
    with pytest.raises((LayoutError, TypeError, OverflowError)):
        impl.packed_layout(size)
    if isinstance(size, int) and size >= 0:
        with pytest.raises(LayoutError):
            impl.packed_layout(size)
        with pytest.raises(LayoutError):
            impl.packed_addresses(0, size)
        g = build_guest(8, layout="packed")
        for side in (impl.PackedDeviceQueue, impl.PackedDriverQueue):
            with pytest.raises((LayoutError, OverflowError)):
                side(g.memory, size, *g.ring[:3])


def test_misaligned_base_rejected(impl):
    for base in (1, 2, 4, 8, 0x10008):
        with pytest.raises(LayoutError):
            impl.packed_addresses(base, 8)


@pytest.mark.parametrize("which,offset", [(0, 1), (0, 4), (0, 8), (1, 1), (1, 2), (2, 2),
                                          (2, 3)])
@pytest.mark.parametrize("side", ["PackedDeviceQueue", "PackedDriverQueue"])
def test_misaligned_parts_rejected(impl, which, offset, side):
    g = build_guest(8, layout="packed")
    ring = list(g.ring[:3])
    ring[which] += offset
    with pytest.raises(LayoutError):
        getattr(impl, side)(g.memory, 8, *ring)


@pytest.mark.parametrize("side", ["PackedDeviceQueue", "PackedDriverQueue"])
def test_minimum_alignment_accepted(impl, side):
    """16 for the ring, 4 for each area and no more: areas at 4 mod 8, apart from the
    ring and from each other."""
    g = build_guest(8, data_size=4096, layout="packed")
    desc, driver, device = g.ring.desc, g.ring.desc + 16 * 8 + 12, g.data_addr + 100
    assert driver % 8 == 4 and device % 8 == 4
    q = getattr(impl, side)(g.memory, 8, desc, driver, device)
    assert (q.desc_addr, q.avail_addr, q.used_addr) == (desc, driver, device)


def test_ring_outside_memory_rejected(impl):
    g = build_guest(8, data_size=4096, layout="packed")
    top = g.base + g.buffer.size
    for desc, driver, device in [(top, g.ring.driver, g.ring.device),
                                 (top - 16 * 8 + 16, g.ring.driver, g.ring.device),
                                 (g.ring.desc, top, g.ring.device),
                                 (g.ring.desc, g.ring.driver, top - 2 + 2)]:
        for side in (impl.PackedDeviceQueue, impl.PackedDriverQueue):
            with pytest.raises(AddressOutOfBounds):
                side(g.memory, 8, desc, driver, device)


@pytest.mark.parametrize("size", [1, 7, 256])
def test_indirect_area_checked(impl, size):
    g = build_guest(size, indirect_max=2, layout="packed")
    for addr, n in [(g.indirect_addr, 0), (g.indirect_addr, size + 1),
                    (g.indirect_addr + 8, 1)]:
        with pytest.raises(LayoutError):
            impl.PackedDriverQueue(*g.queue_args(), indirect_addr=addr, indirect_max=n)
    top = g.base + g.buffer.size
    for addr, n in [(top, 1), (top - 16, 2)] if size > 1 else [(top, 1)]:   # outside, straddling
        with pytest.raises(AddressOutOfBounds):
            impl.PackedDriverQueue(*g.queue_args(), indirect_addr=addr, indirect_max=n)
    n = min(2, size)
    q = impl.PackedDriverQueue(*g.queue_args(), indirect_addr=g.indirect_addr, indirect_max=n)
    assert q.indirect_max == n
    assert impl.PackedDriverQueue(*g.queue_args()).indirect_max == 0


def pdesc(g, slot):
    """(addr, len, id, flags) of ring slot ``slot``."""
    return struct.unpack("<QIHH", g.at(g.ring.desc + 16 * slot, 16).tobytes())


def area(g, gpa):
    return struct.unpack("<HH", g.at(gpa, 4).tobytes())


@pytest.mark.parametrize("size", SIZES)
def test_fields_land_where_the_spec_puts_them(impl, size):
    """An available descriptor, the used descriptor over it, the event areas, and a
    chain of ``size`` descriptors that fills the ring and wraps to slot 0, read back
    from guest memory; nothing else changes."""
    g = build_guest(size, data_size=4096, layout="packed")
    a = g.ring
    g.at(a.desc, a.end - a.desc)[:] = 0xAB
    drv = g.driver(impl, event_idx=True)
    dev = g.device(impl, event_idx=True)
    assert not g.at(a.desc, a.end - a.desc).any()          # the driver's reset zeroes it all
    b = impl.ChainBatch(1)
    b.append(writable=[(g.data_addr + 64, 40)], token=7)
    assert drv.add(b) == 1
    assert pdesc(g, 0) == (g.data_addr + 64, 40, 0, 0x80 | 2)          # AVAIL | WRITE
    assert not g.at(a.desc + 16, a.end - a.desc - 16).any()
    pb = impl.ChainBatch(1)
    assert dev.pop(pb) == 1
    pb.used_len[:] = 33
    dev.push_used(pb)
    assert pdesc(g, 0) == (g.data_addr + 64, 33, 0, 0x80 | 0x8000 | 2)  # AVAIL|USED|WRITE
    # event areas: driver area at 16*N, device area at 16*N + 4
    assert dev.enable_notification() is False
    after_one = (1, 1) if size > 1 else (0, 0)                         # (offset, wrap)
    assert area(g, a.device) == (after_one[0] | after_one[1] << 15, 2)  # DESC
    assert drv.enable_interrupts() is True
    assert area(g, a.driver) == (0x8000, 2)                            # slot 0, wrap 1
    dev.disable_notification()
    drv.disable_interrupts()
    assert area(g, a.device)[1] == area(g, a.driver)[1] == 1           # DISABLE
    assert drv.reclaim(impl.ChainBatch(1)) == 1
    # a chain of exactly `size` descriptors from slot 1: slots 1..N-1 with the wrap-1
    # bits, then slot 0 with the wrap-0 bits (USED set, AVAIL clear)
    full = impl.ChainBatch(1, max_segments=size)
    full.append(readable=[(g.data_addr + i % 256, 1) for i in range(size)], token=8)
    assert drv.add(full) == 1
    slots = [(1 + k) % size for k in range(size)]
    for k, slot in enumerate(slots):
        wrap_bits = 0x80 if slot >= 1 and size > 1 else 0x8000
        nxt = 1 if k + 1 < size else 0
        assert pdesc(g, slot) == (g.data_addr + k % 256, 1, 0, wrap_bits | nxt), (k, slot)
    assert drv.next_avail == (1 if size > 1 else 0x8000)          # a lap later: wrap flipped
    big = impl.ChainBatch(1, max_segments=size)
    assert dev.pop(big) == 1 and big.descriptors_used.tolist() == [size]


def test_feature_bit_chooses_the_layout():
    assert vqcore.VIRTIO_F_RING_PACKED == 1 << 34
    g = build_guest(8, layout="packed")
    feats = vqcore.VIRTIO_F_RING_PACKED | vqcore.VIRTIO_RING_F_EVENT_IDX
    dev = vqcore.device_queue(g.memory, 8, *g.ring[:3], features=feats)
    drv = vqcore.driver_queue(g.memory, 8, *g.ring[:3], features=feats)
    assert type(dev) is vqcore.PackedDeviceQueue and type(drv) is vqcore.PackedDriverQueue
    assert dev.event_idx and drv.event_idx
    assert isinstance(dev, vqcore.DeviceQueue) and isinstance(drv, vqcore.DriverQueue)
    s = build_guest(8)
    assert type(vqcore.device_queue(s.memory, 8, *s.ring[:3])) is vqcore.SplitDeviceQueue
    assert vqcore.ring_addresses(0, 8) == vqcore.split_addresses(0, 8)
    with pytest.raises(LayoutError):                       # split needs a power of two
        vqcore.ring_addresses(0, 7)
    assert vqcore.ring_addresses(0, 7, vqcore.VIRTIO_F_RING_PACKED).end == 16 * 7 + 8
