"""The vhost-user front-end (client side) of a virtio-net device: what QEMU does for a
guest, done for a Python program that is its own guest.

:class:`VhostUserFrontend` connects to any vhost-user back-end's socket, negotiates the
virtio features and the protocol features, shares a ``memfd`` as guest memory
(:class:`~pyvirtio.vhost_user.memfd.SharedGuestMemory`), sets up N queue pairs laid out
by :class:`~pyvirtio.net.driver.NetDriver` with an eventfd per ring for kicks and calls,
and then moves frames both ways through the driver side of the rings. The message
sequence follows QEMU's (docs/interop/vhost-user.rst)::

    connect     GET_FEATURES, [GET_PROTOCOL_FEATURES, SET_PROTOCOL_FEATURES,
                GET_QUEUE_NUM], SET_OWNER, [GET_CONFIG]
    start       [SET_STATUS ACKNOWLEDGE|DRIVER], SET_FEATURES, [SET_STATUS FEATURES_OK,
                GET_STATUS], [NET_SET_MTU], SET_MEM_TABLE (or ADD_MEM_REG), per ring
                SET_VRING_NUM, SET_VRING_BASE, SET_VRING_ADDR, SET_VRING_CALL,
                SET_VRING_ERR, {SET_VRING_ENABLE(1)}, SET_VRING_KICK; then
                [SET_STATUS DRIVER_OK] and one kick per ring
    stop        (SET_VRING_ENABLE(0) per ring), GET_VRING_BASE per ring, [SET_STATUS 0]

Brackets: only when the protocol feature that gates it was negotiated; braces: with
VHOST_USER_F_PROTOCOL_FEATURES; parentheses: optional. Two choices differ from QEMU,
which enables a ring after its KICK and disables it before GET_VRING_BASE: a started
but disabled net ring must *discard* its TX chains (vhost-user.rst, "Ring states"),
so a ring enabled late could throw away frames the guest queued while no back-end
ran (a resume after migration), and one disabled early the frames still queued. The
fds (CALL, ERR) are in place before KICK starts the ring. With
VHOST_USER_PROTOCOL_F_REPLY_ACK every request that has no reply of its own carries
``need_reply`` and a non-zero answer raises :class:`BackendNack`.

Packed rings: add ``Transport.RING_PACKED`` to ``features`` (not asked for by default,
as QEMU's ``packed=off``); the rings are laid out packed, SET_VRING_ADDR's avail and
used fields carry the driver and device event areas, and SET/GET_VRING_BASE the avail
and used positions with their wrap counters (bits 0-15 and 16-31, as QEMU sends them;
a fresh ring is ``0x80008000``).

Life cycles built from these steps:

* guest reboot: :meth:`VhostUserFrontend.reboot` (stop, rings back to index 0, start);
* move to a fresh back-end (live migration, back-end restart): ``bases = fe.stop()``,
  :meth:`~VhostUserFrontend.disconnect`, :meth:`~VhostUserFrontend.connect` to the new
  socket, :meth:`~VhostUserFrontend.start` with ``bases``: the rings resume where the old
  back-end stopped.

The data path is per batch: :meth:`~VhostUserFrontend.send_array` and
:meth:`~VhostUserFrontend.recv_array` move frames as numpy arrays (nothing per frame in
Python for single-buffer frames); :meth:`~VhostUserFrontend.send` and
:meth:`~VhostUserFrontend.recv` are the driver's byte-string calls.
"""

from __future__ import annotations

import logging
import os
import socket
import struct
import time
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

import vqcore
from vqcore import ChainBatch, split_addresses

from pyvirtio.features import (NET_DEPENDENCIES, FeatureDependencyError, NetFeature, Transport,
                               check_dependencies, describe)
