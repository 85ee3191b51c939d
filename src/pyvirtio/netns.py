"""Network namespaces that the caller owns: create, enter, use and remove them.

A *named* network namespace is a bind mount of a namespace file under
``/var/run/netns/<name>`` (the convention of ``ip netns``). pyroute2 creates and removes
the mount; the rest is ours:

* :func:`entered` / :func:`run_in` move **the calling thread only** into a namespace
  (``setns(2)`` acts per thread) and always restore the thread's original namespace in a
  ``finally``. The original is taken from ``/proc/thread-self/ns/net``, not
  ``/proc/self/ns/net`` (the latter is the *main* thread's namespace, which is wrong when
  the caller is another thread). Unlike ``pyroute2.netns.setns``, entering a namespace
  that does not exist never creates it: it raises :class:`NamespaceNotFound`.
* Anything opened while inside stays bound to that namespace after the thread leaves it:
  a socket (:func:`socket_in`), a file such as ``/dev/net/tun`` (:func:`open_in`).
  :func:`iproute` gives an ``IPRoute`` bound to a namespace.
* :class:`NetNamespace` is a context manager with a unique name that removes itself, and
  every interface in it, on exit — also after an error.

Everything here needs ``CAP_SYS_ADMIN`` (root).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import itertools
import logging
import os
import socket
from contextlib import AbstractContextManager, contextmanager
from typing import Any, Callable, Iterator, TypeVar

from pyroute2 import IPRoute
from pyroute2 import netns as _pr_netns
from pyroute2.netlink.exceptions import NetlinkError

from vqcore.errors import VirtioError

__all__ = [
    "NETNS_RUN_DIR", "CLONE_NEWNET", "NetnsError", "NamespaceNotFound", "NamespaceExists",
    "netns_path", "exists", "create", "remove", "entered", "run_in", "open_in",
    "socket_in", "iproute", "unique_name", "NetNamespace",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

#: where named namespaces are bind-mounted (as ``ip netns`` does)
NETNS_RUN_DIR = "/var/run/netns"
#: ``setns(2)`` namespace type of a network namespace
CLONE_NEWNET = 0x40000000
#: the calling thread's own namespace file
_THREAD_NETNS = "/proc/thread-self/ns/net"


class NetnsError(VirtioError, OSError):
    """A network namespace operation failed."""

    def __init__(self, message: str, err: int | None = None) -> None:
        if err is None:
            super().__init__(message)
        else:
            super().__init__(err, message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class NamespaceNotFound(NetnsError, FileNotFoundError):
    """The named network namespace does not exist."""


class NamespaceExists(NetnsError, FileExistsError):
    """A network namespace of that name exists already."""


def netns_path(name: str) -> str:
    """The mount point of namespace ``name`` (``/var/run/netns/<name>``)."""
    if not name or "/" in name or name in (".", ".."):
        raise NetnsError(f"invalid network namespace name {name!r}", errno.EINVAL)
    return os.path.join(NETNS_RUN_DIR, name)


def exists(name: str) -> bool:
    """Whether namespace ``name`` exists."""
    return os.path.exists(netns_path(name))


_counter = itertools.count()


def unique_name(prefix: str = "pyvirtio") -> str:
    """A namespace name unique to this process and call: ``<prefix>-<pid>-<n><rand>``."""
    return f"{prefix}-{os.getpid()}-{next(_counter)}{os.urandom(2).hex()}"


def create(name: str) -> None:
    """Create namespace ``name``; :class:`NamespaceExists` if it exists."""
    path = netns_path(name)
    if os.path.exists(path):
        raise NamespaceExists(f"network namespace {name!r} exists already ({path})",
                              errno.EEXIST)
    try:
        _pr_netns.create(name)
    except OSError as exc:
        raise NetnsError(f"creating network namespace {name!r} failed: "
                         f"{_errtext(exc.errno)}", exc.errno) from exc
    log.debug("created network namespace %s", name)


def remove(name: str, *, purge: bool = True) -> None:
    """Remove namespace ``name``.

    With ``purge`` every interface in it except ``lo`` is deleted first, so virtual
    devices (a persistent TAP, a veth) go away now rather than when the last file
    descriptor that pins the namespace is closed. :class:`NamespaceNotFound` if it does
    not exist.
    """
    path = netns_path(name)
    if not os.path.exists(path):
        raise NamespaceNotFound(f"network namespace {name!r} does not exist ({path})",
                                errno.ENOENT)
    if purge:
        _purge_links(name)
    try:
        _pr_netns.remove(name)
    except OSError as exc:
        raise NetnsError(f"removing network namespace {name!r} failed: "
                         f"{_errtext(exc.errno)}", exc.errno) from exc
    log.debug("removed network namespace %s", name)


def _purge_links(name: str) -> None:
    """Delete every link of namespace ``name`` but the loopback; log what cannot go."""
    try:
        with iproute(name) as ipr:
            for link in ipr.get_links():
                ifname = link.get("ifname")
                if link["index"] == 1 or ifname == "lo":
                    continue
                try:
                    ipr.link("del", index=link["index"])
                except NetlinkError as exc:
                    if exc.code != errno.ENODEV:   # ENODEV: went with its veth peer
                        log.warning("cannot delete %s in network namespace %s: %s",
                                    ifname, name, _errtext(exc.code))
    except (OSError, NetlinkError) as exc:  # the namespace itself still goes
        log.warning("cannot list the links of network namespace %s: %s", name, exc)


def _errtext(err: int | None) -> str:
    """``"Invalid argument (EINVAL)"`` for an errno value."""
    if not err:
        return "unknown error"
    return f"{os.strerror(err)} ({errno.errorcode.get(err, str(err))})"


_libc: ctypes.CDLL | None = None


def _setns(fd: int) -> None:
    """``setns(fd, CLONE_NEWNET)`` for the calling thread."""
    native = getattr(os, "setns", None)     # Python >= 3.12
    if native is not None:
        native(fd, CLONE_NEWNET)
        return
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _open_ns(name: str) -> int:
    path = netns_path(name)
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NamespaceNotFound(f"network namespace {name!r} does not exist ({path})",
                                errno.ENOENT) from None
    except OSError as exc:
        raise NetnsError(f"cannot open network namespace {name!r} ({path}): "
                         f"{_errtext(exc.errno)}", exc.errno) from exc


@contextmanager
def entered(name: str | None) -> Iterator[None]:
    """Run the ``with`` body with the calling thread inside namespace ``name``.

    ``None`` means "stay where you are" (handy for optional namespaces). The thread's
    original namespace is restored on exit, also when the body raises; if even that fails
    the thread is in an unknown namespace and :class:`NetnsError` says so.
    """
    if name is None:
        yield
        return
    target = _open_ns(name)
    try:
        original = os.open(_THREAD_NETNS, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        os.close(target)
        raise
    try:
        try:
            _setns(target)
        except OSError as exc:
            raise NetnsError(f"entering network namespace {name!r} failed: "
                             f"{_errtext(exc.errno)}", exc.errno) from exc
        finally:
            os.close(target)
        try:
            yield
        finally:
            try:
                _setns(original)
            except OSError as exc:  # pragma: no cover - the kernel does not refuse this
                raise NetnsError("cannot return to the original network namespace after "
                                 f"{name!r}: {_errtext(exc.errno)}", exc.errno) from exc
    finally:
        os.close(original)


def run_in(name: str | None, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)`` with the calling thread inside namespace ``name``."""
    with entered(name):
        return fn(*args, **kwargs)


