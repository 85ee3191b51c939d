"""The generic device base (pyvirtio.device): status, negotiation, config space, queues.

The queue tests run for split and packed rings (``ring_kind``): the driver accepts
VIRTIO_F_RING_PACKED or not, and the device builds the matching queues."""

from __future__ import annotations

import logging

import numpy as np
import pytest

import vqcore
from vqcore.errors import LayoutError, VirtioError

from pyvirtio.device import (ConfigAccessError, InvalidQueueIndex, QueueConfig,
                             VirtioDevice)
from pyvirtio.features import (NET_DEPENDENCIES, FeatureDependencyError, FeatureError,
                               NetFeature, Transport, UnofferedFeatureError)
from pyvirtio.status import DeviceStateError, DeviceStatus, StatusTransitionError

S = DeviceStatus
A, D, F, O = S.ACKNOWLEDGE, S.DRIVER, S.FEATURES_OK, S.DRIVER_OK
N = NetFeature
V1 = int(Transport.VERSION_1)
EVENT_IDX = int(Transport.EVENT_IDX)

PACKED = int(Transport.RING_PACKED)
OFFERED = int(V1 | EVENT_IDX | Transport.INDIRECT_DESC | N.CSUM | N.GUEST_CSUM | N.MAC
              | N.CTRL_VQ | N.MQ | N.STATUS | PACKED)
QSIZE = 16
BASE = 0x10000


class Guest:
    """Guest memory (one numpy region) with room for a few rings."""

    def __init__(self, nrings: int = 2, ring_kind: str = "split") -> None:
        self.buffer = np.zeros(64 * 1024, np.uint8)
        self.memory = vqcore.GuestMemory([(BASE, self.buffer)])
        self.features = PACKED if ring_kind == "packed" else 0
        self.rings = [vqcore.ring_addresses(BASE + i * 0x2000, QSIZE, self.features)
                      for i in range(nrings)]


def make_device(**kwargs) -> VirtioDevice:
    kwargs.setdefault("features", OFFERED)
    kwargs.setdefault("num_queues", 2)
    kwargs.setdefault("queue_size", QSIZE)
    kwargs.setdefault("rules", NET_DEPENDENCIES)
    kwargs.setdefault("name", "dev")
    return VirtioDevice(1, **kwargs)


def bring_up(dev: VirtioDevice, driver_features: int, guest: Guest | None = None) -> None:
    """Play a driver: ACKNOWLEDGE, DRIVER, features, FEATURES_OK, queues, DRIVER_OK."""
    dev.write_status(A)
    dev.write_status(A | D)
    dev.write_driver_features(driver_features)
    assert dev.write_status(A | D | F) == A | D | F
    if guest is not None:
        dev.memory = guest.memory
        for i, ring in enumerate(guest.rings[:dev.num_queues]):
            desc, driver_area, device_area = ring[:3]
            dev.configure_queue(i, desc=desc, avail=driver_area, used=device_area,
                                enabled=True)
    dev.write_status(A | D | F | O)


# ---- construction ----------------------------------------------------------------------

def test_initial_state():
    dev = make_device()
    assert dev.device_id == 1
    assert dev.status == 0
    assert dev.device_features == OFFERED
    assert dev.negotiated_features == 0
    assert dev.num_queues == 2
    assert dev.queues == [None, None]
    assert dev.queue_config(1) == QueueConfig(1, QSIZE, QSIZE)


def test_unsupported_transport_feature_refused():
    with pytest.raises(FeatureError, match="VIRTIO_F_NOTIFICATION_DATA"):
        make_device(features=OFFERED | int(Transport.NOTIFICATION_DATA))


@pytest.mark.parametrize("kwargs", [dict(num_queues=0), dict(queue_size=3),
                                    dict(features=1 << 64)])
def test_bad_construction(kwargs):
    with pytest.raises((ValueError, LayoutError)):
        make_device(**kwargs)


# ---- status and negotiation ----------------------------------------------------------------

