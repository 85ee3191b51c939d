"""The ``pyvirtio`` command."""

from __future__ import annotations

import argparse
import logging
import os
import sys

log = logging.getLogger("pyvirtio")


def _bench(args: argparse.Namespace) -> int:
    from pyvirtio.bench import render, run
    from pyvirtio.bench.suite import Settings

    def progress(msg: str) -> None:
        if sys.stderr.isatty():
            sys.stderr.write("\r\033[K" + msg)
            sys.stderr.flush()
        else:
            log.info("%s", msg)

    try:
        figures = run(args.only, Settings(quick=args.quick, tiny=args.tiny), args.json, progress)
    except ValueError as exc:
        log.error("%s", exc)
        return 2
    if sys.stderr.isatty():
        sys.stderr.write("\r\033[K")
    sys.stdout.write(render(figures) + "\n")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pyvirtio", description=__doc__)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("bench", help="run the benchmark suite and print one table")
    b.add_argument("--quick", action="store_true", help="short run (about 2 minutes)")
    b.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # CI smoke run
    b.add_argument("--json", metavar="FILE", help="write environment and raw samples as JSON")
    b.add_argument("--only", nargs="+", metavar="LEVEL", help="levels to run (default: all)")
    b.set_defaults(func=_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``pyvirtio`` command."""
    # numpy's BLAS threads only steal cores from the benchmarks
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
