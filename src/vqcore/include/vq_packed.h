/*
 * vq_packed.h - the packed virtqueue (VIRTIO 1.2 section 2.8), device side and driver
 * side, with the same batch interface as the split ring (vq_split.h).
 *
 * One ring of descriptors shared by both sides. A descriptor is available when its
 * AVAIL flag equals the driver's wrap counter and its USED flag does not; used when both
 * equal the device's used wrap counter. A chain is consecutive descriptors linked by
 * NEXT (wrapping at the ring's end); its buffer id is in its last descriptor. The device
 * writes one used descriptor per chain and skips as many slots as the chain took.
 * Writers make a batch visible by storing the flags of its first descriptor last, with
 * release; readers load a descriptor's flags with acquire before anything else.
 */
#ifndef VQ_PACKED_H
#define VQ_PACKED_H

#include "vq_ring.h"
#include "vq_memory.h"
#include "vq_batch.h"
#include "vq_chain.h"
#include "vq_status.h"
#include "vq_queue.h"

#define VIRTQ_DESC_F_AVAIL (1u << 7)
#define VIRTQ_DESC_F_USED  (1u << 15)

#define RING_EVENT_FLAGS_ENABLE  0u
#define RING_EVENT_FLAGS_DISABLE 1u
#define RING_EVENT_FLAGS_DESC    2u

struct vq_pdesc {
    uint64_t addr;
    uint32_t len;
    uint16_t id;
    uint16_t flags;
};

struct vq_pevent {
    uint16_t off_wrap;     /* bits 0-14 descriptor offset, bit 15 wrap counter */
    uint16_t flags;        /* RING_EVENT_FLAGS_* */
};

_Static_assert(sizeof(struct vq_pdesc) == 16, "pvirtq_desc is 16 bytes");
_Static_assert(sizeof(struct vq_pevent) == 4, "pvirtq_event_suppress is 4 bytes");

/* Copy one packed descriptor (fields in vq_desc form: flags and id) after its flags
 * were loaded with acquire; every byte is read once. */
static inline void vq_read_pdesc(const struct vq_pdesc *src, uint16_t flags, struct vq_desc *d,
                                 uint16_t *id)
{
    const volatile uint64_t *p = (const volatile uint64_t *)src;
    uint64_t addr = vq_le64(p[0]);
    uint32_t len = vq_le32(((const volatile uint32_t *)src)[2]);
    *id = vq_le16(((const volatile uint16_t *)src)[6]);
    d->addr = addr;
    d->len = len;
    d->flags = flags;
    d->next = 0;
}

static inline uint16_t vq_pdesc_flags_acquire(const struct vq_pdesc *d)
{
    return vq_load_acquire16(&d->flags);
}

static inline int vq_pdesc_is_avail(uint16_t flags, int wrap)
{
    return (!!(flags & VIRTQ_DESC_F_AVAIL)) == wrap && (!!(flags & VIRTQ_DESC_F_USED)) != wrap;
}

static inline int vq_pdesc_is_used(uint16_t flags, int wrap)
{
    return (!!(flags & VIRTQ_DESC_F_AVAIL)) == wrap && (!!(flags & VIRTQ_DESC_F_USED)) == wrap;
}

/* An index with its wrap counter in bit 15 (vhost-user's GET/SET_VRING_BASE form). */
static inline uint16_t vq_packed_idx(uint16_t idx, int wrap)
{
    return (uint16_t)(idx | (wrap ? 0x8000u : 0));
}

/* Event-index test for packed rings: did position `new` (with its wrap) pass the
 * event's (off_wrap) since `old`? Positions run 0..size-1. */
static inline int vq_packed_need_event(uint16_t off_wrap, uint16_t new_idx, uint16_t old_idx,
                                       int wrap_now, uint32_t size)
{
    uint16_t event = off_wrap & 0x7fffu;
    if ((off_wrap >> 15) != (unsigned)wrap_now)
        event = (uint16_t)(event - size);
    return vq_need_event(event, new_idx, old_idx);
}