def test_negotiation_and_driver_ok_create_queues(ring_kind):
    guest = Guest(ring_kind=ring_kind)
    dev = make_device()
    wanted = int(V1 | EVENT_IDX | N.CSUM | N.MAC | N.CTRL_VQ | N.MQ) | guest.features
    bring_up(dev, wanted, guest)
    assert dev.packed == (ring_kind == "packed")
    assert dev.status == A | D | F | O
    assert dev.driver_ok
    assert dev.negotiated_features == wanted
    assert dev.has_feature(N.MQ) and dev.has_feature(N.MQ | N.CTRL_VQ)
    assert not dev.has_feature(N.STATUS)
    for i, q in enumerate(dev.queues):
        assert isinstance(q, vqcore.PackedDeviceQueue if dev.packed
                          else vqcore.SplitDeviceQueue)
        assert q.event_idx
        assert q.size == QSIZE
        assert q.desc_addr == guest.rings[i].desc
        assert q.name == f"dev.q{i}"


def test_event_idx_follows_negotiation():
    guest = Guest()
    dev = make_device()
    bring_up(dev, int(V1 | N.MAC), guest)
    assert all(not q.event_idx for q in dev.queues)


def test_running_queue_moves_chains(ring_kind):
    guest = Guest(1, ring_kind)
    dev = make_device(num_queues=1)
    bring_up(dev, V1 | guest.features, guest)
    ring = guest.rings[0]
    driver = vqcore.driver_queue(guest.memory, QSIZE, *ring[:3], features=guest.features)
    out = vqcore.ChainBatch(4)
    data = BASE + 0x8000
    guest.memory.write(data, b"hello")
    out.append(readable=[(data, 5)], writable=[(data + 64, 8)], token=7)
    assert driver.add(out) == 1
    got = vqcore.ChainBatch(4)
    assert dev.queues[0].pop(got) == 1
    assert got.chain_bytes(0) == b"hello"
    got.used_len[0] = 3
    dev.queues[0].push_used(got)
    back = vqcore.ChainBatch(4)
    assert driver.reclaim(back) == 1
    assert (int(back.tokens[0]), int(back.used_len[0])) == (7, 3)


def test_only_enabled_queues_start():
    guest = Guest()
    dev = make_device()
    dev.write_status(A | D)
    dev.write_driver_features(V1)
    dev.write_status(A | D | F)
    dev.memory = guest.memory
    ring = guest.rings[1]
    dev.configure_queue(1, desc=ring.desc, avail=ring.avail, used=ring.used, enabled=True)
    dev.write_status(A | D | F | O)
    assert dev.queues[0] is None
    assert dev.queue(1) is not None


@pytest.mark.parametrize("wanted,error,words", [
    (int(V1 | N.MQ), FeatureDependencyError, "VIRTIO_NET_F_MQ requires VIRTIO_NET_F_CTRL_VQ"),
    (int(V1 | N.GUEST_TSO4 | N.GUEST_CSUM), UnofferedFeatureError, "VIRTIO_NET_F_GUEST_TSO4"),
    (int(N.MAC), FeatureError, "requires VIRTIO_F_VERSION_1"),
])
def test_device_refuses_features_ok(wanted, error, words, caplog):
    dev = make_device()
    dev.write_status(A | D)
    dev.write_driver_features(wanted)
    with caplog.at_level(logging.WARNING, logger="pyvirtio.device"):
        assert dev.write_status(A | D | F) == A | D          # read back: not accepted
    assert isinstance(dev.negotiation_error, error)
    assert words in str(dev.negotiation_error)
    assert words in caplog.text
    assert dev.negotiated_features == 0
    # the driver gives up
    assert dev.write_status(A | D | S.FAILED) == A | D | S.FAILED
    with pytest.raises(StatusTransitionError):
        dev.write_status(A | D | F | O | S.FAILED)
    dev.write_status(0)
    assert dev.status == 0 and dev.negotiation_error is None


