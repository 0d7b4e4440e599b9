"""A small synchronous Python client for a Shuttle server.

    from shuttle.client import ShuttleClient
    with ShuttleClient("127.0.0.1:50051") as client:
        print(client.generate("Hello", max_tokens=8).text)
        for chunk in client.stream(token_ids=[1, 2, 3], max_tokens=8):
            print(chunk.token_ids, chunk.text)

Errors are `grpc.RpcError` with the server's status code and message (`e.code()`, `e.details()`).
Other languages: generate a client from `proto/shuttle/v1/generation.proto`.
"""

from __future__ import annotations

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from serving.v1 import generation_pb2 as pb
from serving.v1 import generation_pb2_grpc as pb_grpc

SAMPLING_FIELDS = ("max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stop_token_ids", "ignore_eos", "logprobs")


def build_request(prompt: str | None = None, token_ids: list[int] | None = None, request_id: str = "",
                  **sampling) -> pb.GenerateRequest:
    unknown = set(sampling) - set(SAMPLING_FIELDS)
    if unknown:
        raise TypeError(f"unknown sampling parameters: {sorted(unknown)} (known: {', '.join(SAMPLING_FIELDS)})")
    if (prompt is None) == (token_ids is None):
        raise TypeError("give exactly one of prompt or token_ids")
    req = pb.GenerateRequest(request_id=request_id,
                             sampling=pb.SamplingParams(**{k: v for k, v in sampling.items() if v is not None}))
    if prompt is not None:
        req.prompt = prompt
    else:
        req.token_ids.ids.extend(token_ids)
    return req


class ShuttleClient:
    def __init__(self, address: str = "127.0.0.1:50051", *, token: str | None = None,
                 tls_ca: bytes | None = None, tls: bool = False, timeout_s: float | None = None,
                 server_name: str | None = None):
        """tls_ca: PEM of the CA (or self-signed cert) to trust; tls=True with no CA uses the system roots."""
        options = [("grpc.max_receive_message_length", 64 << 20)]
        if server_name:
            options.append(("grpc.ssl_target_name_override", server_name))
        if tls or tls_ca:
            self.channel = grpc.secure_channel(address, grpc.ssl_channel_credentials(root_certificates=tls_ca), options)
        else:
            self.channel = grpc.insecure_channel(address, options)
        self.stub = pb_grpc.GenerationStub(self.channel)
        self.health_stub = health_pb2_grpc.HealthStub(self.channel)
        self.metadata = [("authorization", f"Bearer {token}")] if token else []
        self.timeout_s = timeout_s

    def generate(self, prompt: str | None = None, *, token_ids: list[int] | None = None, request_id: str = "",
                 timeout_s: float | None = None, **sampling) -> pb.GenerateResponse:
        return self.stub.Generate(build_request(prompt, token_ids, request_id, **sampling),
                                  timeout=timeout_s or self.timeout_s, metadata=self.metadata)

    def stream(self, prompt: str | None = None, *, token_ids: list[int] | None = None, request_id: str = "",
               timeout_s: float | None = None, **sampling):
        """An iterator of GenerateChunk; call `.cancel()` on it to stop early (the server frees the request)."""
        return self.stub.GenerateStream(build_request(prompt, token_ids, request_id, **sampling),
                                        timeout=timeout_s or self.timeout_s, metadata=self.metadata)

    def model_info(self) -> pb.ModelInfo:
        return self.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=self.timeout_s, metadata=self.metadata)

    def status(self) -> pb.ServerStatus:
        return self.stub.GetServerStatus(pb.GetServerStatusRequest(), timeout=self.timeout_s, metadata=self.metadata)

    def health(self, service: str = "") -> str:
        """SERVING, NOT_SERVING, ... (the grpc.health.v1 status name)."""
        resp = self.health_stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=self.timeout_s or 5)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)

    def wait_until_serving(self, timeout_s: float = 300.0) -> None:
        import time
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                if self.health() == "SERVING":
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"the server was not SERVING within {timeout_s:g}s")
            time.sleep(0.2)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "ShuttleClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
