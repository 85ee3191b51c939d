"""A multiqueue TAP interface as the backend of a virtio-net device.

Two halves:

* **netlink** (pyroute2): create the interface (``kind="tuntap"``, ``mode="tap"``,
  ``multi_queue``, ``vnet_hdr``, ``no_pi``; pyroute2 makes it persistent), bring it up,
  set its MTU and MAC, delete it;
* **our own ioctl helper** (``fcntl.ioctl`` with a 40-byte ``struct ifreq``): one file
  descriptor per queue pair on ``/dev/net/tun``. ``TUNGETFEATURES`` is checked first
  (the kernel must support ``IFF_MULTI_QUEUE`` and ``IFF_VNET_HDR``), then ``TUNSETIFF``
  attaches the fd as a queue of the interface, ``TUNSETVNETHDRSZ`` sets the 12-byte
  ``virtio_net_hdr`` of VERSION_1, ``TUNSETOFFLOAD`` tells the kernel which offloads the
  guest accepts (:func:`tap_offloads`), and ``TUNSETQUEUE`` attaches or detaches a queue
  when the driver changes the number of active queue pairs (``VQ_PAIRS_SET``).

Every step that fails raises a subclass of :class:`TapError` whose message names the
interface, the step and the errno, e.g. ``TUNSETIFF on tap0 failed: Invalid argument
(EINVAL): the existing interface is not multi_queue``.

Queue fds are non-blocking and close-on-exec. A TUN file belongs to the network
namespace it was opened in, so with ``netns=`` the fds are opened by the calling thread
while inside that namespace (:mod:`pyvirtio.netns`).
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import struct
import sys
from typing import Any, Iterable

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from pyvirtio import netns as _netns
from pyvirtio.features import NetFeature
from pyvirtio.netns import NamespaceNotFound, NetNamespace
from vqcore.errors import VirtioError

__all__ = [
    # ioctl numbers and flags (linux/if_tun.h)
    "TUNSETIFF", "TUNGETFEATURES", "TUNSETOFFLOAD", "TUNGETIFF", "TUNGETVNETHDRSZ",
    "TUNSETVNETHDRSZ", "TUNSETQUEUE", "TUNSETVNETLE",
    "IFF_TUN", "IFF_TAP", "IFF_MULTI_QUEUE", "IFF_ATTACH_QUEUE", "IFF_DETACH_QUEUE",
    "IFF_PERSIST", "IFF_NO_PI", "IFF_VNET_HDR", "TAP_QUEUE_FLAGS",
    "TUN_F_CSUM", "TUN_F_TSO4", "TUN_F_TSO6", "TUN_F_TSO_ECN", "TUN_F_UFO", "TUN_F_USO4",
    "TUN_F_USO6", "TUN_F_ALL", "IFNAMSIZ", "IFREQ_SIZE", "MAX_TAP_QUEUES",
    "VIRTIO_NET_HDR_SIZE", "TUN_DEVICE",
    # errors
    "TapError", "TapArgumentError", "TapNameError", "TapNamespaceNotFound", "TapNotFound",
    "TapCreateError", "TapLinkError", "TapOpenError", "TapMultiqueueUnsupported",
    "TapSetIffError", "TapVnetHdrError", "TapOffloadError", "TapQueueError",
    # helpers
    "tap_offloads", "describe_offloads", "check_ifname", "check_tun_features", "tun_features", "get_features",
    "open_queue", "set_vnet_hdr_size", "get_vnet_hdr_size", "set_offload", "set_queue",
    "get_iff", "Tap",
]

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------
# linux/if_tun.h
TUNSETIFF = 0x400454CA          # _IOW('T', 202, int)
TUNGETFEATURES = 0x800454CF     # _IOR('T', 207, unsigned int)
TUNSETOFFLOAD = 0x400454D0      # _IOW('T', 208, unsigned int)
TUNGETIFF = 0x800454D2          # _IOR('T', 210, unsigned int)
TUNGETVNETHDRSZ = 0x800454D7    # _IOR('T', 215, int)
TUNSETVNETHDRSZ = 0x400454D8    # _IOW('T', 216, int)
TUNSETQUEUE = 0x400454D9        # _IOW('T', 217, int)
TUNSETVNETLE = 0x400454DC       # _IOW('T', 220, int)

IFF_TUN = 0x0001
IFF_TAP = 0x0002
IFF_MULTI_QUEUE = 0x0100
IFF_ATTACH_QUEUE = 0x0200
IFF_DETACH_QUEUE = 0x0400
IFF_PERSIST = 0x0800
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000

#: the TUNSETIFF flags of one queue fd
TAP_QUEUE_FLAGS = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR | IFF_MULTI_QUEUE

TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
TUN_F_TSO_ECN = 0x08
TUN_F_UFO = 0x10
TUN_F_USO4 = 0x20
TUN_F_USO6 = 0x40
TUN_F_ALL = (TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN | TUN_F_UFO
             | TUN_F_USO4 | TUN_F_USO6)

#: interface name buffer, NUL included: names have at most 15 bytes
IFNAMSIZ = 16
#: sizeof(struct ifreq) on 64-bit Linux
IFREQ_SIZE = 40
#: the kernel's MAX_TAP_QUEUES
MAX_TAP_QUEUES = 256
#: sizeof(struct virtio_net_hdr_v1) (VERSION_1 or MRG_RXBUF)
VIRTIO_NET_HDR_SIZE = 12
#: the TUN/TAP clone device
TUN_DEVICE = "/dev/net/tun"

_IFREQ = struct.Struct(f"{IFNAMSIZ}sH{IFREQ_SIZE - IFNAMSIZ - 2}x")
_INT = struct.Struct("i")
_UINT = struct.Struct("I")

_IFF_NAMES = {IFF_TUN: "IFF_TUN", IFF_TAP: "IFF_TAP", IFF_NO_PI: "IFF_NO_PI",
              IFF_VNET_HDR: "IFF_VNET_HDR", IFF_MULTI_QUEUE: "IFF_MULTI_QUEUE"}


# ---------------------------------------------------------------------------------------
# errors

def _errtext(err: int | None) -> str:
    """``"Invalid argument (EINVAL)"``."""
    if not err:
        return "unknown error"
    return f"{os.strerror(err)} ({errno.errorcode.get(err, str(err))})"


class TapError(VirtioError, OSError):
    """A TAP backend step failed.

    ``ifname``, ``operation`` (the ioctl or netlink step) and ``errno`` are attributes;
    ``str()`` is the human message.
    """

    def __init__(self, message: str, *, ifname: str | None = None,
                 operation: str | None = None, err: int | None = None) -> None:
        if err is None:
            super().__init__(message)
        else:
            super().__init__(err, message)
        self.message = message
        self.ifname = ifname
        self.operation = operation

    def __str__(self) -> str:
        return self.message

    @classmethod
    def failed(cls, operation: str, ifname: str, err: int | None,
               hint: str | None = None) -> "TapError":
        """``"<operation> on <ifname> failed: <strerror> (<ERRNO>)[: hint]"``."""
        message = f"{operation} on {ifname} failed: {_errtext(err)}"
        if hint:
            message += f": {hint}"
        return cls(message, ifname=ifname, operation=operation, err=err)


class TapArgumentError(TapError, ValueError):
    """An argument is out of range (queue count, vnet header size, ...)."""


class TapNameError(TapArgumentError):
    """The interface name is not a valid Linux interface name."""


class TapNamespaceNotFound(TapError, NamespaceNotFound):
    """The network namespace named for the TAP does not exist."""


class TapNotFound(TapError):
    """The interface does not exist (and was not to be created)."""


class TapCreateError(TapError):
    """Creating the interface over netlink failed."""


class TapLinkError(TapError):
    """A netlink step on the interface failed (up, MTU, MAC, delete, query)."""


class TapOpenError(TapError):
    """Opening the TUN clone device failed."""


class TapMultiqueueUnsupported(TapError):
    """The kernel's TUN driver lacks multiqueue or vnet header support."""


