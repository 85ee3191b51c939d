"""The smallest device the generic vhost-user handler can serve: the tests' stand-in
for a device, like rust-vmm's dummy backend.

:class:`DummyDevice` has ``queues`` rings, each a group of its own, no configuration
space and no requests of its own. A running ring's worker takes every chain the driver
offers and gives it back used with 0 bytes written (a disabled ring is left alone),
one burst at a time: what is left to test is the handler.

Run as a program it serves one on a socket, like the back-end commands do:
``python tests/vhost_user_dummy.py --socket-path PATH [--queues N]``.
"""

from __future__ import annotations

import argparse
import logging
import select
import signal
import sys
from typing import Any, Sequence

from vqcore import ChainBatch
from vqcore.errors import QueueBroken, RingViolation

from pyvirtio import fds
from pyvirtio.device import Vring
from pyvirtio.features import Transport
from pyvirtio.runtime import Worker
from pyvirtio.vhost_user.device import VhostUserDevice
from pyvirtio.vhost_user.server import VhostUserServer

DUMMY_FEATURES = int(Transport.VERSION_1 | Transport.EVENT_IDX | Transport.INDIRECT_DESC
                     | Transport.RING_PACKED)


class DummyWorker(Worker):
    """Returns every chain of one ring, used with 0 bytes."""

    def __init__(self, device: "DummyDevice", vring: Vring) -> None:
        super().__init__(f"dummy-q{vring.index}")
        self.device, self.vring = device, vring
        self.batch = ChainBatch(vring.queue.size)

    def peer_fds(self) -> list[tuple[int, bool]]:
        v = self.vring
        return [(v.kick_fd, True), (v.call_fd, False), (v.err_fd, False)]

    def _break_all(self, exc: BaseException) -> None:
        self._broken(exc)

    def _broken(self, exc: BaseException) -> None:
        if self.vring.err_fd >= 0:
            fds.signal(self.vring.err_fd)
        self.device.reason = self.device.reason or f"ring {self.vring.index}: {exc}"

    def _loop(self) -> None:
        v, q = self.vring, self.vring.queue
        ep = select.epoll()
        try:
            ep.register(self._stop_fd, select.EPOLLIN)
            if v.kick_fd >= 0:
                ep.register(v.kick_fd, select.EPOLLIN)
            first = True        # look once before sleeping: a kick may be gone already
            while not self._stopping:
                for fd, _ in ep.poll(0 if (first or v.kick_fd < 0) else -1):
                    fds.drain(fd)
                first = False
                if not v.enabled or q.broken:
                    continue
                try:
                    while True:
                        q.disable_notification()
                        n = q.pop(self.batch)
                        if n:
                            self.batch.used_len[:n] = 0
                            q.push_used(self.batch)
                            self.device.chains += n
                            if v.call_fd >= 0 and q.needs_notification():
                                fds.signal(v.call_fd)
                        if not n and not q.enable_notification():
                            break
                except (RingViolation, QueueBroken) as exc:
                    self._broken(exc)
        finally:
            ep.close()


class DummyDevice(VhostUserDevice):
    """``queues`` rings, each served by a :class:`DummyWorker` while it runs."""

    device_type = "dummy"

    def __init__(self, queues: int = 2, name: str = "dummy") -> None:
        self.num_queues = queues
        self.name = name
        self.workers: dict[int, DummyWorker] = {}
        self.chains = 0
        self.reason: str | None = None

    def features(self) -> int:
        return DUMMY_FEATURES

    def start_group(self, group: int, vrings: Sequence[Vring]) -> None:
        worker = self.workers[group] = DummyWorker(self, vrings[0])
        worker.start()

    def stop_group(self, group: int) -> None:
        worker = self.workers.pop(group, None)
        if worker is not None:
            worker.stop()

    @property
    def needs_reset_reason(self) -> str | None:
        return self.reason

    def clear_needs_reset(self) -> None:
        self.reason = None

    def reset(self) -> None:
        self.chains, self.reason = 0, None

    def stats(self) -> dict[str, Any]:
        return {"chains": self.chains}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--socket-path", required=True)
    p.add_argument("--queues", type=int, default=2)
    p.add_argument("--message-timeout", type=float, default=5.0)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    device = DummyDevice(args.queues)
    with VhostUserServer(device, socket_path=args.socket_path,
                         message_timeout=args.message_timeout) as server:
        signal.signal(signal.SIGTERM, lambda *_: server.shutdown())
        server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
