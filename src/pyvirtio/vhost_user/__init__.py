"""The vhost-user protocol (QEMU docs/interop/vhost-user.rst): wire messages, the
connection layer, the back-end (server) of a virtio-net device and the front-end
(client)."""