from pyvirtio.net.config import FIELDS as CONFIG_FIELDS
from pyvirtio.net.driver import DriverQueue, NetDriver
from pyvirtio.net.header import HDR_LEN
from pyvirtio.status import DeviceStatus
from pyvirtio.vhost_user.connection import Connection, PeerClosed, close_fds
from pyvirtio.vhost_user.memfd import PAGE_SIZE, SharedGuestMemory
from pyvirtio.vhost_user.messages import (F_PROTOCOL_FEATURES, FLAG_NEED_REPLY, VERSION,
                                          ConfigSpace, Message, ProtocolError,
                                          ProtocolFeature, Request, SingleMemRegion, U64,
                                          VhostUserError, VringAddr, VringState,
                                          decode_vring_base, encode_vring_base,
                                          vring_index_payload)

log = logging.getLogger(__name__)

#: what the front-end asks for by default (each bit only if the back-end offers it)
DEFAULT_FEATURES = (Transport.VERSION_1 | Transport.EVENT_IDX | Transport.INDIRECT_DESC
                    | NetFeature.MRG_RXBUF | NetFeature.CSUM | NetFeature.GUEST_CSUM
                    | NetFeature.HOST_TSO4 | NetFeature.HOST_TSO6 | NetFeature.HOST_ECN
                    | NetFeature.HOST_UFO | NetFeature.HOST_USO
                    | NetFeature.GUEST_TSO4 | NetFeature.GUEST_TSO6 | NetFeature.GUEST_ECN
                    | NetFeature.GUEST_UFO | NetFeature.GUEST_USO4 | NetFeature.GUEST_USO6
                    | NetFeature.MTU | NetFeature.MAC | NetFeature.STATUS | NetFeature.MQ
                    | Transport.PROTOCOL_FEATURES)

#: protocol features asked for by default: the ones this front-end uses
DEFAULT_PROTOCOL_FEATURES = (ProtocolFeature.MQ | ProtocolFeature.REPLY_ACK
                             | ProtocolFeature.CONFIG | ProtocolFeature.NET_MTU
                             | ProtocolFeature.RARP | ProtocolFeature.STATUS
                             | ProtocolFeature.RESET_DEVICE)

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


# ---- errors ---------------------------------------------------------------------------

class FrontendError(VhostUserError, RuntimeError):
    """The back-end refused or broke the session (features, a reply, the order)."""


class BackendNack(FrontendError):
    """The back-end answered a ``need_reply`` request with a non-zero u64."""

    def __init__(self, request: Request, code: int) -> None:
        self.request = request
        self.code = code
        super().__init__(f"back-end refused VHOST_USER_{request.name} (reply {code:#x})")


class BackendClosed(FrontendError, ConnectionError):
    """The back-end closed the connection (or was never reached)."""


class BackendTimeout(FrontendError, TimeoutError):
    """The back-end did not answer in time."""


# ---- received frames ----------------------------------------------------------------------

