"""pyvirtio: the control plane (features, device status, virtio-net, vhost-user) on vqcore."""

__version__ = "0.1.0"
