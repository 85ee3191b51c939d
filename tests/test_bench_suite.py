"""``pyvirtio bench`` as a whole: the tiny suite end to end with its JSON validated
against the schema (no timing asserted), and the pieces of the vhost-user and guest
levels, skips, the "vs vhost-net" section and ``--plot``, without timing either."""

from __future__ import annotations

import builtins
import json
import os
import shutil
import socket
import struct
import subprocess
import sys

import nettools as nt
import pytest

from pyvirtio import cli
from pyvirtio.bench import figures as bf
from pyvirtio.bench import guest as bg
from pyvirtio.bench import plot as bp
from pyvirtio.bench import schema, suite
from pyvirtio.bench import vhost_user as bv
from pyvirtio.bench.figures import Figure
from pyvirtio.bench.suite import Settings


def _namespaces(prefix: str) -> set[str]:
    try:
        return {n for n in os.listdir("/var/run/netns") if n.startswith(prefix)}
    except FileNotFoundError:
        return set()


# ---------------------------------------------------------------------------------------
# the whole suite, tiny

def test_tiny_suite_writes_valid_json_with_every_level_or_a_reason(tmp_path):
    """Every level runs (or says why it cannot), the JSON validates, every raw sample
    is in it, and the table, the vs-vhost-net section and the skips are printed."""
    out = tmp_path / "bench.json"
    before = _namespaces("pvb")
    proc = subprocess.run([sys.executable, "-m", "pyvirtio", "bench", "--tiny", "--json",
                           str(out)], capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    schema.validate(doc)
    assert doc["settings"]["tiny"] is True
    ran = {f["level"] for f in doc["figures"]}
    skipped = {k["level"] for k in doc["skipped"] if not k["part"]}
    assert ran | skipped == set(suite.LEVELS), (ran, doc["skipped"])
    assert not [k for k in doc["skipped"] if k["reason"].startswith("FAILED")], doc["skipped"]
    for f in doc["figures"]:
        assert len(f["samples"]) >= 1 and all(x > 0 for x in f["samples"]), f["name"]
        if f["baseline"]:
            assert len(f["baseline_samples"]) == len(f["samples"]), f["name"]
    assert "vhost-user" in ran                 # its ring rate needs no root
    if os.geteuid() == 0:
        names = {f["name"] for f in doc["figures"] if f["level"] == "vhost-user"}
        assert any(n.startswith("generator -> TAP, 64 KiB TCP GSO") for n in names)
        if bv.pvp_reason() is None:         # root with iperf3 (CI installs it): PVP ran
            assert any(n.startswith("PVP TCP, 1 pair") for n in names), doc["skipped"]
        else:
            assert any(k["part"] == "PVP over TAP" for k in doc["skipped"])
    assert [r["comparison"] for r in doc["vs_vhost_net"]] == \
        [r["comparison"] for r in suite.versus_vhost_net([])]
    assert "vs vhost-net" in proc.stdout and "level" in proc.stdout
    for k in doc["skipped"]:
        assert k["reason"] in proc.stdout
    assert set(doc["seconds"]) >= ran | {"total"}
    assert _namespaces("pvb") == before


# ---------------------------------------------------------------------------------------
# the schema

def _doc() -> dict:
    f = Figure("x", "a figure", "Mpps", True, [1.0, 2.0], "base", [1.0, 1.0])
    rep = suite.Report([f], [bf.Skip("guest", "", "no QEMU")], suite.versus_vhost_net([f]),
                       {**suite.environment(), "loadavg_end": os.getloadavg()},
                       Settings(tiny=True), {"x": 1.0, "total": 1.0})
    return json.loads(json.dumps(rep.to_json()))


def test_schema_accepts_a_report_and_names_what_is_wrong():
    doc = _doc()
    assert schema.errors(doc) == []
    del doc["environment"]["loadavg"]
    doc["figures"][0]["samples"] = ["fast"]
    doc["skipped"][0].pop("reason")
    doc["schema"] = 2
    errs = schema.errors(doc)
    assert any("missing 'loadavg'" in e for e in errs)
    assert any("figures[0].samples[0]" in e for e in errs)
    assert any("skipped[0]: missing 'reason'" in e for e in errs)
    assert any(e.startswith("$.schema") for e in errs)
    with pytest.raises(schema.SchemaError):
        schema.validate(doc)
    assert schema.errors({"schema": 1}) != []


def test_schema_command(tmp_path):
    good, bad = tmp_path / "good.json", tmp_path / "bad.json"
    good.write_text(json.dumps(_doc()))
    bad.write_text(json.dumps({"schema": 1}))
    assert schema.main([str(good)]) == 0
    assert schema.main([str(bad)]) == 1
    assert schema.main([]) == 2


# ---------------------------------------------------------------------------------------
# arguments, skips, plot

def test_unknown_level_is_refused(capsys):
    with pytest.raises(ValueError, match="unknown level"):
        suite.check_levels(["engine", "warp"])
    assert suite.check_levels(["guest", "engine"]) == ["engine", "guest"]   # suite order
    assert cli.main(["bench", "--only", "warp"]) == 2


def test_only_help_names_every_level_in_suite_order(capsys):
    """``--only``'s help lists cli.BENCH_LEVELS (the CLI does not import the suite to
    start): it must be the suite's list, in its order."""
    assert list(cli.BENCH_LEVELS) == list(suite.LEVELS)
    with pytest.raises(SystemExit):
        cli.main(["bench", "--help"])
    assert " ".join(suite.LEVELS) in " ".join(capsys.readouterr().out.split())


def test_plot_without_matplotlib_says_how_to_install(monkeypatch, tmp_path, caplog):
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    with pytest.raises(bp.PlotUnavailable, match=r"pip install 'vqcore\[plot\]'"):
        bp.require_matplotlib()
    ran = []
    monkeypatch.setattr(suite, "run", lambda *a, **k: ran.append(1))
    png = tmp_path / "t.png"
    assert cli.main(["bench", "--tiny", "--only", "engine", "--plot", str(png)]) == 2
    assert not ran and not png.exists()          # refused before any benchmark ran
    assert "vqcore[plot]" in caplog.text


def test_plot_draws_the_ratios(tmp_path):
    """matplotlib comes with the [test] extra: a missing one fails here, not skips."""
    figs = [Figure("a", "up", "Mpps", True, [2.0, 3.0], "b", [1.0, 1.5]),
            Figure("a", "down", "ns", False, [2.0], "b", [1.0]),
            Figure("b", "no baseline", "Mpps", True, [1.0])]
    png = tmp_path / "p.png"
    assert bp.plot(figs, str(png)) == 2
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_ratio_range():
    f = Figure("a", "x", "Mpps", True, [2.0, 4.0], "b", [1.0, 2.0])
    assert bp.ratio_range(f) == (1.0, 4.0)
    g = Figure("a", "x", "ns", False, [2.0, 4.0], "b", [1.0, 2.0])
    assert bp.ratio_range(g) == (0.25, 1.0)
    assert bp.ratio_range(Figure("a", "x", "ns", False, [1.0])) is None


def test_skips_belong_to_their_run(monkeypatch, caplog):
    """A level that cannot run is a skip with its reason, no figures. What
    :func:`figures.skip` records goes to the innermost collecting block: a run reports
    its own skips only (not an earlier run's), and a skip outside any run is logged, not
    kept."""
    def cannot(s, progress):
        bf.skip("engine", "a part", "not here")
        raise bf.LevelSkipped("not today")

    monkeypatch.setitem(suite.LEVELS, "engine", cannot)
    first = suite.run(["engine"], Settings(tiny=True))
    second = suite.run(["engine"], Settings(tiny=True))
    for rep in (first, second):
        assert rep.figures == []
        assert [(k.level, k.part, k.reason) for k in rep.skipped] == [
            ("engine", "a part", "not here"), ("engine", "", "not today")]
    with bf.collecting_skips() as outer:
        bf.skip("x", "", "outer")
        with bf.collecting_skips() as inner:
            bf.skip("x", "", "inner")
        bf.skip("x", "", "outer again")
    assert [k.reason for k in outer] == ["outer", "outer again"]
    assert [k.reason for k in inner] == ["inner"]
    bf.skip("x", "", "nobody collects")
    assert "level x skipped: nobody collects" in caplog.text


def test_a_failing_level_is_reported_and_the_others_run(monkeypatch):
    def broken(s, progress):
        raise OSError("no such thing")

    monkeypatch.setitem(suite.LEVELS, "guest", broken)
    monkeypatch.setitem(suite.LEVELS, "engine", lambda s, p: [Figure("engine", "x", "u", True, [1.0])])
    rep = suite.run(["engine", "guest"], Settings(tiny=True))
    assert [f.name for f in rep.figures] == ["x"]
    assert rep.skipped[0].level == "guest"
    assert rep.skipped[0].reason.startswith("FAILED: OSError: no such thing")


def test_ringtest_binary_is_measured_next_to_ours(tmp_path):
    """--ringtest PATH: the binary runs with --run-cycles N, our ring size and batch (and
    --sleep for eventfd mode) and is timed; a failing one is a skip with its output."""
    fake = tmp_path / "ringtest"
    log = tmp_path / "args"
    fake.write_text(f"#!/bin/sh\necho \"$@\" >> {log}\nexit 0\n")
    fake.chmod(0o755)
    rep = suite.run(["pingpong"], Settings(tiny=True, ringtest=str(fake)))
    rows = [f for f in rep.figures if "vs ringtest" in f.name]
    assert len(rows) == 2 and all(len(f.baseline_samples) == len(f.samples) for f in rows)
    assert rows[0].baseline == "kernel ringtest ringtest"
    calls = log.read_text().splitlines()
    n = Settings(tiny=True).pingpong_buffers
    shape = f"--run-cycles {n} --ring-size {suite.PINGPONG_RING} --batch {suite.PINGPONG_BATCH}"
    assert set(calls) == {shape, shape + " --sleep"}
    fake.write_text("#!/bin/sh\necho 'unknown option' >&2\nexit 3\n")
    rep = suite.run(["pingpong"], Settings(tiny=True, ringtest=str(fake)))
    assert not [f for f in rep.figures if "vs ringtest" in f.name]
    assert [k.part for k in rep.skipped] == ["ringtest busy-poll", "ringtest eventfd+event_idx"]
    assert "unknown option" in rep.skipped[0].reason
    assert cli.main(["bench", "--only", "pingpong", "--ringtest", str(tmp_path / "none")]) == 2


def test_guest_level_skips_without_qemu(monkeypatch):
    from pyvirtio.guest import harness
    monkeypatch.setattr(harness, "qemu_binary", lambda: None)
    assert "qemu-system-x86_64 is not installed" in bg.skip_reason()
    with pytest.raises(bf.LevelSkipped, match="qemu-system-x86_64 is not installed"):
        bg.level_guest(Settings(tiny=True), lambda m: None)
    rep = suite.run(["guest"], Settings(tiny=True))
    assert rep.figures == [] and "not installed" in rep.skipped[0].reason


def test_guest_level_skips_without_root(monkeypatch):
    from pyvirtio.guest import harness
    monkeypatch.setattr(harness, "qemu_binary", lambda: "/usr/bin/qemu-system-x86_64")
    monkeypatch.setattr(bg.os, "geteuid", lambda: 1000)
    assert "needs root" in bg.skip_reason()


def test_tiny_guest_level_never_builds_an_image(monkeypatch, tmp_path):
    from pyvirtio.guest import image
    monkeypatch.setenv("VQ_E2E_CACHE", str(tmp_path))
    monkeypatch.setattr(image, "build_image", lambda *a, **k: pytest.fail("built an image"))
    with pytest.raises(bf.LevelSkipped, match="no cached guest image"):
        bg.find_image(build=False)


def test_vhost_user_without_root_runs_the_ring_rate_and_skips_the_rest(monkeypatch):
    """The ring rate needs no root; the TAP and PVP parts are skipped with the reason."""
    monkeypatch.setattr(bv.os, "geteuid", lambda: 1000)
    rep = suite.run(["vhost-user"], Settings(tiny=True))
    assert [f.name for f in rep.figures] == \
        ["ring rate: front-end -> pyvirtio net --sink --poll, 64 B, 1 pair"]
    f = rep.figures[0]
    assert len(f.samples) == len(f.baseline_samples) == Settings(tiny=True).repeats
    assert all(x > 0 for x in f.samples + f.baseline_samples)
    assert [(k.level, k.part) for k in rep.skipped] == \
        [("vhost-user", "generator -> TAP"), ("vhost-user", "PVP over TAP")]
    assert "needs root" in rep.skipped[0].reason
    assert "needs root" in suite.render_skipped(rep.skipped)


def test_a_failing_part_keeps_the_others(monkeypatch):
    monkeypatch.setattr(bv, "part_ring", lambda s, n, d, p: [Figure("vhost-user", "r", "u",
                                                                    True, [1.0])])
    monkeypatch.setattr(bv, "needs_root_reason", lambda: None)

    def broken(s, n, d, p):
        raise bv.VhostUserBenchError("TAP on fire")

    monkeypatch.setattr(bv, "part_generator", broken)
    monkeypatch.setattr(bv, "pvp_reason", lambda: "needs iperf3")
    rep = suite.run(["vhost-user"], Settings(tiny=True))
    assert [f.name for f in rep.figures] == ["r"]
    assert [(k.part, k.reason) for k in rep.skipped] == [
        ("generator -> TAP", "FAILED: VhostUserBenchError: TAP on fire"),
        ("PVP over TAP", "needs iperf3")]


def test_pvp_needs_iperf3(monkeypatch):
    monkeypatch.setattr(bv, "needs_root_reason", lambda: None)
    real = shutil.which
    monkeypatch.setattr(bv.shutil, "which", lambda n: None if n == "iperf3" else real(n))
    assert "iperf3" in bv.pvp_reason()
    monkeypatch.setattr(bv.shutil, "which", lambda n: "/usr/bin/" + n)
    assert bv.pvp_reason() is None


# ---------------------------------------------------------------------------------------
# frames and parsers

def test_gso_frame_and_header():
    frame = bv.gso_frame()
    assert len(frame) == bv.GSO_FRAME == 65549
    assert frame[:6] == bv.OTHER_MAC and frame[12:14] == b"\x08\x00"
    ip = frame[14:34]
    assert struct.unpack("!H", ip[2:4])[0] == 65535 and ip[9] == socket.IPPROTO_TCP
    assert nt.inet_checksum(ip) == 0                   # the IP header checksum holds
    flags, gso_type, hdr_len, gso_size, csum_start, csum_offset, _ = \
        struct.unpack("<BBHHHHH", bv.gso_header())
    assert (flags, gso_type, hdr_len, gso_size) == (1, 1, 54, 1448)
    assert (csum_start, csum_offset) == (34, 16)
    assert len(bv.gso_header()) == 12
    with pytest.raises(ValueError):
        bv.gso_frame(65550)
    assert bv.frame_and_header(64) == (bv.tx_frame(64), bytes(12))


def test_sizes_and_iperf3_arguments():
    assert bv.Sizes.of(True, False).iperf_seconds >= 1       # iperf3 -t 0 never ends
    assert bv.Sizes.of(False, True).pvp_repeats < bv.Sizes.of(False, False).pvp_repeats
    with pytest.raises(ValueError, match="whole seconds"):
        bv.iperf3_rate("nowhere", "10.0.0.1", 0)
    assert bg.seconds(Settings(tiny=True)) >= 1
    assert bg.rounds(Settings()) >= 5


def test_ping_and_udp_parsers():
    text = ("PING 10.0.2.15 (10.0.2.15): 56 data bytes\n"
            "64 bytes from 10.0.2.15: seq=0 ttl=64 time=0.412 ms\n"
            "64 bytes from 10.0.2.15: seq=1 ttl=64 time=1.5 ms\n"
            "round-trip min/avg/max = 0.412/0.956/1.500 ms\n")
    assert bg.ping_rtts(text) == [0.412, 1.5]
    doc = {"end": {"sum": {"packets": 1000, "lost_packets": 100, "seconds": 2.0}}}
    assert bg.udp_pps(doc) == 450.0


def test_versus_section_states_what_is_like_for_like():
    figs = [Figure("guest", "TCP host -> guest", "Gbit/s", True, [2.0], "q", [1.0]),
            Figure("guest", "ping RTT host -> guest (median of a run)", "us", False,
                   [90.0], "q", [100.0]),
            Figure("vhost-user", "PVP TCP, 1 pair (1 stream)", "Gbit/s", True, [5.0], "v",
                   [20.0])]
    rows = suite.versus_vhost_net(figs)
    by = {r["comparison"]: r for r in rows}
    for r in rows:
        assert r["like_for_like"].split(":")[0] in ("no", "partly", "yes")
        assert r["published"]
    assert "2.00x" in by["speed-up over QEMU's userspace virtio-net"]["ours"]
    assert "10% lower" in by["latency (ping RTT) vs userspace"]["ours"]
    assert "TCG" in by["guest TCP throughput, host -> guest"]["like_for_like"]
    assert "16" in by["PVP TCP, 1 queue pair (host only, no guest)"]["published"]
    text = suite.render_versus(rows)
    assert "7-8 Gbit/s" in text and "like for like?" in text
    empty = suite.versus_vhost_net([])
    assert all(r["ours"] == "not measured in this run" for r in empty)


# ---------------------------------------------------------------------------------------
# the pieces against real back-ends

@nt.needs_tap
def test_generator_counts_agree_with_the_tap(tmp_path):
    """The generator's frames (GSO included) reach the TAP whole: the namespace counts
    as many frames as the back-end used, of the right size."""
    with nt.namespace("pvbvt") as ns:
        with bv.Tap.create(bv.TAP_NAME, 1, netns=ns):
            be = bv.BackendProcess(str(tmp_path), "t", ["--tap", bv.TAP_NAME, "--netns",
                                                       ns.name])
            try:
                for size in (64, bv.GSO_FRAME):
                    frame, header = bv.frame_and_header(size)
                    gso = size == bv.GSO_FRAME
                    marks = []
                    with bv.frontend(be.path, 1, queue_size=bv.GSO_QUEUE_SIZE,
                                     tx_buffer=bv.GSO_SLOT if gso else bv.SMALL_SLOT) as fe:
                        g = bv.generate(fe, frame, header, 600 if gso else 3000,
                                        mark=lambda: marks.append(
                                            bv.link_counters(ns.name, bv.TAP_NAME)))
                        c1 = bv.link_counters(ns.name, bv.TAP_NAME)
                    assert g.frames >= (600 if gso else 3000)
                    assert c1["rx_packets"] - marks[0]["rx_packets"] == g.frames
                    assert c1["rx_bytes"] - marks[0]["rx_bytes"] == g.frames * size
            finally:
                be.stop()
            assert be.proc.returncode == 0, be.tail()


@nt.needs_tap
@pytest.mark.skipif(shutil.which("iperf3") is None,
                    reason="iperf3 is not installed (Debian package iperf3; .ci/run installs it)")
def test_iperf3_server_idle_only_once_every_client_is_gone(tmp_path):
    """PVP waits for iperf3's server to be idle before tearing the forwarded path down
    (else the server's last test is stranded and the next client hears "the server is
    busy"): a connected client, and a closed one the server has not closed yet, both
    count as busy."""
    from pyvirtio.netns import socket_in
    with nt.namespace("pvbvi") as ns:
        server = bv.Iperf3Server(ns.name, log_path=tmp_path / "iperf3.log")
        try:
            assert server.wait_idle(0.5)
            client = socket_in(ns.name)
            try:
                client.connect(("127.0.0.1", bv.IPERF_PORT))
                assert not server.wait_idle(0.3)       # a client: busy
            finally:
                client.close()
            assert server.wait_idle(5.0)               # the server ends the aborted test
        finally:
            server.stop()


def test_a_hung_ringtest_is_an_error_its_caller_skips(tmp_path):
    """ringtest_ns turns a timeout into the RuntimeError level_pingpong reports as a
    skip (a subprocess.TimeoutExpired would fail the whole level)."""
    fake = tmp_path / "ringtest"
    fake.write_text("#!/bin/sh\nexec sleep 30\n")
    fake.chmod(0o755)
    with pytest.raises(RuntimeError, match="did not end within 0.2 s"):
        suite.ringtest_ns(str(fake), 10, False, timeout=0.2)
