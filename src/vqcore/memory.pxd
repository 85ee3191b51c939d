# Guest memory: C declarations (vq_memory.h) and the GuestMemory class.
from libc.stdint cimport uint8_t, uint32_t, uint64_t
from posix.uio cimport iovec

cdef extern from "vq_memory.h" nogil:
    enum:
        VQ_MAX_REGIONS
    struct vq_region:
        uint64_t gpa
        uint64_t size
        uint64_t uva
        uint8_t *host
    struct vq_memory:
        uint32_t n
        uint32_t last
        vq_region r[VQ_MAX_REGIONS]
    int vq_mem_find(vq_memory *m, uint64_t gpa)
    uint8_t *vq_mem_ptr(vq_memory *m, uint64_t gpa, uint64_t len)
    int vq_mem_iov(vq_memory *m, uint64_t gpa, uint64_t len, iovec *iov,
                   uint64_t *gpas, uint32_t max)
    uint64_t vq_mem_uva_to_gpa(const vq_memory *m, uint64_t uva, uint64_t len)


cdef class GuestMemory:
    cdef vq_memory *mem
    cdef list _views          # per region: the exported buffer view that pins it
    cdef list _owners         # per region: the object the caller gave
    cdef readonly int attached   # queues using this memory (they hold host pointers)
    cdef object __weakref__

    cdef int attach(self) except -1
    cdef void detach(self) noexcept
    cdef uint8_t *_view_base(self, int k)
    cdef uint8_t *ptr_or_raise(self, uint64_t gpa, uint64_t length, str what) except NULL
