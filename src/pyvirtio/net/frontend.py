"""The vhost-user front-end of a virtio-net device: the generic client
(:class:`~pyvirtio.vhost_user.client.VhostUserClient`: features, memory, rings, enable,
stop and resume) with N queue pairs laid out by :class:`~pyvirtio.net.driver.NetDriver`
and a net data path over their driver side.

:class:`VhostUserNetFrontend` is what QEMU's virtio-net does for a guest, done for a
Python program: the load generator of the benchmarks, the forwarder's two ports, a test
harness's guest. It negotiates the net features it can use (a bit whose dependency is
missing is dropped), sends NET_SET_MTU when asked and SEND_RARP, reads the back-end's
``virtio_net_config``, and posts every RX buffer when the rings start fresh.

The data path is per batch: :meth:`~VhostUserNetFrontend.send_array` and
:meth:`~VhostUserNetFrontend.recv_array` move frames as numpy arrays (nothing per frame
in Python for single-buffer frames); :meth:`~VhostUserNetFrontend.send` and
:meth:`~VhostUserNetFrontend.recv` are the driver's byte-string calls.
"""

from __future__ import annotations

import logging
import os
import struct
import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from vqcore import ChainBatch, split_addresses

from pyvirtio.features import (NET_DEPENDENCIES, FeatureDependencyError, NetFeature, Transport,
                               check_dependencies)
from pyvirtio.net.config import FIELDS as CONFIG_FIELDS
from pyvirtio.net.device import DEFAULT_FEATURES as NET_DEVICE_FEATURES
from pyvirtio.net.driver import DriverQueue, NetDriver
from pyvirtio.net.header import HDR_LEN
from pyvirtio.vhost_user.client import (CLIENT_PROTOCOL_FEATURES, BackendClosed, BackendNack,
                                        BackendTimeout, FrontendError, VhostUserClient)
from pyvirtio.vhost_user.memfd import PAGE_SIZE, SharedGuestMemory
from pyvirtio.vhost_user.messages import ProtocolFeature, Request, U64

log = logging.getLogger(__name__)

#: what the front-end asks for by default (each bit only if the back-end offers it): what
#: a net device offers, MQ, and the vhost-user protocol features
DEFAULT_FEATURES = (NET_DEVICE_FEATURES | NetFeature.MQ | Transport.PROTOCOL_FEATURES)

#: protocol features asked for by default: the client's and the net requests'
DEFAULT_PROTOCOL_FEATURES = (CLIENT_PROTOCOL_FEATURES | ProtocolFeature.NET_MTU
                             | ProtocolFeature.RARP)

#: the spec's feature dependencies without those on the control queue: over vhost-user
#: the front-end keeps the control queue to itself (QEMU does), the back-end never sees it
VHOST_USER_NET_RULES = {feature: needs for feature, needs in NET_DEPENDENCIES.items()
                        if needs != (NetFeature.CTRL_VQ,)}

#: GSO offloads that make a guest RX buffer hold a frame of up to 64 KiB
_GUEST_GSO = (NetFeature.GUEST_TSO4 | NetFeature.GUEST_TSO6 | NetFeature.GUEST_UFO
              | NetFeature.GUEST_USO4 | NetFeature.GUEST_USO6)
#: largest frame slot (header + 64 KiB IP packet + Ethernet + VLAN)
GSO_SLOT = 65562

_EFD_FLAGS = os.EFD_NONBLOCK | os.EFD_CLOEXEC


# ---- received frames ----------------------------------------------------------------------


