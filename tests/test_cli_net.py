"""``pyvirtio net``: argument errors, ``--print-capabilities``, ``--fd``, and a clean end
on SIGTERM/SIGINT (socket removed, a TAP it created removed, exit code 0).

Argument checks run in-process through :func:`pyvirtio.cli.main` (the same code the
command runs); a few run as real processes to check the exit code and that no
traceback is printed.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys

import pytest

from nettools import namespace, needs_tap
from pyvirtio.backends.tap import Tap
from pyvirtio.cli import main
from vhost_user_peer import NET_OFFERED
from vhost_user_peer import STARTUP, GuestRam, Peer, start_net, wait_for


def _run_main(argv: list[str], capsys) -> tuple[int, str, str]:
    """``main(argv)``: (exit code, stdout, stderr)."""
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


def _spawn(args: list[str], log_path, **kwargs) -> subprocess.Popen:
    with open(log_path, "wb") as logf:
        return subprocess.Popen([sys.executable, "-m", "pyvirtio", "net", *args],
                                stdout=logf, stderr=logf, **kwargs)


@pytest.fixture
def sock_path(tmp_path):
    return str(tmp_path / "net.sock")


# ---- argument errors ------------------------------------------------------------------------

BAD_ARGS = [
    ([], "give one of --socket-path PATH and --fd FD"),
    (["@SOCK"], "choose where packets go"),
    (["@SOCK", "--sink", "--loopback"], "not allowed with argument --sink"),
    (["@SOCK", "--fd", "3", "--sink"], "not allowed with argument --socket-path"),
    (["@SOCK", "--sink", "--queues", "0"], "--queues 0: must be 1..128"),
    (["@SOCK", "--sink", "--queues", "129"], "--queues 129: must be 1..128"),
    (["@SOCK", "--sink", "--queues", "two"], "invalid int value: 'two'"),
    (["@SOCK", "--sink", "--mac", "52:54:00:12:34"], "is not a MAC address"),
    (["@SOCK", "--sink", "--mac", "01:00:5e:00:00:01"], "multicast"),
    (["@SOCK", "--sink", "--mac", "00:00:00:00:00:00"], "not a device's address"),
    (["@SOCK", "--sink", "--mtu", "67"], "--mtu 67: must be 68..65535"),
    (["@SOCK", "--tap", "vu0", "--mtu", "65535"], "--mtu 65535: must be 68..65521"),
    (["@SOCK", "--tap", "a/b"], "--tap:"),
    (["@SOCK", "--tap", "x" * 16], "--tap:"),
    (["@SOCK", "--sink", "--netns", "ns0"], "--netns applies to --tap only"),
    (["@SOCK", "--tap", "vu0", "--netns", "pyvirtio-no-such-ns"], "does not exist"),
    (["--socket-path", "/nonexistent-dir-pyvirtio/x.sock", "--sink"], "does not exist"),
    (["--socket-path", "/tmp/" + "s" * 120, "--sink"], "bytes long"),
    (["--fd", "987", "--sink"], "fd 987 is not open"),
    (["--fd", "@FILE", "--sink"], "is not a socket"),
    (["@SOCK", "--sink", "--message-timeout", "0"], "--message-timeout must be positive"),
    (["@SOCK", "--sink", "--tx-coalesce-us", "-1"], "--tx-coalesce-us -1: must be 0..10000"),
    (["@SOCK", "--sink", "--tx-coalesce-us", "10001"], "--tx-coalesce-us 10001: must be 0..10000"),
    (["@SOCK", "--sink", "--tx-coalesce-us", "1e3"], "invalid int value: '1e3'"),
]


@pytest.mark.parametrize("argv,message", BAD_ARGS,
                         ids=[f"{i}-{m.split(':')[0][:24]}" for i, (_, m) in enumerate(BAD_ARGS)])
def test_bad_arguments_exit_2_with_a_clear_message(argv, message, sock_path, tmp_path, capsys):
    regular = open(tmp_path / "file", "w")
    try:
        argv = [a.replace("@FILE", str(regular.fileno())) for a in argv]
        argv = sum((["--socket-path", sock_path] if a == "@SOCK" else [a] for a in argv), [])
        code, _, err = _run_main(["net", *argv], capsys)
    finally:
        regular.close()
    assert code == 2
    assert message in err
    assert "usage: pyvirtio net" in err
    assert "Traceback" not in err
    assert not os.path.exists(sock_path)


def test_bad_arguments_in_a_real_process(tmp_path):
    log_path = tmp_path / "out.log"
    proc = _spawn(["--socket-path", str(tmp_path / "s"), "--sink", "--queues", "0"], log_path)
    assert proc.wait(STARTUP) == 2
    text = log_path.read_text()
    assert "--queues 0: must be 1..128" in text and "Traceback" not in text


def test_a_socket_path_in_use_exits_1(sock_path, capsys):
    live = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    live.bind(sock_path)
    live.listen(1)
    try:
        code, _, err = _run_main(["net", "--socket-path", sock_path, "--sink"], capsys)
        assert code == 1
        assert os.path.exists(sock_path)          # someone else's socket is left alone
    finally:
        live.close()


# ---- capabilities ---------------------------------------------------------------------------

def test_print_capabilities(capsys):
    code, out, _ = _run_main(["net", "--print-capabilities"], capsys)
    assert code == 0
    caps = json.loads(out)
    assert caps["type"] == "net"
    assert set(caps["features"]) == {"mq", "reply-ack", "config", "net-mtu", "rarp",
                                     "configure-mem-slots", "status", "reset-device"}
    # the other options are ignored
    code, out2, _ = _run_main(["net", "--print-capabilities", "--sink", "--queues", "4"], capsys)
    assert code == 0 and json.loads(out2) == caps


# ---- running and ending -----------------------------------------------------------------------

def _exchange(guest, count: int) -> None:
    from vhost_user_peer import frame, recv_frames
    frames = [frame(i) for i in range(count)]
    assert guest.driver.send(0, frames) == count
    assert recv_frames(guest.driver, 0, count) == frames


def test_sigterm_ends_a_serving_backend_cleanly(sock_path, tmp_path):
    """A real process: two front-ends one after the other (it listens again), then
    SIGTERM with rings running: exit code 0, socket removed, no traceback."""
    log_path = tmp_path / "backend.log"
    proc = _spawn(["--socket-path", sock_path, "--loopback", "--poll"], log_path)
    ram = GuestRam(2 << 20, name="vu-cli")
    try:
        wait_for(lambda: os.path.exists(sock_path), STARTUP, "the socket")
        with Peer(sock_path) as p:
            g = start_net(p, ram)
            _exchange(g, 50)
            g.close()
        with Peer(sock_path) as p:                # a front-end with running rings
            g = start_net(p, ram)
            _exchange(g, 50)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0, log_path.read_text()
            assert p.closed_by_peer()
            g.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        ram.close()
    assert not os.path.exists(sock_path)
    assert "Traceback" not in log_path.read_text()


def test_sigusr1_logs_pair_counters_and_no_packed_withdraws_the_offer(sock_path, tmp_path):
    """``--no-packed``: GET_FEATURES without VIRTIO_F_RING_PACKED. SIGUSR1 logs each
    pair's counters and the backend goes on; a disconnect logs them again."""
    log_path = tmp_path / "backend.log"
    proc = _spawn(["--socket-path", sock_path, "--loopback", "--queues", "2",
                   "--no-packed"], log_path)
    ram = GuestRam(4 << 20, name="vu-cli-usr1")
    try:
        wait_for(lambda: os.path.exists(sock_path), STARTUP, "the socket")
        with Peer(sock_path) as p:
            offered = p.get_features()
            assert not offered & (1 << 34)
            assert offered | (1 << 34) == NET_OFFERED | 1 << 22  # + MQ
            g = start_net(p, ram, packed=True)             # asked, but not offered
            assert not g.features & (1 << 34)
            _exchange(g, 30)
            proc.send_signal(signal.SIGUSR1)
            wait_for(lambda: "(SIGUSR1)" in log_path.read_text(), 30, "the SIGUSR1 lines")
            assert p.get_features() == offered            # still serving
            g.close()
        wait_for(lambda: "(connection ended)" in log_path.read_text(), 30, "the end lines")
        text = log_path.read_text()
        assert "pair 0 stats (SIGUSR1): rx packets=30 " in text
        assert "tx packets=30 " in text
        assert "pair 1 stats (SIGUSR1): rx packets=0 " in text
        assert "pair 0 stats (connection ended): rx packets=30 " in text
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, text
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        ram.close()
    assert "Traceback" not in log_path.read_text()


