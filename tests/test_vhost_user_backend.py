"""The vhost-user-net back-end against a raw front-end (tests/vhost_user_peer.py).

The back-end runs with its server in a thread (one test also as a ``pyvirtio net``
subprocess); guest memory is a memfd; the guest side of the rings is a
:class:`pyvirtio.net.driver.NetDriver`. Packets go to the loopback (TX comes back as
RX), the sink, or a TAP in a namespace the test creates. The tests of traffic, ring
bases, resumes, reboots and several pairs run for split and packed rings (``ring_kind``:
the front-end negotiates VIRTIO_F_RING_PACKED or not, nothing else differs).
"""

from __future__ import annotations

import os
import struct

import pytest

from nettools import (GUEST_IP, HOST_IP, HOST_MAC, PacketSocket, namespace, needs_tap,
                      parse_udp_frame, udp_frame)
from pyvirtio.backends.sink import Sink
from pyvirtio.backends.tap import Tap
from pyvirtio.features import NetFeature as N
from pyvirtio.features import Transport as T
from pyvirtio.status import DeviceStatus as S
from pyvirtio.net.vhost_user import (GUEST_OFFLOADS, NET_PROTOCOL_FEATURES,
                                     VhostUserNetDevice, rarp_frame)
from pyvirtio.vhost_user.handler import offered_protocol_features
from pyvirtio.vhost_user.messages import (F_PROTOCOL_FEATURES, MAX_MEM_SLOTS, ConfigSpace,
                                          MemRegion, ProtocolFeature, Request, U64)
from vhost_user_peer import (ALL_PROTOCOL, GPA_BASE, NET_OFFERED, Guest, GuestRam, frame,
                             new_driver, recv_frames, ring_features, serving, start_net,
                             wait_for)

GUEST_MAC = bytes.fromhex("525400abcdef")


@pytest.fixture
def ram(request):
    r = GuestRam(8 << 20, name=f"vu-ram-{os.getpid()}-{request.node.name[:40]}")
    yield r
    r.close()


def _memfd_maps(name: str) -> int:
    """How many mappings of memfd ``name`` this process has."""
    with open("/proc/self/maps") as f:
        return sum(1 for line in f if f"/memfd:{name} " in line)


def _exchange(driver, pair: int, first: int, count: int, size: int = 64) -> None:
    """Send ``count`` numbered frames on ``pair`` and check they come back in order."""
    frames = [frame(first + i, size) for i in range(count)]
    sent = 0
    got: list[bytes] = []
    while sent < count:
        n = driver.send(pair, frames[sent:sent + 128])
        sent += n
        got += recv_frames(driver, pair, n)
    got += recv_frames(driver, pair, count - len(got))
    assert len(got) == count
    assert got == frames


# ---- negotiation ------------------------------------------------------------------------

def test_features_and_protocol_features_offered(tmp_path):
    with serving(tmp_path, queues=1) as s, s.connect() as p:
        features = p.get_features()
        assert features == NET_OFFERED
        for bit in (T.VERSION_1, T.EVENT_IDX, T.INDIRECT_DESC, N.MRG_RXBUF, N.CSUM,
                    N.GUEST_CSUM, N.HOST_TSO4, N.HOST_TSO6, N.HOST_ECN, N.HOST_UFO,
                    N.GUEST_TSO4, N.GUEST_TSO6, N.GUEST_ECN, N.GUEST_UFO, N.MTU):
            assert features & bit, bit
        assert features & (1 << 30)
        assert not features & (N.MQ | N.CTRL_VQ | N.MAC | N.STATUS)
        protocol = p.get_u64(Request.GET_PROTOCOL_FEATURES)
        assert protocol == offered_protocol_features(NET_PROTOCOL_FEATURES, True) == ALL_PROTOCOL
        assert p.negotiate_protocol() == ALL_PROTOCOL
        assert p.get_u64(Request.GET_QUEUE_NUM) == 1      # (also: SET_... was handled)
        assert s.handler.protocol_features == ALL_PROTOCOL
        assert p.get_u64(Request.GET_MAX_MEM_SLOTS) == MAX_MEM_SLOTS
    with serving(tmp_path, queues=4) as s, s.connect() as p:
        assert p.get_features() & N.MQ
        p.negotiate_protocol()
        assert p.get_u64(Request.GET_QUEUE_NUM) == 4


