"""The driver's half of device initialisation (VIRTIO 1.2 section 3.1.1), for drivers
that reach a :class:`~pyvirtio.device.VirtioDevice` in process (the guests of the tests
and of the benchmarks, :class:`pyvirtio.net.driver.NetDriver` and
:class:`pyvirtio.rng.driver.RngDriver`): the status steps around the feature
negotiation, and DRIVER_OK once the driver set its queues up."""

from __future__ import annotations

from pyvirtio.status import DeviceStatus

S = DeviceStatus


def negotiate(device, features: int | None, error: type[Exception]) -> int:
    """ACKNOWLEDGE, DRIVER, accept ``features`` (default: all the device offers; bits
    it does not offer are dropped), FEATURES_OK. Returns the negotiated features;
    raises ``error`` when the device refuses them."""
    device.write_status(S.ACKNOWLEDGE)
    device.write_status(S.ACKNOWLEDGE | S.DRIVER)
    want = device.device_features if features is None else int(features)
    device.write_driver_features(want & device.device_features)
    if not device.write_status(S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK) & S.FEATURES_OK:
        raise error(f"device refused the features: {device.negotiation_error}")
    return device.negotiated_features


def driver_ok(device, error: type[Exception]) -> None:
    """Set DRIVER_OK (the queues are configured); raises ``error`` when the device then
    needs a reset (a queue it could not start)."""
    st = device.write_status(S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK | S.DRIVER_OK)
    if st & S.DEVICE_NEEDS_RESET:
        raise error(f"device needs reset: {device.needs_reset_reason}")


__all__ = ["negotiate", "driver_ok"]
