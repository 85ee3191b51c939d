"""The control virtqueue (pyvirtio.net.ctrl) over a real vqcore ring.

A driver queue plays the guest's driver: it writes each command (header, data,
ack byte pre-filled with 0xAA) into numpy-backed guest memory and makes it available
(the tests on the ``env`` fixture run over a split and a packed ring, ``ring_kind``);
the ``ControlQueue`` answers on the device side; the driver reclaims the chain and the
test reads the ack byte and the used length. One test per command, one per kind of
malformed command; hostile rings the driver API refuses to build are written raw with
``ringwriter``.
"""

from __future__ import annotations

import logging
import struct

import pytest

import vqcore
from vqcore.errors import BatchTooSmall, WritableBeforeReadable
from vqcore.net import NetRxFilter

import ringwriter as rw
from pyvirtio.features import NetFeature, Transport
from pyvirtio.net import ctrl as c
from pyvirtio.net.ctrl import ControlQueue, CtrlError

N = NetFeature
QSIZE = 64
OWN_MAC = bytes.fromhex("525400000001")
FILL = 0xAA       # the ack byte before the device answers

FULL = int(Transport.VERSION_1 | N.CTRL_VQ | N.CTRL_RX | N.CTRL_RX_EXTRA | N.CTRL_VLAN
           | N.CTRL_MAC_ADDR | N.MQ | N.GUEST_ANNOUNCE | N.CTRL_GUEST_OFFLOADS | N.GUEST_CSUM
           | N.GUEST_TSO4 | N.GUEST_TSO6 | N.GUEST_ECN | N.MAC | N.MRG_RXBUF)


class FakeNet:
    """A NetControlTarget: the real vqcore.net.NetRxFilter plus recorded calls."""

    def __init__(self, features: int = FULL, max_pairs: int = 4) -> None:
        self.negotiated_features = features
        self.max_virtqueue_pairs = max_pairs
        self.rx_filter = NetRxFilter(OWN_MAC)
        self.calls: list[tuple] = []
        self.fail_with: Exception | None = None

    def _record(self, *call) -> None:
        if self.fail_with is not None:
            raise self.fail_with
        self.calls.append(call)

    def mac_address_set(self, mac: bytes) -> None:
        self._record("mac_address_set", mac)

    def set_queue_pairs(self, pairs: int) -> None:
        self._record("set_queue_pairs", pairs)

    def ack_announce(self) -> None:
        self._record("ack_announce")

    def set_guest_offloads(self, offloads: int) -> None:
        self._record("set_guest_offloads", offloads)


class Env:
    """Guest driver, device control queue and target on one ring."""

    def __init__(self, guest, features: int = FULL, batch: vqcore.ChainBatch | None = None,
                 with_driver: bool = True) -> None:
        self.guest = guest
        self.mem = guest.memory
        self.driver = guest.driver(vqcore) if with_driver else None
        self.device = guest.device(vqcore)
        self.target = FakeNet(features)
        self.reported: list[Exception] = []
        self.ctrl = ControlQueue(self.device, self.target, batch=batch,
                                 on_error=self.reported.append)
        self.cursor = guest.data_addr

    def put(self, data: bytes) -> tuple[int, int]:
        """Copy ``data`` to fresh guest memory; returns ``(gpa, len)``."""
        gpa = self.cursor
        self.cursor += (len(data) + 15) // 16 * 16 or 16
        assert self.cursor <= self.guest.data_addr + self.guest.data_size
        self.mem.write(gpa, data)
        return gpa, len(data)

    def ack_slot(self, size: int = 1) -> tuple[int, int]:
        return self.put(bytes([FILL]) * size)

    def submit(self, chains: list[tuple[list[tuple[int, int]], list[tuple[int, int]]]],
               indirect: bool = False) -> list[tuple[int, int]]:
        """Make the chains available, let the device answer, reclaim: returns
        ``(token, used_len)`` per chain in completion order."""
        out = vqcore.ChainBatch(QSIZE)
        for token, (readable, writable) in enumerate(chains):
            out.append(readable=readable, writable=writable, token=token)
        assert self.driver.add(out, indirect=indirect) == len(chains)
        handled = self.ctrl.process()
        assert handled == len(chains)
        back = vqcore.ChainBatch(QSIZE)
        n = self.driver.reclaim(back)
        assert n == len(chains)
        return [(int(back.tokens[i]), int(back.used_len[i])) for i in range(n)]

    def send(self, cls: int, cmd: int, data: bytes = b"") -> int:
        """One well-formed command (header+data in one descriptor, ack in another);
        returns the ack byte after checking the used length is 1."""
        ack = self.ack_slot()
        [(token, used)] = self.submit([([self.put(bytes([cls, cmd]) + data)], [ack])])
        assert used == 1
        return self.mem.read(ack[0], 1)[0]


