"""Driver and device in two threads over one ring: a million buffers, content checked.

Each side runs in its own thread; the queue calls release the GIL for the ring work, and
Python runs once per batch (64..256 chains), never per buffer. Every chain carries a
64-bit sequence number in a readable segment and has an 8-byte writable segment: the
device checks that the sequence numbers of each popped batch continue the previous one
(nothing lost, duplicated or reordered) and writes back ``seq * K + 1``; the driver
checks the tokens, the used lengths and the replies of every reclaimed batch.

Both ring layouts: split, and packed (VIRTIO_F_RING_PACKED; the queues come from
``vqcore.driver_queue`` / ``device_queue`` and the feature bits, nothing else changes).

Two modes: busy-poll (no notifications at all), and eventfd (``os.eventfd`` for kick and
call, VIRTIO_F_EVENT_IDX on) where a side sleeps in ``select`` on its eventfd only after
the race-free re-check (``enable_notification`` / ``enable_interrupts``) found nothing.
A watchdog fails the test instead of hanging: a side that sleeps through its wait
timeout while work is waiting for it reports a lost wakeup, and the main thread joins
both threads with a deadline.
"""

import itertools
import os
import select
import sys
import threading
import time

import numpy as np
import pytest

from conftest import LAYOUTS, ring_features, ring_index, used_waiting
from vqcore import ChainBatch, GuestMemory, device_queue, driver_queue, ring_addresses

N_BUFFERS = 1_000_000
SIZE = 1024                  # ring size; chains of 2 descriptors -> up to 512 in flight
ADD_BATCHES = (256, 64, 200, 128)   # chains per driver add (cycled) ...
POP_BATCH = 192                     # ... per device pop ...
RECLAIM_BATCH = 160                 # ... per driver reclaim
NSLOTS = 2048                # 16-byte data slots (seq, reply), indexed by seq % NSLOTS
K = np.uint64(0x9E3779B97F4A7C15)
GPA_BASE = 0x8000_0000
DEADLINE = 120.0             # seconds for the whole transfer (a hang fails, not waits)
SPIN = 8                     # busy-poll: empty polls before yielding the GIL ...
IDLE_SLEEP = 20e-6           # ... for this long
WAIT = 5.0                   # one sleep on an eventfd; sleeping through it with work
                             # waiting is reported as a lost wakeup


class Shared:
    """Guest memory holding the ring and the data slots, plus the stop flag."""

    def __init__(self, event_idx, layout="split"):
        features = ring_features(layout, event_idx)
        self.addrs = ring_addresses(GPA_BASE, SIZE, features)
        self.data_gpa = (self.addrs.end + 4095) // 4096 * 4096
        self.buf = np.zeros(self.data_gpa - GPA_BASE + 16 * NSLOTS, np.uint8)
        self.mem = GuestMemory([(GPA_BASE, self.buf)])
        self.slots = self.mem.array(self.data_gpa, 2 * NSLOTS, "<u8")   # [seq, reply] * NSLOTS
        self.drv = driver_queue(self.mem, SIZE, *self.addrs[:3], features=features)
        self.dev = device_queue(self.mem, SIZE, *self.addrs[:3], features=features)
        self.stop = threading.Event()
        self.errors = []
        self.deadline = time.monotonic() + DEADLINE
        self.kick_fd = self.call_fd = None
        self.stats = {"kicks": 0, "calls": 0, "drv_sleeps": 0, "dev_sleeps": 0,
                      "drv_batches": 0, "dev_batches": 0}

    def fail(self, msg):
        self.errors.append(msg)
        self.stop.set()
        for fd in (self.kick_fd, self.call_fd):
            if fd is not None:
                os.eventfd_write(fd, 1)        # wake the other side so it sees `stop`

    def check_time(self, who):
        if time.monotonic() > self.deadline:
            self.fail(f"{who}: deadline of {DEADLINE} s passed")
        return not self.stop.is_set()


