"""ChainBatch: a reusable batch of descriptor chains.

A device queue's ``pop`` fills it (head ids, segments pointing into guest memory,
readable and writable byte totals); ``push_used`` then takes each chain's
``used_len``. A driver queue's ``add`` consumes one (segments as guest address and
length, readable first, and a token per chain) and ``reclaim`` fills one with the
head, token and used length of each completed chain.

Every per-chain and per-segment field is also a zero-copy numpy view, so a caller works
on a whole batch at once instead of per descriptor.
"""

from collections import namedtuple

import numpy as np

from libc.stdint cimport uint32_t, uint64_t, uintptr_t

from vqcore.errors import BatchTooSmall, InvalidChain
from vqcore.memory cimport GuestMemory

Chain = namedtuple("Chain", "head segments readable writable token used_len")
Chain.__doc__ = ("One chain of a batch: head id, segments as (gpa, length, writable), "
                 "readable and writable byte totals, token, used length.")


cdef inline bint _chain_bytes(const uint64_t[::1] ln, Py_ssize_t pos, uint32_t n,
                              uint32_t nread, uint64_t *rb, uint64_t *wb) noexcept nogil:
    """Readable (the first ``nread``) and writable bytes of the ``n`` segments from
    ``pos``; False as soon as one segment or either sum passes 2**32-1 (a chain's length
    is 32 bits; checking each segment first keeps the 64-bit sums from wrapping)."""
    cdef Py_ssize_t k
    rb[0] = wb[0] = 0
    for k in range(n):
        if ln[pos + k] > 0xFFFFFFFFu:
            return False
        if <uint32_t>k < nread:
            rb[0] += ln[pos + k]
        else:
            wb[0] += ln[pos + k]
        if rb[0] > 0xFFFFFFFFu or wb[0] > 0xFFFFFFFFu:
            return False
    return True


cdef inline void *_ptr(object arr):
    # the arrays are owned by the batch and never resized: their data pointer is stable
    return <void *><uintptr_t>arr.ctypes.data


