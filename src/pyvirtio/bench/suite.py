"""The benchmark suite behind ``pyvirtio bench``: levels, each with its baseline."""

from __future__ import annotations

import json
import logging
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from pyvirtio.bench import engine
from pyvirtio.bench.figures import (
    Figure,
    LevelSkipped,
    Skip,
    collecting_skips,
    measure,
    render,
    skip,
)
from pyvirtio.bench.schema import SCHEMA_VERSION
from pyvirtio.bench.tap import level_tap

log = logging.getLogger("pyvirtio.bench")

#: published figures of the Linux kernel's tools/virtio/ringtest on this kind of machine
#: (issue 2): virtio_ring_0_9 busy-polling ~290 ns/buffer, its packed-like `ring` 13 ns,
#: eventfd mode 150-210 ns.
RINGTEST_PUBLISHED = "kernel ringtest here: virtio_ring_0_9 ~290 ns, ring ~13 ns, eventfd 150-210 ns"


@dataclass
class Settings:
    """How long and how big: ``quick`` for CI and the README's main job."""
    quick: bool = False
    tiny: bool = False
    #: a binary of the Linux kernel's tools/virtio/ringtest (e.g. ``virtio_ring_0_9``),
    #: measured next to our ping-pong when given
    ringtest: str | None = None

    @property
    def repeats(self) -> int:
        return 2 if self.tiny else (3 if self.quick else 5)

    @property
    def seconds(self) -> float:
        return 0.02 if self.tiny else (0.1 if self.quick else 0.25)

    @property
    def pingpong_buffers(self) -> int:
        return 100_000 if self.tiny else (2_000_000 if self.quick else 10_000_000)

    @property
    def model_buffers(self) -> int:
        return 2_000 if self.tiny else (10_000 if self.quick else 30_000)


def level_engine(s: Settings, progress: Callable[[str], None]) -> list[Figure]:
    """Device pop+push and driver add+reclaim, chains/s, vs the pure-Python model."""
    out = []
    batches: tuple[int, ...] = (1, 32, 256)
    lengths: tuple[int, ...] = (1, 4)
    if s.tiny:
        batches, lengths = (256,), (1,)
    for side, fn in (("device pop+push", engine.device_rate), ("driver add+reclaim", engine.driver_rate)):
        for batch in batches:
            for clen in lengths:
                for indirect in (False, True):
                    name = f"{side} batch={batch} len={clen} {'indirect' if indirect else 'direct'}"
                    f = Figure("engine", name, "Mchains/s", True, baseline="pure-Python model")
                    measure(f, lambda: fn(engine.vqcore, batch, clen, indirect, s.seconds) / 1e6,
                            lambda: fn(engine.implementation("model"), batch, clen, indirect,
                                       s.seconds / 4) / 1e6,
                            s.repeats, progress)
                    out.append(f)
    f = Figure("engine", "device pop+push batch=256 len=1 direct, plain C loop", "Mchains/s", True,
               baseline="same through the Python API",
               note="the bare ring work without the per-batch Python call: bounds the API's overhead")
    measure(f, lambda: engine.device_rate_c(256, 1, False) / 1e6,
            lambda: engine.device_rate(engine.vqcore, 256, 1, False, s.seconds) / 1e6, s.repeats, progress)
    out.append(f)
    return out


#: the ping-pong's shape on both sides of the ringtest comparison
PINGPONG_BATCH, PINGPONG_RING = 64, 256


def ringtest_ns(path: str, cycles: int, eventfd: bool, timeout: float = 300.0) -> float:
    """ns per buffer of a kernel tools/virtio/ringtest binary (``bench/build-ringtest.sh``
    builds one): its wall time for ``--run-cycles cycles`` with our ping-pong's ring size
    and batch (``--sleep``: eventfd mode) divided by the cycles. :class:`RuntimeError`
    with its output when it fails."""
    import subprocess
    argv = [path, "--run-cycles", str(cycles), "--ring-size", str(PINGPONG_RING),
            "--batch", str(PINGPONG_BATCH)] + (["--sleep"] if eventfd else [])
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:    # a hung ringtest skips its rows only
        raise RuntimeError(f"{' '.join(argv)} did not end within {timeout:g} s") from exc
    t1 = time.perf_counter()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {proc.returncode}: "
                           f"{(proc.stderr or proc.stdout).strip()[-300:]}")
    return (t1 - t0) * 1e9 / cycles


