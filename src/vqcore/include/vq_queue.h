/*
 * vq_queue.h - one interface over both ring layouts: a device-side handle (pop, unpop,
 * push, notification decisions) and a driver-side handle (add, publish, kick decision,
 * reclaim, interrupt control). The burst kernels and the benchmark loops take these
 * handles, so the same code serves split and packed rings; the call through a pointer
 * is made once per batch, never per descriptor.
 */
#ifndef VQ_QUEUE_H
#define VQ_QUEUE_H

#include <stdint.h>
#include "vq_batch.h"
#include "vq_status.h"

struct vq_dev_ops {
    int (*pop)(void *q, struct vq_batch *b);
    void (*unpop)(void *q, struct vq_batch *b, uint32_t k);
    int (*push)(void *q, const uint16_t *ids, const uint32_t *lens, uint32_t n);
    int (*needs_notification)(void *q);
    int (*enable_notification)(void *q);
    void (*disable_notification)(void *q);
    uint32_t (*pending)(void *q);
};

struct vq_dev {
    void *q;
    const struct vq_dev_ops *ops;
    uint32_t size;
    uint32_t *num_inflight;
    uint8_t *broken;
    struct vq_err *err;
};

struct vq_drv_ops {
    int (*add)(void *q, const struct vq_batch *b, uint32_t from, int indirect, int publish);
    void (*publish)(void *q);
    int (*kick_needed)(void *q);
    int (*reclaim)(void *q, struct vq_batch *b);
    int (*enable_interrupts)(void *q);
    void (*disable_interrupts)(void *q);
};

struct vq_drv {
    void *q;
    const struct vq_drv_ops *ops;
    uint32_t size;
    uint32_t *num_free;
    uint8_t *broken;
    struct vq_err *err;
};

/* A violation found above the ring layer (e.g. by a net kernel): break the queue. */
static inline int vq_dev_fail(struct vq_dev *d, int code, uint32_t index, uint64_t addr,
                              uint64_t len)
{
    *d->broken = 1;
    return vq_fail(d->err, code, index, addr, len);
}

#endif /* VQ_QUEUE_H */
