"""Guest memory: regions of guest-physical address space backed by host buffers.

A region is backed by any writable, C-contiguous buffer (an ``mmap``, a memfd mapping, a
numpy array, a ``bytearray``). The region keeps a buffer export of its backing object, so
an ``mmap`` cannot be closed while the region exists. Queues built on a
:class:`GuestMemory` hold raw pointers into it; while any queue is attached the region
table cannot change (build a new :class:`GuestMemory` and move the queues instead).
"""

from collections import namedtuple

from cpython.mem cimport PyMem_Calloc, PyMem_Free
from libc.stdint cimport UINT64_MAX
from libc.string cimport memcpy

from vqcore.errors import (AddressOutOfBounds, AddressOverflow, MemoryRegionError)

MemoryRegion = namedtuple("MemoryRegion", "gpa size uva host_addr owner")
MemoryRegion.__doc__ = "One region of guest memory (see GuestMemory.regions)."

cdef enum:
    MAX_PIECES = 64


cdef class GuestMemory:
    """A table of guest memory regions.

    ``GuestMemory([(gpa, buffer), ...])`` or add regions one by one with
    :meth:`add_region`. Regions may not overlap in guest-physical space (nor in the
    frontend's virtual address space, when ``uva`` is given).
    """

    def __cinit__(self):
        self.mem = <vq_memory *>PyMem_Calloc(1, sizeof(vq_memory))
        if self.mem is NULL:
            raise MemoryError()
        self._views = []
        self._owners = []
        self.attached = 0

    def __init__(self, regions=()):
        for item in regions:
            self.add_region(*item)

    def __dealloc__(self):
        PyMem_Free(self.mem)
        self.mem = NULL

    # ---- region table ---------------------------------------------------------------

    def add_region(self, unsigned long long gpa, buffer, *, unsigned long long offset=0,
                   size=None, uva=None):
        """Add ``buffer[offset:offset+size]`` as guest-physical ``[gpa, gpa+size)``.

        ``uva`` is the frontend's virtual address of the region's start (vhost-user
        ring addresses are given in that space); it defaults to ``gpa``.
        """
        cdef unsigned char[::1] view
        if self.attached:
            raise MemoryRegionError("memory is in use by a queue; build a new GuestMemory")
        if self.mem.n >= VQ_MAX_REGIONS:
            raise MemoryRegionError(f"at most {VQ_MAX_REGIONS} regions")
        try:
            view = memoryview(buffer).cast("B")
        except (TypeError, ValueError, BufferError) as exc:   # BufferError: read-only
            raise MemoryRegionError(f"region buffer must be writable and contiguous: {exc}") from exc
        cdef unsigned long long total = view.shape[0]
        if offset > total:
            raise MemoryRegionError(f"offset {offset} beyond the buffer's {total} bytes")
        cdef unsigned long long rsize = (total - offset) if size is None else size
        if rsize == 0:
            raise MemoryRegionError("a region must not be empty")
        if rsize > total - offset:
            raise MemoryRegionError(f"region of {rsize} bytes at offset {offset} exceeds the buffer's {total} bytes")
        if rsize - 1 > UINT64_MAX - gpa:
            raise MemoryRegionError(f"region {gpa:#x}+{rsize:#x} wraps around 2**64")
        cdef unsigned long long ruva = gpa if uva is None else uva
        if rsize - 1 > UINT64_MAX - ruva:
            raise MemoryRegionError(f"region uva {ruva:#x}+{rsize:#x} wraps around 2**64")
        cdef uint32_t i
        cdef vq_region *r
        for i in range(self.mem.n):
            r = &self.mem.r[i]
            if gpa <= r.gpa + (r.size - 1) and r.gpa <= gpa + (rsize - 1):
                raise MemoryRegionError(
                    f"region {gpa:#x}+{rsize:#x} overlaps region {r.gpa:#x}+{r.size:#x}")
            if uva is not None and ruva <= r.uva + (r.size - 1) and r.uva <= ruva + (rsize - 1):
                raise MemoryRegionError(
                    f"region uva {ruva:#x}+{rsize:#x} overlaps uva {r.uva:#x}+{r.size:#x}")
        # insert keeping the table sorted by gpa
        cdef uint32_t pos = 0
        while pos < self.mem.n and self.mem.r[pos].gpa < gpa:
            pos += 1
        cdef uint32_t j = self.mem.n
        while j > pos:
            self.mem.r[j] = self.mem.r[j - 1]
            j -= 1
        self.mem.r[pos].gpa = gpa
        self.mem.r[pos].size = rsize
        self.mem.r[pos].uva = ruva
        self.mem.r[pos].host = &view[0] + offset
        self.mem.n += 1
        self.mem.last = 0
        self._views.insert(pos, view)
        self._owners.insert(pos, buffer)

    def remove_region(self, unsigned long long gpa):
        """Remove the region starting at ``gpa``; returns its backing object."""
        if self.attached:
            raise MemoryRegionError("memory is in use by a queue; build a new GuestMemory")
        cdef uint32_t i, pos
        for pos in range(self.mem.n):
            if self.mem.r[pos].gpa == gpa:
                break
        else:
            raise MemoryRegionError(f"no region starts at {gpa:#x}")
        i = pos
        while i + 1 < self.mem.n:
            self.mem.r[i] = self.mem.r[i + 1]
            i += 1
        self.mem.n -= 1
        self.mem.last = 0
        # the Python lists are kept in the same (gpa) order as the C table
        self._views.pop(pos)
        return self._owners.pop(pos)

    cdef uint8_t *_view_base(self, int k):
        cdef unsigned char[::1] v = self._views[k]
        return &v[0]

    def close(self):
        """Drop every region (and the buffer exports that pin them)."""
        if self.attached:
            raise MemoryRegionError("memory is in use by a queue")
        self.mem.n = 0
        self._views.clear()
        self._owners.clear()

    @property
    def regions(self):
        """The regions, sorted by guest-physical address."""
        cdef uint32_t i
        return [MemoryRegion(self.mem.r[i].gpa, self.mem.r[i].size, self.mem.r[i].uva,
                             <size_t>self.mem.r[i].host, self._owners[i])
                for i in range(self.mem.n)]

    def __len__(self):
        return self.mem.n

    @property
    def size(self):
        """Total bytes of guest memory."""
        cdef uint32_t i
        cdef unsigned long long total = 0
        for i in range(self.mem.n):
            total += self.mem.r[i].size
        return total

    # ---- translation ----------------------------------------------------------------

    def translate(self, unsigned long long gpa, unsigned long long length):
        """Host ``(address, length)`` pieces of ``[gpa, gpa+length)``.

        One piece per region the range crosses (adjacent regions only). Raises
        :class:`AddressOverflow` or :class:`AddressOutOfBounds`.
        """
        cdef iovec iov[MAX_PIECES]
        cdef int n = vq_mem_iov(self.mem, gpa, length, iov, NULL, MAX_PIECES)
        if n == -11:
            raise AddressOverflow(f"{gpa:#x} + {length} overflows 64 bits")
        if n == -21:
            raise AddressOutOfBounds(f"{gpa:#x}+{length} spans more than {MAX_PIECES} regions")
        if n < 0:
            raise AddressOutOfBounds(f"{gpa:#x}+{length} is not inside guest memory")
        return [(<size_t>iov[i].iov_base, iov[i].iov_len) for i in range(n)]

    def uva_to_gpa(self, unsigned long long uva, unsigned long long length=1):
        """Guest-physical address of a frontend virtual address range (one region)."""
        cdef uint64_t g = vq_mem_uva_to_gpa(self.mem, uva, length)
        if g == UINT64_MAX:
            raise AddressOutOfBounds(f"uva {uva:#x}+{length} is not inside one region")
        return g

    def host_address(self, unsigned long long gpa, unsigned long long length=1):
        """Host address of ``[gpa, gpa+length)``, which must lie inside one region."""
        return <size_t>self.ptr_or_raise(gpa, length, "range")

    cdef uint8_t *ptr_or_raise(self, uint64_t gpa, uint64_t length, str what) except NULL:
        if length and length - 1 > UINT64_MAX - gpa:
            raise AddressOverflow(f"{what} {gpa:#x} + {length} overflows 64 bits")
        cdef uint8_t *p = vq_mem_ptr(self.mem, gpa, length)
        if p is NULL:
            raise AddressOutOfBounds(f"{what} {gpa:#x}+{length} is not inside one guest memory region")
        return p

    def view(self, unsigned long long gpa, unsigned long long length):
        """A zero-copy writable ``memoryview`` of a range inside one region."""
        cdef int i = vq_mem_find(self.mem, gpa)
        self.ptr_or_raise(gpa, length, "range")
        cdef unsigned long long off = gpa - self.mem.r[i].gpa
        cdef unsigned long long base = self.mem.r[i].host - self._view_base(i)
        view = self._views[i]
        return memoryview(view)[base + off: base + off + length]

    def array(self, unsigned long long gpa, Py_ssize_t count, dtype="u1"):
        """A zero-copy numpy array of ``count`` items of ``dtype`` at ``gpa``."""
        import numpy as np
        dt = np.dtype(dtype)
        return np.frombuffer(self.view(gpa, count * dt.itemsize), dtype=dt)

    def read(self, unsigned long long gpa, unsigned long long length):
        """Copy ``length`` bytes from guest memory (may cross adjacent regions)."""
        out = bytearray(length)
        cdef unsigned char[::1] dst = out
        cdef size_t done = 0
        for addr, n in self.translate(gpa, length):
            memcpy(&dst[done], <void *><size_t>addr, n)
            done += n
        return bytes(out)

    def write(self, unsigned long long gpa, data):
        """Copy ``data`` into guest memory (may cross adjacent regions)."""
        cdef const unsigned char[::1] src = memoryview(data).cast("B")
        cdef size_t done = 0
        if src.shape[0] == 0:
            return
        for addr, n in self.translate(gpa, src.shape[0]):
            memcpy(<void *><size_t>addr, &src[done], n)
            done += n

    # ---- queue attachment -----------------------------------------------------------

    cdef int attach(self) except -1:
        self.attached += 1
        return 0

    cdef void detach(self) noexcept:
        if self.attached > 0:
            self.attached -= 1

    def __repr__(self):
        return f"<GuestMemory {self.mem.n} regions, {self.size} bytes>"
