"""The back-end side of the vhost-user protocol (QEMU docs/interop/vhost-user.rst),
generic: one :class:`VhostUserHandler` per front-end connection, over a device that
implements :class:`~pyvirtio.vhost_user.device.VhostUserDevice`.

The handler keeps everything the protocol defines: ownership, the virtio and protocol
feature negotiation (the device says what it offers; the handler adds what it provides
itself), the memory table (:mod:`~pyvirtio.vhost_user.memory`), every ring's life
cycle (:mod:`~pyvirtio.vhost_user.rings`), the device status and resets, and the
configuration space forwarded to the device. It has one method per request
(``_on_get_features``, ``_on_set_mem_table``, ...); the device adds handlers of its own
(:meth:`~pyvirtio.vhost_user.device.VhostUserDevice.requests`).

A running ring is rebuilt whenever what it runs over changes (a new memory table, a
call or error fd replaced, an enable flag): its group is stopped, the ring rebuilt,
the group started again, all before the reply, so a change takes effect before the
front-end hears it did and no kick is lost (a new worker looks at its rings once
before it sleeps).

Replies: a message that asks for one (``need_reply``) gets a u64 ack, 0 when it was
done. A front-end sets the flag only once REPLY_ACK was negotiated, except one that
comes back without negotiating again (QEMU 7.2's vhost-user-rng after a back-end
restart sends SET_FEATURES and the rest with the flags of the first session): it gets
its answers all the same, as DPDK and libvhost-user give them.

Errors: a message that is malformed, out of place or fails gets a NACK (u64 1) when it
asked for a reply; otherwise the connection is closed. Either way one line is logged,
every fd that came with the message and that the handler did not keep is closed, and
the port is ready for the next connection.
Every fd a front-end hands over is checked for what it must be (eventfds for kicks,
calls and errors, files large enough for memory: :mod:`pyvirtio.fds`).
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import vqcore
from vqcore.errors import VirtioError
from vqcore.packed import PACKED_SLOT_MASK

from pyvirtio.device import ConfigAccessError
from pyvirtio.features import Transport, describe
from pyvirtio.fds import check_eventfd
from pyvirtio.status import DeviceStatus
from pyvirtio.vhost_user.connection import Connection, close_fds
from pyvirtio.vhost_user.device import RequestHandler, VhostUserDevice
from pyvirtio.vhost_user.memory import MemoryTable, TableChange
from pyvirtio.vhost_user.messages import (F_PROTOCOL_FEATURES, MAX_MEM_SLOTS, REQUEST_BODY,
                                          REQUEST_FDS, VRING_IDX_MASK, VRING_NOFD_MASK,
                                          ConfigSpace, MemTable, Message, ProtocolError,
                                          ProtocolFeature, Request, SingleMemRegion, U64,
                                          VhostUserError, VringAddr, VringState,
                                          decode_vring_base, encode_vring_base)
from pyvirtio.vhost_user.rings import RingState, resume_position, ring_gpas

log = logging.getLogger(__name__)

#: protocol features the handler provides for every device (CONFIG is added for a
#: device with a configuration space, the device adds its own)
HANDLER_PROTOCOL_FEATURES = (ProtocolFeature.MQ | ProtocolFeature.REPLY_ACK
                             | ProtocolFeature.CONFIGURE_MEM_SLOTS | ProtocolFeature.STATUS
                             | ProtocolFeature.RESET_DEVICE)

#: requests whose reply carries a body (REPLY_ACK adds nothing to them)
EXPLICIT_REPLY = frozenset({Request.GET_FEATURES, Request.GET_PROTOCOL_FEATURES,
                            Request.GET_VRING_BASE, Request.GET_QUEUE_NUM, Request.GET_CONFIG,
                            Request.GET_MAX_MEM_SLOTS, Request.GET_STATUS})

#: features whose change would re-lay out a running ring
RING_LAYOUT_FEATURES = int(Transport.RING_PACKED | Transport.EVENT_IDX)

#: SET_CONFIG flags (VHOST_SET_CONFIG_TYPE_*)
CONFIG_TYPE_FRONTEND = 0
CONFIG_TYPE_MIGRATION = 1

#: errors a request may fail with (anything else is a bug: logged with its traceback)
EXPECTED_ERRORS = (VirtioError, OSError, ValueError, BufferError, OverflowError)


def forget_frames(exc: BaseException) -> None:
    """Drop the tracebacks of ``exc`` and of the exceptions it chains: their frames
    hold what the failed request touched (a memory table half mapped, the one it
    replaced), which must go before the front-end hears of the failure."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        cur.__traceback__ = None
        nxt = cur.__cause__ or cur.__context__
        cur.__context__ = cur.__cause__ = None
        cur = nxt


