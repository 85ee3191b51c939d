/*
 * vq_batch.h - a batch of descriptor chains: what a device pop fills and what a driver
 * add consumes. Segments point straight into guest memory (struct iovec, so a burst
 * can hand them to writev/readv unchanged); each chain's readable segments come first,
 * then its writable ones.
 */
#ifndef VQ_BATCH_H
#define VQ_BATCH_H

#include <stdint.h>
#include <sys/uio.h>

struct vq_batch {
    uint32_t count;        /* chains held */
    uint32_t max_chains;
    uint32_t nseg;         /* segments held */
    uint32_t max_segs;
    uint16_t *head;        /* [max_chains] head descriptor id (buffer id) */
    uint32_t *seg_start;   /* [max_chains + 1] first segment of each chain */
    uint32_t *nread;       /* [max_chains] readable segments (they come first) */
    uint32_t *rbytes;      /* [max_chains] device-readable bytes */
    uint32_t *wbytes;      /* [max_chains] device-writable bytes */
    uint32_t *used_len;    /* [max_chains] bytes written (push) / reported (reclaim) */
    uint16_t *ndesc;       /* [max_chains] ring descriptors the chain took */
    uint64_t *token;       /* [max_chains] the driver's cookie */
    uint64_t *seg_gpa;     /* [max_segs] guest address of each segment */
    struct iovec *iov;     /* [max_segs] host address and length of each segment */
};

static inline void vq_batch_clear(struct vq_batch *b)
{
    b->count = 0;
    b->nseg = 0;
    b->seg_start[0] = 0;
}

#endif /* VQ_BATCH_H */
