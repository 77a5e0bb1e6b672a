"""The gRPC ingress. It owns each request's token state (s2d.sequence.Sequence) and runs its
propose -> verify rounds against the shared draft and the request's target; concurrent requests
meet in the replicas' batches. Replicas only cache: a lost cache is rebuilt from the tokens sent."""
from __future__ import annotations

import asyncio
import contextvars
import logging
import time
import uuid

import grpc
from pydantic import ValidationError
from ray import serve
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
from ray.serve.handle import DeploymentHandle

from s2d.config import EngineConfig, SamplingParams
from s2d.engine import build_frontends
from s2d.proto import s2d_pb2 as pb
from s2d.sequence import Overloaded, Request, RequestError, Sequence, UnknownTarget
from s2d.workers import Proposal

log = logging.getLogger("ray.serve")
REPLICA_LOST = (ActorDiedError, ActorUnavailableError, RayActorError)
RETRY_WINDOW_S = 30.0  # how long a request waits for a lost replica's work to land elsewhere


class Unavailable(RuntimeError):
    pass


def to_request(r: pb.GenerateRequest) -> Request:
    if r.max_tokens < 0:
        raise RequestError("max_tokens", "must be > 0")
    try:
        params = SamplingParams(
            temperature=r.temperature if r.HasField("temperature") else 0.0,
            top_p=r.top_p if r.HasField("top_p") else 1.0, top_k=r.top_k,
            seed=r.seed if r.HasField("seed") else None, max_tokens=r.max_tokens or 64, stop=list(r.stop))
    except ValidationError as e:
        err = e.errors()[0]
        raise RequestError(str(err["loc"][0]), err["msg"]) from None
    messages = [{"role": m.role, "content": m.content} for m in r.messages] or None
    return Request(target=r.target, prompt=r.prompt or None, messages=messages, params=params,
                   mode=r.mode or "s2d", raw=r.raw, request_id=r.request_id or None)


def stats_pb(seq: Sequence) -> pb.SpecStats:
    s = seq.stats.to_dict()
    return pb.SpecStats(drafted=s["drafted"], accepted=s["accepted"], mat=s["mat"], target_forwards=s["target_forwards"],
                        exit_histogram={int(k): v for k, v in s["exit_histogram"].items()},
                        acceptance_per_position=s["acceptance_per_position"], wall_s=s["wall_s"])


def usage_pb(seq: Sequence) -> pb.Usage:
    return pb.Usage(prompt_tokens=len(seq.prompt_ids), completion_tokens=len(seq.out))


STATUS = [(UnknownTarget, grpc.StatusCode.NOT_FOUND), (RequestError, grpc.StatusCode.INVALID_ARGUMENT),
          (Overloaded, grpc.StatusCode.RESOURCE_EXHAUSTED), (Unavailable, grpc.StatusCode.UNAVAILABLE)]


@serve.deployment
class S2DRouter:
    def __init__(self, config: dict, draft: DeploymentHandle, targets: dict[str, DeploymentHandle]):
        self.cfg = EngineConfig.model_validate(config)
        self.frontends = build_frontends(self.cfg)
        self.exits = next(iter(self.frontends.values())).exits
        self.draft, self.targets = draft, targets
        self.live = 0
        self.max_live = self.cfg.limits.max_waiting

    # -- RPCs ----------------------------------------------------------------------------------
    async def Generate(self, request: pb.GenerateRequest, grpc_context) -> pb.GenerateResponse:
        try:
            seq = self._admit(request)
            try:
                async for _ in self._rounds(seq):
                    pass
            finally:
                self.live -= 1
        except Exception as e:  # noqa: BLE001 - mapped to a status, the server keeps serving
            self._fail(grpc_context, e)
            return pb.GenerateResponse()
        return pb.GenerateResponse(text=seq.text, token_ids=seq.out, finish_reason=seq.finish_reason,
                                   usage=usage_pb(seq), stats=stats_pb(seq), request_id=seq.seq_id)

    async def GenerateStream(self, request: pb.GenerateRequest, grpc_context):
        try:
            seq = self._admit(request)
            try:
                async for d in self._rounds(seq):
                    chunk = pb.GenerateChunk(text=d.text, token_ids=d.token_ids, finished=d.finished,
                                             finish_reason=d.finish_reason or "")
                    if d.finished:
                        chunk.usage.CopyFrom(usage_pb(seq))
                        chunk.stats.CopyFrom(stats_pb(seq))
                    yield chunk
            finally:
                self.live -= 1
        except Exception as e:  # noqa: BLE001
            self._fail(grpc_context, e)

    async def ListTargets(self, request, grpc_context) -> pb.ListTargetsResponse:
        return pb.ListTargetsResponse(targets=list(self.frontends), draft_exits=self.exits)

    async def Health(self, request, grpc_context) -> pb.HealthResponse:
        return pb.HealthResponse(status="ok")

    async def replica_stats(self) -> dict:
        """Stats of the draft and every target deployment (for tests and operators)."""
        out = {"draft": await self.draft.stats.remote()}
        for name, h in self.targets.items():
            out[name] = await h.stats.remote()
        return out

    # -- rounds --------------------------------------------------------------------------------
    def _admit(self, request: pb.GenerateRequest) -> Sequence:
        req = to_request(request)
        if req.target not in self.frontends:
            raise UnknownTarget("target", f"unknown target {req.target!r}; known: {sorted(self.frontends)}")
        if self.live >= self.max_live:
            raise Overloaded(f"{self.live} requests in flight (limit {self.max_live})")
        seq = self.frontends[req.target].sequence(f"{req.request_id or 'req'}-{uuid.uuid4().hex[:12]}", req)
        self.live += 1
        return seq

    async def _rounds(self, seq: Sequence):
        target = self.targets[seq.target]
        try:
            while not seq.finished:
                item = seq.propose_item()
                proposal = await self._call(self.draft.propose, item) if item.k > 0 else Proposal()
                verdict = await self._call(target.verify, seq.verify_item(proposal))
                yield seq.accept(proposal, verdict)
        finally:
            # Not a child of this request: Serve cancels a cancelled request's pending children.
            asyncio.get_running_loop().create_task(self._release(seq), context=contextvars.Context())

    async def _call(self, method, item):
        """One replica call; if the replica died, resend (another replica rebuilds by prefill)."""
        deadline = time.monotonic() + RETRY_WINDOW_S
        while True:
            try:
                return await method.remote(item)
            except REPLICA_LOST as e:
                if time.monotonic() > deadline:
                    raise Unavailable(f"no replica answered for {RETRY_WINDOW_S:.0f} s: {e}") from e
                log.warning("replica lost during %s; resending: %s", item.seq_id, type(e).__name__)
                await asyncio.sleep(0.2)

    async def _release(self, seq: Sequence):
        for handle in (self.draft, self.targets[seq.target]):
            try:
                await handle.release.remote(seq.seq_id)
            except Exception as e:  # noqa: BLE001 - an evicted or lost cache needs no release
                log.warning("release of %s failed: %s", seq.seq_id, e)

    @staticmethod
    def _fail(grpc_context, e: Exception):
        code = next((c for cls, c in STATUS if isinstance(e, cls)), grpc.StatusCode.INTERNAL)
        if code == grpc.StatusCode.INTERNAL:
            log.exception("request failed", exc_info=e)
        grpc_context.set_code(code)
        grpc_context.set_details(str(e))