def test_legacy_driver_allowed_when_not_required():
    dev = make_device(require_version_1=False)
    bring_up(dev, int(N.MAC))
    assert dev.negotiated_features == int(N.MAC)


def test_generic_device_has_no_net_rules():
    dev = VirtioDevice(5, features=V1 | int(N.MQ), num_queues=1)
    bring_up(dev, V1 | int(N.MQ))
    assert dev.negotiated_features == V1 | int(N.MQ)


def test_subclass_hook_refuses_features():
    class Picky(VirtioDevice):
        def on_features_ok(self, features: int) -> None:
            if not features & N.MRG_RXBUF:
                raise FeatureError("this device needs VIRTIO_NET_F_MRG_RXBUF")

    dev = Picky(1, features=V1 | int(N.MRG_RXBUF), num_queues=1)
    dev.write_status(A | D)
    dev.write_driver_features(V1)
    assert dev.write_status(A | D | F) == A | D
    assert "MRG_RXBUF" in str(dev.negotiation_error)
    dev.write_driver_features(V1 | int(N.MRG_RXBUF))
    assert dev.write_status(A | D | F) == A | D | F


def test_driver_features_written_at_the_wrong_time():
    dev = make_device()
    with pytest.raises(DeviceStateError):
        dev.write_driver_features(V1)
    dev.write_status(A | D)
    with pytest.raises(ValueError):
        dev.write_driver_features(1 << 64)
    dev.write_driver_features(V1)
    dev.write_status(A | D | F)
    with pytest.raises(DeviceStateError):
        dev.write_driver_features(V1 | int(N.MAC))
    assert dev.driver_features == V1


def test_features_ok_before_feature_write_is_illegal():
    dev = make_device()
    dev.write_status(A | D)
    with pytest.raises(StatusTransitionError, match="feature bits"):
        dev.write_status(A | D | F)
    assert dev.status == A | D


def test_negotiate_features_without_status_byte():
    guest = Guest(1)
    dev = make_device(num_queues=1)
    assert dev.negotiate_features(V1 | EVENT_IDX) == V1 | EVENT_IDX
    with pytest.raises(FeatureDependencyError):
        dev.negotiate_features(V1 | int(N.MQ))
    assert dev.negotiated_features == V1 | EVENT_IDX         # unchanged by the failure
    dev.memory = guest.memory
    ring = guest.rings[0]
    dev.configure_queue(0, size=8, desc=ring.desc, avail=ring.avail, used=ring.used)
    q = dev.activate_queue(0)
    assert q.event_idx and q.size == 8
    assert dev.activate_queue(0) is q
    dev.deactivate_queue(0)
    assert dev.queue(0) is None


def test_negotiate_features_refused_after_driver_ok():
    dev = make_device()
    bring_up(dev, V1)
    with pytest.raises(DeviceStateError):
        dev.negotiate_features(V1)


# ---- reset and DEVICE_NEEDS_RESET -----------------------------------------------------------

def test_reset_drops_everything():
    resets = []

    class Dev(VirtioDevice):
        def on_reset(self) -> None:
            # called before the queues go: a subclass can stop its workers first
            resets.append([q is not None for q in self.queues])

    guest = Guest()
    dev = Dev(1, features=OFFERED, num_queues=2, queue_size=QSIZE, rules=NET_DEPENDENCIES)
    bring_up(dev, V1 | EVENT_IDX, guest)
    assert dev.write_status(0) == 0
    assert resets == [[True, True]]
    assert dev.queues == [None, None]
    assert dev.negotiated_features == 0 and dev.driver_features == 0
    assert all(qc == QueueConfig(i, QSIZE, QSIZE) for i, qc in enumerate(dev.queue_configs))
    # the memory region is free again once the queues are gone
    assert guest.memory.attached == 0
    bring_up(dev, V1, guest)
    assert dev.queues[0] is not None