def test_set_features_negotiates_and_sets_offloads(tmp_path):
    with serving(tmp_path) as s, s.connect() as p:
        p.negotiate_protocol()
        want = (T.VERSION_1 | F_PROTOCOL_FEATURES | N.MRG_RXBUF | N.CSUM | N.GUEST_CSUM
                | N.GUEST_TSO4 | N.GUEST_ECN)
        # GUEST_ANNOUNCE is not offered (QEMU keeps it) but QEMU sends it: ignored
        assert p.set_features(int(want | N.GUEST_ANNOUNCE)) == 0
        assert s.handler.acked_features == want
        assert s.packet.offloads == int(want) & GUEST_OFFLOADS
        # a broken dependency (GUEST_TSO4 needs GUEST_CSUM) and no VERSION_1: refused
        assert p.set_features(int(T.VERSION_1 | N.GUEST_TSO4), check=False) != 0
        assert p.set_features(int(N.MRG_RXBUF), check=False) != 0
        assert s.handler.acked_features == want
        # a protocol feature that was not offered is refused
        p.send(Request.SET_PROTOCOL_FEATURES,
               U64(ProtocolFeature.REPLY_ACK | ProtocolFeature.LOG_SHMFD).pack(),
               need_reply=True)
        assert U64.unpack(p.recv().body).value != 0
        assert s.handler.protocol_features == ALL_PROTOCOL


# ---- ring life cycle ------------------------------------------------------------------------

def test_rings_start_disabled_with_protocol_features(tmp_path, ram, ring_kind):
    with serving(tmp_path, "loopback") as s, s.connect() as p:
        g = start_net(p, ram, enable=False, packed=ring_kind == "packed")
        assert [r.started for r in s.handler.rings] == [True, True]
        assert [s.handler.effective_enable(i) for i in (0, 1)] == [False, False]
        assert not s.device.net.workers[0].cfg.tx_enabled
        discarded = [frame(1000 + i) for i in range(10)]
        assert g.driver.send(0, discarded) == 10
        assert g.driver.wait_tx_done(0)      # a disabled ring processes and discards TX
        wait_for(lambda: s.device.pair_stats()[0]["tx"]["dropped"] == 10)
        g.enable(True)
        assert [s.handler.effective_enable(i) for i in (0, 1)] == [True, True]
        assert s.device.net.workers[0].cfg.tx_enabled
        _exchange(g.driver, 0, 0, 20)        # the discarded frames never show up
        assert s.device.pair_stats()[0]["rx"]["packets"] == 20
        g.close()


def test_rings_start_enabled_without_protocol_features(tmp_path, ram):
    with serving(tmp_path, "loopback") as s, s.connect() as p:
        offered = p.get_features()
        g = start_net(p, ram, features=offered & ~F_PROTOCOL_FEATURES)
        _exchange(g.driver, 0, 0, 30)
        assert [s.handler.effective_enable(i) for i in (0, 1)] == [True, True]
        g.close()


def test_kicks_and_frames_before_enable_are_not_lost(tmp_path, ram):
    with serving(tmp_path, "loopback") as s, s.connect() as p:
        g = start_net(p, ram, enable=False, post_rx=False)
        p.vring_enable(1, True)              # TX on, RX still disabled
        frames = [frame(i) for i in range(20)]
        assert g.driver.send(0, frames) == 20
        assert g.driver.wait_tx_done(0)      # sent into the loopback; RX supplies nothing
        assert g.driver.post_rx(0) == 256    # buffers and their kick while RX is disabled
        assert g.driver.rx[0].kicks >= 1
        assert s.device.pair_stats()[0]["rx"]["packets"] == 0
        p.vring_enable(0, True)              # no kick after this
        assert recv_frames(g.driver, 0, 20) == frames
        g.close()


def test_kick_before_the_ring_starts_is_not_lost(tmp_path, ram, ring_kind):
    """QEMU's order: SET_VRING_ENABLE before SET_VRING_KICK; the guest kicked already."""
    with serving(tmp_path, "loopback") as s, s.connect() as p:
        features = ring_features(p.get_features(), ring_kind == "packed")
        p.negotiate_protocol()
        p.set_features(features)
        p.set_mem_table([ram])
        driver = new_driver(ram, features)
        g = Guest(p, ram, driver, features)
        for i in (0, 1):
            g.setup_ring(i, kick=False)
        g.enable(True)
        assert not any(r.started for r in s.handler.rings)
        frames = [frame(i) for i in range(16)]
        driver.post_rx(0)
        assert driver.send(0, frames) == 16 and driver.tx[0].kicks == 1
        for i in (0, 1):
            p.vring_fd(Request.SET_VRING_KICK, i, driver._queue(i).kick_fd)
        assert recv_frames(driver, 0, 16) == frames
        g.close()


