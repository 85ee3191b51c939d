# The spec's ring constants, from the C headers (their one source): cimported by the
# modules that publish them to Python (split, packed), never redefined.
cdef extern from "vq_ring.h" nogil:
    enum:
        VIRTQ_DESC_F_NEXT
        VIRTQ_DESC_F_WRITE
        VIRTQ_DESC_F_INDIRECT
        VIRTQ_USED_F_NO_NOTIFY
        VIRTQ_AVAIL_F_NO_INTERRUPT
        VQ_MAX_QUEUE_SIZE
        VQ_DESC_ALIGN
        VQ_AVAIL_ALIGN
        VQ_USED_ALIGN

cdef extern from "vq_packed.h" nogil:
    enum:
        VIRTQ_DESC_F_AVAIL
        VIRTQ_DESC_F_USED
        RING_EVENT_FLAGS_ENABLE
        RING_EVENT_FLAGS_DISABLE
        RING_EVENT_FLAGS_DESC
