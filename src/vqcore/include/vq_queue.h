/*
 * vq_queue.h - one interface over both ring layouts: a device-side handle (pop, unpop,
 * push, notification decisions) and a driver-side handle (add, publish, kick decision,
 * reclaim, interrupt control). The burst kernels and the benchmark loops take these
 * handles, so the same code serves split and packed rings; the call through a pointer
 * is made once per batch, never per descriptor.
 */
#ifndef VQ_QUEUE_H
#define VQ_QUEUE_H

#include <errno.h>
#include <stdint.h>
#include <unistd.h>
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
    int (*enable_notification_more)(void *q);
    int (*enable_notification_after)(void *q, uint32_t n);
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

/* After a push: interrupt the driver through eventfd call_fd when its suppression
 * wishes say so. The fd is non-blocking; a full counter (EAGAIN) means the driver has
 * signals it has not read yet, so it counts as signalled. Returns 1 when signalled, 0
 * when no interrupt is wanted (or call_fd < 0), -1 when the write failed. */
static inline int vq_dev_notify(struct vq_dev *d, int call_fd)
{
    if (call_fd < 0 || !d->ops->needs_notification(d->q))
        return 0;
    uint64_t one = 1;
    ssize_t r;
    do {
        r = write(call_fd, &one, sizeof one);
    } while (r < 0 && errno == EINTR);
    if (r == (ssize_t)sizeof one || (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)))
        return 1;
    return -1;
}

/* Define the handle functions of one ring layout P (vq_split, vq_packed): thin
 * wrappers with void* queues, the ops tables, and P_dev_handle / P_drv_handle. */
#define VQ_DEFINE_HANDLES(P)                                                              \
static int P##_pop_op(void *q, struct vq_batch *b) { return P##_pop(q, b); }              \
static void P##_unpop_op(void *q, struct vq_batch *b, uint32_t k) { P##_unpop(q, b, k); } \
static int P##_push_op(void *q, const uint16_t *ids, const uint32_t *lens, uint32_t n)    \
{ return P##_push(q, ids, lens, n); }                                                     \
static int P##_needs_op(void *q) { return P##_needs_notification(q); }                    \
static int P##_enable_op(void *q) { return P##_enable_notification(q); }                  \
static void P##_disable_op(void *q) { P##_disable_notification(q); }                      \
static uint32_t P##_pending_op(void *q) { return P##_avail_pending(q); }                  \
static int P##_more_op(void *q) { return P##_enable_notification_more(q); }               \
static int P##_after_op(void *q, uint32_t n) { return P##_enable_notification_after(q, n); } \
static const struct vq_dev_ops P##_dev_ops = {                                            \
    P##_pop_op, P##_unpop_op, P##_push_op, P##_needs_op,                                  \
    P##_enable_op, P##_disable_op, P##_pending_op, P##_more_op, P##_after_op,             \
};                                                                                        \
static inline void P##_dev_handle(struct P##_dev *q, struct vq_dev *h)                    \
{                                                                                         \
    h->q = q;                                                                             \
    h->ops = &P##_dev_ops;                                                                \
    h->size = q->size;                                                                    \
    h->num_inflight = &q->num_inflight;                                                   \
    h->broken = &q->broken;                                                               \
    h->err = &q->err;                                                                     \
}                                                                                         \
static int P##_add_op(void *q, const struct vq_batch *b, uint32_t from, int indirect,     \
                      int publish) { return P##_drv_add(q, b, from, indirect, publish); } \
static void P##_publish_op(void *q) { P##_drv_publish(q); }                               \
static int P##_kick_op(void *q) { return P##_drv_kick_needed(q); }                        \
static int P##_reclaim_op(void *q, struct vq_batch *b) { return P##_drv_reclaim(q, b); }  \
static int P##_enable_int_op(void *q) { return P##_drv_enable_interrupts(q); }            \
static void P##_disable_int_op(void *q) { P##_drv_disable_interrupts(q); }                \
static const struct vq_drv_ops P##_drv_ops = {                                            \
    P##_add_op, P##_publish_op, P##_kick_op, P##_reclaim_op,                              \
    P##_enable_int_op, P##_disable_int_op,                                                \
};                                                                                        \
static inline void P##_drv_handle(struct P##_drv *q, struct vq_drv *h)                    \
{                                                                                         \
    h->q = q;                                                                             \
    h->ops = &P##_drv_ops;                                                                \
    h->size = q->size;                                                                    \
    h->num_free = &q->num_free;                                                           \
    h->broken = &q->broken;                                                               \
    h->err = &q->err;                                                                     \
}

#endif /* VQ_QUEUE_H */