@dataclass
class RxFrames:
    """Frames received by :meth:`VhostUserFrontend.recv_array` (copies, not views).

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

class VhostUserFrontend:
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
        reply_timeout: seconds to wait for each reply.
        disable_before_stop: send SET_VRING_ENABLE(0) before GET_VRING_BASE, as QEMU
            7.2+ does (off by default: a disabled transmitq discards the frames still
            queued, which a resume on another back-end would otherwise send).
        err_fds: give every ring an error eventfd (SET_VRING_ERR).
        name: for log messages.
    """

    def __init__(self, *, pairs: int = 1, queue_size: int = 256, features: int | None = None,
                 protocol_features: int | None = None, memory: SharedGuestMemory | None = None,
                 rx_buffer: int | None = None, tx_buffer: int = GSO_SLOT,
                 mtu: int | None = None, reply_timeout: float = 5.0,
                 disable_before_stop: bool = False, err_fds: bool = True,
                 name: str = "vhost-user") -> None:
        if pairs < 1:
            raise ValueError(f"pairs must be >= 1, not {pairs}")
        self.pairs = pairs
        self.queue_size = queue_size
        self.wanted_protocol_features = int(DEFAULT_PROTOCOL_FEATURES
                                            if protocol_features is None else protocol_features)
        wanted = int(DEFAULT_FEATURES if features is None else features)
        if self.wanted_protocol_features:
            wanted |= F_PROTOCOL_FEATURES
        else:
            wanted &= ~F_PROTOCOL_FEATURES
        self.wanted_features = wanted
        self.rx_buffer = rx_buffer
        self.tx_buffer = tx_buffer
        self.mtu = mtu
        self.reply_timeout = reply_timeout
        self.disable_before_stop = disable_before_stop
        self.use_err_fds = err_fds
        self.name = name

        self.path: str | None = None
        self.conn: Connection | None = None
        #: what the back-end offered / what was negotiated
        self.offered_features = 0
        self.features = 0
        self.offered_protocol_features = 0
        self.protocol_features = 0
        #: GET_QUEUE_NUM's answer (None without VHOST_USER_PROTOCOL_F_MQ)
        self.queue_num: int | None = None
        #: the back-end's virtio_net_config (GET_CONFIG), when CONFIG was negotiated
        self.config: bytes | None = None

        self.memory: SharedGuestMemory | None = memory
        self._owns_memory = memory is None
        self.area: tuple[int, int] | None = None          # (gpa, size) of our layout
        self.driver: NetDriver | None = None
        self.err_fds: list[int] = []
        self.running = False
        self._features_sent = False
        self._rx_pending: dict[int, _RxPending] = {}
        self._batches: dict[tuple[int, str], ChainBatch] = {}
        self.last_bases: dict[int, int] = {}

    # ---- connection ---------------------------------------------------------------------

    @property
    def num_queues(self) -> int:
        """Rings in use: 2 per pair (receiveq, transmitq)."""
        return 2 * self.pairs

    @property
    def connected(self) -> bool:
        return self.conn is not None

    def connect(self, path: str | os.PathLike, timeout: float = 5.0) -> int:
        """Connect to the back-end listening on ``path`` (retrying for ``timeout``
        seconds while it is not there yet) and negotiate; returns the features."""
        if self.conn is not None:
            raise FrontendError(f"{self.name}: already connected to {self.path}")
        path = os.fspath(path)
        deadline = time.monotonic() + timeout
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            try:
                sock.connect(path)
                break
            except (FileNotFoundError, ConnectionRefusedError) as exc:
                sock.close()
                if time.monotonic() >= deadline:
                    raise BackendClosed(f"{self.name}: no vhost-user back-end at {path}: "
                                        f"{exc.strerror}") from exc
                time.sleep(0.02)
            except BaseException:
                sock.close()
                raise
        self.path = path
        return self.attach_socket(sock)

    def attach_socket(self, sock: socket.socket) -> int:
        """Use an already connected socket (e.g. one end of a socketpair whose other end
        a back-end got with ``--fd``) and negotiate; returns the features."""
        if self.conn is not None:
            raise FrontendError(f"{self.name}: already connected")
        self.conn = Connection(sock, message_timeout=self.reply_timeout)
        try:
            return self.negotiate()
        except BaseException:
            self.disconnect()
            raise

    def disconnect(self) -> None:
        """Close the connection only; memory, rings and eventfds stay, so that
        :meth:`connect` + :meth:`start` with the bases of :meth:`stop` can resume the
        rings on another back-end."""
        if self.conn is not None:
            self.conn.close()
            self.conn = None
            log.debug("%s: disconnected", self.name)
        self.running = False
        self._features_sent = False

    # ---- requests -------------------------------------------------------------------------

    @property
    def reply_ack(self) -> bool:
        """Whether VHOST_USER_PROTOCOL_F_REPLY_ACK is in force."""
        return bool(self.protocol_features & ProtocolFeature.REPLY_ACK)

    def _send(self, request: Request, body: bytes = b"", fds: Sequence[int] = (),
              flags: int = VERSION) -> None:
        if self.conn is None:
            raise BackendClosed(f"{self.name}: not connected")
        log.debug("%s: -> %s (%d bytes, %d fds%s)", self.name, request.name, len(body),
                  len(fds), ", need_reply" if flags & FLAG_NEED_REPLY else "")
        try:
            self.conn.send(Message(int(request), flags, body, list(fds)))
        except (BrokenPipeError, ConnectionResetError) as exc:
            raise BackendClosed(f"{self.name}: back-end closed the connection "
                                f"(sending {request.name})") from exc

    def _reply(self, request: Request) -> Message:
        assert self.conn is not None
        try:
            msg = self.conn.recv(timeout=self.reply_timeout)
        except TimeoutError as exc:
            raise BackendTimeout(f"{self.name}: no reply to {request.name} within "
                                 f"{self.reply_timeout} s") from exc
        except (PeerClosed, ConnectionResetError) as exc:
            raise BackendClosed(f"{self.name}: back-end closed the connection "
                                f"(waiting for the reply to {request.name})") from exc
        except ProtocolError as exc:
            raise FrontendError(f"{self.name}: bad reply to {request.name}: {exc}") from exc
        close_fds(msg.fds)
        if not msg.is_reply or msg.request != request:
            raise FrontendError(f"{self.name}: expected the reply to {request.name}, got "
                                f"{msg.name()} (flags {msg.flags:#x})")
        return msg

    def request(self, request: Request, body: bytes = b"", fds: Sequence[int] = (), *,
                ack: bool = True) -> None:
        """Send a request that has no reply of its own. With REPLY_ACK (and ``ack``)
        it carries ``need_reply`` and the back-end's answer is checked."""
        want_ack = ack and self.reply_ack
        self._send(request, body, fds, VERSION | (FLAG_NEED_REPLY if want_ack else 0))
        if want_ack:
            code = U64.unpack(self._reply(request).body).value
            if code:
                raise BackendNack(request, code)

    def query(self, request: Request, body: bytes = b"") -> bytes:
        """Send a request that has a reply (GET_*) and return the reply's body."""
        self._send(request, body)
        return self._reply(request).body

    def _get_u64(self, request: Request) -> int:
        return U64.unpack(self.query(request)).value

    # ---- negotiation ---------------------------------------------------------------------

    def negotiate(self) -> int:
        """GET_FEATURES, the protocol features, GET_QUEUE_NUM, SET_OWNER, GET_CONFIG;
        returns the virtio features this session will use. After a reconnect (the rings
        already laid out) the new back-end must yield the same features."""
        self.protocol_features = 0
        self.offered_features = self._get_u64(Request.GET_FEATURES)
        features = self.offered_features & self.wanted_features
        if not features & Transport.VERSION_1:
            raise FrontendError(f"{self.name}: the back-end does not offer "
                                "VIRTIO_F_VERSION_1 (legacy devices are not supported)")
        if features & F_PROTOCOL_FEATURES:
            self.offered_protocol_features = self._get_u64(Request.GET_PROTOCOL_FEATURES)
            pf = self.offered_protocol_features & self.wanted_protocol_features
            self._send(Request.SET_PROTOCOL_FEATURES, U64(pf).pack())
            self.protocol_features = pf
        else:
            self.offered_protocol_features = 0
        if self.protocol_features & ProtocolFeature.MQ:
            self.queue_num = self._get_u64(Request.GET_QUEUE_NUM)
            # QEMU reads the answer as queue pairs for a net device, other back-ends as
            # queues: a number of pairs within it is within either reading
            if self.pairs > self.queue_num:
                raise FrontendError(f"{self.name}: {self.pairs} queue pairs wanted, the "
                                    f"back-end has {self.queue_num} queues")
        else:
            self.queue_num = None
            if self.pairs > 1:
                raise FrontendError(f"{self.name}: {self.pairs} queue pairs need "
                                    "VHOST_USER_PROTOCOL_F_MQ, which was not negotiated")
        self.request(Request.SET_OWNER)
        features = drop_unmet(features)
        if self.driver is not None and features != self.features:
            raise FrontendError(f"{self.name}: the back-end negotiates {describe(features)}, "
                                f"but the rings were laid out for {describe(self.features)}")
        self.features = features
        self.config = None
        if self.protocol_features & ProtocolFeature.CONFIG:
            self.config = self.get_config(0, self._config_size())
        log.info("%s: negotiated features %#x (%s); protocol features %#x (%s)%s",
                 self.name, features, describe(features), self.protocol_features,
                 _protocol_names(self.protocol_features),
                 f"; {self.queue_num} queues" if self.queue_num is not None else "")
        return features

    def _config_size(self) -> int:
        end = 0
        for f in CONFIG_FIELDS:
            if not f.features or any(self.offered_features & x for x in f.features):
                end = max(end, f.end)
        return end

    def _set_features(self) -> None:
        """SET_FEATURES with the virtio status steps around it (STATUS)."""
        status = self.protocol_features & ProtocolFeature.STATUS
        S = DeviceStatus
        if status:
            self.set_status(S.ACKNOWLEDGE)
            self.set_status(S.ACKNOWLEDGE | S.DRIVER)
        self.request(Request.SET_FEATURES, U64(self.features).pack())
        if status:
            self.set_status(S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK)
            got = self.get_status()
            if not got & S.FEATURES_OK:
                raise FrontendError(f"{self.name}: the back-end did not accept the features "
                                    f"(status {got:#x})")
        if (self.mtu is not None and self.features & NetFeature.MTU
                and self.protocol_features & ProtocolFeature.NET_MTU):
            self.set_mtu(self.mtu)
        self._features_sent = True

    # ---- control requests -------------------------------------------------------------------

    def get_config(self, offset: int = 0, size: int | None = None) -> bytes:
        """GET_CONFIG: ``size`` bytes of the back-end's configuration space."""
        self._need_protocol(ProtocolFeature.CONFIG, "GET_CONFIG")
        size = self._config_size() - offset if size is None else size
        body = self.query(Request.GET_CONFIG, ConfigSpace(offset, size, 0, bytes(size)).pack())
        try:
            reply = ConfigSpace.unpack(body)
        except ProtocolError as exc:
            raise FrontendError(f"{self.name}: bad GET_CONFIG reply: {exc}") from exc
        if reply.size != size:
            raise FrontendError(f"{self.name}: GET_CONFIG [{offset}, +{size}) failed "
                                f"(the back-end returned {reply.size} bytes)")
        return reply.payload

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

    def set_status(self, status: int) -> None:
        """SET_STATUS (VHOST_USER_PROTOCOL_F_STATUS)."""
        self._need_protocol(ProtocolFeature.STATUS, "SET_STATUS")
        self.request(Request.SET_STATUS, U64(int(status)).pack())

    def get_status(self) -> int:
        """GET_STATUS (VHOST_USER_PROTOCOL_F_STATUS)."""
        self._need_protocol(ProtocolFeature.STATUS, "GET_STATUS")
        return self._get_u64(Request.GET_STATUS)

    def reset_device(self) -> None:
        """RESET_DEVICE: the back-end disables every ring and forgets its state; the
        session continues (features and rings are set up again by :meth:`start`)."""
        self._need_protocol(ProtocolFeature.RESET_DEVICE, "RESET_DEVICE")
        self.request(Request.RESET_DEVICE)
        self.running = False
        self._features_sent = False

    def ring_errors(self) -> list[int]:
        """The rings whose error eventfd (SET_VRING_ERR) the back-end signalled since the
        last call: it found the ring broken."""
        out = []
        for index, fd in enumerate(self.err_fds):
            try:
                os.eventfd_read(fd)
                out.append(index)
            except BlockingIOError:
                pass
        return out

    def _need_protocol(self, bit: ProtocolFeature, what: str) -> None:
        if not self.protocol_features & bit:
            raise FrontendError(f"{self.name}: {what} needs VHOST_USER_PROTOCOL_F_{bit.name}, "
                                "which was not negotiated")

    # ---- layout --------------------------------------------------------------------------

    def _layout(self) -> NetDriver:
        """Lay the rings and buffers out in the shared memory (once)."""
        if self.driver is not None:
            return self.driver
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
            if self.use_err_fds:
                self.err_fds.append(os.eventfd(0, _EFD_FLAGS))
        self.driver = driver
        log.debug("%s: %d pair(s) of %d-entry rings at gpa %#x+%#x (rx buffers %d, tx %d)",
                  self.name, self.pairs, self.queue_size, base, need, rx_buffer, self.tx_buffer)
        return driver

    def _reset_rings(self) -> None:
        """Every ring back to index 0, every buffer free, nothing pending."""
        assert self.driver is not None
        for dq in self.driver.all_queues():
            dq.queue.reset()
            dq.free = list(range(dq.slots))
            dq.replay = None
        self.driver._pending.clear()
        self._rx_pending.clear()

    def queue(self, index: int) -> DriverQueue:
        """Driver queue ``index`` (receiveq of pair p = 2p, transmitq = 2p + 1)."""
        if self.driver is None:
            raise FrontendError(f"{self.name}: not started")
        return (self.driver.rx if index % 2 == 0 else self.driver.tx)[index // 2]

    # ---- rings -------------------------------------------------------------------------------

    def _send_memory(self) -> None:
        assert self.memory is not None
        table = self.memory.table()
        if self.protocol_features & ProtocolFeature.CONFIGURE_MEM_SLOTS:
            max_slots = self._get_u64(Request.GET_MAX_MEM_SLOTS)
            if max_slots < len(table.regions):
                raise FrontendError(f"{self.name}: the back-end takes {max_slots} memory "
                                    f"slots, {len(table.regions)} needed")
            for region in table.regions:
                self.request(Request.ADD_MEM_REG, SingleMemRegion(region).pack(),
                             [self.memory.fd])
        else:
            self.request(Request.SET_MEM_TABLE, table.pack(), [self.memory.fd])

    def start(self, bases: Mapping[int, int] | None = None) -> None:
        """Set the rings up on the back-end and start them.

        Without ``bases``: a fresh start, every ring from index 0 (its memory zeroed;
        SET_VRING_BASE 0, or 0x80008000 for a packed ring: slot 0, both wrap counters
        1) and every RX buffer posted. With ``bases`` (ring index -> GET_VRING_BASE's
        value, as :meth:`stop` returned them): resume the rings as they are, the
        back-end starting at those positions. A base that does not fit the ring layout
        raises ValueError."""
        if self.conn is None:
            raise BackendClosed(f"{self.name}: not connected")
        if self.running:
            raise FrontendError(f"{self.name}: already started")
        driver = self._layout()
        fresh = bases is None
        start_at: dict[int, int] = {}
        packed = bool(self.features & Transport.RING_PACKED)
        if bases is None:
            self._reset_rings()
            start_at = {dq.index: encode_vring_base(dq.queue.next_avail, dq.queue.last_used,
                                                    packed=packed)
                        for dq in driver.all_queues()}
        else:
            missing = [i for i in range(self.num_queues) if i not in bases]
            if missing:
                raise ValueError(f"no base for ring(s) {missing}")
            start_at = {i: int(bases[i]) for i in range(self.num_queues)}
            for i, base in start_at.items():
                try:
                    decode_vring_base(base, packed=packed, size=self.queue_size)
                except ProtocolError as exc:
                    raise ValueError(f"ring {i}: {exc}") from None
        if not self._features_sent:
            self._set_features()
        self._send_memory()
        assert self.memory is not None
        enable = bool(self.features & F_PROTOCOL_FEATURES)
        for k, dq in enumerate(driver.all_queues()):
            i = dq.index
            q = dq.queue
            self.request(Request.SET_VRING_NUM, VringState(i, q.size).pack())
            self.request(Request.SET_VRING_BASE, VringState(i, start_at.get(i, 0)).pack())
            ring_len = vqcore.ring_addresses(0, q.size, self.features).end
            desc = self.memory.uva_of(q.desc_addr, ring_len)
            self.request(Request.SET_VRING_ADDR, VringAddr(
                i, 0, desc, self.memory.uva_of(q.used_addr), self.memory.uva_of(q.avail_addr),
                0).pack())
            self.request(Request.SET_VRING_CALL, vring_index_payload(i, True).pack(),
                         [dq.call_fd])
            if self.use_err_fds:
                self.request(Request.SET_VRING_ERR, vring_index_payload(i, True).pack(),
                             [self.err_fds[k]])
            if enable:
                # enabled before it starts: a started but disabled transmitq discards
                # what it finds, and frames queued while no back-end ran are waiting
                self.request(Request.SET_VRING_ENABLE, VringState(i, 1).pack())
            self.request(Request.SET_VRING_KICK, vring_index_payload(i, True).pack(),
                         [dq.kick_fd])
        if self.protocol_features & ProtocolFeature.STATUS:
            S = DeviceStatus
            self.set_status(S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK | S.DRIVER_OK)
        self.running = True
        if fresh:
            for p in range(self.pairs):
                driver.post_rx(p)
        for dq in driver.all_queues():        # a ring starts on its first kick
            os.eventfd_write(dq.kick_fd, 1)
            dq.kicks += 1
        log.info("%s: %d queue pair(s) started%s", self.name, self.pairs,
                 "" if fresh else f" from {start_at}")

    def stop(self) -> dict[int, int]:
        """Stop every ring (GET_VRING_BASE); returns ring index -> the back-end's
        position (split: the next available index; packed: avail slot and wrap counter
        in bits 0-15, used ones in bits 16-31). The rings keep their state in memory."""
        if not self.running:
            raise FrontendError(f"{self.name}: not started")
        assert self.driver is not None
        queues = self.driver.all_queues()
        if self.disable_before_stop and self.features & F_PROTOCOL_FEATURES:
            for dq in queues:
                self.request(Request.SET_VRING_ENABLE, VringState(dq.index, 0).pack())
        bases = {}
        for dq in queues:
            reply = VringState.unpack(self.query(Request.GET_VRING_BASE,
                                                 VringState(dq.index, 0).pack()))
            if reply.index != dq.index:
                raise FrontendError(f"{self.name}: GET_VRING_BASE for ring {dq.index} "
                                    f"answered for ring {reply.index}")
            bases[dq.index] = reply.num
        self.running = False
        if self.protocol_features & ProtocolFeature.STATUS:
            self.set_status(0)
        self._features_sent = False
        self.last_bases = bases
        log.info("%s: rings stopped at %s", self.name, bases)
        return bases

    def reboot(self) -> dict[int, int]:
        """A guest reboot: stop the rings, then set them up again from index 0 (fresh
        buffers, features and memory table sent again). Returns the bases at the stop."""
        bases = self.stop()
        self.start()
        return bases

    # ---- life cycle ----------------------------------------------------------------------------

    def close(self) -> None:
        """Disconnect and release everything: eventfds, rings, and the memory if it is
        ours. Idempotent."""
        self.disconnect()
        if self.driver is not None:
            close_fds([fd for dq in self.driver.all_queues()
                       for fd in (dq.kick_fd, dq.call_fd) if fd >= 0])
            self.driver = None      # the driver queues go with it: the memory is free
        close_fds(self.err_fds)
        self.err_fds = []
        self._batches.clear()
        self._rx_pending.clear()
        if self.memory is not None and self._owns_memory:
            self.memory.close()
            self.memory = None

    def __enter__(self) -> "VhostUserFrontend":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "running" if self.running else ("connected" if self.conn else "closed")
        return f"<VhostUserFrontend {self.name} {self.path} {state} pairs={self.pairs}>"

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


def _protocol_names(value: int) -> str:
    names = [f.name or "" for f in ProtocolFeature if value & f]
    return ", ".join(names) or "none"


__all__ = ["VhostUserFrontend", "FrontendError", "BackendNack", "BackendClosed",
           "BackendTimeout", "RxFrames", "DEFAULT_FEATURES", "DEFAULT_PROTOCOL_FEATURES",
           "VHOST_USER_NET_RULES", "drop_unmet", "rx_buffer_size", "driver_area_size", "GSO_SLOT"]
