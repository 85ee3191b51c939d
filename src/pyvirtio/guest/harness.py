"""Boot the guest (:mod:`pyvirtio.guest.image`) under QEMU with a virtio-net NIC, inside
a network namespace the harness creates, and talk to it.

One :class:`Testbed` per test:

* a network namespace (``vqe2e-<pid>-...``, IPv6 off, ``lo`` up) holding a persistent
  TAP ``vqtap0`` with the host side's address (:data:`HOST_IP`); nothing is configured
  in the root namespace;
* the NIC's backend, one of :data:`BACKENDS`:

  - ``"qemu-tap"``: QEMU's own userspace TAP backend
    (``-netdev tap,ifname=vqtap0,script=no,downscript=no,vhost=off``);
  - ``"vhost-user"``: ``pyvirtio net --socket-path SOCK --tap vqtap0 --queues N``
    (:class:`Backend`, started by the harness inside the namespace) and
    ``-chardev socket,path=SOCK[,reconnect=1] -netdev vhost-user``;

* QEMU (:class:`Qemu`): ``-accel tcg -cpu max`` (KVM only when a probe boot succeeds,
  :func:`accelerator`), guest RAM on a shared memfd, ``-nodefaults -display none
  -monitor none [-no-reboot] -serial file:console-N.log``, ``-device
  virtio-net-pci,netdev=n0,vectors=0[,mq=on][,packed=on][,host_mtu=M]``; QEMU runs
  inside the namespace (``ip netns exec``);
* the guest's console markers (``VQ-READY``, ``VQ-END rc=N``) waited on with timeouts
  (:meth:`Qemu.wait_ready`, :meth:`Qemu.wait_end`), the guest agent (:class:`Agent`) to
  run commands in the guest over TCP, host-side commands in the namespace
  (:meth:`Testbed.host`).

:meth:`Testbed.close` always ends every QEMU and backend process the testbed started
(by pid) and removes the namespace; :meth:`Testbed.keep_logs` copies the console,
QEMU and backend logs to an artifacts folder (the fixture does it when a test fails).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from pyvirtio import netns as _netns

from pyvirtio.guest.image import AGENT_PORT, GuestImage, kernel_cmdline

__all__ = [
    "BACKENDS", "GUEST_IP", "HOST_IP", "PREFIXLEN", "GUEST_MAC", "TAP_NAME",
    "HarnessError", "GuestTimeout", "GuestFailed", "BackendFailed", "AgentError",
    "qemu_binary", "qemu_version", "tool_version", "accelerator", "backend_python",
    "VmConfig", "Qemu", "Backend", "Agent", "AgentResult", "HostResult", "Testbed", "testbed",
    "guest_feature_bits", "parse_snmp", "ring_stop_indices",
    "ethtool_stats", "end_process", "tcp_sockets",
    "iperf3_json", "iperf3_client", "IPERF3_NOT_READY", "wait_while_running",
]

log = logging.getLogger("pyvirtio.guest.harness")

#: the NIC backends a test can run over
BACKENDS = ("qemu-tap", "vhost-user")
GUEST_IP = "10.0.2.15"
HOST_IP = "10.0.2.1"
PREFIXLEN = 24
GUEST_MAC = "52:54:00:12:34:56"
TAP_NAME = "vqtap0"
#: how long a guest may take from QEMU's start to VQ-READY (TCG: 2-4 s; slack for CI)
BOOT_TIMEOUT = 90.0
#: how long the backend may take to listen on its socket (Python start + imports; an
#: editable install may rebuild the Cython modules first)
BACKEND_START_TIMEOUT = 240.0

QEMU = "qemu-system-x86_64"
#: console markers, matched only once their line is complete: the console file is read
#: while the guest writes it, and a half-written line would give a cut feature string or
#: exit code
_READY = re.compile(r"VQ-READY features=([01]*)\r?\n")
_END = re.compile(r"VQ-END rc=(\d+)\r?\n")
_RC = re.compile(rb"VQ-RC (\d+)\n?\Z")


class HarnessError(RuntimeError):
    """The e2e harness could not do what a test asked."""


class GuestTimeout(HarnessError, TimeoutError):
    """A console marker did not appear in time."""


class GuestFailed(HarnessError):
    """QEMU exited, or the guest reported an error, before the awaited marker."""


class BackendFailed(HarnessError):
    """``pyvirtio net`` exited or did not come up."""


class AgentError(HarnessError):
    """The guest agent could not be reached or a command failed."""


# ---------------------------------------------------------------------------------------
# QEMU and the accelerator

def qemu_binary() -> str | None:
    """Path of ``qemu-system-x86_64`` or ``None``."""
    return shutil.which(QEMU)


def tool_version(tool: str) -> str | None:
    """The first line of ``tool --version`` (None: not installed; "unknown": it did
    not say)."""
    path = shutil.which(tool)
    if path is None:
        return None
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True,
                             timeout=30, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.splitlines()[0].strip() if out.strip() else "unknown"


def qemu_version() -> str:
    """``QEMU emulator version ...`` (first line; "none" when QEMU is not installed)."""
    return tool_version(QEMU) or "none"


_ACCEL: dict[str, tuple[str, str]] = {}


def accelerator(image: GuestImage) -> tuple[str, str]:
    """``(accel, cpu)`` for QEMU: ``("kvm", "host")`` only when a probe guest really
    boots to its end marker under KVM, else ``("tcg", "max")``. Probed once per process;
    ``VQ_E2E_ACCEL=tcg|kvm`` forces a choice."""
    forced = os.environ.get("VQ_E2E_ACCEL")
    if forced in ("tcg", "kvm"):
        return (forced, "host" if forced == "kvm" else "max")
    if image.key not in _ACCEL:
        _ACCEL[image.key] = _probe_accelerator(image)
    return _ACCEL[image.key]


def _probe_accelerator(image: GuestImage) -> tuple[str, str]:
    if not os.path.exists("/dev/kvm") or not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return ("tcg", "max")
    binary = qemu_binary()
    if binary is None:
        return ("tcg", "max")
    with tempfile.TemporaryDirectory(prefix="vqe2e-kvm-") as tmp:
        console = Path(tmp) / "console.log"
        argv = [binary, "-accel", "kvm", "-cpu", "host", "-m", "256", "-nodefaults",
                "-display", "none", "-monitor", "none", "-no-reboot",
                "-serial", f"file:{console}", "-kernel", str(image.kernel),
                "-initrd", str(image.initrd),
                "-append", kernel_cmdline(command="true")]
        t0 = time.monotonic()
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=30)
            text = console.read_text(errors="replace") if console.exists() else ""
            ok = proc.returncode == 0 and "VQ-END rc=0" in text
            reason = (proc.stderr.strip().splitlines() or ["no end marker"])[-1]
        except subprocess.TimeoutExpired:
            ok, reason = False, "hung for 30 s"
    if ok:
        log.info("KVM probe boot succeeded in %.1f s: using KVM", time.monotonic() - t0)
        return ("kvm", "host")
    log.info("KVM probe boot failed (%s): using TCG", reason)
    return ("tcg", "max")


@dataclass
class VmConfig:
    """How to boot one guest."""

    backend: str = "qemu-tap"           # one of BACKENDS
    queues: int = 1                     # queue pairs (mq=on when > 1)
    smp: int | None = None              # vCPUs (default: queues)
    memory_mb: int = 512
    packed: bool = False                # packed=on
    host_mtu: int | None = None         # host_mtu=M (the guest's eth0 takes it)
    reconnect: bool = False             # vhost-user chardev reconnect=1
    no_reboot: bool = True              # -no-reboot (a guest reboot ends QEMU)
    command: str | None = None          # the guest's vq.cmd (None: the agent server)
    guest_mtu: int | None = None        # vq.mtu: ip link set eth0 mtu M in the guest
    socket: Path | None = None          # the vhost-user net socket (default the testbed's)
    server: bool = False                # QEMU listens (server=on,wait=off): --client back-end
    ip: str = GUEST_IP                  # the guest's address (eth0)
    mac: str = GUEST_MAC
    rng_socket: Path | None = None      # add a vhost-user-rng-pci device on this socket

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"backend {self.backend!r} is not one of {BACKENDS}")
        if self.queues < 1:
            raise ValueError("queues must be >= 1")


# ---------------------------------------------------------------------------------------
# processes

class _Child:
    """A process the harness started (``proc`` once started)."""

    proc: subprocess.Popen | None = None

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid


def end_process(proc: subprocess.Popen, what: str, *, term_timeout: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after ``term_timeout``; reap. Only ``proc`` itself."""
    if proc.poll() is not None:
        return
    try:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=term_timeout)
    except subprocess.TimeoutExpired:
        log.warning("%s (pid %d) ignored SIGTERM for %.0f s: SIGKILL", what, proc.pid,
                    term_timeout)
        proc.kill()
        proc.wait(timeout=30)
    except ProcessLookupError:
        pass


