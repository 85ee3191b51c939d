/*
 * vq_split.h - the split virtqueue (VIRTIO 1.2 section 2.7), device side and driver side.
 *
 * Device side: pop available chains into a batch, push a batch of used elements and
 * publish used->idx once, notification suppression (flags or event index).
 * Driver side: free-descriptor list, add a batch of chains (direct or through an
 * indirect table) and publish avail->idx once, kick decision, reclaim used chains.
 *
 * Ordering: the other side's index is read with acquire, ours is published with
 * release, and a seq_cst fence separates publishing from reading the other side's
 * event index or flags. Each index is read once per batch.
 */
#ifndef VQ_SPLIT_H
#define VQ_SPLIT_H

#include "vq_ring.h"
#include "vq_memory.h"
#include "vq_batch.h"
#include "vq_chain.h"
#include "vq_status.h"
#include "vq_queue.h"

/* ================================ device side ===================================== */

struct vq_split_dev {
    uint32_t size;
    uint32_t mask;
    struct vq_desc *desc;
    struct vq_avail *avail;
    struct vq_used *used;
    struct vq_memory *mem;
    uint8_t *inflight;        /* [size] 1 while the device holds the head */
    uint32_t num_inflight;
    uint16_t last_avail;      /* next avail slot to consume */
    uint16_t used_idx;        /* next used slot to fill (published after each push) */
    uint16_t signalled_used;  /* used_idx at the last notification decision */
    uint16_t used_flags;      /* our shadow of used->flags */
    uint8_t signalled_valid;
    uint8_t event_idx;
    uint8_t broken;
    struct vq_err err;
};

/* Pop up to b->max_chains available chains into b (cleared first).
 * Returns the number popped, or a negative status. On a violation the chains popped
 * before it stay in the batch and the queue is marked broken. */
static inline int vq_split_pop(struct vq_split_dev *q, struct vq_batch *b)
{
    vq_batch_clear(b);
    VQ_RETURN_IF_BROKEN(q);
    const uint32_t size = q->size, mask = q->mask;
    const uint16_t *ring = q->avail->ring;
    const struct vq_desc *desc = q->desc;
    struct vq_memory *mem = q->mem;
    uint8_t *inflight = q->inflight;
    uint16_t last = q->last_avail;
    uint16_t avail_idx = vq_load_acquire16(&q->avail->idx);
    uint16_t pending = (uint16_t)(avail_idx - last);
    if (pending > size) {
        q->broken = 1;
        return vq_fail(&q->err, VQ_E_AVAIL_IDX, last, avail_idx, pending);
    }
    uint32_t n = pending < b->max_chains ? pending : b->max_chains;
    struct vq_walk w;
    int rc = 0;
    for (uint32_t i = 0; i < n; i++) {
        uint16_t slot = (uint16_t)(last & mask);
        uint16_t head = vq_load_relaxed16(&ring[slot]);
        if (head >= size) {
            rc = vq_fail(&q->err, VQ_E_HEAD_INDEX, slot, head, size);
            break;
        }
        if (inflight[head]) {
            rc = vq_fail(&q->err, VQ_E_HEAD_IN_USE, head, 0, 0);
            break;
        }
        rc = vq_walk_chain(mem, desc, size, head, b, &w, &q->err);
        if (rc) {
            if (rc == VQ_E_BATCH_TOO_SMALL && b->count)
                rc = 0;         /* no room left for this chain: the next pop takes it */
            break;
        }
        vq_batch_commit(b, &w, head);
        inflight[head] = 1;
        last++;
    }
    q->last_avail = last;
    q->num_inflight += b->count;
    if (rc) {
        if (vq_is_violation(rc))
            q->broken = 1;
        return rc;
    }
    return (int)b->count;
}

/* Give back chains [k, count) of the last pop (the most recent ones, in order): the
 * next pop returns them again. Used when a burst could not use every chain. */
static inline void vq_split_unpop(struct vq_split_dev *q, struct vq_batch *b, uint32_t k)
{
    if (k >= b->count)
        return;
    uint32_t n = vq_inflight_unpop(q->inflight, b, k);
    q->last_avail = (uint16_t)(q->last_avail - n);
    q->num_inflight -= n;
}

/* Write n used elements (heads[i], lens[i]) and publish used->idx once.
 * Every head must be in flight; otherwise nothing is written. */
