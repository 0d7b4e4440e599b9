"""`shuttle serve` as users run it (a subprocess with TLS and a bearer token) and `shuttle generate`:
health NOT_SERVING while loading → SERVING → NOT_SERVING on SIGTERM, drain finishes in-flight work, exit 0."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import grpc
import pytest

from grpc_harness import self_signed
from serving.v1 import generation_pb2 as pb
from shuttle.client import ShuttleClient

TOKEN = "integration-token"


def shuttle(*args):
    return [sys.executable, "-m", "shuttle.cli", *args]


@pytest.fixture(scope="module")
def serve_process(tmp_path_factory):
    from models.embedded import default_model_dir
    default_model_dir()  # generated outside the timed part
    tmp = tmp_path_factory.mktemp("tls")
    cert, key = self_signed()
    (tmp / "cert.pem").write_bytes(cert)
    (tmp / "key.pem").write_bytes(key)
    env = {**os.environ, "SHUTTLE_AUTH_TOKEN": TOKEN}
    proc = subprocess.Popen(shuttle("serve", "--port", "0", "--tls-cert", str(tmp / "cert.pem"), "--tls-key", str(tmp / "key.pem"),
                                    "--attention-ranks", "1", "--expert-ranks", "2", "--drain-grace-s", "60"),
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        port = None
        log = []
        while port is None:
            line = proc.stderr.readline()
            assert line, "shuttle serve exited early:\n" + "".join(log)
            log.append(line)
            m = re.search(r"listening on 127\.0\.0\.1:(\d+)", line)
            port = m and int(m.group(1))
        yield proc, port, tmp / "cert.pem", log
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()


def test_serve_lifecycle_auth_tls_generate_and_drain(serve_process):
    proc, port, cert_path, log = serve_process
    address = f"localhost:{port}"
    cert = cert_path.read_bytes()
    client = ShuttleClient(address, tls_ca=cert, token=TOKEN, timeout_s=60)
    assert client.health() == "NOT_SERVING"  # bound before the weights load
    with pytest.raises(grpc.RpcError) as e:
        client.generate("Hello")
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE and "loading" in e.value.details()
    client.wait_until_serving(timeout_s=300)

    # auth and TLS: the right client works, the others are refused
    assert len(client.generate("Hello", max_tokens=4, ignore_eos=True).token_ids) == 4
    with ShuttleClient(address, tls_ca=cert, token="wrong", timeout_s=30) as wrong:
        with pytest.raises(grpc.RpcError) as e:
            wrong.generate("Hello")
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with ShuttleClient(address, token=TOKEN, timeout_s=30) as plaintext:
        with pytest.raises(grpc.RpcError) as e:
            plaintext.generate("Hello")
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE

    # `shuttle generate` streams the same tokens as the library client
    want = client.generate(token_ids=[5, 6, 7], max_tokens=6, ignore_eos=True)
    env = {**os.environ, "SHUTTLE_AUTH_TOKEN": TOKEN}
    out = subprocess.run(shuttle("generate", "--address", address, "--tls-ca", str(cert_path), "--prompt-ids", "5,6,7",
                                 "--max-tokens", "6", "--ignore-eos", "--json"), capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    chunks = [json.loads(line) for line in out.stdout.splitlines()]
    assert [t for c in chunks for t in c.get("token_ids", [])] == list(want.token_ids)
    assert chunks[-1]["finish_reason"] == "FINISH_REASON_LENGTH"
    text = subprocess.run(shuttle("generate", "--address", address, "--tls-ca", str(cert_path), "Hello",
                                  "--max-tokens", "6", "--ignore-eos"), capture_output=True, text=True, env=env, timeout=120)
    assert text.returncode == 0 and text.stdout == client.generate("Hello", max_tokens=6, ignore_eos=True).text
    assert "[length: 6 tokens" in text.stderr
    bad = subprocess.run(shuttle("generate", "--address", address, "--tls-ca", str(cert_path), "Hello", "--temperature", "-1"),
                         capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode == 1 and "INVALID_ARGUMENT: sampling.temperature" in bad.stderr

    # SIGTERM: health NOT_SERVING, new calls refused, the in-flight stream finishes, exit 0
    stream = client.stream("Hello", max_tokens=150, ignore_eos=True)
    first = next(stream)
    proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 30
    while client.health() != "NOT_SERVING":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    with pytest.raises(grpc.RpcError) as e:
        client.generate("Hello")
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    rest = list(stream)
    assert len(first.token_ids) + sum(len(c.token_ids) for c in rest) == 150
    assert rest[-1].finish_reason == pb.FINISH_REASON_LENGTH
    client.close()
    assert proc.wait(120) == 0
    log += proc.stderr.readlines()
    assert any("draining" in line for line in log) and any("stopped" in line for line in log), "".join(log)
