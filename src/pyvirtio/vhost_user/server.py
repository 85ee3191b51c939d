"""The listening side of a vhost-user back-end program.

:class:`VhostUserServer` listens on a Unix socket path (``--socket-path``) or uses a
socket it was given (``--fd``: a listening socket, or an already connected one), serves
one front-end at a time with a :class:`~pyvirtio.vhost_user.backend.VhostUserNetBackend`,
and listens again after a front-end disconnects. :meth:`VhostUserServer.shutdown` (safe
from a signal handler or another thread) ends :meth:`VhostUserServer.serve_forever`
promptly, also in the middle of a connection; :meth:`VhostUserServer.close` removes the
socket file it created.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import socket
import stat

from pyvirtio.vhost_user.backend import VhostUserNetBackend
from pyvirtio.vhost_user.connection import Connection
from pyvirtio.vhost_user.messages import VhostUserError

log = logging.getLogger(__name__)

#: longest ``sun_path`` (108 bytes with its terminating NUL)
MAX_SOCKET_PATH = 107


class ServerError(VhostUserError, OSError):
    """The server cannot listen (path in use, not a socket, bad fd, ...):
    ``ServerError(errno, message)``."""

    def __str__(self) -> str:
        return self.strerror or super().__str__()


def check_socket_path(path: str) -> None:
    """Raise :class:`ServerError` for a path a Unix socket cannot be bound to."""
    raw = os.fsencode(path)
    if not raw:
        raise ServerError(errno.EINVAL, "the socket path is empty")
    if len(raw) > MAX_SOCKET_PATH:
        raise ServerError(errno.ENAMETOOLONG,
                          f"socket path {path!r} is {len(raw)} bytes long "
                          f"(at most {MAX_SOCKET_PATH})")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise ServerError(errno.ENOENT, f"directory {parent!r} of the socket path does not exist")


def check_socket_fd(fd: int) -> None:
    """Raise :class:`ServerError` unless ``fd`` is an open Unix stream socket."""
    try:
        st = os.fstat(fd)
    except OSError as exc:
        raise ServerError(exc.errno, f"fd {fd} is not open") from None
    if not stat.S_ISSOCK(st.st_mode):
        raise ServerError(errno.ENOTSOCK, f"fd {fd} is not a socket")
    probe = socket.socket(fileno=os.dup(fd))
    try:
        if probe.family != socket.AF_UNIX or probe.type != socket.SOCK_STREAM:
            raise ServerError(errno.EPROTOTYPE, f"fd {fd} is not a Unix stream socket")
    finally:
        probe.close()


class VhostUserServer:
    """Serve front-ends one after the other.

    Args:
        backend: the back-end serving each connection.
        socket_path: listen here (a stale socket file is replaced; a live one is an
            error).
        fd: or use this socket fd (ownership passes to the server): a listening socket
            is served like ``socket_path``; a connected one is served once.
        message_timeout: seconds a front-end may take to finish a message it began,
            and to take a reply.
    """

    def __init__(self, backend: VhostUserNetBackend, *, socket_path: str | None = None,
                 fd: int | None = None, message_timeout: float = 5.0) -> None:
        if (socket_path is None) == (fd is None):
            raise ValueError("give exactly one of socket_path and fd")
        self.backend = backend
        self.socket_path = socket_path
        self.message_timeout = message_timeout
        self._stopping = False
        self._inode: int | None = None
        self._listener: socket.socket | None = None
        self._connected: socket.socket | None = None
        self._wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        try:
            if socket_path is not None:
                self._listener = self._listen(socket_path)
            else:
                check_socket_fd(fd)
                sock = socket.socket(fileno=fd)
                if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
                    self._listener = sock
                else:
                    self._connected = sock
        except BaseException:
            os.close(self._wake)
            raise

    # ---- listening ---------------------------------------------------------------------------

    def _listen(self, path: str) -> socket.socket:
        check_socket_path(path)
        if os.path.lexists(path):
            st = os.lstat(path)
            if not stat.S_ISSOCK(st.st_mode):
                raise ServerError(errno.EEXIST, f"{path} exists and is not a socket")
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(path)
            except (ConnectionRefusedError, FileNotFoundError):
                log.info("removing the stale socket %s", path)
                os.unlink(path)
            else:
                raise ServerError(errno.EADDRINUSE, f"{path}: another back-end listens there")
            finally:
                probe.close()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(path)
            self._inode = os.stat(path).st_ino
            sock.listen(1)
        except OSError as exc:
            sock.close()
            raise ServerError(exc.errno, f"cannot listen on {path}: {exc.strerror}") from None
        log.info("listening on %s", path)
        return sock

    @property
    def listening(self) -> bool:
        """Whether the server accepts connections (False for a connected ``fd``)."""
        return self._listener is not None

    def _accept(self) -> socket.socket | None:
        assert self._listener is not None
        while not self._stopping:
            ready, _, _ = select.select([self._listener, self._wake], [], [])
            if self._wake in ready:
                return None
            try:
                conn, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                continue
            return conn
        return None

    # ---- serving -----------------------------------------------------------------------------

    def serve_forever(self) -> None:
        """Serve front-ends until :meth:`shutdown` (or, for a connected ``fd``, until
        that one connection ends)."""
        while not self._stopping:
            if self._connected is not None:
                sock, self._connected = self._connected, None
            elif self._listener is not None:
                sock = self._accept()
                if sock is None:
                    break
            else:
                break
            sock.settimeout(self.message_timeout)
            try:
                self.backend.serve(Connection(sock, message_timeout=self.message_timeout,
                                              send_wait=False), self._wake)
            finally:
                sock.close()
            if self._listener is None:
                break
        log.info("server stopped")

    def shutdown(self) -> None:
        """Make :meth:`serve_forever` return (signal handlers, other threads)."""
        self._stopping = True
        try:
            os.eventfd_write(self._wake, 1)
        except OSError:
            pass

    def close(self) -> None:
        """Stop listening and remove the socket file (only the one this server bound).
        Call after :meth:`serve_forever` returned. Idempotent."""
        self._stopping = True
        if self._listener is not None:
            self._listener.close()
            self._listener = None
            path = self.socket_path
            if path is not None and self._inode is not None:
                try:
                    if os.stat(path).st_ino == self._inode:
                        os.unlink(path)
                except FileNotFoundError:
                    pass
                self._inode = None
        if self._connected is not None:
            self._connected.close()
            self._connected = None
        if self._wake >= 0:
            os.close(self._wake)
            self._wake = -1

    def __enter__(self) -> "VhostUserServer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["VhostUserServer", "ServerError", "check_socket_path", "check_socket_fd",
           "MAX_SOCKET_PATH"]