def tcp_sockets(pid: int, port: int, *states: str) -> int:
    """TCP sockets with local ``port`` in the network namespace of process ``pid`` in
    one of ``states`` (/proc/net/tcp's hex codes: 0A listening, 01 established, 08
    close-wait)."""
    count = 0
    for table in ("tcp", "tcp6"):
        try:
            with open(f"/proc/{pid}/net/{table}") as f:
                lines = f.read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            if (len(parts) > 3 and parts[3] in states
                    and int(parts[1].rsplit(":", 1)[1], 16) == port):
                count += 1
    return count


def iperf3_json(stdout: str, stderr: str, rc: int,
                error: type[Exception] = RuntimeError) -> dict:
    """The JSON report of an ``iperf3 -J`` run; ``error`` when it printed none or
    reports an error."""
    try:
        data = json.loads(stdout)
    except json.JSONDecodeError as exc:
        raise error(f"iperf3 printed no JSON (rc={rc}): {stdout[-300:]} "
                    f"{stderr[-300:]}") from exc
    if "error" in data:
        raise error(f"iperf3: {data['error']}")
    return data


#: iperf3 errors that mean the server sat between two tests when the client came: it
#: closes its listening socket after each test and opens it again for the next (under
#: TCG that gap lasts long enough for a client started right away), or it had not yet
#: seen the last client go. Nothing was measured, so the run is simply made again.
IPERF3_NOT_READY = ("Connection refused", "the server is busy running a test")


