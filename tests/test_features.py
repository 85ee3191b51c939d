"""Feature bits and negotiation (pyvirtio.features): spec values, every dependency rule
of VIRTIO 1.2 5.1.3.1, errors naming the missing bit, intersection and strict mode."""

from __future__ import annotations

import pytest

from vqcore.errors import VirtioError

from pyvirtio.features import (NET_DEPENDENCIES, FeatureDependencyError, FeatureError,
                               NetFeature, Transport, UnofferedFeatureError, bits,
                               check_dependencies, describe, negotiate, spec_name)

N = NetFeature

#: bit numbers as printed in the spec (5.1.3 and 6), written out independently
SPEC_NET_BITS = {
    "CSUM": 0, "GUEST_CSUM": 1, "CTRL_GUEST_OFFLOADS": 2, "MTU": 3, "MAC": 5, "GSO": 6,
    "GUEST_TSO4": 7, "GUEST_TSO6": 8, "GUEST_ECN": 9, "GUEST_UFO": 10, "HOST_TSO4": 11,
    "HOST_TSO6": 12, "HOST_ECN": 13, "HOST_UFO": 14, "MRG_RXBUF": 15, "STATUS": 16,
    "CTRL_VQ": 17, "CTRL_RX": 18, "CTRL_VLAN": 19, "CTRL_RX_EXTRA": 20,
    "GUEST_ANNOUNCE": 21, "MQ": 22, "CTRL_MAC_ADDR": 23, "VQ_NOTF_COAL": 52,
    "NOTF_COAL": 53, "GUEST_USO4": 54, "GUEST_USO6": 55, "HOST_USO": 56,
    "HASH_REPORT": 57, "GUEST_HDRLEN": 59, "RSS": 60, "RSC_EXT": 61, "STANDBY": 62,
    "SPEED_DUPLEX": 63,
}
SPEC_TRANSPORT_BITS = {
    "NOTIFY_ON_EMPTY": 24, "ANY_LAYOUT": 27, "INDIRECT_DESC": 28, "EVENT_IDX": 29,
    "VERSION_1": 32, "ACCESS_PLATFORM": 33, "RING_PACKED": 34, "IN_ORDER": 35,
    "ORDER_PLATFORM": 36, "SR_IOV": 37, "NOTIFICATION_DATA": 38,
}

#: the dependencies of 5.1.3.1 as the spec states them: feature -> any one of
SPEC_RULES = {
    "GUEST_TSO4": ("GUEST_CSUM",), "GUEST_TSO6": ("GUEST_CSUM",),
    "GUEST_ECN": ("GUEST_TSO4", "GUEST_TSO6"), "GUEST_UFO": ("GUEST_CSUM",),
    "GUEST_USO4": ("GUEST_CSUM",), "GUEST_USO6": ("GUEST_CSUM",),
    "HOST_TSO4": ("CSUM",), "HOST_TSO6": ("CSUM",), "HOST_ECN": ("HOST_TSO4", "HOST_TSO6"),
    "HOST_UFO": ("CSUM",), "HOST_USO": ("CSUM",),
    "CTRL_RX": ("CTRL_VQ",), "CTRL_VLAN": ("CTRL_VQ",), "GUEST_ANNOUNCE": ("CTRL_VQ",),
    "MQ": ("CTRL_VQ",), "CTRL_MAC_ADDR": ("CTRL_VQ",), "CTRL_RX_EXTRA": ("CTRL_RX",),
    "RSS": ("CTRL_VQ",), "RSC_EXT": ("HOST_TSO4", "HOST_TSO6"),
    "NOTF_COAL": ("CTRL_VQ",), "VQ_NOTF_COAL": ("CTRL_VQ",),
}


def satisfied(feature: int, choice: int = 0) -> int:
    """``feature`` plus what it needs (alternative ``choice`` at the top, the first
    alternative further down), recursively."""
    out = int(feature)
    needs = NET_DEPENDENCIES.get(feature)
    if needs:
        out |= satisfied(needs[choice])
    return out


# ---- bit values and names ----------------------------------------------------------------

