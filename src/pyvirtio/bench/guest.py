"""The real-guest level of ``pyvirtio bench``: one Linux guest image under QEMU, its
virtio-net NIC on our back-end (``pyvirtio net`` over vhost-user, TAP in a namespace)
against QEMU's own userspace TAP back-end (``-netdev tap,vhost=off``), same image,
same QEMU, same run, repetitions interleaved (ours, QEMU's, ours, QEMU's, ...).

Both guests boot once (each in its own namespace made by
:class:`pyvirtio.guest.harness.Testbed`, with the same addresses) and stay up; each
figure is then measured on one, then on the other:

* iperf3 TCP host -> guest and guest -> host (``-R``), Gbit/s received;
* iperf3 UDP with a 22-byte payload (64-byte frames), unlimited rate, both ways:
  packets received per second;
* ping RTT host -> guest: busybox ``ping -A`` (the next echo as soon as the reply
  arrives), the median RTT of the run.

QEMU runs with TCG here (KVM only when a probe boot succeeds): the emulated guest CPU
is the bottleneck, so these ratios compare back-ends only relatively, and are no
measure of what the back-end could carry for a KVM guest.

Without QEMU, iperf3, busybox, root or the guest image the level is skipped with the
reason. ``--tiny`` uses a cached image only (it never builds one).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import statistics
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from pyvirtio.bench.figures import Figure, LevelSkipped

if TYPE_CHECKING:
    from pyvirtio.bench.suite import Settings

__all__ = [
    "find_image",
    "level_guest",
    "ping_rtts",
    "rounds",
    "seconds",
    "skip_reason",
    "udp_pps",
]

log = logging.getLogger("pyvirtio.bench")

IPERF_PORT = 5201
#: UDP payload that makes a 64-byte Ethernet frame
UDP64_PAYLOAD = 22
BACKENDS = ("vhost-user", "qemu-tap")

NOTE = ("same guest image and QEMU, ours (pyvirtio net over vhost-user) vs QEMU's "
        "userspace TAP back-end (-netdev tap,vhost=off), measured alternately; the guest "
        "runs under {accel}: the emulated guest CPU bounds every figure, so the ratio says "
        "whether our back-end is the bottleneck, not what it could carry")


def rounds(s: Settings) -> int:
    """Repetitions of each guest figure."""
    return 1 if s.tiny else (2 if s.quick else 5)


def seconds(s: Settings) -> int:
    """Length of each iperf3 run (whole seconds: iperf3 reads ``-t 0.5`` as 0, no end)."""
    return 1 if s.tiny or s.quick else 3


def pings(s: Settings) -> int:
    """Echo requests per ping run."""
    return 10 if s.tiny else (50 if s.quick else 200)


def skip_reason() -> str | None:
    """Why no guest can run here (tools, root), or ``None``; the image is checked by
    :func:`find_image`."""
    from pyvirtio.guest.harness import qemu_binary
    if qemu_binary() is None:
        return ("qemu-system-x86_64 is not installed (Debian package qemu-system-x86); "
                "the guest level compares our back-end with QEMU's on a real guest")
    if os.geteuid() != 0:
        return "needs root (a network namespace with a TAP for the guest)"
    for tool, package in (("iperf3", "iperf3"), ("busybox", "busybox-static"), ("ip", "iproute2")):
        if shutil.which(tool) is None:
            return f"needs {tool} (Debian package {package})"
    return None


def find_image(build: bool):
    """The guest image: the cached one, or (``build``) one built now from Debian
    packages. Raises :class:`LevelSkipped` when there is none."""
    from pyvirtio.guest import image as gi
    root = gi.default_cache_root()
    if not build:
        img = gi.newest_cached(root)
        if img is None:
            raise LevelSkipped(f"no cached guest image under {root} (--tiny never builds "
                               "one; build it with python -m pyvirtio.guest.image)")
        return img
    try:
        return gi.build_image(root)
    except gi.GuestImageError as exc:
        raise LevelSkipped(f"the guest image cannot be built here: {exc}") from exc


_RTT = re.compile(r"time=([0-9.]+) ms")


def ping_rtts(text: str) -> list[float]:
    """The RTTs (ms) of a ping output's reply lines."""
    return [float(m.group(1)) for m in _RTT.finditer(text)]