/* ================================ device side ===================================== */

struct vq_packed_dev {
    uint32_t size;
    struct vq_pdesc *desc;
    struct vq_pevent *driver_event;   /* driver area: the driver's interrupt wishes */
    struct vq_pevent *device_event;   /* device area: our kick wishes */
    struct vq_memory *mem;
    uint8_t *inflight;                /* [size] by buffer id */
    uint16_t *id_ndesc;               /* [size] ring slots the chain of this id took */
    uint32_t num_inflight;
    uint16_t next_avail;
    uint16_t next_used;
    uint16_t signalled_used;          /* next_used at the last notification decision */
    uint8_t avail_wrap;
    uint8_t used_wrap;
    uint8_t signalled_wrap;
    uint8_t signalled_valid;
    uint8_t event_idx;
    uint8_t broken;
    struct vq_err err;
};

/* Walk the chain starting at ring slot `pos` (whose flags were already loaded; `wrap`
 * is the avail wrap counter there). Every further descriptor must be available too,
 * for the wrap counter of its own slot (section 2.8.6: flags are set in all of them). */
static inline int vq_packed_walk(struct vq_packed_dev *q, struct vq_batch *b, struct vq_walk *w,
                                 uint16_t pos, uint16_t flags0, int wrap, uint16_t *id_out)
{
    uint32_t size = q->size, ttl = size;
    uint16_t k = pos, flags = flags0, id = 0;
    struct vq_desc d;
    int rc;
    vq_walk_begin(w, b);
    for (;;) {
        vq_read_pdesc(&q->desc[k], flags, &d, &id);
        w->ndesc++;
        if (d.flags & VIRTQ_DESC_F_INDIRECT) {
            const struct vq_desc *table;
            uint32_t n;
            rc = vq_walk_indirect_table(q->mem, &d, k, size, &table, &n, &q->err);
            if (!rc)
                rc = vq_walk_table_seq(q->mem, table, n, b, w, &q->err);
            if (rc)
                goto fail;
            break;
        }
        rc = vq_walk_buffer(q->mem, b, w, &d, k, &q->err);
        if (rc)
            goto fail;
        if (!(d.flags & VIRTQ_DESC_F_NEXT))
            break;
        if (--ttl == 0) {
            rc = vq_fail(&q->err, VQ_E_CHAIN_TOO_LONG, pos, 0, size);
            goto fail;
        }
        if (++k == size) {
            k = 0;
            wrap ^= 1;
        }
        flags = vq_pdesc_flags_acquire(&q->desc[k]);
        if (!vq_pdesc_is_avail(flags, wrap)) {
            rc = vq_fail(&q->err, VQ_E_DESC_NOT_AVAIL, k, pos, flags);
            goto fail;
        }
    }
    if (w->rbytes > UINT32_MAX || w->wbytes > UINT32_MAX) {
        rc = vq_fail(&q->err, VQ_E_CHAIN_LEN_OVERFLOW, pos, 0,
                     w->rbytes > w->wbytes ? w->rbytes : w->wbytes);
        goto fail;
    }
    *id_out = id;
    return 0;
fail:
    b->nseg = w->nseg0;
    if (rc == VQ_E_BATCH_TOO_SMALL)
        q->err.index = pos, q->err.len = b->max_segs;
    return rc;
}

