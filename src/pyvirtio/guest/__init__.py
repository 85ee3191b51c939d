"""A real Linux guest for pyvirtio: the guest image built from Debian packages
(:mod:`pyvirtio.guest.image`) and the QEMU harness that boots it on a virtio-net NIC
inside a network namespace (:mod:`pyvirtio.guest.harness`). Used by the end-to-end
tests (tests/e2e) and by ``pyvirtio bench``'s guest level."""
