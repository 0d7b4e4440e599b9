"""A Shuttle gRPC server on its own event-loop thread inside the test process, for sync clients."""

from __future__ import annotations

import asyncio
import datetime
import threading

from serving.server import Server, ServerOptions


class ServerThread:
    def __init__(self, options: ServerOptions | None = None):
        self.options = options or ServerOptions(port=0)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="test-grpc-server", daemon=True)
        self._thread.start()
        self.server: Server = self.call(self._make())
        self.port = self.call(self.server.start())
        self.address = f"127.0.0.1:{self.port}"

    async def _make(self) -> Server:
        return Server(self.options)  # built on the loop: its asyncio objects belong to it

    def call(self, coro, timeout: float = 120):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def attach(self, engine, model) -> "ServerThread":
        self.call(self.server.attach(engine, model))
        return self

    def drain(self, grace_s: float = 5.0) -> None:
        """Drain and stop the server (and the engine), then end the loop thread."""
        try:
            self.call(self.server.drain(grace_s), timeout=grace_s + 120)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)


def self_signed(host="localhost"):
    """A throwaway self-signed (CA) certificate for `host`: (cert PEM, key PEM)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(host)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    return (cert.public_bytes(serialization.Encoding.PEM),
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
