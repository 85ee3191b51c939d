"""virtio-net data path kernels: TX and RX bursts between a device queue and a fd.

:func:`tx_burst` pops TX chains and ``writev``\\ s each frame (virtio-net header
included, so a TAP with ``IFF_VNET_HDR`` gets GSO frames whole) straight from guest
memory; :func:`rx_burst` ``readv``\\ s frames straight into the guest's RX buffers
(spanning several with MRG_RXBUF, ``num_buffers`` filled in), applying a
:class:`NetRxFilter`. Each call is one burst with the GIL released; Python runs once per
burst. Both push the used chains and, given ``call_fd``, signal the driver when its
notification suppression asks for it.
"""

from libc.string cimport memcpy, memset

from vqcore.batch cimport ChainBatch
from vqcore.queue cimport DeviceQueue

HDR_LEN = 12
MAC_TABLE_ENTRIES = VQ_NET_MAC_TABLE
#: the TX ``fd`` of a sink: frames are consumed and counted as sent, with no syscall
DISCARD_FD = VQ_NET_FD_DISCARD


cdef bytes _mac(const uint8_t *m):
    return bytes([m[i] for i in range(6)])


cdef int _set_mac(uint8_t *dst, mac) except -1:
    b = bytes(mac)
    if len(b) != 6:
        raise ValueError(f"a MAC address is 6 bytes, got {len(b)}")
    for i in range(6):
        dst[i] = b[i]
    return 0


cdef class NetRxFilter:
    """The receive filter of a virtio-net device (RX mode, MAC table, VLAN filter).

    Semantics follow QEMU's virtio-net: promiscuous after reset; a frame tagged with a
    VLAN passes only when its id was added (once ``vlan_filtering`` is on, i.e. CTRL_VLAN
    was negotiated); broadcast unless ``nobcast``; multicast per ``nomulti`` /
    ``allmulti`` / the multicast table; unicast per ``nouni`` / ``alluni`` / own MAC /
    the unicast table. A table of more than 64 entries overflows: all of that kind pass.
    """

    def __init__(self, mac=bytes(6)):
        self.reset()
        self.mac = mac

    def reset(self):
        """Promiscuous, empty tables, no VLANs, filtering off (the device reset state)."""
        cdef bytes own = _mac(self.f.mac)
        memset(&self.f, 0, sizeof(vq_net_filter))
        _set_mac(self.f.mac, own)
        self.f.promisc = 1

    @property
    def mac(self):
        """The device's own MAC address (6 bytes)."""
        return _mac(self.f.mac)

    @mac.setter
    def mac(self, value):
        _set_mac(self.f.mac, value)

    @property
    def promisc(self): return bool(self.f.promisc)
    @promisc.setter
    def promisc(self, bint v): self.f.promisc = v
    @property
    def allmulti(self): return bool(self.f.allmulti)
    @allmulti.setter
    def allmulti(self, bint v): self.f.allmulti = v
    @property
    def alluni(self): return bool(self.f.alluni)
    @alluni.setter
    def alluni(self, bint v): self.f.alluni = v
    @property
    def nomulti(self): return bool(self.f.nomulti)
    @nomulti.setter
    def nomulti(self, bint v): self.f.nomulti = v
    @property
    def nouni(self): return bool(self.f.nouni)
    @nouni.setter
    def nouni(self, bint v): self.f.nouni = v
    @property
    def nobcast(self): return bool(self.f.nobcast)
    @nobcast.setter
    def nobcast(self, bint v): self.f.nobcast = v
    @property
    def vlan_filtering(self): return bool(self.f.vlan_filtering)
    @vlan_filtering.setter
    def vlan_filtering(self, bint v): self.f.vlan_filtering = v

    def set_mac_table(self, unicast, multicast):
        """Replace the MAC tables (VIRTIO_NET_CTRL_MAC_TABLE_SET)."""
        uni = [bytes(m) for m in unicast]
        multi = [bytes(m) for m in multicast]
        for m in uni + multi:
            if len(m) != 6:
                raise ValueError(f"a MAC address is 6 bytes, got {len(m)}")
        self.f.uni_overflow = len(uni) > VQ_NET_MAC_TABLE
        self.f.multi_overflow = len(multi) > VQ_NET_MAC_TABLE
        self.f.n_uni = 0 if self.f.uni_overflow else len(uni)
        self.f.n_multi = 0 if self.f.multi_overflow else len(multi)
        for i in range(self.f.n_uni):
            _set_mac(self.f.uni[i], uni[i])
        for i in range(self.f.n_multi):
            _set_mac(self.f.multi[i], multi[i])

    @property
    def unicast_table(self):
        """The unicast MAC table (empty when it overflowed)."""
        return [_mac(self.f.uni[i]) for i in range(self.f.n_uni)]

    @property
    def multicast_table(self):
        """The multicast MAC table (empty when it overflowed)."""
        return [_mac(self.f.multi[i]) for i in range(self.f.n_multi)]

    def vlan_add(self, int vid):
        """Let frames tagged with ``vid`` (0..4095) pass."""
        if not 0 <= vid < 4096:
            raise ValueError(f"VLAN id {vid} is not in 0..4095")
        self.f.vlans[vid >> 5] |= (1u << (vid & 31))

    def vlan_del(self, int vid):
        """Stop frames tagged with ``vid`` (0..4095)."""
        if not 0 <= vid < 4096:
            raise ValueError(f"VLAN id {vid} is not in 0..4095")
        self.f.vlans[vid >> 5] &= ~(1u << (vid & 31))

    def vlans(self):
        """The VLAN ids added."""
        return [v for v in range(4096) if self.f.vlans[v >> 5] & (1u << (v & 31))]

    def accepts(self, frame):
        """Whether an Ethernet frame (no virtio-net header) passes the filter."""
        cdef const uint8_t[::1] fb = memoryview(bytes(frame[:18]))
        cdef uint8_t eth[18]
        cdef uint32_t n = fb.shape[0]
        if n:
            memcpy(eth, &fb[0], n)
        return bool(vq_net_filter_accepts(&self.f, eth, n))