def level_pingpong(s: Settings, progress: Callable[[str], None]) -> list[Figure]:
    """Two-thread ring ping-pong (ringtest's shape: ring 256, 1-descriptor buffers);
    with ``s.ringtest`` also against that kernel ringtest binary."""
    out = []
    model = engine.implementation("model")
    ringtest = s.ringtest
    if ringtest:
        name = os.path.basename(ringtest)
        for eventfd in (False, True):
            mode = "eventfd+event_idx" if eventfd else "busy-poll"
            f = Figure("pingpong", f"two threads, {mode}, C loops over the engine, vs ringtest",
                       "ns/buffer", False, baseline=f"kernel ringtest {name}"
                                                     f"{' --sleep' if eventfd else ''}",
                       note=("ringtest timed as a whole process (thread start included) "
                             f"over --run-cycles buffers; both sides ring {PINGPONG_RING}, "
                             f"batch {PINGPONG_BATCH}"))
            try:
                measure(f, lambda: engine.pingpong_c(
                            s.pingpong_buffers, eventfd, batch=PINGPONG_BATCH,
                            size=PINGPONG_RING)["ns_per_buffer"],
                        lambda: ringtest_ns(ringtest, s.pingpong_buffers, eventfd),
                        s.repeats, progress)
            except (OSError, RuntimeError, ValueError) as exc:
                skip("pingpong", f"ringtest {mode}", str(exc))
                continue
            out.append(f)
    for eventfd in (False, True):
        mode = "eventfd+event_idx" if eventfd else "busy-poll"
        f = Figure("pingpong", f"two threads, {mode}, C loops over the engine", "ns/buffer", False,
                   baseline="pure-Python model, Python threads",
                   note=f"{RINGTEST_PUBLISHED}; the model is GIL-bound" if not eventfd else "")
        measure(f, lambda: engine.pingpong_c(s.pingpong_buffers, eventfd)["ns_per_buffer"],
                lambda: engine.pingpong_python(model, s.model_buffers, eventfd)["ns_per_buffer"],
                s.repeats, progress)
        out.append(f)
        f = Figure("pingpong", f"two threads, {mode}, Python threads over the engine", "ns/buffer",
                   False, baseline="pure-Python model, Python threads")
        measure(f, lambda: engine.pingpong_python(engine.vqcore, s.model_buffers * 10, eventfd)["ns_per_buffer"],
                lambda: engine.pingpong_python(model, s.model_buffers, eventfd)["ns_per_buffer"],
                s.repeats, progress)
        out.append(f)
    return out


from pyvirtio.bench.guest import level_guest
from pyvirtio.bench.packed import level_packed
from pyvirtio.bench.vhost_user import level_vhost_user

LEVELS: dict[str, Callable[[Settings, Callable[[str], None]], list[Figure]]] = {
    "engine": level_engine,
    "pingpong": level_pingpong,
    "tap": level_tap,
    "packed": level_packed,
    "vhost-user": level_vhost_user,
    "guest": level_guest,
}

