"""Where a virtio-net device's packets go: a multiqueue TAP interface (:mod:`.tap`)."""