static inline int vq_split_push(struct vq_split_dev *q, const uint16_t *heads,
                                const uint32_t *lens, uint32_t n)
{
    uint32_t i;
    int rc = vq_inflight_take(q->inflight, q->size, heads, n, &q->err);
    if (rc)
        return rc;
    uint16_t u = q->used_idx;
    for (i = 0; i < n; i++) {
        struct vq_used_elem *el = &q->used->ring[(uint16_t)(u + i) & q->mask];
        el->id = vq_tole32(heads[i]);
        el->len = vq_tole32(lens[i]);
    }
    q->used_idx = (uint16_t)(u + n);
    q->num_inflight -= n;
    vq_store_release16(&q->used->idx, q->used_idx);
    return 0;
}

/* After a push: must the driver be interrupted? (spec 2.7.7.2 / vring_need_event) */
static inline int vq_split_needs_notification(struct vq_split_dev *q)
{
    vq_fence_seq_cst();
    uint16_t new_idx = q->used_idx;
    uint16_t old_idx = q->signalled_used;
    int valid = q->signalled_valid;
    q->signalled_used = new_idx;
    q->signalled_valid = 1;
    if (valid && new_idx == old_idx)
        return 0;
    if (q->event_idx) {
        if (!valid)
            return 1;
        uint16_t ev = vq_load_relaxed16(vq_used_event(q->avail, q->size));
        return vq_need_event(ev, new_idx, old_idx);
    }
    return !(vq_load_relaxed16(&q->avail->flags) & VIRTQ_AVAIL_F_NO_INTERRUPT);
}

/* Ask the driver to kick again. Returns 1 when work arrived meanwhile (the caller
 * must drain again: the race-free loop is disable, drain, enable, re-check). */
static inline int vq_split_enable_notification(struct vq_split_dev *q)
{
    if (q->event_idx) {
        vq_store_relaxed16(vq_avail_event(q->used, q->size), q->last_avail);
    } else {
        q->used_flags &= (uint16_t)~VIRTQ_USED_F_NO_NOTIFY;
        vq_store_relaxed16(&q->used->flags, q->used_flags);
    }
    vq_fence_seq_cst();
    return vq_load_acquire16(&q->avail->idx) != q->last_avail;
}

/* Ask for a kick only when the driver makes buffers available beyond those there now
 * (the device cannot use what is there: too little room for the next frame). Returns 1
 * when armed: the caller looks at the ring once more (what arrived before this call is
 * seen then) and may sleep; anything added later kicks. Returns 0 when the driver kept
 * moving the index while we armed (bounded: a guest cannot hold us here): look again. */
static inline int vq_split_enable_notification_more(struct vq_split_dev *q)
{
    if (!q->event_idx) {
        vq_split_enable_notification(q);
        return 1;
    }
    for (int tries = 0; tries < 8; tries++) {
        uint16_t seen = vq_load_acquire16(&q->avail->idx);
        vq_store_relaxed16(vq_avail_event(q->used, q->size), seen);
        vq_fence_seq_cst();
        if (vq_load_acquire16(&q->avail->idx) == seen)
            return 1;
    }
    return 0;
}

static inline void vq_split_disable_notification(struct vq_split_dev *q)
{
    if (!q->event_idx) {
        q->used_flags |= VIRTQ_USED_F_NO_NOTIFY;
        vq_store_relaxed16(&q->used->flags, q->used_flags);
    }
    /* With EVENT_IDX the avail_event simply stays behind: at most one more kick. */
}

/* Ask for the next kick only once n chains (1..size) wait unpopped: avail_event n-1
 * past our index. The device batches the driver's work and bounds the wait with a
 * timer of its own. Without EVENT_IDX a count cannot be asked for: notifications stay
 * disabled and the timer alone wakes the device. Returns 1 when n chains already wait
 * (drain now: the driver passed the event before it was written and will not kick). */
static inline int vq_split_enable_notification_after(struct vq_split_dev *q, uint32_t n)
{
    if (n <= 1)
        return vq_split_enable_notification(q);
    if (n > q->size)
        n = q->size;
    if (q->event_idx)
        vq_store_relaxed16(vq_avail_event(q->used, q->size), (uint16_t)(q->last_avail + n - 1));
    else
        vq_split_disable_notification(q);
    vq_fence_seq_cst();
    return (uint16_t)(vq_load_acquire16(&q->avail->idx) - q->last_avail) >= n;
}