static inline int vq_packed_pop(struct vq_packed_dev *q, struct vq_batch *b)
{
    vq_batch_clear(b);
    VQ_RETURN_IF_BROKEN(q);
    struct vq_walk w;
    int rc = 0;
    uint16_t pos = q->next_avail;
    int wrap = q->avail_wrap;
    while (b->count < b->max_chains) {
        uint16_t flags = vq_pdesc_flags_acquire(&q->desc[pos]);
        if (!vq_pdesc_is_avail(flags, wrap))
            break;
        uint16_t id;
        rc = vq_packed_walk(q, b, &w, pos, flags, wrap, &id);
        if (rc) {
            if (rc == VQ_E_BATCH_TOO_SMALL && b->count)
                rc = 0;
            break;
        }
        if (id >= q->size) {
            rc = vq_fail(&q->err, VQ_E_HEAD_INDEX, pos, id, q->size);
            b->nseg = w.nseg0;
            break;
        }
        if (q->inflight[id]) {
            rc = vq_fail(&q->err, VQ_E_HEAD_IN_USE, id, 0, 0);
            b->nseg = w.nseg0;
            break;
        }
        vq_batch_commit(b, &w, id);
        q->inflight[id] = 1;
        q->id_ndesc[id] = (uint16_t)w.ndesc;
        uint32_t np = (uint32_t)pos + w.ndesc;
        if (np >= q->size) {
            np -= q->size;
            wrap ^= 1;
        }
        pos = (uint16_t)np;
    }
    q->next_avail = pos;
    q->avail_wrap = (uint8_t)wrap;
    q->num_inflight += b->count;
    if (rc) {
        if (vq_is_violation(rc))
            q->broken = 1;
        return rc;
    }
    return (int)b->count;
}

/* Give back chains [k, count) of the last pop (see vq_split_unpop). */
static inline void vq_packed_unpop(struct vq_packed_dev *q, struct vq_batch *b, uint32_t k)
{
    if (k >= b->count)
        return;
    uint32_t slots = 0;
    for (uint32_t i = k; i < b->count; i++)
        slots += b->ndesc[i];
    q->num_inflight -= vq_inflight_unpop(q->inflight, b, k);
    if (slots > q->next_avail) {
        q->next_avail = (uint16_t)(q->next_avail + q->size - slots);
        q->avail_wrap ^= 1;
    } else {
        q->next_avail = (uint16_t)(q->next_avail - slots);
    }
}

/* Write n used descriptors and make them visible at once (first one's flags last). */
static inline int vq_packed_push(struct vq_packed_dev *q, const uint16_t *ids,
                                 const uint32_t *lens, uint32_t n)
{
    uint32_t i;
    int rc = vq_inflight_take(q->inflight, q->size, ids, n, &q->err);
    if (rc)
        return rc;
    if (n == 0)
        return 0;
    uint32_t pos = q->next_used;
    int wrap = q->used_wrap;
    uint16_t first_flags = 0;
    uint32_t first_pos = pos;
    for (i = 0; i < n; i++) {
        struct vq_pdesc *d = &q->desc[pos];
        uint16_t flags = (uint16_t)((wrap ? (VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED) : 0)
                                    | (lens[i] ? VIRTQ_DESC_F_WRITE : 0));
        d->id = vq_tole16(ids[i]);
        d->len = vq_tole32(lens[i]);
        if (i == 0)
            first_flags = flags;
        else
            vq_store_release16(&d->flags, flags);
        pos += q->id_ndesc[ids[i]];
        if (pos >= q->size) {
            pos -= q->size;
            wrap ^= 1;
        }
    }
    vq_store_release16(&q->desc[first_pos].flags, first_flags);
    q->next_used = (uint16_t)pos;
    q->used_wrap = (uint8_t)wrap;
    q->num_inflight -= n;
    return 0;
}

static inline int vq_packed_needs_notification(struct vq_packed_dev *q)
{
    vq_fence_seq_cst();
    uint16_t new_idx = q->next_used, old_idx = q->signalled_used;
    int valid = q->signalled_valid, old_wrap = q->signalled_wrap;
    q->signalled_used = new_idx;
    q->signalled_wrap = q->used_wrap;
    q->signalled_valid = 1;
    if (valid && new_idx == old_idx && old_wrap == q->used_wrap)
        return 0;
    uint16_t flags = vq_load_relaxed16(&q->driver_event->flags);
    if (flags == RING_EVENT_FLAGS_DISABLE)
        return 0;
    if (flags != RING_EVENT_FLAGS_DESC || !q->event_idx || !valid)
        return 1;
    uint16_t off_wrap = vq_load_relaxed16(&q->driver_event->off_wrap);
    if (old_wrap != q->used_wrap)
        old_idx = (uint16_t)(old_idx - q->size);
    return vq_packed_need_event(off_wrap, new_idx, old_idx, q->used_wrap, q->size);
}