def open_in(name: str | None, path: str, flags: int, mode: int = 0o777) -> int:
    """``os.open(path, flags, mode)`` inside namespace ``name`` (e.g. ``/dev/net/tun``:
    a TUN file binds to the namespace it is opened in). Returns the fd."""
    with entered(name):
        return os.open(path, flags, mode)


def socket_in(name: str | None, family: int = socket.AF_INET,
              type: int = socket.SOCK_STREAM, proto: int = 0) -> socket.socket:
    """A socket created inside namespace ``name`` (it stays bound to it)."""
    with entered(name):
        return socket.socket(family, type, proto)


def iproute(name: str | None = None) -> IPRoute:
    """An ``IPRoute`` bound to namespace ``name`` (``None``: the calling thread's
    namespace). The caller closes it (it is a context manager).

    This is ``IPRoute(netns=name, flags=0)`` after checking that the namespace exists:
    a missing namespace raises :class:`NamespaceNotFound` instead of being created (the
    default ``flags=O_CREAT`` would create it). Do not build it with a plain
    ``IPRoute()`` inside :func:`entered` instead: pyroute2 creates a ``kind="tuntap"``
    link by ioctls run in the namespace of the thread that calls ``link("add")``, which
    for an in-thread socket is the caller's namespace, not the socket's; with ``netns=``
    pyroute2 runs those ioctls in a child process that enters the right namespace.
    """
    if name is None:
        return IPRoute()
    path = netns_path(name)
    if not os.path.exists(path):
        raise NamespaceNotFound(f"network namespace {name!r} does not exist ({path})",
                                errno.ENOENT)
    try:
        return IPRoute(netns=name, flags=0)
    except FileNotFoundError:
        raise NamespaceNotFound(f"network namespace {name!r} does not exist ({path})",
                                errno.ENOENT) from None