def test_get_vring_base_stops_the_ring_and_returns_next_avail(tmp_path, ram, ring_kind):
    with serving(tmp_path, "loopback") as s, s.connect() as p:
        g = start_net(p, ram, packed=ring_kind == "packed")
        _exchange(g.driver, 0, 0, 37)
        assert p.get_vring_base(1) == g.base(37)
        assert g.base(37) & 0xFFFF == g.driver.tx[0].queue.next_avail
        assert not s.handler.rings[1].started
        assert s.handler.rings[1].queue is None
        # frames queued while TX is stopped go out once it is started where it stopped
        later = [frame(100 + i) for i in range(5)]
        assert g.driver.send(0, later) == 5
        g.setup_ring(1, base=g.base(37))
        assert recv_frames(g.driver, 0, 5) == later
        # the RX ring, after SET_VRING_ENABLE(0) as QEMU 7.2+ sends it first
        p.vring_enable(0, False)
        assert p.get_vring_base(0) == g.base(42)
        assert g.base(42) & 0xFFFF == g.driver.rx[0].queue.last_used
        assert p.get_vring_base(1) == g.base(42)
        # a ring that is not running answers the index it stopped at, or was given
        assert p.get_vring_base(0) == g.base(42)
        p.vring_base(0, g.base(7))
        assert p.get_vring_base(0) == g.base(7)
        g.close()


def test_resume_in_a_fresh_backend_loses_and_repeats_nothing(tmp_path, ram, ring_kind):
    """GET_VRING_BASE after traffic (300 chains: a packed ring of 256 wrapped), then
    SET_VRING_BASE into a fresh back-end: the rings resume where they were."""
    with serving(tmp_path, "loopback") as s:
        with s.connect() as p:
            g = start_net(p, ram, packed=ring_kind == "packed")
            _exchange(g.driver, 0, 0, 300)
            bases = g.stop()
        assert bases == {0: g.base(300), 1: g.base(300)}
        if g.packed:         # slot 44, both wrap counters flipped to 0
            assert bases[0] == 44 | 44 << 16
        wait_for(lambda: s.port.connections == 1 and s.port.handler is None)
        with s.connect() as p:          # a new connection is a fresh back-end
            p.negotiate_protocol()
            p.set_features(g.features)
            p.set_mem_table([ram])
            for i in (0, 1):
                g.peer = p
                g.setup_ring(i, base=bases[i])
            g.enable(True)
            _exchange(g.driver, 0, 300, 300)
            assert g.stop() == {0: g.base(600), 1: g.base(600)}
        g.close()


def test_packed_resume_with_chains_in_flight_processes_them_again(tmp_path, ram):
    """A packed ring stopped with chains in flight (the used half of the base behind
    the avail half, as QEMU hands back what the previous back-end answered): the new
    back-end starts at the used position and processes them (the loopback returns each
    frame once); a ring of 100 slots (not a power of two) wraps on the way."""
    with serving(tmp_path, "loopback") as s, s.connect() as p:
        g = start_net(p, ram, packed=True, queue_size=100)
        _exchange(g.driver, 0, 0, 150)
        bases = g.stop()
        assert bases == {0: g.base(150), 1: g.base(150)}
        assert bases[1] == 50 | 50 << 16               # wrap counters 0
        # the guest queues two frames while no back-end runs
        later = [frame(500), frame(501)]
        assert g.driver.send(0, later) == 2
        # pretend the previous owner had popped them (avail 52) but not completed them
        in_flight = 50 << 16 | 52
        g.enable(True)          # before the rings start: a disabled TX ring discards
        g.setup_ring(1, base=in_flight)
        g.setup_ring(0, base=bases[0])
        assert recv_frames(g.driver, 0, 2) == later
        _exchange(g.driver, 0, 1000, 80)
        assert g.stop() == {0: g.base(232), 1: g.base(232)}
        g.close()


def test_packed_stale_base_after_a_lost_backend_is_corrected_from_the_ring(tmp_path, ram,
                                                                         caplog):
    """QEMU 7.2, packed ring, back-end gone without GET_VRING_BASE: the next back-end
    is given the base of the previous start (0x80008000). The descriptors say where the
    device was (used elements of this lap, buffers made available again): the rings
    resume there, every frame once, in order, across two laps of a 64-slot ring."""
    with serving(tmp_path, "loopback") as s:
        with s.connect() as p:
            g = start_net(p, ram, packed=True, queue_size=64)
            _exchange(g.driver, 0, 0, 100)          # past one lap
        # the connection dropped: no GET_VRING_BASE; a new front-end session
        wait_for(lambda: s.port.connections == 1 and s.port.handler is None)
        with s.connect() as p:
            p.negotiate_protocol()
            p.set_features(g.features)
            p.set_mem_table([ram])
            g.peer = p
            g.enable(True)
            for i in (0, 1):
                g.setup_ring(i, base=0x80008000)    # what QEMU 7.2 sends then
            assert "is stale" in caplog.text
            queue = s.handler.rings[1].queue
            assert queue.next_avail == queue.next_used == 36   # slot 36, wrap 0
            _exchange(g.driver, 0, 100, 150)
            assert g.stop() == {0: g.base(250), 1: g.base(250)}
        g.close()