@pytest.mark.parametrize("name,bit", sorted(SPEC_NET_BITS.items()))
def test_net_bit_values(name, bit):
    assert int(NetFeature[name]) == 1 << bit


@pytest.mark.parametrize("name,bit", sorted(SPEC_TRANSPORT_BITS.items()))
def test_transport_bit_values(name, bit):
    assert int(Transport[name]) == 1 << bit


def test_spec_names():
    assert spec_name(N.MQ) == "VIRTIO_NET_F_MQ"
    assert spec_name(Transport.VERSION_1) == "VIRTIO_F_VERSION_1"
    assert spec_name(Transport.EVENT_IDX) == "VIRTIO_RING_F_EVENT_IDX"
    assert spec_name(Transport.INDIRECT_DESC) == "VIRTIO_RING_F_INDIRECT_DESC"
    assert spec_name(Transport.PROTOCOL_FEATURES) == "VHOST_USER_F_PROTOCOL_FEATURES"


def test_bits_and_describe():
    value = int(N.CSUM | N.MQ | Transport.VERSION_1)
    assert bits(value) == [N.CSUM, N.MQ, Transport.VERSION_1]
    assert describe(value) == "VIRTIO_NET_F_CSUM, VIRTIO_NET_F_MQ, VIRTIO_F_VERSION_1"
    assert describe(0) == "none"
    assert describe(1 << 4) == "unknown bits 0x10"


# ---- the dependency table ---------------------------------------------------------------

@pytest.mark.parametrize("feature,needs", sorted(SPEC_RULES.items()))
def test_rule_table_has_spec_rule(feature, needs):
    assert NET_DEPENDENCIES[N[feature]] == tuple(N[n] for n in needs)


@pytest.mark.parametrize("feature", list(NET_DEPENDENCIES), ids=lambda f: f.name)
def test_rule_violated_names_missing_bit(feature):
    needs = NET_DEPENDENCIES[feature]
    with pytest.raises(FeatureDependencyError) as info:
        check_dependencies(int(feature))
    err = info.value
    assert err.feature == feature
    assert err.needs == needs
    message = str(err)
    assert message.startswith(f"{spec_name(feature)} requires ")
    for need in needs:
        assert spec_name(need) in message
    if len(needs) > 1:
        assert " or " in message


@pytest.mark.parametrize("feature", list(NET_DEPENDENCIES), ids=lambda f: f.name)
def test_rule_satisfied_by_each_alternative(feature):
    for choice in range(len(NET_DEPENDENCIES[feature])):
        check_dependencies(satisfied(feature, choice))   # no error


@pytest.mark.parametrize("feature", list(NET_DEPENDENCIES), ids=lambda f: f.name)
def test_rule_in_negotiate(feature):
    offered = satisfied(feature) | int(Transport.VERSION_1)
    assert negotiate(offered, offered) == offered
    with pytest.raises(FeatureDependencyError) as info:
        negotiate(offered, int(feature) | int(Transport.VERSION_1))
    assert info.value.feature == feature


def test_issue_named_rules():
    # the examples the issue lists, checked by message
    cases = [(N.MQ, "VIRTIO_NET_F_MQ requires VIRTIO_NET_F_CTRL_VQ"),
             (N.GUEST_TSO4, "VIRTIO_NET_F_GUEST_TSO4 requires VIRTIO_NET_F_GUEST_CSUM"),
             (N.HOST_TSO4, "VIRTIO_NET_F_HOST_TSO4 requires VIRTIO_NET_F_CSUM"),
             (N.CTRL_RX, "VIRTIO_NET_F_CTRL_RX requires VIRTIO_NET_F_CTRL_VQ"),
             (N.CTRL_VLAN, "VIRTIO_NET_F_CTRL_VLAN requires VIRTIO_NET_F_CTRL_VQ"),
             (N.CTRL_MAC_ADDR, "VIRTIO_NET_F_CTRL_MAC_ADDR requires VIRTIO_NET_F_CTRL_VQ"),
             (N.GUEST_ANNOUNCE, "VIRTIO_NET_F_GUEST_ANNOUNCE requires VIRTIO_NET_F_CTRL_VQ")]
    for feature, message in cases:
        with pytest.raises(FeatureDependencyError, match=f"^{message}$"):
            check_dependencies(int(feature))


