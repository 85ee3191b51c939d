# The packed virtqueue (vq_packed.h): device-side and driver-side queue classes.
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t

from vqcore.memory cimport vq_memory
from vqcore.batch cimport vq_batch
from vqcore.status cimport vq_err
from vqcore.memory cimport GuestMemory
from vqcore.queue cimport QueueBase, DeviceQueue, DriverQueue, vq_dev, vq_drv

cdef extern from "vq_packed.h" nogil:
    struct vq_pdesc:
        uint64_t addr
        uint32_t len
        uint16_t id
        uint16_t flags
    struct vq_pevent:
        uint16_t off_wrap
        uint16_t flags

    struct vq_packed_dev:
        uint32_t size
        vq_pdesc *desc
        vq_pevent *driver_event
        vq_pevent *device_event
        vq_memory *mem
        uint8_t *inflight
        uint16_t *id_ndesc
        uint32_t num_inflight
        uint16_t next_avail
        uint16_t next_used
        uint16_t signalled_used
        uint8_t avail_wrap
        uint8_t used_wrap
        uint8_t signalled_wrap
        uint8_t signalled_valid
        uint8_t event_idx
        uint8_t broken
        vq_err err
    int vq_packed_pop(vq_packed_dev *q, vq_batch *b)
    void vq_packed_unpop(vq_packed_dev *q, vq_batch *b, uint32_t k)
    int vq_packed_push(vq_packed_dev *q, const uint16_t *ids, const uint32_t *lens, uint32_t n)
    int vq_packed_needs_notification(vq_packed_dev *q)
    int vq_packed_enable_notification(vq_packed_dev *q)
    void vq_packed_disable_notification(vq_packed_dev *q)
    uint16_t vq_packed_avail_pending(vq_packed_dev *q)

    struct vq_packed_drv:
        uint32_t size
        vq_pdesc *desc
        vq_pevent *driver_event
        vq_pevent *device_event
        vq_memory *mem
        uint16_t *free_ids
        uint16_t *ndesc
        uint32_t *wbytes
        uint64_t *token
        uint8_t *inflight
        uint32_t num_free
        uint32_t free_top
        uint16_t next_avail
        uint16_t next_used
        uint16_t kicked_at
        uint8_t avail_wrap
        uint8_t used_wrap
        uint8_t kicked_wrap
        uint8_t event_idx
        uint8_t broken
        uint64_t ind_gpa
        uint8_t *ind_host
        uint32_t ind_max
        vq_err err
    int vq_packed_drv_add(vq_packed_drv *q, const vq_batch *b, uint32_t start, int indirect, int publish)
    int vq_packed_drv_kick_needed(vq_packed_drv *q)
    int vq_packed_drv_reclaim(vq_packed_drv *q, vq_batch *b)
    void vq_packed_drv_disable_interrupts(vq_packed_drv *q)
    int vq_packed_drv_enable_interrupts(vq_packed_drv *q)
    void vq_packed_dev_handle(vq_packed_dev *q, vq_dev *h)
    void vq_packed_drv_handle(vq_packed_drv *q, vq_drv *h)


cdef class PackedDeviceQueue(DeviceQueue):
    cdef vq_packed_dev q


cdef class PackedDriverQueue(DriverQueue):
    cdef vq_packed_drv q
