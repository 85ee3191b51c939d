"""The socket side of vhost-user back-ends: many ports in one process, one event loop.

A :class:`Port` is one vhost-user socket and the device behind it. It either listens
on a path (``socket_path``, the back-end program convention's ``--socket-path``), uses
a socket it was given (``fd``: a listening socket, or an already connected one,
served once), or connects to a front-end that listens (``client=True``: QEMU's
``-chardev socket,server=on``, OVS-DPDK's ``dpdkvhostuserclient``), connecting again
with a bounded backoff whenever the front-end is not there yet or went away. A port
serves one front-end at a time, with its own :class:`~pyvirtio.vhost_user.handler.
VhostUserHandler`; a front-end that connects meanwhile waits in the listen backlog.

:class:`VhostUserServer` runs every port in one thread: one epoll loop over the
listeners, the connections and a wake-up eventfd. Messages are read without blocking
(a front-end that stalls in the middle of one is dropped after ``message_timeout``),
replies never wait for a front-end that stopped reading, and whatever one port's
front-end sends or does, the other ports' connections go on: a failure ends that
connection alone. The devices' workers run in threads of their own.

:meth:`VhostUserServer.shutdown` (safe from a signal handler or another thread) ends
:meth:`VhostUserServer.serve_forever` promptly; ports can be added and removed while it
runs (:meth:`VhostUserServer.add_port`, :meth:`VhostUserServer.remove_port`, from any
thread); :meth:`VhostUserServer.close` removes the socket files the server created.
"""

from __future__ import annotations

import errno
import logging
import os
import selectors
import socket
import stat
import threading
import time
from typing import Any, Callable, Iterable, Mapping

from pyvirtio.control import CommandError
from pyvirtio.vhost_user.connection import Connection, PeerClosed, close_fds
from pyvirtio.vhost_user.device import VhostUserDevice
from pyvirtio.vhost_user.handler import VhostUserHandler
from pyvirtio.vhost_user.messages import ProtocolError, VhostUserError

log = logging.getLogger(__name__)

#: longest ``sun_path`` (108 bytes with its terminating NUL)
MAX_SOCKET_PATH = 107
#: client mode: the first wait before connecting again, and the longest
BACKOFF_MIN, BACKOFF_MAX = 0.05, 1.0


