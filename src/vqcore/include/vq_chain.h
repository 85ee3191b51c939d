/*
 * vq_chain.h - walking one descriptor chain into a batch, with every check the spec
 * and DESIGN.md ("The guest is untrusted") require. Shared by the split and the packed
 * ring: both use the same 16-byte descriptor in indirect tables.
 *
 * Each descriptor is copied out of shared memory once (vq_read_desc) and only the copy
 * is checked and used.
 */
#ifndef VQ_CHAIN_H
#define VQ_CHAIN_H

#include "vq_ring.h"
#include "vq_memory.h"
#include "vq_batch.h"
#include "vq_status.h"

/* Running totals of the chain being collected. */
struct vq_walk {
    uint32_t nseg0;        /* batch->nseg when the chain started */
    uint32_t nread;        /* readable segments so far */
    uint32_t ndesc;        /* descriptors taken from the ring's own table */
    int writing;           /* a writable descriptor was seen */
    uint64_t rbytes;
    uint64_t wbytes;
};

static inline void vq_walk_begin(struct vq_walk *w, const struct vq_batch *b)
{
    w->nseg0 = b->nseg;
    w->nread = 0;
    w->ndesc = 0;
    w->writing = 0;
    w->rbytes = 0;
    w->wbytes = 0;
}

/* Append the buffer of one (already copied) descriptor as segments. */
static inline int vq_walk_buffer(struct vq_memory *m, struct vq_batch *b, struct vq_walk *w,
                                 const struct vq_desc *d, uint32_t index, struct vq_err *e)
{
    int writable = (d->flags & VIRTQ_DESC_F_WRITE) != 0;
    if (!writable && w->writing)
        return vq_fail(e, VQ_E_WRITE_ORDER, index, d->addr, d->len);
    if (writable)
        w->writing = 1;
    if (d->len == 0)
        return 0;
    int n = vq_mem_iov(m, d->addr, d->len, b->iov + b->nseg, b->seg_gpa + b->nseg,
                       b->max_segs - b->nseg);
    if (n < 0)
        return vq_fail(e, n, index, d->addr, d->len);
    b->nseg += (uint32_t)n;
    if (writable) {
        w->wbytes += d->len;
    } else {
        w->nread += (uint32_t)n;
        w->rbytes += d->len;
    }
    return 0;
}

/* Check an INDIRECT descriptor and return its table (host pointer) and entry count. */
static inline int vq_walk_indirect_table(struct vq_memory *m, const struct vq_desc *d,
                                         uint32_t index, uint32_t qsize,
                                         const struct vq_desc **table, uint32_t *count,
                                         struct vq_err *e)
{
    if (d->flags & VIRTQ_DESC_F_NEXT)
        return vq_fail(e, VQ_E_INDIRECT_NEXT, index, d->addr, d->len);
    if (d->len == 0 || (d->len & 15u))
        return vq_fail(e, VQ_E_INDIRECT_LEN, index, d->addr, d->len);
    uint32_t n = d->len / 16u;
    if (n > qsize)
        return vq_fail(e, VQ_E_INDIRECT_TOO_LONG, index, d->addr, n);
    if (d->len - 1u > UINT64_MAX - d->addr)   /* len >= 16 here; may end at 2^64 */
        return vq_fail(e, VQ_E_ADDR_OVERFLOW, index, d->addr, d->len);
    const struct vq_desc *t = (const struct vq_desc *)vq_mem_ptr(m, d->addr, d->len);
    if (t == NULL) {
        /* Inside memory but across regions, or (partly) outside memory? */
        uint64_t last = d->addr + d->len - 1;
        int code = (vq_mem_find(m, d->addr) >= 0 && vq_mem_find(m, last) >= 0)
                       ? VQ_E_INDIRECT_SPLIT : VQ_E_OUT_OF_BOUNDS;
        return vq_fail(e, code, index, d->addr, d->len);
    }
    *table = t;
    *count = n;
    return 0;
}

/* Walk the chain that starts at `head` of `ring_table` (qsize entries) into batch `b`.
 * The chain may end in one INDIRECT descriptor whose table is then walked.
 * Returns 0, or a negative status with `e` filled. On failure the batch's segment
 * count is left as it was before the chain. */
