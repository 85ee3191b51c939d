"""Driver and device in two processes over a shared memfd: a million buffers.

The test process is the driver: it creates the guest memory on a memfd
(``os.memfd_create`` + ``mmap``), the ring in it (``SplitDriverQueue``, event idx on) and
two eventfds (kick: driver -> device, call: device -> driver). The device is a child
process forked with multiprocessing's "fork" context (so it starts without importing
and possibly rebuilding vqcore again); it inherits the three fds, maps the memfd itself
and runs :func:`device_main`. The test runs for both ring layouts, split and packed
(VIRTIO_F_RING_PACKED: both sides build their queue from the feature bits with
``vqcore.driver_queue`` / ``device_queue``). Every chain carries a 64-bit sequence
number (readable) and an 8-byte reply slot (writable): the device checks that each
popped batch continues the sequence and writes back ``seq * K + 1``; the driver checks
tokens, used lengths and replies. Each side sleeps on its eventfd only after the
race-free re-check; a side that sleeps through a wait timeout while work is waiting
reports a lost wakeup, and the whole exchange has a hard deadline (the child is killed
and reaped if it overruns). The child must exit with status 0 and leave no zombie.
"""

import itertools
import mmap
import multiprocessing
import os
import select
import tempfile
import time

import numpy as np
import pytest

from conftest import LAYOUTS, ring_features, ring_index, used_waiting
from vqcore import (ChainBatch, GuestMemory, device_queue, driver_queue, ring_addresses,
                    split_addresses)

N_BUFFERS = 1_000_000
SIZE = 1024                  # ring size; chains of 2 descriptors -> up to 512 in flight
ADD_BATCHES = (256, 64, 200, 128)
POP_BATCH = 192
RECLAIM_BATCH = 160
NSLOTS = 2048                # 16-byte data slots (seq, reply), indexed by seq % NSLOTS
K = np.uint64(0x9E3779B97F4A7C15)
GPA_BASE = 0x1_0000_0000     # guest memory above 4 GiB
DEADLINE = 120.0             # seconds for the whole exchange
WAIT = 5.0                   # one eventfd sleep; sleeping through it with work waiting
                             # is a lost wakeup

ADDRS = split_addresses(GPA_BASE, SIZE)       # the larger layout: a packed ring fits too
DATA_GPA = (ADDRS.end + 4095) // 4096 * 4096
MEM_SIZE = DATA_GPA - GPA_BASE + 16 * NSLOTS

EXIT_OK, EXIT_CHECK, EXIT_LOST_WAKEUP, EXIT_DEADLINE, EXIT_ORPHAN, EXIT_ERROR = range(6)


class Failure(Exception):
    def __init__(self, status, msg):
        super().__init__(msg)
        self.status = status