class HandlerStateError(VhostUserError, RuntimeError):
    """The handler is used after :meth:`VhostUserHandler.close`."""


def protocol_names(value: int) -> str:
    """``"MQ, REPLY_ACK, ..."`` for a protocol feature set."""
    names = [f.name or "" for f in ProtocolFeature if value & f]
    unknown = value & ~sum(int(f) for f in ProtocolFeature)
    if unknown:
        names.append(f"unknown bits {unknown:#x}")
    return ", ".join(names) or "none"


def offered_protocol_features(device_features: int, config: bool, withheld: int = 0) -> int:
    """The protocol features a handler offers for a device whose own requests need
    ``device_features``, that has a configuration space (``config``) or not, and that
    does without the ``withheld`` ones of the handler's."""
    value = int(HANDLER_PROTOCOL_FEATURES) & ~int(withheld) | int(device_features)
    if config:
        value |= int(ProtocolFeature.CONFIG)
    return value


def capabilities(device_type: str, device_features: int, config: bool,
                 withheld: int = 0) -> dict[str, object]:
    """What ``--print-capabilities`` prints (vhost-user.rst, backend program
    conventions; ``@VHostUserBackendCapabilities`` of vhost-user.json): the type and
    the protocol features offered (see :func:`offered_protocol_features`), in lower
    case with dashes."""
    offered = offered_protocol_features(device_features, config, withheld)
    names = [(f.name or "").lower().replace("_", "-") for f in ProtocolFeature
             if f & offered]
    return {"type": device_type, "features": names}


