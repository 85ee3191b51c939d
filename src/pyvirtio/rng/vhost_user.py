"""The virtio-rng device served over vhost-user (QEMU's ``vhost-user-rng-pci``):
:class:`VhostUserRngDevice` adapts a :class:`~pyvirtio.rng.device.RngDevice` to the
device protocol of :mod:`pyvirtio.vhost_user.device`: one request queue (a ring group of
its own), the core's features and DEVICE_NEEDS_RESET, no configuration space, no
requests of its own, and the request queue's counters. Everything else is the generic
handler's.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

from vqcore import GuestMemory
from vqcore.fill import FillStats

from pyvirtio.device import Vring
from pyvirtio.rng.device import DEFAULT_FEATURES, DEFAULT_SOURCE, RngDevice
from pyvirtio.vhost_user.device import CoreDevice
from pyvirtio.vhost_user.messages import MAX_QUEUE_SIZE, ProtocolFeature


class VhostUserRngDevice(CoreDevice):
    """A virtio-rng device for vhost-user front-ends (one port).

    Args:
        source: the file random bytes are read from (default ``/dev/urandom``).
        max_bytes_per_s: the most bytes a second the guest gets (None: no limit).
        features: virtio features offered (default VERSION_1, EVENT_IDX, INDIRECT_DESC,
            RING_PACKED).
        poll: busy-poll the ring.
        name: for log lines.
    """

    device_type = "rng"
    num_queues = 1
    max_queue_size = MAX_QUEUE_SIZE
    #: QEMU 7.2's vhost-user-rng does not set itself up again when a back-end comes
    #: back (it restarts the rings with the first session's negotiation); with memory
    #: slots negotiated it then sends no memory at all (it believes the new back-end
    #: holds the regions it gave the old one). Without them it sends SET_MEM_TABLE on
    #: every start, and a restarted back-end gets the memory it needs.
    withheld_protocol_features = int(ProtocolFeature.CONFIGURE_MEM_SLOTS)

    def __init__(self, *, source: str | os.PathLike = DEFAULT_SOURCE,
                 max_bytes_per_s: int | None = None, features: int | None = None,
                 poll: bool = False, name: str = "vhost-user-rng") -> None:
        self.name = name
        self.rng = RngDevice(source=source, max_bytes_per_s=max_bytes_per_s,
                             queue_size=MAX_QUEUE_SIZE,
                             features=int(DEFAULT_FEATURES if features is None else features),
                             poll=poll, name=name)

    @property
    def core(self) -> RngDevice:
        return self.rng

    def start_group(self, group: int, vrings: Sequence[Vring]) -> None:
        self.rng.start_queue(vrings[0])

    def stop_group(self, group: int) -> None:
        self.rng.stop_queue()

    def update_memory(self, memory: GuestMemory | None) -> None:
        self.rng.memory = memory

    def reset(self) -> None:
        """Fresh negotiation state and counters (the source stays open)."""
        self.rng.reset()
        self.rng.fill_stats = FillStats()
        self.rng.throttled = 0

    def stats(self) -> dict[str, Any]:
        return {"requestq": self.rng.stats()}

    def close(self) -> None:
        self.rng.close()

    def __repr__(self) -> str:
        return f"<VhostUserRngDevice {self.name} source={self.rng.source}>"


__all__ = ["VhostUserRngDevice"]
