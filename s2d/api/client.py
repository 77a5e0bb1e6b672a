"""A small gRPC client for the s2d server (the `s2d client` command is in s2d/tools/cli.py)."""
from __future__ import annotations

import grpc

from s2d.proto import s2d_pb2 as pb
from s2d.proto import s2d_pb2_grpc as pb_grpc


class S2DClient:
    def __init__(self, address: str = "127.0.0.1:9000", application: str | None = None, timeout: float | None = 120.0):
        self.address = address
        self.channel = grpc.insecure_channel(address)
        self.stub = pb_grpc.S2DStub(self.channel)
        self.metadata = (("application", application),) if application else None
        self.timeout = timeout

    @staticmethod
    def request(target: str, prompt: str = "", *, messages=None, max_tokens=64, temperature=None, top_p=None,
                top_k=0, seed=None, stop=(), mode="s2d", request_id="", raw=False) -> pb.GenerateRequest:
        r = pb.GenerateRequest(target=target, prompt=prompt, max_tokens=max_tokens, top_k=top_k, stop=list(stop),
                               mode=mode, request_id=request_id, raw=raw,
                               messages=[pb.ChatMessage(**m) for m in messages or []])
        for name, value in (("temperature", temperature), ("top_p", top_p), ("seed", seed)):
            if value is not None:
                setattr(r, name, value)
        return r

    def generate(self, target: str, prompt: str = "", timeout: float | None = None, **kw) -> pb.GenerateResponse:
        return self.stub.Generate(self.request(target, prompt, **kw), metadata=self.metadata,
                                  timeout=timeout or self.timeout)

    def stream(self, target: str, prompt: str = "", timeout: float | None = None, **kw):
        return self.stub.GenerateStream(self.request(target, prompt, **kw), metadata=self.metadata,
                                        timeout=timeout or self.timeout)

    def list_targets(self) -> pb.ListTargetsResponse:
        return self.stub.ListTargets(pb.ListTargetsRequest(), metadata=self.metadata, timeout=self.timeout)

    def health(self) -> str:
        return self.stub.Health(pb.HealthRequest(), metadata=self.metadata, timeout=self.timeout).status

    def close(self):
        self.channel.close()