class TapSetIffError(TapError):
    """TUNSETIFF failed, or the existing interface cannot take our queues."""


class TapVnetHdrError(TapError):
    """TUNSETVNETHDRSZ / TUNGETVNETHDRSZ / TUNSETVNETLE failed."""


class TapOffloadError(TapError):
    """TUNSETOFFLOAD failed (unknown flag, or TSO/UFO/USO without CSUM)."""


class TapQueueError(TapError):
    """TUNSETQUEUE (attach or detach) failed, or a queue count is out of range."""


# ---------------------------------------------------------------------------------------
# guest features -> TAP offloads

def tap_offloads(features: int) -> int:
    """The ``TUN_F_*`` flags for negotiated virtio-net ``features`` (QEMU's mapping).

    The TAP may hand the guest a packet with a partial checksum only if the guest
    accepts one (``GUEST_CSUM`` -> ``TUN_F_CSUM``); segmentation offloads need it:
    ``GUEST_TSO4/TSO6`` -> ``TUN_F_TSO4/TSO6``, ``GUEST_ECN`` -> ``TUN_F_TSO_ECN`` (with
    a TSO), ``GUEST_UFO`` -> ``TUN_F_UFO``, ``GUEST_USO4/USO6`` -> ``TUN_F_USO4/USO6``.
    Without ``GUEST_CSUM`` the result is 0.
    """
    if not features & NetFeature.GUEST_CSUM:
        return 0
    flags = TUN_F_CSUM
    if features & NetFeature.GUEST_TSO4:
        flags |= TUN_F_TSO4
    if features & NetFeature.GUEST_TSO6:
        flags |= TUN_F_TSO6
    if features & NetFeature.GUEST_ECN and flags & (TUN_F_TSO4 | TUN_F_TSO6):
        flags |= TUN_F_TSO_ECN
    if features & NetFeature.GUEST_UFO:
        flags |= TUN_F_UFO
    if features & NetFeature.GUEST_USO4:
        flags |= TUN_F_USO4
    if features & NetFeature.GUEST_USO6:
        flags |= TUN_F_USO6
    return flags


