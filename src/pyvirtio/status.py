"""The device status field (VIRTIO 1.2 section 2.1) and the order the driver sets it in.

The driver initialises a device by setting status bits one step at a time (section
3.1.1): ACKNOWLEDGE, then DRIVER, then (after writing its feature bits) FEATURES_OK,
which it reads back to learn whether the device accepted the features, then DRIVER_OK.
FAILED may be set at any time; writing 0 resets the device. DEVICE_NEEDS_RESET belongs to
the device, which sets it when it cannot continue.

:class:`StatusMachine` holds the status byte and checks every driver write against that
order. A write that breaks it raises :class:`StatusTransitionError` and leaves the status
unchanged. Choices where the spec leaves room:

* several steps in one write are accepted as long as none is skipped (``ACKNOWLEDGE |
  DRIVER`` from 0), except FEATURES_OK together with DRIVER_OK: the driver must read
  FEATURES_OK back before it sets DRIVER_OK (step 6 of section 3.1.1);
* DRIVER_OK without FEATURES_OK is refused (that is the legacy sequence; legacy devices
  are out of scope);
* FEATURES_OK needs the driver's feature write first
  (:meth:`StatusMachine.driver_features_written`); every real driver writes the feature
  register, and a transport whose "no write" means "no features" calls that method
  itself;
* after FAILED only a reset is accepted (rewriting the same value is harmless);
* a write that clears DEVICE_NEEDS_RESET is not an error (a driver doing read-modify-write
  may have read the status before the device set the bit); the bit stays set. A write
  that sets it while the device has not is an error.

The device refuses FEATURES_OK through the ``accept_features`` callback: when it returns
False the bit is simply not set, and the driver reads it back unset (section 3.1.1 step 6).
"""

from __future__ import annotations

import enum
import logging
from typing import Callable

from vqcore.errors import VirtioError

log = logging.getLogger(__name__)


class DeviceStatus(enum.IntFlag):
    """Bits of the device status field (spec 2.1), as ``VIRTIO_CONFIG_S_<name>``."""
    ACKNOWLEDGE = 1
    DRIVER = 2
    DRIVER_OK = 4
    FEATURES_OK = 8
    DEVICE_NEEDS_RESET = 64
    FAILED = 128


class StatusTransitionError(VirtioError, ValueError):
    """The driver wrote a status value the spec's initialisation order does not allow."""

    def __init__(self, old: int, new: int, reason: str) -> None:
        self.old = DeviceStatus(old)
        self.new = new
        self.reason = reason
        super().__init__(f"illegal status write {new:#04x} ({status_names(new)}) over "
                         f"{old:#04x} ({status_names(old)}): {reason}")


class DeviceStateError(VirtioError, RuntimeError):
    """An operation the device's current status does not allow."""


#: the driver's initialisation steps, in order
STEPS: tuple[DeviceStatus, ...] = (DeviceStatus.ACKNOWLEDGE, DeviceStatus.DRIVER,
                                   DeviceStatus.FEATURES_OK, DeviceStatus.DRIVER_OK)
#: bits the driver sets
DRIVER_BITS = (DeviceStatus.ACKNOWLEDGE | DeviceStatus.DRIVER | DeviceStatus.FEATURES_OK
               | DeviceStatus.DRIVER_OK | DeviceStatus.FAILED)
#: every defined bit
KNOWN_BITS = DRIVER_BITS | DeviceStatus.DEVICE_NEEDS_RESET


def spec_name(bit: DeviceStatus) -> str:
    """``VIRTIO_CONFIG_S_DRIVER_OK``, ... for one status bit."""
    return f"VIRTIO_CONFIG_S_{bit.name}"


def status_names(value: int) -> str:
    """The bits of a status value by name (``ACKNOWLEDGE|DRIVER``), ``0`` for none."""
    names = [bit.name or "" for bit in DeviceStatus if value & bit]
    unknown = value & ~int(KNOWN_BITS)
    if unknown:
        names.append(f"{unknown:#x}")
    return "|".join(names) or "0"


