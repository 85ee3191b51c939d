/*
 * vq_net.h - virtio-net burst kernels between a device queue and a file descriptor
 * (a TAP queue opened with IFF_VNET_HDR, vnet header size = the guest's header size).
 *
 * TX: pop chains, writev each chain's readable segments straight from guest memory
 *     (the virtio-net header goes through untouched, so GSO frames reach the kernel
 *     whole), push used, decide the interrupt.
 * RX: pop chains, readv a frame straight into the writable segments of one chain (or
 *     of several with MRG_RXBUF, num_buffers filled in), apply the RX filter, push used
 *     with the written lengths; stop cleanly, leaving the frame in the TAP queue, when
 *     the guest has no room for a frame of the largest size.
 *
 * Everything runs without the GIL; no allocation, one syscall per frame.
 */
#ifndef VQ_NET_H
#define VQ_NET_H

#include <errno.h>
#include <limits.h>
#include <stdint.h>
#include <string.h>
#include <sys/uio.h>
#include <unistd.h>

#include "vq_queue.h"
#include "vq_ring.h"

#define VQ_NET_MAC_TABLE 64
#define VQ_NET_MAX_IOV 1024          /* IOV_MAX on Linux */
/* TX fd meaning "a sink": every frame is consumed and counted as sent, with no
 * syscall (the pure ring rate); any other negative fd discards and counts drops */
#define VQ_NET_FD_DISCARD (-2)

struct vq_net_filter {
    uint8_t promisc, allmulti, alluni, nomulti, nouni, nobcast;
    uint8_t uni_overflow, multi_overflow;
    uint8_t vlan_filtering;
    uint8_t mac[6];
    uint32_t n_uni, n_multi;
    uint8_t uni[VQ_NET_MAC_TABLE][6];
    uint8_t multi[VQ_NET_MAC_TABLE][6];
    uint32_t vlans[4096 / 32];
};

struct vq_net_stats {
    uint64_t packets;       /* frames moved */
    uint64_t bytes;         /* frame bytes moved (without the virtio-net header) */
    uint64_t dropped;       /* frames dropped (fd refused them, too many segments) */
    uint64_t errors;        /* syscall errors and malformed chains */
    uint64_t filtered;      /* RX frames the filter rejected */
    uint64_t bursts;        /* burst calls that moved something */
    uint64_t notifications; /* interrupts sent through call_fd */
    uint64_t no_room;       /* RX bursts that stopped for lack of guest buffers */
    int last_errno;         /* errno of the last failed syscall */
    int tap_empty;          /* last RX burst: the fd had no more frames */
    int ring_empty;         /* last burst: the guest had no (more) chains / room */
};

/* ---- the RX filter (QEMU's receive_filter semantics) ----------------------------- */

static inline int vq_net_mac_in(const uint8_t (*table)[6], uint32_t n, const uint8_t *mac)
{
    for (uint32_t i = 0; i < n; i++)
        if (memcmp(table[i], mac, 6) == 0)
            return 1;
    return 0;
}

/* `eth` holds the first min(len, 18) bytes of the Ethernet frame. */
static inline int vq_net_filter_accepts(const struct vq_net_filter *f, const uint8_t *eth,
                                        uint32_t len)
{
    static const uint8_t bcast[6] = {0xff, 0xff, 0xff, 0xff, 0xff, 0xff};
    if (f == NULL || f->promisc)
        return 1;
    if (len < 14)
        return 0;
    if (f->vlan_filtering && len >= 16 && eth[12] == 0x81 && eth[13] == 0x00) {
        uint32_t vid = ((uint32_t)(eth[14] << 8) | eth[15]) & 0xfffu;
        if (!(f->vlans[vid >> 5] & (1u << (vid & 31))))
            return 0;
    }
    if (eth[0] & 1) {
        if (memcmp(eth, bcast, 6) == 0)
            return !f->nobcast;
        if (f->nomulti)
            return 0;
        if (f->allmulti || f->multi_overflow)
            return 1;
        return vq_net_mac_in(f->multi, f->n_multi, eth);
    }
    if (f->nouni)
        return 0;
    if (f->alluni || f->uni_overflow)
        return 1;
    if (memcmp(eth, f->mac, 6) == 0)
        return 1;
    return vq_net_mac_in(f->uni, f->n_uni, eth);
}

