"""One vhost-user connection over a Unix stream socket.

Messages are read incrementally (:meth:`Connection.read_messages`, for an event loop
serving many connections): the 12-byte header with the fds that ride on it
(SCM_RIGHTS), then exactly ``size`` bytes of body, each read as far as the socket has
data; a message is handed out once it is whole. Anything malformed raises
:class:`ProtocolError` after closing every fd that arrived. Once the first byte of a
message is in, the rest must follow within ``message_timeout`` seconds
(:attr:`Connection.deadline`; the blocking :meth:`Connection.recv` enforces it itself):
a peer that stalls mid-message cannot hang us. A back-end's connection
(``send_wait=False``) never waits to send either: a reply that does not fit the
socket buffer at once means the peer stopped reading, and :class:`PeerStalled` ends
the connection.
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


def _readable(sock: socket.socket) -> bool:
    """Whether ``sock`` has data (or its end) to read now. Python's socket calls on a
    socket with a timeout wait for it first: asking the kernel keeps reads from ever
    waiting, whatever the socket's mode."""
    p = select.poll()
    p.register(sock, select.POLLIN)
    return bool(p.poll(0))


class Connection:
    """A vhost-user message stream (either end)."""

    def __init__(self, sock: socket.socket, *, message_timeout: float = 5.0,
                 max_body: int = MAX_BODY, send_wait: bool = True) -> None:
        self.sock = sock
        self.message_timeout = message_timeout
        self.max_body = max_body
        #: False: a send that would block raises PeerStalled instead of waiting
        self.send_wait = send_wait
        # the message being read: header bytes, then body bytes (size known)
        self._head = bytearray()
        self._body = bytearray()
        self._size: int | None = None
        self._fds: list[int] = []
        #: time.monotonic() by which the message being read must be whole, or None
        self.deadline: float | None = None

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        """Close the socket and any fd of a message read halfway."""
        self._discard()
        try:
            self.sock.close()
        except OSError:
            pass

    # ---- receiving ---------------------------------------------------------------------

    def _discard(self) -> None:
        close_fds(self._fds)
        self._fds = []
        self._head.clear()
        self._body.clear()
        self._size = None
        self.deadline = None

    def _read_some(self) -> bool:
        """Read what the socket has towards the current message; False when it has
        nothing (now). Raises PeerClosed at a clean end of stream."""
        if not _readable(self.sock):
            return False
        if self._size is None:
            want = HEADER_SIZE - len(self._head)
            data, fds, flags, _ = socket.recv_fds(self.sock, want, MAX_FDS,
                                                  socket.MSG_CMSG_CLOEXEC | socket.MSG_DONTWAIT)
            self._fds += fds
            if flags & socket.MSG_CTRUNC:
                raise ProtocolError(f"more than {MAX_FDS} fds (control data truncated)")
            if not data:
                if self._fds:
                    raise ProtocolError("fds without a message")
                if self._head:
                    raise ProtocolError(f"connection closed in the middle of a message "
                                        f"(header: {len(self._head)} of {HEADER_SIZE} bytes)")
                raise PeerClosed("peer closed the connection")
            if not self._head:
                self.deadline = time.monotonic() + self.message_timeout
            self._head += data
            if len(self._head) == HEADER_SIZE:
                request, mflags, size = HEADER.unpack(self._head)
                if mflags & FLAG_VERSION_MASK != VERSION:
                    raise ProtocolError(f"request {request}: protocol version "
                                        f"{mflags & FLAG_VERSION_MASK}, expected {VERSION}")
                if size > self.max_body:
                    raise ProtocolError(f"request {request}: body of {size} bytes exceeds "
                                        f"the {self.max_body}-byte limit")
                self._size = size
            return True
        want = self._size - len(self._body)
        data = self.sock.recv(want, socket.MSG_DONTWAIT)
        if not data:
            raise ProtocolError(f"connection closed in the middle of a message (body: "
                                f"{len(self._body)} of {self._size} bytes)")
        self._body += data
        return True

    def _take(self) -> Message | None:
        """The message read so far, if it is whole."""
        if self._size is None or len(self._body) < self._size:
            return None
        request, mflags, _ = HEADER.unpack(self._head)
        msg = Message(request, mflags, bytes(self._body), self._fds)
        self._fds = []
        self._head.clear()
        self._body.clear()
        self._size = None
        self.deadline = None
        return msg

    def read_messages(self, limit: int = 64) -> list[Message]:
        """The messages that the socket holds now, whole (at most ``limit``), without
        blocking. Raises :class:`PeerClosed` at a clean end of stream between messages
        (only when no message came with it), :class:`ProtocolError` for a malformed
        message (its fds closed)."""
        out: list[Message] = []
        try:
            while len(out) < limit:
                try:
                    if not self._read_some():
                        break
                except (BlockingIOError, InterruptedError):
                    break
                msg = self._take()
                if msg is not None:
                    out.append(msg)
        except PeerClosed:
            if out:
                return out            # the end is seen again on the next call
            raise
        except BaseException:
            self._discard()
            for msg in out:
                close_fds(msg.fds)
            raise
        return out

    def stalled(self, now: float | None = None) -> bool:
        """Whether a message begun is overdue (``message_timeout`` since its first byte)."""
        return self.deadline is not None and (time.monotonic() if now is None else now) \
            > self.deadline

    def recv(self, timeout: float | None = None) -> Message:
        """The next message, waiting for it (up to ``timeout`` seconds for its first
        byte, then ``message_timeout`` for the rest). Raises :class:`PeerClosed` at a
        clean end of stream, :class:`ProtocolError` for a malformed message (fds
        already closed), ``TimeoutError`` when nothing arrived within ``timeout``."""
        start = time.monotonic()
        while True:
            msgs = self.read_messages(limit=1)
            if msgs:
                return msgs[0]
            now = time.monotonic()
            if self.deadline is not None:
                left = self.deadline - now
                if left <= 0:
                    self._discard()
                    raise ProtocolError("peer stalled in the middle of a message")
            elif timeout is not None:
                left = start + timeout - now
                if left <= 0:
                    raise TimeoutError("no message")
            else:
                left = None
            p = select.poll()
            p.register(self.sock, select.POLLIN)
            p.poll(None if left is None else max(1, int(left * 1000 + 0.999)))

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
