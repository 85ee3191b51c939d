"""The device protocol: what a device implements to be served over vhost-user.

The generic handler (:class:`~pyvirtio.vhost_user.handler.VhostUserHandler`) speaks
the protocol: ownership, feature and protocol-feature negotiation, the memory table,
every ring's life cycle (size, addresses, base, kick/call/error fds, enable, stop),
status, reset and the NACK policy. It builds each running ring (a
:class:`vqcore.DeviceQueue` over the mapped guest memory, resumed at the right
position) and hands it to the device as a :class:`~pyvirtio.device.Vring`. The device
only moves data: it starts and stops the workers of a group of rings, and answers for
its features, configuration space and counters. rust-vmm draws the same line between
``vhost-user-backend``'s handler and its ``VhostUserBackend`` trait.

A ring group is the unit a device starts and stops (a net device's receive and transmit
queue of one pair share a worker; an rng device's one queue is a group alone). The
handler calls :meth:`~VhostUserDevice.start_group` whenever the set of running rings
of a group, or one of their fds or enable flags, changed, always after
:meth:`~VhostUserDevice.stop_group` of that group: a device never sees a ring change
under a running worker.

A minimal device (see the README's "Write your own vhost-user device")::

    class Dummy(VhostUserDevice):
        device_type = "dummy"
        num_queues = 1
        def features(self): return Transport.VERSION_1
        def start_group(self, group, vrings): ...
        def stop_group(self, group): ...
"""

from __future__ import annotations

import abc
import logging
from typing import Any, Callable, ClassVar, Mapping, Sequence

from vqcore import MAX_QUEUE_SIZE, GuestMemory

from pyvirtio.device import ConfigAccessError, VirtioDevice, Vring
from pyvirtio.vhost_user.messages import Message, Request

log = logging.getLogger(__name__)

#: a device's own request handler: (message, decoded body) -> reply body or None
RequestHandler = Callable[[Message, Any], "bytes | None"]


class VhostUserDevice(abc.ABC):
    """A device the vhost-user handler serves (one per port; it outlives connections).

    Class attributes:
        device_type: what ``--print-capabilities`` calls the device ("net", "rng").
        num_queues: how many rings the device has at most.
        max_queue_size: the largest ring it accepts.
    """

    device_type: ClassVar[str] = "unknown"
    num_queues: int = 1
    max_queue_size: int = MAX_QUEUE_SIZE
    #: for log lines
    name: str = "vhost-user"

    # ---- negotiation -----------------------------------------------------------------

    @abc.abstractmethod
    def features(self) -> int:
        """The virtio feature bits offered (device and transport bits: VERSION_1,
        EVENT_IDX, INDIRECT_DESC, RING_PACKED, ...). The handler adds the vhost-user
        bits it provides itself (VHOST_USER_F_PROTOCOL_FEATURES)."""

    def protocol_features(self) -> int:
        """The protocol features the device's own requests need (net: NET_MTU and
        RARP); the handler adds those it provides itself."""
        return 0

    #: protocol features the handler provides that this device does without (a
    #: front-end it must work with mishandles them)
    withheld_protocol_features: int = 0

    def queue_num(self) -> int:
        """What GET_QUEUE_NUM answers (net: queue pairs, as QEMU reads it)."""
        return self.num_queues

    def set_features(self, features: int) -> int:
        """SET_FEATURES: accept ``features`` (a subset of :meth:`features`); return
        what is in force. Raise :class:`~pyvirtio.features.FeatureError` (or a
        ValueError) to refuse. Called with every group stopped, or with a value that
        keeps the ring layout of the running ones."""
        return features

    def requests(self) -> Mapping[Request, RequestHandler]:
        """The requests the device handles itself (net: NET_SET_MTU, SEND_RARP)."""
        return {}

    # ---- rings ------------------------------------------------------------------------

    def queue_group(self, index: int) -> int:
        """The group ring ``index`` starts and stops with (default: its own)."""
        return index

    @abc.abstractmethod
    def start_group(self, group: int, vrings: Sequence[Vring]) -> None:
        """Serve ``vrings``, the running rings of ``group`` (one or more; their queues
        are resumed at the right position). The fds in them stay the handler's."""

    @abc.abstractmethod
    def stop_group(self, group: int) -> None:
        """Stop serving ``group`` (nothing may touch its rings or fds afterwards). A
        group that does not run is a no-op."""

    def set_ring_enables(self, enables: Sequence[bool]) -> None:
        """The enable state of every ring changed (SET_VRING_ENABLE, or the features
        that decide a ring's initial state): net attaches its TAP queues up to the
        last pair with an enabled ring. Called before the rings run too."""

    def update_memory(self, memory: GuestMemory | None) -> None:
        """A new memory table (every group stopped), or None when it goes."""

    # ---- configuration space ------------------------------------------------------------

    def config_size(self) -> int:
        """Bytes of configuration space (0: none; the handler then does not offer
        VHOST_USER_PROTOCOL_F_CONFIG)."""
        return 0

    def read_config(self, offset: int, size: int) -> bytes:
        """GET_CONFIG (range checked against :meth:`config_size`)."""
        raise ConfigAccessError(f"{self.name}: the device has no configuration space")

    def write_config(self, offset: int, data: bytes, *, migration: bool) -> None:
        """SET_CONFIG (``migration``: VHOST_SET_CONFIG_TYPE_MIGRATION, the front-end
        restoring state, else a driver's write)."""
        raise ConfigAccessError(f"{self.name}: the configuration space is read-only")

    # ---- state ------------------------------------------------------------------------

    @property
    def needs_reset_reason(self) -> str | None:
        """Why the device cannot go on (a broken ring), or None: GET_STATUS then has
        DEVICE_NEEDS_RESET."""
        return None

    def clear_needs_reset(self) -> None:
        """The front-end stopped the rings (SET_STATUS 0): forget
        :attr:`needs_reset_reason` (the rings are rebuilt when they start again)."""

    def reset(self) -> None:
        """Back to the state before any front-end (every group is stopped)."""

    def stats(self) -> dict[str, Any]:
        """Counters as data (per ring or group), for the Python API, ``--stats`` and
        the control socket."""
        return {}

    def log_stats(self, why: str = "", level: int = logging.INFO) -> None:
        """Log the counters (when a front-end disconnects, on SIGUSR1)."""
        log.log(level, "%s: stats%s: %s", self.name, f" ({why})" if why else "",
                self.stats())

    def close(self) -> None:
        """Release what the device holds (the port is going away)."""


class CoreDevice(VhostUserDevice):
    """A device whose work a transport-neutral :class:`~pyvirtio.device.VirtioDevice`
    does (:attr:`core`: net's ``NetDevice``, rng's ``RngDevice``): the features it
    offers and accepts, and its DEVICE_NEEDS_RESET, come from the core."""

    @property
    @abc.abstractmethod
    def core(self) -> VirtioDevice:
        """The device core (it may be replaced by :meth:`reset`)."""

    def features(self) -> int:
        return self.core.device_features

    def set_features(self, features: int) -> int:
        return self.core.negotiate_features(features)

    @property
    def needs_reset_reason(self) -> str | None:
        return self.core.needs_reset_reason

    def clear_needs_reset(self) -> None:
        self.core.clear_needs_reset()


__all__ = ["VhostUserDevice", "CoreDevice", "RequestHandler"]