cdef class ChainBatch:
    """A batch of up to ``max_chains`` chains holding up to ``max_segments`` segments.

    ``max_segments`` defaults to ``4 * max_chains`` (at least 1024). A device ``pop``
    never splits a chain: one that does not fit waits for the next pop, and one that
    cannot fit even into an empty batch raises :class:`BatchTooSmall`.
    """

    def __cinit__(self, unsigned int max_chains=256, max_segments=None):
        if max_chains == 0 or max_chains > 65536:
            raise ValueError("max_chains must be 1..65536")
        cdef unsigned long nseg = max(4 * max_chains, 1024) if max_segments is None else max_segments
        if nseg == 0 or nseg > (1 << 24):
            raise ValueError("max_segments must be 1..2**24")
        self._head = np.zeros(max_chains, np.uint16)
        self._seg_start = np.zeros(max_chains + 1, np.uint32)
        self._nread = np.zeros(max_chains, np.uint32)
        self._rbytes = np.zeros(max_chains, np.uint32)
        self._wbytes = np.zeros(max_chains, np.uint32)
        self._used_len = np.zeros(max_chains, np.uint32)
        self._ndesc = np.zeros(max_chains, np.uint16)
        self._token = np.zeros(max_chains, np.uint64)
        self._seg_gpa = np.zeros(nseg, np.uint64)
        self._iov = np.zeros((nseg, 2), np.uint64)      # struct iovec {base, len}
        assert sizeof(iovec) == 16
        self.b.count = 0
        self.b.nseg = 0
        self.b.max_chains = max_chains
        self.b.max_segs = nseg
        self.b.head = <uint16_t *>_ptr(self._head)
        self.b.seg_start = <uint32_t *>_ptr(self._seg_start)
        self.b.nread = <uint32_t *>_ptr(self._nread)
        self.b.rbytes = <uint32_t *>_ptr(self._rbytes)
        self.b.wbytes = <uint32_t *>_ptr(self._wbytes)
        self.b.used_len = <uint32_t *>_ptr(self._used_len)
        self.b.ndesc = <uint16_t *>_ptr(self._ndesc)
        self.b.token = <uint64_t *>_ptr(self._token)
        self.b.seg_gpa = <uint64_t *>_ptr(self._seg_gpa)
        self.b.iov = <iovec *>_ptr(self._iov)

    def __dealloc__(self):
        if self._memory is not None:
            self._memory.detach()

    cdef int _swap_memory(self, GuestMemory memory) except -1:
        memory.attach()
        if self._memory is not None:
            self._memory.detach()
        self._memory = memory
        return 0

    @property
    def memory(self):
        """The :class:`GuestMemory` the segments of the last device pop point into
        (None before one): the batch keeps it attached, so the regions stay mapped while
        the batch may still be read (``chain``, ``chain_bytes``, ``seg_host``)."""
        return self._memory

    def release(self):
        """Empty the batch and let go of its memory (a driver batch has none)."""
        vq_batch_clear(&self.b)
        if self._memory is not None:
            self._memory.detach()
            self._memory = None

    # ---- sizes ----------------------------------------------------------------------

    @property
    def max_chains(self) -> int:
        """How many chains the batch can hold."""
        return self.b.max_chains

    @property
    def max_segments(self) -> int:
        """How many segments the batch can hold."""
        return self.b.max_segs

    @property
    def count(self) -> int:
        """Chains now in the batch."""
        return self.b.count

    @property
    def num_segments(self) -> int:
        """Segments now in the batch."""
        return self.b.nseg

    def __len__(self):
        return self.b.count

    def clear(self):
        """Empty the batch (for building a driver batch again)."""
        vq_batch_clear(&self.b)

    # ---- zero-copy views ------------------------------------------------------------

    @property
    def heads(self):
        """uint16 head ids of the chains, shape (count,)."""
        return self._head[:self.b.count]

    @property
    def used_len(self):
        """uint32 used length per chain (set before push_used; filled by reclaim)."""
        return self._used_len[:self.b.count]

    @property
    def tokens(self):
        """uint64 token per chain."""
        return self._token[:self.b.count]

    @property
    def readable_bytes(self):
        """uint32 device-readable bytes per chain."""
        return self._rbytes[:self.b.count]

    @property
    def writable_bytes(self):
        """uint32 device-writable bytes per chain."""
        return self._wbytes[:self.b.count]

    @property
    def seg_start(self):
        """uint32 index of each chain's first segment, shape (count + 1,)."""
        return self._seg_start[:self.b.count + 1]

    @property
    def readable_segments(self):
        """uint32 number of readable segments per chain (they come first)."""
        return self._nread[:self.b.count]

    @property
    def descriptors_used(self):
        """uint16 ring descriptors each chain took (1 for an indirect chain)."""
        return self._ndesc[:self.b.count]

    @property
    def seg_addr(self):
        """uint64 guest-physical address of each segment."""
        return self._seg_gpa[:self.b.nseg]

    @property
    def seg_len(self):
        """uint64 length of each segment."""
        return self._iov[:self.b.nseg, 1]

    @property
    def seg_host(self):
        """uint64 host address of each segment (device side, after pop)."""
        return self._iov[:self.b.nseg, 0]

    # ---- per-chain access (for tests and slow paths) ---------------------------------

    def chain(self, Py_ssize_t i):
        """The i-th chain as a :class:`Chain`."""
        if i < 0:
            i += self.b.count
        if not 0 <= i < self.b.count:
            raise IndexError("chain index out of range")
        cdef uint32_t s0 = self.b.seg_start[i], s1 = self.b.seg_start[i + 1]
        cdef uint32_t nr = self.b.nread[i]
        segs = [(self.b.seg_gpa[s], self.b.iov[s].iov_len, s - s0 >= nr)
                for s in range(s0, s1)]
        return Chain(self.b.head[i], segs, self.b.rbytes[i], self.b.wbytes[i],
                     self.b.token[i], self.b.used_len[i])

    def __iter__(self):
        for i in range(self.b.count):
            yield self.chain(i)

    def chain_bytes(self, Py_ssize_t i, bint writable=False):
        """Copy of the readable (or writable) bytes of chain i, read via host pointers."""
        c = self.chain(i)
        if i < 0:
            i += self.b.count       # chain() accepted it; index the C arrays with i >= 0
        cdef uint32_t s
        cdef uint32_t s0 = self.b.seg_start[i], s1 = self.b.seg_start[i + 1]
        cdef uint32_t nr = self.b.nread[i]
        out = bytearray()
        for s in range(s0, s1):
            if (s - s0 >= nr) == writable:
                if self.b.iov[s].iov_base == NULL:   # a driver batch: no host pointers
                    raise ValueError("segment has no host address: chain_bytes needs a popped batch")
                out += (<char *>self.b.iov[s].iov_base)[:self.b.iov[s].iov_len]
        return bytes(out)

    # ---- building a driver batch ------------------------------------------------------

    def append(self, readable=(), writable=(), unsigned long long token=0):
        """Append one chain: ``readable`` and ``writable`` are sequences of
        ``(gpa, length)``; ``token`` comes back from the driver's reclaim."""
        cdef uint32_t k = self.b.count
        cdef uint32_t n = len(readable) + len(writable)
        if k >= self.b.max_chains:
            raise BatchTooSmall("batch is full", code=-21)
        if self.b.nseg + n > self.b.max_segs:
            raise BatchTooSmall("batch has no room for the segments", code=-21)
        if n == 0:
            raise InvalidChain("a chain needs at least one segment")
        cdef uint32_t s = self.b.nseg
        cdef unsigned long long rb = 0, wb = 0
        for gpa, length in readable:
            self.b.seg_gpa[s] = gpa
            self.b.iov[s].iov_base = NULL
            self.b.iov[s].iov_len = length
            rb += length
            s += 1
        for gpa, length in writable:
            self.b.seg_gpa[s] = gpa
            self.b.iov[s].iov_base = NULL
            self.b.iov[s].iov_len = length
            wb += length
            s += 1
        if rb > 0xFFFFFFFF or wb > 0xFFFFFFFF:
            raise InvalidChain("chain longer than 2**32-1 bytes")
        self.b.nseg = s
        self.b.nread[k] = len(readable)
        self.b.rbytes[k] = rb
        self.b.wbytes[k] = wb
        self.b.token[k] = token
        self.b.head[k] = 0
        self.b.used_len[k] = 0
        self.b.seg_start[k + 1] = s
        self.b.count = k + 1

    def load(self, seg_addr, seg_len, seg_count, readable_count, tokens):
        """Fill the batch at once from arrays (the fast way to build a driver batch).

        ``seg_addr``/``seg_len``: per segment; ``seg_count``/``readable_count``/
        ``tokens``: per chain. Everything is checked before the batch is touched: on an
        error it keeps what it held.
        """
        cdef const uint64_t[::1] addr = np.ascontiguousarray(seg_addr, np.uint64)
        cdef const uint64_t[::1] ln = np.ascontiguousarray(seg_len, np.uint64)
        cdef const uint32_t[::1] cnt = np.ascontiguousarray(seg_count, np.uint32)
        cdef const uint32_t[::1] nrd = np.ascontiguousarray(readable_count, np.uint32)
        cdef const uint64_t[::1] tok = np.ascontiguousarray(tokens, np.uint64)
        cdef Py_ssize_t nchains = cnt.shape[0], nseg = addr.shape[0]
        cdef Py_ssize_t i, k, pos
        cdef uint64_t total = 0, rb, wb
        cdef bint bad_chain = False, too_long = False
        if ln.shape[0] != nseg or nrd.shape[0] != nchains or tok.shape[0] != nchains:
            raise ValueError("array lengths do not match")
        with nogil:       # one pass of checks; the lengths of the chains within the arrays
            for i in range(nchains):
                if cnt[i] == 0 or nrd[i] > cnt[i]:
                    bad_chain = True
                if total + cnt[i] <= <uint64_t>nseg and not too_long:
                    too_long = not _chain_bytes(ln, <Py_ssize_t>total, cnt[i], nrd[i], &rb, &wb)
                total += cnt[i]
        if total != <uint64_t>nseg:
            raise ValueError("seg_count does not add up to the number of segments")
        if nchains > self.b.max_chains or nseg > self.b.max_segs:
            raise BatchTooSmall(f"{nchains} chains / {nseg} segments exceed the batch", code=-21)
        if bad_chain:
            raise InvalidChain("each chain needs >= 1 segment and readable_count <= seg_count")
        if too_long:
            raise InvalidChain("chain longer than 2**32-1 bytes")
        cdef vq_batch *b = &self.b
        with nogil:
            pos = 0
            for i in range(nchains):
                b.seg_start[i] = <uint32_t>pos
                b.nread[i] = nrd[i]
                b.token[i] = tok[i]
                b.head[i] = 0
                b.used_len[i] = 0
                for k in range(pos, pos + cnt[i]):
                    b.seg_gpa[k] = addr[k]
                    b.iov[k].iov_base = NULL
                    b.iov[k].iov_len = ln[k]
                _chain_bytes(ln, pos, cnt[i], nrd[i], &rb, &wb)
                b.rbytes[i] = <uint32_t>rb
                b.wbytes[i] = <uint32_t>wb
                pos += cnt[i]
            b.seg_start[nchains] = <uint32_t>pos
            b.count = <uint32_t>nchains
            b.nseg = <uint32_t>nseg

    def __repr__(self):
        return f"<ChainBatch {self.b.count}/{self.b.max_chains} chains, {self.b.nseg}/{self.b.max_segs} segments>"