@pytest.fixture
def env(make_guest, ring_kind):
    return Env(make_guest(QSIZE, indirect_max=8, layout=ring_kind))


@pytest.fixture
def make_env(make_guest, ring_kind):
    def make(**kwargs):
        guest_kwargs = {k: kwargs.pop(k) for k in ("data_size",) if k in kwargs}
        return Env(make_guest(QSIZE, indirect_max=8, layout=ring_kind, **guest_kwargs),
                   **kwargs)
    return make


def table(macs: list[bytes]) -> bytes:
    return struct.pack("<I", len(macs)) + b"".join(macs)


def frame_to(dst: bytes) -> bytes:
    return dst + OWN_MAC[:5] + b"\x99" + b"\x08\x00" + bytes(46)


def test_spec_constants():
    assert (c.VIRTIO_NET_OK, c.VIRTIO_NET_ERR) == (0, 1)
    assert (c.VIRTIO_NET_CTRL_RX, c.VIRTIO_NET_CTRL_MAC, c.VIRTIO_NET_CTRL_VLAN,
            c.VIRTIO_NET_CTRL_ANNOUNCE, c.VIRTIO_NET_CTRL_MQ,
            c.VIRTIO_NET_CTRL_GUEST_OFFLOADS) == (0, 1, 2, 3, 4, 5)
    assert [c.VIRTIO_NET_CTRL_RX_PROMISC, c.VIRTIO_NET_CTRL_RX_ALLMULTI,
            c.VIRTIO_NET_CTRL_RX_ALLUNI, c.VIRTIO_NET_CTRL_RX_NOMULTI,
            c.VIRTIO_NET_CTRL_RX_NOUNI, c.VIRTIO_NET_CTRL_RX_NOBCAST] == list(range(6))
    assert (c.VIRTIO_NET_CTRL_MAC_TABLE_SET, c.VIRTIO_NET_CTRL_MAC_ADDR_SET) == (0, 1)
    assert (c.VIRTIO_NET_CTRL_VLAN_ADD, c.VIRTIO_NET_CTRL_VLAN_DEL) == (0, 1)
    assert c.VIRTIO_NET_CTRL_ANNOUNCE_ACK == 0
    assert c.VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET == 0
    assert c.VIRTIO_NET_CTRL_GUEST_OFFLOADS_SET == 0


def test_nothing_available(env):
    assert env.ctrl.process() == 0


# ---- one test per command -----------------------------------------------------------------

@pytest.mark.parametrize("cmd,attr", [(0, "promisc"), (1, "allmulti"), (2, "alluni"),
                                      (3, "nomulti"), (4, "nouni"), (5, "nobcast")])
def test_rx_mode(env, cmd, attr):
    f = env.target.rx_filter
    assert env.send(c.VIRTIO_NET_CTRL_RX, cmd, b"\x00") == c.VIRTIO_NET_OK
    assert getattr(f, attr) is False
    assert env.send(c.VIRTIO_NET_CTRL_RX, cmd, b"\x01") == c.VIRTIO_NET_OK
    assert getattr(f, attr) is True
    assert env.send(c.VIRTIO_NET_CTRL_RX, cmd, b"\x00") == c.VIRTIO_NET_OK
    assert getattr(f, attr) is False
    assert env.send(c.VIRTIO_NET_CTRL_RX, cmd, b"\x7f") == c.VIRTIO_NET_OK   # non-zero = on
    assert getattr(f, attr) is True
    assert env.ctrl.ok == 4 and not env.ctrl.errors


