"""The device status machine (pyvirtio.status): every legal and illegal driver write."""

from __future__ import annotations

import logging

import pytest

from vqcore.errors import VirtioError

from pyvirtio.status import (DeviceStateError, DeviceStatus, StatusMachine,
                             StatusTransitionError, status_names)

S = DeviceStatus
A, D, F, O = S.ACKNOWLEDGE, S.DRIVER, S.FEATURES_OK, S.DRIVER_OK
FAILED, NEEDS_RESET = S.FAILED, S.DEVICE_NEEDS_RESET


def machine_at(status: int, *, accept: bool = True) -> StatusMachine:
    """A machine brought to ``status`` (driver bits and maybe FAILED / NEEDS_RESET) by
    legal writes, one step at a time."""
    m = StatusMachine(accept_features=lambda: accept)
    value = 0
    for step in (A, D, F, O):
        if not status & step:
            break
        if step == F:
            m.driver_features_written()
        value |= step
        assert m.write(value) == value
    if status & FAILED:
        m.write(value | FAILED)
    if status & NEEDS_RESET:
        assert m.set_needs_reset()
    assert m.value == status
    return m


def test_spec_values():
    assert (int(A), int(D), int(O), int(F), int(NEEDS_RESET), int(FAILED)) == \
        (1, 2, 4, 8, 64, 128)


def test_full_sequence():
    m = StatusMachine()
    assert m.value == 0
    assert m.write(A) == A
    assert m.write(A | D) == A | D
    m.driver_features_written()
    assert m.features_written
    assert m.write(A | D | F) == A | D | F
    assert m.write(A | D | F | O) == A | D | F | O
    assert m.write(0) == 0
    assert not m.features_written


def test_two_steps_in_one_write_without_a_gap():
    m = StatusMachine()
    assert m.write(A | D) == A | D


def test_same_value_again_is_harmless():
    m = machine_at(A | D | F)
    assert m.write(A | D | F) == A | D | F


@pytest.mark.parametrize("state", [0, A, A | D, A | D | F, A | D | F | O])
def test_failed_any_time(state):
    m = machine_at(state)
    assert m.write(int(state) | FAILED) == state | FAILED
    assert m.write(int(state) | FAILED) == state | FAILED    # rewriting is fine
    assert m.write(0) == 0


@pytest.mark.parametrize("state", [A, A | D, A | D | F, A | D | F | O, A | D | FAILED,
                                   A | D | F | O | NEEDS_RESET])
def test_reset_from_anywhere(state):
    m = machine_at(state)
    assert m.write(0) == 0
    assert m.value == 0
    assert m.write(A) == A


# ---- illegal writes, one by one -----------------------------------------------------------

ILLEGAL = [
    # (state, written value, words expected in the message)
    (0, D, "DRIVER set before VIRTIO_CONFIG_S_ACKNOWLEDGE"),
    (0, F, "skipped"),
    (0, O, "skipped"),
    (0, A | F, "FEATURES_OK set before VIRTIO_CONFIG_S_DRIVER"),
    (A, A | F, "skipped"),
    (A, A | O, "skipped"),
    (A, A | D | O, "DRIVER_OK set before VIRTIO_CONFIG_S_FEATURES_OK"),
    (A | D, A | D | O, "DRIVER_OK set before VIRTIO_CONFIG_S_FEATURES_OK"),
    (A | D, A | D | F | O, "in one write"),
    (A | D, A | D | F, "before the driver wrote its feature bits"),
    (A | D, A, "DRIVER cleared without a reset"),
    (A | D | F, A | D, "FEATURES_OK cleared"),
    (A | D | F, A | F, "DRIVER cleared"),
    (A | D | F | O, A | D | F, "DRIVER_OK cleared"),
    (A | D | F | O, D | F | O, "ACKNOWLEDGE cleared"),
    (A | D | FAILED, A | D, "FAILED cleared"),
    (A | FAILED, A | D | FAILED, "only a reset"),
    (A | D | F | FAILED, A | D | F | O | FAILED, "only a reset"),
    (0, 0x10, "undefined bits 0x10"),
    (A, A | 0x20, "undefined bits 0x20"),
    (A, 0x100, "one byte"),
    (A, -1, "one byte"),
    (A, A | NEEDS_RESET, "set only by the device"),
]


@pytest.mark.parametrize("state,value,words", ILLEGAL,
                         ids=[f"{status_names(s)}->{v:#x}" for s, v, _ in ILLEGAL])
def test_illegal_write(state, value, words):
    m = machine_at(state)
    if state == A | D and value == A | D | F | O:
        m.driver_features_written()
    with pytest.raises(StatusTransitionError) as info:
        m.write(int(value))
    assert words in str(info.value)
    assert m.value == state            # nothing changed
    assert info.value.old == state
    assert info.value.new == value


def test_error_classes():
    assert issubclass(StatusTransitionError, VirtioError)
    assert issubclass(StatusTransitionError, ValueError)
    assert issubclass(DeviceStateError, VirtioError)
    assert issubclass(DeviceStateError, RuntimeError)


def test_message_names_both_values():
    m = machine_at(A | D)
    with pytest.raises(StatusTransitionError) as info:
        m.write(int(A))
    assert str(info.value).startswith(
        "illegal status write 0x01 (ACKNOWLEDGE) over 0x03 (ACKNOWLEDGE|DRIVER)")


