"""The front-end (client) side of the vhost-user protocol, generic: what QEMU does for a
guest's device, done for a Python program that is its own guest.

:class:`VhostUserClient` connects to any vhost-user back-end's socket, negotiates the
virtio features and the protocol features, shares guest memory
(:class:`~pyvirtio.vhost_user.memfd.SharedGuestMemory`), sets up the rings a subclass
laid out in it (the driver side of each ring, with an eventfd for kicks and one for
calls), starts, stops and resumes them. A device's front-end (net:
:class:`pyvirtio.net.frontend.VhostUserNetFrontend`) adds the layout, the device's own
requests and its data path. The message sequence follows QEMU's
(docs/interop/vhost-user.rst)::

    connect     GET_FEATURES, [GET_PROTOCOL_FEATURES, SET_PROTOCOL_FEATURES,
                GET_QUEUE_NUM], SET_OWNER, [GET_CONFIG]
    start       [SET_STATUS ACKNOWLEDGE|DRIVER], SET_FEATURES, [SET_STATUS FEATURES_OK,
                GET_STATUS], (the device's requests), SET_MEM_TABLE (or ADD_MEM_REG), per
                ring SET_VRING_NUM, SET_VRING_BASE, SET_VRING_ADDR, SET_VRING_CALL,
                SET_VRING_ERR, {SET_VRING_ENABLE(1)}, SET_VRING_KICK; then
                [SET_STATUS DRIVER_OK] and one kick per ring
    stop        (SET_VRING_ENABLE(0) per ring), GET_VRING_BASE per ring, [SET_STATUS 0]

Brackets: only when the protocol feature that gates it was negotiated; braces: with
VHOST_USER_F_PROTOCOL_FEATURES; parentheses: optional. Two choices differ from QEMU,
which enables a ring after its KICK and disables it before GET_VRING_BASE: a started
but disabled ring may *discard* what it finds (a net transmitq does, vhost-user.rst
"Ring states"), so a ring enabled late could throw away what the guest queued while no
back-end ran (a resume after migration), and one disabled early what is still queued.
The fds (CALL, ERR) are in place before KICK starts the ring. With
VHOST_USER_PROTOCOL_F_REPLY_ACK every request that has no reply of its own carries
``need_reply`` and a non-zero answer raises :class:`BackendNack`.

Packed rings: when the features have ``Transport.RING_PACKED``, SET_VRING_ADDR's avail
and used fields carry the driver and device event areas, and SET/GET_VRING_BASE the
avail and used positions with their wrap counters (bits 0-15 and 16-31, as QEMU sends
them; a fresh ring is ``0x80008000``).

Life cycles built from these steps:

* guest reboot: :meth:`VhostUserClient.reboot` (stop, rings back to index 0, start);
* move to a fresh back-end (live migration, back-end restart): ``bases = fe.stop()``,
  :meth:`~VhostUserClient.disconnect`, :meth:`~VhostUserClient.connect` to the new
  socket, :meth:`~VhostUserClient.start` with ``bases``: the rings resume where the old
  back-end stopped.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from typing import Any, Mapping, Protocol, Sequence

import vqcore

from pyvirtio.features import Transport, describe
from pyvirtio.status import DeviceStatus
from pyvirtio.vhost_user.connection import Connection, PeerClosed, close_fds
from pyvirtio.vhost_user.memfd import SharedGuestMemory
from pyvirtio.vhost_user.messages import (F_PROTOCOL_FEATURES, FLAG_NEED_REPLY, VERSION,
                                          ConfigSpace, Message, ProtocolError,
                                          ProtocolFeature, Request, SingleMemRegion, U64,
                                          VhostUserError, VringAddr, VringState,
                                          decode_vring_base, encode_vring_base,
                                          vring_index_payload)

log = logging.getLogger(__name__)

_EFD_FLAGS = os.EFD_NONBLOCK | os.EFD_CLOEXEC

#: protocol features a client asks for by default: the ones this layer uses
CLIENT_PROTOCOL_FEATURES = (ProtocolFeature.MQ | ProtocolFeature.REPLY_ACK
                            | ProtocolFeature.CONFIG | ProtocolFeature.STATUS
                            | ProtocolFeature.RESET_DEVICE)


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


class ClientRing(Protocol):
    """The driver side of one ring as the client sets it up (what
    :class:`pyvirtio.net.driver.DriverQueue` has)."""
    index: int
    queue: vqcore.DriverQueue
    kick_fd: int
    call_fd: int


def protocol_names(value: int) -> str:
    names = [f.name or "" for f in ProtocolFeature if value & f]
    return ", ".join(names) or "none"


class VhostUserClient:
    """The front-end of one vhost-user back-end; a device's front-end subclasses it.

    A subclass provides :meth:`_layout` (lay its rings out in :attr:`memory` and return
    them, with their kick and call eventfds), :meth:`_reset_rings`, and may override
    :meth:`_accept_features`, :meth:`_queues_wanted`, :meth:`config_size`,
    :meth:`_features_set`, :meth:`_started` and :meth:`_release_rings`.

    Args:
        num_queues: rings the session uses.
        features: virtio features wanted; the result is these ∩ what the back-end
            offers. VHOST_USER_F_PROTOCOL_FEATURES is added unless
            ``protocol_features`` is 0.
        protocol_features: protocol features wanted (default
            :data:`CLIENT_PROTOCOL_FEATURES`); add CONFIGURE_MEM_SLOTS to send the memory
            with ADD_MEM_REG instead of SET_MEM_TABLE.
        memory: shared guest memory to lay the rings out in (several front-ends may
            share one: the forwarder needs that); default: a memfd of the size the
            layout asks, created at the first :meth:`start` and owned by this object.
        reply_timeout: seconds to wait for each reply.
        disable_before_stop: send SET_VRING_ENABLE(0) before GET_VRING_BASE, as QEMU
            7.2+ does (off by default: a disabled ring may discard what is still queued,
            which a resume on another back-end would otherwise process).
        err_fds: give every ring an error eventfd (SET_VRING_ERR).
        name: for log messages.
    """

    def __init__(self, *, num_queues: int, features: int,
                 protocol_features: int | None = None, memory: SharedGuestMemory | None = None,
                 reply_timeout: float = 5.0, disable_before_stop: bool = False,
                 err_fds: bool = True, name: str = "vhost-user") -> None:
        if num_queues < 1:
            raise ValueError(f"num_queues must be >= 1, not {num_queues}")
        self._num_queues = num_queues
        self.wanted_protocol_features = int(CLIENT_PROTOCOL_FEATURES
                                            if protocol_features is None else protocol_features)
        wanted = int(features)
        if self.wanted_protocol_features:
            wanted |= F_PROTOCOL_FEATURES
        else:
            wanted &= ~F_PROTOCOL_FEATURES
        self.wanted_features = wanted
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
        #: the back-end's configuration space (GET_CONFIG), when CONFIG was negotiated
        self.config: bytes | None = None

        self.memory: SharedGuestMemory | None = memory
        self._owns_memory = memory is None
        self.err_fds: list[int] = []
        self.running = False
        self._laid_out = False
        self._features_sent = False
        self.last_bases: dict[int, int] = {}

    # ---- what a subclass provides ----------------------------------------------------------

    @property
    def num_queues(self) -> int:
        """Rings in use."""
        return self._num_queues

    def _layout(self) -> Sequence[ClientRing]:
        """Lay the rings out in :attr:`memory` (creating it if None) once; return them
        in index order with their kick and call eventfds (the subclass owns them)."""
        raise NotImplementedError

    def _reset_rings(self) -> None:
        """Every ring back to index 0, every buffer free (a fresh start)."""
        raise NotImplementedError

    def _release_rings(self) -> None:
        """Close the rings' eventfds and drop the layout (:meth:`close`)."""

    def _accept_features(self, features: int) -> int:
        """The features to use out of ``features`` (offered ∩ wanted)."""
        return features

    def _queues_wanted(self) -> tuple[int, str]:
        """How many queues the session needs in GET_QUEUE_NUM's unit, and its name
        (default: every ring; a net device counts queue pairs, as QEMU does)."""
        return self.num_queues, "rings"

    def _check_queue_num(self, queue_num: int | None) -> None:
        """Raise :class:`FrontendError` unless the back-end's GET_QUEUE_NUM (None:
        VHOST_USER_PROTOCOL_F_MQ not negotiated) allows what :meth:`_queues_wanted`
        says."""
        n, what = self._queues_wanted()
        if queue_num is None:
            if n > 1:
                raise FrontendError(f"{self.name}: {n} {what} need "
                                    "VHOST_USER_PROTOCOL_F_MQ, which was not negotiated")
        elif n > queue_num:
            raise FrontendError(f"{self.name}: {n} {what} wanted, the back-end has "
                                f"{queue_num} queues")

    def config_size(self) -> int:
        """Bytes of configuration space to read at connect (0: none)."""
        return 0

    def _features_set(self) -> None:
        """After SET_FEATURES (and FEATURES_OK): the device's requests (net: MTU)."""

    def _started(self, fresh: bool) -> None:
        """The rings were started (``fresh``: from index 0), before their first kick."""

    # ---- connection ---------------------------------------------------------------------

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

    def accept(self, listener: socket.socket, timeout: float = 5.0) -> int:
        """Take the back-end that connects to ``listener`` (a back-end in client mode),
        within ``timeout`` seconds, and negotiate; returns the features."""
        listener.settimeout(timeout)
        try:
            sock, _ = listener.accept()
        except TimeoutError as exc:
            raise BackendClosed(f"{self.name}: no back-end connected within {timeout} s"
                                ) from exc
        return self.attach_socket(sock)

    def attach_socket(self, sock: socket.socket) -> int:
        """Use an already connected socket (e.g. one end of a socketpair whose other end
        a back-end got with ``--fd``) and negotiate; returns the features."""
        if self.conn is not None:
            raise FrontendError(f"{self.name}: already connected")
        sock.settimeout(None)
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
        else:
            self.queue_num = None
        self._check_queue_num(self.queue_num)
        self.request(Request.SET_OWNER)
        features = self._accept_features(features)
        if self._laid_out and features != self.features:
            raise FrontendError(f"{self.name}: the back-end negotiates {describe(features)}, "
                                f"but the rings were laid out for {describe(self.features)}")
        self.features = features
        self.config = None
        size = self.config_size()
        if self.protocol_features & ProtocolFeature.CONFIG and size:
            self.config = self.get_config(0, size)
        log.info("%s: negotiated features %#x (%s); protocol features %#x (%s)%s",
                 self.name, features, describe(features), self.protocol_features,
                 protocol_names(self.protocol_features),
                 f"; {self.queue_num} queues" if self.queue_num is not None else "")
        return features

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
        self._features_set()
        self._features_sent = True

    # ---- control requests -------------------------------------------------------------------

    def get_config(self, offset: int = 0, size: int | None = None) -> bytes:
        """GET_CONFIG: ``size`` bytes of the back-end's configuration space."""
        self._need_protocol(ProtocolFeature.CONFIG, "GET_CONFIG")
        size = self.config_size() - offset if size is None else size
        body = self.query(Request.GET_CONFIG, ConfigSpace(offset, size, 0, bytes(size)).pack())
        try:
            reply = ConfigSpace.unpack(body)
        except ProtocolError as exc:
            raise FrontendError(f"{self.name}: bad GET_CONFIG reply: {exc}") from exc
        if reply.size != size:
            raise FrontendError(f"{self.name}: GET_CONFIG [{offset}, +{size}) failed "
                                f"(the back-end returned {reply.size} bytes)")
        return reply.payload

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

    # ---- rings -------------------------------------------------------------------------------

    def _rings(self) -> Sequence[ClientRing]:
        rings = self._layout()
        if not self._laid_out:
            if self.use_err_fds:
                self.err_fds = [os.eventfd(0, _EFD_FLAGS) for _ in rings]
            self._laid_out = True
        return rings

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

        Without ``bases``: a fresh start, every ring from index 0 (SET_VRING_BASE 0, or
        0x80008000 for a packed ring: slot 0, both wrap counters 1). With ``bases``
        (ring index -> GET_VRING_BASE's value, as :meth:`stop` returned them): resume
        the rings as they are, the back-end starting at those positions. A base that
        does not fit the ring layout raises ValueError."""
        if self.conn is None:
            raise BackendClosed(f"{self.name}: not connected")
        if self.running:
            raise FrontendError(f"{self.name}: already started")
        rings = self._rings()
        fresh = bases is None
        packed = bool(self.features & Transport.RING_PACKED)
        if bases is None:
            self._reset_rings()
            start_at = {r.index: encode_vring_base(r.queue.next_avail, r.queue.last_used,
                                                   packed=packed) for r in rings}
        else:
            missing = [r.index for r in rings if r.index not in bases]
            if missing:
                raise ValueError(f"no base for ring(s) {missing}")
            start_at = {r.index: int(bases[r.index]) for r in rings}
            for i, base in start_at.items():
                try:
                    decode_vring_base(base, packed=packed, size=rings[0].queue.size)
                except ProtocolError as exc:
                    raise ValueError(f"ring {i}: {exc}") from None
        if not self._features_sent:
            self._set_features()
        self._send_memory()
        assert self.memory is not None
        enable = bool(self.features & F_PROTOCOL_FEATURES)
        for k, r in enumerate(rings):
            i, q = r.index, r.queue
            self.request(Request.SET_VRING_NUM, VringState(i, q.size).pack())
            self.request(Request.SET_VRING_BASE, VringState(i, start_at[i]).pack())
            ring_len = vqcore.ring_addresses(0, q.size, self.features).end
            desc = self.memory.uva_of(q.desc_addr, ring_len)
            self.request(Request.SET_VRING_ADDR, VringAddr(
                i, 0, desc, self.memory.uva_of(q.used_addr), self.memory.uva_of(q.avail_addr),
                0).pack())
            self.request(Request.SET_VRING_CALL, vring_index_payload(i, True).pack(),
                         [r.call_fd])
            if self.use_err_fds:
                self.request(Request.SET_VRING_ERR, vring_index_payload(i, True).pack(),
                             [self.err_fds[k]])
            if enable:
                # enabled before it starts: a started but disabled ring may discard what
                # it finds, and what was queued while no back-end ran is waiting
                self.request(Request.SET_VRING_ENABLE, VringState(i, 1).pack())
            self.request(Request.SET_VRING_KICK, vring_index_payload(i, True).pack(),
                         [r.kick_fd])
        if self.protocol_features & ProtocolFeature.STATUS:
            S = DeviceStatus
            self.set_status(S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK | S.DRIVER_OK)
        self.running = True
        self._started(fresh)
        for r in rings:                       # a ring starts on its first kick
            self.kick(r)
        log.info("%s: %d ring(s) started%s", self.name, len(rings),
                 "" if fresh else f" from {start_at}")

    @staticmethod
    def kick(ring: Any) -> None:
        """Notify the back-end of ``ring`` (counted in its ``kicks`` if it has one)."""
        os.eventfd_write(ring.kick_fd, 1)
        if hasattr(ring, "kicks"):
            ring.kicks += 1

    def stop(self) -> dict[int, int]:
        """Stop every ring (GET_VRING_BASE); returns ring index -> the back-end's
        position (split: the next available index; packed: avail slot and wrap counter
        in bits 0-15, used ones in bits 16-31). The rings keep their state in memory."""
        if not self.running:
            raise FrontendError(f"{self.name}: not started")
        rings = self._rings()
        if self.disable_before_stop and self.features & F_PROTOCOL_FEATURES:
            for r in rings:
                self.request(Request.SET_VRING_ENABLE, VringState(r.index, 0).pack())
        bases = {}
        for r in rings:
            reply = VringState.unpack(self.query(Request.GET_VRING_BASE,
                                                 VringState(r.index, 0).pack()))
            if reply.index != r.index:
                raise FrontendError(f"{self.name}: GET_VRING_BASE for ring {r.index} "
                                    f"answered for ring {reply.index}")
            bases[r.index] = reply.num
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
        self._release_rings()
        self._laid_out = False
        close_fds(self.err_fds)
        self.err_fds = []
        if self.memory is not None and self._owns_memory:
            self.memory.close()
            self.memory = None

    def __enter__(self) -> "VhostUserClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "running" if self.running else ("connected" if self.conn else "closed")
        return f"<{type(self).__name__} {self.name} {self.path} {state}>"


__all__ = ["VhostUserClient", "ClientRing", "FrontendError", "BackendNack", "BackendClosed",
           "BackendTimeout", "CLIENT_PROTOCOL_FEATURES", "protocol_names"]