cdef class NetStats:
    """Counters of one direction of one queue, updated by the burst kernels."""

    @property
    def packets(self): return self.s.packets
    @property
    def bytes(self): return self.s.bytes
    @property
    def dropped(self): return self.s.dropped
    @property
    def errors(self): return self.s.errors
    @property
    def filtered(self): return self.s.filtered
    @property
    def bursts(self): return self.s.bursts
    @property
    def notifications(self): return self.s.notifications
    @property
    def no_room(self): return self.s.no_room
    @property
    def last_errno(self):
        """errno of the last failed syscall (0: none)."""
        return self.s.last_errno
    @property
    def tap_empty(self):
        """Last RX burst: the fd had no more frames (EAGAIN)."""
        return bool(self.s.tap_empty)
    @property
    def ring_empty(self):
        """Last burst: the guest had no more chains (TX) or no room for a frame (RX)."""
        return bool(self.s.ring_empty)

    def reset(self):
        """Zero every counter."""
        memset(&self.s, 0, sizeof(vq_net_stats))

    def as_dict(self):
        """The counters as a dict."""
        return {k: getattr(self, k) for k in ("packets", "bytes", "dropped", "errors",
                                              "filtered", "bursts", "notifications", "no_room")}

    def __repr__(self):
        return f"<NetStats {self.as_dict()}>"


def tx_burst(DeviceQueue queue not None, ChainBatch batch not None, int fd,
             NetStats stats not None, *, unsigned int hdr_len=12, int call_fd=-1):
    """Send up to ``batch.max_chains`` TX chains to ``fd``; returns frames sent.

    With ``fd == DISCARD_FD`` every chain is consumed and counted as sent without a
    syscall (a sink: the pure ring rate). With any other ``fd < 0`` every chain is
    returned unsent and counted as dropped (a started but disabled ring: vhost-user's
    "process and discard TX").

    A chain shorter than the virtio-net header is a guest violation
    (:class:`~vqcore.errors.NetHeaderError`): the chains before it are still sent and
    returned, the queue is marked broken and the error raised.
    """
    cdef int rc
    batch.hold(queue.memory)
    with nogil:
        rc = vq_net_tx_burst(&queue.h, &batch.b, fd, hdr_len, call_fd, &stats.s)
    if rc < 0:
        queue._raise(queue.h.err)
    return rc


def rx_burst(DeviceQueue queue not None, ChainBatch batch not None, int fd,
             NetStats stats not None, NetRxFilter rx_filter=None, *, bint mrg_rxbuf=False,
             unsigned int max_frame=65562, unsigned int hdr_len=12,
             unsigned int max_packets=64, int call_fd=-1):
    """Receive up to ``max_packets`` frames from ``fd`` into RX chains; returns frames
    delivered. Stops, leaving the frame in ``fd``, when the guest lacks room for a
    frame of ``max_frame`` bytes (header included) — see ``stats.ring_empty`` — or when
    ``fd`` is empty (``stats.tap_empty``)."""
    cdef int rc
    cdef const vq_net_filter *fp = NULL if rx_filter is None else &rx_filter.f
    batch.hold(queue.memory)
    with nogil:
        rc = vq_net_rx_burst(&queue.h, &batch.b, fd, hdr_len, mrg_rxbuf, max_frame, fp,
                             max_packets, call_fd, &stats.s)
    if rc < 0:
        queue._raise(queue.h.err)
    return rc
