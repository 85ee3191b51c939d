"""The fill burst kernel: a device's writable request buffers filled from a fd.

:func:`fill_burst` pops request chains and ``readv``\\ s bytes from ``fd`` straight
into each chain's device-writable segments (a virtio-rng request queue fed by
``/dev/urandom``, VIRTIO 1.2 section 5.4), pushes the used chains with the bytes
written and, given ``call_fd``, signals the driver once when its notification
suppression asks for it. One call is one burst with the GIL released.

A request is never completed empty for want of data: when ``max_bytes`` is spent or
``fd`` gives nothing (EAGAIN, end of file, an error: see :class:`FillStats`), it and
those after it stay in the ring for the next burst. A chain with no writable byte is
completed with length 0 and counted in ``errors``.
"""

from libc.stdint cimport UINT64_MAX
from libc.string cimport memset

from vqcore.batch cimport ChainBatch
from vqcore.queue cimport DeviceQueue

#: segments one readv takes (a chain with more is filled in several reads)
MAX_IOV = VQ_FILL_MAX_IOV

_COUNTERS = ("requests", "bytes", "bursts", "notifications", "errors", "read_errors")


cdef class FillStats:
    """Counters of one request queue, updated by :func:`fill_burst`."""

    @property
    def requests(self):
        """Chains completed (those without a writable byte, with length 0, too)."""
        return self.s.requests
    @property
    def bytes(self):
        """Bytes written into guest buffers."""
        return self.s.bytes
    @property
    def bursts(self):
        """Bursts that completed something."""
        return self.s.bursts
    @property
    def notifications(self):
        """Interrupts sent through ``call_fd``."""
        return self.s.notifications
    @property
    def errors(self):
        """Chains without a writable byte, and failed reads."""
        return self.s.errors
    @property
    def read_errors(self):
        """Failed reads of the fd: end of file, or an errno other than EAGAIN."""
        return self.s.read_errors
    @property
    def last_errno(self):
        """errno of the last failed read (0: none, or end of file)."""
        return self.s.last_errno
    @property
    def fd_empty(self):
        """Last burst: the fd had nothing to read (EAGAIN); requests wait."""
        return bool(self.s.fd_empty)
    @property
    def fd_failed(self):
        """Last burst: the fd hit end of file or failed; requests wait."""
        return bool(self.s.fd_failed)
    @property
    def ring_empty(self):
        """Last burst: the guest had no (more) requests."""
        return bool(self.s.ring_empty)

    def reset(self):
        """Zero every counter."""
        memset(&self.s, 0, sizeof(vq_fill_stats))

    def as_dict(self):
        """The counters as a dict."""
        return {k: getattr(self, k) for k in _COUNTERS}

    def __repr__(self):
        return f"<FillStats {self.as_dict()}>"


def fill_burst(DeviceQueue queue not None, ChainBatch batch not None, int fd,
               FillStats stats not None, *, max_bytes=None, int call_fd=-1):
    """Fill up to ``batch.max_chains`` requests from ``fd`` with at most ``max_bytes``
    bytes in all (None: no limit); returns the requests completed.

    Each request gets what ``fd`` gives up to its writable size: short reads are
    followed by more until it is full, ``fd`` has nothing more, or the budget is spent
    (a request may be completed with fewer bytes than it asked for, as the spec allows,
    never with none for want of data). ``fd`` should be non-blocking.

    A guest violation found while popping raises its
    :class:`~vqcore.errors.RingViolation` subclass after the chains popped before it
    were filled and completed; the queue is then broken.
    """
    cdef unsigned long long budget = UINT64_MAX
    if max_bytes is not None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        budget = max_bytes
    cdef int rc
    batch.hold(queue.memory)
    with nogil:
        rc = vq_fill_burst(&queue.h, &batch.b, fd, budget, call_fd, &stats.s)
    if rc < 0:
        queue._raise(queue.h.err)
    return rc