def test_driver_ok_with_bad_ring_address_needs_reset(caplog):
    guest = Guest(1)
    notified = []
    dev = make_device(num_queues=1)
    dev.config_change_callback = lambda: notified.append(dev.status)
    dev.write_status(A | D)
    dev.write_driver_features(V1)
    dev.write_status(A | D | F)
    dev.memory = guest.memory
    dev.configure_queue(0, desc=0x100000, avail=0x100200, used=0x100400, enabled=True)
    with caplog.at_level(logging.WARNING, logger="pyvirtio.device"):
        status = dev.write_status(A | D | F | O)
    assert status == A | D | F | O | S.DEVICE_NEEDS_RESET
    assert dev.queues == [None]
    assert "queue 0 cannot start" in dev.needs_reset_reason
    assert caplog.text.count("device needs reset") == 1
    assert notified == [A | D | F | O | S.DEVICE_NEEDS_RESET]


def test_driver_ok_without_memory_needs_reset():
    dev = make_device(num_queues=1)
    dev.configure_queue(0, enabled=True)
    bring_up(dev, V1)
    assert dev.status & S.DEVICE_NEEDS_RESET
    assert "without guest memory" in dev.needs_reset_reason


def test_needs_reset_logs_once(caplog):
    dev = make_device()
    bring_up(dev, V1)
    calls = []
    dev.config_change_callback = lambda: calls.append(1)
    with caplog.at_level(logging.WARNING, logger="pyvirtio.device"):
        dev.needs_reset("ring 0 broken")
        dev.needs_reset("ring 1 broken")
    assert dev.status & S.DEVICE_NEEDS_RESET
    assert dev.needs_reset_reason == "ring 0 broken"
    assert caplog.text.count("needs reset") == 1
    assert calls == [1]
    dev.write_status(0)
    assert dev.needs_reset_reason is None and dev.status == 0


def test_needs_reset_before_driver_ok_does_not_notify():
    dev = make_device()
    calls = []
    dev.config_change_callback = lambda: calls.append(1)
    dev.write_status(A)
    dev.needs_reset("no backend")
    assert dev.status == A | S.DEVICE_NEEDS_RESET
    assert calls == []


def test_on_driver_ok_hook():
    seen = []

    class Dev(VirtioDevice):
        def on_driver_ok(self) -> None:
            seen.append([q is not None for q in self.queues])

    guest = Guest()
    dev = Dev(1, features=V1, num_queues=2, queue_size=QSIZE)
    bring_up(dev, V1, guest)
    assert seen == [[True, True]]


# ---- queue configuration --------------------------------------------------------------------

def test_configure_queue_checks():
    dev = make_device()
    with pytest.raises(InvalidQueueIndex):
        dev.configure_queue(2, size=8)
    with pytest.raises(IndexError):
        dev.queue_config(-1)
    with pytest.raises(LayoutError, match="power of two"):
        dev.configure_queue(0, size=12)      # split (nothing negotiated yet)
    with pytest.raises(LayoutError, match="exceeds its maximum"):
        dev.configure_queue(0, size=2 * QSIZE)
    with pytest.raises(ValueError):
        dev.configure_queue(0, desc=1 << 64)
    qc = dev.configure_queue(0, size=4, desc=0x1000, avail=0x1040, used=0x1080)
    assert (qc.size, qc.desc, qc.avail, qc.used, qc.enabled) == (4, 0x1000, 0x1040, 0x1080, False)
    dev.configure_queue(0, enabled=True)
    assert dev.queue_config(0).enabled and dev.queue_config(0).size == 4


