# Status codes of the nogil kernels and the one checker that raises them.
from libc.stdint cimport uint32_t, uint64_t

cdef extern from "vq_status.h" nogil:
    enum:
        VQ_OK
        VQ_E_HEAD_INDEX
        VQ_E_DESC_INDEX
        VQ_E_AVAIL_IDX
        VQ_E_CHAIN_TOO_LONG
        VQ_E_INDIRECT_LEN
        VQ_E_INDIRECT_NESTED
        VQ_E_INDIRECT_NEXT
        VQ_E_INDIRECT_TOO_LONG
        VQ_E_INDIRECT_SPLIT
        VQ_E_OUT_OF_BOUNDS
        VQ_E_ADDR_OVERFLOW
        VQ_E_CHAIN_LEN_OVERFLOW
        VQ_E_WRITE_ORDER
        VQ_E_HEAD_IN_USE
        VQ_E_USED_IDX
        VQ_E_USED_ID
        VQ_E_USED_LEN
        VQ_E_NET_HDR
        VQ_E_DESC_NOT_AVAIL
        VQ_E_NOT_IN_FLIGHT
        VQ_E_BATCH_TOO_SMALL
        VQ_E_BROKEN
        VQ_E_BAD_CHAIN
        VQ_E_NO_INDIRECT

    struct vq_err:
        int code
        uint32_t index
        uint64_t addr
        uint64_t len

    int vq_fail(vq_err *e, int code, uint32_t index, uint64_t addr, uint64_t len)
    int vq_is_violation(int code)

# Raise the exception matching e.code (with `where` naming the queue); returns -1.
cdef int raise_status(const vq_err *e, str where) except -1