/* ---- iovec helpers ----------------------------------------------------------------- */

/* Copy up to len bytes at byte offset `off` of an iovec array out to dst; returns the
 * number copied. */
static inline uint32_t vq_iov_read(const struct iovec *iov, uint32_t n, uint64_t off,
                                   uint8_t *dst, uint32_t len)
{
    uint32_t done = 0;
    for (uint32_t i = 0; i < n && done < len; i++) {
        uint64_t l = iov[i].iov_len;
        if (off >= l) {
            off -= l;
            continue;
        }
        uint64_t take = l - off;
        if (take > len - done)
            take = len - done;
        memcpy(dst + done, (const uint8_t *)iov[i].iov_base + off, take);
        done += (uint32_t)take;
        off = 0;
    }
    return done;
}

static inline void vq_iov_write(const struct iovec *iov, uint32_t n, uint64_t off,
                                const uint8_t *src, uint32_t len)
{
    uint32_t done = 0;
    for (uint32_t i = 0; i < n && done < len; i++) {
        uint64_t l = iov[i].iov_len;
        if (off >= l) {
            off -= l;
            continue;
        }
        uint64_t take = l - off;
        if (take > len - done)
            take = len - done;
        memcpy((uint8_t *)iov[i].iov_base + off, src + done, take);
        done += (uint32_t)take;
        off = 0;
    }
}

static inline void vq_net_notify(struct vq_dev *q, int call_fd, struct vq_net_stats *st)
{
    if (vq_dev_notify(q, call_fd) > 0)
        st->notifications++;
}

/* ---- TX ------------------------------------------------------------------------------ */

/* One TX burst: returns frames sent, or a negative status (a violation: the chains
 * before it were still sent and returned). */
static inline int vq_net_tx_burst(struct vq_dev *q, struct vq_batch *b, int fd,
                                  uint32_t hdr_len, int call_fd, struct vq_net_stats *st)
{
    int rc = q->ops->pop(q->q, b);
    int status = 0;
    if (rc < 0) {
        if (b->count == 0) {
            st->ring_empty = 1;
            return rc;
        }
        status = rc;            /* violation after some good chains: finish those */
    }
    uint32_t n = b->count, i, sent = 0;
    st->ring_empty = (n < b->max_chains) && status == 0;
    for (i = 0; i < n; i++) {
        uint32_t s0 = b->seg_start[i], nr = b->nread[i];
        b->used_len[i] = 0;
        if (b->rbytes[i] < hdr_len) {
            /* a TX chain shorter than the virtio-net header: the guest is broken */
            status = vq_dev_fail(q, VQ_E_NET_HDR, b->head[i], b->rbytes[i], hdr_len);
            st->errors++;
            i++;                /* return this chain too, with length 0 */
            break;
        }
        if (fd == VQ_NET_FD_DISCARD) {
            sent++;             /* a sink: consumed without touching the payload */
            st->bytes += b->rbytes[i] - hdr_len;
            continue;
        }
        if (nr > VQ_NET_MAX_IOV || fd < 0) {
            st->dropped++;      /* too many segments, or a disabled ring: discard */
            continue;
        }
        ssize_t w;
        do {
            w = writev(fd, b->iov + s0, (int)nr);
        } while (w < 0 && errno == EINTR);
        if (w < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK) {
                /* the fd is full: give the rest back to the ring, retry later */
                q->ops->unpop(q->q, b, i);
                st->ring_empty = 0;
                break;
            }
            st->last_errno = errno;
            st->errors++;
            st->dropped++;      /* e.g. EINVAL for a malformed GSO header: drop it */
            continue;
        }
        sent++;
        st->bytes += (uint64_t)w - hdr_len;
    }
    if (i > b->count)
        i = b->count;
    /* counters first: whoever sees the used chains sees the counts too */
    st->packets += sent;
    if (sent)
        st->bursts++;
    if (i) {
        q->ops->push(q->q, b->head, b->used_len, i);
        vq_net_notify(q, call_fd, st);
    }
    return status ? status : (int)sent;
}

/* ---- RX ------------------------------------------------------------------------------ */

