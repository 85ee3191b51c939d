"""The ``pyvirtio`` command: ``pyvirtio net`` and ``pyvirtio rng`` (vhost-user back-ends),
``pyvirtio ctl`` (ask a running back-end) and ``pyvirtio bench`` (the benchmark suite)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import sys
import threading
from contextlib import ExitStack
from typing import Any, Callable

log = logging.getLogger("pyvirtio")


def _bench(args: argparse.Namespace) -> int:
    from pyvirtio.bench import render
    from pyvirtio.bench.suite import (Settings, check_levels, render_skipped, render_versus,
                                      run)

    try:
        check_levels(args.only)
    except ValueError as exc:
        log.error("%s", exc)
        return 2
    if args.plot:
        from pyvirtio.bench.plot import PlotUnavailable, require_matplotlib
        try:
            require_matplotlib()        # before the run, not after minutes of it
        except PlotUnavailable as exc:
            log.error("%s", exc)
            return 2

    tty = sys.stderr.isatty()

    def progress(msg: str) -> None:
        if tty:
            sys.stderr.write("\r\033[K" + msg[:max(20, shutil.get_terminal_size().columns - 1)])
            sys.stderr.flush()
        else:
            log.info("%s", msg)

    if args.ringtest and not os.access(args.ringtest, os.X_OK):
        log.error("--ringtest %s: not an executable file", args.ringtest)
        return 2
    report = run(args.only, Settings(quick=args.quick, tiny=args.tiny, ringtest=args.ringtest),
                 args.json, progress)
    if tty:
        sys.stderr.write("\r\033[K")
    parts = [render(report.figures)]
    if report.versus:
        parts.append(render_versus(report.versus))
    skipped = render_skipped(report.skipped)
    if skipped:
        parts.append(skipped)
    parts.append(f"({report.seconds.get('total', 0):.0f} s; load average "
                 f"{' '.join(f'{x:.2f}' for x in report.environment['loadavg'])} at the start, "
                 f"{' '.join(f'{x:.2f}' for x in report.environment['loadavg_end'])} at the end)")
    sys.stdout.write("\n\n".join(parts) + "\n")
    if args.plot:
        from pyvirtio.bench.plot import plot
        bars = plot(report.figures, args.plot,
                    title=f"pyvirtio bench{' --quick' if args.quick else ''}: "
                          f"{report.environment['cpu']}, {report.environment['cores']} cores")
        log.info("plot of %d ratios written to %s", bars, args.plot)
    return 0


def _mac_address(text: str) -> bytes:
    """argparse type: ``52:54:00:12:34:56`` -> 6 bytes (unicast, not all zeros)."""
    parts = text.split(":")
    try:
        if len(parts) != 6 or any(len(p) != 2 for p in parts):
            raise ValueError
        mac = bytes(int(p, 16) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a MAC address like 52:54:00:12:34:56") from None
    if mac[0] & 1:
        raise argparse.ArgumentTypeError(f"{text} is a multicast address, not a device's")
    if mac == bytes(6):
        raise argparse.ArgumentTypeError("00:00:00:00:00:00 is not a device's address")
    return mac


#: how every back-end command serves (the end of its description)
SERVING = ("It serves one front-end at a time and listens again when it disconnects (with "
           "--client: it connects to the front-end, and again whenever it goes away); "
           "SIGINT/SIGTERM end it cleanly, SIGUSR1 logs its counters (also logged when a "
           "front-end disconnects).")


def _backend_parser(sub: Any, name: str, help: str, description: str
                    ) -> argparse.ArgumentParser:
    """A back-end command's parser with the options they all take."""
    p = sub.add_parser(name, help=help, description=f"{description} {SERVING}")
    p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                   help="debug logging")
    _add_socket_args(p)
    return p


def _socket_mode(text: str) -> int:
    """argparse type: an octal permission mode like 660 or 0o660."""
    try:
        mode = int(text, 8)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an octal mode like 660") from None
    if not 0 <= mode <= 0o777:
        raise argparse.ArgumentTypeError(f"{text}: a mode is 000..777")
    return mode