def test_rx_promisc_off_filters(env):
    f = env.target.rx_filter
    other = bytes.fromhex("525400000002")
    assert f.accepts(frame_to(other))                    # promiscuous after reset
    assert env.send(c.VIRTIO_NET_CTRL_RX, c.VIRTIO_NET_CTRL_RX_PROMISC, b"\x00") == 0
    assert not f.accepts(frame_to(other))
    assert f.accepts(frame_to(OWN_MAC))


def test_mac_table_set(env):
    uni = [bytes.fromhex("5254000000a1"), bytes.fromhex("5254000000a2")]
    multi = [bytes.fromhex("01005e000001"), bytes.fromhex("01005e000002"),
             bytes.fromhex("333300000001")]
    assert env.send(c.VIRTIO_NET_CTRL_RX, c.VIRTIO_NET_CTRL_RX_PROMISC, b"\x00") == 0
    assert env.send(c.VIRTIO_NET_CTRL_MAC, c.VIRTIO_NET_CTRL_MAC_TABLE_SET,
                    table(uni) + table(multi)) == c.VIRTIO_NET_OK
    f = env.target.rx_filter
    assert f.unicast_table == uni
    assert f.multicast_table == multi
    assert f.accepts(frame_to(uni[1]))
    assert f.accepts(frame_to(multi[2]))
    assert not f.accepts(frame_to(bytes.fromhex("01005e000009")))
    # empty tables are allowed
    assert env.send(c.VIRTIO_NET_CTRL_MAC, c.VIRTIO_NET_CTRL_MAC_TABLE_SET,
                    table([]) + table([])) == c.VIRTIO_NET_OK
    assert f.unicast_table == [] and f.multicast_table == []
    assert not f.accepts(frame_to(uni[1]))


def test_mac_table_set_in_separate_descriptors(env):
    """As Linux sends it: header, unicast table, multicast table, ack: four descriptors."""
    uni = [bytes.fromhex("5254000000b1")]
    multi = [bytes.fromhex("01005e0000b1"), bytes.fromhex("01005e0000b2")]
    ack = env.ack_slot()
    readable = [env.put(bytes([c.VIRTIO_NET_CTRL_MAC, c.VIRTIO_NET_CTRL_MAC_TABLE_SET])),
                env.put(table(uni)), env.put(table(multi))]
    [(_, used)] = env.submit([(readable, [ack])])
    assert used == 1 and env.mem.read(ack[0], 1) == b"\x00"
    assert env.target.rx_filter.unicast_table == uni
    assert env.target.rx_filter.multicast_table == multi


def test_mac_table_overflow_accepted(env):
    uni = [bytes([0x52, 0x54, 0, 0, 1, i]) for i in range(65)]
    assert env.send(c.VIRTIO_NET_CTRL_MAC, c.VIRTIO_NET_CTRL_MAC_TABLE_SET,
                    table(uni) + table([])) == c.VIRTIO_NET_OK
    env.send(c.VIRTIO_NET_CTRL_RX, c.VIRTIO_NET_CTRL_RX_PROMISC, b"\x00")
    assert env.target.rx_filter.accepts(frame_to(bytes.fromhex("5254000000ff")))


def test_mac_addr_set(env):
    new = bytes.fromhex("020000c0ffee")
    assert env.send(c.VIRTIO_NET_CTRL_MAC, c.VIRTIO_NET_CTRL_MAC_ADDR_SET, new) == 0
    assert env.target.rx_filter.mac == new
    assert env.target.calls == [("mac_address_set", new)]


def test_vlan_add_del(env):
    f = env.target.rx_filter
    for vid in (0, 100, 4095):
        assert env.send(c.VIRTIO_NET_CTRL_VLAN, c.VIRTIO_NET_CTRL_VLAN_ADD,
                        struct.pack("<H", vid)) == c.VIRTIO_NET_OK
    assert f.vlans() == [0, 100, 4095]
    assert env.send(c.VIRTIO_NET_CTRL_VLAN, c.VIRTIO_NET_CTRL_VLAN_DEL,
                    struct.pack("<H", 100)) == c.VIRTIO_NET_OK
    assert f.vlans() == [0, 4095]
    # deleting an id that is not there is fine
    assert env.send(c.VIRTIO_NET_CTRL_VLAN, c.VIRTIO_NET_CTRL_VLAN_DEL,
                    struct.pack("<H", 7)) == c.VIRTIO_NET_OK


