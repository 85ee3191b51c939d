"""``pyvirtio bench --plot FILE.png``: the results table as bars, one per figure, each
the ratio to its baseline (log scale, bars from 1x: right is better, left worse; whiskers from the worst to the best
pairing of the samples' ranges). matplotlib is an optional extra: ``pip install
'vqcore[plot]'``."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pyvirtio.bench.figures import Figure

__all__ = ["INSTALL_HINT", "PlotUnavailable", "plot", "ratio_range", "require_matplotlib"]

INSTALL_HINT = ("--plot needs matplotlib, an optional extra: pip install 'vqcore[plot]' "
                "(or pip install matplotlib)")


class PlotUnavailable(RuntimeError):
    """matplotlib is not installed."""


def require_matplotlib():
    """The ``matplotlib.pyplot`` module on the Agg back-end, or :class:`PlotUnavailable`
    with :data:`INSTALL_HINT`."""
    try:
        import matplotlib
    except ImportError as exc:
        raise PlotUnavailable(INSTALL_HINT) from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def ratio_range(f: Figure) -> tuple[float, float] | None:
    """(worst, best) ratio the samples' ranges allow, or ``None`` without a ratio."""
    o, b = f.ours, f.base
    if f.ratio is None or not o or not b or not o[1] or not b[1]:
        return None
    if f.higher_is_better:
        return o[1] / b[2], o[2] / b[1]
    return b[1] / o[2], b[2] / o[1]


def plot(figures: list[Figure], path: str, title: str = "pyvirtio bench") -> int:
    """Draw the figures that have a ratio as horizontal bars into ``path`` (PNG);
    returns how many bars."""
    plt = require_matplotlib()
    rows = [f for f in figures if f.ratio is not None]
    levels = list(dict.fromkeys(f.level for f in rows))
    colours = plt.get_cmap("tab10")
    height = max(3.0, 0.28 * len(rows) + 1.5)
    fig, ax = plt.subplots(figsize=(11, height))
    for y, f in enumerate(rows):
        r = f.ratio
        assert r is not None
        lo, hi = ratio_range(f) or (r, r)
        # from 1x to the ratio: better goes right, worse goes left
        ax.barh(y, r - 1.0, left=1.0, color=colours(levels.index(f.level) % 10))
        ax.errorbar(r, y, xerr=[[max(r - lo, 0)], [max(hi - r, 0)]], fmt="none",
                    ecolor="black", capsize=2, linewidth=0.8)
        ax.text(max(r, hi, 1.0) * 1.05, y, f"{r:.2f}x", va="center", fontsize=7)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([f"{f.level}: {f.name} [{f.unit}]" for f in rows], fontsize=7)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.axvline(1.0, color="grey", linestyle="--", linewidth=0.8)
    ax.set_xlabel("ours / baseline (median; > 1: we are better; whiskers: sample ranges)")
    ax.set_title(title, fontsize=9)
    handles = [plt.Rectangle((0, 0), 1, 1, color=colours(i % 10)) for i in range(len(levels))]
    if handles:
        ax.legend(handles, levels, fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return len(rows)
