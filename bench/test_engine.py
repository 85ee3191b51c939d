"""Engine micro-benchmarks: device pop+push and driver add+reclaim per batch, engine vs
the pure-Python model (same API, same memory layout)."""

import numpy as np
import pytest

from pyvirtio.bench import engine
from vqcore import ringbench

IMPLS = ["engine", "model"]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("indirect", [False, True], ids=["direct", "indirect"])
@pytest.mark.parametrize("chain_len", [1, 4])
@pytest.mark.parametrize("batch", [1, 32, 256])
def test_device_pop_push(benchmark, impl, batch, chain_len, indirect):
    mod = engine.implementation(impl)
    ring = engine.make_ring(mod, chain_len, indirect=indirect)
    engine._fill_avail_for_replay(ring, indirect)
    b = mod.ChainBatch(batch, max(batch * chain_len, 1024))
    aidx = ring.memory.array(ring.addrs.avail + 2, 1, np.uint16)
    dev = ring.device
    state = {"idx": 0}

    def one_batch():
        state["idx"] = (state["idx"] + batch) & 0xFFFF
        aidx[0] = state["idx"]
        dev.pop(b)
        dev.push_used(b)

    benchmark.group = f"device pop+push batch={batch} len={chain_len} {'indirect' if indirect else 'direct'}"
    benchmark.extra_info["chains_per_call"] = batch
    benchmark(one_batch)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("indirect", [False, True], ids=["direct", "indirect"])
@pytest.mark.parametrize("chain_len", [1, 4])
@pytest.mark.parametrize("batch", [1, 32, 256])
def test_driver_add_reclaim(benchmark, impl, batch, chain_len, indirect):
    mod = engine.implementation(impl)
    ring = engine.make_ring(mod, chain_len, chains=batch, indirect=indirect,
                            size=max(batch, chain_len) if indirect else batch * chain_len)
    out = mod.ChainBatch(batch)
    a = ring.addrs

    def one_batch():
        ring.driver.add(ring.template, indirect=indirect)
        ringbench.complete_all(ring.memory, a.avail, a.used, ring.size)
        ring.driver.reclaim(out)

    benchmark.group = f"driver add+reclaim batch={batch} len={chain_len} {'indirect' if indirect else 'direct'}"
    benchmark.extra_info["chains_per_call"] = batch
    benchmark(one_batch)


@pytest.mark.parametrize("mode", ["busy", "eventfd"])
def test_pingpong_c(benchmark, mode):
    """ringtest-shaped two-thread ping-pong (ring 256, 1-descriptor buffers) in C loops."""
    result = benchmark.pedantic(engine.pingpong_c, args=(1_000_000, mode == "eventfd"),
                                rounds=3, iterations=1)
    benchmark.extra_info["ns_per_buffer"] = result["ns_per_buffer"]