class NetNamespace:
    """A network namespace owned by this object.

    ``with NetNamespace() as ns:`` creates a namespace with a unique name and removes it,
    with every interface in it, when the block ends — whether it ends normally or by an
    exception. :meth:`remove` may also be called directly (it is idempotent).
    """

    def __init__(self, name: str | None = None, *, prefix: str = "pyvirtio") -> None:
        self.name = name if name is not None else unique_name(prefix)
        self.path = netns_path(self.name)
        self._created = False

    @classmethod
    def create(cls, name: str | None = None, *, prefix: str = "pyvirtio") -> "NetNamespace":
        """Create and return a namespace (remove it with :meth:`remove`)."""
        ns = cls(name, prefix=prefix)
        ns.open()
        return ns

    def open(self) -> None:
        """Create the namespace; :class:`NamespaceExists` if the name is taken."""
        if self._created:
            return
        create(self.name)
        self._created = True

    @property
    def active(self) -> bool:
        """Whether this object created the namespace and has not removed it yet."""
        return self._created

    def remove(self) -> None:
        """Delete every interface in the namespace, then the namespace. Idempotent."""
        if not self._created:
            return
        self._created = False
        try:
            remove(self.name)
        except NamespaceNotFound:
            log.warning("network namespace %s vanished before its removal", self.name)

    def __enter__(self) -> "NetNamespace":
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "active" if self._created else "inactive"
        return f"<NetNamespace {self.name} {state}>"

    # -- doing things inside -------------------------------------------------------------
    def entered(self) -> AbstractContextManager[None]:
        """Context manager: the calling thread inside this namespace."""
        return entered(self.name)

    def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``fn(*args, **kwargs)`` inside this namespace, in the calling thread."""
        return run_in(self.name, fn, *args, **kwargs)

    def open_file(self, path: str, flags: int, mode: int = 0o777) -> int:
        """``os.open`` inside this namespace; returns the fd."""
        return open_in(self.name, path, flags, mode)

    def socket(self, family: int = socket.AF_INET, type: int = socket.SOCK_STREAM,
               proto: int = 0) -> socket.socket:
        """A socket bound to this namespace."""
        return socket_in(self.name, family, type, proto)

    def iproute(self) -> IPRoute:
        """An ``IPRoute`` bound to this namespace (close it after use)."""
        return iproute(self.name)

    def links(self) -> list[str]:
        """Names of the interfaces in this namespace."""
        with self.iproute() as ipr:
            return [link.get("ifname") for link in ipr.get_links()]