def test_vlan_id_is_little_endian(env):
    assert env.send(c.VIRTIO_NET_CTRL_VLAN, c.VIRTIO_NET_CTRL_VLAN_ADD, b"\x01\x02") == 0
    assert env.target.rx_filter.vlans() == [0x0201]


def test_mq_vq_pairs_set(env):
    for pairs in (4, 1, 3):
        assert env.send(c.VIRTIO_NET_CTRL_MQ, c.VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET,
                        struct.pack("<H", pairs)) == c.VIRTIO_NET_OK
    assert env.target.calls == [("set_queue_pairs", 4), ("set_queue_pairs", 1),
                                ("set_queue_pairs", 3)]


def test_announce_ack(env):
    assert env.send(c.VIRTIO_NET_CTRL_ANNOUNCE, c.VIRTIO_NET_CTRL_ANNOUNCE_ACK) == 0
    assert env.target.calls == [("ack_announce",)]


def test_guest_offloads_set(env):
    for offloads in (int(N.GUEST_CSUM | N.GUEST_TSO4), 0,
                     int(N.GUEST_CSUM | N.GUEST_TSO4 | N.GUEST_TSO6 | N.GUEST_ECN)):
        assert env.send(c.VIRTIO_NET_CTRL_GUEST_OFFLOADS, c.VIRTIO_NET_CTRL_GUEST_OFFLOADS_SET,
                        struct.pack("<Q", offloads)) == c.VIRTIO_NET_OK
    assert env.target.calls == [
        ("set_guest_offloads", int(N.GUEST_CSUM | N.GUEST_TSO4)), ("set_guest_offloads", 0),
        ("set_guest_offloads", int(N.GUEST_CSUM | N.GUEST_TSO4 | N.GUEST_TSO6 | N.GUEST_ECN))]


def test_header_split_across_descriptors(env):
    ack = env.ack_slot()
    readable = [env.put(bytes([c.VIRTIO_NET_CTRL_VLAN])),
                env.put(bytes([c.VIRTIO_NET_CTRL_VLAN_ADD]) + b"\x05"), env.put(b"\x00")]
    [(_, used)] = env.submit([(readable, [ack])])
    assert used == 1 and env.mem.read(ack[0], 1) == b"\x00"
    assert env.target.rx_filter.vlans() == [5]


def test_indirect_chain(env):
    ack = env.ack_slot()
    [(_, used)] = env.submit([([env.put(b"\x00\x00\x00")], [ack])], indirect=True)
    assert used == 1 and env.mem.read(ack[0], 1) == b"\x00"
    assert env.target.rx_filter.promisc is False


def test_ack_goes_to_first_writable_byte(env):
    acks = env.ack_slot(8)
    extra = env.ack_slot(4)
    [(_, used)] = env.submit([([env.put(b"\x00\x00\x00")], [acks, extra])])
    assert used == 1
    assert env.mem.read(acks[0], 8) == b"\x00" + bytes([FILL]) * 7
    assert env.mem.read(extra[0], 4) == bytes([FILL]) * 4


def test_many_commands_one_call_small_batch(make_env):
    env = make_env(batch=vqcore.ChainBatch(4))
    chains, acks = [], []
    for vid in range(30):                     # 2 descriptors each: 62 of 64 with the bad one
        acks.append(env.ack_slot())
        chains.append(([env.put(bytes([2, 0]) + struct.pack("<H", vid))], [acks[-1]]))
    # vid 4096 in the middle answers ERR without disturbing the others
    acks.append(env.ack_slot())
    chains.insert(15, ([env.put(bytes([2, 0]) + struct.pack("<H", 4096))], [acks[-1]]))
    acks.insert(15, acks.pop())
    done = env.submit(chains)
    assert sorted(t for t, _ in done) == list(range(31))
    assert all(used == 1 for _, used in done)
    answers = [env.mem.read(a[0], 1)[0] for a in acks]
    assert answers == [0] * 15 + [1] + [0] * 15
    assert env.target.rx_filter.vlans() == list(range(30))
    assert env.ctrl.ok == 30 and env.ctrl.errors == {CtrlError.BAD_VALUE: 1}


