"""TAP datapath benchmarks (pytest-benchmark): ours against the plain C syscall loop on
the same TAP, for development comparisons (``pytest bench/test_tap.py
--benchmark-compare``). One call moves a fixed number of frames, so the times of ours
and of the baseline in one group compare directly; ``extra_info`` holds the rate counted
on the namespace side and the CPU time per frame. Numbers are recorded, never asserted.

Needs root and /dev/net/tun (a network namespace with a TAP, removed afterwards).
"""

import statistics

import pytest

from pyvirtio.bench import tap as bt

REASON = bt.skip_reason()
pytestmark = pytest.mark.skipif(REASON is not None, reason=REASON or "")

#: frames per call
TX_FRAMES = 100_000
LIVE_FRAMES = 50_000
DRAIN_FRAMES = 8_192           # per TAP queue
ROUNDS = 5

SIDES = ["ours", "baseline"]
SIZES = list(bt.FRAME_SIZES)
PAIRS = list(bt.PAIRS)


@pytest.fixture(scope="module")
def bench():
    if REASON is not None:
        pytest.skip(REASON)
    with bt.TapBench() as b:
        yield b


def _record(benchmark, samples: list[bt.Sample]) -> None:
    benchmark.extra_info["Mpps"] = statistics.median(s.pps for s in samples) / 1e6
    cpu = [s.info["cpu_ns_per_frame"] for s in samples if "cpu_ns_per_frame" in s.info]
    if cpu:
        benchmark.extra_info["cpu_ns_per_frame"] = statistics.median(cpu)


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("pairs", PAIRS)
@pytest.mark.parametrize("size", SIZES)
def test_tx(benchmark, bench, side, size, pairs):
    """TX of TX_FRAMES frames: the device fed by the guest's replay vs writev loops."""
    benchmark.group = f"TAP TX {size} B, {pairs} pair(s), {TX_FRAMES} frames"
    samples: list[bt.Sample] = []
    if side == "ours":
        with bt.Guest(bench, pairs) as guest:
            frame = bt.tx_frame(size)
            benchmark.pedantic(lambda: samples.append(guest.send(frame, TX_FRAMES)),
                               rounds=ROUNDS, iterations=1, warmup_rounds=1)
    else:
        benchmark.pedantic(lambda: samples.append(bt.tx_baseline(bench, size, pairs, TX_FRAMES)),
                           rounds=ROUNDS, iterations=1, warmup_rounds=1)
    _record(benchmark, samples)


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("pairs", PAIRS)
@pytest.mark.parametrize("size", SIZES)
def test_rx_drain(benchmark, bench, side, size, pairs):
    """RX of DRAIN_FRAMES frames per queue waiting in the TAP: the device (guest
    re-posting buffers) vs readv loops. Filling the queues is set-up, not timed."""
    benchmark.group = f"TAP RX drain {size} B, {pairs} pair(s), {DRAIN_FRAMES} frames/queue"
    bench.flows(pairs)
    samples: list[bt.Sample] = []
    guests: list[bt.Guest] = []

    def setup():
        while guests:
            guests.pop().close()
        if side == "ours":
            guests.append(bt.Guest(bench, pairs, hold_rx=True))
        else:
            bench.tap.set_active_queues(pairs)
        return (bench.fill(size, pairs, DRAIN_FRAMES),), {}

    def drain(queued: int) -> None:
        if side == "ours":
            samples.append(guests[0].drain(queued))
        else:
            samples.append(bt.readv_drain(bench, pairs, queued // pairs))

    try:
        benchmark.pedantic(drain, setup=setup, rounds=ROUNDS, iterations=1)
    finally:
        while guests:
            guests.pop().close()
    _record(benchmark, samples)


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("pairs", PAIRS)
@pytest.mark.parametrize("size", SIZES)
def test_rx_live(benchmark, bench, side, size, pairs):
    """RX while injectors in the namespace send LIVE_FRAMES frames: the device vs readv
    loops (bounded by the slower of reader and injector)."""
    benchmark.group = f"TAP RX live injector {size} B, {pairs} pair(s), {LIVE_FRAMES} frames"
    bench.flows(pairs)
    samples: list[bt.Sample] = []
    if side == "ours":
        with bt.Guest(bench, pairs) as guest:
            benchmark.pedantic(lambda: samples.append(guest.receive_live(size, LIVE_FRAMES)),
                               rounds=ROUNDS, iterations=1)
    else:
        benchmark.pedantic(
            lambda: samples.append(bt.rx_live_baseline(bench, size, pairs, LIVE_FRAMES)),
            rounds=ROUNDS, iterations=1)
    _record(benchmark, samples)
