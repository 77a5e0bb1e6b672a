"""The ingress, kept thin: gRPC here and the OpenAI HTTP API (deployments/http.py) on the same
replica. It turns a message into a Request, routes it to the cell that hosts its target (one
streaming call per request), streams, maps errors to status codes, and records each finished
request's metrics (deployments/metrics.py). Validation, admission, overload and request ids live in
the cell's scheduler.

If a cell replica dies, the request is resent to another replica with the tokens already streamed
(`resume`), so the client sees one uninterrupted stream; after RETRY_WINDOW_S without an answer
the request ends with UNAVAILABLE."""
from __future__ import annotations

import asyncio
import logging
import time

import grpc
from ray import serve
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError, RayTaskError
from ray.serve.handle import DeploymentHandle

from deployments.http import OpenAIRoutes, app
from deployments.metrics import RequestMetrics
from deployments.quiet import level_of
from s2d.core.config import EngineConfig
from s2d.core.request import (
    DeadlineExceeded,
    Request,
    RequestError,
    RequestFailed,
    Unavailable,
    UnknownTarget,
    cause_of,
    internal_message,
    parse_request,
    status_of,
)
from s2d.proto import s2d_pb2 as pb
from s2d.proto.servicer import Undecodable
from s2d.worker.draft import read_exits

log = logging.getLogger("ray.serve")
REPLICA_LOST = (ActorDiedError, ActorUnavailableError, RayActorError)
RETRY_WINDOW_S = 30.0  # how long a request waits for a lost cell replica's work to land elsewhere
READY_TIMEOUT_S = 2.0  # a health check's wait for each cell


def to_request(r: pb.GenerateRequest | Undecodable, cfg: EngineConfig) -> Request:
    """The message as a checked Request (s2d/core/request.py: the one validation path)."""
    if isinstance(r, Undecodable):
        raise RequestError(r.field, r.message)
    if r.ByteSize() > cfg.limits.max_request_bytes:
        raise RequestError("request", f"{r.ByteSize()} bytes exceed the limit {cfg.limits.max_request_bytes}")
    has = r.HasField
    return parse_request({
        "target": r.target, "prompt": r.prompt or None, "mode": r.mode or "s2d", "raw": r.raw,
        "request_id": r.request_id or None,
        "messages": [{"role": m.role, "content": m.content} for m in r.messages] or None,
        "temperature": r.temperature if has("temperature") else None, "top_p": r.top_p if has("top_p") else None,
        "top_k": r.top_k, "seed": r.seed if has("seed") else None, "max_tokens": r.max_tokens or None,
        "stop": list(r.stop)}, cfg.limits)


def stats_pb(s: dict) -> pb.SpecStats:
    return pb.SpecStats(drafted=s["drafted"], accepted=s["accepted"], mat=s["mat"],
                        target_forwards=s["target_forwards"],
                        exit_histogram={int(k): v for k, v in s["exit_histogram"].items()},
                        acceptance_per_position=s["acceptance_per_position"], wall_s=s["wall_s"],
                        proposed_at=s["proposed_at"], accepted_at=s["accepted_at"])