@dataclass
class RxFrames:
    """Frames received by :meth:`VhostUserNetFrontend.recv_array` (copies, not views).

    ``headers[i]`` is frame ``i``'s 12-byte virtio-net header, ``data[i, :lengths[i]]``
    its Ethernet frame (rows zero-padded to the longest frame); ``buffers[i]`` is how
    many RX buffers it filled.
    """
    headers: np.ndarray      # (n, 12) uint8
    data: np.ndarray         # (n, max length) uint8
    lengths: np.ndarray      # (n,) int64
    buffers: np.ndarray      # (n,) int64

    def __len__(self) -> int:
        return len(self.lengths)

    def frame(self, i: int) -> bytes:
        """Frame ``i`` as bytes (without its header)."""
        return self.data[i, :self.lengths[i]].tobytes()

    def header(self, i: int) -> bytes:
        return self.headers[i].tobytes()

    @classmethod
    def empty(cls) -> "RxFrames":
        return cls(np.zeros((0, HDR_LEN), np.uint8), np.zeros((0, 0), np.uint8),
                   np.zeros(0, np.int64), np.zeros(0, np.int64))


@dataclass
class _RxPending:
    """Used RX buffers of one queue whose frame has not fully arrived (MRG_RXBUF)."""
    tokens: np.ndarray
    lengths: np.ndarray


def drop_unmet(features: int) -> int:
    """``features`` without the bits whose dependencies (:data:`VHOST_USER_NET_RULES`)
    are missing, repeated until the set is consistent (a driver does not accept a
    feature it cannot use)."""
    while True:
        try:
            check_dependencies(features, VHOST_USER_NET_RULES)
            return features
        except FeatureDependencyError as exc:
            log.debug("dropping %s: %s", exc.feature, exc)
            features &= ~int(exc.feature)


def rx_buffer_size(features: int) -> int:
    """The RX buffer size :class:`NetDriver` picks for ``features`` (header included)."""
    gso = features & _GUEST_GSO
    return 1536 if (features & NetFeature.MRG_RXBUF or not gso) else GSO_SLOT


def driver_area_size(pairs: int, queue_size: int, rx_buffer: int, tx_buffer: int) -> int:
    """Bytes of guest memory :class:`NetDriver` needs for ``pairs`` pairs (rings, slots
    and alignment slack), without a control queue: enough for split or packed rings (a
    split ring of a size takes more room than a packed one)."""
    ring = split_addresses(0, 1 << max(queue_size - 1, 0).bit_length()).end + PAGE_SIZE
    per_queue = lambda slot: ring + queue_size * slot + PAGE_SIZE  # noqa: E731
    return pairs * (per_queue(rx_buffer) + per_queue(tx_buffer)) + PAGE_SIZE


# ---- the front-end ------------------------------------------------------------------------

# ---- the front-end ------------------------------------------------------------------------