def _wait(sh, fd, who, work_waiting):
    """Sleep on an eventfd (after the caller's re-check). Returns False on stop."""
    while sh.check_time(who):
        r, _, _ = select.select([fd], [], [], WAIT)
        if r:
            os.eventfd_read(fd)
            return not sh.stop.is_set()
        if work_waiting():
            sh.fail(f"{who}: lost wakeup (slept {WAIT} s with work waiting)")
            return False
    return False


def _backoff(idle):
    """Busy-poll idle step. Both threads run Python between their nogil calls, and a
    thread that spins on the GIL starves the other one (CPython hands the GIL over
    only after the switch interval): after a few empty polls, yield with a tiny sleep."""
    if idle >= SPIN:
        time.sleep(IDLE_SLEEP)
    return idle + 1


def driver(sh, notify):
    """Send N_BUFFERS chains (seq readable, reply writable) and check every reply."""
    drv = sh.drv
    most = max(ADD_BATCHES)
    db, rb = ChainBatch(most), ChainBatch(RECLAIM_BATCH)
    seg_len = np.full(2 * most, 8, np.uint64)
    seg_cnt = np.full(most, 2, np.uint32)
    nread = np.ones(most, np.uint32)
    sizes = itertools.cycle(ADD_BATCHES)
    want = next(sizes)
    base = np.uint64(sh.data_gpa)
    sent = got = 0
    idle = 0
    if notify:
        drv.disable_interrupts()               # active: we poll until idle
    try:
        while got < N_BUFFERS and sh.check_time("driver"):
            progress = False
            # ---- add as many chains as fit (each 2 descriptors)
            n = min(want, N_BUFFERS - sent, drv.num_free // 2)
            if n > 0:
                want = next(sizes)
                seqs = np.arange(sent, sent + n, dtype=np.uint64)
                k = (seqs % np.uint64(NSLOTS)).astype(np.int64)
                sh.slots[2 * k] = seqs
                sh.slots[2 * k + 1] = 0
                addr = np.empty(2 * n, np.uint64)
                addr[0::2] = base + (k * 16).astype(np.uint64)
                addr[1::2] = addr[0::2] + np.uint64(8)
                db.load(addr, seg_len[:2 * n], seg_cnt[:n], nread[:n], seqs)
                added = drv.add(db)
                if added != n:
                    return sh.fail(f"driver: add took {added} of {n} chains")
                sent += n
                progress = True
                if notify and drv.kick_needed():
                    os.eventfd_write(sh.kick_fd, 1)
                    sh.stats["kicks"] += 1
            # ---- reclaim and check
            while (m := drv.reclaim(rb)):
                seqs = rb.tokens
                if not np.array_equal(seqs, np.arange(got, got + m, dtype=np.uint64)):
                    return sh.fail(f"driver: reclaimed tokens {seqs[:4]}.. expected from {got}")
                if not (rb.used_len == 8).all():
                    return sh.fail("driver: used length is not 8")
                k = (seqs % np.uint64(NSLOTS)).astype(np.int64)
                if not np.array_equal(sh.slots[2 * k + 1], seqs * K + np.uint64(1)):
                    return sh.fail(f"driver: wrong reply in chains {got}..{got + m}")
                got += m
                sh.stats["drv_batches"] += 1
                progress = True
            if progress:
                idle = 0
                continue
            if not notify:
                idle = _backoff(idle)
                continue
            # ---- idle: enable interrupts, re-check, sleep
            if drv.enable_interrupts():
                drv.disable_interrupts()
                continue
            sh.stats["drv_sleeps"] += 1
            if not _wait(sh, sh.call_fd, "driver", lambda: used_waiting(sh.mem, drv)):
                return
            drv.disable_interrupts()
        if got == N_BUFFERS and (drv.num_free != SIZE or drv.in_flight):
            sh.fail(f"driver: num_free {drv.num_free}, in_flight {drv.in_flight} at the end")
    except Exception as exc:                   # report, do not hang the other side
        sh.fail(f"driver: {exc!r}")
    finally:
        sh.sent, sh.got = sent, got


def device(sh, notify):
    """Serve chains: check sequence order, write seq*K+1, push; N_BUFFERS in all."""
    dev = sh.dev
    pb = ChainBatch(POP_BATCH)
    base = np.uint64(sh.data_gpa)
    expected = 0
    idle = 0
    try:
        while expected < N_BUFFERS and sh.check_time("device"):
            n = dev.pop(pb)
            if n:
                if not ((pb.readable_segments == 1).all() and (pb.seg_len == 8).all()
                        and (pb.writable_bytes == 8).all()):
                    return sh.fail("device: unexpected segments")
                seqs = sh.slots[(pb.seg_addr[0::2] - base) // np.uint64(8)]
                if not np.array_equal(seqs, np.arange(expected, expected + n, dtype=np.uint64)):
                    return sh.fail(f"device: sequence {seqs[:4]}.. expected from {expected}")
                sh.slots[(pb.seg_addr[1::2] - base) // np.uint64(8)] = seqs * K + np.uint64(1)
                pb.used_len[:] = 8
                dev.push_used(pb)
                expected += n
                sh.stats["dev_batches"] += 1
                if notify and dev.needs_notification():
                    os.eventfd_write(sh.call_fd, 1)
                    sh.stats["calls"] += 1
                idle = 0
                continue
            if not notify:
                idle = _backoff(idle)
                continue
            # ---- idle: enable notifications, re-check, sleep
            if dev.enable_notification():
                dev.disable_notification()
                continue
            sh.stats["dev_sleeps"] += 1
            if not _wait(sh, sh.kick_fd, "device", lambda: dev.pending() > 0):
                return
            dev.disable_notification()
        if expected == N_BUFFERS and (dev.in_flight or dev.pending()):
            sh.fail("device: chains left over at the end")
    except Exception as exc:
        sh.fail(f"device: {exc!r}")
    finally:
        sh.served = expected


@pytest.fixture
def fast_gil_switch():
    """Both threads run Python between their nogil calls: hand the GIL over quickly."""
    old = sys.getswitchinterval()
    sys.setswitchinterval(0.005)
    yield
    sys.setswitchinterval(old)


@pytest.mark.parametrize("mode", ["busy-poll", "eventfd"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_two_threads_million_buffers(layout, mode, fast_gil_switch):
    notify = mode == "eventfd"
    sh = Shared(event_idx=notify, layout=layout)
    if notify:
        sh.kick_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        sh.call_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    threads = [threading.Thread(target=driver, args=(sh, notify), name="driver", daemon=True),
               threading.Thread(target=device, args=(sh, notify), name="device", daemon=True)]
    t0 = time.monotonic()
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=max(0.0, sh.deadline - time.monotonic()) + 2 * WAIT)
        alive = [t.name for t in threads if t.is_alive()]
        if alive:
            sh.fail("still running")
            for t in threads:
                t.join(timeout=2 * WAIT)
        elapsed = time.monotonic() - t0
        assert not alive, f"threads {alive} did not finish; errors: {sh.errors}"
        assert not sh.errors, sh.errors
        assert sh.got == sh.sent == sh.served == N_BUFFERS
        assert sh.drv.num_free == SIZE and sh.drv.in_flight == 0
        assert sh.dev.in_flight == 0 and sh.dev.pending() == 0
        end = ring_index(layout, SIZE, N_BUFFERS, 2 * N_BUFFERS)     # 2 descriptors a chain
        assert sh.dev.next_avail == sh.dev.next_used == end
        assert sh.drv.next_avail == sh.drv.last_used == end
        if notify:
            # the run really slept and woke up through the eventfds (both directions)
            assert sh.stats["kicks"] > 0 and sh.stats["calls"] > 0
            assert sh.stats["dev_sleeps"] > 0 and sh.stats["drv_sleeps"] > 0
        print(f"\n{layout} {mode}: {N_BUFFERS} buffers in {elapsed:.2f} s "
              f"({elapsed / N_BUFFERS * 1e9:.0f} ns/buffer) {sh.stats}")
    finally:
        for fd in (sh.kick_fd, sh.call_fd):
            if fd is not None:
                os.close(fd)