def _add_socket_args(p: argparse.ArgumentParser) -> None:
    """The socket options every back-end command takes (vhost-user.rst's backend
    program conventions, and client mode)."""
    where = p.add_mutually_exclusive_group()
    where.add_argument("--socket-path", metavar="PATH",
                       help="listen on this Unix socket (with --client: connect to it)")
    where.add_argument("--fd", type=int, metavar="FD",
                       help="use this inherited socket (listening or connected)")
    p.add_argument("--client", action="store_true",
                   help="connect to the front-end listening on --socket-path (QEMU's "
                        "server=on) and connect again whenever it goes away")
    p.add_argument("--socket-mode", type=_socket_mode, metavar="MODE",
                   help="permission bits of the listening socket file (e.g. 660)")
    p.add_argument("--socket-group", metavar="GROUP",
                   help="group of the listening socket file (e.g. the one libvirt's "
                        "QEMU runs as)")
    p.add_argument("--print-capabilities", action="store_true",
                   help="print the back-end capabilities as JSON and exit")
    p.add_argument("--message-timeout", type=float, default=5.0, metavar="SECONDS",
                   help="time a front-end may take to finish a message (default 5)")
    p.add_argument("--control", metavar="PATH",
                   help="answer 'pyvirtio ctl PATH show|stats' on this Unix socket")


