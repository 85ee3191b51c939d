"""One ring as the front-end describes it over vhost-user, and where a started ring
resumes.

Ring life cycle, as the protocol defines it:

* a ring is *stopped* until SET_VRING_KICK (which needs the memory table, SET_VRING_NUM
  and SET_VRING_ADDR first); it is then *started*, and served by its device; GET_VRING_BASE
  stops it again and answers where it stopped;
* with VHOST_USER_F_PROTOCOL_FEATURES negotiated a started ring is disabled until
  SET_VRING_ENABLE(1) (what a disabled ring does is the device's: a net device discards
  TX and supplies no RX); the enable state may arrive before the ring starts (QEMU sends
  it first) and is applied when it does;
* SET_VRING_KICK with the no-fd flag (bit 8) starts the ring without a kick fd: the
  device polls it; SET_VRING_CALL with it means nobody is interrupted;
* a started ring resumes from SET_VRING_BASE's index when the used ring's index in
  memory agrees; otherwise (chains were in flight when the previous owner stopped) it
  resumes from the used index, as libvhost-user and DPDK do;
* packed rings: SET_VRING_ADDR's avail and used fields are the driver and device event
  areas; SET/GET_VRING_BASE carry the avail slot and wrap counter in bits 0-15 and the
  used ones in bits 16-31, as QEMU does (:func:`~pyvirtio.vhost_user.messages.
  decode_vring_base`). A used position behind the avail one (chains in flight) is where
  the ring resumes, if the descriptor there is still available; a front-end that sends
  bits 16-31 zero (DPDK's format) resumes with the used position equal to the avail
  one. QEMU 7.2 cannot restore a packed ring's position after losing its back-end (no
  GET_VRING_BASE): it sends the base of the previous start again. A base the
  descriptors contradict (it claims a fresh ring where slots were used, or its slot
  was used in this lap or made available for the next) is replaced by the position the
  descriptor flags show (:func:`vqcore.packed.packed_ring_position`), when they show one.

Ring addresses (SET_VRING_ADDR) are the front-end's user addresses, translated through
each region's ``userspace_addr``; descriptor addresses are guest-physical.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import vqcore
from vqcore import GuestMemory
from vqcore.errors import VirtioError
from vqcore.packed import (PACKED_SLOT_MASK, PACKED_WRAP, packed_desc_flags,
                           packed_ring_is_fresh, packed_ring_position, packed_slot_state)

from pyvirtio.device import Vring
from pyvirtio.vhost_user.messages import (ProtocolError, VringAddr, decode_vring_base,
                                          packed_ring_distance)

log = logging.getLogger(__name__)


@dataclass
class RingState:
    """What the front-end told the back-end about one ring, and the ring while it
    runs. The fds are owned here (-1: none)."""
    index: int
    num: int | None = None            # SET_VRING_NUM
    addr: VringAddr | None = None     # SET_VRING_ADDR (user addresses)
    base: int = 0                     # SET_VRING_BASE's num / the base at the last stop
    enable: bool | None = None        # SET_VRING_ENABLE (None: never sent)
    kick_fd: int = -1                 # SET_VRING_KICK (-1 with the no-fd flag: polled)
    call_fd: int = -1                 # SET_VRING_CALL
    err_fd: int = -1                  # SET_VRING_ERR
    queue: vqcore.DeviceQueue | None = None    # between SET_VRING_KICK and GET_VRING_BASE

    @property
    def started(self) -> bool:
        return self.queue is not None

    def vring(self, enabled: bool) -> Vring:
        """The running ring as a device gets it."""
        assert self.queue is not None
        return Vring(self.index, self.queue, self.kick_fd, self.call_fd, self.err_fd,
                     enabled)

    def replace_fd(self, which: str, fd: int) -> None:
        """Own ``fd`` as the ring's ``which`` ("kick_fd", "call_fd", "err_fd"); the
        old one is closed."""
        old = getattr(self, which)
        setattr(self, which, fd)
        if old >= 0 and old != fd:
            os.close(old)

    def close_fds(self) -> None:
        for which in ("kick_fd", "call_fd", "err_fd"):
            self.replace_fd(which, -1)


def ring_gpas(memory: GuestMemory | None, ring: RingState, size: int | None = None,
              *, packed: bool) -> tuple[int, int, int]:
    """The guest-physical addresses of the ring's three parts (``size``: the length to
    check, default the ring's size). Raises :class:`ProtocolError` when a part lies
    outside every region."""
    i = ring.index
    if memory is None:
        raise ProtocolError(f"ring {i}: no memory table yet (SET_MEM_TABLE comes first)")
    if ring.addr is None:
        raise ProtocolError(f"ring {i}: no SET_VRING_ADDR")
    n = size if size is not None else ring.num
    if n is None:
        raise ProtocolError(f"ring {i}: no SET_VRING_NUM")
    a = ring.addr
    if packed:                  # the avail/used fields name the event areas
        lay = vqcore.packed_layout(n)
        parts = (("descriptor ring", a.desc, lay.desc_size),
                 ("driver event area", a.avail, lay.event_size),
                 ("device event area", a.used, lay.event_size))
    else:
        layout = vqcore.split_layout(n)
        parts = (("descriptor table", a.desc, layout.desc_size),
                 ("available ring", a.avail, layout.avail_size),
                 ("used ring", a.used, layout.used_size))
    out = []
    for what, uva, length in parts:
        try:
            out.append(memory.uva_to_gpa(uva, length))
        except VirtioError:
            raise ProtocolError(f"ring {i}: {what} at user address {uva:#x} "
                                f"(+{length}) is outside every memory region") from None
    return out[0], out[1], out[2]


def resume_position(memory: GuestMemory, ring: RingState, desc: int, used: int, *,
                    packed: bool, name: str) -> tuple[int, int]:
    """(next_avail, next_used) a started ring begins with: SET_VRING_BASE's, unless
    chains were in flight when the previous owner stopped; then the first of them, so
    that they are processed again (in order: nothing lost, nothing repeated). A packed
    ring's base that its descriptors contradict (a stale one) gives way to the position
    they show."""
    i = ring.index
    try:
        avail, used_pos = decode_vring_base(ring.base, packed=packed, size=ring.num)
    except ProtocolError as exc:
        raise ProtocolError(f"ring {i}: {exc}") from None
    if not packed:
        used_idx = int.from_bytes(memory.read(used + 2, 2), "little")
        if used_idx != avail:
            log.warning("%s: ring %d: base %d but the used index is %d; resuming "
                        "from the used index", name, i, avail, used_idx)
            avail = used_idx
        return avail, avail
    size = ring.num or 1
    flags = packed_desc_flags(memory, desc, size)

    def state(pos: int) -> str:
        return packed_slot_state(int(flags[pos & PACKED_SLOT_MASK]), pos >> 15)

    start = avail
    if used_pos is not None and used_pos != avail:
        # chains in flight: they are still marked available in the ring (the device
        # writes a used element over a chain's first descriptor) unless the previous
        # owner completed them after all
        slot, wrap = used_pos & PACKED_SLOT_MASK, used_pos >> 15
        if state(used_pos) == "avail":
            log.warning("%s: ring %d: %d slot(s) in flight at the stop (base %#x); "
                        "resuming from the used position, slot %d wrap %d", name, i,
                        packed_ring_distance(avail, used_pos, size), ring.base, slot, wrap)
            return used_pos, used_pos
        log.warning("%s: ring %d: base %#x says chains are in flight, but the descriptor "
                    "at used slot %d is not available: resuming from the avail position",
                    name, i, ring.base, slot)
    # A stale base shows: it claims a fresh ring where descriptors were used already,
    # or the slot at it was used in this lap or made available for the next (at a
    # device's position the slot is available for its lap, or from the last one).
    seen = state(start)
    if start == PACKED_WRAP and not packed_ring_is_fresh(flags):
        seen = "not fresh"
    elif seen in ("avail", "old"):
        return start, start
    derived = packed_ring_position(flags)
    if derived is None:
        log.warning("%s: ring %d: base %#x is stale (slot %d is %s) and the ring does not "
                    "tell where the device was; resuming at the base", name, i, ring.base,
                    start & PACKED_SLOT_MASK, seen)
        return start, start
    if derived != start:
        log.warning("%s: ring %d: base %#x is stale (slot %d is %s); resuming where the "
                    "ring shows the device was: slot %d wrap %d", name, i, ring.base,
                    start & PACKED_SLOT_MASK, seen, derived & PACKED_SLOT_MASK, derived >> 15)
    return derived, derived


__all__ = ["RingState", "ring_gpas", "resume_position"]
