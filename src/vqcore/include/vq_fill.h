/*
 * vq_fill.h - the fill burst kernel: device-writable guest buffers filled from a file
 * descriptor (virtio-rng's request queue, VIRTIO 1.2 section 5.4, fed by /dev/urandom
 * or any other byte source).
 *
 * Pop a batch of request chains, readv from the fd straight into each chain's writable
 * segments (zero-copy; a short read is followed by another until the chain is full,
 * the fd has nothing more, or the byte budget is spent), push the used elements with
 * the bytes written, publish once, decide the interrupt once.
 *
 * A chain is never completed empty for want of data: when the budget is spent or the
 * fd gives nothing (EAGAIN, end of file, an error), that chain and those after it go
 * back to the ring (unpop) and the next burst pops them again. The exception is a
 * chain with no writable byte at all (the spec's requests are writable buffers): it is
 * counted as an error and completed with length 0, since it can never be filled.
 *
 * Everything runs without the GIL; no allocation.
 */
#ifndef VQ_FILL_H
#define VQ_FILL_H

#include <errno.h>
#include <stdint.h>
#include <sys/uio.h>
#include <unistd.h>

#include "vq_queue.h"

#define VQ_FILL_MAX_IOV 1024         /* IOV_MAX on Linux */

struct vq_fill_stats {
    uint64_t requests;      /* chains completed (those without a writable byte too) */
    uint64_t bytes;         /* bytes written into guest buffers */
    uint64_t bursts;        /* burst calls that completed something */
    uint64_t notifications; /* interrupts sent through call_fd */
    uint64_t errors;        /* chains without a writable byte, and failed reads */
    uint64_t read_errors;   /* failed reads: end of file or an errno other than EAGAIN */
    int last_errno;         /* errno of the last failed read (0: end of file) */
    int fd_empty;           /* last burst: the fd had nothing to read (EAGAIN) */
    int fd_failed;          /* last burst: the fd hit end of file or failed */
    int ring_empty;         /* last burst: the guest had no (more) requests */
};

/* The part [skip, skip + limit) of the n segments at src, as at most max iovecs in dst
 * (the last one cut to fit). Returns how many. */
static inline uint32_t vq_iov_window(const struct iovec *src, uint32_t n, uint64_t skip,
                                     uint64_t limit, struct iovec *dst, uint32_t max)
{
    uint32_t k = 0;
    for (uint32_t i = 0; i < n && k < max && limit; i++) {
        uint64_t l = src[i].iov_len;
        if (skip >= l) {
            skip -= l;
            continue;
        }
        uint64_t take = l - skip;
        if (take > limit)
            take = limit;
        dst[k].iov_base = (uint8_t *)src[i].iov_base + skip;
        dst[k].iov_len = take;
        k++;
        limit -= take;
        skip = 0;
    }
    return k;
}

/* Fill up to `want` bytes of the n writable segments at iov from fd. Returns the bytes
 * read; a read that stopped it early leaves its outcome in st (fd_empty / fd_failed). */
static inline uint64_t vq_fill_chain(const struct iovec *iov, uint32_t n, uint64_t want,
                                     int fd, struct iovec *win, struct vq_fill_stats *st)
{
    uint64_t got = 0;
    while (got < want) {
        uint32_t k = vq_iov_window(iov, n, got, want - got, win, VQ_FILL_MAX_IOV);
        ssize_t r;
        do {
            r = readv(fd, win, (int)k);
        } while (r < 0 && errno == EINTR);
        if (r > 0) {
            got += (uint64_t)r;
            continue;
        }
        if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            st->fd_empty = 1;
        } else {
            st->fd_failed = 1;
            st->last_errno = r < 0 ? errno : 0;
            st->read_errors++;
            st->errors++;
        }
        break;
    }
    return got;
}

/* One burst: fill up to batch->max_chains requests with at most max_bytes bytes in all.
 * Returns the requests completed, or a negative status (a violation found by the pop:
 * the chains popped before it are still filled and completed, then the status is
 * returned; the queue is broken). */
static inline int vq_fill_burst(struct vq_dev *q, struct vq_batch *b, int fd,
                                uint64_t max_bytes, int call_fd, struct vq_fill_stats *st)
{
    struct iovec win[VQ_FILL_MAX_IOV];
    st->fd_empty = 0;
    st->fd_failed = 0;
    st->ring_empty = 0;
    if (max_bytes == 0)
        return 0;               /* no budget: leave every request in the ring */
    int status = q->ops->pop(q->q, b);
    if (status < 0 && b->count == 0) {
        st->ring_empty = 1;
        return status;
    }
    if (status > 0)
        status = 0;             /* (a violation after good chains: serve those first) */
    uint32_t n = b->count, c;
    uint64_t budget = max_bytes, bytes = 0;
    for (c = 0; c < n; c++) {
        uint32_t w0 = b->seg_start[c] + b->nread[c], w1 = b->seg_start[c + 1];
        if (b->wbytes[c] == 0) {
            b->used_len[c] = 0; /* nothing to fill, ever: complete it empty */
            st->errors++;
            continue;
        }
        if (budget == 0 || st->fd_empty || st->fd_failed)
            break;
        uint64_t want = b->wbytes[c] < budget ? b->wbytes[c] : budget;
        uint64_t got = vq_fill_chain(b->iov + w0, w1 - w0, want, fd, win, st);
        if (got == 0)
            break;              /* the fd gave nothing: this request waits */
        b->used_len[c] = (uint32_t)got;
        budget -= got;
        bytes += got;
    }
    q->ops->unpop(q->q, b, c);  /* the rest waits for the next burst */
    st->ring_empty = (c == n) && (n < b->max_chains) && status == 0;
    /* counters first: whoever sees the used chains sees the counts too */
    st->requests += c;
    st->bytes += bytes;
    if (c) {
        st->bursts++;
        q->ops->push(q->q, b->head, b->used_len, c);
        if (vq_dev_notify(q, call_fd) > 0)
            st->notifications++;
    }
    return status ? status : (int)c;
}

#endif /* VQ_FILL_H */
