"""One source for every constant the engine and its models share: the C headers.

The kernels' status codes are ``vqcore.Status`` (values from ``enum vq_status``), and
every code maps to the exception class of its kind; the ring flags, the largest queue
and the alignments the models and the control plane use are the engine's own objects."""

from __future__ import annotations

import pytest

import vqcore
from vqcore import model, model_packed, packed, split
from vqcore.errors import QueueBroken, QueueError, RingViolation
from vqcore.status import CODE_TO_EXCEPTION, Status
from pyvirtio.vhost_user import messages


def test_every_failure_code_has_its_exception_class():
    failures = [s for s in Status if s != Status.OK]
    assert set(CODE_TO_EXCEPTION) == set(failures)
    for status, cls in CODE_TO_EXCEPTION.items():
        assert issubclass(cls, QueueError)
        # the header's own test (vq_is_violation) agrees with the class hierarchy:
        # a violation breaks the queue, a caller's error does not
        assert status.violation == issubclass(cls, RingViolation), status
    assert CODE_TO_EXCEPTION[Status.BROKEN] is QueueBroken
    assert [int(s) for s in failures] == list(range(-1, -len(failures) - 1, -1))


@pytest.mark.parametrize("name", ["VIRTQ_DESC_F_NEXT", "VIRTQ_DESC_F_WRITE",
                                  "VIRTQ_DESC_F_INDIRECT", "VIRTQ_USED_F_NO_NOTIFY",
                                  "VIRTQ_AVAIL_F_NO_INTERRUPT", "MAX_QUEUE_SIZE", "DESC_ALIGN"])
def test_split_constants_are_the_engines(name):
    assert getattr(model, name) is getattr(split, name)


@pytest.mark.parametrize("name", ["VIRTQ_DESC_F_AVAIL", "VIRTQ_DESC_F_USED",
                                  "RING_EVENT_FLAGS_ENABLE", "RING_EVENT_FLAGS_DISABLE",
                                  "RING_EVENT_FLAGS_DESC", "MAX_QUEUE_SIZE", "EVENT_ALIGN"])
def test_packed_constants_are_the_engines(name):
    assert getattr(model_packed, name) is getattr(packed, name)


def test_the_spec_values():
    """The values themselves, as VIRTIO 1.2 sections 2.7 and 2.8 give them."""
    assert (split.VIRTQ_DESC_F_NEXT, split.VIRTQ_DESC_F_WRITE,
            split.VIRTQ_DESC_F_INDIRECT) == (1, 2, 4)
    assert (packed.VIRTQ_DESC_F_AVAIL, packed.VIRTQ_DESC_F_USED) == (1 << 7, 1 << 15)
    assert vqcore.MAX_QUEUE_SIZE == messages.MAX_QUEUE_SIZE == 32768


def test_model_errors_carry_the_engines_status():
    """A model raises with a Status member, so its codes compare with the engine's."""
    import numpy as np
    mem = vqcore.GuestMemory([(0, np.zeros(1 << 16, np.uint8))])
    q = model.SplitDeviceQueue(mem, 8, *split.split_addresses(0x1000, 8)[:3])
    mem.write(0x1000 + 8 * 16 + 2, (99).to_bytes(2, "little"))       # avail->idx far ahead
    with pytest.raises(RingViolation) as info:
        q.pop(model.ChainBatch(8))
    assert info.value.code is Status.AVAIL_IDX