def test_ring_without_kick_fd_is_polled(tmp_path, ram, ring_kind):
    with serving(tmp_path, "loopback") as s, s.connect() as p:
        features = ring_features(p.get_features(), ring_kind == "packed")
        p.negotiate_protocol()
        p.set_features(features)
        p.set_mem_table([ram])
        driver = new_driver(ram, features)
        g = Guest(p, ram, driver, features)
        g.setup_ring(0)
        g.setup_ring(1, poll=True)           # SET_VRING_KICK with the no-fd flag
        os.close(driver.tx[0].kick_fd)
        driver.tx[0].kick_fd = -1            # this guest never kicks TX
        g.enable(True)
        driver.post_rx(0)
        assert s.handler.rings[1].kick_fd == -1
        assert s.device.net.workers[0].cfg.poll
        _exchange(driver, 0, 0, 50)
        assert p.get_vring_base(1) == g.base(50)
        wait_for(lambda: 0 in s.device.net.workers)
        assert not s.device.net.workers[0].cfg.poll   # RX alone: back to sleeping
        g.close()


def test_broken_ring_signals_its_error_fd_and_needs_reset(tmp_path, ram):
    """A guest that breaks the TX ring: SET_VRING_ERR's eventfd fires, GET_STATUS has
    DEVICE_NEEDS_RESET, the other ring goes on; SET_STATUS(0) clears it."""
    import select as _select
    with serving(tmp_path, "loopback") as s, s.connect() as p:
        g = start_net(p, ram)
        err = os.eventfd(0, os.EFD_NONBLOCK)
        try:
            p.vring_fd(Request.SET_VRING_ERR, 1, err)
            _exchange(g.driver, 0, 0, 10)
            q = g.driver.tx[0].queue
            avail = q.avail_addr
            idx = int.from_bytes(ram.memory.read(avail + 2, 2), "little")
            ram.memory.write(avail + 4 + 2 * (idx % q.size), (999).to_bytes(2, "little"))
            ram.memory.write(avail + 2, ((idx + 1) & 0xFFFF).to_bytes(2, "little"))
            os.eventfd_write(g.driver.tx[0].kick_fd, 1)
            assert _select.select([err], [], [], 5.0)[0], "no signal on the error fd"
            assert p.get_u64(Request.GET_STATUS) & S.DEVICE_NEEDS_RESET
            assert s.handler.needs_reset_reason and ".q1:" in s.handler.needs_reset_reason
            p.call(Request.SET_STATUS, U64(0).pack())
            assert not p.get_u64(Request.GET_STATUS) & S.DEVICE_NEEDS_RESET
        finally:
            os.close(err)
        g.close()


def test_broken_packed_ring_signals_its_error_fd_and_needs_reset(tmp_path, ram):
    """A guest that puts a descriptor pointing outside guest memory on a packed TX
    ring: the error fd fires, DEVICE_NEEDS_RESET is set, the RX ring goes on."""
    import select as _select
    with serving(tmp_path, "loopback") as s, s.connect() as p:
        g = start_net(p, ram, packed=True)
        err = os.eventfd(0, os.EFD_NONBLOCK)
        try:
            p.vring_fd(Request.SET_VRING_ERR, 1, err)
            _exchange(g.driver, 0, 0, 10)
            q = g.driver.tx[0].queue
            slot, wrap = q.next_avail & 0x7FFF, q.next_avail >> 15
            flags = (1 << 7) if wrap else (1 << 15)        # available for this lap
            desc = struct.pack("<QIHH", 0xDEAD_0000_0000, 64, 0, flags)
            ram.memory.write(q.desc_addr + 16 * slot, desc)
            os.eventfd_write(g.driver.tx[0].kick_fd, 1)
            assert _select.select([err], [], [], 5.0)[0], "no signal on the error fd"
            assert p.get_u64(Request.GET_STATUS) & S.DEVICE_NEEDS_RESET
            assert ".q1:" in s.handler.needs_reset_reason
            s.packet.inject(frame(77))                 # RX still delivers
            assert recv_frames(g.driver, 0, 1) == [frame(77)]
        finally:
            os.close(err)
        g.close()


# ---- memory ----------------------------------------------------------------------------------

