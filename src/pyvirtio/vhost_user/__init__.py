"""The vhost-user protocol (QEMU docs/interop/vhost-user.rst), with no device inside:
wire messages, the connection layer, the generic back-end handler and the device
protocol it serves, the server (many ports, listening or connecting), the memory table,
and the generic front-end client. Devices live in their own packages
(:mod:`pyvirtio.net.vhost_user`, :mod:`pyvirtio.rng.vhost_user`)."""

from pyvirtio.vhost_user.client import VhostUserClient
from pyvirtio.vhost_user.device import VhostUserDevice
from pyvirtio.vhost_user.handler import VhostUserHandler
from pyvirtio.vhost_user.server import Port, VhostUserServer

__all__ = ["VhostUserDevice", "VhostUserHandler", "VhostUserServer", "Port",
           "VhostUserClient"]
