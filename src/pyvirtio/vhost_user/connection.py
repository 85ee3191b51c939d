"""One vhost-user connection over a Unix stream socket.

:meth:`Connection.recv` reads the 12-byte header with the fds that ride on it
(SCM_RIGHTS), then exactly ``size`` bytes of body; anything malformed raises
:class:`ProtocolError` after closing every fd that arrived. Once the first byte of a
message is in, the rest must follow within ``message_timeout`` seconds: a peer that
stalls mid-message cannot hang us. A back-end's connection (``send_wait=False``) never
waits to send either: a reply that does not fit the socket buffer at once means the
peer stopped reading, and :class:`PeerStalled` ends the connection.
"""

from __future__ import annotations

import array
import logging
import os
import select
import socket
import time
from typing import Iterable

from pyvirtio.vhost_user.messages import (FLAG_REPLY, FLAG_VERSION_MASK, HEADER, HEADER_SIZE,
                                          MAX_BODY, MAX_FDS, VERSION, Message, ProtocolError)

log = logging.getLogger(__name__)


class PeerClosed(ConnectionError):
    """The peer closed the connection between messages."""


class PeerStalled(ConnectionError):
    """The peer does not read what we send (its socket buffer is full)."""


def close_fds(fds: Iterable[int]) -> None:
    """Close every fd, ignoring errors."""
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


class Connection:
    """A vhost-user message stream (either end)."""

    def __init__(self, sock: socket.socket, *, message_timeout: float = 5.0,
                 max_body: int = MAX_BODY, send_wait: bool = True) -> None:
        self.sock = sock
        self.message_timeout = message_timeout
        self.max_body = max_body
        #: False: a send that would block raises PeerStalled instead of waiting
        self.send_wait = send_wait

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    # ---- receiving ---------------------------------------------------------------------

    def _wait(self, deadline: float, what: str) -> None:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([self.sock], [], [], left)[0]:
            raise ProtocolError(f"peer stalled in the middle of a message ({what})")

    def _read_exact(self, n: int, deadline: float, what: str) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            self._wait(deadline, what)
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise ProtocolError(f"connection closed in the middle of a message ({what}: "
                                    f"{len(buf)} of {n} bytes)")
            buf += chunk
        return bytes(buf)

    def recv(self, timeout: float | None = None) -> Message:
        """The next message. Raises :class:`PeerClosed` at a clean end of stream,
        :class:`ProtocolError` for a malformed message (fds already closed),
        ``TimeoutError`` when nothing arrived within ``timeout``."""
        if timeout is not None and not select.select([self.sock], [], [], timeout)[0]:
            raise TimeoutError("no message")
        fds: list[int] = []
        try:
            data, fds, flags, _ = socket.recv_fds(self.sock, HEADER_SIZE, MAX_FDS,
                                                  socket.MSG_CMSG_CLOEXEC)
            fds = list(fds)
            if flags & socket.MSG_CTRUNC:
                raise ProtocolError(f"more than {MAX_FDS} fds (control data truncated)")
            if not data:
                if fds:
                    raise ProtocolError("fds without a message")
                raise PeerClosed("peer closed the connection")
            deadline = time.monotonic() + self.message_timeout
            if len(data) < HEADER_SIZE:
                data += self._read_exact(HEADER_SIZE - len(data), deadline, "header")
            request, mflags, size = HEADER.unpack(data)
            if mflags & FLAG_VERSION_MASK != VERSION:
                raise ProtocolError(f"request {request}: protocol version "
                                    f"{mflags & FLAG_VERSION_MASK}, expected {VERSION}")
            if size > self.max_body:
                raise ProtocolError(f"request {request}: body of {size} bytes exceeds the "
                                    f"{self.max_body}-byte limit")
            body = self._read_exact(size, deadline, "body") if size else b""
            return Message(request, mflags, body, fds)
        except BaseException:
            close_fds(fds)
            raise

    # ---- sending -----------------------------------------------------------------------

    def send(self, msg: Message) -> None:
        """Send a message with its fds (without ``send_wait``: all at once, or
        :class:`PeerStalled`)."""
        data = msg.header() + msg.body
        anc = ([(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", msg.fds).tobytes())]
               if msg.fds else [])
        if self.send_wait:
            sent = self.sock.sendmsg([data], anc)
        else:
            timeout = self.sock.gettimeout()
            self.sock.settimeout(0.0)      # (with a timeout, Python polls before sending)
            try:
                sent = self.sock.sendmsg([data], anc)
            except BlockingIOError:
                sent = 0
            finally:
                self.sock.settimeout(timeout)
        if sent < len(data):
            if not self.send_wait:
                raise PeerStalled(f"the peer does not read: {sent} of {len(data)} bytes "
                                  "of a message fit its socket buffer")
            self.sock.sendall(data[sent:])

    def reply(self, request: Message, body: bytes = b"") -> None:
        """Reply to ``request`` (REPLY flag, same request code)."""
        self.send(Message(request.request, VERSION | FLAG_REPLY, body))


__all__ = ["Connection", "PeerClosed", "PeerStalled", "close_fds"]
