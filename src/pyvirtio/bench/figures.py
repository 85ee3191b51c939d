"""Figures of a benchmark run: repeated samples of ours and of a baseline, measured
interleaved in one run (A B A B ...), summarised as median and min-max, and a ratio."""

from __future__ import annotations

import logging
import statistics
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import asdict, dataclass, field

log = logging.getLogger("pyvirtio.bench")


@dataclass
class Figure:
    """One row of the results table."""
    level: str
    name: str
    unit: str
    higher_is_better: bool
    samples: list[float] = field(default_factory=list)
    baseline: str | None = None
    baseline_samples: list[float] = field(default_factory=list)
    note: str = ""

    @staticmethod
    def _summary(xs: list[float]) -> tuple[float, float, float] | None:
        if not xs:
            return None
        return statistics.median(xs), min(xs), max(xs)

    @property
    def ours(self) -> tuple[float, float, float] | None:
        """(median, min, max) of our samples."""
        return self._summary(self.samples)

    @property
    def base(self) -> tuple[float, float, float] | None:
        """(median, min, max) of the baseline's samples."""
        return self._summary(self.baseline_samples)

    @property
    def ratio(self) -> float | None:
        """How many times better than the baseline (medians; >1 means we are better)."""
        o, b = self.ours, self.base
        if not o or not b or not o[0] or not b[0]:
            return None
        return o[0] / b[0] if self.higher_is_better else b[0] / o[0]

    def to_json(self) -> dict:
        d = asdict(self)
        d["median"], d["ratio"] = (self.ours or (None,))[0], self.ratio
        d["baseline_median"] = (self.base or (None,))[0]
        return d


def measure(figure: Figure, ours: Callable[[], float], baseline: Callable[[], float] | None,
            repeats: int, progress: Callable[[str], None] | None = None) -> Figure:
    """Run ours and the baseline alternately ``repeats`` times each."""
    for i in range(repeats):
        figure.samples.append(ours())
        if baseline is not None:
            figure.baseline_samples.append(baseline())
        if progress:
            progress(f"{figure.level}: {figure.name} [{i + 1}/{repeats}]")
    return figure


def _fmt(v: float) -> str:
    if v >= 100:
        return f"{v:,.0f}"
    if v >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def render(figures: list[Figure]) -> str:
    """The results table as text."""
    rows = [("level", "figure", "ours: median (min-max)", "baseline", "baseline: median (min-max)",
             "ratio")]
    for f in figures:
        o, b = f.ours, f.base
        ours = f"{_fmt(o[0])} ({_fmt(o[1])}-{_fmt(o[2])}) {f.unit}" if o else "-"
        base = f"{_fmt(b[0])} ({_fmt(b[1])}-{_fmt(b[2])}) {f.unit}" if b else "-"
        ratio = f"{f.ratio:.1f}x" if f.ratio is not None else "-"
        rows.append((f.level, f.name, ours, f.baseline or "-", base, ratio))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for k, r in enumerate(rows):
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    notes = [f"- {f.name}: {f.note}" for f in figures if f.note]
    if notes:
        lines += ["", "notes:", *notes]
    return "\n".join(lines)


@dataclass
class Skip:
    """A level, or a part of one, that did not run here, and why."""
    level: str
    part: str
    reason: str


#: the list :func:`skip` adds to: the one of the innermost :func:`collecting_skips`
_SKIPS: ContextVar[list[Skip] | None] = ContextVar("pyvirtio_bench_skips", default=None)


@contextmanager
def collecting_skips() -> Iterator[list[Skip]]:
    """Collect what :func:`skip` records inside the block (the suite's ``run`` wraps
    its levels in one): the list is yielded."""
    found: list[Skip] = []
    token = _SKIPS.set(found)
    try:
        yield found
    finally:
        _SKIPS.reset(token)


def skip(level: str, part: str, reason: str) -> None:
    """Log that ``part`` of ``level`` (``""``: all of it) was skipped, and record it in
    the current :func:`collecting_skips` list (if any)."""
    found = _SKIPS.get()
    if found is not None:
        found.append(Skip(level, part, reason))
    log.warning("level %s%s skipped: %s", level, f" ({part})" if part else "", reason)


class LevelSkipped(Exception):
    """Raised by a level that cannot run at all here; the message says why."""
