"""Fixtures of the end-to-end tests: the guest image, a :class:`harness.Testbed` per
test (always closed; its logs kept under ``artifacts/e2e/<test>/`` when the test fails)
and a timing summary at the end of the run.

The tests skip, with the reason, only when ``qemu-system-x86_64`` or the guest image
cannot be had (no root, no /dev/net/tun, no apt, no package); ``.ci/run`` installs
everything they need.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from pathlib import Path

import pytest

import guest
import harness

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
    t0 = time.monotonic()
    try:
        image = guest.build_image()
    except guest.GuestImageUnavailable as exc:
        pytest.skip(f"guest image cannot be had: {exc}")
    _TIMINGS.append({"test": "(guest image)", "seconds": time.monotonic() - t0})
    accel = harness.accelerator(image)
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


@pytest.fixture
def testbed(request, guest_image, tmp_path):
    """A :class:`harness.Testbed` (namespace, backend, QEMU) closed after the test; its
    logs are copied to ``artifacts/e2e/<test>/`` when the test failed."""
    t0 = time.monotonic()
    tb = harness.Testbed(guest_image, tmp_path, name=request.node.name)
    try:
        yield tb
    finally:
        failed = any(getattr(request.node, f"rep_{w}", None) is not None
                     and getattr(request.node, f"rep_{w}").failed
                     for w in ("setup", "call"))
        tb.close()
        if failed:
            dest = _artifact_dir(request.node.nodeid)
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
