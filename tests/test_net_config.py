"""virtio_net_config (pyvirtio.net.config): byte layout by offset, sizes by feature,
partial reads, bounds, the driver's write rules and the device's setters."""

from __future__ import annotations

import pytest

from pyvirtio.device import ConfigAccessError
from pyvirtio.features import NetFeature, Transport
from pyvirtio.net.config import (CONFIG_SIZE, VIRTIO_NET_DUPLEX_FULL,
                                 VIRTIO_NET_DUPLEX_HALF, VIRTIO_NET_DUPLEX_UNKNOWN,
                                 VIRTIO_NET_S_ANNOUNCE, VIRTIO_NET_S_LINK_UP,
                                 VIRTIO_NET_SPEED_UNKNOWN, NetConfig, NetConfigError)

N = NetFeature
ALL = int(N.MAC | N.STATUS | N.MQ | N.MTU | N.SPEED_DUPLEX)
MAC = bytes.fromhex("525400123456")
V1 = int(Transport.VERSION_1)


def full_config(**kwargs) -> NetConfig:
    values = dict(mac=MAC, status=VIRTIO_NET_S_LINK_UP | VIRTIO_NET_S_ANNOUNCE,
                  max_virtqueue_pairs=0x0104, mtu=9000, speed=25000,
                  duplex=VIRTIO_NET_DUPLEX_FULL)
    values.update(kwargs)
    return NetConfig(ALL, **values)


#: the image of full_config(), written out byte by byte from the spec's layout
FULL_IMAGE = bytes([
    0x52, 0x54, 0x00, 0x12, 0x34, 0x56,    # 0  mac
    0x03, 0x00,                            # 6  status: LINK_UP | ANNOUNCE
    0x04, 0x01,                            # 8  max_virtqueue_pairs 0x0104
    0x28, 0x23,                            # 10 mtu 9000 = 0x2328
    0xA8, 0x61, 0x00, 0x00,                # 12 speed 25000 = 0x61a8
    0x01,                                  # 16 duplex full
])


def test_spec_constants():
    assert (VIRTIO_NET_S_LINK_UP, VIRTIO_NET_S_ANNOUNCE) == (1, 2)
    assert (VIRTIO_NET_DUPLEX_HALF, VIRTIO_NET_DUPLEX_FULL, VIRTIO_NET_DUPLEX_UNKNOWN) == \
        (0, 1, 0xFF)
    assert VIRTIO_NET_SPEED_UNKNOWN == 0xFFFFFFFF
    assert CONFIG_SIZE == 17


def test_full_layout():
    cfg = full_config()
    assert cfg.size == 17 == len(cfg)
    assert cfg.to_bytes() == FULL_IMAGE
    assert cfg.read(0, 17) == FULL_IMAGE


@pytest.mark.parametrize("offset,length,expected", [
    (0, 6, MAC), (6, 2, b"\x03\x00"), (8, 2, b"\x04\x01"), (10, 2, b"\x28\x23"),
    (12, 4, b"\xa8\x61\x00\x00"), (16, 1, b"\x01"),
])
def test_each_field_at_its_offset(offset, length, expected):
    assert full_config().read(offset, length) == expected


def test_every_partial_read():
    cfg = full_config()
    for offset in range(18):
        for length in range(18 - offset):
            assert cfg.read(offset, length) == FULL_IMAGE[offset:offset + length]


@pytest.mark.parametrize("features,size", [
    (0, 6), (int(N.MAC), 6), (int(N.STATUS), 8), (int(N.MQ), 10), (int(N.MTU), 12),
    (int(N.SPEED_DUPLEX), 17), (int(N.MAC | N.STATUS | N.MQ), 10), (ALL, 17),
])
def test_size_follows_offered_features(features, size):
    assert NetConfig(features).size == size


def test_missing_fields_read_as_zero():
    cfg = NetConfig(int(N.MTU), mac=MAC, status=VIRTIO_NET_S_LINK_UP, max_virtqueue_pairs=4,
                    mtu=1500)
    assert cfg.has_field("mtu") and not cfg.has_field("status")
    assert not cfg.has_field("max_virtqueue_pairs") and cfg.has_field("mac")
    assert cfg.read(0, 12) == MAC + bytes(4) + b"\xdc\x05"


def test_speed_duplex_unknown_by_default():
    cfg = NetConfig(int(N.SPEED_DUPLEX))
    assert cfg.read(12, 5) == b"\xff\xff\xff\xff\xff"


def test_mq_field_exists_with_rss_offer_is_refused():
    with pytest.raises(NetConfigError, match="RSS"):
        NetConfig(int(N.RSS | N.CTRL_VQ))
    with pytest.raises(NetConfigError):
        NetConfig(int(N.HASH_REPORT))


