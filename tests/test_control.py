"""The control socket (:mod:`pyvirtio.control`) and ``pyvirtio ctl``: answers, errors,
and what a hostile client gets (malformed JSON, an over-long line, a line never
finished, answers never read, too many clients)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time

import pytest

from pyvirtio.control import (MAX_CLIENTS, MAX_LINE, CommandError, ControlError,
                              ControlServer, request)
from vhost_user_peer import wait_for


def _commands():
    def boom(args):
        raise RuntimeError("it broke")

    def echo(args):
        if "value" not in args:
            raise CommandError("echo needs a value")
        return args["value"]
    return {"echo": echo, "boom": boom, "big": lambda args: "x" * (1 << 20)}


@pytest.fixture
def ctl(tmp_path):
    with ControlServer(str(tmp_path / "ctl"), _commands(), timeout=0.5) as c:
        yield c


def _raw(path: str, data: bytes, timeout: float = 2.0) -> bytes:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect(path)
    try:
        s.sendall(data)
        out = b""
        while not out.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            out += chunk
        return out
    finally:
        s.close()


def test_answers_and_errors(ctl):
    assert request(ctl.path, "echo", value=[1, "two"]) == [1, "two"]
    assert sorted(request(ctl.path, "help")) == ["big", "boom", "echo", "help"]
    with pytest.raises(ControlError, match="echo needs a value"):
        request(ctl.path, "echo")
    with pytest.raises(ControlError, match="RuntimeError: it broke"):
        request(ctl.path, "boom")
    with pytest.raises(ControlError, match="unknown command 'nope'"):
        request(ctl.path, "nope")
    assert len(request(ctl.path, "big")) == 1 << 20        # a long answer arrives whole
    assert request(ctl.path, "echo", value=1) == 1          # still serving


@pytest.mark.parametrize("line, error", [
    (b"not json\n", "Expecting value"),
    (b"[1, 2]\n", "a request is"),
    (b'{"command": 3}\n', "a request is"),
    (b'{"command": "echo", "args": [1]}\n', '"args" must be an object'),
    (b"\xff\xfe\n", ""),                      # whatever json says of it
])
def test_malformed_requests_get_an_error(ctl, line, error):
    answer = json.loads(_raw(ctl.path, line))
    assert answer["ok"] is False and error in answer["error"]


def test_several_requests_on_one_connection(ctl):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(2)
    s.connect(ctl.path)
    s.sendall(b'{"command":"echo","args":{"value":1}}\n{"command":"echo","args":{"value":2}}\n')
    got = b""
    while got.count(b"\n") < 2:
        got += s.recv(4096)
    s.close()
    assert [json.loads(x)["result"] for x in got.splitlines()] == [1, 2]


def test_an_overlong_line_is_refused_and_dropped(ctl):
    answer = json.loads(_raw(ctl.path, b"x" * (MAX_LINE + 10)))
    assert answer["ok"] is False and "longer than" in answer["error"]
    assert request(ctl.path, "echo", value=3) == 3


def test_a_client_that_never_finishes_or_never_reads_is_dropped(ctl):
    half = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    half.connect(ctl.path)
    half.sendall(b'{"command": "ech')
    deaf = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    deaf.connect(ctl.path)
    deaf.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    deaf.sendall(b'{"command":"big"}\n' * 4)          # answers it never reads
    try:
        t0 = time.monotonic()
        assert request(ctl.path, "echo", value=4) == 4     # others are served meanwhile
        assert time.monotonic() - t0 < 0.4
        half.settimeout(3)
        assert half.recv(100) == b""                        # dropped after the timeout
        wait_for(lambda: not ctl._clients or len(ctl._clients) == 0, 3)
    finally:
        half.close()
        deaf.close()


def test_too_many_clients(ctl):
    held = []
    try:
        for _ in range(MAX_CLIENTS):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(ctl.path)
            held.append(s)
        wait_for(lambda: len(ctl._clients) == MAX_CLIENTS)
        extra = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        extra.settimeout(2)
        extra.connect(ctl.path)
        assert extra.recv(10) == b""                        # closed at once
        extra.close()
    finally:
        for s in held:
            s.close()
    wait_for(lambda: _answers(ctl.path))            # served again once they are gone


def test_a_live_socket_is_not_taken_over(ctl):
    with pytest.raises(ControlError, match="a control socket is live there"):
        ControlServer(ctl.path, {})


def test_no_socket(tmp_path):
    with pytest.raises(ControlError, match="No such file"):
        request(str(tmp_path / "none"), "show")


def test_pyvirtio_ctl_against_a_running_backend(tmp_path):
    """``pyvirtio net --control PATH``; ``pyvirtio ctl PATH show|stats``."""
    sock, ctl_path = str(tmp_path / "net.sock"), str(tmp_path / "net.ctl")
    log = open(tmp_path / "net.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "pyvirtio", "net", "--sink",
                             "--socket-path", sock, "--control", ctl_path],
                            stdout=log, stderr=log)
    try:
        wait_for(lambda: _answers(ctl_path), 300, "the control socket")
        out = subprocess.run([sys.executable, "-m", "pyvirtio", "ctl", ctl_path, "show",
                              "--json"], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        shown = json.loads(out.stdout)
        assert shown[0]["socket"] == sock and shown[0]["connected"] is False
        out = subprocess.run([sys.executable, "-m", "pyvirtio", "ctl", ctl_path, "stats"],
                             capture_output=True, text=True, timeout=60)
        assert "vhost-user-net.pairs[0].tx.packets=0" in out.stdout.splitlines()
        out = subprocess.run([sys.executable, "-m", "pyvirtio", "ctl", ctl_path, "stats",
                              "--port", "nope"], capture_output=True, text=True, timeout=60)
        assert out.returncode == 1 and "no port 'nope'" in out.stderr
    finally:
        proc.terminate()
        assert proc.wait(30) == 0
        log.close()


def _answers(path: str) -> bool:
    try:
        request(path, "help", timeout=1)
        return True
    except ControlError:
        return False