def udp_pps(data: dict) -> float:
    """Packets received per second of an iperf3 UDP JSON result."""
    s = data["end"]["sum"]
    return (int(s["packets"]) - int(s.get("lost_packets", 0))) / float(s["seconds"])


class _Guest:
    """One booted guest with its iperf3 server, on one back-end."""

    def __init__(self, image, workdir: Path, backend: str) -> None:
        from pyvirtio.guest.harness import Testbed, VmConfig
        self.backend = backend
        self.tb = Testbed(image, workdir / backend, name=f"bench-{backend}")
        (workdir / backend).mkdir(parents=True, exist_ok=True)
        try:
            self.qemu = self.tb.boot(VmConfig(backend=backend))
            self.agent = self.tb.agent()
            self.agent.wait(60)
            self.agent.start_iperf3_server(IPERF_PORT)
        except BaseException:
            self.tb.close()
            raise

    def close(self) -> None:
        self.tb.close()

    def tcp(self, secs: int, reverse: bool) -> float:
        data = self.tb.iperf3(seconds=secs, reverse=reverse, port=IPERF_PORT,
                              timeout=secs + 30)
        return float(data["end"]["sum_received"]["bits_per_second"]) / 1e9

    def udp(self, secs: int, reverse: bool) -> float:
        data = self.tb.iperf3(seconds=secs, reverse=reverse, udp=True, length=UDP64_PAYLOAD,
                              bitrate="0", port=IPERF_PORT, timeout=secs + 30)
        return udp_pps(data) / 1e6

    def rtt(self, count: int) -> float:
        from pyvirtio.guest.harness import GUEST_IP
        r = self.tb.host(["busybox", "ping", "-A", "-c", str(count), "-W", "5", GUEST_IP],
                         timeout=60 + count)
        rtts = ping_rtts(r.stdout)
        if not rtts:
            raise RuntimeError(f"ping got no reply: {r.stdout[-300:]} {r.stderr[-300:]}")
        return statistics.median(rtts) * 1000.0


def level_guest(s: Settings, progress: Callable[[str], None]) -> list[Figure]:
    """TCP and UDP both ways and ping RTT, ours vs QEMU's userspace TAP back-end."""
    reason = skip_reason()
    if reason:
        raise LevelSkipped(reason)
    image = find_image(build=not s.tiny)
    from pyvirtio.guest.harness import accelerator, qemu_version
    accel = "/".join(accelerator(image))
    note = NOTE.format(accel=f"{accel} ({qemu_version()})")
    secs, n = seconds(s), rounds(s)
    base = "QEMU userspace TAP back-end, same guest"
    rows = [
        (Figure("guest", "TCP host -> guest", "Gbit/s", True, baseline=base, note=note),
         lambda g: g.tcp(secs, False)),
        (Figure("guest", "TCP guest -> host", "Gbit/s", True, baseline=base),
         lambda g: g.tcp(secs, True)),
        (Figure("guest", "UDP 64 B host -> guest (received)", "Mpps", True, baseline=base),
         lambda g: g.udp(secs, False)),
        (Figure("guest", "UDP 64 B guest -> host (received)", "Mpps", True, baseline=base),
         lambda g: g.udp(secs, True)),
        (Figure("guest", "ping RTT host -> guest (median of a run)", "us", False,
                baseline=base), lambda g: g.rtt(pings(s))),
    ]
    workdir = Path(tempfile.mkdtemp(prefix="pvbguest"))
    guests: list[_Guest] = []
    try:
        for backend in BACKENDS:
            progress(f"guest: booting the guest on {backend}")
            guests.append(_Guest(image, workdir, backend))
        boots = [g.qemu.boot_seconds for g in guests]
        rows[0][0].note += f" [boot to VQ-READY: {boots[0]:.1f} s ours, {boots[1]:.1f} s QEMU's]"
        for rep in range(n):
            for fig, fn in rows:
                fig.samples.append(fn(guests[0]))
                fig.baseline_samples.append(fn(guests[1]))
                progress(f"guest: {fig.name} [{rep + 1}/{n}]")
    except BaseException as exc:
        for g in guests:
            g.close()
        if not isinstance(exc, Exception):      # Ctrl-C: everything ended, then out
            raise
        raise RuntimeError(f"guest level failed: {exc} (console, QEMU and back-end logs "
                           f"kept in {workdir})") from exc
    for g in guests:
        g.close()
    shutil.rmtree(workdir, ignore_errors=True)
    return [f for f, _ in rows]
