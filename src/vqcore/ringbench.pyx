"""C loops that drive the engine without Python in between, for benchmarks.

- :func:`pingpong`: the shape of the Linux kernel's tools/virtio/ringtest — a driver
  thread and a device thread on two cores passing one-descriptor buffers through one
  ring, busy-polling or sleeping on eventfds with notification suppression.
- :func:`device_loop` / :func:`driver_loop`: one side's work alone, the other side's
  reduced to the cheapest possible stand-in (a bare index update), to give the plain
  C cost of the same ring operations that the Python-facing API performs per batch.

Every loop releases the GIL for its whole run and is bounded by a deadline.
"""

import os
import threading
import time

from libc.stdint cimport uint16_t, uint32_t, uint64_t
from libc.errno cimport errno, EINTR, EAGAIN
from posix.unistd cimport read, write
from posix.time cimport clock_gettime, timespec, CLOCK_MONOTONIC

from vqcore.batch cimport ChainBatch, vq_batch
from vqcore.memory cimport GuestMemory
from vqcore.queue cimport DeviceQueue, DriverQueue, vq_dev, vq_drv
from vqcore.split cimport SplitDeviceQueue, vq_split_dev, vq_split_pop, vq_split_push

cdef extern from "vq_ring.h" nogil:
    void vq_store_release16(uint16_t *p, uint16_t v)
    uint16_t vq_load_acquire16(const uint16_t *p)

cdef extern from "<poll.h>" nogil:
    struct pollfd:
        int fd
        short events
        short revents
    int poll(pollfd *fds, unsigned long nfds, int timeout)
    enum:
        POLLIN

cdef extern from *:
    """
    static inline void vq_cpu_relax(void) {
    #if defined(__x86_64__) || defined(__i386__)
        __builtin_ia32_pause();
    #elif defined(__aarch64__)
        __asm__ __volatile__("yield");
    #endif
    }
    """
    void vq_cpu_relax() nogil


class PingPongError(RuntimeError):
    """A ping-pong run failed (timeout, ring error)."""


cdef inline double _now() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return ts.tv_sec + ts.tv_nsec * 1e-9


cdef inline int _wait_fd(int fd, double deadline, volatile int *go) noexcept nogil:
    """Block until the eventfd is readable, consume it. 0, or -1 at the deadline or
    when the other side gave up."""
    cdef pollfd p
    cdef uint64_t v
    cdef int rc
    while True:
        p.fd = fd
        p.events = POLLIN
        p.revents = 0
        rc = poll(&p, 1, 200)
        if rc > 0:
            read(fd, &v, 8)
            return 0
        if go[0] == 2 or _now() > deadline:
            return -1


cdef inline void _signal_fd(int fd) noexcept nogil:
    cdef uint64_t one = 1
    write(fd, &one, 8)


cdef struct pp_stats:
    uint64_t done
    uint64_t notifies
    uint64_t sleeps
    int rc
    double t_end


cdef int _driver_run(vq_drv *q, vq_batch *tmpl, vq_batch *rb, uint64_t total,
                     uint32_t batch, int kick_fd, int call_fd, volatile int *go,
                     double deadline, pp_stats *st) noexcept nogil:
    cdef uint64_t started = 0, completed = 0
    cdef uint32_t n
    cdef int r, added
    while go[0] == 0:
        vq_cpu_relax()
    if call_fd >= 0:
        q.ops.disable_interrupts(q.q)
    while completed < total:
        added = 0
        n = batch
        if n > q.num_free[0]:
            n = q.num_free[0]
        if n > total - started:
            n = <uint32_t>(total - started)
        if n:
            tmpl.count = n
            added = q.ops.add(q.q, tmpl, 0, 0, 1)
            if added < 0:
                st.rc = added
                return added
            started += <uint64_t>added
            if kick_fd >= 0 and q.ops.kick_needed(q.q):
                _signal_fd(kick_fd)
                st.notifies += 1
        r = q.ops.reclaim(q.q, rb)
        if r < 0:
            st.rc = r
            return r
        completed += <uint64_t>r
        if r == 0 and added == 0:
            if call_fd >= 0:
                if not q.ops.enable_interrupts(q.q):
                    st.sleeps += 1
                    if _wait_fd(call_fd, deadline, go) < 0:
                        st.rc = -1000
                        return -1000
                q.ops.disable_interrupts(q.q)
            else:
                vq_cpu_relax()
                if go[0] == 2 or _now() > deadline:
                    st.rc = -1000 if go[0] != 2 else -1001
                    return st.rc
    st.done = completed
    st.t_end = _now()
    return 0


