/*
 * vq_memory.h - guest memory: a sorted table of regions of guest-physical address
 * space, each backed by host memory, and the translations the ring code needs.
 *
 * A range must lie inside one region to be used as a pointer (rings, indirect tables);
 * a buffer may cross adjacent regions and then becomes several iovec pieces.
 */
#ifndef VQ_MEMORY_H
#define VQ_MEMORY_H

#include <stdint.h>
#include <sys/uio.h>
#include "vq_status.h"

#define VQ_MAX_REGIONS 512

struct vq_region {
    uint64_t gpa;       /* guest-physical start */
    uint64_t size;      /* bytes, > 0 */
    uint64_t uva;       /* the frontend's virtual address of the start (vhost-user) */
    uint8_t *host;      /* our mapping of the start */
};

struct vq_memory {
    uint32_t n;
    uint32_t last;      /* index of the last region hit: a hint, read and written relaxed */
    struct vq_region r[VQ_MAX_REGIONS];
};

/* Index of the region holding gpa, or -1. */
static inline int vq_mem_find(struct vq_memory *m, uint64_t gpa)
{
    uint32_t n = m->n;
    if (n == 0)
        return -1;
    uint32_t hint = __atomic_load_n(&m->last, __ATOMIC_RELAXED);
    if (hint < n && gpa - m->r[hint].gpa < m->r[hint].size)
        return (int)hint;
    uint32_t lo = 0, hi = n;
    while (lo < hi) {
        uint32_t mid = (lo + hi) / 2;
        const struct vq_region *r = &m->r[mid];
        if (gpa < r->gpa) {
            hi = mid;
        } else if (gpa - r->gpa >= r->size) {
            lo = mid + 1;
        } else {
            __atomic_store_n(&m->last, mid, __ATOMIC_RELAXED);
            return (int)mid;
        }
    }
    return -1;
}

/* Host pointer to [gpa, gpa+len) when it lies inside one region, else NULL. */
static inline uint8_t *vq_mem_ptr(struct vq_memory *m, uint64_t gpa, uint64_t len)
{
    int i = vq_mem_find(m, gpa);
    if (i < 0)
        return NULL;
    const struct vq_region *r = &m->r[i];
    uint64_t off = gpa - r->gpa;
    if (len > r->size - off)
        return NULL;
    return r->host + off;
}

/*
 * Split [gpa, gpa+len) into at most `max` host pieces (one per region crossed).
 * Returns the number of pieces, or VQ_E_ADDR_OVERFLOW, VQ_E_OUT_OF_BOUNDS,
 * VQ_E_BATCH_TOO_SMALL. `gpas` (may be NULL) receives each piece's guest address.
 * A zero length gives zero pieces.
 */
static inline int vq_mem_iov(struct vq_memory *m, uint64_t gpa, uint64_t len,
                             struct iovec *iov, uint64_t *gpas, uint32_t max)
{
    if (len && len - 1 > UINT64_MAX - gpa)   /* a range may end exactly at 2^64 */
        return VQ_E_ADDR_OVERFLOW;
    uint32_t n = 0;
    while (len) {
        int i = vq_mem_find(m, gpa);
        if (i < 0)
            return VQ_E_OUT_OF_BOUNDS;
        if (n == max)
            return VQ_E_BATCH_TOO_SMALL;
        const struct vq_region *r = &m->r[i];
        uint64_t off = gpa - r->gpa;
        uint64_t room = r->size - off;
        uint64_t chunk = len < room ? len : room;
        iov[n].iov_base = r->host + off;
        iov[n].iov_len = (size_t)chunk;
        if (gpas)
            gpas[n] = gpa;
        n++;
        gpa += chunk;
        len -= chunk;
    }
    return (int)n;
}

/* Guest-physical address of a frontend virtual address range inside one region, or
 * UINT64_MAX when none holds it whole. */
static inline uint64_t vq_mem_uva_to_gpa(const struct vq_memory *m, uint64_t uva,
                                         uint64_t len)
{
    for (uint32_t i = 0; i < m->n; i++) {
        const struct vq_region *r = &m->r[i];
        if (uva - r->uva < r->size && len <= r->size - (uva - r->uva))
            return r->gpa + (uva - r->uva);
    }
    return UINT64_MAX;
}

#endif /* VQ_MEMORY_H */