def describe_offloads(flags: int) -> str:
    """``"TUN_F_CSUM|TUN_F_TSO4"`` for a ``TUN_F_*`` value (``"0"`` when empty)."""
    names = {TUN_F_CSUM: "TUN_F_CSUM", TUN_F_TSO4: "TUN_F_TSO4", TUN_F_TSO6: "TUN_F_TSO6",
             TUN_F_TSO_ECN: "TUN_F_TSO_ECN", TUN_F_UFO: "TUN_F_UFO",
             TUN_F_USO4: "TUN_F_USO4", TUN_F_USO6: "TUN_F_USO6"}
    parts = [name for bit, name in names.items() if flags & bit]
    if flags & ~TUN_F_ALL:
        parts.append(f"{flags & ~TUN_F_ALL:#x}")
    return "|".join(parts) or "0"


# ---------------------------------------------------------------------------------------
# the ioctl helper

def check_ifname(name: str) -> bytes:
    """``name`` encoded for ``struct ifreq``; :class:`TapNameError` if Linux would refuse
    it (empty, ``.``/``..``, longer than 15 bytes, ``/``, ``:``, ``%`` or whitespace)."""
    if not isinstance(name, str):
        raise TapNameError(f"interface name must be a str, not {type(name).__name__}",
                           err=errno.EINVAL)
    try:
        raw = name.encode("ascii")
    except UnicodeEncodeError:
        raise TapNameError(f"invalid interface name {name!r}: not ASCII",
                           ifname=name, err=errno.EINVAL) from None
    problem = None
    if not raw or name in (".", ".."):
        problem = "empty or a dot name"
    elif len(raw) >= IFNAMSIZ:
        problem = f"{len(raw)} bytes long, the limit is {IFNAMSIZ - 1} (IFNAMSIZ {IFNAMSIZ})"
    elif any(c in name for c in "/:%") or any(c.isspace() for c in name):
        problem = "contains '/', ':', '%' or whitespace"
    if problem:
        raise TapNameError(f"invalid interface name {name!r}: {problem}", ifname=name,
                           err=errno.EINVAL)
    return raw


def _ifreq(raw_name: bytes, flags: int) -> bytes:
    return _IFREQ.pack(raw_name, flags)


def _flag_names(flags: int) -> str:
    return "|".join(n for bit, n in _IFF_NAMES.items() if flags & bit) or "none"


def get_features(fd: int, ifname: str = "?") -> int:
    """``TUNGETFEATURES``: the ``IFF_*`` flags the TUN driver supports."""
    try:
        out = fcntl.ioctl(fd, TUNGETFEATURES, _UINT.pack(0))
    except OSError as exc:
        raise TapMultiqueueUnsupported.failed("TUNGETFEATURES", ifname, exc.errno) from exc
    return _UINT.unpack(out)[0]


