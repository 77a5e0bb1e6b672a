"""A small gRPC client for the s2d server, and the `s2d client` command."""
from __future__ import annotations

import json
import sys

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


def cmd_client(a):
    c = S2DClient(a.address, a.application)
    try:
        if a.list:
            r = c.list_targets()
            print(json.dumps({"targets": list(r.targets), "draft_exits": list(r.draft_exits)}))
            return
        if not a.target or a.prompt is None:
            raise SystemExit("give --target NAME and --prompt TEXT (or --list)")
        kw = dict(max_tokens=a.max_tokens, temperature=a.temperature, top_p=a.top_p, top_k=a.top_k, seed=a.seed,
                  stop=a.stop, mode=a.mode, raw=a.raw)
        if a.stream:
            for chunk in c.stream(a.target, a.prompt, **kw):
                print(chunk.text, end="", flush=True)
                last = chunk
            reason, n, mat = last.finish_reason, last.usage.completion_tokens, last.stats.mat
        else:
            r = c.generate(a.target, a.prompt, **kw)
            print(r.text, end="")
            reason, n, mat = r.finish_reason, r.usage.completion_tokens, r.stats.mat
        print(f"\n[{reason}] {n} tokens, MAT {mat:.2f}", file=sys.stderr)
    except grpc.RpcError as e:
        raise SystemExit(f"{e.code().name}: {e.details()}")
    finally:
        c.close()


def add_cli(sub):
    from s2d.cli import _sampling_flags

    p = sub.add_parser("client", help="call a running s2d server over gRPC")
    p.add_argument("--address", default="127.0.0.1:9000")
    p.add_argument("--application", default=None, help="Ray Serve app name, when several run")
    p.add_argument("--target")
    p.add_argument("--prompt")
    p.add_argument("--stream", action="store_true")
    p.add_argument("--raw", action="store_true")
    p.add_argument("--list", action="store_true", help="list the served targets")
    _sampling_flags(p)
    p.set_defaults(fn=cmd_client)
