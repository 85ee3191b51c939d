# A batch of descriptor chains (vq_batch.h) and the ChainBatch class that owns one.
from libc.stdint cimport uint16_t, uint32_t, uint64_t
from posix.uio cimport iovec

from vqcore.memory cimport GuestMemory

cdef extern from "vq_batch.h" nogil:
    struct vq_batch:
        uint32_t count
        uint32_t max_chains
        uint32_t nseg
        uint32_t max_segs
        uint16_t *head
        uint32_t *seg_start
        uint32_t *nread
        uint32_t *rbytes
        uint32_t *wbytes
        uint32_t *used_len
        uint16_t *ndesc
        uint64_t *token
        uint64_t *seg_gpa
        iovec *iov
    void vq_batch_clear(vq_batch *b)


cdef class ChainBatch:
    cdef vq_batch b
    cdef object _head, _seg_start, _nread, _rbytes, _wbytes, _used_len, _ndesc
    cdef object _token, _seg_gpa, _iov
    cdef GuestMemory _memory      # what the segments of a pop point into (attached)

    # Keep ``memory`` attached while the batch may hold host pointers into it: called by
    # every device pop before it fills the batch (inline: once per pop, on the hot path).
    cdef inline int hold(self, GuestMemory memory) except -1:
        if self._memory is not memory:
            self._swap_memory(memory)
        return 0
    cdef int _swap_memory(self, GuestMemory memory) except -1