def iperf3_client(run: Callable[[], tuple[str, str, int]],
                  error: type[Exception] = RuntimeError, *, retry_for: float = 10.0,
                  pause: float = 0.1) -> dict:
    """The JSON report of an ``iperf3 -c ... -J`` client that ``run`` starts (returning
    its stdout, stderr and exit code). A run that failed with one of
    :data:`IPERF3_NOT_READY` is made again every ``pause`` seconds for up to
    ``retry_for`` seconds; any other failure, or the last one, is ``error``."""
    deadline = time.monotonic() + retry_for
    attempts = 0
    while True:
        attempts += 1
        stdout, stderr, rc = run()
        try:
            return iperf3_json(stdout, stderr, rc, error)
        except error as exc:
            text = str(exc)
            if (not any(s in text for s in IPERF3_NOT_READY)
                    or time.monotonic() + pause > deadline):
                if attempts > 1:
                    raise error(f"{text} (after {attempts} attempts in "
                                f"{retry_for:g} s)") from exc
                raise
            log.info("iperf3 server not ready (%s): again in %.1f s", text, pause)
            time.sleep(pause)


def wait_while_running(proc: subprocess.Popen, ready: Callable[[], bool], timeout: float,
                       what: str, error: type[Exception],
                       detail: Callable[[], str] = lambda: "") -> None:
    """Poll ``ready`` until it holds; ``error`` (with ``detail()``) when ``proc`` exits
    first or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            raise error(f"{what}: the process exited (rc={proc.returncode}) first\n"
                        f"{detail()}")
        if time.monotonic() > deadline:
            raise error(f"{what}: not within {timeout:.0f} s\n{detail()}")
        time.sleep(0.02)


def _tail(path: Path, lines: int = 25) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


class Qemu(_Child):
    """One QEMU process (started by :meth:`Testbed.boot`) and its console."""

    def __init__(self, argv: list[str], console: Path, log_path: Path, config: VmConfig,
                 netns: str) -> None:
        self.argv = argv
        self.console = console
        self.log_path = log_path
        self.config = config
        self.netns = netns
        self.started = 0.0
        self.boot_seconds: float | None = None
        self.features: str | None = None     # sysfs bit string at the last VQ-READY

    def start(self) -> None:
        """Start QEMU inside the namespace."""
        self.console.touch()
        self.started = time.monotonic()
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(["ip", "netns", "exec", self.netns, *self.argv],
                                         stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=subprocess.STDOUT)
        log.info("QEMU pid %d: %s", self.proc.pid, shlex.join(self.argv))

    def text(self) -> str:
        """The console so far."""
        try:
            return self.console.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_for(self, pattern: re.Pattern[str], timeout: float, *, start: int = 0,
                 what: str = "") -> tuple[re.Match[str], int]:
        """Wait until ``pattern`` appears in the console after offset ``start``; return the
        match and the offset after it. :class:`GuestFailed` if QEMU exits first (or the
        guest printed ``VQ-ERROR``), :class:`GuestTimeout` after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            text = self.text()
            m = pattern.search(text, start)
            if m:
                return m, m.end()
            err = re.search(r"VQ-ERROR[^\n]*", text[start:])
            if err and pattern.pattern.startswith("VQ-READY"):
                raise GuestFailed(f"guest: {err.group(0)}\n{self.diagnostics()}")
            if not self.alive:
                # the marker may have been written just before the exit
                text = self.text()
                m = pattern.search(text, start)
                if m:
                    return m, m.end()
                rc = self.proc.returncode if self.proc else None
                raise GuestFailed(f"QEMU exited (rc={rc}) before {what or pattern.pattern}"
                                  f"\n{self.diagnostics()}")
            if time.monotonic() > deadline:
                raise GuestTimeout(f"no {what or pattern.pattern} within {timeout:.0f} s\n"
                                   f"{self.diagnostics()}")
            time.sleep(0.05)

    def wait_ready(self, timeout: float = BOOT_TIMEOUT, *, start: int = 0) -> int:
        """Wait for ``VQ-READY`` (after console offset ``start``); returns the offset after
        it. The first call records :attr:`boot_seconds`."""
        m, end = self.wait_for(_READY, timeout, start=start, what="VQ-READY")
        self.features = m.group(1)
        if self.boot_seconds is None:
            self.boot_seconds = time.monotonic() - self.started
            log.info("guest ready in %.2f s", self.boot_seconds)
        return end

    def wait_end(self, timeout: float, *, start: int = 0) -> int:
        """Wait for ``VQ-END rc=N``; returns N."""
        m, _ = self.wait_for(_END, timeout, start=start, what="VQ-END")
        return int(m.group(1))

    def wait_exit(self, timeout: float) -> int:
        """Wait for QEMU to exit (the guest powered off); its exit code."""
        assert self.proc is not None
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise GuestTimeout(f"QEMU still running after {timeout:.0f} s\n"
                               f"{self.diagnostics()}") from None

    def kill(self) -> None:
        """SIGKILL QEMU (as a crash would) and reap it."""
        if self.alive:
            assert self.proc is not None
            self.proc.kill()
            self.proc.wait(timeout=30)

    def stop(self) -> None:
        """End QEMU: SIGTERM (QEMU exits cleanly), then SIGKILL."""
        if self.proc is not None:
            end_process(self.proc, "QEMU", term_timeout=10)

    def diagnostics(self) -> str:
        return (f"--- console ({self.console}) ---\n{_tail(self.console)}\n"
                f"--- qemu log ({self.log_path}) ---\n{_tail(self.log_path, 10)}")