class VhostUserHandler:
    """One front-end connection's vhost-user state, over ``device``.

    Args:
        device: the device served (it outlives the connection; :meth:`close` resets it).
        copies: identical ADD_MEM_REGs accepted per region (QEMU before 8.0 sends one
            per vhost device; default: the device's number of ring groups).
        name: for log lines (default the device's).
    """

    def __init__(self, device: VhostUserDevice, *, copies: int | None = None,
                 name: str | None = None) -> None:
        self.device = device
        self.name = name or device.name
        n = device.num_queues
        self._groups: dict[int, list[int]] = {}
        for i in range(n):
            self._groups.setdefault(device.queue_group(i), []).append(i)
        self.offered_protocol_features = offered_protocol_features(
            device.protocol_features(), device.config_size() > 0,
            device.withheld_protocol_features)
        self.table = MemoryTable(self.name, len(self._groups) if copies is None else copies)
        #: negotiated protocol features (SET_PROTOCOL_FEATURES)
        self.protocol_features = 0
        self.owner = False
        self._init_state()
        self._requests: dict[int, Callable[[Message, Any], bytes | None]] = {
            int(req): getattr(self, f"_on_{req.name.lower()}")
            for req in Request if hasattr(self, f"_on_{req.name.lower()}")}
        own: dict[Request, RequestHandler] = dict(device.requests())
        self._requests.update({int(req): h for req, h in own.items()})
        self._closed = False

    def _init_state(self) -> None:
        """The device state a new connection, or RESET_DEVICE, starts from (protocol
        features and ownership are the connection's, and survive RESET_DEVICE)."""
        self.rings = [RingState(i) for i in range(self.device.num_queues)]
        #: the virtio features the front-end set (SET_FEATURES), as accepted
        self.acked_features = 0
        self.features_ok = False
        #: the device status the front-end set (SET_STATUS)
        self.status = 0
        #: why the handler needs a reset (a memory table that cannot hold a ring)
        self._reset_reason: str | None = None
        self._running: set[int] = set()

    # ---- what the front-end sees --------------------------------------------------------

    @property
    def offered_features(self) -> int:
        """GET_FEATURES: the device's bits and VHOST_USER_F_PROTOCOL_FEATURES."""
        value = int(self.device.features())
        if self.offered_protocol_features:
            value |= F_PROTOCOL_FEATURES
        return value

    @property
    def reply_ack(self) -> bool:
        """Whether VHOST_USER_PROTOCOL_F_REPLY_ACK was negotiated."""
        return bool(self.protocol_features & ProtocolFeature.REPLY_ACK)

    @property
    def packed(self) -> bool:
        return bool(self.acked_features & Transport.RING_PACKED)

    @property
    def memory(self) -> vqcore.GuestMemory | None:
        return self.table.memory

    @property
    def regions(self) -> list:
        return self.table.regions

    @property
    def needs_reset_reason(self) -> str | None:
        """Why the device needs a reset (its own reason first), or None."""
        return self.device.needs_reset_reason or self._reset_reason

    def handled_requests(self) -> tuple[Request, ...]:
        """The requests this handler (with its device) serves."""
        return tuple(Request(r) for r in sorted(self._requests))

    # ---- one message ----------------------------------------------------------------------

    def handle(self, conn: Connection, msg: Message) -> bool:
        """Handle one message and send its reply; False when the connection must close.

        Every fd of ``msg`` that the handler did not keep is closed."""
        if self._closed:
            raise HandlerStateError(f"{self.name}: the handler is closed")
        failure: Exception | None = None
        try:
            reply = self._dispatch(msg)
        except Exception as exc:      # noqa: BLE001 - a request never crashes the back-end
            failure = exc
        finally:
            close_fds(msg.fds)
            msg.fds.clear()
        if failure is not None:
            return self._failed(conn, msg, failure)
        if reply is not None:
            conn.reply(msg, reply)
        elif msg.need_reply:
            conn.reply(msg, U64(0).pack())
        return True

    def _failed(self, conn: Connection, msg: Message, exc: Exception) -> bool:
        if not isinstance(exc, EXPECTED_ERRORS):
            log.error("%s: %s failed unexpectedly", self.name, msg.name(), exc_info=exc)
        forget_frames(exc)
        if msg.need_reply and msg.request not in EXPLICIT_REPLY:
            if isinstance(exc, EXPECTED_ERRORS):
                log.warning("%s: %s refused (NACK): %s", self.name, msg.name(), exc)
            conn.reply(msg, U64(1).pack())
            return True
        if isinstance(exc, EXPECTED_ERRORS):
            log.warning("%s: %s: %s; closing the connection", self.name, msg.name(), exc)
        return False

    def _dispatch(self, msg: Message) -> bytes | None:
        try:
            req = Request(msg.request)
        except ValueError:
            raise ProtocolError(f"unknown request {msg.request}") from None
        if msg.is_reply:
            raise ProtocolError("a request with the reply flag set")
        handler = self._requests.get(int(req))
        if handler is None:
            raise ProtocolError(f"request {req.name} is not supported")
        want = REQUEST_FDS.get(req, 0)
        lo, hi = (want, want) if isinstance(want, int) else want
        if not lo <= len(msg.fds) <= hi:
            raise ProtocolError(f"{len(msg.fds)} fds, expected "
                                f"{lo if lo == hi else f'{lo} to {hi}'}")
        body_cls = REQUEST_BODY.get(req)
        if body_cls is None:
            if msg.body:
                raise ProtocolError(f"a body of {len(msg.body)} bytes where none is expected")
            body = None
        else:
            body = body_cls.unpack(msg.body)
        log.debug("%s: %s %s fds=%d", self.name, req.name, body if body is not None else "",
                  len(msg.fds))
        return handler(msg, body)

    # ---- the end of a connection ----------------------------------------------------------

    def close(self) -> None:
        """Stop every ring, reset the device, release every fd and mapping. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._teardown()

    def _teardown(self) -> None:
        for group in sorted(self._running):
            self._stop_group(group)
        for ring in self.rings:
            ring.queue = None
            ring.close_fds()
        try:
            self.device.update_memory(None)
            self.device.reset()
        finally:
            self.table.clear()

    # ---- rings and groups -----------------------------------------------------------------

    def _ring(self, index: int) -> RingState:
        if not 0 <= index < len(self.rings):
            raise ProtocolError(f"ring {index} out of range (the device has "
                                f"{len(self.rings)} rings)")
        return self.rings[index]

    def _ring_payload(self, msg: Message, body: U64) -> tuple[RingState, bool]:
        """SET_VRING_KICK/CALL/ERR: the ring and whether it came without an fd."""
        value = body.value
        if value & ~(VRING_IDX_MASK | VRING_NOFD_MASK):
            raise ProtocolError(f"unknown bits in the ring payload {value:#x}")
        nofd = bool(value & VRING_NOFD_MASK)
        ring = self._ring(value & VRING_IDX_MASK)
        want = 0 if nofd else 1
        if len(msg.fds) != want:
            raise ProtocolError(f"{len(msg.fds)} fds with the no-fd flag "
                                f"{'set' if nofd else 'clear'} (expected {want})")
        return ring, nofd

    def effective_enable(self, index: int) -> bool:
        """Whether ring ``index`` is enabled: SET_VRING_ENABLE's state, or, before one
        came, enabled unless VHOST_USER_F_PROTOCOL_FEATURES was negotiated."""
        ring = self.rings[index]
        if ring.enable is not None:
            return ring.enable
        return not self.acked_features & F_PROTOCOL_FEATURES

    def _enables_changed(self) -> None:
        self.device.set_ring_enables([self.effective_enable(i) for i in range(len(self.rings))])

    def _stop_group(self, group: int) -> None:
        if group in self._running:
            self._running.discard(group)
            self.device.stop_group(group)

    def _start_group(self, group: int) -> None:
        """(Re)start ``group`` over its started rings (stopped first if running)."""
        self._stop_group(group)
        vrings = [self.rings[i].vring(self.effective_enable(i)) for i in self._groups[group]
                  if self.rings[i].started]
        if vrings:
            self.device.start_group(group, vrings)
            self._running.add(group)

    def _group_of(self, ring: RingState) -> int:
        return self.device.queue_group(ring.index)

    def _check_ring_size(self, size: int) -> None:
        if self.packed:
            vqcore.packed.check_packed_size(size)
        else:
            vqcore.check_queue_size(size)
        if size > self.device.max_queue_size:
            raise ProtocolError(f"ring size {size} exceeds the device's maximum "
                                f"{self.device.max_queue_size}")

    def _activate(self, ring: RingState, indices: tuple[int, int] | None) -> None:
        """Create the device queue of ``ring`` over the current memory; ``indices``
        (next_avail, next_used) to restore, or None for a fresh start."""
        desc, avail, used = ring_gpas(self.table.memory, ring, packed=self.packed)
        assert self.table.memory is not None and ring.num is not None
        queue = vqcore.device_queue(self.table.memory, ring.num, desc, avail, used,
                                    features=self.acked_features,
                                    name=f"{self.name}.q{ring.index}")
        if indices is None:
            indices = resume_position(self.table.memory, ring, desc, used,
                                      packed=self.packed, name=self.name)
        queue.next_avail, queue.next_used = indices
        ring.queue = queue

    def _start_ring(self, ring: RingState) -> None:
        """Start ``ring`` (its group is stopped; the caller starts it)."""
        self._activate(ring, None)
        self._enables_changed()
        log.info("%s: ring %d started (size %d, %s%s)", self.name, ring.index, ring.num,
                 "enabled" if self.effective_enable(ring.index) else "disabled",
                 ", polled" if ring.kick_fd < 0 else "")

    def _stop_ring(self, ring: RingState) -> int:
        """Stop ``ring``; returns its base for GET_VRING_BASE (split: the next available
        index; packed: both positions, :func:`encode_vring_base`)."""
        if ring.queue is None:
            return ring.base
        group = self._group_of(ring)
        self._stop_group(group)
        queue = ring.queue
        avail, used = queue.next_avail, queue.next_used
        base = encode_vring_base(avail, used, packed=self.packed)
        if queue.in_flight:
            log.warning("%s: ring %d stopped with %d chain(s) in flight", self.name,
                        ring.index, queue.in_flight)
        del queue
        ring.queue = None
        ring.base = base
        ring.replace_fd("kick_fd", -1)      # the front-end's kick fd of this start
        self._start_group(group)
        if self.packed:
            log.info("%s: ring %d stopped at index %d (%#x: avail slot %d wrap %d, used "
                     "slot %d wrap %d)", self.name, ring.index, base, base,
                     avail & PACKED_SLOT_MASK, avail >> 15, used & PACKED_SLOT_MASK, used >> 15)
        else:
            log.info("%s: ring %d stopped at index %d", self.name, ring.index, base)
        return base

    def _stop_all_rings(self) -> None:
        for ring in self.rings:
            self._stop_ring(ring)

    def _replace_ring_fd(self, ring: RingState, which: str, fd: int) -> None:
        """Give ``ring`` a new fd (``which``: "call_fd" or "err_fd"); a running group
        is restarted around the swap."""
        group = self._group_of(ring)
        running = group in self._running
        self._stop_group(group)
        try:
            ring.replace_fd(which, fd)
        finally:
            if running:
                self._start_group(group)

    # ---- memory ----------------------------------------------------------------------------

    def _install(self, change: TableChange | None) -> None:
        """Swap in a new memory table with every group stopped: the running rings are
        rebuilt over it with their indices; the old mappings are released."""
        if change is None:
            return
        running = [r for r in self.rings if r.started]
        groups = sorted(self._running)
        for group in groups:
            self._stop_group(group)
        # the positions once no worker moves them any more (read before the stop, a
        # burst in between was processed again on the new mapping, or its chains lost)
        saved = {r.index: (r.queue.next_avail, r.queue.next_used) for r in running
                 if r.queue is not None}
        for r in running:
            r.queue = None
        old = self.table.commit(change)
        self.device.update_memory(change.memory)
        failures = []
        for r in running:
            try:
                self._activate(r, saved[r.index])
            except EXPECTED_ERRORS as exc:
                failures.append(f"ring {r.index}: {exc}")
                r.base = encode_vring_base(*saved[r.index], packed=self.packed)
        for group in groups:
            self._start_group(group)
        self.table.release(old)
        del old                       # (a raise below would keep it in its traceback)
        log.info("%s: memory table of %d region(s) installed%s", self.name,
                 len(self.table), f", {len(running)} running ring(s) moved" if running else "")
        if failures:
            reason = "the new memory table does not hold a running ring: " + "; ".join(failures)
            if self._reset_reason is None:
                self._reset_reason = reason
            raise ProtocolError(reason)

    # ---- handlers: features ----------------------------------------------------------------

    def _on_get_features(self, msg: Message, body: None) -> bytes:
        return U64(self.offered_features).pack()

    def _on_set_features(self, msg: Message, body: U64) -> None:
        value = body.value
        offered = self.offered_features
        extra = value & ~offered
        if extra:
            log.info("%s: SET_FEATURES: ignoring bits not offered: %s", self.name,
                     describe(extra))
        value &= offered
        running = [r.index for r in self.rings if r.started]
        changed = (value ^ self.acked_features) & RING_LAYOUT_FEATURES
        if running and changed:
            raise ProtocolError(f"SET_FEATURES changes {describe(changed)} while ring(s) "
                                f"{running} run: stop them first (GET_VRING_BASE)")
        device_value = self.device.set_features(value & ~F_PROTOCOL_FEATURES)
        self.acked_features = int(device_value) | (value & F_PROTOCOL_FEATURES)
        self.features_ok = True
        self._enables_changed()
        log.info("%s: features %s", self.name, describe(self.acked_features))

    def _on_get_protocol_features(self, msg: Message, body: None) -> bytes:
        return U64(self.offered_protocol_features).pack()

    def _on_set_protocol_features(self, msg: Message, body: U64) -> None:
        extra = body.value & ~self.offered_protocol_features
        if extra:
            raise ProtocolError(f"protocol features not offered: {extra:#x}")
        self.protocol_features = body.value
        log.info("%s: protocol features %s", self.name, protocol_names(body.value))

    def _on_set_owner(self, msg: Message, body: None) -> None:
        self.owner = True

    def _on_reset_owner(self, msg: Message, body: None) -> None:
        # deprecated; vhost-user.rst recommends ignoring it or disabling every ring
        self._stop_all_rings()

    def _on_get_queue_num(self, msg: Message, body: None) -> bytes:
        return U64(self.device.queue_num()).pack()

    # ---- handlers: memory ------------------------------------------------------------------

    def _on_set_mem_table(self, msg: Message, body: MemTable) -> None:
        self._install(self.table.prepare_table(body.regions, msg.fds))

    def _on_get_max_mem_slots(self, msg: Message, body: None) -> bytes:
        return U64(MAX_MEM_SLOTS).pack()

    def _on_add_mem_reg(self, msg: Message, body: SingleMemRegion) -> None:
        self._install(self.table.prepare_add(body.region, msg.fds[0]))

    def _on_rem_mem_reg(self, msg: Message, body: SingleMemRegion) -> None:
        self._install(self.table.prepare_remove(body.region))

    # ---- handlers: rings -------------------------------------------------------------------

    def _on_set_vring_num(self, msg: Message, body: VringState) -> None:
        ring = self._ring(body.index)
        if ring.started:
            raise ProtocolError(f"ring {ring.index} is running: stop it before resizing")
        self._check_ring_size(body.num)
        ring.num = body.num

    def _on_set_vring_addr(self, msg: Message, body: VringAddr) -> None:
        ring = self._ring(body.index)
        if self.table.memory is None:
            raise ProtocolError(f"ring {ring.index}: SET_VRING_ADDR before SET_MEM_TABLE")
        if ring.started:
            a = ring.addr
            assert a is not None
            if (a.desc, a.avail, a.used) != (body.desc, body.avail, body.used):
                raise ProtocolError(f"ring {ring.index} is running: stop it before moving it")
            ring.addr = body                  # only the flags (VHOST_VRING_F_LOG) changed
            return
        old, ring.addr = ring.addr, body
        try:
            ring_gpas(self.table.memory, ring, ring.num or 1, packed=self.packed)
        except BaseException:
            ring.addr = old
            raise

    def _on_set_vring_base(self, msg: Message, body: VringState) -> None:
        ring = self._ring(body.index)
        if ring.started:
            raise ProtocolError(f"ring {ring.index} is running: stop it before SET_VRING_BASE")
        # checked against the layout now when the features are known (QEMU sends
        # SET_FEATURES first), and again when the ring starts in any case
        if self.features_ok:
            try:
                decode_vring_base(body.num, packed=self.packed, size=ring.num)
            except ProtocolError as exc:
                raise ProtocolError(f"ring {ring.index}: {exc}") from None
        ring.base = body.num

    def _on_get_vring_base(self, msg: Message, body: VringState) -> bytes:
        ring = self._ring(body.index)
        return VringState(ring.index, self._stop_ring(ring)).pack()

    def _on_set_vring_kick(self, msg: Message, body: U64) -> None:
        ring, nofd = self._ring_payload(msg, body)
        if not ring.started:
            if ring.num is None:
                raise ProtocolError(f"ring {ring.index}: SET_VRING_KICK before SET_VRING_NUM")
            ring_gpas(self.table.memory, ring, packed=self.packed)   # memory, address first
        if not nofd:
            check_eventfd(msg.fds[0], f"ring {ring.index} kick")
        group = self._group_of(ring)
        self._stop_group(group)           # no worker may use the fd being replaced
        try:
            ring.replace_fd("kick_fd", -1 if nofd else msg.fds.pop())
            if not ring.started:
                self._start_ring(ring)
        finally:
            self._start_group(group)

    def _on_set_vring_call(self, msg: Message, body: U64) -> None:
        ring, nofd = self._ring_payload(msg, body)
        if not nofd:
            check_eventfd(msg.fds[0], f"ring {ring.index} call")
        self._replace_ring_fd(ring, "call_fd", -1 if nofd else msg.fds.pop())

    def _on_set_vring_err(self, msg: Message, body: U64) -> None:
        ring, nofd = self._ring_payload(msg, body)
        if not nofd:
            check_eventfd(msg.fds[0], f"ring {ring.index} error")
        self._replace_ring_fd(ring, "err_fd", -1 if nofd else msg.fds.pop())

    def _on_set_vring_enable(self, msg: Message, body: VringState) -> None:
        ring = self._ring(body.index)
        if body.num not in (0, 1):
            raise ProtocolError(f"ring {ring.index}: SET_VRING_ENABLE {body.num} (0 or 1)")
        ring.enable = bool(body.num)
        # Synchronous: a worker may have read the old flag just before a burst, so a
        # live toggle could still discard a frame added after our ack. Restarting the
        # group makes the change take effect before the ack (the new worker looks at
        # its rings once at start: no kick is lost).
        group = self._group_of(ring)
        if ring.enable:
            self._enables_changed()
        if group in self._running:
            self._start_group(group)
        if not ring.enable:
            self._enables_changed()
        log.info("%s: ring %d %s", self.name, ring.index,
                 "enabled" if ring.enable else "disabled")

    # ---- handlers: configuration, status, reset ---------------------------------------------

    def _on_get_config(self, msg: Message, body: ConfigSpace) -> bytes:
        try:
            if body.flags not in (CONFIG_TYPE_FRONTEND, CONFIG_TYPE_MIGRATION):
                raise ProtocolError(f"unknown config flags {body.flags:#x}")
            size = self.device.config_size()
            if body.offset + body.size > size:
                raise ConfigAccessError(f"config access [{body.offset}, "
                                        f"{body.offset + body.size}) outside the "
                                        f"{size}-byte configuration space")
            data = self.device.read_config(body.offset, body.size)
        except (ConfigAccessError, ProtocolError) as exc:
            # vhost-user.rst: a zero-length payload tells the front-end it failed
            log.warning("%s: GET_CONFIG refused: %s", self.name, exc)
            return ConfigSpace(body.offset, 0, body.flags).pack()
        return ConfigSpace(body.offset, body.size, body.flags, data).pack()

    def _on_set_config(self, msg: Message, body: ConfigSpace) -> None:
        if body.flags not in (CONFIG_TYPE_FRONTEND, CONFIG_TYPE_MIGRATION):
            raise ProtocolError(f"unknown config flags {body.flags:#x}")
        size = self.device.config_size()
        if body.offset + body.size > size:
            raise ConfigAccessError(f"config write [{body.offset}, {body.offset + body.size}) "
                                    f"outside the {size}-byte configuration space")
        self.device.write_config(body.offset, body.payload,
                                 migration=body.flags == CONFIG_TYPE_MIGRATION)

    def _on_set_status(self, msg: Message, body: U64) -> None:
        value = body.value
        if value > 0xFF:
            raise ProtocolError(f"device status {value:#x} does not fit 8 bits")
        if value & DeviceStatus.FEATURES_OK and not self.features_ok:
            value &= ~DeviceStatus.FEATURES_OK        # refused: the driver reads it back
        if value == 0:
            self._stop_all_rings()                    # indices kept for GET_VRING_BASE
            self._reset_reason = None
            self.device.clear_needs_reset()
        self.status = value

    def _on_get_status(self, msg: Message, body: None) -> bytes:
        value = self.status
        if self.needs_reset_reason is not None:
            value |= DeviceStatus.DEVICE_NEEDS_RESET
        return U64(value).pack()

    def _on_reset_device(self, msg: Message, body: None) -> None:
        self._teardown()
        self._init_state()
        log.info("%s: device reset", self.name)

    def __repr__(self) -> str:
        started = sum(r.started for r in self.rings)
        return (f"<VhostUserHandler {self.name} rings={len(self.rings)} started={started} "
                f"regions={len(self.table)}>")


__all__ = ["VhostUserHandler", "HandlerStateError", "HANDLER_PROTOCOL_FEATURES",
           "EXPLICIT_REPLY", "EXPECTED_ERRORS", "capabilities", "offered_protocol_features",
           "protocol_names", "CONFIG_TYPE_FRONTEND", "CONFIG_TYPE_MIGRATION"]
