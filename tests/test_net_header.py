"""virtio_net_hdr (pyvirtio.net.header): the 12-byte VERSION_1 layout, pack/unpack to and
from buffers, and the checks against the negotiated features."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from vqcore.errors import VirtioError

from pyvirtio.features import NetFeature
from pyvirtio.net import header as h
from pyvirtio.net.header import HDR_LEN, NetHeaderError, VirtioNetHdr

N = NetFeature

#: a TSO header and its bytes, written out from the spec's layout
TSO = VirtioNetHdr(flags=h.VIRTIO_NET_HDR_F_NEEDS_CSUM,
                   gso_type=h.VIRTIO_NET_HDR_GSO_TCPV4 | h.VIRTIO_NET_HDR_GSO_ECN,
                   hdr_len=66, gso_size=1448, csum_start=34, csum_offset=16, num_buffers=3)
TSO_BYTES = bytes([0x01, 0x81, 0x42, 0x00, 0xA8, 0x05, 0x22, 0x00, 0x10, 0x00, 0x03, 0x00])


def test_spec_constants():
    assert HDR_LEN == 12
    assert (h.VIRTIO_NET_HDR_F_NEEDS_CSUM, h.VIRTIO_NET_HDR_F_DATA_VALID,
            h.VIRTIO_NET_HDR_F_RSC_INFO) == (1, 2, 4)
    assert (h.VIRTIO_NET_HDR_GSO_NONE, h.VIRTIO_NET_HDR_GSO_TCPV4, h.VIRTIO_NET_HDR_GSO_UDP,
            h.VIRTIO_NET_HDR_GSO_TCPV6, h.VIRTIO_NET_HDR_GSO_UDP_L4,
            h.VIRTIO_NET_HDR_GSO_ECN) == (0, 1, 3, 4, 5, 0x80)


def test_pack_layout():
    assert TSO.pack() == TSO_BYTES
    assert VirtioNetHdr().pack() == bytes(12)
    assert VirtioNetHdr(num_buffers=0x0102).pack()[10:] == b"\x02\x01"


def test_unpack():
    assert VirtioNetHdr.unpack(TSO_BYTES) == TSO
    assert VirtioNetHdr.unpack(bytearray(TSO_BYTES)) == TSO
    assert VirtioNetHdr.unpack(memoryview(TSO_BYTES)) == TSO
    for bad in (TSO_BYTES[:11], TSO_BYTES + b"\0", b""):
        with pytest.raises(NetHeaderError, match="12 bytes"):
            VirtioNetHdr.unpack(bad)


def test_pack_into_numpy_at_offset():
    buf = np.full(40, 0xEE, np.uint8)
    TSO.pack_into(buf, 20)
    assert buf[20:32].tobytes() == TSO_BYTES
    assert (buf[:20] == 0xEE).all() and (buf[32:] == 0xEE).all()
    assert VirtioNetHdr.unpack_from(buf, 20) == TSO


def test_pack_into_memoryview_and_unpack_from_packet():
    packet = bytearray(12 + 60)
    TSO.pack_into(memoryview(packet))
    assert bytes(packet[:12]) == TSO_BYTES
    assert VirtioNetHdr.unpack_from(bytes(packet)) == TSO
    assert VirtioNetHdr.unpack_from(memoryview(packet)[0:12]) == TSO


@pytest.mark.parametrize("size,offset", [(11, 0), (12, 1), (30, 19), (30, -1)])
def test_no_room(size, offset):
    buf = bytearray(size)
    with pytest.raises(NetHeaderError):
        TSO.pack_into(buf, offset)
    assert buf == bytearray(size)
    with pytest.raises(NetHeaderError):
        VirtioNetHdr.unpack_from(buf, offset)


def test_pack_into_read_only_buffer_fails():
    with pytest.raises(TypeError):
        TSO.pack_into(bytes(12))


@pytest.mark.parametrize("field,value", [("flags", 256), ("gso_type", -1),
                                         ("hdr_len", 1 << 16), ("num_buffers", -1),
                                         ("csum_offset", 1.0)])
def test_field_ranges(field, value):
    with pytest.raises(NetHeaderError):
        VirtioNetHdr(**{field: value})


def test_error_class():
    assert issubclass(NetHeaderError, VirtioError) and issubclass(NetHeaderError, ValueError)


@given(st.tuples(st.integers(0, 255), st.integers(0, 255), *[st.integers(0, 0xFFFF)] * 5))
def test_roundtrip(values):
    hdr = VirtioNetHdr(*values)
    raw = hdr.pack()
    assert len(raw) == HDR_LEN
    assert VirtioNetHdr.unpack(raw) == hdr
    assert raw[0] == values[0] and raw[1] == values[1]
    assert int.from_bytes(raw[10:12], "little") == values[6]


def test_properties():
    assert TSO.gso == h.VIRTIO_NET_HDR_GSO_TCPV4 and TSO.ecn and TSO.needs_csum
    plain = VirtioNetHdr()
    assert plain.gso == 0 and not plain.ecn and not plain.needs_csum


# ---- checks ------------------------------------------------------------------------------

def csum(gso_type=0, **kw) -> VirtioNetHdr:
    kw.setdefault("gso_size", 1400 if gso_type else 0)
    return VirtioNetHdr(flags=h.VIRTIO_NET_HDR_F_NEEDS_CSUM, gso_type=gso_type,
                        csum_start=34, csum_offset=16, **kw)


@pytest.mark.parametrize("hdr,words", [
    (VirtioNetHdr(flags=8), "unknown flags"),
    (VirtioNetHdr(gso_type=2), "unknown gso_type"),
    (VirtioNetHdr(gso_type=6), "unknown gso_type"),
    (VirtioNetHdr(gso_type=h.VIRTIO_NET_HDR_GSO_ECN), "without a GSO type"),
    (VirtioNetHdr(gso_type=h.VIRTIO_NET_HDR_GSO_TCPV4, gso_size=1400),
     "without VIRTIO_NET_HDR_F_NEEDS_CSUM"),
    (csum(h.VIRTIO_NET_HDR_GSO_UDP_L4, gso_size=0), "gso_size 0"),
])
def test_check_format(hdr, words):
    with pytest.raises(NetHeaderError, match=words):
        hdr.check_format()


def test_checksum_field_inside_packet():
    hdr = csum()
    hdr.check_format(packet_len=52)          # 34 + 16 + 2
    with pytest.raises(NetHeaderError, match="outside"):
        hdr.check_format(packet_len=51)
    # RSC_INFO repurposes csum_start/csum_offset as counts: no range check
    rsc = VirtioNetHdr(flags=h.VIRTIO_NET_HDR_F_NEEDS_CSUM | h.VIRTIO_NET_HDR_F_RSC_INFO,
                       csum_start=900, csum_offset=2)
    rsc.check_format(packet_len=60)


TX_ALL = int(N.CSUM | N.HOST_TSO4 | N.HOST_TSO6 | N.HOST_UFO | N.HOST_USO | N.HOST_ECN)


@pytest.mark.parametrize("gso,feature", [
    (h.VIRTIO_NET_HDR_GSO_TCPV4, N.HOST_TSO4), (h.VIRTIO_NET_HDR_GSO_TCPV6, N.HOST_TSO6),
    (h.VIRTIO_NET_HDR_GSO_UDP, N.HOST_UFO), (h.VIRTIO_NET_HDR_GSO_UDP_L4, N.HOST_USO),
])
def test_check_tx_gso_needs_its_feature(gso, feature):
    hdr = csum(gso)
    hdr.check_tx(TX_ALL)
    with pytest.raises(NetHeaderError, match=f"VIRTIO_NET_F_{feature.name}"):
        hdr.check_tx(TX_ALL & ~int(feature))


def test_check_tx_rules():
    VirtioNetHdr().check_tx(0)
    with pytest.raises(NetHeaderError, match="without VIRTIO_NET_F_CSUM"):
        csum().check_tx(0)
    csum().check_tx(int(N.CSUM), packet_len=100)
    ecn = csum(h.VIRTIO_NET_HDR_GSO_TCPV4 | h.VIRTIO_NET_HDR_GSO_ECN)
    ecn.check_tx(TX_ALL)
    with pytest.raises(NetHeaderError, match="VIRTIO_NET_F_HOST_ECN"):
        ecn.check_tx(TX_ALL & ~int(N.HOST_ECN))
    for flag in (h.VIRTIO_NET_HDR_F_DATA_VALID, h.VIRTIO_NET_HDR_F_RSC_INFO):
        with pytest.raises(NetHeaderError, match="must not set"):
            VirtioNetHdr(flags=flag).check_tx(TX_ALL)


RX_ALL = int(N.GUEST_CSUM | N.GUEST_TSO4 | N.GUEST_TSO6 | N.GUEST_UFO | N.GUEST_USO4
             | N.GUEST_USO6 | N.GUEST_ECN | N.MRG_RXBUF | N.RSC_EXT)


@pytest.mark.parametrize("gso,features", [
    (h.VIRTIO_NET_HDR_GSO_TCPV4, (N.GUEST_TSO4,)), (h.VIRTIO_NET_HDR_GSO_TCPV6, (N.GUEST_TSO6,)),
    (h.VIRTIO_NET_HDR_GSO_UDP, (N.GUEST_UFO,)),
    (h.VIRTIO_NET_HDR_GSO_UDP_L4, (N.GUEST_USO4, N.GUEST_USO6)),
])
def test_check_rx_gso_needs_its_feature(gso, features):
    hdr = csum(gso, num_buffers=1)
    hdr.check_rx(RX_ALL)
    for f in features:                       # any one of them is enough
        hdr.check_rx(RX_ALL & ~sum(int(g) for g in features if g != f))
    without = RX_ALL & ~sum(int(f) for f in features)
    with pytest.raises(NetHeaderError, match=f"VIRTIO_NET_F_{features[0].name}"):
        hdr.check_rx(without)


def test_check_rx_rules():
    VirtioNetHdr(num_buffers=1).check_rx(0)
    for flags in (h.VIRTIO_NET_HDR_F_NEEDS_CSUM, h.VIRTIO_NET_HDR_F_DATA_VALID):
        hdr = VirtioNetHdr(flags=flags, num_buffers=1)
        hdr.check_rx(int(N.GUEST_CSUM))
        with pytest.raises(NetHeaderError, match="VIRTIO_NET_F_GUEST_CSUM"):
            hdr.check_rx(0)
    rsc = VirtioNetHdr(flags=h.VIRTIO_NET_HDR_F_RSC_INFO, num_buffers=1)
    rsc.check_rx(int(N.RSC_EXT))
    with pytest.raises(NetHeaderError, match="VIRTIO_NET_F_RSC_EXT"):
        rsc.check_rx(0)
    ecn = csum(h.VIRTIO_NET_HDR_GSO_TCPV6 | h.VIRTIO_NET_HDR_GSO_ECN, num_buffers=1)
    ecn.check_rx(RX_ALL)
    with pytest.raises(NetHeaderError, match="VIRTIO_NET_F_GUEST_ECN"):
        ecn.check_rx(RX_ALL & ~int(N.GUEST_ECN))


def test_check_rx_num_buffers():
    VirtioNetHdr(num_buffers=5).check_rx(int(N.MRG_RXBUF))
    with pytest.raises(NetHeaderError, match="at least 1"):
        VirtioNetHdr(num_buffers=0).check_rx(int(N.MRG_RXBUF))
    for n in (0, 2):
        with pytest.raises(NetHeaderError, match="must be 1 without"):
            VirtioNetHdr(num_buffers=n).check_rx(0)