def map_guest(memfd):
    """Map the shared memfd and build GuestMemory, slot view and used->idx view."""
    mm = mmap.mmap(memfd, MEM_SIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    mem = GuestMemory([(GPA_BASE, mm)])
    slots = mem.array(DATA_GPA, 2 * NSLOTS, "<u8")
    used_idx = mem.array(ADDRS.used + 2, 1, "<u2")
    return mm, mem, slots, used_idx


def sleep_on(fd, deadline, who, work_waiting, alive=lambda: True):
    """Sleep on an eventfd after the caller's re-check; raise on a lost wakeup,
    the deadline, or the other side gone."""
    while True:
        if time.monotonic() > deadline:
            raise Failure(EXIT_DEADLINE, f"{who}: deadline passed")
        r, _, _ = select.select([fd], [], [], WAIT)
        if r:
            os.eventfd_read(fd)
            return
        if work_waiting():
            raise Failure(EXIT_LOST_WAKEUP, f"{who}: lost wakeup (slept {WAIT} s with work waiting)")
        if not alive():
            raise Failure(EXIT_ORPHAN, f"{who}: the other side is gone")


# ---- the device (child process) ---------------------------------------------------------

def device_main(memfd, kick_fd, call_fd, n_buffers, parent_pid, report, layout="split"):
    """Run in the child: serve ``n_buffers`` chains; return the exit status. One line
    of report (or the error) goes to the file ``report``."""
    deadline = time.monotonic() + DEADLINE
    try:
        mm, mem, slots, _ = map_guest(memfd)   # our own mapping of the shared memfd
        os.close(memfd)                        # the mapping keeps the memory
        features = ring_features(layout, event_idx=True)
        dev = device_queue(mem, SIZE, *ring_addresses(GPA_BASE, SIZE, features)[:3],
                           features=features, name="child-device")
        pb = ChainBatch(POP_BATCH)
        base = np.uint64(DATA_GPA)
        expected = 0
        sleeps = calls = 0
        while expected < n_buffers:
            n = dev.pop(pb)
            if n:
                if not ((pb.readable_segments == 1).all() and (pb.seg_len == 8).all()
                        and (pb.writable_bytes == 8).all()):
                    raise Failure(EXIT_CHECK, "device: unexpected segments")
                seqs = slots[(pb.seg_addr[0::2] - base) // np.uint64(8)]
                if not np.array_equal(seqs, np.arange(expected, expected + n, dtype=np.uint64)):
                    raise Failure(EXIT_CHECK, f"device: sequence {seqs[:4]}.. expected from {expected}")
                slots[(pb.seg_addr[1::2] - base) // np.uint64(8)] = seqs * K + np.uint64(1)
                pb.used_len[:] = 8
                dev.push_used(pb)
                expected += n
                if dev.needs_notification():
                    os.eventfd_write(call_fd, 1)
                    calls += 1
                continue
            if dev.enable_notification():      # race-free: re-check before sleeping
                dev.disable_notification()
                continue
            sleeps += 1
            sleep_on(kick_fd, deadline, "device", lambda: dev.pending() > 0,
                     alive=lambda: os.getppid() == parent_pid)
            dev.disable_notification()
        if dev.in_flight or dev.pending():
            raise Failure(EXIT_CHECK, "device: chains left over at the end")
        end = ring_index(layout, SIZE, n_buffers, 2 * n_buffers)    # 2 descriptors a chain
        if dev.next_avail != end or dev.next_used != end:
            raise Failure(EXIT_CHECK, f"device: indices {dev.next_avail}/{dev.next_used}")
        print(f"device: served {expected}, slept {sleeps}, calls {calls}", file=report)
        return EXIT_OK
    except Failure as exc:
        print(exc, file=report)
        return exc.status
    except Exception as exc:
        print(f"device: {exc!r}", file=report)
        return EXIT_ERROR


def _child(memfd, kick_fd, call_fd, n_buffers, parent_pid, report_fd, layout):
    """The forked child's entry: its exit status is device_main's result."""
    with open(report_fd, "w", closefd=False) as report:
        status = device_main(memfd, kick_fd, call_fd, n_buffers, parent_pid, report, layout)
    raise SystemExit(status)


# ---- the driver (this process) ----------------------------------------------------------

def run_driver(drv, slots, mem, kick_fd, call_fd, child, deadline):
    most = max(ADD_BATCHES)
    db, rb = ChainBatch(most), ChainBatch(RECLAIM_BATCH)
    seg_len = np.full(2 * most, 8, np.uint64)
    seg_cnt = np.full(most, 2, np.uint32)
    nread = np.ones(most, np.uint32)
    sizes = itertools.cycle(ADD_BATCHES)
    want = next(sizes)
    base = np.uint64(DATA_GPA)
    sent = got = 0
    stats = {"kicks": 0, "sleeps": 0}
    drv.disable_interrupts()                   # active: poll until idle
    while got < N_BUFFERS:
        if time.monotonic() > deadline:
            raise Failure(EXIT_DEADLINE, f"driver: deadline passed at {got} buffers")
        progress = False
        n = min(want, N_BUFFERS - sent, drv.num_free // 2)
        if n > 0:
            want = next(sizes)
            seqs = np.arange(sent, sent + n, dtype=np.uint64)
            k = (seqs % np.uint64(NSLOTS)).astype(np.int64)
            slots[2 * k] = seqs
            slots[2 * k + 1] = 0
            addr = np.empty(2 * n, np.uint64)
            addr[0::2] = base + (k * 16).astype(np.uint64)
            addr[1::2] = addr[0::2] + np.uint64(8)
            db.load(addr, seg_len[:2 * n], seg_cnt[:n], nread[:n], seqs)
            assert drv.add(db) == n
            sent += n
            progress = True
            if drv.kick_needed():
                os.eventfd_write(kick_fd, 1)
                stats["kicks"] += 1
        while (m := drv.reclaim(rb)):
            seqs = rb.tokens
            assert np.array_equal(seqs, np.arange(got, got + m, dtype=np.uint64)), \
                f"reclaimed tokens {seqs[:4]}.. expected from {got}"
            assert (rb.used_len == 8).all()
            k = (seqs % np.uint64(NSLOTS)).astype(np.int64)
            assert np.array_equal(slots[2 * k + 1], seqs * K + np.uint64(1)), \
                f"wrong reply in chains {got}..{got + m}"
            got += m
            progress = True
        if progress:
            continue
        if drv.enable_interrupts():            # race-free: re-check before sleeping
            drv.disable_interrupts()
            continue
        stats["sleeps"] += 1
        sleep_on(call_fd, deadline, "driver", lambda: used_waiting(mem, drv),
                 alive=child.is_alive)
        drv.disable_interrupts()
    return sent, got, stats


@pytest.mark.parametrize("layout", LAYOUTS)
def test_two_processes_memfd_eventfd_million_buffers(layout):
    memfd = os.memfd_create("vqcore-test-guest", os.MFD_CLOEXEC)
    os.ftruncate(memfd, MEM_SIZE)
    kick_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    call_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    mm, mem, slots, _ = map_guest(memfd)
    # the driver sets the ring up (zeroes its headers) before the device starts
    features = ring_features(layout, event_idx=True)
    drv = driver_queue(mem, SIZE, *ring_addresses(GPA_BASE, SIZE, features)[:3],
                       features=features, name="parent-driver")
    deadline = time.monotonic() + DEADLINE
    report = tempfile.TemporaryFile()
    child = multiprocessing.get_context("fork").Process(
        target=_child, name="vq-device", daemon=True,
        args=(memfd, kick_fd, call_fd, N_BUFFERS, os.getpid(), report.fileno(), layout))
    t0 = time.monotonic()
    child.start()
    os.close(memfd)                            # both mappings stay; the fd is not needed
    pid = child.pid
    try:
        try:
            sent, got, stats = run_driver(drv, slots, mem, kick_fd, call_fd, child, deadline)
        except BaseException:
            child.kill()
            raise
        child.join(timeout=max(1.0, deadline - time.monotonic()))
        elapsed = time.monotonic() - t0
        assert not child.is_alive(), "the device process did not exit before the deadline"
        report.seek(0)
        child_report = report.read().decode(errors="replace").strip()
        assert child.exitcode == EXIT_OK, f"device exited with {child.exitcode}: {child_report}"
        assert child_report.startswith(f"device: served {N_BUFFERS},"), child_report
        assert sent == got == N_BUFFERS
        assert drv.num_free == SIZE and drv.in_flight == 0
        assert drv.next_avail == drv.last_used == ring_index(layout, SIZE, N_BUFFERS,
                                                             2 * N_BUFFERS)
        assert stats["kicks"] > 0
        print(f"\n{layout} processes: {N_BUFFERS} buffers in {elapsed:.2f} s "
              f"({elapsed / N_BUFFERS * 1e9:.0f} ns/buffer) driver {stats}; {child_report}")
    finally:
        if child.is_alive():
            child.kill()
        child.join(timeout=10)
        os.close(kick_fd)
        os.close(call_fd)
        report.close()
    # exited and reaped: no zombie left behind
    assert child.exitcode is not None
    try:
        reaped = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        reaped = None
    assert reaped is None, "the device process had not been reaped"
    assert not os.path.exists(f"/proc/{pid}"), "the device process still exists"
