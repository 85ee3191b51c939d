# The split virtqueue (vq_split.h): device-side and driver-side queue classes.
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t

from vqcore.memory cimport GuestMemory, vq_memory
from vqcore.batch cimport vq_batch, ChainBatch
from vqcore.status cimport vq_err
from vqcore.queue cimport QueueBase, DeviceQueue, DriverQueue, vq_dev, vq_drv

cdef extern from "vq_ring.h" nogil:
    struct vq_desc:
        uint64_t addr
        uint32_t len
        uint16_t flags
        uint16_t next
    struct vq_avail:
        uint16_t flags
        uint16_t idx
    struct vq_used:
        uint16_t flags
        uint16_t idx
    int vq_need_event(uint16_t event_idx, uint16_t new_idx, uint16_t old_idx)

cdef extern from "vq_split.h" nogil:
    struct vq_split_dev:
        uint32_t size
        uint32_t mask
        vq_desc *desc
        vq_avail *avail
        vq_used *used
        vq_memory *mem
        uint8_t *inflight
        uint32_t num_inflight
        uint16_t last_avail
        uint16_t used_idx
        uint16_t signalled_used
        uint16_t used_flags
        uint8_t signalled_valid
        uint8_t event_idx
        uint8_t broken
        vq_err err
    int vq_split_pop(vq_split_dev *q, vq_batch *b)
    int vq_split_push(vq_split_dev *q, const uint16_t *heads, const uint32_t *lens, uint32_t n)
    int vq_split_needs_notification(vq_split_dev *q)
    int vq_split_enable_notification(vq_split_dev *q)
    void vq_split_disable_notification(vq_split_dev *q)
    uint16_t vq_split_avail_pending(vq_split_dev *q)

    struct vq_split_drv:
        uint32_t size
        uint32_t mask
        vq_desc *desc
        vq_avail *avail
        vq_used *used
        vq_memory *mem
        uint16_t *free_next
        uint16_t *tail
        uint16_t *ndesc
        uint32_t *wbytes
        uint64_t *token
        uint8_t *inflight
        uint32_t num_free
        uint16_t free_head
        uint16_t avail_idx
        uint16_t kicked_at
        uint16_t last_used
        uint16_t avail_flags
        uint8_t event_idx
        uint8_t broken
        uint64_t ind_gpa
        uint8_t *ind_host
        uint32_t ind_max
        vq_err err
    void vq_split_drv_publish(vq_split_drv *q)
    int vq_split_drv_add(vq_split_drv *q, const vq_batch *b, uint32_t start, int indirect, int publish)
    int vq_split_drv_kick_needed(vq_split_drv *q)
    int vq_split_drv_reclaim(vq_split_drv *q, vq_batch *b)
    void vq_split_drv_disable_interrupts(vq_split_drv *q)
    int vq_split_drv_enable_interrupts(vq_split_drv *q)
    void vq_split_unpop(vq_split_dev *q, vq_batch *b, uint32_t k)
    void vq_split_dev_handle(vq_split_dev *q, vq_dev *h)
    void vq_split_drv_handle(vq_split_drv *q, vq_drv *h)


cdef class SplitDeviceQueue(DeviceQueue):
    cdef vq_split_dev q


cdef class SplitDriverQueue(DriverQueue):
    cdef vq_split_drv q