def check_tun_features(features: int, ifname: str = "?",
                       required: int = TAP_QUEUE_FLAGS) -> None:
    """:class:`TapMultiqueueUnsupported` if ``features`` (``TUNGETFEATURES``) lacks a flag
    of ``required``."""
    missing = required & ~features
    if missing:
        raise TapMultiqueueUnsupported(
            f"the TUN driver cannot open {ifname}: TUNGETFEATURES reports {features:#x}, "
            f"without {_flag_names(missing)} (a kernel with multiqueue TAP and vnet "
            "header support is needed)",
            ifname=ifname, operation="TUNGETFEATURES", err=errno.EOPNOTSUPP)


def _open_device(ifname: str, device: str) -> int:
    try:
        return os.open(device, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise TapOpenError(f"opening {device} for {ifname} failed: {_errtext(exc.errno)}",
                           ifname=ifname, operation="open", err=exc.errno) from exc


def tun_features(device: str = TUN_DEVICE) -> int:
    """``TUNGETFEATURES`` of the TUN driver (opens and closes ``device``)."""
    fd = _open_device("(probe)", device)
    try:
        return get_features(fd)
    finally:
        os.close(fd)


def open_queue(ifname: str, *, flags: int = TAP_QUEUE_FLAGS,
               device: str = TUN_DEVICE) -> int:
    """Open one queue fd of TAP ``ifname`` in the calling thread's namespace.

    Opens ``device`` non-blocking and close-on-exec, checks ``TUNGETFEATURES`` for every
    flag in ``flags``, then ``TUNSETIFF``. Returns the fd (the caller closes it).
    """
    raw = check_ifname(ifname)
    fd = _open_device(ifname, device)
    try:
        check_tun_features(get_features(fd, ifname), ifname, flags & ~IFF_PERSIST)
        try:
            fcntl.ioctl(fd, TUNSETIFF, _ifreq(raw, flags))
        except OSError as exc:
            raise TapSetIffError.failed("TUNSETIFF", ifname, exc.errno) from exc
    except BaseException:
        os.close(fd)
        raise
    return fd


def set_vnet_hdr_size(fd: int, size: int, ifname: str = "?") -> None:
    """``TUNSETVNETHDRSZ``; on a big-endian host also ``TUNSETVNETLE`` (VERSION_1
    headers are little-endian)."""
    try:
        fcntl.ioctl(fd, TUNSETVNETHDRSZ, _INT.pack(size))
    except OSError as exc:
        raise TapVnetHdrError.failed(f"TUNSETVNETHDRSZ({size})", ifname, exc.errno) from exc
    if sys.byteorder == "big":   # pragma: no cover - little-endian test machines
        try:
            fcntl.ioctl(fd, TUNSETVNETLE, _INT.pack(1))
        except OSError as exc:
            raise TapVnetHdrError.failed("TUNSETVNETLE", ifname, exc.errno) from exc


def get_vnet_hdr_size(fd: int, ifname: str = "?") -> int:
    """``TUNGETVNETHDRSZ``."""
    try:
        out = fcntl.ioctl(fd, TUNGETVNETHDRSZ, _INT.pack(0))
    except OSError as exc:
        raise TapVnetHdrError.failed("TUNGETVNETHDRSZ", ifname, exc.errno) from exc
    return _INT.unpack(out)[0]


def set_offload(fd: int, flags: int, ifname: str = "?") -> None:
    """``TUNSETOFFLOAD`` with ``TUN_F_*`` ``flags``."""
    try:
        fcntl.ioctl(fd, TUNSETOFFLOAD, flags)
    except OSError as exc:
        hint = None
        if exc.errno == errno.EINVAL:
            if flags & ~TUN_F_ALL:
                hint = f"unknown flag {flags & ~TUN_F_ALL:#x}"
            elif flags and not flags & TUN_F_CSUM:
                hint = "segmentation offloads need TUN_F_CSUM"
            else:
                hint = "this kernel refuses one of the flags"
        raise TapOffloadError.failed(f"TUNSETOFFLOAD({describe_offloads(flags)})", ifname,
                                     exc.errno, hint) from exc


def set_queue(fd: int, attach: bool, ifname: str = "?") -> None:
    """``TUNSETQUEUE`` with ``IFF_ATTACH_QUEUE`` or ``IFF_DETACH_QUEUE``."""
    flag, what = (IFF_ATTACH_QUEUE, "IFF_ATTACH_QUEUE") if attach else \
        (IFF_DETACH_QUEUE, "IFF_DETACH_QUEUE")
    try:
        fcntl.ioctl(fd, TUNSETQUEUE, _ifreq(b"", flag))
    except OSError as exc:
        hint = None
        if exc.errno == errno.EINVAL:
            hint = "queue already attached" if attach else "queue already detached"
        raise TapQueueError.failed(f"TUNSETQUEUE({what})", ifname, exc.errno, hint) from exc


def get_iff(fd: int, ifname: str = "?") -> tuple[str, int]:
    """``TUNGETIFF``: the interface name and its ``IFF_*`` flags."""
    try:
        out = fcntl.ioctl(fd, TUNGETIFF, bytes(IFREQ_SIZE))
    except OSError as exc:
        raise TapSetIffError.failed("TUNGETIFF", ifname, exc.errno) from exc
    raw, flags = _IFREQ.unpack(out)
    return raw.rstrip(b"\0").decode("ascii"), flags


# ---------------------------------------------------------------------------------------
# netlink side

def _tun_info(link: Any) -> dict[str, object] | None:
    """``{"kind": ..., "type": ..., "pi": ..., "vnet_hdr": ..., "multi_queue": ...,
    "num_queues": ..., "num_disabled_queues": ...}`` of a link message (``None`` values
    for what it does not report)."""
    info = link.get_attr("IFLA_LINKINFO")
    if info is None:
        return None
    out: dict[str, object] = {"kind": info.get_attr("IFLA_INFO_KIND")}
    data = info.get_attr("IFLA_INFO_DATA")
    for key, attr in (("type", "IFLA_TUN_TYPE"), ("pi", "IFLA_TUN_PI"),
                      ("vnet_hdr", "IFLA_TUN_VNET_HDR"),
                      ("multi_queue", "IFLA_TUN_MULTI_QUEUE"),
                      ("persist", "IFLA_TUN_PERSIST"),
                      ("num_queues", "IFLA_TUN_NUM_QUEUES"),
                      ("num_disabled_queues", "IFLA_TUN_NUM_DISABLED_QUEUES")):
        out[key] = data.get_attr(attr) if data is not None and hasattr(data, "get_attr") \
            else None
    return out


def _incompatibility(link: Any) -> str | None:
    """Why an existing interface cannot take our queue fds, or ``None``."""
    info = _tun_info(link)
    if info is None or info["kind"] != "tun":
        kind = info["kind"] if info else "unknown"
        return f"the existing interface is not a TUN/TAP device (kind {kind!r})"
    if info["type"] is not None and info["type"] != 2:
        return "the existing interface is a TUN (layer 3) device, not a TAP"
    if info["multi_queue"] == 0:
        return "the existing interface is not multi_queue"
    if info["vnet_hdr"] == 0:
        return "the existing interface is not vnet_hdr"
    if info["pi"] == 1:
        return "the existing interface carries packet information (no no_pi)"
    return None


def _lookup(ipr: IPRoute, ifname: str) -> Any:
    """The link message of ``ifname`` or ``None``."""
    try:
        links = ipr.get_links(ifname=ifname)
    except NetlinkError as exc:
        if exc.code == errno.ENODEV:
            return None
        raise TapLinkError.failed("RTM_GETLINK", ifname, exc.code) from exc
    for link in links:
        if link.get("ifname") == ifname:
            return link
    return None


def _mac_text(mac: bytes | str) -> str:
    if isinstance(mac, (bytes, bytearray)):
        if len(mac) != 6:
            raise TapArgumentError(f"a MAC address has 6 bytes, not {len(mac)}",
                                   err=errno.EINVAL)
        return ":".join(f"{b:02x}" for b in mac)
    return mac


def _ns_name(netns: str | NetNamespace | None) -> str | None:
    if isinstance(netns, NetNamespace):
        return netns.name
    return netns


class Tap:
    """A TAP interface with one open queue fd per virtio-net queue pair.

    Build with :meth:`create` (create the interface if it does not exist) or
    :meth:`open` (it must exist). :meth:`close` closes the fds and deletes the interface
    only if this object created it. A context manager.
    """

    def __init__(self, name: str, fds: Iterable[int], *, netns: str | None,
                 created: bool, ifindex: int, vnet_hdr_size: int) -> None:
        self.name = name
        self.netns = netns
        self.created = created
        self.ifindex = ifindex
        self.vnet_hdr_size = vnet_hdr_size
        self._fds: list[int] = list(fds)
        self._attached: list[bool] = [True] * len(self._fds)
        self._offloads = 0
        self._closed = False

    # -- construction --------------------------------------------------------------------
    @classmethod
    def create(cls, name: str, queues: int = 1, *, netns: str | NetNamespace | None = None,
               mtu: int | None = None, mac: bytes | str | None = None,
               vnet_hdr_size: int = VIRTIO_NET_HDR_SIZE) -> "Tap":
        """Create TAP ``name`` (unless it exists) in namespace ``netns`` (``None``: the
        calling thread's), bring it up, open ``queues`` queue fds with vnet header size
        ``vnet_hdr_size``, offloads off; optionally set ``mtu`` and ``mac``."""
        return cls._setup(name, queues, _ns_name(netns), mtu, mac, vnet_hdr_size, True)

    @classmethod
    def open(cls, name: str, queues: int = 1, *, netns: str | NetNamespace | None = None,
             mtu: int | None = None, mac: bytes | str | None = None,
             vnet_hdr_size: int = VIRTIO_NET_HDR_SIZE) -> "Tap":
        """Like :meth:`create` but the interface must exist (:class:`TapNotFound`)."""
        return cls._setup(name, queues, _ns_name(netns), mtu, mac, vnet_hdr_size, False)

    @classmethod
    def _setup(cls, name: str, queues: int, netns: str | None, mtu: int | None,
               mac: bytes | str | None, vnet_hdr_size: int, create: bool) -> "Tap":
        check_ifname(name)
        if not isinstance(queues, int) or not 1 <= queues <= MAX_TAP_QUEUES:
            raise TapArgumentError(f"{name}: queue count {queues!r} is not in "
                                   f"1..{MAX_TAP_QUEUES}", ifname=name, err=errno.EINVAL)
        if not VIRTIO_NET_HDR_SIZE - 2 <= vnet_hdr_size <= 64:
            raise TapArgumentError(f"{name}: vnet header size {vnet_hdr_size} is not in "
                                   "10..64", ifname=name, err=errno.EINVAL)
        address = _mac_text(mac) if mac is not None else None
        ipr = cls._iproute(netns, name)
        created = False
        fds: list[int] = []
        try:
            link = _lookup(ipr, name)
            if link is None:
                if not create:
                    where = f" in network namespace {netns!r}" if netns else ""
                    raise TapNotFound(f"TAP interface {name} does not exist{where}",
                                      ifname=name, operation="RTM_GETLINK",
                                      err=errno.ENODEV)
                created = cls._add_link(ipr, name)
                link = _lookup(ipr, name)
                if link is None:
                    raise TapNotFound(f"TAP interface {name} vanished after its creation",
                                      ifname=name, operation="RTM_NEWLINK",
                                      err=errno.ENODEV)
            if not created:
                reason = _incompatibility(link)
                if reason:
                    raise TapSetIffError(
                        f"TUNSETIFF on {name} refused: {reason}; a queue fd needs a TAP "
                        "created with multi_queue, vnet_hdr and no_pi",
                        ifname=name, operation="TUNSETIFF", err=errno.EINVAL)
            ifindex = link["index"]
            with _netns.entered(netns):
                for _ in range(queues):
                    try:
                        fds.append(open_queue(name))
                    except TapSetIffError as exc:
                        if exc.errno == errno.EINVAL:
                            reason = _incompatibility(_lookup(ipr, name) or link)
                            if reason:
                                raise TapSetIffError.failed("TUNSETIFF", name, exc.errno,
                                                            reason) from exc
                        raise
            for fd in fds:
                set_vnet_hdr_size(fd, vnet_hdr_size, name)
            tap = cls(name, fds, netns=netns, created=created, ifindex=ifindex,
                      vnet_hdr_size=vnet_hdr_size)
            tap.set_tap_offloads(0)
            if mtu is not None:
                cls._link_set(ipr, name, ifindex, f"setting MTU {mtu}", mtu=mtu)
            if address is not None:
                cls._link_set(ipr, name, ifindex, f"setting MAC {address}",
                              address=address)
            cls._link_set(ipr, name, ifindex, "bringing up", state="up")
        except BaseException:
            for fd in fds:
                os.close(fd)
            if created:
                try:
                    ipr.link("del", ifname=name)
                except NetlinkError as exc:
                    log.warning("cannot delete %s after a failed setup: %s", name, exc)
            raise
        finally:
            ipr.close()
        log.info("TAP %s%s: %d queue(s), vnet header %d bytes%s", name,
                 f" (netns {netns})" if netns else "", queues, vnet_hdr_size,
                 ", created" if created else "")
        return tap

    @staticmethod
    def _iproute(netns: str | None, name: str) -> IPRoute:
        try:
            return _netns.iproute(netns)
        except NamespaceNotFound as exc:
            raise TapNamespaceNotFound(f"cannot use TAP {name}: network namespace "
                                       f"{netns!r} does not exist", ifname=name,
                                       operation="setns", err=errno.ENOENT) from exc

    @staticmethod
    def _add_link(ipr: IPRoute, name: str) -> bool:
        """Create the TAP; ``False`` if someone else created it in the meantime."""
        try:
            ipr.link("add", ifname=name, kind="tuntap", mode="tap",
                     ifr={"no_pi": 1, "vnet_hdr": 1, "multi_queue": 1})
        except NetlinkError as exc:
            if exc.code == errno.EEXIST:
                return False
            raise TapCreateError.failed("creating TAP (RTM_NEWLINK tuntap)", name,
                                        exc.code) from exc
        return True

    @staticmethod
    def _link_set(ipr: IPRoute, name: str, ifindex: int, what: str, **attrs: Any) -> None:
        try:
            ipr.link("set", index=ifindex, **attrs)
        except NetlinkError as exc:
            hint = None
            if "mtu" in attrs and exc.code == errno.EINVAL:
                hint = "a TAP's MTU is 68..65521"
            raise TapLinkError.failed(f"{what} (RTM_NEWLINK)", name, exc.code,
                                      hint) from exc

    # -- state ---------------------------------------------------------------------------
    @property
    def fds(self) -> tuple[int, ...]:
        """The queue fds, queue pair 0 first (attached or not)."""
        self._check_open()
        return tuple(self._fds)

    @property
    def tx_fds(self) -> tuple[int, ...]:
        """Where TX frames go: the queue fds themselves."""
        return self.fds

    @property
    def queues(self) -> int:
        """How many queue fds were opened."""
        return len(self._fds)

    @property
    def active_queues(self) -> int:
        """How many queues are attached (the first ``active_queues`` fds)."""
        return sum(self._attached)

    @property
    def offloads(self) -> int:
        """The ``TUN_F_*`` flags last set."""
        return self._offloads

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    def _check_open(self) -> None:
        if self._closed:
            raise TapError(f"TAP {self.name} is closed", ifname=self.name,
                           err=errno.EBADF)

    def iproute(self) -> IPRoute:
        """An ``IPRoute`` in the TAP's namespace (close it after use)."""
        return self._iproute(self.netns, self.name)

    def iff(self) -> tuple[str, int]:
        """``TUNGETIFF`` on queue 0: the interface name and its ``IFF_*`` flags."""
        self._check_open()
        return get_iff(self._fds[0], self.name)

    def link_info(self) -> dict[str, object]:
        """The TUN attributes netlink reports (``multi_queue``, ``vnet_hdr``,
        ``num_queues``, ``num_disabled_queues``, ...) and ``mtu``, ``address``."""
        with self.iproute() as ipr:
            link = _lookup(ipr, self.name)
        if link is None:
            raise TapNotFound(f"TAP interface {self.name} does not exist any more",
                              ifname=self.name, operation="RTM_GETLINK", err=errno.ENODEV)
        info = _tun_info(link) or {}
        info["mtu"] = link.get("mtu")
        info["address"] = link.get("address")
        info["state"] = link.get("state")
        return info

    # -- control -------------------------------------------------------------------------
    def set_offloads(self, features: int) -> int:
        """Apply the offloads of negotiated guest ``features`` (:func:`tap_offloads`);
        returns the ``TUN_F_*`` flags actually set.

        Like QEMU, a kernel that refuses the full set gets it again without USO, then
        without UFO as well (Linux's TUN accepts ``TUN_F_USO4`` only together with
        ``TUN_F_USO6``, and newer kernels drop UFO): the guest then simply receives
        segmented packets. A set refused even so raises :class:`TapOffloadError`.
        """
        flags = tap_offloads(features)
        attempts = [flags]
        if flags & (TUN_F_USO4 | TUN_F_USO6):
            attempts.append(attempts[-1] & ~(TUN_F_USO4 | TUN_F_USO6))
        if flags & TUN_F_UFO:
            attempts.append(attempts[-1] & ~TUN_F_UFO)
        for i, attempt in enumerate(attempts):
            try:
                self.set_tap_offloads(attempt)
            except TapOffloadError as exc:
                if exc.errno != errno.EINVAL or i == len(attempts) - 1:
                    raise
                continue
            if attempt != flags:
                log.info("TAP %s: kernel refused %s, offloads set to %s", self.name,
                         describe_offloads(flags), describe_offloads(attempt))
            return attempt
        raise AssertionError("unreachable")  # pragma: no cover

    def set_tap_offloads(self, flags: int) -> None:
        """``TUNSETOFFLOAD`` with raw ``TUN_F_*`` ``flags`` (device-wide, issued on
        queue 0, which is always attached)."""
        self._check_open()
        set_offload(self._fds[0], flags, self.name)
        self._offloads = flags

    def set_active_queues(self, n: int) -> None:
        """Attach queues ``0..n-1`` and detach the rest (``VQ_PAIRS_SET``)."""
        self._check_open()
        if not isinstance(n, int) or not 1 <= n <= len(self._fds):
            raise TapQueueError(f"{self.name}: cannot activate {n!r} queues, it has "
                                f"{len(self._fds)} (1..{len(self._fds)})",
                                ifname=self.name, operation="TUNSETQUEUE",
                                err=errno.EINVAL)
        for i in reversed(range(n, len(self._fds))):
            if self._attached[i]:
                self._set_queue(i, False)
        for i in range(n):
            if not self._attached[i]:
                self._set_queue(i, True)
        log.debug("TAP %s: %d of %d queues active", self.name, n, len(self._fds))

    def _set_queue(self, i: int, attach: bool) -> None:
        try:
            set_queue(self._fds[i], attach, self.name)
        except TapQueueError as exc:
            raise TapQueueError(f"{exc.message} (queue {i})", ifname=self.name,
                                operation=exc.operation, err=exc.errno) from exc
        self._attached[i] = attach

    def set_mtu(self, mtu: int) -> None:
        """Set the interface MTU (68..65521 for a TAP)."""
        self._check_open()
        with self.iproute() as ipr:
            self._link_set(ipr, self.name, self.ifindex, f"setting MTU {mtu}", mtu=mtu)

    # -- teardown ------------------------------------------------------------------------
    def close(self) -> None:
        """Close the queue fds; delete the interface if this object created it.
        Idempotent. A namespace that is already gone took the interface with it."""
        if self._closed:
            return
        self._closed = True
        fds, self._fds = self._fds, []
        for fd in fds:
            try:
                os.close(fd)
            except OSError as exc:   # pragma: no cover - our own fds
                log.warning("closing a queue fd of %s: %s", self.name, exc)
        if not self.created:
            return
        try:
            with self.iproute() as ipr:
                ipr.link("del", index=self.ifindex)
        except TapNamespaceNotFound:
            log.debug("TAP %s: namespace %s already removed", self.name, self.netns)
        except NetlinkError as exc:
            if exc.code != errno.ENODEV:
                raise TapLinkError.failed("deleting (RTM_DELLINK)", self.name,
                                          exc.code) from exc
        log.info("TAP %s deleted", self.name)

    def __enter__(self) -> "Tap":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        where = f" netns={self.netns}" if self.netns else ""
        state = "closed" if self._closed else f"{self.active_queues}/{self.queues} queues"
        return f"<Tap {self.name}{where} {state}>"