def backend_python() -> str:
    """The Python that runs ``-m pyvirtio net``: this one, or ``$VQ_E2E_PYTHON`` (e.g.
    a virtualenv with a non-editable install, to avoid rebuilds on import)."""
    return os.environ.get("VQ_E2E_PYTHON") or sys.executable


class Backend(_Child):
    """A back-end command (``pyvirtio net`` with the TAP, or ``pyvirtio rng``) started
    inside the namespace on ``socket_path``: listening there, or with ``client``
    connecting to the front-end listening there."""

    def __init__(self, netns: str, socket_path: Path, log_path: Path, *, tap: str = TAP_NAME,
                 queues: int = 1, extra: Sequence[str] = (), kind: str = "net",
                 client: bool = False) -> None:
        self.netns = netns
        self.socket_path = socket_path
        self.log_path = log_path
        self.kind = kind
        self.client = client
        #: the back-end's control socket (``pyvirtio ctl``): its state as data
        self.control_path = socket_path.with_name(socket_path.name + ".ctl")
        device = ["--tap", tap, "--queues", str(queues)] if kind == "net" else []
        self.argv = [backend_python(), "-m", "pyvirtio", kind, "--socket-path",
                     str(socket_path), *device, "--control", str(self.control_path),
                     *(["--client"] if client else []), *extra]

    def _ready(self) -> bool:
        """Listening on its socket; in client mode, answering on its control socket."""
        if not self.client:
            return self._listening()
        from pyvirtio.control import ControlError, request
        try:
            request(str(self.control_path), "help", timeout=1)
            return True
        except ControlError:
            return False

    def start(self, timeout: float = BACKEND_START_TIMEOUT) -> None:
        """Start the backend and wait until it listens on its socket (in client mode:
        until its control socket answers)."""
        if not self.client:             # (in client mode the socket is QEMU's)
            with contextlib.suppress(FileNotFoundError):
                self.socket_path.unlink()
        with open(self.log_path, "ab") as out:
            out.write(f"=== {time.strftime('%H:%M:%S')} start: "
                      f"{shlex.join(self.argv)}\n".encode())
            out.flush()
            self.proc = subprocess.Popen(["ip", "netns", "exec", self.netns, *self.argv],
                                         stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=subprocess.STDOUT)
        wait_while_running(self.proc, self._ready, timeout,
                           f"pyvirtio {self.kind} ready on {self.socket_path}", BackendFailed,
                           lambda: _tail(self.log_path))
        log.info("backend pid %d %s %s", self.pid,
                 "connecting to" if self.client else "listening on", self.socket_path)

    def _listening(self) -> bool:
        """Whether the backend's process has a listening socket at our path (read from
        ``/proc/<pid>/net/unix``: the namespace's table; flags 0x10000 = listening)."""
        if self.proc is None:
            return False
        try:
            with open(f"/proc/{self.proc.pid}/net/unix") as f:
                lines = f.read().splitlines()[1:]
        except OSError:
            return False
        path = str(self.socket_path)
        for line in lines:
            parts = line.split()
            if len(parts) >= 8 and parts[-1] == path and int(parts[3], 16) & 0x10000:
                return True
        return False

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM (clean shutdown), then SIGKILL; the exit code."""
        if self.proc is None:
            return None
        end_process(self.proc, "pyvirtio net", term_timeout=timeout)
        return self.proc.returncode

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def show(self) -> dict[str, Any]:
        """The port as the control socket's ``show`` gives it (connected, connections,
        the current and the last connection's features and counters)."""
        from pyvirtio.control import request
        return request(str(self.control_path), "show")[0]

    def session(self, which: str = "current", timeout: float = 15.0) -> dict[str, Any]:
        """The current connection's state, or (``which="last"``) the one that ended
        last, once there is one (bounded wait: the front-end may not be connected, or
        not gone, yet)."""
        deadline = time.monotonic() + timeout
        while True:
            state = self.show()
            ready = state[which] is not None and (which == "current"
                                                  or not state["connected"])
            if ready:
                return state[which]
            if time.monotonic() > deadline:
                raise HarnessError(f"pyvirtio net: no {which} connection within "
                                   f"{timeout:.0f} s: {state}")
            time.sleep(0.1)

    def pair_stats(self, which: str = "current") -> dict[int, dict[str, dict[str, int]]]:
        """pair -> {"rx": counters, "tx": counters} of the current (or last)
        connection, from the control socket."""
        return dict(enumerate(self.session(which)["stats"]["pairs"]))


# ---------------------------------------------------------------------------------------
# the guest agent