@serve.deployment
@serve.ingress(app)
class S2DRouter(OpenAIRoutes):
    def __init__(self, config: dict, cells: dict[str, DeploymentHandle]):
        self.cfg = EngineConfig.model_validate(config)
        self.cell_of = {t: cells[c.name] for c in self.cfg.cells for t in c.targets}
        self.targets = [t.name for t in self.cfg.targets]
        self.exits = read_exits(self.cfg.resolve(self.cfg.draft.path))
        self.cells = cells
        self.metrics = RequestMetrics()
        self.started = int(time.time())

    # -- RPCs ----------------------------------------------------------------------------------
    async def Generate(self, request: pb.GenerateRequest, grpc_context) -> pb.GenerateResponse:
        text, tokens, last = [], [], None
        try:
            async for d in self._deltas(to_request(request, self.cfg), final_only=True):
                text.append(d.text)
                tokens += d.token_ids
                last = d
            if last is None:
                raise RequestFailed("the cell ended the request without an answer")
        except Exception as e:  # noqa: BLE001 - mapped to a status, the server keeps serving
            self._fail(grpc_context, e, getattr(request, "target", ""))
            return pb.GenerateResponse()  # not raised: Serve would log a traceback (deployments/quiet.py)
        return pb.GenerateResponse(text="".join(text), token_ids=tokens, finish_reason=last.finish_reason,
                                   usage=pb.Usage(**last.usage), stats=stats_pb(last.stats), request_id=last.seq_id)

    async def GenerateStream(self, request: pb.GenerateRequest, grpc_context):
        try:
            async for d in self._deltas(to_request(request, self.cfg)):
                chunk = pb.GenerateChunk(text=d.text, token_ids=d.token_ids, finished=d.finished,
                                         finish_reason=d.finish_reason or "")
                if d.finished:
                    chunk.usage.CopyFrom(pb.Usage(**d.usage))
                    chunk.stats.CopyFrom(stats_pb(d.stats))
                yield chunk
        except Exception as e:  # noqa: BLE001 - the same status as the unary RPC
            self._fail(grpc_context, e, getattr(request, "target", ""))
            # Serve's proxy carries a status set on the context only with a message (or a raised
            # exception, which it would log with its traceback): an empty chunk ends the stream
            yield pb.GenerateChunk()

    async def ListTargets(self, request, grpc_context) -> pb.ListTargetsResponse:
        if self._undecodable(request, grpc_context):
            return pb.ListTargetsResponse()
        return pb.ListTargetsResponse(targets=self.targets, draft_exits=self.exits)

    async def Health(self, request, grpc_context) -> pb.HealthResponse:
        if self._undecodable(request, grpc_context):
            return pb.HealthResponse()
        ready, _ = await self.cells_ready()
        return pb.HealthResponse(status="ok" if ready else "loading")

    def _undecodable(self, request, grpc_context) -> bool:
        if isinstance(request, Undecodable):
            self._fail(grpc_context, RequestError(request.field, request.message))
            return True
        return False

    async def cells_ready(self) -> tuple[bool, dict[str, str]]:
        """Whether every cell is ready, and per cell: "ready" once a replica has loaded its models
        (its constructor has returned), else why not."""
        async def ready(h: DeploymentHandle) -> str:
            resp = h.check_health.remote()
            try:
                await asyncio.wait_for(resp, READY_TIMEOUT_S)
                return "ready"
            except asyncio.TimeoutError:
                resp.cancel()
                return f"loading: no replica answered in {READY_TIMEOUT_S:g} s"
            except Exception as e:  # noqa: BLE001 - a health check reports, it never fails
                return f"failed: {type(e).__name__}: {e}"[:300]

        names = list(self.cells)
        cells = dict(zip(names, await asyncio.gather(*(ready(self.cells[n]) for n in names))))
        return all(v == "ready" for v in cells.values()), cells

    async def cell_stats(self) -> dict:
        """Each cell's actor stats and busy fractions (for tests, benchmarks and operators)."""
        return {name: await h.stats.remote() for name, h in self.cells.items()}

    # -- routing -------------------------------------------------------------------------------
    async def _deltas(self, req: Request, final_only: bool = False):
        """The request's deltas from the cell hosting its target; resent with the tokens already
        streamed (and what is left of its deadline) if the cell replica is lost (a unary request,
        `final_only`, starts over). The last delta's figures go to the metrics before it is yielded."""
        if req.target not in self.cell_of:
            raise UnknownTarget(req.target, self.targets)
        cell = self.cell_of[req.target].options(stream=True)
        streamed: list[int] = []
        give_up_at, started, timeout = None, time.monotonic(), req.deadline_s(self.cfg.limits)
        while True:
            try:
                async for d in cell.generate.remote(req, streamed, final_only):
                    req.request_id = d.seq_id  # a resent request keeps its id
                    streamed += d.token_ids
                    give_up_at = None  # a replica answered: the retry window starts again
                    if d.finished:
                        self.metrics.finished_request(req.target, d.finish_reason, d.usage, d.stats, d.timing)
                    yield d
                    if d.finished:  # never resent once answered, even if the replica dies now
                        return
                return
            except REPLICA_LOST as e:
                give_up_at = give_up_at or time.monotonic() + RETRY_WINDOW_S
                if time.monotonic() > give_up_at:
                    raise Unavailable(f"no cell replica answered for {RETRY_WINDOW_S:.0f} s: {e}") from e
                log.warning("cell replica lost during %s after %d tokens; resending", req.request_id, len(streamed))
                await asyncio.sleep(0.5)
                left = timeout - (time.monotonic() - started)
                if left <= 0:
                    raise DeadlineExceeded(f"the request ran past its deadline of {timeout:g} s") from e
                req.timeout_s = left

    def _fail(self, grpc_context, e: Exception, target: str = ""):
        """Set the status that names the problem (the caller answers with an empty message)."""
        cause = cause_of(e)
        status = status_of(cause)
        if status is None:
            code, details = grpc.StatusCode.INTERNAL, internal_message(e)
        else:
            code, details = grpc.StatusCode[status.grpc], str(cause)
        grpc_context.set_code(code)
        grpc_context.set_details(details[:1000])
        self.count_failure(target, "grpc", code.name.lower(), e, status and status.http)

    def count_failure(self, target: str, protocol: str, status: str, e: BaseException, http_status: int | None):
        """A refused or failed request in the metrics (targets no cell hosts count as one label) and
        in the log: one line (`http_status`: the answer's, None for a fault the error table does not
        know); a fault of the ingress itself (a bug), with its traceback. A cell's fault was logged
        in the cell (deployments/quiet.py)."""
        target = target if target in self.cell_of else "(unknown)"
        self.metrics.failed_request(target, protocol, status)
        if http_status is not None:
            log.log(level_of(http_status), "%s request for %s refused, %s: %s", protocol, target, status,
                    str(cause_of(e))[:300])
        elif isinstance(e, RayTaskError):
            log.warning("%s request for %s failed in its cell, %s: %s", protocol, target, status, internal_message(e))
        else:
            log.error("%s request for %s failed", protocol, target, exc_info=e)
