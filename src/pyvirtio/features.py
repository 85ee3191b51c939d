"""Feature bits (VIRTIO 1.2 sections 6 and 5.1.3) and feature negotiation.

Negotiation is the intersection of what the device offers and what the driver asks
for, then a check of the spec's dependencies ("VIRTIO_NET_F_MQ requires
VIRTIO_NET_F_CTRL_VQ", ...): a set that breaks one raises
:class:`FeatureDependencyError` naming the bit and what it is missing.
"""

from __future__ import annotations

import enum
from typing import Iterable

from vqcore.errors import VirtioError


class FeatureError(VirtioError, ValueError):
    """A feature set is not acceptable."""


class FeatureDependencyError(FeatureError):
    """A negotiated feature lacks a feature it depends on."""

    def __init__(self, feature: enum.IntFlag, needs: Iterable[enum.IntFlag]) -> None:
        self.feature = feature
        self.needs = tuple(needs)
        alts = " or ".join(spec_name(n) for n in self.needs)
        super().__init__(f"{spec_name(feature)} requires {alts}")


class UnofferedFeatureError(FeatureError):
    """The driver accepted a feature the device did not offer."""


class Transport(enum.IntFlag):
    """Device-independent feature bits (spec section 6), as ``VIRTIO_F_<name>``."""
    NOTIFY_ON_EMPTY = 1 << 24
    ANY_LAYOUT = 1 << 27
    INDIRECT_DESC = 1 << 28      # VIRTIO_RING_F_INDIRECT_DESC
    EVENT_IDX = 1 << 29          # VIRTIO_RING_F_EVENT_IDX
    PROTOCOL_FEATURES = 1 << 30  # vhost-user: VHOST_USER_F_PROTOCOL_FEATURES
    VERSION_1 = 1 << 32
    ACCESS_PLATFORM = 1 << 33
    RING_PACKED = 1 << 34
    IN_ORDER = 1 << 35
    ORDER_PLATFORM = 1 << 36
    SR_IOV = 1 << 37
    NOTIFICATION_DATA = 1 << 38
    NOTIF_CONFIG_DATA = 1 << 39
    RING_RESET = 1 << 40


class NetFeature(enum.IntFlag):
    """virtio-net feature bits (spec 5.1.3), as ``VIRTIO_NET_F_<name>``."""
    CSUM = 1 << 0
    GUEST_CSUM = 1 << 1
    CTRL_GUEST_OFFLOADS = 1 << 2
    MTU = 1 << 3
    MAC = 1 << 5
    GSO = 1 << 6                 # legacy only
    GUEST_TSO4 = 1 << 7
    GUEST_TSO6 = 1 << 8
    GUEST_ECN = 1 << 9
    GUEST_UFO = 1 << 10
    HOST_TSO4 = 1 << 11
    HOST_TSO6 = 1 << 12
    HOST_ECN = 1 << 13
    HOST_UFO = 1 << 14
    MRG_RXBUF = 1 << 15
    STATUS = 1 << 16
    CTRL_VQ = 1 << 17
    CTRL_RX = 1 << 18
    CTRL_VLAN = 1 << 19
    CTRL_RX_EXTRA = 1 << 20
    GUEST_ANNOUNCE = 1 << 21
    MQ = 1 << 22
    CTRL_MAC_ADDR = 1 << 23
    VQ_NOTF_COAL = 1 << 52
    NOTF_COAL = 1 << 53
    GUEST_USO4 = 1 << 54
    GUEST_USO6 = 1 << 55
    HOST_USO = 1 << 56
    HASH_REPORT = 1 << 57
    GUEST_HDRLEN = 1 << 59
    RSS = 1 << 60
    RSC_EXT = 1 << 61
    STANDBY = 1 << 62
    SPEED_DUPLEX = 1 << 63


