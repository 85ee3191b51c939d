"""Engine-level workloads: the split ring's device and driver sides, and the ping-pong.

Each workload runs on the Cython engine (``vqcore``) or on the pure-Python model
(``vqcore.model``) through the same per-batch API, so every figure can be given as a
ratio measured in the same run. The other side of the ring is replaced by the cheapest
possible stand-in (an index bump for the device benchmark, a bare avail-to-used copy
for the driver benchmark) so each figure is one side's work.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from types import ModuleType

import numpy as np

import vqcore
from vqcore import ringbench

RING_BASE = 0x10000
DATA_BASE = 0x400000
BUF_SIZE = 64


def implementation(name: str) -> ModuleType:
    """``"engine"`` -> the vqcore module, ``"model"`` -> vqcore.model."""
    if name == "engine":
        return vqcore
    if name == "model":
        from vqcore import model
        return model
    raise ValueError(f"unknown implementation {name!r}")


@dataclass
class Ring:
    """One ring in a fresh guest memory, with both sides and a driver template batch."""
    impl: ModuleType
    memory: vqcore.GuestMemory
    size: int
    addrs: vqcore.SplitAddresses
    driver: object
    device: object
    template: object
    chains: int


def make_ring(impl: ModuleType, chain_len: int, chains: int = 256, *, indirect: bool = False,
              event_idx: bool = False, size: int | None = None) -> Ring:
    """A ring holding ``chains`` chains of ``chain_len`` 64-byte readable segments."""
    if size is None:
        size = chains if indirect else chains * chain_len
    buf = np.zeros(DATA_BASE + chains * chain_len * BUF_SIZE + (1 << 16), np.uint8)
    mem = vqcore.GuestMemory([(0, buf)])
    addrs = vqcore.split_addresses(RING_BASE, size)
    ind_addr = (addrs.end + 15) // 16 * 16
    ind_kw = {"indirect_addr": ind_addr, "indirect_max": chain_len} if indirect else {}
    assert ind_addr + size * chain_len * 16 < DATA_BASE
    driver = impl.SplitDriverQueue(mem, size, addrs.desc, addrs.avail, addrs.used,
                                   event_idx=event_idx, **ind_kw)
    device = impl.SplitDeviceQueue(mem, size, addrs.desc, addrs.avail, addrs.used,
                                   event_idx=event_idx)
    nseg = chains * chain_len
    template = impl.ChainBatch(chains, max(nseg, 1024))
    template.load(DATA_BASE + np.arange(nseg, dtype=np.uint64) * BUF_SIZE,
                  np.full(nseg, BUF_SIZE), np.full(chains, chain_len), np.full(chains, chain_len),
                  np.arange(chains))
    return Ring(impl, mem, size, addrs, driver, device, template, chains)


def _fill_avail_for_replay(ring: Ring, indirect: bool) -> None:
    """Add the template once and repeat its heads over every avail slot, so that the
    device can be fed by bumping avail->idx alone."""
    added = ring.driver.add(ring.template, indirect=indirect)
    assert added == ring.chains, (added, ring.chains)
    ring_slots = ring.memory.array(ring.addrs.avail + 4, ring.size, np.uint16)
    heads = ring_slots[:ring.chains].copy()
    ring_slots[:] = np.resize(heads, ring.size)
    ring.memory.array(ring.addrs.avail, 2, np.uint16)[1] = 0


def device_rate(impl: ModuleType, batch: int, chain_len: int, indirect: bool,
                seconds: float = 0.2, max_chains: int = 10_000_000) -> float:
    """Device pop + push_used through the per-batch API: chains per second."""
    ring = make_ring(impl, chain_len, indirect=indirect)
    _fill_avail_for_replay(ring, indirect)
    dev = ring.device
    b = impl.ChainBatch(batch, max(batch * chain_len, 1024))
    aidx = ring.memory.array(ring.addrs.avail + 2, 1, np.uint16)
    done = 0
    idx = 0
    iters = max(1, 64 // batch) if impl is not vqcore else max(1, 4096 // batch)
    t0 = time.perf_counter()
    deadline = t0 + seconds
    while True:
        for _ in range(iters):
            idx = (idx + batch) & 0xFFFF
            aidx[0] = idx
            dev.pop(b)
            dev.push_used(b)
        done += iters * batch
        now = time.perf_counter()
        if now >= deadline or done >= max_chains:
            break
    return done / (now - t0)


def device_rate_c(batch: int, chain_len: int, indirect: bool, chains: int = 2_000_000) -> float:
    """The same device work as :func:`device_rate` in a plain C loop: chains/s."""
    ring = make_ring(vqcore, chain_len, indirect=indirect)
    _fill_avail_for_replay(ring, indirect)
    b = vqcore.ChainBatch(batch, max(batch * chain_len, 1024))
    iters = max(1, chains // batch)
    secs = ringbench.device_loop(ring.device, b, iters, batch)
    return iters * batch / secs


def driver_rate(impl: ModuleType, batch: int, chain_len: int, indirect: bool,
                seconds: float = 0.2, max_chains: int = 10_000_000) -> float:
    """Driver add + reclaim through the per-batch API: chains per second."""
    ring = make_ring(impl, chain_len, chains=max(batch, 1), indirect=indirect,
                     size=max(batch, chain_len) if indirect else batch * chain_len)
    drv = ring.driver
    out = impl.ChainBatch(batch)
    mem, a = ring.memory, ring.addrs
    done = 0
    iters = max(1, 64 // batch) if impl is not vqcore else max(1, 4096 // batch)
    t0 = time.perf_counter()
    deadline = t0 + seconds
    while True:
        for _ in range(iters):
            drv.add(ring.template, indirect=indirect)
            ringbench.complete_all(mem, a.avail, a.used, ring.size)
            drv.reclaim(out)
        done += iters * batch
        now = time.perf_counter()
        if now >= deadline or done >= max_chains:
            break
    return done / (now - t0)


def pingpong_c(buffers: int, eventfd: bool, batch: int = 64, size: int = 256) -> dict:
    """The ringtest-shaped ping-pong in C threads over the engine: ns per buffer."""
    ring = make_ring(vqcore, 1, chains=size, event_idx=eventfd)
    return ringbench.pingpong(ring.driver, ring.device, ring.template, buffers,
                              batch=batch, eventfd=eventfd)


def pingpong_python(impl: ModuleType, buffers: int, eventfd: bool, batch: int = 64,
                    size: int = 256, timeout: float = 60.0) -> dict:
    """The same ping-pong with each side a Python thread calling the per-batch API."""
    import os
    import select
    import threading

    ring = make_ring(impl, 1, chains=size, event_idx=eventfd)
    drv, dev = ring.driver, ring.device
    kick = os.eventfd(0, os.EFD_NONBLOCK) if eventfd else -1
    call = os.eventfd(0, os.EFD_NONBLOCK) if eventfd else -1
    tmpl = impl.ChainBatch(batch)
    n = batch
    tmpl.load(DATA_BASE + np.arange(n, dtype=np.uint64) * BUF_SIZE, np.full(n, BUF_SIZE),
              np.ones(n), np.ones(n), np.arange(n))
    errors: list[BaseException] = []
    deadline = time.monotonic() + timeout

    def wait(fd: int) -> None:
        select.select([fd], [], [], 0.2)
        try:
            os.read(fd, 8)
        except BlockingIOError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError("ping-pong timed out")

    def driver_side() -> None:
        try:
            started = completed = 0
            rb = impl.ChainBatch(size)
            while completed < buffers:
                added = 0
                if drv.num_free >= batch and started < buffers:
                    added = drv.add(tmpl)
                    started += added
                    if eventfd and drv.kick_needed():
                        os.eventfd_write(kick, 1)
                r = drv.reclaim(rb)
                completed += r
                if r == 0 and added == 0:
                    if eventfd:
                        if not drv.enable_interrupts():
                            wait(call)
                        drv.disable_interrupts()
                    elif time.monotonic() > deadline:
                        raise TimeoutError("ping-pong timed out")
        except BaseException as exc:  # reported by the caller
            errors.append(exc)

    def device_side() -> None:
        try:
            processed = 0
            b = impl.ChainBatch(size)
            while processed < buffers:
                got = dev.pop(b)
                if got:
                    dev.push_used(b)
                    processed += got
                    if eventfd and dev.needs_notification():
                        os.eventfd_write(call, 1)
                    continue
                if eventfd:
                    if not dev.enable_notification():
                        wait(kick)
                    dev.disable_notification()
                elif time.monotonic() > deadline:
                    raise TimeoutError("ping-pong timed out")
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=device_side), threading.Thread(target=driver_side)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout + 5)
    secs = time.perf_counter() - t0
    if eventfd:
        os.close(kick)
        os.close(call)
    if errors:
        raise errors[0]
    return {"buffers": buffers, "seconds": secs, "ns_per_buffer": secs * 1e9 / buffers}


def make_ring_layout(layout: str, chain_len: int, chains: int, *, indirect: bool = False,
                     event_idx: bool = False, size: int | None = None,
                     impl: ModuleType | None = None) -> Ring:
    """Like :func:`make_ring` for either layout ("split" or "packed") of the engine, or
    of a model module with the matching classes (``impl``)."""
    features = (vqcore.VIRTIO_F_RING_PACKED if layout == "packed" else 0) | (
        vqcore.VIRTIO_RING_F_EVENT_IDX if event_idx else 0)
    if size is None:
        size = chains if indirect else chains * chain_len
    buf = np.zeros(DATA_BASE + chains * chain_len * BUF_SIZE + (1 << 16), np.uint8)
    mem = vqcore.GuestMemory([(0, buf)])
    addrs = vqcore.ring_addresses(RING_BASE, size, features)
    ind_addr = (addrs.end + 15) // 16 * 16
    ind_kw = {"indirect_addr": ind_addr, "indirect_max": chain_len} if indirect else {}
    if impl is None:
        driver = vqcore.driver_queue(mem, size, *addrs[:3], features=features, **ind_kw)
        device = vqcore.device_queue(mem, size, *addrs[:3], features=features)
        batch_cls = vqcore.ChainBatch
    else:
        prefix = "Packed" if layout == "packed" else "Split"
        driver = getattr(impl, prefix + "DriverQueue")(mem, size, *addrs[:3], event_idx=event_idx,
                                                        **ind_kw)
        device = getattr(impl, prefix + "DeviceQueue")(mem, size, *addrs[:3], event_idx=event_idx)
        batch_cls = impl.ChainBatch
    nseg = chains * chain_len
    template = batch_cls(chains, max(nseg, 1024))
    template.load(DATA_BASE + np.arange(nseg, dtype=np.uint64) * BUF_SIZE,
                  np.full(nseg, BUF_SIZE), np.full(chains, chain_len), np.full(chains, chain_len),
                  np.arange(chains))
    return Ring(impl or vqcore, mem, size, addrs, driver, device, template, chains)


def roundtrip_rate(layout: str, batch: int, chain_len: int, indirect: bool,
                   seconds: float = 0.2, impl: ModuleType | None = None) -> float:
    """One thread doing both sides through the per-batch API — driver add, device pop,
    device push, driver reclaim — chains per second."""
    ring = make_ring_layout(layout, chain_len, batch, indirect=indirect,
                            size=max(batch, chain_len) if indirect else batch * chain_len,
                            impl=impl)
    cls = (impl or vqcore).ChainBatch
    b, out = cls(batch, max(batch * chain_len, 1024)), cls(batch)
    drv, dev, tmpl = ring.driver, ring.device, ring.template
    iters = max(1, (64 if impl is not None else 2048) // batch)
    done = 0
    t0 = time.perf_counter()
    deadline = t0 + seconds
    while True:
        for _ in range(iters):
            drv.add(tmpl, indirect=indirect)
            dev.pop(b)
            dev.push_used(b)
            drv.reclaim(out)
        done += iters * batch
        now = time.perf_counter()
        if now >= deadline:
            break
    return done / (now - t0)


def pingpong_layout(layout: str, buffers: int, eventfd: bool, batch: int = 64,
                    size: int = 256) -> dict:
    """The ringtest-shaped ping-pong in C threads, split or packed layout."""
    ring = make_ring_layout(layout, 1, size, event_idx=eventfd)
    return ringbench.pingpong(ring.driver, ring.device, ring.template, buffers,
                              batch=batch, eventfd=eventfd)
