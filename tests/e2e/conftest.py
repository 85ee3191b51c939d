"""Fixtures of the end-to-end tests: the guest image, a :class:`harness.Testbed` per
test (always closed; its logs kept under ``artifacts/e2e/<test>/`` when the test fails)
and a timing summary at the end of the run.

The tests skip, with the reason, only when ``qemu-system-x86_64`` or the guest image
cannot be had (no root, no /dev/net/tun, no apt, no package); ``.ci/run`` installs
everything they need.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Iterator

import pytest

from pyvirtio.netns import NETNS_RUN_DIR

from pyvirtio.guest import harness
from pyvirtio.guest import image as guest

REPO = Path(__file__).resolve().parents[2]
#: where the logs of a failed test go (ignored by git)
ARTIFACTS = Path(os.environ.get("VQ_E2E_ARTIFACTS", REPO / "artifacts" / "e2e"))

log = logging.getLogger("e2e")

_TIMINGS: list[dict] = []


def pytest_configure(config):
    config.addinivalue_line("markers", "e2e: boots a QEMU guest (tests/e2e)")
    config.addinivalue_line("markers", "heavy: an e2e test of more than about 30 s")


def _environment_skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root (network namespaces, TAP devices)"
    if not os.path.exists("/dev/net/tun"):
        return "/dev/net/tun does not exist"
    if harness.qemu_binary() is None:
        return "qemu-system-x86_64 is not installed (Debian package qemu-system-x86)"
    return None


@pytest.fixture(scope="session")
def guest_image() -> guest.GuestImage:
    """The cached guest image (built on first use); skips when it cannot be had."""
    reason = _environment_skip_reason()
    if reason:
        pytest.skip(reason)
    _remove_stale_namespaces()
    t0 = time.monotonic()
    try:
        image = guest.build_image()
    except guest.GuestImageUnavailable as exc:
        pytest.skip(f"guest image cannot be had: {exc}")
    seconds = time.monotonic() - t0
    accel = harness.accelerator(image)
    _TIMINGS.append({"test": "(guest image, KVM probe)", "seconds": time.monotonic() - t0,
                     "build_or_lookup": round(seconds, 2), "image": image.key,
                     "kernel": image.kernel_release, "accel": accel[0],
                     "qemu": harness.qemu_version()})
    log.info("guest image %s, %s, accelerator %s", image.key, harness.qemu_version(),
             accel[0])
    return image


@pytest.hookimpl(tryfirst=True, hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Keep each phase's report on the item (``item.rep_setup``, ``item.rep_call``)."""
    outcome = yield
    rep = outcome.get_result()
    setattr(item, f"rep_{rep.when}", rep)


def _artifact_dir(nodeid: str) -> Path:
    name = nodeid.split("::", 1)[-1]
    return ARTIFACTS / re.sub(r"[^A-Za-z0-9_.=-]+", "_", name).strip("_")


def _remove_stale_namespaces() -> None:
    """Remove ``vqe2e-<pid>-...`` namespaces whose creating process is gone and in
    which nothing runs (left by a run that was killed before its cleanup)."""
    try:
        names = os.listdir(NETNS_RUN_DIR)
    except FileNotFoundError:
        return
    for name in names:
        m = re.fullmatch(r"vqe2e-(\d+)-\w+", name)
        if not m or os.path.exists(f"/proc/{m.group(1)}"):
            continue
        pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True,
                              text=True, check=False).stdout.split()
        if pids:
            continue
        proc = subprocess.run(["ip", "netns", "del", name], capture_output=True,
                              text=True, check=False)
        if proc.returncode == 0:
            log.info("removed the stale namespace %s", name)
        else:
            log.warning("cannot remove the stale namespace %s: %s", name,
                        proc.stderr.strip())


class _Terminated(KeyboardInterrupt):
    """SIGTERM during an e2e test: unwinds like Ctrl-C, so the testbed is cleaned up."""


@contextlib.contextmanager
def _sigterm_unwinds() -> Iterator[None]:
    """While active, SIGTERM raises :class:`_Terminated` (when no one else handles it).

    Only in this process: a forked child (pyroute2 forks one to run the TAP ioctls
    inside a namespace, then SIGTERMs it) dies as by default, or it would unwind the
    copy of pytest it carries and run the test's cleanup a second time."""
    owner = os.getpid()

    def handler(signum: int, frame: object) -> None:
        if os.getpid() != owner:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        raise _Terminated(f"signal {signum}")

    previous = signal.getsignal(signal.SIGTERM)
    installed = previous == signal.SIG_DFL
    if installed:
        signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        if installed:
            signal.signal(signal.SIGTERM, previous)


@pytest.fixture
def testbed(request, guest_image, tmp_path):
    """A :class:`harness.Testbed` (namespace, backend, QEMU) closed after the test, even
    when the run is interrupted (Ctrl-C, SIGTERM); its logs are copied to
    ``artifacts/e2e/<test>/`` when the test failed."""
    t0 = time.monotonic()
    tb = harness.Testbed(guest_image, tmp_path, name=request.node.name)
    with _sigterm_unwinds():
        try:
            yield tb
        finally:
            _finish(request, tb, t0)


def _finish(request, tb: harness.Testbed, t0: float) -> None:
    """Close the testbed, keep the logs of a failure, record the timings."""
    failed = any(getattr(request.node, f"rep_{w}", None) is not None
                 and getattr(request.node, f"rep_{w}").failed
                 for w in ("setup", "call"))
    tb.close()
    dest = _artifact_dir(request.node.nodeid)
    shutil.rmtree(dest, ignore_errors=True)      # no stale logs of an earlier run
    if failed:
        kept = tb.keep_logs(dest)
        log.warning("logs of the failed test kept in %s (%d files)", dest, len(kept))
    entry = {"test": request.node.name, "seconds": time.monotonic() - t0,
             "boots": [round(q.boot_seconds, 2) for q in tb.qemus
                       if q.boot_seconds is not None],
             **{k: round(v, 2) for k, v in tb.timings.items()}}
    _TIMINGS.append(entry)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """A table of each e2e test's time and boot times (also written to
    ``artifacts/e2e/timings.json``)."""
    if not _TIMINGS:
        return
    tr = terminalreporter
    tr.section("e2e timings")
    for entry in _TIMINGS:
        extra = {k: v for k, v in entry.items() if k not in ("test", "seconds")}
        tr.write_line(f"{entry['seconds']:7.1f} s  {entry['test']}  "
                      f"{json.dumps(extra) if extra else ''}")
    boots = [b for e in _TIMINGS for b in e.get("boots", [])]
    if boots:
        tr.write_line(f"boots: {len(boots)}, min {min(boots):.2f} s, "
                      f"median {sorted(boots)[len(boots) // 2]:.2f} s, "
                      f"max {max(boots):.2f} s")
    try:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        (ARTIFACTS / "timings.json").write_text(json.dumps(_TIMINGS, indent=1) + "\n")
    except OSError:
        pass
