"""ChainBatch.load, the array way to fill a driver batch: the same batch as append
(engine and model), and every bad input refused before the batch is touched."""

import numpy as np
import pytest

import vqcore
import vqcore.model
from vqcore.errors import BatchTooSmall, InvalidChain

IMPLS = {"engine": vqcore, "model": vqcore.model}


def random_chains(rng, n):
    """``n`` chains of 1-5 segments, a random number of them readable."""
    chains = []
    for i in range(n):
        segs = [(int(rng.integers(0, 1 << 40)), int(rng.integers(0, 1 << 16)))
                for _ in range(int(rng.integers(1, 6)))]
        r = int(rng.integers(0, len(segs) + 1))
        chains.append((segs[:r], segs[r:], int(rng.integers(0, 1 << 63))))
    return chains


def as_arrays(chains):
    addr = [a for rd, wr, _ in chains for a, _ in rd + wr]
    ln = [n for rd, wr, _ in chains for _, n in rd + wr]
    return (addr, ln, [len(rd) + len(wr) for rd, wr, _ in chains],
            [len(rd) for rd, _, _ in chains], [t for _, _, t in chains])


def content(b):
    return [b.chain(i) for i in range(len(b))]


@pytest.mark.parametrize("which", sorted(IMPLS))
@pytest.mark.parametrize("seed", range(5))
def test_load_builds_the_batch_append_builds(which, seed):
    impl = IMPLS[which]
    rng = np.random.default_rng(seed)
    chains = random_chains(rng, int(rng.integers(0, 40)))
    appended = impl.ChainBatch(64, 256)
    for rd, wr, tok in chains:
        appended.append(readable=rd, writable=wr, token=tok)
    loaded = impl.ChainBatch(64, 256)
    loaded.append(readable=[(1, 1)], token=5)        # whatever it held is replaced
    loaded.load(*as_arrays(chains))
    assert len(loaded) == len(chains)
    assert content(loaded) == content(appended)


@pytest.mark.parametrize("which", sorted(IMPLS))
@pytest.mark.parametrize("args, exc", [
    (([1, 2], [8], [2], [0], [0]), ValueError),                       # lengths differ
    (([1, 2], [8, 8], [1], [0], [0]), ValueError),                    # counts != segments
    (([1] * 9, [8] * 9, [9], [0], [0]), BatchTooSmall),               # 9 segments > 8
    (([1, 2], [8, 8], [2, 0], [0, 0], [0, 1]), InvalidChain),         # an empty chain
    (([1, 2], [8, 8], [2], [3], [0]), InvalidChain),                  # 3 readable of 2
    (([1, 2], [1 << 31, 1 << 31], [2], [2], [0]), InvalidChain),      # 2**32 readable
    (([1, 2], [1 << 31, 1 << 31], [2], [0], [0]), InvalidChain),      # 2**32 writable
    (([0, 0], [1, (1 << 64) - 1], [2], [2], [0]), InvalidChain),      # sum wraps 64 bits
], ids=["lengths", "count-sum", "too-big", "empty-chain", "readable-over", "long-readable",
        "long-writable", "wrapping-sum"])
def test_load_refuses_bad_input_and_keeps_the_batch(which, args, exc):
    impl = IMPLS[which]
    b = impl.ChainBatch(4, 8)
    b.append(readable=[(0x1000, 10)], writable=[(0x2000, 20)], token=42)
    before = content(b)
    with pytest.raises(exc):
        b.load(*args)
    assert content(b) == before


def test_load_accepts_a_chain_of_exactly_2_32_minus_1_bytes():
    b = vqcore.ChainBatch(1, 2)
    b.load([0, 1 << 32], [(1 << 31), (1 << 31) - 1], [2], [0], [7])
    assert b.chain(0).writable == (1 << 32) - 1
