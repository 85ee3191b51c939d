/*
 * vq_status.h - status codes returned by the nogil kernels. Zero or positive is
 * success; a negative value names one kind of failure. One checker in status.pyx turns
 * a code (with the detail the kernel recorded) into the matching exception class.
 */
#ifndef VQ_STATUS_H
#define VQ_STATUS_H

#include <stdint.h>

enum vq_status {
    VQ_OK = 0,
    /* Violations by the other side of the ring (the guest, or for a driver queue the
     * device). They mark the queue broken. */
    VQ_E_HEAD_INDEX = -1,          /* avail ring names a head >= queue size */
    VQ_E_DESC_INDEX = -2,          /* next (or indirect next) beyond the table */
    VQ_E_AVAIL_IDX = -3,           /* avail->idx more than queue size ahead */
    VQ_E_CHAIN_TOO_LONG = -4,      /* more descriptors than the queue size: a loop */
    VQ_E_INDIRECT_LEN = -5,        /* indirect length 0 or not a multiple of 16 */
    VQ_E_INDIRECT_NESTED = -6,     /* INDIRECT inside an indirect table */
    VQ_E_INDIRECT_NEXT = -7,       /* INDIRECT together with NEXT */
    VQ_E_INDIRECT_TOO_LONG = -8,   /* indirect table with more entries than allowed */
    VQ_E_INDIRECT_SPLIT = -9,      /* indirect table not inside one memory region */
    VQ_E_OUT_OF_BOUNDS = -10,      /* buffer not inside guest memory */
    VQ_E_ADDR_OVERFLOW = -11,      /* addr + len wraps 64 bits */
    VQ_E_CHAIN_LEN_OVERFLOW = -12, /* readable or writable total over 2^32 - 1 */
    VQ_E_WRITE_ORDER = -13,        /* a readable segment after a writable one */
    VQ_E_HEAD_IN_USE = -14,        /* head offered again while still in flight */
    VQ_E_USED_IDX = -15,           /* used->idx more than queue size ahead */
    VQ_E_USED_ID = -16,            /* used element names a head not in flight */
    VQ_E_USED_LEN = -17,           /* used length larger than the writable bytes */
    VQ_E_NET_HDR = -18,            /* net: chain shorter than the virtio-net header */
    VQ_E_DESC_NOT_AVAIL = -19,     /* packed: a chain runs into a descriptor not available */
    VQ_E_LAST_VIOLATION = -19,
    /* Errors of the caller; the queue stays usable. */
    VQ_E_NOT_IN_FLIGHT = -20,      /* push_used of a head that was not popped */
    VQ_E_BATCH_TOO_SMALL = -21,    /* one chain needs more segments than the batch has */
    VQ_E_BROKEN = -22,             /* the queue was broken by an earlier violation */
    VQ_E_BAD_CHAIN = -23,          /* driver: a chain given to add() is malformed */
    VQ_E_NO_INDIRECT = -24,        /* driver: indirect asked for without an area */
};

/* Detail of the last failure, for the message. */
struct vq_err {
    int code;
    uint32_t index;     /* descriptor / head / ring position involved */
    uint64_t addr;      /* address involved */
    uint64_t len;       /* length or count involved */
};

static inline int vq_fail(struct vq_err *e, int code, uint32_t index, uint64_t addr,
                          uint64_t len)
{
    e->code = code;
    e->index = index;
    e->addr = addr;
    e->len = len;
    return code;
}

/* The check every ring operation starts with: a queue broken by an earlier violation
 * answers VQ_E_BROKEN (QueueBroken), never the violation that broke it again. ``q`` is
 * any queue with ``broken`` and ``err`` members (split or packed, either side). */
#define VQ_RETURN_IF_BROKEN(q)                                                  \
    do {                                                                        \
        if ((q)->broken)                                                        \
            return vq_fail(&(q)->err, VQ_E_BROKEN, 0, 0, 0);                    \
    } while (0)

static inline int vq_is_violation(int code)
{
    return code <= VQ_E_HEAD_INDEX && code >= VQ_E_LAST_VIOLATION;
}

#endif /* VQ_STATUS_H */