def spec_name(flag: enum.IntFlag) -> str:
    """``VIRTIO_NET_F_MQ``, ``VIRTIO_F_VERSION_1``, ... for a single bit."""
    if isinstance(flag, NetFeature):
        return f"VIRTIO_NET_F_{flag.name}"
    if isinstance(flag, Transport):
        if flag in (Transport.INDIRECT_DESC, Transport.EVENT_IDX):
            return f"VIRTIO_RING_F_{flag.name}"
        if flag is Transport.PROTOCOL_FEATURES:
            return "VHOST_USER_F_PROTOCOL_FEATURES"
        return f"VIRTIO_F_{flag.name}"
    return str(flag)


def bits(value: int) -> list[enum.IntFlag]:
    """The named bits set in ``value`` (transport and net), lowest first."""
    out: list[enum.IntFlag] = []
    for cls in (NetFeature, Transport):
        for member in cls:
            if value & member:
                out.append(member)
    return sorted(out, key=int)


def describe(value: int) -> str:
    """Human-readable list of the bits in ``value``."""
    names = [spec_name(b) for b in bits(value)]
    known = 0
    for b in bits(value):
        known |= int(b)
    if value & ~known:
        names.append(f"unknown bits {value & ~known:#x}")
    return ", ".join(names) or "none"


N = NetFeature
#: feature -> the features it needs (any one of them): spec 5.1.3.1 and section 6
NET_DEPENDENCIES: dict[enum.IntFlag, tuple[enum.IntFlag, ...]] = {
    N.GUEST_TSO4: (N.GUEST_CSUM,),
    N.GUEST_TSO6: (N.GUEST_CSUM,),
    N.GUEST_ECN: (N.GUEST_TSO4, N.GUEST_TSO6),
    N.GUEST_UFO: (N.GUEST_CSUM,),
    N.GUEST_USO4: (N.GUEST_CSUM,),
    N.GUEST_USO6: (N.GUEST_CSUM,),
    N.HOST_TSO4: (N.CSUM,),
    N.HOST_TSO6: (N.CSUM,),
    N.HOST_ECN: (N.HOST_TSO4, N.HOST_TSO6),
    N.HOST_UFO: (N.CSUM,),
    N.HOST_USO: (N.CSUM,),
    N.CTRL_RX: (N.CTRL_VQ,),
    N.CTRL_VLAN: (N.CTRL_VQ,),
    N.GUEST_ANNOUNCE: (N.CTRL_VQ,),
    N.MQ: (N.CTRL_VQ,),
    N.CTRL_MAC_ADDR: (N.CTRL_VQ,),
    N.CTRL_GUEST_OFFLOADS: (N.CTRL_VQ,),
    N.CTRL_RX_EXTRA: (N.CTRL_RX,),
    N.NOTF_COAL: (N.CTRL_VQ,),
    N.VQ_NOTF_COAL: (N.CTRL_VQ,),
    N.RSS: (N.CTRL_VQ,),
    N.HASH_REPORT: (N.CTRL_VQ,),
    N.RSC_EXT: (N.HOST_TSO4, N.HOST_TSO6),
}
del N


def check_dependencies(features: int,
                       rules: dict[enum.IntFlag, tuple[enum.IntFlag, ...]] = NET_DEPENDENCIES) -> None:
    """Raise :class:`FeatureDependencyError` for the first bit whose needs are unmet."""
    for feature, needs in rules.items():
        if features & feature and not any(features & n for n in needs):
            raise FeatureDependencyError(feature, needs)


def negotiate(offered: int, requested: int, *, strict: bool = False,
              rules: dict[enum.IntFlag, tuple[enum.IntFlag, ...]] = NET_DEPENDENCIES) -> int:
    """Offered ∩ requested, checked against the spec's dependencies.

    With ``strict`` a requested bit that was not offered is an error
    (:class:`UnofferedFeatureError`), as it is for a driver writing the feature
    register; otherwise it is dropped.
    """
    if strict and requested & ~offered:
        raise UnofferedFeatureError(f"not offered: {describe(requested & ~offered)}")
    result = offered & requested
    check_dependencies(result, rules)
    return result
