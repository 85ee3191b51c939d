"""The second device on the framework: vhost-user-rng (``pyvirtio rng``,
:class:`pyvirtio.rng.vhost_user.VhostUserRngDevice`) against the vhost-user front-end
(:class:`pyvirtio.rng.frontend.VhostUserRngFrontend`), and the README's "Write your own
vhost-user device", run as it is printed."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from pyvirtio.control import request
from pyvirtio.features import Transport
from pyvirtio.rng.frontend import VhostUserRngFrontend
from pyvirtio.rng.vhost_user import VhostUserRngDevice
from pyvirtio.vhost_user.server import VhostUserServer
from vhost_user_peer import wait_for

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.fixture
def source(tmp_path) -> Path:
    """A regular file of known bytes as the entropy source (what came out is checked)."""
    path = tmp_path / "source.bin"
    path.write_bytes(bytes(range(251)) * 9000)        # 2.2 MB, a period no buffer shares
    return path


def serve(device, path: str):
    server = VhostUserServer(device, socket_path=path)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return server, thread


def stop(server, thread, device) -> None:
    server.shutdown()
    thread.join(10)
    server.close()
    device.close()


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_frontend_reads_the_source_through_the_backend(tmp_path, source, packed):
    """1 MiB through vhost-user: exactly the source's first bytes, in order; the
    counters say the same; a stop and a resume on a new connection go on where it
    stopped."""
    device = VhostUserRngDevice(source=source)
    server, thread = serve(device, str(tmp_path / "rng.sock"))
    features = VhostUserRngFrontend().wanted_features | (Transport.RING_PACKED if packed else 0)
    fe = VhostUserRngFrontend(features=features, queue_size=32, buffer_size=4096)
    try:
        fe.connect(tmp_path / "rng.sock")
        assert bool(fe.features & Transport.RING_PACKED) == packed
        fe.start()
        want = source.read_bytes()
        got = fe.read(1 << 20)
        assert got == want[:1 << 20]
        stats = device.stats()["requestq"]
        assert stats["bytes"] >= 1 << 20 and stats["requests"] >= 256
        bases = fe.stop()
        fe.disconnect()
        wait_for(lambda: server.port.handler is None)
        fe.connect(tmp_path / "rng.sock")
        fe.start(bases)                                   # resumed on a new connection
        more = fe.read(64 << 10)
        assert len(more) == 64 << 10 and more in want
    finally:
        fe.close()
        stop(server, thread, device)


def test_rate_limit_through_vhost_user(tmp_path, source):
    """--max-bytes-per-s bounds what the front-end gets: after a read, the bytes
    delivered never exceed a second's bucket plus what accrued since the start."""
    device = VhostUserRngDevice(source=source, max_bytes_per_s=128 << 10)
    server, thread = serve(device, str(tmp_path / "rng.sock"))
    fe = VhostUserRngFrontend(queue_size=16, buffer_size=1024)
    try:
        fe.connect(tmp_path / "rng.sock")
        fe.start()
        t0 = time.monotonic()
        got = fe.read(320 << 10, timeout=20)
        elapsed = time.monotonic() - t0
        assert len(got) == 320 << 10
        assert len(got) <= (128 << 10) * (1 + elapsed) + 1024
        assert device.stats()["requestq"]["throttled"] > 0
    finally:
        fe.close()
        stop(server, thread, device)


def test_pyvirtio_rng_command(tmp_path, source):
    """``pyvirtio rng --socket-path S --source F --control C``: reads through it, the
    counters over the control socket, a clean end on SIGTERM."""
    sock, ctl = tmp_path / "rng.sock", tmp_path / "rng.ctl"
    log = open(tmp_path / "rng.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "pyvirtio", "rng", "--socket-path",
                             str(sock), "--source", str(source), "--control", str(ctl)],
                            stdout=log, stderr=log)
    fe = VhostUserRngFrontend()
    try:
        fe.connect(sock, timeout=300)                      # (an editable install rebuilds)
        fe.start()
        assert fe.read(100_000) == source.read_bytes()[:100_000]
        shown = request(str(ctl), "show")[0]
        assert shown["type"] == "rng" and shown["connected"]
        assert shown["current"]["stats"]["requestq"]["bytes"] >= 100_000
    finally:
        fe.close()
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(30)
        log.close()
    assert rc == 0, (tmp_path / "rng.log").read_text()[-2000:]


def readme_device() -> str:
    """The code block of README's "Write your own vhost-user device"."""
    text = README.read_text()
    section = text[text.index("## Write your own vhost-user device"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_device_runs_as_printed(tmp_path):
    """The README's device, executed as printed (under 60 lines), serves a front-end:
    random bytes, not a pattern, and a stop that ends its worker."""
    code = readme_device()
    assert len(code.splitlines()) < 60
    namespace: dict = {"__name__": "readme_device"}
    exec(compile(code, str(README), "exec"), namespace)
    device = namespace["Entropy"]()
    server, thread = serve(device, str(tmp_path / "entropy.sock"))
    fe = VhostUserRngFrontend(queue_size=8, buffer_size=1024)
    try:
        fe.connect(tmp_path / "entropy.sock")
        fe.start()
        data = fe.read(64 << 10, timeout=20)
        assert len(data) == 64 << 10
        assert len(set(data[i:i + 1024] for i in range(0, len(data), 1024))) == 64
        assert max(data.count(bytes([b])) for b in range(256)) < 1000   # spread out
        fe.stop()
        wait_for(lambda: not device.workers)
    finally:
        fe.close()
        stop(server, thread, device)