def _in_thread(fn):
    import threading
    errors: list[BaseException] = []

    def run() -> None:
        try:
            fn()
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, errors


def test_sigint_in_process_ends_main_with_0(sock_path, capsys):
    """``main()`` in this (main) thread; a front-end thread, then SIGINT to ourselves."""
    def frontend() -> None:
        wait_for(lambda: os.path.exists(sock_path), 30, "the socket")
        for _ in range(2):
            with Peer(sock_path) as p:
                assert p.get_features() == NET_OFFERED
        os.kill(os.getpid(), signal.SIGINT)
    t, errors = _in_thread(frontend)
    code, _, _ = _run_main(["net", "--socket-path", sock_path, "--sink"], capsys)
    t.join(30)
    assert not errors, errors
    assert code == 0
    assert not os.path.exists(sock_path)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_fd_of_a_connected_socket_serves_that_connection(capsys):
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)

    def frontend() -> None:
        with Peer(ours) as p:
            assert p.get_features() == NET_OFFERED
    t, errors = _in_thread(frontend)
    # the server owns the fd from here on; main returns when that one connection ends
    code, _, _ = _run_main(["net", "--fd", str(theirs.detach()), "--loopback"], capsys)
    t.join(30)
    assert not errors, errors
    assert code == 0


def test_fd_of_a_listening_socket_is_served_like_a_path(sock_path, capsys):
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(sock_path)
    listener.listen(1)

    def frontend() -> None:
        for _ in range(2):                        # one front-end after the other
            with Peer(sock_path) as p:
                assert p.get_features() == NET_OFFERED
        os.kill(os.getpid(), signal.SIGTERM)
    t, errors = _in_thread(frontend)
    code, _, _ = _run_main(["net", "--fd", str(listener.detach()), "--sink"], capsys)
    t.join(30)
    assert not errors, errors
    assert code == 0