/* Chains the driver has made available and we have not popped yet. */
static inline uint16_t vq_split_avail_pending(struct vq_split_dev *q)
{
    return (uint16_t)(vq_load_acquire16(&q->avail->idx) - q->last_avail);
}

/* ================================ driver side ===================================== */

struct vq_split_drv {
    uint32_t size;
    uint32_t mask;
    struct vq_desc *desc;
    struct vq_avail *avail;
    struct vq_used *used;
    struct vq_memory *mem;
    /* private bookkeeping, never in shared memory */
    uint16_t *free_next;      /* [size] free list links; a chain keeps its links in flight */
    uint16_t *tail;           /* [size] last descriptor of the chain at this head */
    uint16_t *ndesc;          /* [size] descriptors the chain at this head took */
    uint32_t *wbytes;         /* [size] writable bytes of the chain */
    uint64_t *token;          /* [size] caller's cookie */
    uint8_t *inflight;        /* [size] */
    uint32_t num_free;
    uint16_t free_head;
    uint16_t avail_idx;       /* next avail slot to fill */
    uint16_t kicked_at;       /* avail idx at the last kick decision */
    uint16_t last_used;       /* next used slot to read */
    uint16_t avail_flags;     /* shadow of avail->flags */
    uint8_t event_idx;
    uint8_t broken;
    /* indirect tables: one of ind_max entries per head, at ind_gpa + head*ind_max*16 */
    uint64_t ind_gpa;
    uint8_t *ind_host;
    uint32_t ind_max;
    struct vq_err err;
};

static inline void vq_split_drv_publish(struct vq_split_drv *q)
{
    vq_store_release16(&q->avail->idx, q->avail_idx);
}

/* Write one chain's descriptors; `flags_last` is the flag set on the last entry. */
static inline void vq_split_drv_fill(struct vq_desc *table, const uint16_t *link,
                                     uint16_t first, const struct vq_batch *b, uint32_t c,
                                     uint16_t *last)
{
    uint32_t s0 = b->seg_start[c], s1 = b->seg_start[c + 1], nr = b->nread[c];
    uint16_t idx = first;
    for (uint32_t s = s0; s < s1; s++) {
        uint16_t flags = (s - s0 >= nr) ? VIRTQ_DESC_F_WRITE : 0;
        uint16_t nxt = link ? link[idx] : (uint16_t)(idx + 1);
        if (s + 1 < s1)
            flags |= VIRTQ_DESC_F_NEXT;
        else
            nxt = 0;
        vq_write_desc(&table[idx], b->seg_gpa[s], (uint32_t)b->iov[s].iov_len, flags, nxt);
        *last = idx;
        if (s + 1 < s1)
            idx = link ? link[idx] : (uint16_t)(idx + 1);
    }
}

/* Add the chains of batch b (readable segments then writable ones, each with its
 * token) from chain `from` on; stops early when descriptors run out.
 * Returns the number of chains added, or a negative status. */
static inline int vq_split_drv_add(struct vq_split_drv *q, const struct vq_batch *b,
                                   uint32_t from, int indirect, int publish)
{
    uint32_t c;
    VQ_RETURN_IF_BROKEN(q);
    if (indirect && q->ind_host == NULL)
        return vq_fail(&q->err, VQ_E_NO_INDIRECT, from, 0, 0);
    for (c = from; c < b->count; c++) {
        uint32_t nseg = b->seg_start[c + 1] - b->seg_start[c];
        uint32_t need = indirect ? 1u : nseg;
        if (nseg == 0 || b->nread[c] > nseg || (indirect ? nseg > q->ind_max : nseg > q->size)) {
            if (c == from)
                return vq_fail(&q->err, VQ_E_BAD_CHAIN, c, 0, nseg);
            break;              /* publish what was added; the next call reports it */
        }
        if (q->num_free < need)
            break;
        uint16_t head = q->free_head, last = head;
        if (indirect) {
            struct vq_desc *t = (struct vq_desc *)(q->ind_host + (uint64_t)head * q->ind_max * 16u);
            uint16_t ignored;
            vq_split_drv_fill(t, NULL, 0, b, c, &ignored);
            vq_write_desc(&q->desc[head], q->ind_gpa + (uint64_t)head * q->ind_max * 16u,
                          nseg * 16u, VIRTQ_DESC_F_INDIRECT, 0);
        } else {
            vq_split_drv_fill(q->desc, q->free_next, head, b, c, &last);
        }
        q->free_head = q->free_next[last];
        q->num_free -= need;
        q->tail[head] = last;
        q->ndesc[head] = (uint16_t)need;
        q->wbytes[head] = b->wbytes[c];
        q->token[head] = b->token[c];
        q->inflight[head] = 1;
        vq_store_relaxed16(&q->avail->ring[q->avail_idx & q->mask], head);
        q->avail_idx++;
    }
    if (publish)
        vq_split_drv_publish(q);
    return (int)(c - from);
}