def environment() -> dict:
    """What the numbers were measured on."""
    cpu = ""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    from importlib import metadata
    versions: dict[str, str | None] = {}
    for pkg in ("vqcore", "numpy", "pyroute2", "Cython", "matplotlib"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    return {"cpu": cpu, "cores": os.cpu_count(), "kernel": platform.release(),
            "machine": platform.machine(), "python": sys.version.split()[0],
            "packages": versions, "tools": _tool_versions(), "root": os.geteuid() == 0,
            "loadavg": os.getloadavg(), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def _tool_versions() -> dict[str, str | None]:
    """First line of ``--version`` of the outside programs the levels use (None: not
    installed)."""
    from pyvirtio.guest.harness import QEMU, tool_version
    return {tool: tool_version(tool) for tool in (QEMU, "iperf3")}


@dataclass
class Report:
    """The result of one run: the figures, what was skipped and why, the comparison
    with the published vhost-net figures, the environment, seconds per level."""
    figures: list[Figure]
    skipped: list[Skip]
    versus: list[dict]
    environment: dict
    settings: Settings
    seconds: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"schema": SCHEMA_VERSION, "environment": self.environment,
                "settings": vars(self.settings), "seconds": self.seconds,
                "figures": [f.to_json() for f in self.figures],
                "skipped": [asdict(k) for k in self.skipped],
                "vs_vhost_net": self.versus}




def check_levels(only: list[str] | None) -> list[str]:
    """The levels to run, in suite order; :class:`ValueError` for an unknown name."""
    names = only or list(LEVELS)
    unknown = [n for n in names if n not in LEVELS]
    if unknown:
        raise ValueError(f"unknown level(s) {', '.join(unknown)}; known: {', '.join(LEVELS)}")
    return [n for n in LEVELS if n in names]


def run(only: list[str] | None, settings: Settings, json_path: str | None = None,
        progress: Callable[[str], None] | None = None) -> Report:
    """Run the chosen levels (all by default); optionally write JSON. A level that
    cannot run here is skipped with its reason; one that fails is reported as skipped
    with the error, and the others still run."""
    names = check_levels(only)
    report_progress = progress or (lambda msg: log.info("%s", msg))
    env = environment()
    figures: list[Figure] = []
    seconds: dict[str, float] = {}
    t_start = time.monotonic()
    with collecting_skips() as skipped:
        for k, name in enumerate(names):
            def level_progress(msg: str, k: int = k) -> None:
                elapsed = time.monotonic() - t_start
                report_progress(f"[{int(elapsed) // 60}:{int(elapsed) % 60:02d} level "
                                f"{k + 1}/{len(names)}] {msg}")

            level_progress(f"{name}: starting")
            t0 = time.monotonic()
            try:
                figures += LEVELS[name](settings, level_progress)
            except LevelSkipped as exc:
                skip(name, "", str(exc))
            except Exception as exc:
                log.exception("level %s failed", name)
                skip(name, "", f"FAILED: {type(exc).__name__}: {exc}")
            seconds[name] = round(time.monotonic() - t0, 1)
    seconds["total"] = round(time.monotonic() - t_start, 1)
    env["loadavg_end"] = os.getloadavg()
    report = Report(figures, skipped, versus_vhost_net(figures), env, settings, seconds)
    if json_path:
        with open(json_path, "w") as fh:
            json.dump(report.to_json(), fh, indent=1)
    return report


# ---------------------------------------------------------------------------------------
# the "vs vhost-net" section

#: published figures the suite sets our measurements against (issues 4-6)
PUBLISHED: dict[str, Any] = {
    "vhost_net_gbps": (7.0, 8.0),
    "vhost_net_vs_userspace": 8.0,
    "vhost_net_latency_gain": 0.10,
    "target_pvp_gbps": 16.0,
}


def _find(figures: list[Figure], level: str, name: str, unit: str) -> Figure | None:
    for f in figures:
        if f.level == level and f.name.startswith(name) and f.unit == unit:
            return f
    return None


def versus_vhost_net(figures: list[Figure]) -> list[dict]:
    """Our measured figures next to the published vhost-net ones, each row saying
    whether the comparison is like for like."""
    rows: list[dict] = []

    def add(what: str, published: str, ours: Figure | None, ours_value: str,
            userspace: str, like: str) -> None:
        rows.append({"comparison": what, "published": published,
                     "ours": ours_value if ours is not None else "not measured in this run",
                     "userspace_measured": userspace, "like_for_like": like})

    g_tx = _find(figures, "guest", "TCP host -> guest", "Gbit/s")
    g_rx = _find(figures, "guest", "TCP guest -> host", "Gbit/s")
    rtt = _find(figures, "guest", "ping RTT", "us")
    pvp = _find(figures, "vhost-user", "PVP TCP, 1 pair", "Gbit/s")

    def med(f: Figure | None, base: bool = False) -> str:
        if f is None:
            return "-"
        s = f.base if base else f.ours
        return f"{s[0]:.2f} {f.unit} ({s[1]:.2f}-{s[2]:.2f})" if s else "-"

    lo, hi = PUBLISHED["vhost_net_gbps"]
    add("guest TCP throughput, host -> guest",
        f"vhost-net {lo:g}-{hi:g} Gbit/s (KVM guest, kernel vhost)", g_tx, med(g_tx),
        f"QEMU userspace TAP back-end {med(g_tx, True)}",
        "no: our guest runs under TCG (the emulated CPU bounds it near 2 Gbit/s), the "
        "published figure is a KVM guest; only ours/QEMU-userspace is like for like")
    add("guest TCP throughput, guest -> host",
        f"vhost-net {lo:g}-{hi:g} Gbit/s (KVM guest)", g_rx, med(g_rx),
        f"QEMU userspace TAP back-end {med(g_rx, True)}", "no: TCG guest vs KVM guest")
    ratio = g_tx.ratio if g_tx is not None else None
    add("speed-up over QEMU's userspace virtio-net",
        f"vhost-net about {PUBLISHED['vhost_net_vs_userspace']:g}x userspace", g_tx,
        f"{ratio:.2f}x ours/userspace (TCP host -> guest, same TCG guest)" if ratio else "-",
        "QEMU userspace TAP back-end: the guest level's baseline, same run",
        "partly: same guest, same QEMU, same run, but under TCG the guest CPU caps both "
        "back-ends, which squeezes any ratio towards 1x; the 8x was measured with KVM")
    if rtt is not None and rtt.ours and rtt.base:
        gain = 1 - rtt.ours[0] / rtt.base[0]
        rtt_text = (f"{med(rtt)}: {abs(gain) * 100:.0f}% "
                    f"{'lower' if gain >= 0 else 'higher'} than QEMU userspace")
    else:
        rtt_text = "-"
    add("latency (ping RTT) vs userspace",
        f"vhost-net about {PUBLISHED['vhost_net_latency_gain'] * 100:.0f}% lower latency",
        rtt, rtt_text, f"QEMU userspace TAP back-end {med(rtt, True)}",
        "partly: same guest and run; TCG adds its own latency to both")
    add("PVP TCP, 1 queue pair (host only, no guest)",
        f"target {PUBLISHED['target_pvp_gbps']:g} Gbit/s (2x vhost-net's {lo:g}-{hi:g}; "
        "Cloud Hypervisor's vhost-user-net, 1 pair)", pvp, med(pvp),
        f"veth pair (kernel only) {med(pvp, True)}",
        "no: two TAPs, two back-end processes and our forwarder on 2 shared vCPUs, no "
        "guest; the published figures are guest to host on dedicated cores; the veth "
        "pair is a kernel-only ceiling, not a back-end")
    return rows


def render_versus(rows: list[dict]) -> str:
    """The "vs vhost-net" section as text."""
    lines = ["vs vhost-net (published figures next to ours; read the last line of each):"]
    for r in rows:
        lines += [f"- {r['comparison']}",
                  f"    published:  {r['published']}",
                  f"    ours:       {r['ours']}",
                  f"    peer here:  {r['userspace_measured']}",
                  f"    like for like? {r['like_for_like']}"]
    return "\n".join(lines)


def render_skipped(skipped: list[Skip]) -> str:
    """One line per skipped level or part, with the reason."""
    if not skipped:
        return ""
    return "\n".join(["skipped:"] + [f"- {k.level}{f' ({k.part})' if k.part else ''}: "
                                      f"{k.reason}" for k in skipped])


__all__ = [
    "LEVELS",
    "PUBLISHED",
    "SCHEMA_VERSION",
    "Report",
    "Settings",
    "check_levels",
    "environment",
    "render",
    "render_skipped",
    "render_versus",
    "run",
    "versus_vhost_net",
]
