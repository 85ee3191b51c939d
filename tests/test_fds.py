"""pyvirtio.fds: what an fd handed over by another party is, and eventfds used without
ever blocking."""

from __future__ import annotations

import fcntl
import os
import socket

import pytest

from pyvirtio import fds
from pyvirtio.fds import EVENTFD_MAX, FdKindError


@pytest.fixture
def closing():
    opened: list[int] = []
    yield opened
    for fd in opened:
        os.close(fd)


def _pipe(closing) -> tuple[int, int]:
    r, w = os.pipe()
    closing += [r, w]
    return r, w


def test_describe_fd(closing, tmp_path):
    r, w = _pipe(closing)
    a, b = socket.socketpair()
    memfd = os.memfd_create("t")
    efd = os.eventfd(0)
    plain = os.open(str(tmp_path / "f"), os.O_RDWR | os.O_CREAT, 0o600)
    directory = os.open(str(tmp_path), os.O_RDONLY)
    closing += [memfd, efd, plain, directory]
    try:
        assert fds.describe_fd(r) == "a pipe"
        assert fds.describe_fd(a.fileno()) == "a socket"
        assert fds.describe_fd(memfd) == "a memfd"
        assert fds.describe_fd(efd) == "an eventfd"
        assert fds.describe_fd(plain) == "a regular file"
        assert fds.describe_fd(directory) == "a directory"
        assert fds.describe_fd(99999) == "not an open fd"
    finally:
        a.close()
        b.close()


def test_check_eventfd_takes_only_eventfds_and_makes_them_nonblocking(closing):
    efd = os.eventfd(0)                       # blocking, as a careless peer made it
    closing.append(efd)
    fds.check_eventfd(efd, "ring 0 call")
    assert fcntl.fcntl(efd, fcntl.F_GETFL) & os.O_NONBLOCK
    with pytest.raises(BlockingIOError):
        os.eventfd_read(efd)                  # would have blocked before
    r, w = _pipe(closing)
    with pytest.raises(FdKindError, match="ring 0 kick: fd is a pipe, not an eventfd"):
        fds.check_eventfd(w, "ring 0 kick")
    assert not fcntl.fcntl(w, fcntl.F_GETFL) & os.O_NONBLOCK    # refused: left as it was


def test_signal_a_full_eventfd_counts_as_signalled(closing):
    efd = os.eventfd(0)                       # blocking: a write past the maximum would hang
    closing.append(efd)
    os.eventfd_write(efd, EVENTFD_MAX)
    assert fds.signal(efd)
    assert os.eventfd_read(efd) == EVENTFD_MAX
    assert fds.signal(efd) and os.eventfd_read(efd) == 1
    r, w = _pipe(closing)
    os.close(closing.pop())                   # w closed: not an open fd any more
    assert not fds.signal(w)


def test_drain(closing):
    efd = os.eventfd(0, os.EFD_NONBLOCK)
    closing.append(efd)
    assert fds.drain(efd) == 0
    os.eventfd_write(efd, 3)
    assert fds.drain(efd) == 3 and fds.drain(efd) == 0


def test_unblock_reads_a_full_counter_and_writes_an_empty_one(closing):
    full = os.eventfd(0)
    empty = os.eventfd(0)
    closing += [full, empty]
    os.eventfd_write(full, EVENTFD_MAX)
    fds.unblock(full, reader=False)
    os.eventfd_write(full, 1)                 # room again (it would block before)
    fds.unblock(empty, reader=True)
    assert os.eventfd_read(empty) == 1


def test_check_memory_fd(closing, tmp_path):
    memfd = os.memfd_create("t", os.MFD_ALLOW_SEALING)
    closing.append(memfd)
    os.ftruncate(memfd, 1 << 20)
    fds.check_memory_fd(memfd, 1 << 20, "region")
    assert fcntl.fcntl(memfd, fcntl.F_GET_SEALS) & fcntl.F_SEAL_SHRINK
    with pytest.raises(PermissionError):
        os.ftruncate(memfd, 4096)             # sealed: cannot shrink under a mapping
    os.ftruncate(memfd, 2 << 20)              # growing is still the owner's business
    with pytest.raises(FdKindError, match=r"holds 0x200000 bytes, 0x300000 are needed"):
        fds.check_memory_fd(memfd, 3 << 20, "region")
    unsealable = os.memfd_create("t")         # no MFD_ALLOW_SEALING: F_SEAL_SEAL is set
    closing.append(unsealable)
    os.ftruncate(unsealable, 8192)
    fds.check_memory_fd(unsealable, 8192, "region")
    r, w = _pipe(closing)
    with pytest.raises(FdKindError, match="region: fd is a pipe, not a file that holds memory"):
        fds.check_memory_fd(w, 4096, "region")
    with pytest.raises(FdKindError, match="a character device"):
        zero = os.open("/dev/zero", os.O_RDWR)
        closing.append(zero)
        fds.check_memory_fd(zero, 4096, "region")
    efd = os.eventfd(0)
    closing.append(efd)
    with pytest.raises(FdKindError, match="an eventfd"):
        fds.check_memory_fd(efd, 4096, "region")