def test_packed_queue_size_need_not_be_a_power_of_two():
    """With VIRTIO_F_RING_PACKED negotiated a queue may have any size up to its
    maximum; the device builds a packed queue of it."""
    guest = Guest(1, "packed")
    dev = make_device(num_queues=1)
    dev.write_status(A | D)
    dev.write_driver_features(V1 | PACKED)
    dev.write_status(A | D | F)
    dev.memory = guest.memory
    ring = vqcore.ring_addresses(BASE, 12, PACKED)
    dev.configure_queue(0, size=12, desc=ring.desc, avail=ring.driver, used=ring.device,
                        enabled=True)
    with pytest.raises(LayoutError):
        dev.configure_queue(0, size=0)
    dev.write_status(A | D | F | O)
    q = dev.queue(0)
    assert isinstance(q, vqcore.PackedDeviceQueue) and q.size == 12
    assert q.next_avail == 0x8000                 # slot 0, wrap counter 1


def test_running_queue_cannot_be_reconfigured():
    guest = Guest()
    dev = make_device()
    bring_up(dev, V1, guest)
    with pytest.raises(DeviceStateError):
        dev.configure_queue(0, size=8)


def test_misaligned_ring_needs_reset():
    guest = Guest(1)
    dev = make_device(num_queues=1)
    dev.memory = guest.memory
    ring = guest.rings[0]
    dev.configure_queue(0, desc=ring.desc + 8, avail=ring.avail, used=ring.used, enabled=True)
    bring_up(dev, V1)
    assert dev.status & S.DEVICE_NEEDS_RESET
    assert "aligned" in dev.needs_reset_reason


# ---- configuration space --------------------------------------------------------------------

def test_config_read_and_bounds():
    dev = make_device(config=bytes(range(10)))
    assert dev.config_size == 10
    assert dev.read_config(0, 10) == bytes(range(10))
    assert dev.read_config(3, 2) == b"\x03\x04"
    assert dev.read_config(10, 0) == b""
    for offset, length in ((9, 2), (10, 1), (-1, 1), (0, 11), (2, -1)):
        with pytest.raises(ConfigAccessError):
            dev.read_config(offset, length)
    for offset, length in ((9, 2), (10, 1), (-1, 1), (0, 11)):
        with pytest.raises(ConfigAccessError):
            dev.write_config(offset, b"\0" * length)
    assert issubclass(ConfigAccessError, IndexError) and issubclass(ConfigAccessError, VirtioError)


def test_default_config_is_read_only_for_the_driver():
    dev = make_device(config=bytes(8))
    dev.write_config(2, b"\xff\xff")
    assert dev.read_config(0, 8) == bytes(8)


def test_device_config_change_bumps_generation_and_notifies():
    dev = make_device(config=bytes(4))
    calls = []
    dev.config_change_callback = lambda: calls.append(dev.config_generation)
    dev.set_config(1, b"\x05")                 # before DRIVER_OK: no notification
    assert dev.read_config(0, 4) == b"\x00\x05\x00\x00"
    assert dev.config_generation == 1 and calls == []
    bring_up(dev, V1)
    dev.set_config(1, b"\x05")                 # no change: nothing
    assert dev.config_generation == 1
    dev.set_config(2, b"\x07\x08")
    assert dev.config_generation == 2 and calls == [2]
    with pytest.raises(ConfigAccessError):
        dev.set_config(3, b"\x00\x00")


def test_config_hooks():
    class Dev(VirtioDevice):
        def __init__(self) -> None:
            super().__init__(3, features=V1, num_queues=1)
            self.regs = bytearray(b"abcdefgh")
            self.writes: list[tuple[int, bytes]] = []

        @property
        def config_size(self) -> int:
            return len(self.regs)

        def _read_config(self, offset: int, length: int) -> bytes:
            return bytes(self.regs[offset:offset + length])

        def _write_config(self, offset: int, data: bytes) -> None:
            self.writes.append((offset, data))
            self.regs[offset:offset + len(data)] = data

    dev = Dev()
    assert dev.read_config(2, 3) == b"cde"
    dev.write_config(6, bytearray(b"XY"))
    assert dev.writes == [(6, b"XY")]
    assert dev.read_config(0, 8) == b"abcdefXY"
    with pytest.raises(ConfigAccessError):
        dev.write_config(7, b"XY")
    assert dev.writes == [(6, b"XY")]