class ServerError(VhostUserError, OSError):
    """A port cannot listen or connect (path in use, not a socket, bad fd, ...):
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


class Port:
    """One vhost-user socket and the device behind it.

    Args:
        device: the device served (it stays the caller's: :meth:`VhostUserServer.close`
            does not close it).
        socket_path: listen here (a stale socket file is replaced; a live one is an
            error), or, with ``client``, connect here.
        fd: or use this socket fd (ownership passes to the port): a listening socket is
            served like ``socket_path``; a connected one is served once.
        client: connect to ``socket_path`` (and again whenever the front-end goes away)
            instead of listening.
        name: for log lines (default the device's name).
        message_timeout: seconds a front-end may take to finish a message it began.
        socket_mode: with ``socket_path`` (listening), the socket file's permission
            bits (e.g. ``0o660``; default: as the umask leaves them).
        socket_group: with ``socket_path`` (listening), the socket file's group (a
            name or gid), for a front-end running as another user (libvirt's QEMU).
    """

    def __init__(self, device: VhostUserDevice, *, socket_path: str | None = None,
                 fd: int | None = None, client: bool = False, name: str | None = None,
                 message_timeout: float = 5.0, socket_mode: int | None = None,
                 socket_group: str | int | None = None) -> None:
        if (socket_path is None) == (fd is None):
            raise ValueError("give exactly one of socket_path and fd")
        if client and socket_path is None:
            raise ValueError("a client port connects to a socket_path")
        if message_timeout <= 0:
            raise ValueError("message_timeout must be positive")
        self.device = device
        self.socket_path = socket_path
        self.client = client
        self.name = name or device.name
        self.message_timeout = message_timeout
        self.socket_mode = socket_mode
        self.socket_group = socket_group
        #: connections served so far
        self.connections = 0
        #: the current connection's handler, or None
        self.handler: VhostUserHandler | None = None
        self.conn: Connection | None = None
        self.listener: socket.socket | None = None
        self._given: socket.socket | None = None     # a connected fd, served once
        self._inode: int | None = None
        self._retry_at = 0.0
        self._backoff = BACKOFF_MIN
        self._waiting_logged = False
        self.closed = False
        #: the last connection's negotiated features and counters, as it ended
        self.last: dict[str, Any] | None = None
        if fd is not None:
            check_socket_fd(fd)
            sock = socket.socket(fileno=fd)
            if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
                self.listener = sock
                self.listener.setblocking(False)
            else:
                self._given = sock
        elif not client:
            assert socket_path is not None
            self.listener = self._listen(socket_path)

    # ---- listening --------------------------------------------------------------------------

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
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.bind(path)
            self._inode = os.stat(path).st_ino
            if self.socket_group is not None:
                os.chown(path, -1, _gid(self.socket_group))
            if self.socket_mode is not None:
                os.chmod(path, self.socket_mode)
            sock.listen(1)
            sock.setblocking(False)
        except (OSError, KeyError) as exc:
            sock.close()
            self._unlink()
            if isinstance(exc, KeyError):
                raise ServerError(errno.EINVAL, f"no group {self.socket_group!r}") from None
            raise ServerError(exc.errno, f"cannot listen on {path}: {exc.strerror}") from None
        log.info("%s: listening on %s", self.name, path)
        return sock

    def _unlink(self) -> None:
        path = self.socket_path
        if path is not None and self._inode is not None and not self.client:
            try:
                if os.stat(path).st_ino == self._inode:
                    os.unlink(path)
            except FileNotFoundError:
                pass
            self._inode = None

    @property
    def listening(self) -> bool:
        """Whether the port accepts connections."""
        return self.listener is not None

    @property
    def finished(self) -> bool:
        """Whether the port has nothing left to serve (a given connection ended)."""
        return (self.closed or (self.listener is None and not self.client
                                and self._given is None and self.conn is None))

    def _connect(self, now: float) -> socket.socket | None:
        """Client mode: one attempt to reach the front-end; None (and a retry
        scheduled) when it is not there."""
        assert self.socket_path is not None
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.setblocking(False)
            sock.connect(self.socket_path)
        except (FileNotFoundError, ConnectionRefusedError, BlockingIOError,
                InterruptedError, PermissionError, OSError) as exc:
            sock.close()
            if not self._waiting_logged:
                log.info("%s: waiting for the front-end at %s (%s)", self.name,
                         self.socket_path, exc.strerror or exc)
                self._waiting_logged = True
            self._retry_at = now + self._backoff
            self._backoff = min(self._backoff * 2, BACKOFF_MAX)
            return None
        self._waiting_logged = False
        self._backoff = BACKOFF_MIN
        return sock

    # ---- a connection ----------------------------------------------------------------------

    def _begin(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.conn = Connection(sock, message_timeout=self.message_timeout, send_wait=False)
        self.handler = VhostUserHandler(self.device, name=self.name)
        self.connections += 1
        log.info("%s: front-end connected", self.name)

    def _end(self, why: str) -> None:
        """The connection is over: everything of it released; a client connects again
        soon."""
        handler, conn = self.handler, self.conn
        self.handler = self.conn = None
        log.info("%s: %s", self.name, why)
        try:
            if handler is not None:
                self.last = self._session(handler)
            self.device.log_stats("connection ended")
        except Exception:  # noqa: BLE001 - the teardown below must run
            log.exception("%s: cannot log the counters", self.name)
        try:
            if handler is not None:
                handler.close()
        finally:
            if conn is not None:
                conn.close()
        self._retry_at = time.monotonic() + BACKOFF_MIN

    def _serve(self) -> None:
        """The connection is readable: handle what arrived."""
        assert self.conn is not None and self.handler is not None
        try:
            msgs = self.conn.read_messages()
        except PeerClosed:
            self._end("front-end disconnected")
            return
        except (ProtocolError, OSError) as exc:
            log.warning("%s: %s; closing the connection", self.name, exc)
            self._end("connection closed")
            return
        for i, msg in enumerate(msgs):
            try:
                ok = self.handler.handle(self.conn, msg)
            except OSError as exc:
                log.warning("%s: cannot reply to %s (%s); closing the connection",
                            self.name, msg.name(), exc)
                ok = False
            if not ok:
                for rest in msgs[i + 1:]:
                    close_fds(rest.fds)
                self._end("connection closed")
                return

    def _session(self, handler: VhostUserHandler) -> dict[str, Any]:
        return {"features": handler.acked_features,
                "protocol_features": handler.protocol_features,
                "rings_started": [r.index for r in handler.rings if r.started],
                "needs_reset": handler.needs_reset_reason,
                "stats": self.device.stats()}

    def info(self) -> dict[str, Any]:
        """The port as data (the control socket's ``show`` and ``stats``): where, mode,
        connections, the current connection's state and counters, and the last
        connection's as it ended."""
        h = self.handler
        return {"name": self.name, "type": self.device.device_type,
                "socket": self.socket_path, "mode": "client" if self.client else "server",
                "connected": h is not None, "connections": self.connections,
                "current": self._session(h) if h is not None else None,
                "last": self.last}

    def close(self) -> None:
        """End the connection, stop listening, remove the socket file this port bound.
        The device stays open (it is the caller's). Idempotent."""
        if self.conn is not None:
            self._end("shutting down the connection")
        if self.listener is not None:
            self.listener.close()
            self.listener = None
        if self._given is not None:
            self._given.close()
            self._given = None
        self._unlink()
        self.closed = True

    def __repr__(self) -> str:
        where = self.socket_path or "fd"
        mode = "client" if self.client else "server"
        state = "connected" if self.conn is not None else "idle"
        return f"<Port {self.name} {mode} {where} {state} connections={self.connections}>"


def _gid(group: str | int) -> int:
    if isinstance(group, int):
        return group
    import grp
    return grp.getgrnam(group).gr_gid


class VhostUserServer:
    """Serve every port's front-ends, in one thread.

    ``VhostUserServer(device, socket_path=...)`` (or ``fd=``, ``client=``) is the
    one-port shorthand; ``VhostUserServer(ports=[...])`` serves several.

    Args:
        device: a device to serve on one port built from the keyword arguments.
        ports: ports to serve (more can be added while it runs).
        socket_path, fd, client, message_timeout, socket_mode, socket_group: as
            :class:`Port` (with ``device``).
    """

    def __init__(self, device: VhostUserDevice | None = None, *, ports: Iterable[Port] = (),
                 socket_path: str | None = None, fd: int | None = None,
                 client: bool = False, message_timeout: float = 5.0,
                 socket_mode: int | None = None, socket_group: str | int | None = None
                 ) -> None:
        self.ports: list[Port] = list(ports)
        self._stopping = False
        self._lock = threading.Lock()
        self._pending: list[Callable[[], None]] = []
        self._wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._sel: selectors.BaseSelector | None = None
        self._thread: threading.Thread | None = None
        try:
            if device is not None:
                self.ports.append(Port(device, socket_path=socket_path, fd=fd, client=client,
                                       message_timeout=message_timeout,
                                       socket_mode=socket_mode, socket_group=socket_group))
        except BaseException:
            os.close(self._wake)
            raise

    @property
    def port(self) -> Port:
        """The first port (the one-port shorthand's)."""
        return self.ports[0]

    @property
    def listening(self) -> bool:
        """Whether the first port accepts connections (False for a connected ``fd``)."""
        return bool(self.ports) and self.ports[0].listening

    # ---- ports while running -------------------------------------------------------------

    def _call_in_loop(self, fn: Callable[[], None]) -> None:
        with self._lock:
            self._pending.append(fn)
        self._kick()

    def add_port(self, port: Port) -> Port:
        """Serve ``port`` too (from any thread; taken up at the loop's next turn)."""
        def add() -> None:
            self.ports.append(port)
        if self._sel is None:
            add()
        else:
            self._call_in_loop(add)
        return port

    def remove_port(self, port: Port, wait: float = 10.0) -> None:
        """Stop serving ``port`` and close it (its connection ends; the device stays
        the caller's). From any thread: returns once the loop did it (or after
        ``wait`` seconds)."""
        done = threading.Event()

        def remove() -> None:
            if port in self.ports:
                self.ports.remove(port)
            self._forget(port)
            port.close()
            done.set()
        if self._sel is None or threading.current_thread() is self._thread:
            remove()
        else:
            self._call_in_loop(remove)
            done.wait(wait)

    # ---- the loop ---------------------------------------------------------------------------

    def _kick(self) -> None:
        try:
            os.eventfd_write(self._wake, 1)
        except (OSError, ValueError):
            pass

    def _forget(self, port: Port) -> None:
        sel = self._sel
        if sel is None:
            return
        for obj in (port.listener, port.conn):
            if obj is not None:
                try:
                    sel.unregister(obj)
                except (KeyError, ValueError):
                    pass

    def _watch(self, sel: selectors.BaseSelector, port: Port) -> None:
        """Register what ``port`` waits on now: its connection, else its listener."""
        want = port.conn if port.conn is not None else port.listener
        for obj in (port.listener, port.conn):
            if obj is None or obj is want:
                continue
            try:
                sel.unregister(obj)
            except (KeyError, ValueError):
                pass
        if want is not None:
            try:
                sel.get_key(want)
            except KeyError:
                sel.register(want, selectors.EVENT_READ, port)

    def _step(self, port: Port, now: float) -> None:
        """Start a connection where one can start without waiting."""
        if port.conn is not None or port.closed:
            return
        if port._given is not None:
            sock, port._given = port._given, None
            port._begin(sock)
        elif port.client and now >= port._retry_at:
            sock = port._connect(now)
            if sock is not None:
                port._begin(sock)

    def serve_forever(self) -> None:
        """Serve every port until :meth:`shutdown` (or until no port has anything
        left to serve: connected ``fd`` ports whose connection ended)."""
        self._thread = threading.current_thread()
        sel = self._sel = selectors.DefaultSelector()
        sel.register(self._wake, selectors.EVENT_READ, None)
        try:
            while not self._stopping:
                with self._lock:
                    pending, self._pending = self._pending, []
                for fn in pending:
                    fn()
                now = time.monotonic()
                for port in list(self.ports):
                    if port.conn is not None and port.conn.stalled(now):
                        log.warning("%s: peer stalled in the middle of a message; closing "
                                    "the connection", port.name)
                        self._forget(port)
                        port._end("connection closed")
                    self._step(port, now)
                    self._watch(sel, port)
                if self.ports and all(p.finished for p in self.ports):
                    break
                timeout = self._timeout(now)
                for key, _ in sel.select(timeout):
                    if key.data is None:
                        try:
                            os.eventfd_read(self._wake)
                        except BlockingIOError:
                            pass
                        continue
                    self._event(sel, key.data, key.fileobj)
                    if self._stopping:
                        break
        finally:
            sel.close()
            self._sel = None
            log.info("server stopped")

    def _timeout(self, now: float) -> float | None:
        """Seconds until the next stall deadline or client retry (None: none)."""
        times = []
        for p in self.ports:
            if p.conn is not None and p.conn.deadline is not None:
                times.append(p.conn.deadline)
            elif p.conn is None and p.client and not p.closed:
                times.append(p._retry_at)
        if not times:
            return None
        return max(0.0, min(times) - now)

    def _event(self, sel: selectors.BaseSelector, port: Port, obj: object) -> None:
        if obj is port.listener and port.conn is None:
            try:
                sock, _ = port.listener.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return
            port._begin(sock)
        elif obj is port.conn:
            conn = port.conn
            port._serve()
            if port.conn is not conn:
                try:
                    sel.unregister(conn)
                except (KeyError, ValueError):
                    pass
        self._watch(sel, port)

    def control_commands(self) -> dict[str, Callable[[Mapping[str, Any]], Any]]:
        """Commands for a :class:`pyvirtio.control.ControlServer`: ``show`` (every
        port as :meth:`Port.info` gives it) and ``stats`` (the devices' counters; arg
        ``port``: one port by name)."""
        def ports(args: Mapping[str, Any]) -> list[Port]:
            name = args.get("port")
            chosen = [p for p in list(self.ports) if name is None or p.name == name]
            if name is not None and not chosen:
                raise CommandError(f"no port {name!r}")
            return chosen

        def show(args: Mapping[str, Any]) -> list[dict[str, Any]]:
            return [p.info() for p in ports(args)]

        def stats(args: Mapping[str, Any]) -> dict[str, Any]:
            return {p.name: p.device.stats() for p in ports(args)}
        return {"show": show, "stats": stats}

    def shutdown(self) -> None:
        """Make :meth:`serve_forever` return (signal handlers, other threads)."""
        self._stopping = True
        self._kick()

    def close(self) -> None:
        """End every connection, stop listening and remove the socket files the ports
        created. Call after :meth:`serve_forever` returned. Idempotent. The devices
        stay open (they are the caller's)."""
        self._stopping = True
        for port in self.ports:
            port.close()
        if self._wake >= 0:
            os.close(self._wake)
            self._wake = -1

    def __enter__(self) -> "VhostUserServer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["VhostUserServer", "Port", "ServerError", "check_socket_path", "check_socket_fd",
           "MAX_SOCKET_PATH", "BACKOFF_MIN", "BACKOFF_MAX"]
