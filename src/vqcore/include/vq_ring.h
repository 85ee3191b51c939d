/*
 * vq_ring.h - the split virtqueue's shared-memory layout (VIRTIO 1.2 section 2.7),
 * little-endian field access, the memory-ordering primitives and the event-index
 * arithmetic used by both sides of a queue.
 *
 * Everything here is static inline so the Cython modules compile it straight into
 * their hot loops. Rings are little-endian (VIRTIO_F_VERSION_1); legacy rings are out
 * of scope.
 */
#ifndef VQ_RING_H
#define VQ_RING_H

#include <stdint.h>
#include <stddef.h>
#include <string.h>
#include <endian.h>

/* Descriptor flags (split and indirect tables). */
#define VIRTQ_DESC_F_NEXT      1u
#define VIRTQ_DESC_F_WRITE     2u
#define VIRTQ_DESC_F_INDIRECT  4u

/* Ring flags. */
#define VIRTQ_USED_F_NO_NOTIFY     1u
#define VIRTQ_AVAIL_F_NO_INTERRUPT 1u

#define VQ_MAX_QUEUE_SIZE 32768u

/* Alignment the spec requires of each split-ring part (section 2.7, VERSION_1). */
#define VQ_DESC_ALIGN  16u
#define VQ_AVAIL_ALIGN 2u
#define VQ_USED_ALIGN  4u

struct vq_desc {
    uint64_t addr;
    uint32_t len;
    uint16_t flags;
    uint16_t next;
};

struct vq_avail {
    uint16_t flags;
    uint16_t idx;
    uint16_t ring[];      /* then: uint16_t used_event */
};

struct vq_used_elem {
    uint32_t id;
    uint32_t len;
};

struct vq_used {
    uint16_t flags;
    uint16_t idx;
    struct vq_used_elem ring[];   /* then: uint16_t avail_event */
};

_Static_assert(sizeof(struct vq_desc) == 16, "virtq_desc is 16 bytes");
_Static_assert(sizeof(struct vq_used_elem) == 8, "virtq_used_elem is 8 bytes");
_Static_assert(offsetof(struct vq_avail, ring) == 4, "avail ring starts at 4");
_Static_assert(offsetof(struct vq_used, ring) == 4, "used ring starts at 4");

/* Sizes in bytes of each part for a queue of `n` entries (with the event fields). */
static inline uint64_t vq_desc_bytes(uint32_t n)  { return 16ull * n; }
static inline uint64_t vq_avail_bytes(uint32_t n) { return 6ull + 2ull * n; }
static inline uint64_t vq_used_bytes(uint32_t n)  { return 6ull + 8ull * n; }

/* ---- little-endian access ------------------------------------------------------- */
static inline uint16_t vq_le16(uint16_t v) { return le16toh(v); }
static inline uint32_t vq_le32(uint32_t v) { return le32toh(v); }
static inline uint64_t vq_le64(uint64_t v) { return le64toh(v); }
static inline uint16_t vq_tole16(uint16_t v) { return htole16(v); }
static inline uint32_t vq_tole32(uint32_t v) { return htole32(v); }
static inline uint64_t vq_tole64(uint64_t v) { return htole64(v); }

/* ---- memory ordering ----------------------------------------------------------------
 * Acquire when reading the index the other side publishes (what it wrote before the
 * index is then visible), release when publishing ours, and a full fence between
 * publishing and reading the other side's event index / flags (the store-load order
 * that notification suppression depends on).
 */
static inline uint16_t vq_load_acquire16(const uint16_t *p)
{
    return vq_le16(__atomic_load_n(p, __ATOMIC_ACQUIRE));
}
static inline uint16_t vq_load_relaxed16(const uint16_t *p)
{
    return vq_le16(__atomic_load_n(p, __ATOMIC_RELAXED));
}
static inline void vq_store_release16(uint16_t *p, uint16_t v)
{
    __atomic_store_n(p, vq_tole16(v), __ATOMIC_RELEASE);
}
static inline void vq_store_relaxed16(uint16_t *p, uint16_t v)
{
    __atomic_store_n(p, vq_tole16(v), __ATOMIC_RELAXED);
}
static inline void vq_fence_seq_cst(void) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
static inline void vq_fence_release(void) { __atomic_thread_fence(__ATOMIC_RELEASE); }
static inline void vq_fence_acquire(void) { __atomic_thread_fence(__ATOMIC_ACQUIRE); }

/* Copy one descriptor out of shared memory exactly once (time-of-check/time-of-use:
 * every check and every use afterwards reads the private copy). */
static inline void vq_read_desc(const struct vq_desc *src, struct vq_desc *dst)
{
    /* Two volatile 8-byte loads: each byte of the descriptor is read exactly once. */
    const volatile uint64_t *p = (const volatile uint64_t *)src;
    uint64_t addr = vq_le64(p[0]);
    uint64_t rest = vq_le64(p[1]);          /* len | flags << 32 | next << 48 */
    dst->addr = addr;
    dst->len = (uint32_t)rest;
    dst->flags = (uint16_t)(rest >> 32);
    dst->next = (uint16_t)(rest >> 48);
}

static inline void vq_write_desc(struct vq_desc *dst, uint64_t addr, uint32_t len,
                                 uint16_t flags, uint16_t next)
{
    struct vq_desc tmp;
    tmp.addr = vq_tole64(addr);
    tmp.len = vq_tole32(len);
    tmp.flags = vq_tole16(flags);
    tmp.next = vq_tole16(next);
    memcpy((void *)dst, &tmp, sizeof tmp);
}

/* Event-index fields that trail the avail and used rings. */
static inline uint16_t *vq_used_event(struct vq_avail *avail, uint32_t n)
{
    return &avail->ring[n];
}
static inline uint16_t *vq_avail_event(struct vq_used *used, uint32_t n)
{
    return (uint16_t *)&used->ring[n];
}

/* The spec's vring_need_event: true when event_idx lies in [old, new), all mod 2^16
 * (the other side asked to be told once the index moves past event_idx). */
static inline int vq_need_event(uint16_t event_idx, uint16_t new_idx, uint16_t old_idx)
{
    return (uint16_t)(new_idx - event_idx - 1) < (uint16_t)(new_idx - old_idx);
}

#endif /* VQ_RING_H */