def test_memory_table_swap_with_running_rings(tmp_path, ram, ring_kind):
    extra_name = f"vu-extra-{os.getpid()}"
    extra = GuestRam(1 << 20, gpa=GPA_BASE + (1 << 30), name=extra_name)
    try:
        with serving(tmp_path, "loopback") as s, s.connect() as p:
            g = start_net(p, ram, packed=ring_kind == "packed")
            _exchange(g.driver, 0, 0, 50)
            assert _memfd_maps(ram.name) == 2       # ours and the back-end's
            assert p.set_mem_table([ram, extra]) == 0
            assert len(s.handler.regions) == 2
            assert all(r.started for r in s.handler.rings)
            # the old mapping is gone; one new one per region
            assert _memfd_maps(ram.name) == 2
            assert _memfd_maps(extra_name) == 2
            _exchange(g.driver, 0, 50, 50)          # the rings went on where they were
            assert p.get_vring_base(1) == g.base(100)
            g.setup_ring(1, base=g.base(100))
            # a table without the rings' region: refused, the rings stop
            assert p.set_mem_table([extra], check=False) != 0
            assert not any(r.started for r in s.handler.rings)
            status = p.get_u64(Request.GET_STATUS)
            assert status & S.DEVICE_NEEDS_RESET
            assert _memfd_maps(ram.name) == 1
            g.close()
    finally:
        extra.close()


def test_add_and_remove_memory_regions(tmp_path, ram):
    extra = GuestRam(1 << 20, gpa=GPA_BASE + (1 << 30), name="vu-extra")
    try:
        with serving(tmp_path, "loopback") as s, s.connect() as p:
            g = start_net(p, ram, memory="add")
            assert len(s.handler.regions) == 1
            _exchange(g.driver, 0, 0, 40)
            assert p.add_mem_reg(extra.region(), extra.fd) == 0
            assert len(s.handler.regions) == 2
            _exchange(g.driver, 0, 40, 40)
            # overlapping an existing region (guest-physical): refused
            overlap = MemRegion(ram.gpa + 4096, 4096, extra.uva + (1 << 40), 0)
            assert p.add_mem_reg(overlap, extra.fd, check=False) != 0
            # QEMU used to send the region's fd with REM_MEM_REG: accepted, closed
            assert p.rem_mem_reg(extra.region(), [extra.fd]) == 0
            assert len(s.handler.regions) == 1
            # removed again, with no add of it left: refused, nothing changes
            assert p.rem_mem_reg(extra.region(), check=False) != 0
            assert len(s.handler.regions) == 1
            # a region that was never added: refused
            assert p.rem_mem_reg(MemRegion(GPA_BASE + (1 << 32), 4096, 1 << 44, 0),
                                 check=False) != 0
            assert len(s.handler.regions) == 1
            _exchange(g.driver, 0, 80, 40)
            assert g.stop() == {0: 120, 1: 120}
            g.close()
    finally:
        extra.close()


def test_duplicate_add_mem_reg_per_queue_pair(tmp_path, ring_kind, caplog):
    """QEMU 7.2 with 2 queue pairs: each pair's vhost device sends ADD_MEM_REG of the
    same region (and later REM_MEM_REG): the copy is acknowledged and its fd closed,
    one mapping serves both pairs, and traffic flows on both. The first REM_MEM_REG
    unmaps it, pair 1's is acknowledged, a third is refused; a copy beyond one per pair
    is refused."""
    ram = GuestRam(16 << 20, name=f"vu-dup-{os.getpid()}")
    try:
        with serving(tmp_path, "loopback", queues=2) as s, s.connect() as p:
            caplog.set_level("DEBUG", logger="pyvirtio.vhost_user.memory")
            g = start_net(p, ram, pairs=2, memory="add", packed=ring_kind == "packed")
            fd = os.dup(ram.fd)
            try:
                assert p.add_mem_reg(ram.region(), fd) == 0        # pair 1's copy
            finally:
                os.close(fd)
            assert len(s.handler.regions) == 1
            assert _memfd_maps(ram.name) == 2           # ours and the back-end's one
            assert "already mapped" in caplog.text
            for pair in (0, 1):
                _exchange(g.driver, pair, 0, 60 + 10 * pair)
            stats = s.device.pair_stats()
            assert [st["tx"]["packets"] for st in stats] == [60, 70]
            assert [st["rx"]["packets"] for st in stats] == [60, 70]
            # the same region at another mmap offset is not a copy: it overlaps
            moved = MemRegion(ram.gpa, ram.size, ram.uva, 4096)
            assert p.add_mem_reg(moved, ram.fd, check=False) != 0
            assert g.stop() == {0: g.base(60), 1: g.base(60), 2: g.base(70),
                                3: g.base(70)}
            assert p.rem_mem_reg(ram.region()) == 0
            assert not s.handler.regions
            assert _memfd_maps(ram.name) == 1
            assert p.rem_mem_reg(ram.region()) == 0       # pair 1's removal
            assert p.rem_mem_reg(ram.region(), check=False) != 0
            # once per queue pair at most: a third copy of a region on 2 pairs is refused
            for _ in range(2):
                assert p.add_mem_reg(ram.region(), ram.fd) == 0
            assert p.add_mem_reg(ram.region(), ram.fd, check=False) != 0
            assert [m.adds for m in s.handler.regions] == [2]
            g.close()
    finally:
        ram.close()