cdef int _device_run(vq_dev *q, vq_batch *b, uint64_t total, int kick_fd,
                     int call_fd, volatile int *go, double deadline,
                     pp_stats *st) noexcept nogil:
    cdef uint64_t processed = 0
    cdef int n, rc
    cdef uint32_t spins = 0
    while go[0] == 0:
        vq_cpu_relax()
    if kick_fd >= 0:
        q.ops.disable_notification(q.q)
    while processed < total:
        n = q.ops.pop(q.q, b)
        if n < 0:
            st.rc = n
            return n
        if n > 0:
            rc = q.ops.push(q.q, b.head, b.used_len, <uint32_t>n)
            if rc < 0:
                st.rc = rc
                return rc
            processed += <uint64_t>n
            if call_fd >= 0 and q.ops.needs_notification(q.q):
                _signal_fd(call_fd)
                st.notifies += 1
            continue
        if kick_fd >= 0:
            if not q.ops.enable_notification(q.q):
                st.sleeps += 1
                if _wait_fd(kick_fd, deadline, go) < 0:
                    st.rc = -1000
                    return -1000
            q.ops.disable_notification(q.q)
        else:
            vq_cpu_relax()
            spins += 1
            if go[0] == 2 or ((spins & 0xFFFF) == 0 and _now() > deadline):
                st.rc = -1000 if go[0] != 2 else -1001
                return st.rc
    st.done = processed
    st.t_end = _now()
    return 0


cdef class _PingPong:
    """State shared by the two threads of one ping-pong run."""
    cdef vq_drv *dq
    cdef vq_dev *vq
    cdef vq_batch *tp
    cdef vq_batch *rp
    cdef vq_batch *dp
    cdef uint64_t total
    cdef uint32_t batch
    cdef int kick_fd, call_fd
    cdef volatile int go
    cdef double deadline
    cdef pp_stats dst, vst

    def run_driver(self):
        with nogil:
            if _driver_run(self.dq, self.tp, self.rp, self.total, self.batch, self.kick_fd,
                           self.call_fd, &self.go, self.deadline, &self.dst) != 0:
                self.go = 2

    def run_device(self):
        with nogil:
            if _device_run(self.vq, self.dp, self.total, self.kick_fd, self.call_fd,
                           &self.go, self.deadline, &self.vst) != 0:
                self.go = 2