@pytest.mark.parametrize("offset,length", [(17, 1), (16, 2), (-1, 1), (0, 18), (100, 0),
                                           (3, -1)])
def test_read_out_of_bounds(offset, length):
    with pytest.raises(ConfigAccessError):
        full_config().read(offset, length)


def test_bounds_follow_size():
    cfg = NetConfig(int(N.STATUS))
    assert cfg.read(6, 2) == b"\x01\x00"
    with pytest.raises(ConfigAccessError):
        cfg.read(8, 2)
    with pytest.raises(ConfigAccessError):
        cfg.write(7, b"\0\0", features=0)
    assert cfg.read(8, 0) == b""


# ---- driver writes ----------------------------------------------------------------------

def test_modern_driver_cannot_write():
    cfg = full_config()
    for offset in range(17):
        assert cfg.write(offset, b"\xee", features=V1 | int(N.MAC)) is False
    assert cfg.to_bytes() == FULL_IMAGE


def test_legacy_driver_writes_mac_byte_by_byte():
    cfg = full_config()
    new = bytes.fromhex("02aabbccddee")
    for i, byte in enumerate(new):
        assert cfg.write(i, bytes([byte]), features=int(N.MAC)) is True
    assert cfg.mac == new
    assert cfg.read(0, 6) == new
    assert cfg.read(6, 11) == FULL_IMAGE[6:]
    assert cfg.write(0, new, features=int(N.MAC)) is False    # same value: no change


def test_legacy_write_past_mac_applies_the_mac_part_only():
    cfg = full_config()
    assert cfg.write(4, b"\xaa\xbb\xcc\xdd", features=0) is True
    assert cfg.read(0, 8) == MAC[:4] + b"\xaa\xbb" + b"\x03\x00"


def test_legacy_driver_cannot_write_other_fields():
    cfg = full_config()
    assert cfg.write(6, b"\x00\x00", features=0) is False
    assert cfg.write(10, b"\x00\x01", features=0) is False
    assert cfg.to_bytes() == FULL_IMAGE


def test_legacy_driver_with_ctrl_mac_addr_cannot_write_mac():
    cfg = full_config()
    assert cfg.write(0, b"\x02" * 6, features=int(N.CTRL_MAC_ADDR | N.CTRL_VQ)) is False
    assert cfg.mac == MAC


# ---- the device's side ------------------------------------------------------------------

def test_setters_change_the_image_and_notify():
    cfg = full_config()
    changes = []
    cfg.on_change = lambda: changes.append(cfg.to_bytes())
    cfg.link_up = False
    assert cfg.read(6, 2) == b"\x02\x00" and not cfg.link_up
    cfg.link_up = False                    # unchanged: no notification
    assert len(changes) == 1
    cfg.ack_announce()
    assert cfg.status == 0 and not cfg.announce
    cfg.announce = True
    cfg.link_up = True
    assert cfg.status == VIRTIO_NET_S_LINK_UP | VIRTIO_NET_S_ANNOUNCE
    cfg.max_virtqueue_pairs = 8
    cfg.mtu = 1500
    cfg.speed = VIRTIO_NET_SPEED_UNKNOWN
    cfg.duplex = VIRTIO_NET_DUPLEX_HALF
    cfg.mac = b"\x02" * 6
    assert cfg.to_bytes() == (b"\x02" * 6 + b"\x03\x00" + b"\x08\x00" + b"\xdc\x05"
                              + b"\xff\xff\xff\xff" + b"\x00")
    assert len(changes) == 9
    assert changes[-1] == cfg.to_bytes()


@pytest.mark.parametrize("field,value", [
    ("mac", b"\x00" * 5), ("mac", b"\x00" * 7), ("status", 4), ("status", -1),
    ("max_virtqueue_pairs", 0), ("max_virtqueue_pairs", 0x8001), ("mtu", 67),
    ("mtu", 65536), ("speed", 0x80000000), ("speed", -1), ("duplex", 2),
    ("max_virtqueue_pairs", True),
])
def test_invalid_values(field, value):
    cfg = full_config()
    with pytest.raises(NetConfigError):
        setattr(cfg, field, value)
    assert cfg.to_bytes() == FULL_IMAGE
    with pytest.raises(ValueError):
        full_config(**{field: value})


def test_limits_accepted():
    cfg = full_config(max_virtqueue_pairs=0x8000, mtu=68, speed=0x7FFFFFFF)
    assert cfg.read(8, 2) == b"\x00\x80"
    cfg.mtu = 65535
    assert cfg.read(10, 2) == b"\xff\xff"
    assert cfg.read(12, 4) == b"\xff\xff\xff\x7f"