def test_region_replaced_per_queue_pair(tmp_path):
    """QEMU 7.2 with 2 queue pairs replacing a region: pair 0 removes it and adds a
    larger one over the same guest-physical range, then pair 1 does the same. Both
    steps are acknowledged and leave one mapping of the new region; a removal beyond
    the copies, or of a region never added, is refused; SET_MEM_TABLE forgets the
    copies still to be removed."""
    ram = GuestRam(1 << 20, gpa=GPA_BASE + (1 << 30), name=f"vu-rep-{os.getpid()}")
    big = GuestRam(2 << 20, gpa=GPA_BASE + (1 << 30), name=f"vu-big-{os.getpid()}")
    rings = GuestRam(1 << 20, name=f"vu-rings-{os.getpid()}")
    try:
        with serving(tmp_path, "loopback", queues=2) as s, s.connect() as p:
            p.negotiate_protocol()
            for fd in (rings.fd, ram.fd, ram.fd):           # pair 1 adds ram again
                region = rings.region() if fd == rings.fd else ram.region()
                assert p.add_mem_reg(region, fd) == 0
            assert len(s.handler.regions) == 2
            for _pair in (0, 1):
                assert p.rem_mem_reg(ram.region()) == 0
                assert p.add_mem_reg(big.region(), big.fd) == 0
                assert [m.region for m in s.handler.regions] == [rings.region(),
                                                                big.region()]
            assert _memfd_maps(ram.name) == 1                # ours only
            assert _memfd_maps(big.name) == 2
            assert p.rem_mem_reg(ram.region(), check=False) != 0
            assert p.rem_mem_reg(MemRegion(GPA_BASE + (1 << 34), 4096, 1 << 44, 0),
                                 check=False) != 0
            assert p.rem_mem_reg(big.region()) == 0
            assert p.set_mem_table([rings]) == 0
            assert p.rem_mem_reg(big.region(), check=False) != 0
            assert [m.region for m in s.handler.regions] == [rings.region()]
    finally:
        for r in (ram, big, rings):
            r.close()


# ---- configuration, status, reset ----------------------------------------------------------

def test_tx_coalesce_us_reaches_every_device(tmp_path):
    """The back-end's tx_coalesce_us is the device's, also for the fresh device of the
    next connection; a value the workers do not accept is refused up front."""
    with serving(tmp_path, "sink", tx_coalesce_us=0) as s:
        first = s.device.net
        assert first.tx_coalesce_us == 0
        with s.connect() as p:
            p.negotiate_protocol()
        wait_for(lambda: s.device.net is not first, what="a fresh device")
        assert s.device.net.tx_coalesce_us == 0
    with Sink() as sink, pytest.raises(ValueError, match="tx_coalesce_us 10001"):
        VhostUserNetDevice(sink, tx_coalesce_us=10001)



def test_get_and_set_config(tmp_path):
    with serving(tmp_path, queues=2, mac=GUEST_MAC, mtu=9000) as s, s.connect() as p:
        p.negotiate_protocol()
        cfg = p.get_config(0, 12)
        assert (cfg.offset, cfg.size) == (0, 12)
        mac, status, pairs, mtu = struct.unpack("<6sHHH", cfg.payload)
        assert (mac, status, pairs, mtu) == (GUEST_MAC, 0, 2, 9000)
        assert p.get_config(10, 2).payload == struct.pack("<H", 9000)
        assert p.get_config(0, 64).size == 0            # outside: a zero-length answer
        new_mac = bytes.fromhex("02aabbccddee")
        plain = ConfigSpace(0, 6, 0, new_mac).pack()
        assert p.call(Request.SET_CONFIG, plain, check=False) != 0   # read-only fields
        migration = ConfigSpace(0, 6, 1, new_mac).pack()
        assert p.call(Request.SET_CONFIG, migration) == 0
        assert p.get_config(0, 6).payload == new_mac
        assert s.device.net.rx_filter.mac == new_mac
        pairs3 = ConfigSpace(8, 2, 1, struct.pack("<H", 3)).pack()
        assert p.call(Request.SET_CONFIG, pairs3, check=False) != 0