@dataclass
class AgentResult:
    """A command's exit code and its output (stdout and stderr together)."""

    rc: int
    output: bytes

    @property
    def text(self) -> str:
        return self.output.decode(errors="replace")


class Agent:
    """Client of the guest agent (``vq-serve``: one command per TCP connection)."""

    def __init__(self, netns: str, address: str = GUEST_IP, port: int = AGENT_PORT) -> None:
        self.netns = netns
        self.address = address
        self.port = port

    def _connect(self, timeout: float) -> socket.socket:
        sock = _netns.socket_in(self.netns, socket.AF_INET, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect((self.address, self.port))
        except OSError:
            sock.close()
            raise
        return sock

    def run(self, command: str, *, stdin: bytes = b"", timeout: float = 60.0,
            check: bool = True) -> AgentResult:
        """Run ``command`` (``sh -c``) in the guest, feeding it ``stdin``; wait for its
        end. ``check``: :class:`AgentError` when the exit code is not 0."""
        if "\n" in command:
            raise ValueError("an agent command is one line")
        try:
            sock = self._connect(min(timeout, 10.0))
        except OSError as exc:
            raise AgentError(f"guest agent {self.address}:{self.port} unreachable: "
                             f"{exc}") from exc
        sender_error: list[BaseException] = []

        def send() -> None:
            try:
                sock.sendall(command.encode() + b"\n")
                if stdin:
                    view = memoryview(stdin)
                    for off in range(0, len(view), 1 << 16):
                        sock.sendall(view[off:off + (1 << 16)])
                sock.shutdown(socket.SHUT_WR)
            except OSError as exc:
                sender_error.append(exc)

        deadline = time.monotonic() + timeout
        sender = threading.Thread(target=send, daemon=True)
        chunks: list[bytes] = []
        try:
            sock.settimeout(1.0)
            sender.start()
            while True:
                if time.monotonic() > deadline:
                    raise AgentError(f"guest command {command!r} did not end within "
                                     f"{timeout:.0f} s")
                try:
                    data = sock.recv(1 << 16)
                except socket.timeout:
                    continue
                except OSError as exc:
                    raise AgentError(f"guest command {command!r}: connection lost: "
                                     f"{exc}") from exc
                if not data:
                    break
                chunks.append(data)
        finally:
            sock.close()
            sender.join(timeout=5)
        output = b"".join(chunks)
        m = _RC.search(output)
        if m is None:
            detail = f"; sending failed: {sender_error[0]}" if sender_error else ""
            raise AgentError(f"guest command {command!r}: no exit code in the reply "
                             f"({len(output)} bytes: {output[-200:]!r}){detail}")
        result = AgentResult(int(m.group(1)), output[:m.start()])
        if check and result.rc != 0:
            raise AgentError(f"guest command {command!r} failed (rc={result.rc}): "
                             f"{result.text[-2000:]}")
        return result

    def wait(self, timeout: float = 30.0) -> float:
        """Wait until the agent answers; the seconds it took."""
        t0 = time.monotonic()
        deadline = t0 + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            try:
                self.run("true", timeout=min(10.0, max(1.0, deadline - time.monotonic())))
                return time.monotonic() - t0
            except AgentError as exc:
                last = exc
                time.sleep(0.2)
        raise AgentError(f"guest agent not answering after {timeout:.0f} s: {last}")

    def start_iperf3_server(self, port: int = 5201) -> None:
        """``iperf3 -s -D`` in the guest, returning once it listens (10 s at most; an
        :class:`AgentError` if it does not)."""
        self.run(f"iperf3 -s -D -p {port} && i=0 && "
                 f"while ! netstat -ltn | grep -q ':{port} ' && [ $i -lt 100 ]; "
                 f"do sleep 0.1; i=$((i+1)); done; netstat -ltn | grep -q ':{port} '")


# ---------------------------------------------------------------------------------------
# features

def guest_feature_bits(sysfs: str) -> int:
    """The feature word of ``/sys/class/net/eth0/device/features`` (char i = bit i)."""
    value = 0
    for i, c in enumerate(sysfs.strip()):
        if c == "1":
            value |= 1 << i
        elif c != "0":
            raise ValueError(f"not a feature bit string: {sysfs!r}")
    return value


def parse_snmp(text: str) -> dict[str, int]:
    """The ``Ip:`` counters of a /proc/net/snmp text."""
    rows = [line.split()[1:] for line in text.splitlines() if line.startswith("Ip:")]
    if len(rows) < 2:
        raise ValueError("no Ip: rows in /proc/net/snmp")
    return {k: int(v) for k, v in zip(rows[0], rows[1])}


def ring_stop_indices(backend_log: str) -> dict[int, int]:
    """ring -> the index of its last ``ring N stopped at index M`` line in a ``pyvirtio
    net`` log (GET_VRING_BASE: the next available index, i.e. the chains consumed, mod
    2**16)."""
    out: dict[int, int] = {}
    for m in re.finditer(r"ring (\d+) stopped at index (\d+)", backend_log):
        out[int(m.group(1))] = int(m.group(2))
    return out


def ethtool_stats(text: str) -> dict[str, int]:
    """``ethtool -S`` output as a dict."""
    out = {}
    for line in text.splitlines():
        key, sep, value = line.strip().partition(":")
        if sep and value.strip().lstrip("-").isdigit():
            out[key.strip()] = int(value)
    return out


# ---------------------------------------------------------------------------------------
# the testbed

@dataclass
class HostResult:
    """A host-side command's exit code and output."""

    argv: list[str]
    rc: int
    stdout: str
    stderr: str


class Testbed:
    """A namespace with a TAP, the NIC backend and the QEMU guests of one test."""

    def __init__(self, image: GuestImage, workdir: Path, *, name: str = "e2e") -> None:
        self.image = image
        self.workdir = Path(workdir)
        self.name = name
        self.ns: str | None = None           # the namespace's name, once created
        self.backends: list[Backend] = []
        self.qemus: list[Qemu] = []
        self.multiqueue_tap = False
        self._sockdir = Path(tempfile.mkdtemp(prefix="vqe2e-"))   # short: sun_path limit
        self.socket_path = self._sockdir / "vhost-user.sock"
        self._log_files: list[Path] = []
        self._host_procs: list[subprocess.Popen] = []
        self.timings: dict[str, float] = {}

    # -- lifecycle ----------------------------------------------------------------------
    def __enter__(self) -> "Testbed":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def open_namespace(self, *, multiqueue_tap: bool) -> None:
        """Create the namespace and the TAP ``vqtap0`` (``multi_queue`` when asked: a
        vhost-user backend's queues and QEMU's ``queues=N`` need it) with the host
        address, up. All through iproute2 (``ip netns add``, ``ip -n``): its ioctls and
        netlink requests run in the namespace directly, where pyroute2 forks a helper
        with a 2-4 s deadline that a loaded machine can miss."""
        if self.ns is not None:
            return
        name = _netns.unique_name("vqe2e")
        self._ip(["netns", "add", name])
        self.ns = name
        self.multiqueue_tap = multiqueue_tap
        for key in ("net/ipv6/conf/all/disable_ipv6", "net/ipv6/conf/default/disable_ipv6"):
            with _netns.entered(name), open(f"/proc/sys/{key}", "w") as f:
                f.write("1")
        tuntap = ["tuntap", "add", "dev", TAP_NAME, "mode", "tap", "vnet_hdr"]
        if multiqueue_tap:
            tuntap.append("multi_queue")
        for argv in (["link", "set", "lo", "up"], tuntap,
                     ["addr", "add", f"{HOST_IP}/{PREFIXLEN}", "dev", TAP_NAME],
                     ["link", "set", TAP_NAME, "up"]):
            self._ip(["-n", name, *argv])
        log.info("namespace %s: %s %s/%d%s", name, TAP_NAME, HOST_IP, PREFIXLEN,
                 " multi_queue" if multiqueue_tap else "")

    @staticmethod
    def _ip(argv: Sequence[str], *, check: bool = True) -> str:
        """``ip ARGV``; its stdout. :class:`HarnessError` when it fails (``check``)."""
        proc = subprocess.run(["ip", *argv], capture_output=True, text=True, timeout=60)
        if check and proc.returncode != 0:
            raise HarnessError(f"ip {shlex.join(argv)} failed: {proc.stderr.strip()}")
        return proc.stdout

    @property
    def netns(self) -> str:
        """The namespace's name."""
        if self.ns is None:
            raise HarnessError("the testbed has no namespace yet")
        return self.ns

    def close(self) -> None:
        """End every QEMU and backend started here (by pid), remove the namespace and
        the socket folder. Safe to call twice; never raises for a cleanup step."""
        for proc in self._host_procs:
            try:
                end_process(proc, "host command", term_timeout=5)
            except Exception as exc:  # noqa: BLE001 - cleanup goes on
                log.warning("stopping host command %d: %s", proc.pid, exc)
        for qemu in self.qemus:
            try:
                qemu.stop()
            except Exception as exc:  # noqa: BLE001 - cleanup goes on
                log.warning("stopping QEMU %s: %s", qemu.proc and qemu.proc.pid, exc)
        for backend in self.backends:
            try:
                backend.stop()
            except Exception as exc:  # noqa: BLE001
                log.warning("stopping the backend: %s", exc)
        if self.ns is not None:
            name, self.ns = self.ns, None
            try:     # the persistent TAP first, then the namespace
                self._ip(["-n", name, "link", "del", TAP_NAME], check=False)
                self._ip(["netns", "del", name])
            except Exception as exc:  # noqa: BLE001
                log.warning("removing namespace %s: %s", name, exc)
        shutil.rmtree(self._sockdir, ignore_errors=True)

    def keep_logs(self, dest: Path) -> list[Path]:
        """Copy every console, QEMU and backend log to ``dest``; the copies."""
        dest.mkdir(parents=True, exist_ok=True)
        kept = []
        for path in self._log_files:
            if path.exists():
                target = dest / path.name
                shutil.copyfile(path, target)
                kept.append(target)
        return kept

    def _new_log(self, stem: str) -> Path:
        n = sum(1 for p in self._log_files if p.name.startswith(stem + "-")) + 1
        path = self.workdir / f"{stem}-{n}.log"
        self._log_files.append(path)
        return path

    # -- the backend --------------------------------------------------------------------
    def start_backend(self, *, queues: int = 1, extra: Sequence[str] = (), kind: str = "net",
                      socket: Path | None = None, client: bool = False) -> Backend:
        """Start ``pyvirtio KIND`` (net with the TAP, or rng) on ``socket`` (default
        :attr:`socket_path`; with ``client`` it connects there); the namespace is
        created first, with a multiqueue TAP. Back-ends of one kind share a log."""
        self.open_namespace(multiqueue_tap=True)
        same = [b for b in self.backends if b.kind == kind]
        path = same[0].log_path if same else self._new_log(f"backend-{kind}")
        backend = Backend(self.netns, socket or self.socket_path, path, tap=TAP_NAME,
                          queues=queues, extra=extra, kind=kind, client=client)
        self.backends.append(backend)
        backend.start()
        return backend

    @property
    def backend(self) -> Backend:
        """The net backend started last."""
        nets = [b for b in self.backends if b.kind == "net"]
        if not nets:
            raise HarnessError("no backend started")
        return nets[-1]

    def socket(self, name: str) -> Path:
        """A socket path ``name`` in the testbed's socket folder."""
        return self._sockdir / name

    # -- QEMU ---------------------------------------------------------------------------
    def qemu_argv(self, config: VmConfig, console: Path) -> list[str]:
        """QEMU's command line for ``config`` (console to ``console``)."""
        binary = qemu_binary()
        if binary is None:
            raise HarnessError(f"{QEMU} is not installed")
        accel, cpu = accelerator(self.image)
        smp = config.smp or config.queues
        argv = [binary, "-accel", accel, "-cpu", cpu, "-smp", str(smp),
                "-m", f"{config.memory_mb}M",
                "-object", f"memory-backend-memfd,id=mem,size={config.memory_mb}M,share=on",
                "-numa", "node,memdev=mem",
                "-nodefaults", "-display", "none", "-monitor", "none"]
        if config.no_reboot:
            argv.append("-no-reboot")
        argv += ["-serial", f"file:{console}",
                 "-kernel", str(self.image.kernel), "-initrd", str(self.image.initrd),
                 "-append", kernel_cmdline(ip=f"{config.ip}/{PREFIXLEN}",
                                           mtu=config.guest_mtu,
                                           queues=config.queues if config.queues > 1
                                           else None,
                                           command=config.command,
                                           extra=["ipv6.disable=1"])]
        queues = f",queues={config.queues}" if config.queues > 1 else ""
        if config.backend == "vhost-user":
            argv += ["-chardev", f"socket,id=c0,{self._chardev(config, config.socket)}",
                     "-netdev", f"vhost-user,id=n0,chardev=c0{queues}"]
        else:
            argv += ["-netdev", f"tap,id=n0,ifname={TAP_NAME},script=no,downscript=no,"
                                f"vhost=off{queues}"]
        if config.rng_socket is not None:
            # (QEMU 7.2 cannot realize vhost-user-rng without its back-end: as the
            # listening side it must wait for it, and reconnect=1 aborts it)
            chardev = self._chardev(config, config.rng_socket, wait=True)
            argv += ["-chardev", f"socket,id=r0,{chardev}",
                     "-device", "vhost-user-rng-pci,chardev=r0"]
        device = f"virtio-net-pci,netdev=n0,mac={config.mac},vectors=0"
        if config.queues > 1:
            device += ",mq=on"
        if config.packed:
            device += ",packed=on"
        if config.host_mtu:
            device += f",host_mtu={config.host_mtu}"
        argv += ["-device", device]
        return argv

    def _chardev(self, config: VmConfig, path: Path | None, *, wait: bool = False) -> str:
        """A vhost-user chardev's options: QEMU connects to ``path`` (default the
        testbed's socket; reconnect=1 with ``config.reconnect``, unless ``wait``), or,
        with ``config.server``, listens there for a back-end in client mode (and with
        ``wait`` waits for it before it starts the guest)."""
        path = self.socket_path if path is None else path
        if config.server:
            return f"path={path},server=on,wait={'on' if wait else 'off'}"
        return f"path={path}" + (",reconnect=1" if config.reconnect and not wait else "")

    def boot(self, config: VmConfig, *, wait: bool = True,
             timeout: float = BOOT_TIMEOUT) -> Qemu:
        """Start a QEMU guest for ``config`` (namespace and, for vhost-user, the backend
        first, unless already there); with ``wait`` wait for ``VQ-READY``."""
        if config.backend == "vhost-user":
            # the testbed's own back-end, unless the config names a socket of the
            # caller's or QEMU listens (the caller starts a client-mode back-end)
            if not self.backends and not config.server and config.socket is None:
                self.start_backend(queues=config.queues)
            self.open_namespace(multiqueue_tap=True)
        else:
            self.open_namespace(multiqueue_tap=config.queues > 1)
        console = self._new_log("console")
        qemu = Qemu(self.qemu_argv(config, console), console, self._new_log("qemu"),
                    config, self.netns)
        self.qemus.append(qemu)
        qemu.start()
        if wait:
            qemu.wait_ready(timeout)
        return qemu

    def agent(self) -> Agent:
        """A client of the guest agent."""
        return Agent(self.netns)

    # -- host side ----------------------------------------------------------------------
    def host(self, argv: Sequence[str], *, timeout: float = 120.0,
             check: bool = False) -> HostResult:
        """Run ``argv`` inside the namespace (``ip netns exec``)."""
        full = ["ip", "netns", "exec", self.netns, *argv]
        try:
            proc = subprocess.run(full, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            raise HarnessError(f"host command {shlex.join(argv)} did not end within "
                               f"{timeout:.0f} s") from exc
        result = HostResult(list(argv), proc.returncode, proc.stdout, proc.stderr)
        if check and proc.returncode != 0:
            raise HarnessError(f"host command {shlex.join(argv)} failed "
                               f"(rc={proc.returncode}): {proc.stderr or proc.stdout}")
        return result

    def host_popen(self, argv: Sequence[str], log_name: str) -> subprocess.Popen:
        """Start ``argv`` inside the namespace in the background, output to a log."""
        path = self._new_log(log_name)
        with open(path, "ab") as out:
            proc = subprocess.Popen(["ip", "netns", "exec", self.netns, *argv],
                                    stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT)
        self._host_procs.append(proc)
        return proc

    def host_iperf3_server(self, port: int, *, timeout: float = 30.0) -> subprocess.Popen:
        """``iperf3 -s -1 -p port`` in the namespace (one test, then it exits), returned
        once it listens."""
        proc = self.host_popen(["iperf3", "-s", "-1", "-p", str(port)], f"iperf3-{port}")
        try:
            wait_while_running(proc, lambda: tcp_sockets(proc.pid, port, "0A") > 0, timeout,
                               f"iperf3 server listening on port {port}", HarnessError)
        except HarnessError:
            proc.kill()
            raise
        return proc

    def host_ping(self, address: str = GUEST_IP, *, count: int = 3, size: int = 56,
                  wait: int = 10) -> HostResult:
        """busybox ping from the namespace."""
        return self.host(["busybox", "ping", "-c", str(count), "-s", str(size),
                          "-W", str(wait), address], timeout=wait + count * 2 + 30)

    def iperf3(self, *, reverse: bool = False, seconds: float | None = None,
               nbytes: int | None = None, udp: bool = False, length: int | None = None,
               bitrate: str | None = None, parallel: int = 1, port: int = 5201,
               timeout: float = 120.0) -> dict:
        """iperf3 client in the namespace against the guest's server; the JSON result
        (made again while the server is between two tests: :func:`iperf3_client`)."""
        argv = ["iperf3", "-c", GUEST_IP, "-p", str(port), "-J"]
        if nbytes is not None:
            argv += ["-n", str(nbytes)]
        else:
            argv += ["-t", f"{seconds or 3:g}"]
        if reverse:
            argv.append("-R")
        if udp:
            argv.append("-u")
        if length:
            argv += ["-l", str(length)]
        if bitrate:
            argv += ["-b", bitrate]
        if parallel > 1:
            argv += ["-P", str(parallel)]
        def run() -> tuple[str, str, int]:
            result = self.host(argv, timeout=timeout)
            return result.stdout, result.stderr, result.rc
        return iperf3_client(run, HarnessError)

    def _tap_link(self) -> dict:
        """``ip -j -s link show vqtap0`` in the namespace."""
        data = json.loads(self._ip(["-n", self.netns, "-j", "-s", "link", "show", "dev",
                                    TAP_NAME]))
        return data[0]

    def tap_mtu(self) -> int:
        """The TAP's MTU (host side)."""
        return int(self._tap_link()["mtu"])

    def tap_counters(self) -> dict[str, int]:
        """The TAP's ``rx_bytes``/``tx_bytes``/``rx_packets``/``tx_packets`` (host side:
        rx = frames from the guest, tx = frames to the guest)."""
        stats = self._tap_link()["stats64"]
        return {f"{d}_{k}": int(stats[d][k]) for d in ("rx", "tx")
                for k in ("bytes", "packets", "dropped")}

    def host_snmp(self) -> dict[str, int]:
        """The namespace's ``Ip:`` counters of /proc/net/snmp (ReasmReqds, FragCreates...)."""
        return parse_snmp(self.host(["cat", "/proc/net/snmp"], check=True).stdout)

    def timed(self, name: str) -> "_Timer":
        """``with testbed.timed("x"):`` records the block's seconds in :attr:`timings`."""
        return _Timer(self.timings, name)


class _Timer:
    def __init__(self, sink: dict[str, float], name: str) -> None:
        self.sink, self.name = sink, name

    def __enter__(self) -> None:
        self.t0 = time.monotonic()

    def __exit__(self, *exc: object) -> None:
        self.sink[self.name] = time.monotonic() - self.t0


@contextlib.contextmanager
def testbed(image: GuestImage, workdir: Path, *, name: str = "e2e") -> Iterator[Testbed]:
    """``with testbed(image, dir) as tb:`` — closed whatever happens."""
    tb = Testbed(image, workdir, name=name)
    try:
        yield tb
    finally:
        tb.close()
