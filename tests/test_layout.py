"""Split ring layout (VIRTIO 1.2 section 2.7): sizes, offsets and alignment.

Checked for every power-of-two queue size 1..32768 on the engine and on the model:
descriptor table 16*N bytes (16-aligned), available ring 6+2*N (2-aligned), used ring
6+8*N (4-aligned); used_event at avail+4+2*N and avail_event at used+4+8*N, found by
writing them through the queue API and reading guest memory.
"""

import struct

import numpy as np
import pytest

from vqcore.errors import LayoutError

SIZES = [1 << k for k in range(16)]          # 1 .. 32768
BAD_SIZES = [0, 3, 5, 6, 7, 12, 100, 255, 257, 1000, 32767, 32769, 49152, 65535, 65536,
             1 << 17]


def u16(guest, gpa):
    return struct.unpack("<H", guest.at(gpa, 2).tobytes())[0]


@pytest.mark.parametrize("size", SIZES)
def test_split_layout_sizes(impl, size):
    lay = impl.split_layout(size)
    assert lay.size == size
    assert lay.desc_size == 16 * size                     # virtq_desc[N]
    assert lay.avail_size == 2 + 2 + 2 * size + 2         # flags, idx, ring[N], used_event
    assert lay.used_size == 2 + 2 + 8 * size + 2          # flags, idx, elem[N], avail_event
    impl.check_queue_size(size)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("align", [4, 16, 4096])
@pytest.mark.parametrize("base", [0, 0x10000, 0x7FFF_FFF0])
def test_split_addresses(impl, size, align, base):
    a = impl.split_addresses(base, size, align)
    assert a.desc == base
    assert a.avail == base + 16 * size                    # right after the table
    avail_end = a.avail + 6 + 2 * size
    assert a.used >= avail_end and a.used - avail_end < max(align, 4)
    assert a.used % align == 0 and a.used % 4 == 0
    assert a.end == a.used + 6 + 8 * size
    assert a.desc % 16 == 0 and a.avail % 2 == 0
    assert a == impl.split_addresses(base, size, align)   # deterministic


def test_default_alignment_is_16(impl):
    # the default keeps the used ring 16-byte aligned: size 1 ends the avail ring at 24
    assert impl.split_addresses(0, 1) == (0, 16, 32, 46)
    assert impl.split_addresses(0, 1, 4) == (0, 16, 24, 38)
    assert impl.split_addresses(0, 256, 4096) == (0, 4096, 8192, 8192 + 6 + 8 * 256)


@pytest.mark.parametrize("size", BAD_SIZES)
def test_bad_sizes_rejected(impl, size, make_guest):
    with pytest.raises(LayoutError):
        impl.check_queue_size(size)
    with pytest.raises(LayoutError):
        impl.split_layout(size)
    with pytest.raises(LayoutError):
        impl.split_addresses(0, size)
    guest = make_guest(256)
    args = (guest.memory, size, guest.ring.desc, guest.ring.avail, guest.ring.used)
    with pytest.raises(LayoutError):
        impl.SplitDeviceQueue(*args)
    with pytest.raises(LayoutError):
        impl.SplitDriverQueue(*args)


def test_misaligned_base_rejected(impl):
    for base in (1, 2, 4, 8, 0x10008):
        with pytest.raises(LayoutError):
            impl.split_addresses(base, 8)


@pytest.mark.parametrize("which,offset", [
    ("desc", 1), ("desc", 2), ("desc", 4), ("desc", 8),
    ("avail", 1), ("avail", 3),
    ("used", 1), ("used", 2), ("used", 3), ("used", 6),
])
@pytest.mark.parametrize("side", ["SplitDeviceQueue", "SplitDriverQueue"])
def test_misaligned_parts_rejected(impl, make_guest, which, offset, side):
    guest = make_guest(8)
    ring = guest.ring._asdict()
    ring[which] += offset
    with pytest.raises(LayoutError):
        getattr(impl, side)(guest.memory, 8, ring["desc"], ring["avail"], ring["used"])


@pytest.mark.parametrize("side", ["SplitDeviceQueue", "SplitDriverQueue"])
def test_minimum_alignment_accepted(impl, make_guest, side):
    # the spec asks for 16/2/4 and no more: an avail ring at 2 mod 4 and a used ring at
    # 4 mod 8 are legal
    guest = make_guest(8, data_size=4096)
    desc = guest.ring.desc
    avail = desc + 16 * 8 + 2
    used = (avail + 6 + 2 * 8 + 3) // 4 * 4 + 4
    assert avail % 4 == 2 and used % 8 == 4
    q = getattr(impl, side)(guest.memory, 8, desc, avail, used)
    assert q.size == 8 and (q.desc_addr, q.avail_addr, q.used_addr) == (desc, avail, used)


