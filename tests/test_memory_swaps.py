"""Guest memory that cannot be unmapped under a batch (issue 14, item 3).

A queue and every ChainBatch a device popped into hold the :class:`vqcore.GuestMemory`
they point into (it stays attached), and the vhost-user back-end never unmaps by force:
a mapping goes when its last user does. The proof: 1,000 memory-table swaps while a
front-end streams frames both ways through a loopback back-end (every frame sent comes
back, in order), the back-end's mappings gone at the end. ``tests/asan.sh`` runs this
file under AddressSanitizer: a ring or a batch touching an unmapped region would fault.
"""

from __future__ import annotations

import mmap
import os
import random
import threading

import numpy as np
import pytest

from pyvirtio.net.frontend import DEFAULT_PROTOCOL_FEATURES, VhostUserNetFrontend
from pyvirtio.vhost_user.memfd import SharedGuestMemory
from pyvirtio.vhost_user.messages import (MemRegion, MemTable, ProtocolFeature, Request,
                                          SingleMemRegion)
from vhost_user_peer import serving, wait_for
from vqcore import ChainBatch, GuestMemory, SplitDeviceQueue, split_addresses
from vqcore.errors import MemoryRegionError

SWAPS = int(os.environ.get("VQ_SWAPS", "1000"))
FRAME = 64


def memfd_maps(name: str) -> int:
    """Mappings of memfd ``name`` in this process."""
    with open("/proc/self/maps") as f:
        return sum(1 for line in f if f"/memfd:{name} " in line)


def test_a_batch_keeps_its_memory_mapped():
    """A device pop attaches the batch to the queue's memory: while the batch lives the
    memory cannot be closed (its regions cannot go), and a release lets it go."""
    mem = GuestMemory([(0, np.zeros(1 << 20, np.uint8))])
    ring = split_addresses(0x1000, 16)
    dev = SplitDeviceQueue(mem, 16, *ring[:3])
    batch = ChainBatch(16)
    assert batch.memory is None
    dev.pop(batch)
    assert batch.memory is mem and mem.attached == 2        # the queue and the batch
    del dev
    assert mem.attached == 1
    with pytest.raises(MemoryRegionError, match="in use"):
        mem.close()
    batch.release()
    assert batch.memory is None and mem.attached == 0
    mem.close()


def test_a_batch_moves_to_the_memory_of_its_next_pop():
    mems = [GuestMemory([(0, np.zeros(1 << 20, np.uint8))]) for _ in range(2)]
    ring = split_addresses(0x1000, 16)
    devs = [SplitDeviceQueue(m, 16, *ring[:3]) for m in mems]
    batch = ChainBatch(16)
    devs[0].pop(batch)
    devs[1].pop(batch)
    assert [m.attached for m in mems] == [1, 2]
    del batch
    assert [m.attached for m in mems] == [1, 1]


@pytest.mark.slow
def test_memory_table_swaps_while_frames_stream(tmp_path):
    """SWAPS swaps of the back-end's memory table while the front-end streams: full
    SET_MEM_TABLEs of one or two regions, and ADD_MEM_REG/REM_MEM_REG of the second
    (memory slots), each one moving the running rings to a new mapping and releasing
    the old one. Every frame the front-end sent comes back, in order, with its bytes;
    at the end the back-end holds no mapping of either region."""
    shared = SharedGuestMemory(16 << 20, name="vu-swap-a")
    extra_fd = os.memfd_create("vu-swap-b", os.MFD_CLOEXEC)
    os.ftruncate(extra_fd, 1 << 20)
    extra_mm = mmap.mmap(extra_fd, 1 << 20)
    extra_uva = int(np.frombuffer(extra_mm, np.uint8).ctypes.data)
    extra = MemRegion(shared.gpa + (1 << 30), 1 << 20, extra_uva, 0)
    before = memfd_maps("vu-swap-a"), memfd_maps("vu-swap-b")
    fe = VhostUserNetFrontend(memory=shared, queue_size=256, tx_buffer=2048, name="swap",
                              protocol_features=int(DEFAULT_PROTOCOL_FEATURES
                                                    | ProtocolFeature.CONFIGURE_MEM_SLOTS))
    rng = random.Random(14)
    errors: list[BaseException] = []
    done = threading.Event()
    swaps = 0

    def swapper() -> None:
        nonlocal swaps
        has_extra = False
        try:
            for _ in range(SWAPS):
                roll = rng.random()
                if roll < 0.4:                            # a whole new table
                    has_extra = rng.random() < 0.5
                    regions = shared.table().regions + ([extra] if has_extra else [])
                    fds = [shared.fd] + ([extra_fd] if has_extra else [])
                    fe.request(Request.SET_MEM_TABLE, MemTable(regions).pack(), fds)
                elif not has_extra:
                    fe.request(Request.ADD_MEM_REG, SingleMemRegion(extra).pack(), [extra_fd])
                    has_extra = True
                else:
                    fe.request(Request.REM_MEM_REG, SingleMemRegion(extra).pack())
                    has_extra = False
                swaps += 1
        except BaseException as exc:                     # noqa: BLE001 (reported below)
            errors.append(exc)
        finally:
            done.set()

    with serving(tmp_path, "loopback") as s:
        try:
            fe.connect(s.path)
            fe.start()
            thread = threading.Thread(target=swapper, name="swapper")
            thread.start()
            sent = received = 0
            while not done.is_set() or received < sent:
                if not done.is_set():
                    seq = np.arange(sent, sent + 32, dtype=np.uint32)
                    frames = np.zeros((32, FRAME), np.uint8)
                    frames[:, :6] = 0xFF
                    frames[:, 12:14] = (0x88, 0xB5)
                    frames[:, 14:18] = seq.view(np.uint8).reshape(32, 4)
                    frames[:, 18:] = (seq[:, None] + np.arange(FRAME - 18)).astype(np.uint8)
                    sent += fe.send_array(0, frames)
                got = fe.recv_array(0, timeout=0.2)
                for i in range(len(got)):
                    n = int(np.frombuffer(got.data[i, 14:18].tobytes(), np.uint32)[0])
                    assert n == received, f"frame {n} came where {received} was due"
                    expect = (np.arange(FRAME - 18) + n).astype(np.uint8)
                    assert np.array_equal(got.data[i, 18:FRAME], expect)
                    received += 1
            thread.join(30)
            assert not errors, errors
            assert swaps == SWAPS and received == sent and sent > 0
            assert not s.handler.needs_reset_reason
        finally:
            fe.close()
        wait_for(lambda: s.port.handler is None)
        assert (memfd_maps("vu-swap-a"), memfd_maps("vu-swap-b")) == before   # ours alone
    del extra_mm
    os.close(extra_fd)
    print(f"{swaps} swaps, {sent} frames each way")