# ---- malformed and refused commands -------------------------------------------------------

def expect_err(env, cls, cmd, data, reason):
    before = (env.target.rx_filter.promisc, env.target.rx_filter.vlans(),
              env.target.rx_filter.mac, env.target.rx_filter.unicast_table)
    assert env.send(cls, cmd, data) == c.VIRTIO_NET_ERR
    assert env.ctrl.last == (cls, cmd, c.VIRTIO_NET_ERR, reason)
    assert env.ctrl.errors == {reason: 1}
    assert env.target.calls == []
    after = (env.target.rx_filter.promisc, env.target.rx_filter.vlans(),
             env.target.rx_filter.mac, env.target.rx_filter.unicast_table)
    assert after == before


@pytest.mark.parametrize("cls", [6, 7, 0x80, 0xFF])
def test_unknown_class(env, cls):
    expect_err(env, cls, 0, b"\x00", CtrlError.UNKNOWN_CLASS)


@pytest.mark.parametrize("cls,cmd", [(0, 6), (0, 0xFF), (1, 2), (2, 2), (3, 1), (4, 1),
                                     (4, 2), (5, 1)])
def test_unknown_command(env, cls, cmd):
    expect_err(env, cls, cmd, b"\x00\x00", CtrlError.UNKNOWN_COMMAND)


@pytest.mark.parametrize("cls,cmd,data", [
    (0, 0, b""), (1, 1, b"\x02" * 5), (2, 0, b"\x05"), (4, 0, b"\x01"), (5, 0, bytes(7)),
    (1, 0, b"\x00\x00\x00"), (1, 0, table([])), (1, 0, b""),
], ids=["rx-empty", "addr5", "vlan1", "mq1", "offloads7", "table3", "table-one-count",
        "table-empty"])
def test_data_too_short(env, cls, cmd, data):
    expect_err(env, cls, cmd, data, CtrlError.BAD_LENGTH)


@pytest.mark.parametrize("cls,cmd,data", [
    (0, 0, b"\x00\x00"), (1, 1, b"\x02" * 7), (2, 0, b"\x05\x00\x00"), (4, 0, b"\x01\x00\x00"),
    (5, 0, bytes(9)), (3, 0, b"\x00"), (1, 0, table([]) + table([]) + b"\x00"),
], ids=["rx2", "addr7", "vlan3", "mq3", "offloads9", "announce1", "table+1"])
def test_trailing_garbage(env, cls, cmd, data):
    expect_err(env, cls, cmd, data, CtrlError.BAD_LENGTH)


@pytest.mark.parametrize("data", [
    struct.pack("<I", 0xFFFFFFFF) + bytes(12) + table([]),
    struct.pack("<I", 2) + bytes(6) + table([]),
    table([b"\x52\x54\x00\x00\x00\x01"]) + struct.pack("<I", 1),
    table([]) + struct.pack("<I", 0x2AAAAAAB) + bytes(6),
], ids=["huge-count", "count-too-big", "multi-count-short", "multi-count-wraps"])
def test_mac_table_counts_lie(env, data):
    expect_err(env, 1, 0, data, CtrlError.BAD_LENGTH)


@pytest.mark.parametrize("cls,cmd,data", [
    (2, 0, struct.pack("<H", 4096)), (2, 1, struct.pack("<H", 0xFFFF)),
    (4, 0, struct.pack("<H", 0)), (4, 0, struct.pack("<H", 5)),
    (4, 0, struct.pack("<H", 0x8001)),
    (5, 0, struct.pack("<Q", int(N.GUEST_UFO))),          # offered by nobody here
    (5, 0, struct.pack("<Q", int(N.MQ))),                 # negotiated, but no offload
    (5, 0, struct.pack("<Q", 1 << 63)),
], ids=["vlan4096", "vlan-ffff", "pairs0", "pairs-max+1", "pairs-8001", "offload-ufo",
        "offload-mq", "offload-63"])