/* One RX burst of at most max_packets frames. max_frame: the largest frame the fd may
 * deliver, header included (e.g. 65550 + 12 with guest GSO offloads, else MTU + 30).
 * Returns frames delivered, or a negative status. */
static inline int vq_net_rx_burst(struct vq_dev *q, struct vq_batch *b, int fd,
                                  uint32_t hdr_len, int mrg_rxbuf, uint32_t max_frame,
                                  const struct vq_net_filter *filter, uint32_t max_packets,
                                  int call_fd, struct vq_net_stats *st)
{
    struct iovec iov[VQ_NET_MAX_IOV];
    int rc = q->ops->pop(q->q, b);
    int status = 0;
    st->tap_empty = 0;
    st->ring_empty = 0;
    if (rc < 0) {
        if (b->count == 0)
            return rc;
        status = rc;
    }
    uint32_t n = b->count, c = 0, delivered = 0;
    /* Every descriptor of the ring is ours and they still cannot hold a frame of the
     * largest size: the guest cannot add more, so read into what there is. */
    uint32_t held = 0;
    for (uint32_t i = 0; i < n; i++)
        held += b->ndesc[i];
    int whole_ring = (held == q->size && *q->num_inflight == n);
    while (c < n && delivered < max_packets) {
        uint32_t k = c, niov = 0;
        uint64_t room = 0;
        do {
            uint32_t w0 = b->seg_start[k] + b->nread[k], w1 = b->seg_start[k + 1];
            if (b->wbytes[k] < (k == c ? hdr_len : 1u)) {
                /* an RX chain with no room for the header: the guest is broken */
                status = vq_dev_fail(q, VQ_E_NET_HDR, b->head[k], b->wbytes[k], hdr_len);
                st->errors++;
                goto out;
            }
            if (niov + (w1 - w0) > VQ_NET_MAX_IOV)
                break;
            memcpy(&iov[niov], &b->iov[w0], (w1 - w0) * sizeof(struct iovec));
            niov += w1 - w0;
            room += b->wbytes[k];
            k++;
        } while (mrg_rxbuf && room < max_frame && k < n);
        if (k == c) {
            /* one chain with more segments than readv takes: return it empty */
            b->used_len[c] = 0;
            st->errors++;
            c++;
            continue;
        }
        /* (only before any chain was used: those the burst fills go back to the guest) */
        if (mrg_rxbuf && room < max_frame && !(whole_ring && c == 0 && k == n)) {
            st->ring_empty = 1;
            st->no_room++;
            break;              /* wait for more buffers; the frame stays in the fd */
        }
        ssize_t r;
        do {
            r = readv(fd, iov, (int)niov);
        } while (r < 0 && errno == EINTR);
        if (r <= 0) {
            if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
                st->tap_empty = 1;
            } else {
                st->last_errno = r < 0 ? errno : 0;
                st->errors++;
            }
            break;
        }
        if ((uint32_t)r < hdr_len) {
            st->errors++;
            continue;           /* nothing useful landed: reuse the chains */
        }
        uint8_t eth[18];
        uint32_t got = vq_iov_read(iov, niov, hdr_len, eth,
                                   (uint32_t)r - hdr_len < 18 ? (uint32_t)r - hdr_len : 18);
        if (!vq_net_filter_accepts(filter, eth, got)) {
            st->filtered++;
            continue;           /* chains reused for the next frame */
        }
        uint64_t left = (uint64_t)r;
        uint32_t j = c;
        while (left && j < k) {
            uint32_t take = left < b->wbytes[j] ? (uint32_t)left : b->wbytes[j];
            b->used_len[j] = take;
            left -= take;
            j++;
        }
        if (hdr_len >= 12) {
            uint16_t nb = vq_tole16((uint16_t)(j - c));
            vq_iov_write(iov, niov, 10, (const uint8_t *)&nb, 2);
        }
        st->bytes += (uint64_t)r - hdr_len;
        delivered++;
        c = j;
    }
out:
    q->ops->unpop(q->q, b, c);
    if (n == 0)
        st->ring_empty = 1;
    st->packets += delivered;
    if (delivered)
        st->bursts++;
    if (c) {
        q->ops->push(q->q, b->head, b->used_len, c);
        vq_net_notify(q, call_fd, st);
    }
    return status ? status : (int)delivered;
}

#endif /* VQ_NET_H */
