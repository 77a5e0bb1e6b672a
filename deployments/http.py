"""The OpenAI-compatible HTTP API on the ingress replica (FastAPI through `serve.ingress`, behind
Ray Serve's HTTP proxy): /v1/models, /v1/completions, /v1/chat/completions (SSE with
`stream: true`), and /healthz. The protocol is s2d/api/openai_api.py; the routing, retries and metrics
are the router's (deployments/router.py), shared with gRPC.

An error before the first token is answered with its status; once a stream has started, an error
comes as an SSE event `{"error": ...}` before `data: [DONE]`, as vLLM sends it."""
from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException

from deployments.scrape import s2d_metrics
from s2d.api import openai_api as oa
from s2d.core.request import UnknownTarget, internal_message

app = FastAPI(title="s2d", description="OpenAI-compatible API of s2d: several targets, one shared sorted draft")


def error_response(e: oa.APIError) -> JSONResponse:
    if e.status in (429, 503):
        headers = {"Retry-After": "1"}
    elif e.status >= 500:  # a deadline or the engine's failure on this request: the same would happen again
        headers = {"x-should-retry": "false"}  # the openai client retries 5xx otherwise
    else:
        headers = None
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


@app.exception_handler(HTTPException)
async def _http_error(request: Request, e: HTTPException):  # unknown paths, wrong methods: OpenAI's shape too
    return error_response(oa.APIError(e.status_code, f"{request.method} {request.url.path}: {e.detail}",
                                      code="not_found" if e.status_code == 404 else None))


class OpenAIRoutes:
    """Mixed into the ingress deployment (S2DRouter), which provides cfg, targets, started,
    cell_of, cells_ready(), count_failure() and _deltas()."""

    @app.get("/v1/models")
    async def list_models(self):
        return oa.models(self.targets, self.started)

    @app.get("/v1/models/{model:path}")  # target names may hold a /
    async def get_model(self, model: str):
        if model not in self.cell_of:
            return error_response(oa.as_api_error(UnknownTarget(model, self.targets)))
        return oa.models([model], self.started)["data"][0]

    @app.post("/v1/completions")
    async def completions(self, request: Request):
        return await self._answer(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        return await self._answer(request, chat=True)

    @app.get("/metrics")
    async def metrics(self):
        """The s2d metrics of every node in Prometheus text format (deployments/scrape.py)."""
        return PlainTextResponse(await s2d_metrics(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/healthz")
    async def healthz(self):
        """200 once every cell has a replica with its models loaded, else 503 with each cell's state."""
        ready, cells = await self.cells_ready()
        return JSONResponse({"status": "ok" if ready else "loading", "cells": cells}, status_code=200 if ready else 503)

    # -- one request ---------------------------------------------------------------------------
    async def _answer(self, request: Request, chat: bool):
        target = ""
        try:
            data = oa.read_body(await request.body(), self.cfg.limits)
            target = data.get("model") if isinstance(data.get("model"), str) else ""
            call = oa.parse_call(data, chat, self.cfg.limits)
            deltas = self._deltas(call.request, final_only=not call.stream)
            first = await anext(deltas)  # errors before the first token get their status
        except Exception as e:  # noqa: BLE001 - mapped to a status, the server keeps serving
            return self._error(e, target)
        if not call.stream:
            await deltas.aclose()
            return oa.response(call, first.text, first.finish_reason, first.usage, first.stats)
        return StreamingResponse(self._sse(call, first, deltas), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    async def _sse(self, call: oa.Call, first, deltas):
        d, is_first = first, True
        try:
            while True:
                if d.text or is_first:
                    yield oa.sse(oa.chunk(call, d.text, first=is_first))
                    is_first = False
                if d.finished:
                    yield oa.sse(oa.chunk(call, "", d.finish_reason) | {"s2d_stats": d.stats})
                    if call.include_usage:
                        yield oa.sse(oa.usage_chunk(call, d.usage))
                    break
                d = await anext(deltas)
        except Exception as e:  # noqa: BLE001 - the stream has started: the error is its last event
            err = self._api_error(e, call.request.target)
            yield oa.sse(err.body())
        finally:
            await deltas.aclose()
        yield oa.sse("[DONE]")

    def _api_error(self, e: BaseException, target: str) -> oa.APIError:
        err = oa.as_api_error(e)
        known = err is not None
        if not known:  # a bug: the message names it without a traceback, the log has one
            err = oa.APIError(500, internal_message(e), "server_error")
        self.count_failure(target, "http", err.code or str(err.status), e, err.status if known else None)
        return err

    def _error(self, e: BaseException, target: str) -> JSONResponse:
        return error_response(self._api_error(e, target))