def test_value_out_of_range(env, cls, cmd, data):
    expect_err(env, cls, cmd, data, CtrlError.BAD_VALUE)


@pytest.mark.parametrize("cls,cmd,data,missing", [
    (0, 0, b"\x00", N.CTRL_RX), (0, 1, b"\x01", N.CTRL_RX),
    (0, 2, b"\x01", N.CTRL_RX_EXTRA), (0, 3, b"\x01", N.CTRL_RX_EXTRA),
    (0, 4, b"\x01", N.CTRL_RX_EXTRA), (0, 5, b"\x01", N.CTRL_RX_EXTRA),
    (1, 0, table([]) + table([]), N.CTRL_RX), (1, 1, b"\x02" * 6, N.CTRL_MAC_ADDR),
    (2, 0, b"\x05\x00", N.CTRL_VLAN), (3, 0, b"", N.GUEST_ANNOUNCE),
    (4, 0, b"\x01\x00", N.MQ), (5, 0, bytes(8), N.CTRL_GUEST_OFFLOADS),
])
def test_feature_not_negotiated(make_env, cls, cmd, data, missing):
    features = FULL & ~int(missing)
    if missing == N.CTRL_RX:
        features &= ~int(N.CTRL_RX_EXTRA)
    env = make_env(features=features)
    expect_err(env, cls, cmd, data, CtrlError.NOT_NEGOTIATED)


def test_target_refuses(env):
    env.target.fail_with = OSError(22, "TUNSETQUEUE failed")
    assert env.send(4, 0, struct.pack("<H", 2)) == c.VIRTIO_NET_ERR
    assert env.ctrl.errors == {CtrlError.REFUSED: 1}
    env.target.fail_with = None
    assert env.send(4, 0, struct.pack("<H", 2)) == c.VIRTIO_NET_OK


def test_rx_filter_rejects(env):
    class Broken:
        mac = OWN_MAC

        def set_mac_table(self, unicast, multicast):
            raise RuntimeError("filter is gone")

    env.target.rx_filter = Broken()
    assert env.send(1, 0, table([]) + table([])) == c.VIRTIO_NET_ERR
    assert env.ctrl.errors == {CtrlError.REFUSED: 1}


def test_no_readable_bytes(env):
    ack = env.ack_slot(16)
    [(_, used)] = env.submit([([], [ack])])
    assert used == 1
    assert env.mem.read(ack[0], 2) == bytes([c.VIRTIO_NET_ERR, FILL])
    assert env.ctrl.errors == {CtrlError.NO_HEADER: 1}


def test_one_byte_header(env):
    ack = env.ack_slot()
    [(_, used)] = env.submit([([env.put(b"\x00")], [ack])])
    assert used == 1 and env.mem.read(ack[0], 1)[0] == c.VIRTIO_NET_ERR
    assert env.ctrl.errors == {CtrlError.NO_HEADER: 1}


def test_header_in_writable_segment(env):
    """The command sits in a device-writable descriptor: the device does not read it as
    a command; the ERR ack goes to the first writable byte."""
    command = env.put(b"\x00\x00\x00")              # PROMISC off, but writable
    ack = env.ack_slot()
    [(_, used)] = env.submit([([], [command, ack])])
    assert used == 1
    assert env.mem.read(command[0], 3) == b"\x01\x00\x00"
    assert env.mem.read(ack[0], 1)[0] == FILL
    assert env.target.rx_filter.promisc is True
    assert env.ctrl.errors == {CtrlError.NO_HEADER: 1}


def test_header_split_readable_then_writable(env):
    """Class readable, command byte in a writable descriptor: no complete header."""
    rest = env.put(b"\x00\x00")
    [(_, used)] = env.submit([([env.put(b"\x00")], [rest])])
    assert used == 1 and env.mem.read(rest[0], 2) == b"\x01\x00"
    assert env.target.rx_filter.promisc is True
    assert env.ctrl.errors == {CtrlError.NO_HEADER: 1}


