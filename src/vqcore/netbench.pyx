"""C loops for the virtio-net datapath benchmarks (no Python between frames).

- :func:`writev_loop` / :func:`readv_loop`: the plain syscall baseline — the same
  ``writev`` of (virtio-net header + frame) / ``readv`` into (header + buffer) that the
  burst kernels do, on the same fd, with no ring at all: the kernel's own ceiling.
- :func:`send_loop`: a frame generator on any socket (an AF_PACKET socket bound to the
  TAP's peer side), to load the RX direction.
- :func:`count_loop`: a receiver that counts frames on a socket (AF_PACKET / UDP).

Every loop releases the GIL and is bounded by a frame count and a deadline.
"""

from libc.stdint cimport uint8_t, uint64_t
from libc.errno cimport errno, EAGAIN, EINTR
from posix.uio cimport iovec
from posix.time cimport clock_gettime, timespec, CLOCK_MONOTONIC

cdef extern from "<sys/uio.h>" nogil:
    ssize_t writev(int fd, const iovec *iov, int iovcnt)
    ssize_t readv(int fd, const iovec *iov, int iovcnt)

cdef extern from "<sys/socket.h>" nogil:
    ssize_t send(int fd, const void *buf, size_t len, int flags)
    ssize_t recv(int fd, void *buf, size_t len, int flags)
    enum:
        MSG_DONTWAIT


cdef inline double _now() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return ts.tv_sec + ts.tv_nsec * 1e-9


def writev_loop(int fd, frame, unsigned long long count, *, unsigned int hdr_len=12,
                double timeout=30.0):
    """``writev`` (zero header of ``hdr_len`` bytes, ``frame``) ``count`` times.

    Returns (frames written, frames refused, seconds)."""
    cdef const uint8_t[::1] fr = memoryview(bytes(frame))
    cdef uint8_t hdr[64]
    cdef iovec iov[2]
    cdef unsigned long long i, ok = 0, bad = 0
    cdef double t0, t1, deadline
    cdef ssize_t w
    if hdr_len > 64:
        raise ValueError("hdr_len too large")
    for i in range(64):
        hdr[i] = 0
    iov[0].iov_base = hdr
    iov[0].iov_len = hdr_len
    iov[1].iov_base = <void *>&fr[0]
    iov[1].iov_len = fr.shape[0]
    with nogil:
        t0 = _now()
        deadline = t0 + timeout
        for i in range(count):
            w = writev(fd, iov, 2)
            if w < 0:
                bad += 1
                if (i & 1023) == 0 and _now() > deadline:
                    break
            else:
                ok += 1
        t1 = _now()
    return ok, bad, t1 - t0


def readv_loop(int fd, unsigned long long count, *, unsigned int buf_len=65562,
               double timeout=10.0, double idle=0.3):
    """``readv`` frames (header + data) from a non-blocking fd until ``count`` arrived,
    the deadline passed, or the fd stayed empty for ``idle`` seconds after a frame.

    Returns (frames, bytes, seconds from the first frame to the last)."""
    buf = bytearray(buf_len)
    cdef uint8_t[::1] b = buf
    cdef iovec iov[1]
    cdef unsigned long long n = 0, total = 0, spins = 0
    cdef double t_first = 0, t_last = 0, deadline, now
    cdef ssize_t r
    iov[0].iov_base = &b[0]
    iov[0].iov_len = buf_len
    with nogil:
        deadline = _now() + timeout
        while n < count:
            r = readv(fd, iov, 1)
            if r > 0:
                t_last = _now()
                if n == 0:
                    t_first = t_last
                n += 1
                total += r
                continue
            spins += 1
            if (spins & 255) == 0:
                now = _now()
                if now > deadline or (n and now - t_last > idle):
                    break
    return n, total, (t_last - t_first) if n else 0.0


def send_loop(int fd, frame, unsigned long long count, *, double timeout=30.0):
    """``send`` ``frame`` on a socket ``count`` times (retrying while the socket is
    full). Returns (frames sent, seconds)."""
    cdef const uint8_t[::1] fr = memoryview(bytes(frame))
    cdef unsigned long long i = 0
    cdef double t0, t1, deadline
    cdef ssize_t w
    with nogil:
        t0 = _now()
        deadline = t0 + timeout
        while i < count:
            w = send(fd, &fr[0], fr.shape[0], 0)
            if w < 0:
                if errno == EINTR or errno == EAGAIN:
                    if _now() > deadline:
                        break
                    continue
                break
            i += 1
        t1 = _now()
    return i, t1 - t0


def count_loop(int fd, unsigned long long count, *, unsigned int buf_len=65536,
               double timeout=10.0, double idle=0.3):
    """Receive on a socket until ``count`` frames, the deadline, or ``idle`` seconds
    without a frame (after the first). Returns (frames, bytes, seconds first-to-last)."""
    buf = bytearray(buf_len)
    cdef uint8_t[::1] b = buf
    cdef unsigned long long n = 0, total = 0, spins = 0
    cdef double t_first = 0, t_last = 0, deadline, now
    cdef ssize_t r
    with nogil:
        deadline = _now() + timeout
        while n < count:
            r = recv(fd, &b[0], buf_len, MSG_DONTWAIT)
            if r >= 0:
                t_last = _now()
                if n == 0:
                    t_first = t_last
                n += 1
                total += r
                continue
            spins += 1
            if (spins & 63) == 0:
                now = _now()
                if now > deadline or (n and now - t_last > idle):
                    break
    return n, total, (t_last - t_first) if n else 0.0