static inline int vq_packed_enable_notification(struct vq_packed_dev *q)
{
    if (q->event_idx) {
        vq_store_relaxed16(&q->device_event->off_wrap, vq_packed_idx(q->next_avail, q->avail_wrap));
        vq_store_relaxed16(&q->device_event->flags, RING_EVENT_FLAGS_DESC);
    } else {
        vq_store_relaxed16(&q->device_event->flags, RING_EVENT_FLAGS_ENABLE);
    }
    vq_fence_seq_cst();
    return vq_pdesc_is_avail(vq_pdesc_flags_acquire(&q->desc[q->next_avail]), q->avail_wrap);
}

/* Ask for a kick when the driver makes any more descriptors available (see
 * vq_split_enable_notification_more): ENABLE mode, since a DESC offset would need the
 * position after the last available chain. Always armed. */
static inline int vq_packed_enable_notification_more(struct vq_packed_dev *q)
{
    vq_store_relaxed16(&q->device_event->flags, RING_EVENT_FLAGS_ENABLE);
    vq_fence_seq_cst();
    return 1;
}

static inline void vq_packed_disable_notification(struct vq_packed_dev *q)
{
    vq_store_relaxed16(&q->device_event->flags, RING_EVENT_FLAGS_DISABLE);
}

/* As vq_split_enable_notification_after, counted in descriptor slots: a DESC event at
 * the slot n-1 past ours (one chain per slot: the common case of the net TX ring; a
 * longer chain makes the kick come sooner, never later). Without EVENT_IDX: DISABLE. */
static inline int vq_packed_enable_notification_after(struct vq_packed_dev *q, uint32_t n)
{
    if (n <= 1)
        return vq_packed_enable_notification(q);
    if (n > q->size)
        n = q->size;
    uint32_t pos = (uint32_t)q->next_avail + n - 1;
    int wrap = q->avail_wrap;
    if (pos >= q->size) {
        pos -= q->size;
        wrap ^= 1;
    }
    if (q->event_idx) {
        vq_store_relaxed16(&q->device_event->off_wrap, vq_packed_idx((uint16_t)pos, wrap));
        vq_store_relaxed16(&q->device_event->flags, RING_EVENT_FLAGS_DESC);
    } else {
        vq_store_relaxed16(&q->device_event->flags, RING_EVENT_FLAGS_DISABLE);
    }
    vq_fence_seq_cst();
    return vq_pdesc_is_avail(vq_pdesc_flags_acquire(&q->desc[pos]), wrap);
}

static inline uint16_t vq_packed_avail_pending(struct vq_packed_dev *q)
{
    return vq_pdesc_is_avail(vq_pdesc_flags_acquire(&q->desc[q->next_avail]), q->avail_wrap);
}

/* ================================ driver side ===================================== */

struct vq_packed_drv {
    uint32_t size;
    struct vq_pdesc *desc;
    struct vq_pevent *driver_event;   /* ours: interrupt wishes */
    struct vq_pevent *device_event;   /* the device's: kick wishes */
    struct vq_memory *mem;
    uint16_t *free_ids;               /* [size] stack of free buffer ids */
    uint16_t *ndesc;                  /* [size] slots the chain of this id took */
    uint32_t *wbytes;                 /* [size] */
    uint64_t *token;                  /* [size] */
    uint8_t *inflight;                /* [size] */
    uint32_t num_free;                /* free ring slots */
    uint32_t free_top;                /* ids on the free stack */
    uint16_t next_avail;
    uint16_t next_used;
    uint16_t kicked_at;
    uint8_t avail_wrap;
    uint8_t used_wrap;
    uint8_t kicked_wrap;
    uint8_t event_idx;
    uint8_t broken;
    uint64_t ind_gpa;
    uint8_t *ind_host;
    uint32_t ind_max;
    struct vq_err err;
};