def test_no_writable_byte(env, caplog):
    with caplog.at_level(logging.WARNING, logger="pyvirtio.net.ctrl"):
        [(_, used)] = env.submit([([env.put(b"\x00\x00\x00")], [])])
    assert used == 0
    assert env.target.rx_filter.promisc is True       # not applied
    assert env.ctrl.errors == {CtrlError.NO_ACK_BYTE: 1}
    assert env.ctrl.last == (0, 0, None, CtrlError.NO_ACK_BYTE)
    assert "no device-writable byte" in caplog.text
    # the queue goes on
    assert env.send(0, 0, b"\x00") == c.VIRTIO_NET_OK


def test_empty_no_writable_chain(env):
    [(_, used)] = env.submit([([env.put(b"\x07")], [])])
    assert used == 0
    assert env.ctrl.errors == {CtrlError.NO_ACK_BYTE: 1}


def test_command_too_long(make_env):
    env = make_env(data_size=c.MAX_COMMAND_LEN + 4096)
    env.mem.write(env.guest.data_addr, b"\x01\x00")
    ack = (env.guest.data_addr + c.MAX_COMMAND_LEN + 16, 1)
    env.mem.write(ack[0], bytes([FILL]))
    [(_, used)] = env.submit([([(env.guest.data_addr, c.MAX_COMMAND_LEN + 1)], [ack])])
    assert used == 1 and env.mem.read(ack[0], 1)[0] == c.VIRTIO_NET_ERR
    assert env.ctrl.errors == {CtrlError.TOO_LONG: 1}


def test_malformed_logged_once_per_kind(env, caplog):
    with caplog.at_level(logging.WARNING, logger="pyvirtio.net.ctrl"):
        for _ in range(3):
            assert env.send(9, 0) == c.VIRTIO_NET_ERR
    assert caplog.text.count("unknown class") == 1
    assert env.ctrl.errors == {CtrlError.UNKNOWN_CLASS: 3}


# ---- a guest that breaks the ring -----------------------------------------------------------

def test_ring_violation_answers_earlier_commands(make_guest):
    guest = make_guest(16)
    env = Env(guest, with_driver=False)
    mem, ring = guest.memory, guest.ring
    data = guest.data_addr
    mem.write(data, b"\x00\x00\x00")          # PROMISC off
    mem.write(data + 16, bytes([FILL]))
    W, NEXT = rw.VIRTQ_DESC_F_WRITE, rw.VIRTQ_DESC_F_NEXT
    rw.write_descs(mem, ring.desc, [
        (data, 3, NEXT, 1), (data + 16, 1, W, 0),              # chain 0: fine
        (data + 32, 1, W | NEXT, 3), (data + 48, 3, 0, 0),     # chain 2: readable after writable
    ])
    rw.offer(mem, ring.avail, 16, [0, 2])
    assert env.ctrl.process() == 1                             # no exception
    assert rw.read_used_idx(mem, ring.used) == 1
    assert rw.read_used_elem(mem, ring.used, 16, 0) == (0, 1)
    assert mem.read(data + 16, 1)[0] == c.VIRTIO_NET_OK
    assert env.target.rx_filter.promisc is False
    assert len(env.reported) == 1 and isinstance(env.reported[0], WritableBeforeReadable)
    assert env.device.broken
    assert env.ctrl.process() == 0                             # stays quiet


def test_invalid_head_reported(make_guest):
    guest = make_guest(16)
    env = Env(guest, with_driver=False)
    rw.offer(guest.memory, guest.ring.avail, 16, [40])
    assert env.ctrl.process() == 0
    assert len(env.reported) == 1 and isinstance(env.reported[0], IndexError)


def test_chain_larger_than_batch_reported(make_env):
    env = make_env(batch=vqcore.ChainBatch(4, max_segments=2))
    out = vqcore.ChainBatch(4)
    out.append(readable=[env.put(b"\x00"), env.put(b"\x00\x00")], writable=[env.ack_slot()])
    assert env.driver.add(out) == 1
    assert env.ctrl.process() == 0
    assert len(env.reported) == 1 and isinstance(env.reported[0], BatchTooSmall)