def _check_socket(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Validate the socket options (exits 2 on an error)."""
    from pyvirtio.vhost_user.server import ServerError, check_socket_fd, check_socket_path

    if (args.socket_path is None) == (args.fd is None):
        parser.error("give one of --socket-path PATH and --fd FD")
    if args.client and args.socket_path is None:
        parser.error("--client connects to a --socket-path")
    if (args.client or args.fd is not None) and (args.socket_mode is not None
                                                 or args.socket_group is not None):
        parser.error("--socket-mode and --socket-group apply to a socket the back-end "
                     "listens on (--socket-path without --client)")
    if args.socket_group is not None and not args.socket_group.isdigit():
        import grp
        try:
            grp.getgrnam(args.socket_group)
        except KeyError:
            parser.error(f"--socket-group: no group {args.socket_group!r}")
    if args.message_timeout <= 0:
        parser.error("--message-timeout must be positive")
    if args.control is not None:
        try:
            check_socket_path(args.control)
        except ServerError as exc:
            parser.error(f"--control: {exc}")
    try:
        if args.socket_path is not None:
            check_socket_path(args.socket_path)
        else:
            check_socket_fd(args.fd)
    except ServerError as exc:
        parser.error(f"{'--socket-path' if args.fd is None else '--fd'}: {exc}")


def _check_net(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Validate ``pyvirtio net`` arguments beyond argparse (exits 2 on an error)."""
    from pyvirtio import netns
    from pyvirtio.backends.tap import MAX_TAP_QUEUES, TapError, check_ifname
    from pyvirtio.net.vhost_user import MAX_QUEUE_PAIRS, MTU_MAX, MTU_MIN
    from pyvirtio.runtime import check_tx_coalesce_us

    if args.print_capabilities:
        return                      # vhost-user.rst: other options are ignored
    _check_socket(parser, args)
    if not (args.tap is not None or args.sink or args.loopback):
        parser.error("choose where packets go: --tap NAME, --sink or --loopback")
    limit = min(MAX_QUEUE_PAIRS, MAX_TAP_QUEUES) if args.tap is not None else MAX_QUEUE_PAIRS
    if not 1 <= args.queues <= limit:
        parser.error(f"--queues {args.queues}: must be 1..{limit}")
    mtu_max = 65521 if args.tap is not None else MTU_MAX    # a TAP's MTU ends at 65521
    if args.mtu is not None and not MTU_MIN <= args.mtu <= mtu_max:
        parser.error(f"--mtu {args.mtu}: must be {MTU_MIN}..{mtu_max}")
    try:
        check_tx_coalesce_us(args.tx_coalesce_us, "--tx-coalesce-us")
    except ValueError as exc:
        parser.error(str(exc))
    if args.tap is not None:
        try:
            check_ifname(args.tap)
        except TapError as exc:
            parser.error(f"--tap: {exc}")
    if args.netns is not None:
        if args.tap is None:
            parser.error("--netns applies to --tap only")
        if not netns.exists(args.netns):
            parser.error(f"--netns: network namespace {args.netns!r} does not exist")


def _open_packet_end(args: argparse.Namespace):
    """The packet backend ``pyvirtio net`` was asked for."""
    mtu = args.mtu if args.mtu is not None else 1500
    if args.tap is not None:
        from pyvirtio.backends.tap import Tap
        return Tap.create(args.tap, args.queues, netns=args.netns, mtu=args.mtu)
    if args.sink:
        from pyvirtio.backends.sink import Sink
        return Sink(args.queues, mtu=mtu)
    from pyvirtio.backends.loopback import Loopback
    return Loopback(args.queues, mtu=mtu)


def _serve(args: argparse.Namespace, open_device: Callable[[ExitStack], Any]) -> int:
    """Serve the device ``open_device`` builds on the socket the arguments name, until
    SIGINT or SIGTERM; SIGUSR1 logs the device's counters. Everything ``open_device``
    registers on the stack is closed at the end."""
    from pyvirtio.vhost_user.server import VhostUserServer

    stopping = threading.Event()
    owner = os.getpid()
    device = server = None

    def on_signal(signum: int, _frame: object) -> None:
        if os.getpid() != owner:
            # a child forked by a library (pyroute2's namespace helper, stopped with
            # SIGTERM) inherits this handler and the server's wake-up eventfd: it must
            # die as it would without us, not stop its parent's server
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        log.info("%s: shutting down", signal.Signals(signum).name)
        stopping.set()
        if server is not None:
            server.shutdown()

    def on_usr1(signum: int, _frame: object) -> None:
        if os.getpid() == owner and device is not None:
            device.log_stats("SIGUSR1")

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    previous[signal.SIGUSR1] = signal.signal(signal.SIGUSR1, on_usr1)
    try:
        with ExitStack() as stack:
            device = open_device(stack)
            stack.callback(device.close)
            server = VhostUserServer(device, socket_path=args.socket_path, fd=args.fd,
                                     client=args.client, message_timeout=args.message_timeout,
                                     socket_mode=args.socket_mode,
                                     socket_group=args.socket_group)
            stack.callback(server.close)
            if args.control is not None:
                from pyvirtio.control import ControlServer
                stack.enter_context(ControlServer(args.control, server.control_commands()))
            if stopping.is_set():           # a signal before the server was there
                server.shutdown()
            server.serve_forever()
        return 0
    except OSError as exc:          # TapError, ServerError, NetnsError, ...
        log.error("%s", exc)
        return 1
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _net(args: argparse.Namespace) -> int:
    from pyvirtio.net.vhost_user import NET_PROTOCOL_FEATURES, VhostUserNetDevice
    from pyvirtio.vhost_user.handler import capabilities

    if args.print_capabilities:
        caps = capabilities(VhostUserNetDevice.device_type, int(NET_PROTOCOL_FEATURES), True)
        sys.stdout.write(json.dumps(caps, indent=2) + "\n")
        return 0

    def open_device(stack: ExitStack) -> VhostUserNetDevice:
        packet = stack.enter_context(_open_packet_end(args))
        return VhostUserNetDevice(packet, queues=args.queues, mac=args.mac,
                                  mtu=args.mtu if args.mtu is not None else 1500,
                                  poll=args.poll, packed=not args.no_packed,
                                  tx_coalesce_us=args.tx_coalesce_us)
    return _serve(args, open_device)


def _flatten(obj: Any, prefix: str = "") -> list[str]:
    """``key.sub=value`` lines of a JSON value (for ``pyvirtio ctl`` without --json)."""
    if isinstance(obj, dict):
        out: list[str] = []
        for k, v in obj.items():
            out += _flatten(v, f"{prefix}.{k}" if prefix else str(k))
        return out
    if isinstance(obj, list) and any(isinstance(v, (dict, list)) for v in obj):
        out = []
        for i, v in enumerate(obj):
            out += _flatten(v, f"{prefix}[{i}]")
        return out
    return [f"{prefix}={json.dumps(obj)}" if prefix else json.dumps(obj)]


def _ctl(args: argparse.Namespace) -> int:
    from pyvirtio.control import ControlError, request

    extra = {"port": args.port} if args.port is not None else {}
    try:
        result = request(args.path, args.command, timeout=args.timeout, **extra)
    except ControlError as exc:
        log.error("%s", exc)
        return 1
    if args.json:
        sys.stdout.write(json.dumps(result, indent=2) + "\n")
    else:
        sys.stdout.write("\n".join(_flatten(result)) + "\n")
    return 0


def _check_rng(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Validate ``pyvirtio rng`` arguments beyond argparse (exits 2 on an error)."""
    if args.print_capabilities:
        return
    _check_socket(parser, args)
    if args.max_bytes_per_s is not None and args.max_bytes_per_s < 1:
        parser.error(f"--max-bytes-per-s {args.max_bytes_per_s}: must be at least 1")
    try:
        fd = os.open(args.source, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        parser.error(f"--source {args.source}: {exc.strerror}")
    else:
        os.close(fd)


def _rng(args: argparse.Namespace) -> int:
    from pyvirtio.rng.vhost_user import VhostUserRngDevice
    from pyvirtio.vhost_user.handler import capabilities

    if args.print_capabilities:
        caps = capabilities(VhostUserRngDevice.device_type, 0, False,
                            VhostUserRngDevice.withheld_protocol_features)
        sys.stdout.write(json.dumps(caps, indent=2) + "\n")
        return 0
    return _serve(args, lambda stack: VhostUserRngDevice(
        source=args.source, max_bytes_per_s=args.max_bytes_per_s, poll=args.poll))


#: ``pyvirtio bench``'s levels in suite order (pyvirtio.bench.suite.LEVELS, named here so
#: that the CLI does not import the suite to print its help; a test keeps them equal)
BENCH_LEVELS = ("engine", "pingpong", "tap", "packed", "vhost-user", "guest")


def build_parser() -> argparse.ArgumentParser:
    from pyvirtio.runtime import TX_COALESCE_US

    p = argparse.ArgumentParser(prog="pyvirtio", description=__doc__)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("bench", help="run the benchmark suite and print one table")
    b.add_argument("--quick", action="store_true", help="short run (about 2 minutes)")
    b.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # CI smoke run
    b.add_argument("--json", metavar="FILE", help="write environment and raw samples as JSON")
    b.add_argument("--plot", metavar="FILE.png",
                   help="draw the ratios as a PNG (needs matplotlib: pip install 'vqcore[plot]')")
    b.add_argument("--ringtest", metavar="PATH",
                   help="a binary of the Linux kernel's tools/virtio/ringtest (e.g. "
                        "virtio_ring_0_9) to measure next to our ring ping-pong")
    b.add_argument("--only", nargs="+", metavar="LEVEL",
                   help=f"levels to run (default: all): {' '.join(BENCH_LEVELS)}")
    b.set_defaults(func=_bench)

    n = _backend_parser(sub, "net", "run a vhost-user-net back-end",
                        "A vhost-user-net back-end (QEMU docs/interop/vhost-user.rst, backend "
                        "program conventions).")
    end = n.add_mutually_exclusive_group()
    end.add_argument("--tap", metavar="NAME", help="a TAP interface (created if missing)")
    end.add_argument("--sink", action="store_true", help="count and drop every TX frame")
    end.add_argument("--loopback", action="store_true", help="return every TX frame as RX")
    n.add_argument("--queues", type=int, default=1, metavar="N", help="queue pairs (default 1)")
    n.add_argument("--netns", metavar="NS", help="the network namespace of the TAP")
    n.add_argument("--mac", type=_mac_address, default=b"\x52\x54\x00\x12\x34\x56",
                   metavar="MAC", help="the device's MAC (default 52:54:00:12:34:56)")
    n.add_argument("--mtu", type=int, default=None, metavar="BYTES",
                   help="the MTU given to the guest (and set on the TAP); default 1500")
    n.add_argument("--poll", action="store_true",
                   help="busy-poll the rings (one core per queue pair)")
    n.add_argument("--tx-coalesce-us", type=int, default=TX_COALESCE_US, metavar="US",
                   help="TX kick coalescing: after a drain in a stream, ask the guest for "
                        "its next kick only once a quarter ring waits, and look again "
                        f"after at most US microseconds (default {TX_COALESCE_US}; 0: off)")
    n.add_argument("--no-packed", action="store_true",
                   help="do not offer VIRTIO_F_RING_PACKED (packed rings are offered by "
                        "default; the guest still chooses)")
    n.set_defaults(func=_net, check=_check_net, parser=n)

    r = _backend_parser(sub, "rng", "run a vhost-user-rng back-end",
                        "A vhost-user-rng back-end (QEMU's vhost-user-rng-pci): the guest's "
                        "virtio_rng driver gets bytes of --source.")
    r.add_argument("--source", default="/dev/urandom", metavar="PATH",
                   help="where the random bytes come from (default /dev/urandom)")
    r.add_argument("--max-bytes-per-s", type=int, metavar="N",
                   help="rate limit: at most N bytes a second (default: none)")
    r.add_argument("--poll", action="store_true", help="busy-poll the request queue")
    r.set_defaults(func=_rng, check=_check_rng, parser=r)

    c = sub.add_parser("ctl", help="ask a running back-end (started with --control PATH)",
                       description="Send a command to a back-end's control socket and print "
                                   "the answer: show (ports, connections, negotiated "
                                   "features), stats (counters), help.")
    c.add_argument("path", metavar="PATH", help="the back-end's --control socket")
    c.add_argument("command", metavar="COMMAND", help="show, stats or help")
    c.add_argument("--port", metavar="NAME", help="only this port")
    c.add_argument("--json", action="store_true", help="print the answer as JSON")
    c.add_argument("--timeout", type=float, default=5.0, metavar="SECONDS",
                   help="how long to wait for the answer (default 5)")
    c.set_defaults(func=_ctl)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``pyvirtio`` command."""
    # numpy's BLAS threads only steal cores from the benchmarks
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    args = build_parser().parse_args(argv)
    check = getattr(args, "check", None)
    if check is not None:
        check(args.parser, args)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
