"""pytest-benchmark micro-benchmarks (``pytest bench/``) for development comparisons
(``--benchmark-save`` / ``--benchmark-compare``). Numbers are printed, never asserted.
Each benchmark runs on the engine and on the pure-Python model; the summary prints the
engine/model ratio of each group, both measured in this run."""

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    session = getattr(config, "_benchmarksession", None)
    if session is None or not session.benchmarks:
        return
    groups: dict[str, dict[str, float]] = {}
    for bench in session.benchmarks:
        impl = bench.params.get("impl") if bench.params else None
        if impl and bench.stats:
            groups.setdefault(bench.group or bench.name, {})[impl] = bench.stats.median
    rows = [(g, v["model"] / v["engine"]) for g, v in sorted(groups.items())
            if "engine" in v and "model" in v and v["engine"]]
    if rows:
        terminalreporter.write_sep("-", "engine speed-up over the pure-Python model (medians, this run)")
        for g, r in rows:
            terminalreporter.write_line(f"{g:60s} {r:8.1f}x")
