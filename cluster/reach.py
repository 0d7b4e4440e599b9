"""Can every rank node reach every other one? Checked before the data plane opens, so a firewall or
a wrong interface fails the bring-up in seconds with the two nodes named, instead of a gloo or
NCCL timeout minutes later.

A ReachProbe listens on the node's data-plane address (the source address of its route to the
head) on an ephemeral port, as gloo and NCCL do, and dials other probes. One runs in the driver
(next to the TCPStore); one runs as a small Ray actor on each node that hosts ranks.
"""

from __future__ import annotations

import socket
import threading


class ReachProbe:
    def __init__(self, bind_address: str):
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.bind((bind_address, 0))
        self._sock.listen(64)
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            conn.close()

    def address(self) -> tuple[str, int]:
        return self._sock.getsockname()[:2]

    def reach(self, targets: list[tuple[str, str, int]], timeout_s: float) -> list[str]:
        """Dial each (name, host, port); the failures, as 'name at host:port: reason'."""
        failures = []
        for name, host, port in targets:
            try:
                socket.create_connection((host, port), timeout=timeout_s).close()
            except socket.timeout:
                failures.append(f"{name} at {host}:{port}: no answer within {timeout_s:g}s (a firewall dropping packets?)")
            except OSError as e:
                failures.append(f"{name} at {host}:{port}: {e.strerror or e}")
        return failures

    def close(self) -> None:
        self._closed = True
        self._sock.close()
