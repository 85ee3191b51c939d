"""End-to-end tests: a real Linux guest under QEMU on pyvirtio net (see harness.py)."""
