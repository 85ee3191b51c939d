# What every queue class shares, and the two generic sides (vq_queue.h handles).
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t

from vqcore.batch cimport vq_batch
from vqcore.memory cimport GuestMemory
from vqcore.status cimport vq_err

cdef extern from "vq_queue.h" nogil:
    struct vq_dev_ops:
        int (*pop)(void *q, vq_batch *b) noexcept nogil
        void (*unpop)(void *q, vq_batch *b, uint32_t k) noexcept nogil
        int (*push)(void *q, const uint16_t *ids, const uint32_t *lens, uint32_t n) noexcept nogil
        int (*needs_notification)(void *q) noexcept nogil
        int (*enable_notification)(void *q) noexcept nogil
        void (*disable_notification)(void *q) noexcept nogil
        uint32_t (*pending)(void *q) noexcept nogil
        int (*enable_notification_more)(void *q) noexcept nogil
        int (*enable_notification_after)(void *q, uint32_t n) noexcept nogil
    struct vq_dev:
        void *q
        const vq_dev_ops *ops
        uint32_t size
        uint32_t *num_inflight
        uint8_t *broken
        vq_err *err
    struct vq_drv_ops:
        int (*add)(void *q, const vq_batch *b, uint32_t start, int indirect, int publish) noexcept nogil
        void (*publish)(void *q) noexcept nogil
        int (*kick_needed)(void *q) noexcept nogil
        int (*reclaim)(void *q, vq_batch *b) noexcept nogil
        int (*enable_interrupts)(void *q) noexcept nogil
        void (*disable_interrupts)(void *q) noexcept nogil
    struct vq_drv:
        void *q
        const vq_drv_ops *ops
        uint32_t size
        uint32_t *num_free
        uint8_t *broken
        vq_err *err
    int vq_dev_fail(vq_dev *d, int code, uint32_t index, uint64_t addr, uint64_t len)


cdef class QueueBase:
    cdef readonly GuestMemory memory
    cdef readonly unsigned int size
    cdef readonly unsigned long long desc_addr, avail_addr, used_addr
    cdef readonly str name
    cdef readonly unsigned long long violations
    cdef readonly bint event_idx
    cdef object _state            # numpy arrays backing the private bookkeeping
    cdef object _error
    cdef int _raise(self, const vq_err *e) except -1
    cdef int _attach(self, GuestMemory memory, unsigned int size, unsigned long long desc,
                     unsigned long long avail, unsigned long long used, bint event_idx,
                     str name) except -1


cdef class DeviceQueue(QueueBase):
    cdef vq_dev h


cdef class DriverQueue(QueueBase):
    cdef vq_drv h
    cdef readonly unsigned int indirect_max
    cdef uint8_t *_indirect_area(self, indirect_addr, unsigned int indirect_max) except? NULL