# ---- FEATURES_OK: the driver's feature write and the device's answer ----------------------

def test_features_writable_only_between_driver_and_features_ok():
    m = StatusMachine()
    with pytest.raises(DeviceStateError, match="before VIRTIO_CONFIG_S_DRIVER"):
        m.driver_features_written()
    m.write(A)
    with pytest.raises(DeviceStateError):
        m.driver_features_written()
    m.write(A | D)
    m.driver_features_written()
    m.driver_features_written()        # rewriting before FEATURES_OK is allowed
    m.write(A | D | F)
    with pytest.raises(DeviceStateError, match="after VIRTIO_CONFIG_S_FEATURES_OK"):
        m.driver_features_written()


def test_features_not_writable_after_failed():
    m = machine_at(A | D | FAILED)
    with pytest.raises(DeviceStateError, match="FAILED"):
        m.check_features_writable()


def test_device_refuses_features_ok(caplog):
    answers = [False, True]
    calls = []

    def accept() -> bool:
        calls.append(1)
        return answers[len(calls) - 1]

    m = StatusMachine(accept_features=accept, name="dev0")
    m.write(A)
    m.write(A | D)
    m.driver_features_written()
    with caplog.at_level(logging.INFO, logger="pyvirtio.status"):
        assert m.write(A | D | F) == A | D        # the driver reads it back unset
    assert "dev0: device refused VIRTIO_CONFIG_S_FEATURES_OK" in caplog.text
    assert m.features_refused == 1
    # DRIVER_OK now would skip FEATURES_OK
    with pytest.raises(StatusTransitionError):
        m.write(A | D | O)
    # the driver may try again (e.g. after writing other features): now accepted
    m.driver_features_written()
    assert m.write(A | D | F) == A | D | F
    assert len(calls) == 2


def test_refused_then_failed():
    m = StatusMachine(accept_features=lambda: False)
    m.write(A | D)
    m.driver_features_written()
    assert m.write(A | D | F) == A | D
    assert m.write(A | D | FAILED) == A | D | FAILED


def test_accept_not_called_when_features_ok_already_set():
    calls = []
    m = StatusMachine(accept_features=lambda: calls.append(1) or True)
    m.write(A | D)
    m.driver_features_written()
    m.write(A | D | F)
    m.write(A | D | F)
    m.write(A | D | F | O)
    assert len(calls) == 1


# ---- DEVICE_NEEDS_RESET -----------------------------------------------------------------

def test_needs_reset_set_by_device():
    m = machine_at(A | D | F | O)
    assert m.set_needs_reset() is True
    assert m.value == A | D | F | O | NEEDS_RESET
    assert m.set_needs_reset() is False
    # a read-modify-write driver keeps it; one that read before it was set drops it:
    # either way it stays set
    assert m.write(A | D | F | O | NEEDS_RESET) == A | D | F | O | NEEDS_RESET
    assert m.write(A | D | F | O) == A | D | F | O | NEEDS_RESET
    assert m.write(A | D | F | O | FAILED) == A | D | F | O | FAILED | NEEDS_RESET
    assert m.write(0) == 0


def test_needs_reset_before_driver_ok():
    m = machine_at(A)
    m.set_needs_reset()
    assert m.write(A | D) == A | D | NEEDS_RESET


# ---- every write from every reachable state ------------------------------------------------

PREFIXES = {0, int(A), int(A | D), int(A | D | F), int(A | D | F | O)}


def expected_legal(old: int, new: int, features_written: bool) -> bool:
    """The rules of the module docstring, stated over sets of states."""
    if new == 0:
        return True
    if new & 0x30:
        return False
    if new & 64 and not old & 64:
        return False
    driver_old, driver_new = old & 0x8F, new & 0x8F
    if driver_old & ~driver_new:
        return False
    added = driver_new & ~driver_old
    if not added:
        return True
    if old & 128:
        return False
    if driver_new & 0x0F not in PREFIXES:
        return False
    if added & 8 and added & 4:
        return False
    if added & 8 and not features_written:
        return False
    return True


REACHABLE = [0, A, A | D, A | D | F, A | D | F | O, FAILED, A | FAILED, A | D | FAILED,
             A | D | F | FAILED, A | D | F | O | FAILED, A | D | NEEDS_RESET,
             A | D | F | O | NEEDS_RESET, A | D | F | O | FAILED | NEEDS_RESET]


@pytest.mark.parametrize("state", REACHABLE, ids=status_names)
@pytest.mark.parametrize("written", [False, True], ids=["nofeat", "feat"])
def test_every_byte_from_every_state(state, written):
    accepted = illegal = 0
    for value in range(256):
        m = machine_at(state)
        if written and m.value & D and not m.value & (F | FAILED):
            m.driver_features_written()
        legal = expected_legal(int(state), value, m.features_written)
        try:
            new = m.write(value)
        except StatusTransitionError:
            assert not legal, f"{value:#04x} refused from {status_names(state)}"
            assert m.value == state
            illegal += 1
            continue
        assert legal, f"{value:#04x} accepted from {status_names(state)}"
        accepted += 1
        if value == 0:
            assert new == 0
        else:
            assert new == (value & ~64) | (int(state) & 64)
    assert accepted and illegal