static inline void vq_packed_drv_write(struct vq_pdesc *d, uint64_t addr, uint32_t len,
                                       uint16_t id)
{
    d->addr = vq_tole64(addr);
    d->len = vq_tole32(len);
    d->id = vq_tole16(id);
}

static inline int vq_packed_drv_add(struct vq_packed_drv *q, const struct vq_batch *b,
                                    uint32_t from, int indirect, int publish)
{
    (void)publish;              /* each chain becomes visible with its head's flags */
    uint32_t c;
    VQ_RETURN_IF_BROKEN(q);
    if (indirect && q->ind_host == NULL)
        return vq_fail(&q->err, VQ_E_NO_INDIRECT, from, 0, 0);
    uint16_t head_pos = q->next_avail, head_flags = 0;
    int have_head = 0;
    for (c = from; c < b->count; c++) {
        uint32_t s0 = b->seg_start[c], s1 = b->seg_start[c + 1], nseg = s1 - s0;
        uint32_t need = indirect ? 1u : nseg;
        if (nseg == 0 || b->nread[c] > nseg || (indirect ? nseg > q->ind_max : nseg > q->size)) {
            if (c == from)
                return vq_fail(&q->err, VQ_E_BAD_CHAIN, c, 0, nseg);
            break;
        }
        if (q->num_free < need || q->free_top == 0)
            break;
        uint16_t id = q->free_ids[--q->free_top];
        uint32_t pos = q->next_avail;
        int wrap = q->avail_wrap;
        uint16_t avail_bits = (uint16_t)(wrap ? VIRTQ_DESC_F_AVAIL : VIRTQ_DESC_F_USED);
        uint16_t cflags0 = 0;
        if (indirect) {
            uint64_t tg = q->ind_gpa + (uint64_t)id * q->ind_max * 16u;
            struct vq_pdesc *t = (struct vq_pdesc *)(q->ind_host + (uint64_t)id * q->ind_max * 16u);
            for (uint32_t s = s0; s < s1; s++) {
                vq_packed_drv_write(&t[s - s0], b->seg_gpa[s], (uint32_t)b->iov[s].iov_len, 0);
                t[s - s0].flags = vq_tole16((uint16_t)(s - s0 >= b->nread[c] ? VIRTQ_DESC_F_WRITE : 0));
            }
            vq_packed_drv_write(&q->desc[pos], tg, nseg * 16u, id);
            cflags0 = (uint16_t)(VIRTQ_DESC_F_INDIRECT | avail_bits);
            if (++pos == q->size) {
                pos = 0;
                wrap ^= 1;
            }
        } else {
            for (uint32_t s = s0; s < s1; s++) {
                uint16_t f = (uint16_t)((wrap ? VIRTQ_DESC_F_AVAIL : VIRTQ_DESC_F_USED)
                                        | (s - s0 >= b->nread[c] ? VIRTQ_DESC_F_WRITE : 0)
                                        | (s + 1 < s1 ? VIRTQ_DESC_F_NEXT : 0));
                vq_packed_drv_write(&q->desc[pos], b->seg_gpa[s], (uint32_t)b->iov[s].iov_len, id);
                if (s == s0)
                    cflags0 = f;
                else
                    vq_store_release16(&q->desc[pos].flags, f);
                if (++pos == q->size) {
                    pos = 0;
                    wrap ^= 1;
                }
            }
        }
        /* the chain's head flags: the batch's first head is published last */
        if (!have_head) {
            head_pos = q->next_avail;
            head_flags = cflags0;
            have_head = 1;
        } else {
            vq_store_release16(&q->desc[q->next_avail].flags, cflags0);
        }
        q->num_free -= need;
        q->ndesc[id] = (uint16_t)need;
        q->wbytes[id] = b->wbytes[c];
        q->token[id] = b->token[c];
        q->inflight[id] = 1;
        q->next_avail = (uint16_t)pos;
        q->avail_wrap = (uint8_t)wrap;
    }
    if (have_head)
        vq_store_release16(&q->desc[head_pos].flags, head_flags);
    return (int)(c - from);
}

