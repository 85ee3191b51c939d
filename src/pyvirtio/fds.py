"""File descriptors another party hands us: what they are, and how to use them without
ever blocking on them.

A vhost-user front-end (or any VMM wiring a device) passes eventfds for kicks, calls and
errors, and files holding guest memory. A hostile one passes anything: a pipe, a socket
whose peer hung up, a directory, an eventfd whose counter is already at its maximum (one
more write would block), a file too small for the region it claims to hold. So:

* :func:`check_eventfd` accepts only an eventfd (``/proc/self/fdinfo`` shows its
  ``eventfd-count``) and makes its file description non-blocking. The description is
  shared with the sender, which does no harm to a sender that already uses it
  non-blocking (QEMU, DPDK and our front-end all do).
* :func:`signal` writes 1 without blocking: a counter that is full means the other side
  has not read the earlier signals yet, so the fd counts as signalled (the same holds
  for the burst kernels' interrupt writes in C, on the same non-blocking fds).
* :func:`unblock` frees a thread stuck on a peer's eventfd (possible only if the peer
  cleared O_NONBLOCK again behind our back): a reader is woken by a write, a writer by
  a read that empties the counter.
* :func:`check_memory_fd` accepts only a regular file (a memfd, a tmpfs or hugetlbfs
  file) at least as large as the mapping asked for, and seals a sealable memfd against
  shrinking, so that the sender cannot truncate it under our mapping (a SIGBUS here).
"""

from __future__ import annotations

import errno
import fcntl
import os
import select
import stat

from vqcore.errors import VirtioError

#: the largest value an eventfd counter holds: a write that would pass it blocks
EVENTFD_MAX = 0xFFFFFFFFFFFFFFFE

_ONE = (1).to_bytes(8, "little")


class FdKindError(VirtioError, ValueError):
    """An fd is not of the kind its message says (not an eventfd, not a file that can
    hold memory, too small)."""


def describe_fd(fd: int) -> str:
    """What ``fd`` is, in words: ``"an eventfd"``, ``"a pipe"``, ``"a socket"``,
    ``"a memfd"``, ``"a regular file"``, ``"a directory"``, ..., or ``"not an open
    fd"``."""
    try:
        st = os.fstat(fd)
    except OSError:
        return "not an open fd"
    mode = st.st_mode
    if stat.S_ISREG(mode):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            target = ""
        return "a memfd" if target.startswith("/memfd:") else "a regular file"
    for test, name in ((stat.S_ISFIFO, "a pipe"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISDIR, "a directory"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    try:
        target = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return "an unknown kind of fd"
    if target.startswith("anon_inode:"):         # anon_inode:[eventfd], anon_inode:[timerfd]
        kind = target[len("anon_inode:"):].strip("[]")
        return "an eventfd" if kind == "eventfd" else f"an anonymous {kind} fd"
    return f"an fd of {target}"


def is_eventfd(fd: int) -> bool:
    """Whether ``fd`` is an eventfd (its fdinfo has an ``eventfd-count`` line)."""
    try:
        with open(f"/proc/self/fdinfo/{fd}", "rb") as f:
            return any(line.startswith(b"eventfd-count:") for line in f)
    except OSError:
        return False


def set_nonblocking(fd: int) -> None:
    """Set O_NONBLOCK on ``fd``'s file description."""
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    if not flags & os.O_NONBLOCK:
        fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_NONBLOCK)


def check_eventfd(fd: int, what: str) -> None:
    """Raise :class:`FdKindError` naming ``what`` unless ``fd`` is an eventfd; make it
    non-blocking."""
    if not is_eventfd(fd):
        raise FdKindError(f"{what}: fd is {describe_fd(fd)}, not an eventfd")
    set_nonblocking(fd)


def _poll(fd: int, event: int) -> int:
    """The events ``fd`` has right now among ``event`` (POLLIN/POLLOUT), POLLERR and
    POLLNVAL."""
    p = select.poll()
    p.register(fd, event)
    revents = 0
    for _, ev in p.poll(0):
        revents |= ev
    return revents


def signal(fd: int) -> bool:
    """Add 1 to eventfd ``fd`` without blocking. Returns True when the other side will
    see a signal (written, or the counter is full: signals it has not read yet), False
    when the fd failed (its error is not raised: a peer's fd is not ours to fail on)."""
    try:
        revents = _poll(fd, select.POLLOUT)
        if revents & (select.POLLERR | select.POLLNVAL):
            return False
        if not revents & select.POLLOUT:
            return True                   # full (or a peer cleared O_NONBLOCK): signalled
        os.write(fd, _ONE)
        return True
    except BlockingIOError:
        return True
    except (OSError, ValueError):
        return False


def drain(fd: int) -> int:
    """Read and clear eventfd ``fd`` without blocking; returns the count (0 if none)."""
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0


def unblock(fd: int, reader: bool) -> None:
    """Free a thread of ours blocked on a peer's eventfd ``fd``: ``reader`` (it waits
    to read: a kick fd) gets a write, a writer (a call or error fd at its maximum) a
    read that empties the counter. Errors are ignored."""
    try:
        set_nonblocking(fd)
        if reader:
            os.write(fd, _ONE)
        elif _poll(fd, select.POLLIN) & select.POLLIN:
            os.read(fd, 8)
    except OSError:
        pass


def check_memory_fd(fd: int, length: int, what: str) -> None:
    """Raise :class:`FdKindError` naming ``what`` unless ``fd`` is a regular file (a
    memfd, a tmpfs or hugetlbfs file) of at least ``length`` bytes. A memfd that
    allows sealing gets F_SEAL_SHRINK: it can no longer shrink under a mapping."""
    try:
        st = os.fstat(fd)
    except OSError as exc:
        raise FdKindError(f"{what}: {os.strerror(exc.errno or errno.EBADF)}") from None
    if not stat.S_ISREG(st.st_mode):
        raise FdKindError(f"{what}: fd is {describe_fd(fd)}, not a file that holds memory")
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError:
        seals = fcntl.F_SEAL_SEAL            # not a memfd: nothing to seal
    if not seals & (fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL):
        try:
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
        except OSError:
            pass                             # (read-only fd): the size check still holds
    size = os.fstat(fd).st_size             # after sealing: it cannot shrink below it now
    if size < length:
        raise FdKindError(f"{what}: the file holds {size:#x} bytes, {length:#x} are needed")


__all__ = ["FdKindError", "EVENTFD_MAX", "describe_fd", "is_eventfd", "set_nonblocking",
           "check_eventfd", "signal", "drain", "unblock", "check_memory_fd"]