/* Must the device be kicked for what was published since the last decision? */
static inline int vq_split_drv_kick_needed(struct vq_split_drv *q)
{
    vq_fence_seq_cst();
    /* what was published (our own avail->idx), not chains added with publish=False:
     * counting those would move kicked_at past them and lose their kick */
    uint16_t new_idx = vq_load_relaxed16(&q->avail->idx), old_idx = q->kicked_at;
    q->kicked_at = new_idx;
    if (new_idx == old_idx)
        return 0;
    if (q->event_idx)
        return vq_need_event(vq_load_relaxed16(vq_avail_event(q->used, q->size)), new_idx, old_idx);
    return !(vq_load_relaxed16(&q->used->flags) & VIRTQ_USED_F_NO_NOTIFY);
}

/* Reclaim up to b->max_chains used chains into b: head, token, used_len per chain
 * (no segments). Returns the number reclaimed or a negative status. */
static inline int vq_split_drv_reclaim(struct vq_split_drv *q, struct vq_batch *b)
{
    vq_batch_clear(b);
    VQ_RETURN_IF_BROKEN(q);
    uint16_t used_idx = vq_load_acquire16(&q->used->idx);
    uint16_t pending = (uint16_t)(used_idx - q->last_used);
    if (pending > q->size) {
        q->broken = 1;
        return vq_fail(&q->err, VQ_E_USED_IDX, q->last_used, used_idx, pending);
    }
    uint32_t n = pending < b->max_chains ? pending : b->max_chains;
    uint32_t k;
    for (k = 0; k < n; k++) {
        struct vq_used_elem el;
        memcpy(&el, (const void *)&q->used->ring[(uint16_t)(q->last_used + k) & q->mask], sizeof el);
        __atomic_signal_fence(__ATOMIC_SEQ_CST);
        uint32_t id = vq_le32(el.id), len = vq_le32(el.len);
        if (id >= q->size || !q->inflight[id]) {
            q->broken = 1;
            vq_fail(&q->err, VQ_E_USED_ID, (uint16_t)(q->last_used + k), id, q->size);
            break;
        }
        if (len > q->wbytes[id]) {
            q->broken = 1;
            vq_fail(&q->err, VQ_E_USED_LEN, id, len, q->wbytes[id]);
            break;
        }
        b->head[k] = (uint16_t)id;
        b->token[k] = q->token[id];
        b->used_len[k] = len;
        b->seg_start[k + 1] = 0;
        q->inflight[id] = 0;
        q->free_next[q->tail[id]] = q->free_head;
        q->free_head = (uint16_t)id;
        q->num_free += q->ndesc[id];
    }
    b->count = k;
    q->last_used = (uint16_t)(q->last_used + k);
    return q->broken ? q->err.code : (int)k;
}

/* Interrupt suppression on the driver side. */
static inline void vq_split_drv_disable_interrupts(struct vq_split_drv *q)
{
    if (q->event_idx) {
        /* park used_event half the index space away: no interrupt until re-enabled */
        vq_store_relaxed16(vq_used_event(q->avail, q->size), (uint16_t)(q->last_used + 0x8000u));
    } else {
        q->avail_flags |= VIRTQ_AVAIL_F_NO_INTERRUPT;
        vq_store_relaxed16(&q->avail->flags, q->avail_flags);
    }
}

/* Returns 1 when used chains are already waiting (reclaim before sleeping). */
static inline int vq_split_drv_enable_interrupts(struct vq_split_drv *q)
{
    if (q->event_idx) {
        vq_store_relaxed16(vq_used_event(q->avail, q->size), q->last_used);
    } else {
        q->avail_flags &= (uint16_t)~VIRTQ_AVAIL_F_NO_INTERRUPT;
        vq_store_relaxed16(&q->avail->flags, q->avail_flags);
    }
    vq_fence_seq_cst();
    return vq_load_acquire16(&q->used->idx) != q->last_used;
}

/* ================================ handles ========================================= */

VQ_DEFINE_HANDLES(vq_split)

#endif /* VQ_SPLIT_H */
