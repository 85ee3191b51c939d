"""The "packed" level: packed rings side by side with split rings, same run, same API."""

from __future__ import annotations

from typing import Callable

from pyvirtio.bench import engine
from pyvirtio.bench.figures import Figure, measure


def level_packed(s, progress: Callable[[str], None]) -> list[Figure]:
    """Round trips (add+pop+push+reclaim in one thread) and the two-thread ping-pong
    for packed rings, each with the split ring as its baseline."""
    out = []
    batches = (256,) if s.tiny else (1, 32, 256)
    lengths = (1,) if s.tiny else (1, 4)
    for batch in batches:
        for clen in lengths:
            for indirect in (False, True):
                name = (f"packed round trip batch={batch} len={clen} "
                        f"{'indirect' if indirect else 'direct'}")
                f = Figure("packed", name, "Mchains/s", True, baseline="split ring, same API")
                measure(f, lambda: engine.roundtrip_rate("packed", batch, clen, indirect, s.seconds) / 1e6,
                        lambda: engine.roundtrip_rate("split", batch, clen, indirect, s.seconds) / 1e6,
                        s.repeats, progress)
                out.append(f)
    for eventfd in (False, True):
        mode = "eventfd+event_idx" if eventfd else "busy-poll"
        f = Figure("packed", f"packed ping-pong, two threads, {mode}", "ns/buffer", False,
                   baseline="split ring ping-pong")
        measure(f, lambda: engine.pingpong_layout("packed", s.pingpong_buffers, eventfd)["ns_per_buffer"],
                lambda: engine.pingpong_layout("split", s.pingpong_buffers, eventfd)["ns_per_buffer"],
                s.repeats, progress)
        out.append(f)
    return out