def test_ring_outside_memory_rejected(impl, make_guest):
    guest = make_guest(8, data_size=4096)
    top = guest.base + guest.buffer.size
    lay = impl.split_layout(8)
    for desc, avail, used in [(top, guest.ring.avail, guest.ring.used),
                              (guest.ring.desc, top - 2, guest.ring.used),
                              (guest.ring.desc, guest.ring.avail, top - lay.used_size + 6)]:
        with pytest.raises(impl.AddressOutOfBounds):
            impl.SplitDeviceQueue(guest.memory, 8, desc, avail, used)


@pytest.mark.parametrize("size", SIZES)
def test_event_fields_and_ring_offsets(impl, make_guest, size):
    """Every field lands where the spec puts it; nothing else in memory changes."""
    guest = make_guest(size, data_size=4096)
    ring = guest.ring
    drv = guest.driver(impl, event_idx=True)
    dev = guest.device(impl, event_idx=True)
    before = guest.buffer.copy()

    def changed():
        """Guest addresses of the bytes changed since ``before`` (then re-snapshot)."""
        offs = np.flatnonzero(guest.buffer != before)
        before[:] = guest.buffer
        return {guest.base + int(o) for o in offs}

    used_event = ring.avail + 4 + 2 * size
    avail_event = ring.used + 4 + 8 * size

    # driver: used_event parked half the index space away, then back at last_used
    drv.disable_interrupts()
    assert u16(guest, used_event) == 0x8000
    assert changed() == {used_event + 1}                 # only the high byte changes
    assert drv.enable_interrupts() is False
    assert u16(guest, used_event) == 0 and changed() == {used_event + 1}

    # device: avail_event follows next_avail
    dev.next_avail = 0x1234 % 65536
    assert dev.enable_notification() is True              # avail->idx 0 != 0x1234
    assert u16(guest, avail_event) == 0x1234
    assert changed() == {avail_event, avail_event + 1}
    dev.next_avail = 0

    # one chain through the ring: descriptor 0, avail ring[0], used ring[0]
    data = guest.data_addr
    batch = impl.ChainBatch(1)
    batch.append(writable=[(data, 64)], token=7)
    assert drv.add(batch) == 1
    assert struct.unpack("<QIHH", guest.at(ring.desc, 16).tobytes()) == (data, 64, 2, 0)
    assert u16(guest, ring.avail + 4) == 0                # avail ring[0] = head 0
    assert u16(guest, ring.avail + 2) == 1                # avail->idx
    assert changed() <= set(range(ring.desc, ring.desc + 16)) | {ring.avail + 2, ring.avail + 4}
    popped = impl.ChainBatch(1)
    assert dev.pop(popped) == 1 and popped.chain(0).segments == [(data, 64, True)]
    dev.push([0], [33])
    assert struct.unpack("<II", guest.at(ring.used + 4, 8).tobytes()) == (0, 33)
    assert u16(guest, ring.used + 2) == 1                 # used->idx
    assert changed() <= {ring.used + 2, ring.used + 4, ring.used + 8}
    assert drv.reclaim(batch) == 1 and batch.tokens[0] == 7 and batch.used_len[0] == 33
    assert changed() == set()


@pytest.mark.parametrize("size", [1, 256, 32768])
def test_flag_fields(impl, make_guest, size):
    """Without event idx: NO_INTERRUPT in avail->flags, NO_NOTIFY in used->flags."""
    guest = make_guest(size, data_size=4096)
    drv = guest.driver(impl)
    dev = guest.device(impl)
    drv.disable_interrupts()
    dev.disable_notification()
    assert u16(guest, guest.ring.avail) == 1 and u16(guest, guest.ring.used) == 1
    assert drv.enable_interrupts() is False
    assert dev.enable_notification() is False
    assert u16(guest, guest.ring.avail) == 0 and u16(guest, guest.ring.used) == 0
    # the event fields are left alone without event idx
    assert u16(guest, guest.ring.avail + 4 + 2 * size) == 0
    assert u16(guest, guest.ring.used + 4 + 8 * size) == 0


def test_driver_reset_zeroes_ring_headers(impl, make_guest):
    guest = make_guest(16, data_size=4096)
    ring = guest.ring
    guest.at(ring.avail, ring.end - ring.avail)[:] = 0xAB
    guest.driver(impl, event_idx=True)
    assert not guest.at(ring.avail, 6 + 2 * 16).any()
    assert not guest.at(ring.used, 6 + 8 * 16).any()