def pingpong(DriverQueue driver not None, DeviceQueue device not None,
             ChainBatch template not None, unsigned long long total, *,
             unsigned int batch=0, bint eventfd=False, double timeout=120.0):
    """Pass ``total`` buffers from a driver thread to a device thread and back.

    ``template`` holds the chains the driver adds (its first ``batch`` chains are
    reused for every add; default: all of them). With ``eventfd`` both sides sleep on
    eventfds (kick and call) after the race-free re-check, with the queues' own
    notification suppression; otherwise both busy-poll.

    Returns a dict: buffers, seconds, ns_per_buffer, kicks, calls, driver_sleeps,
    device_sleeps.
    """
    if batch == 0 or batch > template.b.count:
        batch = template.b.count
    if batch == 0:
        raise ValueError("template batch is empty")
    cdef ChainBatch rb = ChainBatch(max(batch, 256))
    cdef ChainBatch db = ChainBatch(max(batch, 256))
    db.hold(device.memory)                # the device's pops point into it
    cdef _PingPong pp = _PingPong()
    pp.dq = &driver.h
    pp.vq = &device.h
    pp.tp = &template.b
    pp.rp = &rb.b
    pp.dp = &db.b
    pp.total = total
    pp.batch = batch
    pp.kick_fd = pp.call_fd = -1
    pp.go = 0
    pp.dst.done = pp.dst.notifies = pp.dst.sleeps = 0
    pp.vst.done = pp.vst.notifies = pp.vst.sleeps = 0
    pp.dst.rc = pp.vst.rc = 0
    pp.dst.t_end = pp.vst.t_end = 0
    cdef uint32_t saved_count = template.b.count
    if eventfd:
        pp.kick_fd = os.eventfd(0, os.EFD_NONBLOCK)
        pp.call_fd = os.eventfd(0, os.EFD_NONBLOCK)
    threads = [threading.Thread(target=pp.run_device, name="pingpong-device"),
               threading.Thread(target=pp.run_driver, name="pingpong-driver")]
    try:
        pp.deadline = _now() + timeout
        for t in threads:
            t.start()
        time.sleep(0.01)
        t0 = _now()
        pp.go = 1
        for t in threads:
            t.join(timeout + 5)
        t1 = max(pp.dst.t_end, pp.vst.t_end)
    finally:
        template.b.count = saved_count
        if eventfd:
            os.close(pp.kick_fd)
            os.close(pp.call_fd)
    if pp.dst.rc or pp.vst.rc:
        raise PingPongError(f"ping-pong failed: driver rc={pp.dst.rc} device rc={pp.vst.rc} "
                            f"(-1000 = timeout, -1001 = stopped because the other side failed; others: vq_status.h)")
    seconds = t1 - t0
    return {"buffers": total, "seconds": seconds, "ns_per_buffer": seconds * 1e9 / total,
            "kicks": pp.dst.notifies, "calls": pp.vst.notifies,
            "driver_sleeps": pp.dst.sleeps, "device_sleeps": pp.vst.sleeps}


def device_loop(SplitDeviceQueue device not None, ChainBatch batch not None,
                unsigned long long iterations, unsigned int per_iter):
    """The device's pop + push of ``per_iter`` chains, ``iterations`` times, in C.

    The driver's part is replaced by bumping ``avail->idx`` by ``per_iter`` (the ring
    must already hold ``size`` available chains whose slots repeat: see the benchmarks).
    Returns seconds.
    """
    cdef vq_split_dev *q = &device.q
    cdef vq_batch *b = &batch.b
    cdef uint16_t *aidx = &q.avail.idx
    batch.hold(device.memory)
    cdef unsigned long long i
    cdef int n = 0
    cdef double t0, t1
    with nogil:
        t0 = _now()
        for i in range(iterations):
            vq_store_release16(aidx, <uint16_t>(vq_load_acquire16(aidx) + per_iter))
            n = vq_split_pop(q, b)
            if n < 0:
                break
            if vq_split_push(q, b.head, b.used_len, <uint32_t>n) < 0:
                n = -1
                break
        t1 = _now()
    if n < 0:
        raise PingPongError(f"device loop failed with status {n}")
    return t1 - t0


def complete_all(GuestMemory memory not None, unsigned long long avail_addr,
                 unsigned long long used_addr, unsigned int size):
    """Stand-in device for driver benchmarks: mark every published chain used (length
    0) by copying avail entries to used entries, nothing else. Works under any driver
    implementation (engine or model) sharing ``memory``. Returns how many."""
    cdef uint16_t *avail = <uint16_t *>memory.ptr_or_raise(avail_addr, 6 + 2 * size, "avail")
    cdef uint32_t *used = <uint32_t *>memory.ptr_or_raise(used_addr, 6 + 8 * size, "used")
    cdef uint16_t a = vq_load_acquire16(&avail[1])
    cdef uint16_t u = vq_load_acquire16(<uint16_t *>used + 1)
    cdef uint16_t n = a - u
    cdef uint16_t i, slot
    cdef uint32_t mask = size - 1
    for i in range(n):
        slot = (u + i) & mask
        used[1 + 2 * slot] = avail[2 + slot]
        used[2 + 2 * slot] = 0
    vq_store_release16(<uint16_t *>used + 1, a)
    return n
