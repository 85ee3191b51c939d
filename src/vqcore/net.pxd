# virtio-net burst kernels (vq_net.h): RX filter, statistics, TX/RX bursts.
from libc.stdint cimport uint8_t, uint32_t, uint64_t

from vqcore.batch cimport vq_batch
from vqcore.queue cimport vq_dev

cdef extern from "vq_net.h" nogil:
    enum:
        VQ_NET_MAC_TABLE
        VQ_NET_FD_DISCARD
    struct vq_net_filter:
        uint8_t promisc, allmulti, alluni, nomulti, nouni, nobcast
        uint8_t uni_overflow, multi_overflow
        uint8_t vlan_filtering
        uint8_t mac[6]
        uint32_t n_uni, n_multi
        uint8_t uni[64][6]
        uint8_t multi[64][6]
        uint32_t vlans[128]
    struct vq_net_stats:
        uint64_t packets, bytes, dropped, errors, filtered, bursts, notifications, no_room
        int last_errno, tap_empty, ring_empty
    int vq_net_filter_accepts(const vq_net_filter *f, const uint8_t *eth, uint32_t len)
    int vq_net_tx_burst(vq_dev *q, vq_batch *b, int fd, uint32_t hdr_len, int call_fd,
                        vq_net_stats *st)
    int vq_net_rx_burst(vq_dev *q, vq_batch *b, int fd, uint32_t hdr_len, int mrg_rxbuf,
                        uint32_t max_frame, const vq_net_filter *f, uint32_t max_packets,
                        int call_fd, vq_net_stats *st)


cdef class NetRxFilter:
    cdef vq_net_filter f


cdef class NetStats:
    cdef vq_net_stats s