def test_set_and_get_status(tmp_path, ram):
    with serving(tmp_path, "loopback") as s, s.connect() as p:
        p.negotiate_protocol()
        assert p.get_u64(Request.GET_STATUS) == 0
        # FEATURES_OK before any SET_FEATURES: the device refuses it
        p.call(Request.SET_STATUS, U64(S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK).pack())
        assert p.get_u64(Request.GET_STATUS) == S.ACKNOWLEDGE | S.DRIVER
        g = start_net(p, ram)
        ok = S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK | S.DRIVER_OK
        p.call(Request.SET_STATUS, U64(ok).pack())
        assert p.get_u64(Request.GET_STATUS) == ok
        _exchange(g.driver, 0, 0, 25)
        # status 0 (QEMU sends it before GET_VRING_BASE): the rings stop, indices kept
        p.call(Request.SET_STATUS, U64(0).pack())
        assert not any(r.started for r in s.handler.rings)
        assert p.get_vring_base(1) == 25 and p.get_vring_base(0) == 25
        assert p.call(Request.SET_STATUS, U64(0x1FF).pack(), check=False) != 0
        g.close()


def test_reset_device_returns_to_the_initial_state(tmp_path, ram):
    with serving(tmp_path, "loopback") as s, s.connect() as p:
        g = start_net(p, ram)
        _exchange(g.driver, 0, 0, 30)
        assert p.call(Request.RESET_DEVICE) == 0
        h = s.handler
        assert not any(r.started for r in h.rings)
        assert s.device.net.negotiated_features == 0 and h.memory is None and not h.regions
        assert h.protocol_features == ALL_PROTOCOL          # the connection's, kept
        g.close()
        g = start_net(p, ram)                               # set up again from scratch
        _exchange(g.driver, 0, 0, 30)
        assert g.stop() == {0: 30, 1: 30}
        g.close()


def test_guest_reboot_sequence(tmp_path, ring_kind):
    ram = GuestRam(16 << 20, name="vu-reboot")
    try:
        with serving(tmp_path, "loopback", queues=2) as s, s.connect() as p:
            g = start_net(p, ram, pairs=2, packed=ring_kind == "packed")
            ok = S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK | S.DRIVER_OK
            p.call(Request.SET_STATUS, U64(ok).pack())
            _exchange(g.driver, 0, 0, 70)
            _exchange(g.driver, 1, 0, 20)
            # QEMU's stop: status 0, rings disabled, GET_VRING_BASE per ring
            p.call(Request.SET_STATUS, U64(0).pack())
            assert g.stop() == {0: g.base(70), 1: g.base(70), 2: g.base(20), 3: g.base(20)}
            features = g.features
            g.close()
            # the guest boots again: new rings (elsewhere), every index from 0
            p.set_features(features)
            p.set_mem_table([ram])
            driver = new_driver(ram, features, pairs=2, base_offset=8 << 20)
            g = Guest(p, ram, driver, features)
            for i in range(4):
                g.setup_ring(i, base=g.base(0))      # QEMU after a reset: 0 / 0x80008000
            g.enable(True)
            for pair in (0, 1):
                driver.post_rx(pair)
            p.call(Request.SET_STATUS, U64(ok).pack())
            _exchange(driver, 0, 0, 10)
            _exchange(driver, 1, 0, 15)
            assert g.stop() == {0: g.base(10), 1: g.base(10), 2: g.base(15), 3: g.base(15)}
            g.close()
    finally:
        ram.close()


# ---- frames --------------------------------------------------------------------------------

def test_frames_through_loopback_on_four_pairs(tmp_path, ring_kind):
    ram = GuestRam(16 << 20, name="vu-4pairs")
    try:
        with serving(tmp_path, "loopback", queues=4) as s, s.connect() as p:
            g = start_net(p, ram, pairs=4, packed=ring_kind == "packed")
            for pair in range(4):
                sizes = [60 + (i * 97 + pair * 31) % 1455 for i in range(300)]
                frames = [frame(pair * 1000 + i, n) for i, n in enumerate(sizes)]
                sent = 0
                got: list[bytes] = []
                while sent < len(frames):
                    n = g.driver.send(pair, frames[sent:sent + 100])
                    sent += n
                    got += recv_frames(g.driver, pair, n)
                assert got == frames
            stats = s.device.pair_stats()
            assert [st["rx"]["packets"] for st in stats] == [300] * 4
            assert [st["tx"]["packets"] for st in stats] == [300] * 4
            g.close()
    finally:
        ram.close()


