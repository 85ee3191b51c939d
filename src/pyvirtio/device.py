"""A generic virtio device: status, features, configuration space and virtqueues.

:class:`VirtioDevice` is transport-neutral: a PCI or MMIO model, or the vhost-user
backend, translates its own register accesses or messages into the calls here
(:meth:`~VirtioDevice.write_status`, :meth:`~VirtioDevice.write_driver_features`,
:meth:`~VirtioDevice.configure_queue`, :meth:`~VirtioDevice.read_config`, ...).

Life cycle (section 3.1.1): the driver sets ACKNOWLEDGE and DRIVER, writes the features
it accepts, sets FEATURES_OK — the device then negotiates (offered ∩ accepted, every
dependency rule of the device and of the transport) and refuses FEATURES_OK when that
fails —, configures and enables its queues, and sets DRIVER_OK: the device then creates
one :class:`vqcore.DeviceQueue` per enabled queue over :attr:`~VirtioDevice.memory` with
:func:`vqcore.device_queue`: packed with VIRTIO_F_RING_PACKED negotiated, else split,
with ``event_idx`` from VIRTIO_F_EVENT_IDX. Writing 0 resets everything.

A device that cannot continue (a guest broke a ring, a queue address does not map) calls
:meth:`~VirtioDevice.needs_reset`: DEVICE_NEEDS_RESET is set, the reason logged once and
the transport told through :attr:`~VirtioDevice.config_change_callback`.

Subclasses hook in with :meth:`~VirtioDevice.on_features_ok` (may refuse the features),
:meth:`~VirtioDevice.on_driver_ok`, :meth:`~VirtioDevice.on_reset`, and
:meth:`~VirtioDevice._read_config` / :meth:`~VirtioDevice._write_config` for the
configuration space.
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass
from typing import Callable, Mapping

import vqcore
from vqcore.errors import LayoutError, VirtioError

from pyvirtio.features import FeatureError, Transport, describe, negotiate, spec_name
from pyvirtio.status import DeviceStateError, DeviceStatus, StatusMachine

log = logging.getLogger(__name__)

#: dependency rules between transport feature bits (section 6). The spec states none
#: for the bits we define (EVENT_IDX, INDIRECT_DESC, VERSION_1, ACCESS_PLATFORM,
#: IN_ORDER, ... stand alone); a rule added here applies to every device.
TRANSPORT_DEPENDENCIES: dict[enum.IntFlag, tuple[enum.IntFlag, ...]] = {}

#: transport bits a device built on vqcore may offer (split and packed rings; no
#: notification data, no ring reset yet)
SUPPORTED_TRANSPORT = (Transport.NOTIFY_ON_EMPTY | Transport.ANY_LAYOUT
                       | Transport.INDIRECT_DESC | Transport.EVENT_IDX
                       | Transport.PROTOCOL_FEATURES | Transport.VERSION_1
                       | Transport.ACCESS_PLATFORM | Transport.RING_PACKED
                       | Transport.IN_ORDER | Transport.ORDER_PLATFORM)

#: every bit of section 6 (transport bits are 24..40 and 50..)
_TRANSPORT_MASK = sum(int(t) for t in Transport)


class ConfigAccessError(VirtioError, IndexError):
    """A configuration space access lies outside the configuration space."""


class InvalidQueueIndex(VirtioError, IndexError):
    """A queue index the device does not have."""


@dataclass
class QueueConfig:
    """What the driver configured for one virtqueue (section 4.1.4.3 names).

    ``desc``, ``avail`` and ``used`` are the descriptor area, driver area and device
    area. ``size`` starts at ``max_size``; the driver may lower it.
    """
    index: int
    max_size: int
    size: int
    desc: int = 0
    avail: int = 0
    used: int = 0
    enabled: bool = False

    def reset(self) -> None:
        """Back to the values after a device reset."""
        self.size = self.max_size
        self.desc = self.avail = self.used = 0
        self.enabled = False


@dataclass
class Vring:
    """A running virtqueue as a worker serves it: the device side of the ring and the
    eventfds around it. Whoever built it (the device itself for an in-process driver,
    the vhost-user handler for a front-end) owns the fds; a worker only uses them
    while it runs.

    ``kick_fd`` -1 means no kick ever comes (the worker polls the ring); ``call_fd``
    and ``err_fd`` -1 mean nobody is interrupted or told of a broken ring. A ring that
    is not ``enabled`` (vhost-user's SET_VRING_ENABLE 0) is served without moving
    data: a device discards what the driver offers or supplies nothing, as its type
    says."""
    index: int
    queue: vqcore.DeviceQueue
    kick_fd: int = -1
    call_fd: int = -1
    err_fd: int = -1
    enabled: bool = True


class VirtioDevice:
    """A transport-neutral virtio device: status machine, features, config, queues.

    Args:
        device_id: the virtio device id (1 for a network card).
        features: the feature bits the device offers (device and transport bits).
        num_queues: how many virtqueues the device has.
        queue_size: the largest size of each queue (its ``queue_size`` on reset).
        config: the initial configuration space (used by the default config hooks).
        rules: the device type's feature dependency rules (e.g.
            :data:`pyvirtio.features.NET_DEPENDENCIES`); the transport's rules are added.
        require_version_1: when VERSION_1 is offered, refuse FEATURES_OK without it
            (legacy drivers are out of scope).
        name: for log messages and queue names.
    """

    def __init__(self, device_id: int, *, features: int, num_queues: int,
                 queue_size: int = 256, config: bytes = b"",
                 rules: Mapping[enum.IntFlag, tuple[enum.IntFlag, ...]] | None = None,
                 require_version_1: bool = True, name: str = "") -> None:
        if not 0 < device_id < 0x10000:
            raise ValueError(f"device id {device_id} out of range")
        unsupported = features & _TRANSPORT_MASK & ~int(SUPPORTED_TRANSPORT)
        if unsupported:
            raise FeatureError(f"transport features not supported by vqcore: "
                               f"{describe(unsupported)}")
        if not 0 <= features < 1 << 64:
            raise ValueError(f"features {features:#x} do not fit 64 bits")
        if num_queues < 1:
            raise ValueError("a device needs at least one queue")
        vqcore.check_queue_size(queue_size)
        self.device_id = device_id
        self.name = name or f"virtio-{device_id}"
        self._device_features = int(features)
        self._rules: dict[enum.IntFlag, tuple[enum.IntFlag, ...]] = {
            **TRANSPORT_DEPENDENCIES, **(rules or {})}
        self.require_version_1 = require_version_1
        self._status = StatusMachine(accept_features=self._accept_features, name=self.name)
        self.driver_features = 0
        self._negotiated = 0
        #: why the device last refused FEATURES_OK, or None
        self.negotiation_error: FeatureError | None = None
        self._config = bytearray(config)
        self.config_generation = 0
        #: called when the configuration changed or DEVICE_NEEDS_RESET was set (the
        #: transport sends a configuration change notification)
        self.config_change_callback: Callable[[], None] | None = None
        #: guest memory the queues live in (set by the transport)
        self.memory: vqcore.GuestMemory | None = None
        self.queue_configs = [QueueConfig(i, queue_size, queue_size) for i in range(num_queues)]
        self.queues: list[vqcore.DeviceQueue | None] = [None] * num_queues
        self._needs_reset_reason: str | None = None

    # ---- status ------------------------------------------------------------------------

    @property
    def status(self) -> DeviceStatus:
        """The device status as the driver reads it."""
        return self._status.value

    @property
    def status_machine(self) -> StatusMachine:
        """The :class:`~pyvirtio.status.StatusMachine` behind :attr:`status`."""
        return self._status

    @property
    def driver_ok(self) -> bool:
        """Whether the driver set DRIVER_OK (and did not reset since)."""
        return bool(self.status & DeviceStatus.DRIVER_OK)

    def write_status(self, value: int) -> DeviceStatus:
        """The driver writes the status byte. Returns the status it reads back.

        Raises :class:`~pyvirtio.status.StatusTransitionError` (nothing changed) for a
        write out of the spec's order. Writing 0 resets the device; setting DRIVER_OK
        creates the queues (a queue that cannot be created sets DEVICE_NEEDS_RESET).
        """
        if value == 0:
            self.reset()
            return self.status
        old = self.status
        new = self._status.write(value)
        if new & DeviceStatus.DRIVER_OK and not old & DeviceStatus.DRIVER_OK:
            self._start()
        elif new & DeviceStatus.FAILED and not old & DeviceStatus.FAILED:
            log.info("%s: the driver set FAILED", self.name)
        return self.status

    def reset(self) -> None:
        """Device reset: status 0, no negotiated features, queues dropped and unconfigured.

        :meth:`on_reset` runs first, while the queues still exist, so a subclass stops
        its workers before the driver can see status 0."""
        self.on_reset()
        self._status.reset()
        self.driver_features = 0
        self._negotiated = 0
        self.negotiation_error = None
        self._needs_reset_reason = None
        self.queues = [None] * len(self.queue_configs)
        for qc in self.queue_configs:
            qc.reset()

    def needs_reset(self, reason: str) -> None:
        """The device cannot continue: set DEVICE_NEEDS_RESET and log ``reason`` once."""
        if self._status.set_needs_reset():
            self._needs_reset_reason = reason
            log.warning("%s: device needs reset: %s", self.name, reason)
            if self.status & DeviceStatus.DRIVER_OK:
                self._notify_config_change()
        else:
            log.debug("%s: device needs reset (again): %s", self.name, reason)

    @property
    def needs_reset_reason(self) -> str | None:
        """Why DEVICE_NEEDS_RESET was set, or None."""
        return self._needs_reset_reason

    def clear_needs_reset(self) -> None:
        """Forget DEVICE_NEEDS_RESET, for a transport whose driver acknowledged it
        without a full reset (vhost-user's SET_STATUS 0 stops the rings and keeps
        their state)."""
        self._status.clear_needs_reset()
        self._needs_reset_reason = None

    # ---- features ----------------------------------------------------------------------

    @property
    def device_features(self) -> int:
        """The feature bits the device offers."""
        return self._device_features

    @property
    def negotiated_features(self) -> int:
        """The features in force: 0 until the device accepted FEATURES_OK."""
        return self._negotiated

    def has_feature(self, feature: int) -> bool:
        """Whether every bit of ``feature`` was negotiated."""
        return self._negotiated & int(feature) == int(feature)

    def write_driver_features(self, value: int) -> None:
        """The driver writes the features it accepts (after DRIVER, before FEATURES_OK).

        Raises :class:`~pyvirtio.status.DeviceStateError` at any other time. The value
        is checked when the driver sets FEATURES_OK.
        """
        if not 0 <= value < 1 << 64:
            raise ValueError(f"driver features {value:#x} do not fit 64 bits")
        self._status.driver_features_written()
        self.driver_features = int(value)

    def negotiate_features(self, value: int) -> int:
        """Accept ``value`` at once, for transports without a status byte (vhost-user's
        SET_FEATURES). Returns the negotiated features; raises
        :class:`~pyvirtio.features.FeatureError` (nothing changed) when they are not
        acceptable, :class:`~pyvirtio.status.DeviceStateError` once the queues run."""
        if self.driver_ok:
            raise DeviceStateError(f"{self.name}: features cannot change after DRIVER_OK")
        negotiated = self._check_features(int(value))
        self.driver_features = int(value)
        self._negotiated = negotiated
        self.negotiation_error = None
        return negotiated

    def _check_features(self, value: int) -> int:
        negotiated = negotiate(self._device_features, value, strict=True, rules=self._rules)
        v1 = Transport.VERSION_1
        if (self.require_version_1 and self._device_features & v1 and not negotiated & v1):
            raise FeatureError(f"the device requires {spec_name(v1)}")
        self.on_features_ok(negotiated)
        return negotiated

    def _accept_features(self) -> bool:
        try:
            negotiated = self._check_features(self.driver_features)
        except FeatureError as exc:
            self.negotiation_error = exc
            log.warning("%s: features %#x not acceptable: %s", self.name,
                        self.driver_features, exc)
            return False
        self._negotiated = negotiated
        self.negotiation_error = None
        log.debug("%s: negotiated %s", self.name, describe(negotiated))
        return True

    # ---- configuration space -----------------------------------------------------------

    @property
    def config_size(self) -> int:
        """Size of the device configuration space in bytes."""
        return len(self._config)

    def _check_config_range(self, offset: int, length: int) -> None:
        size = self.config_size
        if offset < 0 or length < 0 or offset + length > size:
            raise ConfigAccessError(f"{self.name}: config access [{offset}, {offset + length}) "
                                    f"outside the {size}-byte configuration space")

    def read_config(self, offset: int, length: int) -> bytes:
        """The driver reads ``length`` bytes at ``offset`` of the configuration space."""
        self._check_config_range(offset, length)
        data = self._read_config(offset, length)
        if len(data) != length:
            raise AssertionError(f"config read hook returned {len(data)} bytes, not {length}")
        return data

    def write_config(self, offset: int, data: bytes) -> None:
        """The driver writes ``data`` at ``offset`` of the configuration space."""
        data = bytes(data)
        self._check_config_range(offset, len(data))
        self._write_config(offset, data)

    def _read_config(self, offset: int, length: int) -> bytes:
        """Hook: the bytes of the configuration space (range already checked)."""
        return bytes(self._config[offset:offset + length])

    def _write_config(self, offset: int, data: bytes) -> None:
        """Hook: a driver write (range already checked). The default configuration
        space is read-only for the driver: the write is ignored."""
        log.debug("%s: driver write to read-only config [%d, %d) ignored", self.name,
                  offset, offset + len(data))

    def set_config(self, offset: int, data: bytes) -> None:
        """The device changes its own configuration space (default hooks) and notifies."""
        data = bytes(data)
        self._check_config_range(offset, len(data))
        if self._config[offset:offset + len(data)] != data:
            self._config[offset:offset + len(data)] = data
            self.config_changed()

    def config_changed(self) -> None:
        """The device changed its configuration: bump ``config_generation`` and notify
        the driver (once it set DRIVER_OK)."""
        self.config_generation = (self.config_generation + 1) & 0xFF
        if self.driver_ok:
            self._notify_config_change()

    def _notify_config_change(self) -> None:
        if self.config_change_callback is not None:
            self.config_change_callback()

    # ---- queues ------------------------------------------------------------------------

    @property
    def num_queues(self) -> int:
        """How many virtqueues the device has."""
        return len(self.queue_configs)

    def queue_config(self, index: int) -> QueueConfig:
        """The configuration of queue ``index``."""
        if not 0 <= index < len(self.queue_configs):
            raise InvalidQueueIndex(f"{self.name}: no queue {index} "
                                    f"(the device has {len(self.queue_configs)})")
        return self.queue_configs[index]

    def configure_queue(self, index: int, *, size: int | None = None, desc: int | None = None,
                        avail: int | None = None, used: int | None = None,
                        enabled: bool | None = None) -> QueueConfig:
        """The driver sets fields of queue ``index``; each ``None`` keeps its value.

        Raises :class:`~vqcore.errors.LayoutError` for a size above the queue's maximum
        or one the ring layout does not allow (a split ring's size is a power of two; a
        packed ring's, once VIRTIO_F_RING_PACKED was negotiated, any number from 1),
        :class:`~pyvirtio.status.DeviceStateError` once the queue runs (after DRIVER_OK
        it must be reset first).
        """
        qc = self.queue_config(index)
        if self.queues[index] is not None:
            raise DeviceStateError(f"{self.name}: queue {index} is running; reset first")
        if size is not None:
            self.check_ring_size(size)
            if size > qc.max_size:
                raise LayoutError(f"{self.name}: queue {index} size {size} exceeds its "
                                  f"maximum {qc.max_size}")
        for field, value in (("desc", desc), ("avail", avail), ("used", used)):
            if value is not None and not 0 <= value < 1 << 64:
                raise ValueError(f"{field} address {value:#x} does not fit 64 bits")
        if size is not None:
            qc.size = size
        if desc is not None:
            qc.desc = desc
        if avail is not None:
            qc.avail = avail
        if used is not None:
            qc.used = used
        if enabled is not None:
            qc.enabled = bool(enabled)
        return qc

    def check_ring_size(self, size: int) -> None:
        """Raise :class:`~vqcore.errors.LayoutError` unless ``size`` suits the ring
        layout of the negotiated features (packed: 1..32768; split: a power of two)."""
        if self.packed:
            vqcore.packed.check_packed_size(size)
        else:
            vqcore.check_queue_size(size)

    @property
    def packed(self) -> bool:
        """Whether the queues are packed rings (VIRTIO_F_RING_PACKED negotiated)."""
        return bool(self._negotiated & Transport.RING_PACKED)

    def queue(self, index: int) -> vqcore.DeviceQueue | None:
        """The running queue ``index``, or None."""
        self.queue_config(index)
        return self.queues[index]

    def activate_queue(self, index: int) -> vqcore.DeviceQueue:
        """Create queue ``index`` from its configuration over :attr:`memory` now.

        DRIVER_OK calls this for every enabled queue; a transport that starts queues one
        by one (vhost-user) calls it directly. Raises
        :class:`~pyvirtio.status.DeviceStateError` without memory,
        :class:`~vqcore.errors.LayoutError` or another :class:`VirtioError` when the
        rings do not fit guest memory.
        """
        qc = self.queue_config(index)
        if self.queues[index] is not None:
            return self.queues[index]
        if self.memory is None:
            raise DeviceStateError(f"{self.name}: queue {index} started without guest memory")
        queue = vqcore.device_queue(self.memory, qc.size, qc.desc, qc.avail, qc.used,
                                    features=self._negotiated, name=f"{self.name}.q{index}")
        self.queues[index] = queue
        return queue

    def deactivate_queue(self, index: int) -> None:
        """Drop running queue ``index`` (its configuration stays)."""
        self.queue_config(index)
        self.queues[index] = None

    def _start(self) -> None:
        for qc in self.queue_configs:
            if not qc.enabled:
                continue
            try:
                self.activate_queue(qc.index)
            except VirtioError as exc:
                self.needs_reset(f"queue {qc.index} cannot start: {exc}")
                return
        self.on_driver_ok()

    # ---- subclass hooks ----------------------------------------------------------------

    def on_features_ok(self, features: int) -> None:
        """Hook: the features about to be accepted; raise
        :class:`~pyvirtio.features.FeatureError` to refuse FEATURES_OK."""

    def on_driver_ok(self) -> None:
        """Hook: the driver set DRIVER_OK and the enabled queues were created."""

    def on_reset(self) -> None:
        """Hook: the device is being reset; stop using the queues (they are dropped,
        and the status cleared, right after)."""

    def __repr__(self) -> str:
        return (f"<{type(self).__name__} {self.name} id={self.device_id} "
                f"status={int(self.status):#04x}>")


__all__ = ["VirtioDevice", "QueueConfig", "Vring", "ConfigAccessError", "InvalidQueueIndex",
           "TRANSPORT_DEPENDENCIES", "SUPPORTED_TRANSPORT"]