def test_ecn_names_both_alternatives():
    with pytest.raises(FeatureDependencyError) as info:
        check_dependencies(int(N.GUEST_ECN | N.GUEST_CSUM))
    assert str(info.value) == ("VIRTIO_NET_F_GUEST_ECN requires VIRTIO_NET_F_GUEST_TSO4 or "
                               "VIRTIO_NET_F_GUEST_TSO6")
    check_dependencies(int(N.GUEST_ECN | N.GUEST_TSO6 | N.GUEST_CSUM))


def test_transitive_need_is_checked():
    # GUEST_ECN's need is there, but that need's own need is not
    with pytest.raises(FeatureDependencyError) as info:
        check_dependencies(int(N.GUEST_ECN | N.GUEST_TSO4))
    assert info.value.feature == N.GUEST_TSO4


def test_independent_bits_need_nothing():
    for feature in (N.CSUM, N.GUEST_CSUM, N.MAC, N.MTU, N.MRG_RXBUF, N.STATUS, N.CTRL_VQ,
                    N.SPEED_DUPLEX, N.STANDBY, Transport.EVENT_IDX, Transport.INDIRECT_DESC,
                    Transport.VERSION_1, Transport.RING_PACKED, Transport.IN_ORDER):
        check_dependencies(int(feature))


def test_errors_are_virtio_and_value_errors():
    assert issubclass(FeatureDependencyError, FeatureError)
    assert issubclass(FeatureError, VirtioError)
    assert issubclass(FeatureError, ValueError)
    assert issubclass(UnofferedFeatureError, FeatureError)


# ---- negotiation ------------------------------------------------------------------------

def test_negotiation_is_the_intersection():
    offered = int(N.CSUM | N.MAC | N.MRG_RXBUF | Transport.VERSION_1 | Transport.EVENT_IDX)
    requested = int(N.MAC | N.MRG_RXBUF | N.STATUS | Transport.VERSION_1)
    assert negotiate(offered, requested) == int(N.MAC | N.MRG_RXBUF | Transport.VERSION_1)
    assert negotiate(offered, 0) == 0
    assert negotiate(0, requested) == 0


def test_dependency_checked_on_the_intersection():
    # the device offers GUEST_CSUM, the driver does not take it: TSO4 is left alone
    offered = int(N.GUEST_CSUM | N.GUEST_TSO4)
    with pytest.raises(FeatureDependencyError, match="GUEST_TSO4 requires"):
        negotiate(offered, int(N.GUEST_TSO4))
    # the driver asks for CTRL_VQ but the device does not offer it
    with pytest.raises(FeatureDependencyError, match="VIRTIO_NET_F_MQ requires"):
        negotiate(int(N.MQ), int(N.MQ | N.CTRL_VQ))


def test_strict_mode_refuses_unoffered_bits():
    offered = int(N.CSUM | Transport.VERSION_1)
    requested = int(N.CSUM | N.MQ | Transport.VERSION_1)
    assert negotiate(offered, requested) == int(N.CSUM | Transport.VERSION_1)
    with pytest.raises(UnofferedFeatureError) as info:
        negotiate(offered, requested, strict=True)
    assert "VIRTIO_NET_F_MQ" in str(info.value)
    assert negotiate(offered, int(N.CSUM), strict=True) == int(N.CSUM)


def test_strict_names_unknown_bits():
    with pytest.raises(UnofferedFeatureError, match="unknown bits 0x10"):
        negotiate(0, 1 << 4, strict=True)


def test_custom_rules():
    assert negotiate(int(N.MQ), int(N.MQ), rules={}) == int(N.MQ)
    rules = {Transport.IN_ORDER: (Transport.EVENT_IDX,)}
    with pytest.raises(FeatureDependencyError,
                       match="^VIRTIO_F_IN_ORDER requires VIRTIO_RING_F_EVENT_IDX$"):
        negotiate(int(Transport.IN_ORDER), int(Transport.IN_ORDER), rules=rules)