static inline int vq_walk_chain(struct vq_memory *m, const struct vq_desc *ring_table,
                                uint32_t qsize, uint16_t head, struct vq_batch *b,
                                struct vq_walk *w, struct vq_err *e)
{
    const struct vq_desc *table = ring_table;
    uint32_t tsize = qsize;
    uint32_t idx = head;
    uint32_t ttl = qsize;
    int indirect = 0;
    int rc;
    vq_walk_begin(w, b);
    for (;;) {
        struct vq_desc d;
        vq_read_desc(&table[idx], &d);
        if (!indirect)
            w->ndesc++;
        if (d.flags & VIRTQ_DESC_F_INDIRECT) {
            if (indirect) {
                rc = vq_fail(e, VQ_E_INDIRECT_NESTED, idx, d.addr, d.len);
                goto fail;
            }
            rc = vq_walk_indirect_table(m, &d, idx, qsize, &table, &tsize, e);
            if (rc)
                goto fail;
            indirect = 1;
            idx = 0;
            ttl = tsize;
            continue;
        }
        rc = vq_walk_buffer(m, b, w, &d, idx, e);
        if (rc)
            goto fail;
        if (!(d.flags & VIRTQ_DESC_F_NEXT))
            break;
        if (d.next >= tsize) {
            rc = vq_fail(e, VQ_E_DESC_INDEX, idx, d.next, tsize);
            goto fail;
        }
        if (--ttl == 0) {
            rc = vq_fail(e, VQ_E_CHAIN_TOO_LONG, head, 0, qsize);
            goto fail;
        }
        idx = d.next;
    }
    if (w->rbytes > UINT32_MAX || w->wbytes > UINT32_MAX) {
        rc = vq_fail(e, VQ_E_CHAIN_LEN_OVERFLOW, head, 0,
                     w->rbytes > w->wbytes ? w->rbytes : w->wbytes);
        goto fail;
    }
    return 0;
fail:
    b->nseg = w->nseg0;
    if (rc == VQ_E_BATCH_TOO_SMALL)
        e->index = head, e->len = b->max_segs;
    return rc;
}

/* Packed ring (section 2.8.8): an indirect table of `n` packed descriptors (addr, len,
 * id, flags), all used in order; NEXT and id are ignored, INDIRECT is not allowed. */
static inline int vq_walk_table_seq(struct vq_memory *m, const void *table, uint32_t n,
                                    struct vq_batch *b, struct vq_walk *w, struct vq_err *e)
{
    const volatile uint64_t *p = (const volatile uint64_t *)table;
    for (uint32_t i = 0; i < n; i++) {
        struct vq_desc d;
        uint64_t addr = vq_le64(p[2 * i]);
        uint64_t rest = vq_le64(p[2 * i + 1]);      /* len | id << 32 | flags << 48 */
        d.addr = addr;
        d.len = (uint32_t)rest;
        d.flags = (uint16_t)(rest >> 48);
        d.next = 0;
        if (d.flags & VIRTQ_DESC_F_INDIRECT)
            return vq_fail(e, VQ_E_INDIRECT_NESTED, i, d.addr, d.len);
        int rc = vq_walk_buffer(m, b, w, &d, i, e);
        if (rc)
            return rc;
    }
    return 0;
}

/* Device side, both layouts: take n returned heads out of flight. Every head must be
 * in flight (popped and not yet pushed); otherwise none is taken and the first bad
 * one is reported as VQ_E_NOT_IN_FLIGHT. */
static inline int vq_inflight_take(uint8_t *inflight, uint32_t size, const uint16_t *ids,
                                   uint32_t n, struct vq_err *e)
{
    uint32_t i;
    for (i = 0; i < n; i++) {
        uint16_t h = ids[i];
        if (h >= size || !inflight[h])
            break;
        inflight[h] = 0;
    }
    if (i == n)
        return 0;
    int bad = ids[i];
    while (i--)
        inflight[ids[i]] = 1;
    return vq_fail(e, VQ_E_NOT_IN_FLIGHT, (uint32_t)bad, 0, 0);
}

/* Device side, both layouts: chains [k, count) of the last pop go back to the ring
 * (their in-flight marks cleared, the batch cut at k). Returns how many. */
static inline uint32_t vq_inflight_unpop(uint8_t *inflight, struct vq_batch *b, uint32_t k)
{
    uint32_t n = b->count - k;
    for (uint32_t i = k; i < b->count; i++)
        inflight[b->head[i]] = 0;
    b->count = k;
    b->nseg = b->seg_start[k];
    return n;
}

/* Record a walked chain as the next entry of the batch. */
static inline void vq_batch_commit(struct vq_batch *b, const struct vq_walk *w, uint16_t id)
{
    uint32_t k = b->count;
    b->head[k] = id;
    b->nread[k] = w->nread;
    b->rbytes[k] = (uint32_t)w->rbytes;
    b->wbytes[k] = (uint32_t)w->wbytes;
    b->ndesc[k] = (uint16_t)w->ndesc;
    b->seg_start[k + 1] = b->nseg;
    b->count = k + 1;
}

#endif /* VQ_CHAIN_H */
