"""The TAP datapath level of ``pyvirtio bench`` (pyvirtio.bench.tap) and the guest's
load-generation fast path it rests on (NetDriver.replay_*).

No timing is asserted: the tests check that the frames really go through the TAP (the
namespace's counters, an AF_PACKET socket, the guest's buffers), that every figure is
there with positive samples, that the JSON of the command holds them, and that the
benchmark leaves no namespace behind. Each test works in namespaces it creates itself.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import pytest

import nettools as nt
from pyvirtio import netns
from pyvirtio.bench import tap as bt
from pyvirtio.bench.figures import LevelSkipped
from pyvirtio.bench.suite import LEVELS, Settings, run
from pyvirtio.net.driver import NetDriverError

#: every row the level reports for one (size, pairs)
ROWS = ("TX {w}", "TX {w}, CPU per frame", "RX {w}, live injector", "RX {w}, drain",
        "RX {w}, drain, CPU per frame")


def _what(size: int, pairs: int) -> str:
    return f"{size} B, {pairs} pair{'s' if pairs > 1 else ''}"


def _bench_namespaces() -> set[str]:
    try:
        names = os.listdir(netns.NETNS_RUN_DIR)
    except FileNotFoundError:
        return set()
    return {n for n in names if n.startswith(f"pvbench-{os.getpid()}-")}


@pytest.fixture
def bench():
    with bt.TapBench() as b:
        yield b


def test_level_is_registered():
    assert LEVELS["tap"] is bt.level_tap


def test_level_skips_without_root(monkeypatch, caplog):
    monkeypatch.setattr(bt.os, "geteuid", lambda: 1000)
    with pytest.raises(LevelSkipped, match="needs root"):
        bt.level_tap(Settings(tiny=True), lambda msg: None)
    with caplog.at_level(logging.WARNING, logger="pyvirtio.bench"):
        rep = run(["tap"], Settings(tiny=True))
    assert rep.figures == []
    assert [(k.level, k.part) for k in rep.skipped] == [("tap", "")]
    assert rep.skipped[0].reason.startswith("needs root")
    assert "level tap skipped: needs root" in caplog.text


def test_frames_have_the_sizes_measured():
    for size in bt.FRAME_SIZES:
        assert len(bt.tx_frame(size)) == size
        frame = bt.rx_frame(size, 40000)
        assert len(frame) == size
        parsed = nt.parse_udp_frame(frame)
        assert parsed is not None and parsed.ip_checksum_ok
        assert (parsed.dst_ip, parsed.sport) == (bt.GUEST_IP, 40000)
    with pytest.raises(ValueError):
        bt.rx_frame(41, 1)


@nt.needs_tap
def test_level_tiny_yields_every_figure_and_cleans_up():
    messages: list[str] = []
    before = _bench_namespaces()
    figures = bt.level_tap(Settings(tiny=True), messages.append)
    by_name: dict[str, list] = {}
    for f in figures:
        by_name.setdefault(f.name, []).append(f)
    for size in bt.FRAME_SIZES:
        for pairs in bt.PAIRS:
            for row in ROWS:
                name = row.format(w=_what(size, pairs))
                assert name in by_name, name
                units = sorted(f.unit for f in by_name[name])
                assert units == (["ns"] if "CPU" in name else ["Gbit/s", "Mpps"]), name
    for f in figures:
        assert f.level == "tap"
        assert len(f.samples) == len(f.baseline_samples) == Settings(tiny=True).repeats
        assert f.ours is not None and f.ours[0] > 0, f.name
        assert f.base is not None and f.base[0] > 0, f.name
        assert f.ratio is not None and f.ratio > 0
        assert f.baseline
    # Gbit/s is the same samples as Mpps times the frame size
    tx = {f.unit: f for f in by_name[f"TX {_what(1500, 1)}"]}
    assert tx["Gbit/s"].samples == pytest.approx(
        [m * 1500 * 8 / 1000 for m in tx["Mpps"].samples])
    assert len(messages) == len(bt.FRAME_SIZES) * len(bt.PAIRS) * Settings(tiny=True).repeats
    assert _bench_namespaces() == before


@nt.needs_tap
def test_bench_command_writes_the_figures_as_json(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "pyvirtio", "bench", "--tiny", "--only", "tap",
                           "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["settings"]["tiny"] is True
    figures = data["figures"]
    names = {f["name"] for f in figures}
    for size in bt.FRAME_SIZES:
        for pairs in bt.PAIRS:
            for row in ROWS:
                assert row.format(w=_what(size, pairs)) in names
    for f in figures:
        assert f["level"] == "tap"
        assert f["median"] > 0 and f["baseline_median"] > 0, f["name"]
        assert f["samples"] and f["baseline_samples"]
    assert f"TX {_what(64, 1)}" in proc.stdout      # the table was printed


# ---------------------------------------------------------------------------------------
# the pieces: real frames through the TAP, counted in the namespace

@nt.needs_tap
def test_tx_replay_frames_reach_the_namespace_byte_exact(bench):
    frame = bt.tx_frame(200)
    with nt.PacketSocket(bench.ns, bt.TAP_NAME, nt.ETH_P_EXPERIMENTAL) as sock, \
            bt.Guest(bench, 1) as g:
        sample = g.send(frame, 3000)
        sent = g.stats("tx")["packets"]
        got = sock.recv_many(20, timeout=1.0)
    assert sent >= 3000
    assert sample.frames == sent                 # the TAP counted every frame
    assert sample.seconds > 0 and sample.info["cpu_ns_per_frame"] > 0
    assert got and all(f == frame for f in got)


@nt.needs_tap
def test_tx_baseline_counts_what_it_wrote(bench):
    sample = bt.tx_baseline(bench, 64, 1, 2000)
    assert sample.frames == 2000
    assert sample.info["cpu_ns_per_frame"] > 0


@nt.needs_tap
@pytest.mark.parametrize("pairs", [1, 2])
def test_flows_land_on_their_queue(bench, pairs):
    sports = bench.flows(pairs)
    assert len(set(sports)) == pairs
    bench.tap.set_active_queues(pairs)
    with bench.injector() as sock:
        for q, sport in enumerate(sports):
            sock.send(bt.rx_frame(64, sport))
            got = nt.tap_read(bench.tap.fds[:pairs], timeout=2.0)
            assert got is not None and got[0] == q


@nt.needs_tap
@pytest.mark.parametrize("pairs", [1, 2])
def test_rx_drain_delivers_every_queued_frame_into_guest_buffers(bench, pairs):
    with bt.Guest(bench, pairs, hold_rx=True) as g:
        queued = bench.fill(1500, pairs, 700)
        assert queued == 700 * pairs
        c0 = bench.counters()
        received, info = g.receive(lambda n: n >= queued)
        c1 = bench.counters()
        assert received == queued
        assert c1["tx_packets"] - c0["tx_packets"] == queued
        assert info["no_room"] == 0 and info["errors"] == 0
        # the last frame of pair 0 sits in its buffer behind the virtio-net header
        rx = g.driver.rx[0]
        last = (received // pairs - 1) % rx.slots
        data = g.memory.read(rx.slot(last), 12 + 1500)
        assert data[12:] == bt.rx_frame(1500, bench.flows(pairs)[0])
        assert int.from_bytes(data[10:12], "little") == 1      # num_buffers


@nt.needs_tap
def test_rx_live_and_drain_samples(bench):
    for sample in (bt.rx_live_ours(bench, 64, 1, 2000), bt.rx_live_baseline(bench, 64, 1, 2000),
                   bt.rx_drain_ours(bench, 64, 1, 500), bt.rx_drain_baseline(bench, 64, 1, 500)):
        assert sample.frames > 0 and sample.seconds > 0
    drained = bt.rx_drain_baseline(bench, 64, 1, 500)
    assert drained.frames == 500


@nt.needs_tap
def test_replay_refuses_what_it_cannot_do(bench):
    with bt.Guest(bench, 1) as g:
        drv = g.driver
        with pytest.raises(ValueError, match="does not divide"):
            drv.replay_start(1, bt.tx_frame(64), chunk=3)
        with pytest.raises(ValueError, match="needs a frame"):
            drv.replay_start(1)
        with pytest.raises(ValueError, match="exceeds"):
            drv.replay_start(1, bytes(bt.TX_SLOT))
        with pytest.raises(NetDriverError, match="replay_start"):
            drv.replay(1)
        drv.send(0, [bt.tx_frame(64)])                 # a frame in flight: not idle
        with pytest.raises(NetDriverError, match="idle"):
            drv.replay_start(1, bt.tx_frame(64))
        assert drv.wait_tx_done(0)
        drv.replay_start(1, bt.tx_frame(64))
        assert drv.replay_stop(1)
        assert sorted(drv.tx[0].free) == list(range(drv.tx[0].slots))


@nt.needs_tap
def test_replay_detects_out_of_order_use(bench):
    with bt.Guest(bench, 1) as g:
        drv = g.driver
        drv.replay_start(1, bt.tx_frame(64))
        r = drv.tx[0].replay
        r.next_back = 5                  # pretend the device skipped chains
        drv.replay(1)
        deadline = 100
        with pytest.raises(NetDriverError, match="out of order"):
            while deadline:
                drv.replay(1, refill=False)
                g._wait("tx", 0.05)
                deadline -= 1


# ---------------------------------------------------------------------------------------
# the RX pop bound the benchmark led to (pyvirtio.runtime.RX_POP): a ring larger than
# the bound is not walked whole every burst, yet a guest whose small buffers only the
# whole ring can fill with a largest frame still gets its frames

@nt.needs_tap
@pytest.mark.parametrize("rx_buffer", [128, 1536])
def test_rx_pop_bound_falls_back_to_the_whole_ring(rx_buffer):
    import numpy as np

    import vqcore
    from pyvirtio import runtime
    from pyvirtio.net.device import NetDevice
    from pyvirtio.net.driver import NetDriver

    size = 2 * runtime.RX_POP                # 512 buffers: more than one bounded pop
    frame = nt.udp_frame_of_size(300, dst_mac=nt.GUEST_MAC, src_mac=nt.HOST_MAC)
    with nt.tap_namespace(1) as (ns, tap), nt.PacketSocket(ns, tap.name) as sock:
        memory = vqcore.GuestMemory([(0, np.zeros(size * (rx_buffer + 2048) + (8 << 20),
                                                   np.uint8))])
        with NetDevice(tap, mac=nt.GUEST_MAC, queue_size=size) as device:
            driver = NetDriver(memory, queue_size=size, rx_buffer=rx_buffer, tx_buffer=2048)
            features = driver.attach(device)      # guest GSO offloads: 64 KiB frames
            assert features & bt.NetFeature.MRG_RXBUF and features & bt.NetFeature.GUEST_TSO4
            # 256 buffers of 128 bytes cannot hold a 64 KiB frame, 512 (all) can
            for _ in range(3):
                sock.send(frame)
            got = driver.recv(0, timeout=3.0, max_frames=3)
            stats = device.pair_stats()[0]["rx"]
    assert [f for _, f in got] == [frame] * 3
    assert stats["packets"] == 3