class VhostUserNetFrontend(VhostUserClient):
    """The front-end of one vhost-user-net back-end.

    Args:
        pairs: queue pairs to run (more than one needs VHOST_USER_PROTOCOL_F_MQ and a
            back-end whose GET_QUEUE_NUM allows it).
        queue_size: size of every ring.
        features: virtio features wanted (default :data:`DEFAULT_FEATURES`); the result
            is these ∩ what the back-end offers. VHOST_USER_F_PROTOCOL_FEATURES is added
            unless ``protocol_features`` is 0.
        protocol_features: protocol features wanted (default
            :data:`DEFAULT_PROTOCOL_FEATURES`); add CONFIGURE_MEM_SLOTS to send the memory
            with ADD_MEM_REG instead of SET_MEM_TABLE.
        memory: shared guest memory to lay the rings and buffers out in (several
            front-ends may share one: the forwarder needs that); default: a memfd of
            the right size, created at the first :meth:`start` and owned by this object.
        rx_buffer, tx_buffer: RX buffer and TX slot sizes (default: as NetDriver picks).
        mtu: sent with NET_SET_MTU when VIRTIO_NET_F_MTU and
            VHOST_USER_PROTOCOL_F_NET_MTU are negotiated.
        reply_timeout, disable_before_stop, err_fds, name: as
            :class:`~pyvirtio.vhost_user.client.VhostUserClient`.
    """

    def __init__(self, *, pairs: int = 1, queue_size: int = 256, features: int | None = None,
                 protocol_features: int | None = None, memory: SharedGuestMemory | None = None,
                 rx_buffer: int | None = None, tx_buffer: int = GSO_SLOT,
                 mtu: int | None = None, reply_timeout: float = 5.0,
                 disable_before_stop: bool = False, err_fds: bool = True,
                 name: str = "vhost-user") -> None:
        if pairs < 1:
            raise ValueError(f"pairs must be >= 1, not {pairs}")
        super().__init__(num_queues=2 * pairs,
                         features=int(DEFAULT_FEATURES if features is None else features),
                         protocol_features=int(DEFAULT_PROTOCOL_FEATURES
                                               if protocol_features is None
                                               else protocol_features),
                         memory=memory, reply_timeout=reply_timeout,
                         disable_before_stop=disable_before_stop, err_fds=err_fds, name=name)
        self.pairs = pairs
        self.queue_size = queue_size
        self.rx_buffer = rx_buffer
        self.tx_buffer = tx_buffer
        self.mtu = mtu
        self.area: tuple[int, int] | None = None          # (gpa, size) of our layout
        self.driver: NetDriver | None = None
        self._rx_pending: dict[int, _RxPending] = {}
        self._batches: dict[tuple[int, str], ChainBatch] = {}

    # ---- the client's hooks ---------------------------------------------------------------

    def _accept_features(self, features: int) -> int:
        return drop_unmet(features)

    def _queues_wanted(self) -> tuple[int, str]:
        # QEMU reads GET_QUEUE_NUM as queue pairs for a net device, other back-ends as
        # queues: a number of pairs within it is within either reading
        return self.pairs, "queue pairs"

    def config_size(self) -> int:
        end = 0
        for f in CONFIG_FIELDS:
            if not f.features or any(self.offered_features & x for x in f.features):
                end = max(end, f.end)
        return end

    def _features_set(self) -> None:
        if (self.mtu is not None and self.features & NetFeature.MTU
                and self.protocol_features & ProtocolFeature.NET_MTU):
            self.set_mtu(self.mtu)

    def _layout(self) -> list[DriverQueue]:
        """Lay the rings and buffers out in the shared memory (once)."""
        if self.driver is not None:
            return self.driver.all_queues()
        rx_buffer = self.rx_buffer or rx_buffer_size(self.features)
        need = driver_area_size(self.pairs, self.queue_size, rx_buffer, self.tx_buffer)
        if self.memory is None:
            self.memory = SharedGuestMemory(need, name=f"pyvirtio-{self.name}")
            self._owns_memory = True
        base = self.memory.reserve(need)
        self.area = (base, need)
        driver = NetDriver(self.memory.memory, pairs=self.pairs, queue_size=self.queue_size,
                           ctrl=False, rx_buffer=rx_buffer, tx_buffer=self.tx_buffer,
                           base=base, size=need)
        driver.setup(self.features)
        for dq in driver.all_queues():
            dq.kick_fd = os.eventfd(0, _EFD_FLAGS)
            dq.call_fd = os.eventfd(0, _EFD_FLAGS)
        self.driver = driver
        log.debug("%s: %d pair(s) of %d-entry rings at gpa %#x+%#x (rx buffers %d, tx %d)",
                  self.name, self.pairs, self.queue_size, base, need, rx_buffer, self.tx_buffer)
        return driver.all_queues()

    def _reset_rings(self) -> None:
        """Every ring back to index 0, every buffer free, nothing pending."""
        assert self.driver is not None
        for dq in self.driver.all_queues():
            dq.queue.reset()
            dq.free = list(range(dq.slots))
            dq.replay = None
        self.driver._pending.clear()
        self._rx_pending.clear()

    def _started(self, fresh: bool) -> None:
        if fresh:
            assert self.driver is not None
            for p in range(self.pairs):
                self.driver.post_rx(p)

    def _release_rings(self) -> None:
        if self.driver is not None:
            for dq in self.driver.all_queues():
                for fd in (dq.kick_fd, dq.call_fd):
                    if fd >= 0:
                        os.close(fd)
            self.driver = None      # the driver queues go with it: the memory is free
        self._batches.clear()
        self._rx_pending.clear()

    def queue(self, index: int) -> DriverQueue:
        """Driver queue ``index`` (receiveq of pair p = 2p, transmitq = 2p + 1)."""
        if self.driver is None:
            raise FrontendError(f"{self.name}: not started")
        return (self.driver.rx if index % 2 == 0 else self.driver.tx)[index // 2]

    # ---- the device's requests and configuration ---------------------------------------------

    @property
    def mac(self) -> bytes | None:
        """The MAC address in the back-end's configuration space (GET_CONFIG), or None
        when it was not read. The field always exists; without VIRTIO_NET_F_MAC it is
        the back-end's configured address, which the front-end may or may not use."""
        if self.config is None or len(self.config) < 6:
            return None
        return self.config[:6]

    def config_field(self, name: str) -> int | bytes | None:
        """A field of the back-end's virtio_net_config (``mtu``, ``status``,
        ``max_virtqueue_pairs``, ...), or None when it was not read or does not exist."""
        if self.config is None:
            return None
        for f in CONFIG_FIELDS:
            if f.name == name:
                if f.end > len(self.config):
                    return None
                value = struct.unpack_from(f.fmt, self.config, f.offset)[0]
                return value
        raise KeyError(name)

    def set_mtu(self, mtu: int) -> None:
        """NET_SET_MTU (needs VIRTIO_NET_F_MTU and VHOST_USER_PROTOCOL_F_NET_MTU)."""
        self._need_protocol(ProtocolFeature.NET_MTU, "NET_SET_MTU")
        self.request(Request.NET_SET_MTU, U64(mtu).pack())

    def send_rarp(self, mac: bytes) -> None:
        """SEND_RARP: ask the back-end to announce ``mac``."""
        self._need_protocol(ProtocolFeature.RARP, "SEND_RARP")
        if len(mac) != 6:
            raise ValueError("a MAC address has 6 bytes")
        self.request(Request.SEND_RARP, U64(int.from_bytes(mac + bytes(2), "little")).pack())

    # ---- data path: bytes ------------------------------------------------------------------------

    def _driver(self) -> NetDriver:
        if self.driver is None:
            raise FrontendError(f"{self.name}: not started")
        return self.driver

    def send(self, pair: int, frames: Sequence[bytes], header: bytes = bytes(HDR_LEN), *,
             headers: Sequence[bytes] | None = None) -> int:
        """Queue frames on ``pair``'s transmitq (see :meth:`NetDriver.send`)."""
        return self._driver().send(pair, frames, header, headers=headers)

    def recv(self, pair: int, timeout: float = 0.0, max_frames: int | None = None
             ) -> list[tuple[bytes, bytes]]:
        """``(header, frame)`` pairs received on ``pair`` (see :meth:`NetDriver.recv`)."""
        return self._driver().recv(pair, timeout, max_frames)

    def wait_tx_done(self, pair: int, timeout: float = 5.0) -> bool:
        """Wait until the back-end used every TX chain of ``pair``."""
        return self._driver().wait_tx_done(pair, timeout)

    # ---- data path: arrays -----------------------------------------------------------------------

    def _batch(self, index: int, kind: str) -> ChainBatch:
        key = (index, kind)
        b = self._batches.get(key)
        if b is None:
            b = self._batches[key] = ChainBatch(self.queue_size, 4 * self.queue_size)
        return b

    @staticmethod
    def _notify(dq: DriverQueue) -> None:
        if dq.queue.kick_needed() and dq.kick_fd >= 0:
            os.eventfd_write(dq.kick_fd, 1)
            dq.kicks += 1

    def slots(self, dq: DriverQueue) -> np.ndarray:
        """A ``(slots, slot_size)`` uint8 view of ``dq``'s buffer slots (drop it before
        :meth:`close`)."""
        return self._driver().memory.array(dq.buf_addr, dq.slots * dq.slot_size).reshape(
            dq.slots, dq.slot_size)

    def send_array(self, pair: int, frames: np.ndarray, header: bytes | np.ndarray = bytes(HDR_LEN)
                   ) -> int:
        """Queue the rows of ``frames`` (a 2-D uint8 array: n frames of one length) on
        ``pair``'s transmitq, each after ``header`` (12 bytes, or an ``(n, 12)`` array);
        kicks if needed. Returns how many fit (the free TX slots)."""
        driver = self._driver()
        dq = driver.tx[pair]
        frames = np.asarray(frames, dtype=np.uint8)
        if frames.ndim != 2:
            raise ValueError("frames must be a 2-D array (one frame per row)")
        total = HDR_LEN + frames.shape[1]
        if total > dq.slot_size:
            raise ValueError(f"frames of {frames.shape[1]} bytes exceed the "
                             f"{dq.slot_size}-byte TX slot")
        self.reclaim_tx(pair)
        n = min(len(frames), len(dq.free))
        if n == 0:
            return 0
        tokens = np.array(dq.free[:n], dtype=np.int64)
        del dq.free[:n]
        slots = self.slots(dq)
        hdr = np.frombuffer(bytes(header), np.uint8) if isinstance(header, (bytes, bytearray)) \
            else np.asarray(header, np.uint8)[:n]
        slots[tokens, :HDR_LEN] = hdr
        slots[tokens, HDR_LEN:total] = frames[:n]
        del slots
        b = self._batch(dq.index, "add")
        b.load(dq.buf_addr + tokens.astype(np.uint64) * dq.slot_size, np.full(n, total),
               np.ones(n), np.ones(n), tokens.astype(np.uint64))
        added = dq.queue.add(b)
        if added != n:   # cannot happen: a free slot always has a free descriptor
            raise FrontendError(f"{self.name}: transmitq {pair} took {added} of {n} chains")
        self._notify(dq)
        return n

    def repost_rx(self, pair: int) -> int:
        """Give every RX buffer of ``pair`` that is neither posted nor in use back to the
        device: the free ones, and those of half-received frames (they are dropped).
        Returns how many buffers were posted."""
        driver = self._driver()
        dq = driver.rx[pair]
        dq.free += [t for t, _ in driver._pending.pop(pair, [])]
        pend = self._rx_pending.pop(pair, None)
        if pend is not None:
            dq.free += pend.tokens.tolist()
        return driver.post_rx(pair)

    def reclaim_tx(self, pair: int) -> int:
        """Collect the TX chains the back-end used; returns how many."""
        dq = self._driver().tx[pair]
        b = self._batch(dq.index, "reclaim")
        n = dq.queue.reclaim(b)
        if n:
            dq.free += b.tokens[:n].astype(np.int64).tolist()
        return n

    def recv_array(self, pair: int, timeout: float = 0.0, max_frames: int | None = None
                   ) -> RxFrames:
        """Frames received on ``pair`` as arrays (:class:`RxFrames`); waits up to
        ``timeout`` seconds for the first. The RX buffers are posted again at once.
        Per batch, not per frame, except frames spread over several buffers
        (VIRTIO_NET_F_MRG_RXBUF), which are joined one by one."""
        driver = self._driver()
        dq = driver.rx[pair]
        deadline = time.monotonic() + timeout
        b = self._batch(dq.index, "reclaim")
        parts: list[RxFrames] = []
        got = 0
        while True:
            dq.queue.disable_interrupts()
            n = dq.queue.reclaim(b)
            if n:
                out = self._take_rx(dq, pair, b.tokens[:n].astype(np.int64),
                                    b.used_len[:n].astype(np.int64))
                driver.post_rx(pair)
                if len(out):
                    parts.append(out)
                    got += len(out)
                if max_frames is not None and got >= max_frames:
                    break
                continue
            if got:
                break
            left = deadline - time.monotonic()
            if left <= 0:
                break
            if not dq.queue.enable_interrupts():
                driver.wait(dq.call_fd, min(left, 0.05))
        if not parts:
            return RxFrames.empty()
        if len(parts) == 1:
            return parts[0]
        width = max(p.data.shape[1] for p in parts)
        data = np.zeros((got, width), np.uint8)
        row = 0
        for p in parts:
            data[row:row + len(p), :p.data.shape[1]] = p.data
            row += len(p)
        return RxFrames(np.concatenate([p.headers for p in parts]), data,
                        np.concatenate([p.lengths for p in parts]),
                        np.concatenate([p.buffers for p in parts]))

    def _take_rx(self, dq: DriverQueue, pair: int, tokens: np.ndarray, lengths: np.ndarray
                 ) -> RxFrames:
        """Turn used RX buffers into frames; buffers of a frame not complete yet wait."""
        pend = self._rx_pending.pop(pair, None)
        if pend is not None:
            tokens = np.concatenate([pend.tokens, tokens])
            lengths = np.concatenate([pend.lengths, lengths])
        slots = self.slots(dq)
        count = len(tokens)
        if self.features & NetFeature.MRG_RXBUF:
            nbuf = slots[tokens, 10].astype(np.int64) | (slots[tokens, 11].astype(np.int64) << 8)
        else:
            nbuf = np.ones(count, np.int64)
        if count and np.all(nbuf == 1):
            starts = np.arange(count)
            per_frame = nbuf
            used = count
        else:
            # walk the frames: each first buffer says how many buffers follow
            first = []
            i = 0
            while i < count:
                k = min(max(int(nbuf[i]), 1), dq.slots)
                if i + k > count:
                    break
                first.append(i)
                i += k
            used = i
            starts = np.array(first, np.int64)
            per_frame = np.maximum(nbuf[starts], 1) if len(first) else np.zeros(0, np.int64)
        if used < count:
            self._rx_pending[pair] = _RxPending(tokens[used:].copy(), lengths[used:].copy())
        nframes = len(starts)
        if nframes == 0:
            del slots
            return RxFrames.empty()
        if np.all(per_frame == 1):
            tok = tokens[starts]
            flen = lengths[starts]
            headers = slots[tok, :HDR_LEN].copy()
            flen = np.maximum(flen - HDR_LEN, 0)
            data = slots[tok, HDR_LEN:HDR_LEN + int(flen.max())]   # a copy (fancy index)
            if flen.min() != flen.max():   # the buffers' old bytes past a shorter frame
                data[np.arange(data.shape[1])[None, :] >= flen[:, None]] = 0
        else:
            chunks = []
            for s, k in zip(starts.tolist(), per_frame.tolist()):
                chunks.append(b"".join(slots[t, :ln].tobytes() for t, ln in
                                       zip(tokens[s:s + k].tolist(), lengths[s:s + k].tolist())))
            flen = np.array([max(len(c) - HDR_LEN, 0) for c in chunks], np.int64)
            width = int(flen.max())
            headers = np.zeros((nframes, HDR_LEN), np.uint8)
            data = np.zeros((nframes, width), np.uint8)
            for r, c in enumerate(chunks):
                raw = np.frombuffer(c, np.uint8)
                headers[r, :min(len(raw), HDR_LEN)] = raw[:HDR_LEN]
                data[r, :len(raw) - HDR_LEN] = raw[HDR_LEN:]
        del slots
        dq.free += tokens[:used].tolist()
        return RxFrames(headers, data, flen.astype(np.int64), per_frame.astype(np.int64))


__all__ = ["VhostUserNetFrontend", "FrontendError", "BackendNack", "BackendClosed",
           "BackendTimeout", "RxFrames", "DEFAULT_FEATURES", "DEFAULT_PROTOCOL_FEATURES",
           "VHOST_USER_NET_RULES", "drop_unmet", "rx_buffer_size", "driver_area_size", "GSO_SLOT"]
