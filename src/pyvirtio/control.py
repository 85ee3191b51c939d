"""A control socket: commands in, answers out, as JSON lines over a Unix socket.

A running back-end (``pyvirtio net --control PATH``, ``pyvirtio rng``, and later the
switch) answers commands such as ``show`` and ``stats`` on it, the way ``ovs-appctl``
talks to OVS. ``pyvirtio ctl PATH COMMAND`` is the client, and so is :func:`request`
for Python callers (the e2e harness and the benchmarks read counters this way, not
from log lines).

Wire format: one request per line, ``{"command": "stats", "args": {...}}``; one answer
per line, ``{"ok": true, "result": ...}`` or ``{"ok": false, "error": "..."}``. A
connection may send several requests.

The control socket faces whoever can reach its path, so it is as careful as the
vhost-user socket: it runs in a thread of its own (a slow or hostile client never
delays the data path or the vhost-user loop), serves at most :data:`MAX_CLIENTS`
clients at once, drops a client whose line exceeds :data:`MAX_LINE` bytes or stays
unfinished for ``timeout`` seconds, answers malformed JSON, unknown commands and bad
arguments with an error, never blocks on a client that does not read its answers, and
a command that fails reports its error instead of ending anything else.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import selectors
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from vqcore.errors import VirtioError

log = logging.getLogger(__name__)

#: longest request line accepted (bytes, the newline included)
MAX_LINE = 64 * 1024
#: clients served at once (more are closed at once)
MAX_CLIENTS = 16

#: a command: (arguments) -> a JSON-serialisable result; raise to answer an error
Command = Callable[[Mapping[str, Any]], Any]


class ControlError(VirtioError, RuntimeError):
    """A control request failed: the socket is not there, or the command answered an
    error (``str(exc)`` is its message)."""


class CommandError(VirtioError, ValueError):
    """Raised by a command for a request it refuses (bad arguments, unknown port):
    the client gets the message."""


@dataclass
class _Client:
    sock: socket.socket
    buf: bytearray = field(default_factory=bytearray)
    out: bytearray = field(default_factory=bytearray)
    since: float | None = None        # when the unfinished line began


class ControlServer:
    """Serve ``commands`` on a Unix socket at ``path`` from a thread of its own.

    Args:
        path: where to listen (a stale socket file is replaced).
        commands: command name -> function of the request's ``args``.
        timeout: seconds a client may take to finish a line (and to read an answer).
        mode: the socket file's permission bits (default 0o600: the owner only).
    """

    def __init__(self, path: str, commands: Mapping[str, Command], *, timeout: float = 5.0,
                 mode: int = 0o600) -> None:
        self.path = path
        self.commands = dict(commands)
        self.commands.setdefault("help", lambda args: sorted(self.commands))
        self.timeout = timeout
        if os.path.lexists(path):
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(path)
            except (ConnectionRefusedError, FileNotFoundError):
                os.unlink(path)
            else:
                raise ControlError(f"{path}: a control socket is live there")
            finally:
                probe.close()
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            self._listener.bind(path)
            os.chmod(path, mode)
            self._listener.listen(MAX_CLIENTS)
            self._listener.setblocking(False)
        except OSError as exc:
            self._listener.close()
            raise ControlError(f"cannot listen on {path}: {exc.strerror}") from None
        self._inode = os.stat(path).st_ino
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._clients: dict[int, _Client] = {}
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="pyvirtio-control", daemon=True)
        self._thread.start()
        log.info("control socket on %s", path)

    # ---- the loop ----------------------------------------------------------------------

    def _run(self) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self._listener, selectors.EVENT_READ, "listen")
        sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        try:
            while not self._stopping:
                now = time.monotonic()
                for fd, c in list(self._clients.items()):
                    if c.since is not None and now - c.since > self.timeout:
                        log.warning("control: a client did not finish its request (or read "
                                    "its answer) within %.1f s; dropped", self.timeout)
                        self._drop(sel, fd)
                for key, events in sel.select(0.5):
                    if key.data == "wake":
                        return
                    if key.data == "listen":
                        self._accept(sel)
                    else:
                        self._io(sel, key.fd, events)
        except Exception:  # noqa: BLE001 - the control thread must not die silently
            log.exception("control socket failed")
        finally:
            for fd in list(self._clients):
                self._drop(sel, fd)
            sel.close()

    def _accept(self, sel: selectors.BaseSelector) -> None:
        try:
            sock, _ = self._listener.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return
        if len(self._clients) >= MAX_CLIENTS:
            log.warning("control: %d clients already; one more refused", MAX_CLIENTS)
            sock.close()
            return
        sock.setblocking(False)
        self._clients[sock.fileno()] = _Client(sock)
        sel.register(sock, selectors.EVENT_READ, "client")

    def _drop(self, sel: selectors.BaseSelector, fd: int) -> None:
        c = self._clients.pop(fd, None)
        if c is not None:
            try:
                sel.unregister(c.sock)
            except (KeyError, ValueError):
                pass
            c.sock.close()

    def _io(self, sel: selectors.BaseSelector, fd: int, events: int) -> None:
        c = self._clients[fd]
        try:
            if events & selectors.EVENT_WRITE:
                self._flush(c)
            if events & selectors.EVENT_READ:
                data = c.sock.recv(MAX_LINE)
                if not data:
                    self._drop(sel, fd)
                    return
                c.buf += data
                while b"\n" in c.buf:
                    line, _, rest = c.buf.partition(b"\n")
                    c.buf = bytearray(rest)
                    c.out += self.answer(bytes(line)) + b"\n"
                if len(c.buf) >= MAX_LINE:
                    c.out += _encode({"ok": False, "error": f"request longer than "
                                      f"{MAX_LINE} bytes"}) + b"\n"
                    self._flush(c)
                    self._drop(sel, fd)
                    return
                self._flush(c)
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            self._drop(sel, fd)
            return
        c.since = (c.since or time.monotonic()) if (c.buf or c.out) else None
        sel.modify(c.sock, selectors.EVENT_READ | (selectors.EVENT_WRITE if c.out else 0),
                   "client")

    @staticmethod
    def _flush(c: _Client) -> None:
        while c.out:
            n = c.sock.send(c.out)
            del c.out[:n]

    # ---- one request -------------------------------------------------------------------

    def answer(self, line: bytes) -> bytes:
        """The answer line (without its newline) to one request line."""
        try:
            req = json.loads(line)
            if not isinstance(req, dict) or not isinstance(req.get("command"), str):
                raise CommandError('a request is {"command": NAME, "args": {...}}')
            args = req.get("args", {})
            if not isinstance(args, dict):
                raise CommandError('"args" must be an object')
            fn = self.commands.get(req["command"])
            if fn is None:
                raise CommandError(f"unknown command {req['command']!r} (known: "
                                   f"{', '.join(sorted(self.commands))})")
            return _encode({"ok": True, "result": fn(args)})
        except (ValueError, CommandError) as exc:
            # json.JSONDecodeError and UnicodeDecodeError are ValueErrors
            return _encode({"ok": False, "error": str(exc)})
        except Exception as exc:  # noqa: BLE001 - a failing command answers its error
            log.warning("control: %s failed: %s", line[:80], exc)
            return _encode({"ok": False, "error": f"{type(exc).__name__}: {exc}"})

    # ---- life cycle --------------------------------------------------------------------

    def close(self) -> None:
        """Stop the thread and remove the socket file. Idempotent."""
        if self._stopping:
            return
        self._stopping = True
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass
        self._thread.join(5)
        self._listener.close()
        for fd in (self._wake_r, self._wake_w):
            os.close(fd)
        try:
            if os.stat(self.path).st_ino == self._inode:
                os.unlink(self.path)
        except FileNotFoundError:
            pass

    def __enter__(self) -> "ControlServer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _encode(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), default=str).encode()


def request(path: str, command: str, timeout: float = 5.0, **args: Any) -> Any:
    """Send ``command`` with ``args`` to the control socket at ``path``; return its
    result. Raises :class:`ControlError` when the socket cannot be reached or the
    command answered an error."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(path)
            sock.sendall(_encode({"command": command, "args": args}) + b"\n")
            buf = bytearray()
            while b"\n" not in buf:
                chunk = sock.recv(65536)
                if not chunk:
                    raise ControlError(f"{path}: the control socket closed without an answer")
                buf += chunk
        except OSError as exc:
            code = exc.errno or errno.EIO
            raise ControlError(f"{path}: {os.strerror(code) if exc.errno else exc}") from None
    finally:
        sock.close()
    answer = json.loads(buf.partition(b"\n")[0])
    if not answer.get("ok"):
        raise ControlError(answer.get("error", "the command failed"))
    return answer.get("result")


__all__ = ["ControlServer", "ControlError", "CommandError", "Command", "request", "MAX_LINE",
           "MAX_CLIENTS"]
