# The fill burst kernel (vq_fill.h): device-writable buffers filled from a fd.
from libc.stdint cimport uint64_t

from vqcore.batch cimport vq_batch
from vqcore.queue cimport vq_dev

cdef extern from "vq_fill.h" nogil:
    enum:
        VQ_FILL_MAX_IOV
    struct vq_fill_stats:
        uint64_t requests, bytes, bursts, notifications, errors, read_errors
        int last_errno, fd_empty, fd_failed, ring_empty
    int vq_fill_burst(vq_dev *q, vq_batch *b, int fd, uint64_t max_bytes, int call_fd,
                      vq_fill_stats *st)


cdef class FillStats:
    cdef vq_fill_stats s
