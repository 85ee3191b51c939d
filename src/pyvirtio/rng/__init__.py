"""The virtio-rng device model (VIRTIO 1.2 section 5.4): an entropy device with one
request queue and no configuration space.

* :mod:`pyvirtio.rng.device`: :class:`RngDevice` (the device core, transport-neutral)
  and :class:`RngWorker` (the thread that fills the guest's requests);
* :mod:`pyvirtio.rng.driver`: :class:`RngDriver`, the guest side (tests, in-process use).
"""

from pyvirtio.rng.device import (DEFAULT_FEATURES, DEFAULT_SOURCE, VIRTIO_ID_RNG, RngDevice,
                                 RngWorker, TokenBucket)
from pyvirtio.rng.driver import RngDriver, RngDriverError

__all__ = ["RngDevice", "RngWorker", "TokenBucket", "RngDriver", "RngDriverError",
           "DEFAULT_FEATURES", "DEFAULT_SOURCE", "VIRTIO_ID_RNG"]
