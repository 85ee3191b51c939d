"""The benchmark suite behind ``pyvirtio bench``: levels, each with its baseline."""

from __future__ import annotations

import json
import logging
import os
import platform
import sys
import time
from dataclasses import dataclass
from typing import Callable

from pyvirtio.bench import engine
from pyvirtio.bench.tap import level_tap
from pyvirtio.bench.figures import Figure, measure, render

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
    batches = (1, 32, 256)
    lengths = (1, 4)
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


def level_pingpong(s: Settings, progress: Callable[[str], None]) -> list[Figure]:
    """Two-thread ring ping-pong (ringtest's shape: ring 256, 1-descriptor buffers)."""
    out = []
    model = engine.implementation("model")
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


from pyvirtio.bench.packed import level_packed  # noqa: E402

LEVELS: dict[str, Callable[[Settings, Callable[[str], None]], list[Figure]]] = {
    "engine": level_engine,
    "pingpong": level_pingpong,
    "tap": level_tap,
    "packed": level_packed,
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
    versions = {}
    for pkg in ("vqcore", "numpy", "pyroute2", "Cython"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    return {"cpu": cpu, "cores": os.cpu_count(), "kernel": platform.release(),
            "python": sys.version.split()[0], "packages": versions,
            "loadavg": os.getloadavg(), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def run(only: list[str] | None, settings: Settings, json_path: str | None = None,
        progress: Callable[[str], None] | None = None) -> list[Figure]:
    """Run the chosen levels (all by default); print the table; optionally write JSON."""
    names = only or list(LEVELS)
    unknown = [n for n in names if n not in LEVELS]
    if unknown:
        raise ValueError(f"unknown level(s) {', '.join(unknown)}; known: {', '.join(LEVELS)}")
    progress = progress or (lambda msg: log.info("%s", msg))
    env = environment()
    figures: list[Figure] = []
    for name in names:
        figures += LEVELS[name](settings, progress)
    if json_path:
        with open(json_path, "w") as fh:
            json.dump({"environment": env, "settings": vars(settings),
                       "figures": [f.to_json() for f in figures]}, fh, indent=1)
    return figures


__all__ = ["Settings", "LEVELS", "run", "render", "environment"]