@needs_tap
def test_sigterm_removes_the_tap_it_created(sock_path, tmp_path):
    log_path = tmp_path / "backend.log"
    with namespace() as ns:
        proc = _spawn(["--socket-path", sock_path, "--tap", "vuclitap", "--netns", ns.name,
                       "--queues", "2", "--mtu", "9000"], log_path)
        try:
            wait_for(lambda: os.path.exists(sock_path), STARTUP, "the socket")
            assert "vuclitap" in ns.links()
            with ns.iproute() as ipr:
                link = ipr.get_links(ifname="vuclitap")[0]
                assert link.get("mtu") == 9000
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0, log_path.read_text()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert "vuclitap" not in ns.links()
    assert not os.path.exists(sock_path)
    assert "Traceback" not in log_path.read_text()


@needs_tap
def test_sigterm_keeps_a_tap_it_did_not_create(sock_path, capsys):
    with namespace() as ns:
        with Tap.create("vuclikeep", 1, netns=ns.name) as tap:
            def frontend() -> None:
                wait_for(lambda: os.path.exists(sock_path), 30, "the socket")
                with Peer(sock_path) as p:
                    assert p.get_features() == NET_OFFERED
                os.kill(os.getpid(), signal.SIGTERM)
            t, errors = _in_thread(frontend)
            code, _, _ = _run_main(["net", "--socket-path", sock_path, "--tap", "vuclikeep",
                                    "--netns", ns.name], capsys)
            t.join(30)
            assert not errors, errors
            assert code == 0
            assert "vuclikeep" in ns.links()
            assert not tap.closed
    assert not os.path.exists(sock_path)