class StatusMachine:
    """The device status byte, written by the driver in the spec's order.

    ``accept_features`` is called when the driver sets FEATURES_OK; returning False
    refuses it (the bit stays clear). ``name`` prefixes log messages.
    """

    def __init__(self, *, accept_features: Callable[[], bool] | None = None,
                 name: str = "") -> None:
        self._status = DeviceStatus(0)
        self._accept_features = accept_features
        self._features_written = False
        self.name = name or "device"
        #: how many times the device refused FEATURES_OK since the last reset
        self.features_refused = 0

    @property
    def value(self) -> DeviceStatus:
        """The status as the driver reads it."""
        return self._status

    def __int__(self) -> int:
        return int(self._status)

    def __repr__(self) -> str:
        return f"<StatusMachine {self.name} {status_names(self._status)}>"

    @property
    def features_written(self) -> bool:
        """Whether the driver wrote its feature bits since the last reset."""
        return self._features_written

    def check_features_writable(self) -> None:
        """Raise :class:`DeviceStateError` unless the driver may write its features now:
        after DRIVER and before FEATURES_OK (section 3.1.1 step 4)."""
        if self._status & DeviceStatus.FAILED:
            raise DeviceStateError(f"{self.name}: the driver set FAILED; reset first")
        if not self._status & DeviceStatus.DRIVER:
            raise DeviceStateError(f"{self.name}: driver features written before "
                                   f"{spec_name(DeviceStatus.DRIVER)}")
        if self._status & DeviceStatus.FEATURES_OK:
            raise DeviceStateError(f"{self.name}: driver features written after "
                                   f"{spec_name(DeviceStatus.FEATURES_OK)}")

    def driver_features_written(self) -> None:
        """Record that the driver wrote its feature bits (checked as above)."""
        self.check_features_writable()
        self._features_written = True

    def reset(self) -> None:
        """Back to 0 (the driver wrote 0, or the device was reset)."""
        self._status = DeviceStatus(0)
        self._features_written = False
        self.features_refused = 0

    def clear_needs_reset(self) -> None:
        """Take DEVICE_NEEDS_RESET away again (the transport's driver dealt with it)."""
        self._status &= ~DeviceStatus.DEVICE_NEEDS_RESET

    def set_needs_reset(self) -> bool:
        """The device sets DEVICE_NEEDS_RESET; True if it was not set before."""
        if self._status & DeviceStatus.DEVICE_NEEDS_RESET:
            return False
        self._status |= DeviceStatus.DEVICE_NEEDS_RESET
        return True

    def write(self, value: int) -> DeviceStatus:
        """Apply the driver's write of the status byte; returns the new status.

        Raises :class:`StatusTransitionError` (status unchanged) for a write the spec's
        order forbids. Writing 0 resets.
        """
        old = self._status
        if not isinstance(value, int) or not 0 <= value <= 0xFF:
            raise StatusTransitionError(old, value if isinstance(value, int) else -1,
                                        "the status field is one byte")
        if value & ~int(KNOWN_BITS):
            raise StatusTransitionError(old, value, f"undefined bits {value & ~int(KNOWN_BITS):#x}")
        if value == 0:
            self.reset()
            return self._status
        needs_reset = DeviceStatus.DEVICE_NEEDS_RESET
        if value & needs_reset and not old & needs_reset:
            raise StatusTransitionError(old, value, f"{spec_name(needs_reset)} is set only "
                                        "by the device")
        new_bits = DeviceStatus(value) & DRIVER_BITS
        old_bits = old & DRIVER_BITS
        cleared = old_bits & ~new_bits
        if cleared:
            raise StatusTransitionError(old, value, f"{status_names(cleared)} cleared "
                                        "without a reset (write 0 to reset)")
        added = new_bits & ~old_bits
        if not added:
            return old
        if old & DeviceStatus.FAILED:
            raise StatusTransitionError(old, value, "the driver set FAILED; only a reset "
                                        "(0) is allowed now")
        seen_gap: DeviceStatus | None = None
        for step in STEPS:
            if not new_bits & step:
                seen_gap = seen_gap or step
            elif seen_gap is not None:
                raise StatusTransitionError(old, value, f"{spec_name(step)} set before "
                                            f"{spec_name(seen_gap)} (a step skipped)")
        if added & DeviceStatus.FEATURES_OK and added & DeviceStatus.DRIVER_OK:
            raise StatusTransitionError(old, value, "FEATURES_OK and DRIVER_OK in one write: "
                                        "the driver must read FEATURES_OK back first")
        if added & DeviceStatus.FEATURES_OK:
            if not self._features_written:
                raise StatusTransitionError(old, value, "FEATURES_OK set before the driver "
                                            "wrote its feature bits")
            if self._accept_features is not None and not self._accept_features():
                new_bits &= ~DeviceStatus.FEATURES_OK
                self.features_refused += 1
                log.info("%s: device refused %s", self.name,
                         spec_name(DeviceStatus.FEATURES_OK))
        self._status = new_bits | (old & needs_reset)
        return self._status


__all__ = ["DeviceStatus", "StatusMachine", "StatusTransitionError", "DeviceStateError",
           "STEPS", "DRIVER_BITS", "KNOWN_BITS", "spec_name", "status_names"]
