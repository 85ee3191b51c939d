"""The virtio-net device model (VIRTIO 1.2 section 5.1).

* :mod:`pyvirtio.net.config`: ``virtio_net_config``, the configuration space;
* :mod:`pyvirtio.net.header`: ``virtio_net_hdr``, the header before every packet;
* :mod:`pyvirtio.net.ctrl`: the control virtqueue and its commands.
"""

from pyvirtio.net.config import (NetConfig, NetConfigError, VIRTIO_NET_S_ANNOUNCE,
                                 VIRTIO_NET_S_LINK_UP)
from pyvirtio.net.header import HDR_LEN, NetHeaderError, VirtioNetHdr

__all__ = ["NetConfig", "NetConfigError", "VIRTIO_NET_S_LINK_UP", "VIRTIO_NET_S_ANNOUNCE",
           "VirtioNetHdr", "NetHeaderError", "HDR_LEN"]