static inline int vq_packed_drv_kick_needed(struct vq_packed_drv *q)
{
    vq_fence_seq_cst();
    uint16_t new_idx = q->next_avail, old_idx = q->kicked_at;
    int old_wrap = q->kicked_wrap;
    q->kicked_at = new_idx;
    q->kicked_wrap = q->avail_wrap;
    if (new_idx == old_idx && old_wrap == q->avail_wrap)
        return 0;
    uint16_t flags = vq_load_relaxed16(&q->device_event->flags);
    if (flags == RING_EVENT_FLAGS_DISABLE)
        return 0;
    if (flags != RING_EVENT_FLAGS_DESC || !q->event_idx)
        return 1;
    if (old_wrap != q->avail_wrap)
        old_idx = (uint16_t)(old_idx - q->size);
    return vq_packed_need_event(vq_load_relaxed16(&q->device_event->off_wrap), new_idx, old_idx,
                                q->avail_wrap, q->size);
}

static inline int vq_packed_drv_reclaim(struct vq_packed_drv *q, struct vq_batch *b)
{
    vq_batch_clear(b);
    VQ_RETURN_IF_BROKEN(q);
    uint32_t k = 0;
    uint32_t pos = q->next_used;
    int wrap = q->used_wrap;
    while (k < b->max_chains) {
        struct vq_pdesc *d = &q->desc[pos];
        uint16_t flags = vq_pdesc_flags_acquire(d);
        if (!vq_pdesc_is_used(flags, wrap))
            break;
        uint16_t id = vq_le16(((volatile uint16_t *)d)[6]);
        uint32_t len = vq_le32(((volatile uint32_t *)d)[2]);
        if (id >= q->size || !q->inflight[id]) {
            q->broken = 1;
            vq_fail(&q->err, VQ_E_USED_ID, pos, id, q->size);
            break;
        }
        if (!(flags & VIRTQ_DESC_F_WRITE))
            len = 0;
        if (len > q->wbytes[id]) {
            q->broken = 1;
            vq_fail(&q->err, VQ_E_USED_LEN, id, len, q->wbytes[id]);
            break;
        }
        b->head[k] = id;
        b->token[k] = q->token[id];
        b->used_len[k] = len;
        b->seg_start[k + 1] = 0;
        q->inflight[id] = 0;
        q->free_ids[q->free_top++] = id;
        q->num_free += q->ndesc[id];
        pos += q->ndesc[id];
        if (pos >= q->size) {
            pos -= q->size;
            wrap ^= 1;
        }
        k++;
    }
    b->count = k;
    q->next_used = (uint16_t)pos;
    q->used_wrap = (uint8_t)wrap;
    return q->broken ? q->err.code : (int)k;
}

static inline void vq_packed_drv_disable_interrupts(struct vq_packed_drv *q)
{
    vq_store_relaxed16(&q->driver_event->flags, RING_EVENT_FLAGS_DISABLE);
}

static inline int vq_packed_drv_enable_interrupts(struct vq_packed_drv *q)
{
    if (q->event_idx) {
        vq_store_relaxed16(&q->driver_event->off_wrap, vq_packed_idx(q->next_used, q->used_wrap));
        vq_store_relaxed16(&q->driver_event->flags, RING_EVENT_FLAGS_DESC);
    } else {
        vq_store_relaxed16(&q->driver_event->flags, RING_EVENT_FLAGS_ENABLE);
    }
    vq_fence_seq_cst();
    return vq_pdesc_is_used(vq_pdesc_flags_acquire(&q->desc[q->next_used]), q->used_wrap);
}

/* ================================ handles ========================================= */

/* Packed chains become visible as they are added: nothing to publish. */
static inline void vq_packed_drv_publish(struct vq_packed_drv *q) { (void)q; }

VQ_DEFINE_HANDLES(vq_packed)

#endif /* VQ_PACKED_H */
