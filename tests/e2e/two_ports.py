"""Two vhost-user-net ports in one process, through the framework's Python API: each a
net device over its own TAP (created by the test), both served by one
:class:`~pyvirtio.vhost_user.server.VhostUserServer` until SIGTERM, with a control
socket.

    python two_ports.py CONTROL SOCKET_A TAP_A SOCKET_B TAP_B
"""

from __future__ import annotations

import logging
import signal
import sys
from contextlib import ExitStack

from pyvirtio.backends.tap import Tap
from pyvirtio.control import ControlServer
from pyvirtio.net.vhost_user import VhostUserNetDevice
from pyvirtio.vhost_user.server import Port, VhostUserServer


def main(control: str, *pairs: str) -> int:
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    with ExitStack() as stack:
        ports = []
        for socket_path, tap_name in zip(pairs[::2], pairs[1::2]):
            tap = stack.enter_context(Tap.create(tap_name, 1))
            device = VhostUserNetDevice(tap, name=f"net-{tap_name}")
            stack.callback(device.close)
            ports.append(Port(device, socket_path=socket_path, name=tap_name))
        server = stack.enter_context(VhostUserServer(ports=ports))
        stack.enter_context(ControlServer(control, server.control_commands()))
        signal.signal(signal.SIGTERM, lambda *_: server.shutdown())
        server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