def test_sink_consumes_every_frame_and_counts_it(tmp_path, ram):
    with serving(tmp_path, "sink") as s, s.connect() as p:
        g = start_net(p, ram)
        sent = 0
        while sent < 1000:
            sent += g.driver.send(0, [frame(sent + i) for i in range(min(200, 1000 - sent))])
            assert g.driver.wait_tx_done(0)
        stats = s.device.pair_stats()[0]
        # consumed with no syscall (DISCARD_FD) and counted as sent, headers excluded
        assert stats["tx"]["packets"] == 1000 and stats["tx"]["dropped"] == 0
        assert stats["tx"]["bytes"] == sum(len(frame(i)) for i in range(1000))
        assert stats["rx"]["packets"] == 0
        assert p.get_vring_base(1) == 1000
        p.call(Request.SEND_RARP, GUEST_MAC + bytes(2))
        assert s.packet.injected == 1
        g.close()


def test_send_rarp_through_loopback_reaches_the_guest(tmp_path, ram):
    with serving(tmp_path, "loopback") as s, s.connect() as p:
        g = start_net(p, ram)
        assert p.call(Request.SEND_RARP, GUEST_MAC + bytes(2)) == 0
        got = recv_frames(g.driver, 0, 1)
        assert got == [rarp_frame(GUEST_MAC)]
        g.close()


# ---- TAP ------------------------------------------------------------------------------------

@pytest.fixture
def tap_ns():
    with namespace() as ns:
        tap = Tap.create("vutap0", 1, netns=ns.name, mac=HOST_MAC)
        try:
            yield ns, tap
        finally:
            tap.close()


@needs_tap
def test_net_set_mtu_sets_the_tap_and_the_config(tmp_path, tap_ns):
    ns, tap = tap_ns
    with serving(tmp_path, tap) as s:
        with s.connect() as p:
            p.negotiate_protocol()
            p.set_features(p.get_features())
            assert p.call(Request.NET_SET_MTU, U64(9000).pack()) == 0
            assert tap.link_info()["mtu"] == 9000
            assert p.get_config(10, 2).payload == struct.pack("<H", 9000)
            assert p.call(Request.NET_SET_MTU, U64(70000).pack(), check=False) != 0
            assert p.call(Request.NET_SET_MTU, U64(65535).pack(), check=False) != 0  # TAP max
            assert tap.link_info()["mtu"] == 9000
        # the next front-end finds the MTU the back-end was started with
        wait_for(lambda: s.port.connections == 1 and s.port.handler is None
                 and tap.link_info()["mtu"] == 1500)


@needs_tap
def test_send_rarp_is_seen_in_the_tap_namespace(tmp_path, tap_ns):
    ns, tap = tap_ns
    with serving(tmp_path, tap) as s, s.connect() as p, PacketSocket(ns, "vutap0") as ps:
        p.negotiate_protocol()
        assert p.call(Request.SEND_RARP, GUEST_MAC + bytes(2)) == 0
        got = ps.recv(5.0, match=lambda f: f[12:14] == b"\x80\x35")
        assert got is not None
        assert got[:6] == b"\xff" * 6 and got[6:12] == GUEST_MAC
        htype, ptype, hlen, plen, op, sha, spa, tha, tpa = struct.unpack(
            "!HHBBH6s4s6s4s", got[14:42])
        assert (htype, ptype, hlen, plen, op) == (1, 0x0800, 6, 4, 3)
        assert sha == tha == GUEST_MAC


@needs_tap
def test_frames_both_ways_through_a_tap(tmp_path, tap_ns, ram):
    ns, tap = tap_ns
    with serving(tmp_path, tap, mac=GUEST_MAC) as s, s.connect() as p, \
            PacketSocket(ns, "vutap0") as ps:
        g = start_net(p, ram)
        out = [udp_frame(HOST_MAC, GUEST_MAC, GUEST_IP, HOST_IP, 4000, 5000 + i,
                         bytes([i]) * (20 + i)) for i in range(10)]
        assert g.driver.send(0, out) == 10
        seen = ps.recv_many(10, 3.0, match=lambda f: f[6:12] == GUEST_MAC)
        assert seen == out
        back = [udp_frame(GUEST_MAC, HOST_MAC, HOST_IP, GUEST_IP, 5000, 4000 + i,
                          bytes([i]) * (30 + i)) for i in range(10)]
        for f in back:
            ps.send(f)
        got = [f for f in recv_frames(g.driver, 0, 10) if f[6:12] == HOST_MAC]
        assert [parse_udp_frame(f).payload for f in got] == [b[42:] for b in back]
        g.close()
