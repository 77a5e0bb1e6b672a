"""The OpenAI API as s2d speaks it (no web framework here; deployments/http.py serves it): request
bodies of /v1/completions and /v1/chat/completions into a checked Request (s2d/core/request.py, the one
validation path), responses and stream chunks out, and errors in OpenAI's shape with the status a
client expects.

What s2d cannot do it refuses, naming the parameter, rather than ignore: `n` > 1, logprobs, echo,
penalties, logit_bias, tools, response formats, and any field it does not know. Extensions in the
body: `mode` (s2d | ar | fixed:E), `top_k`, `ignore_eos`, `timeout_s` (a deadline shorter than
the server's). Responses carry the speculation stats as `s2d_stats`."""
from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, ValidationError

from s2d.core.config import Limits
from s2d.core.request import (
    DeadlineExceeded,
    DuplicateRequest,
    Overloaded,
    Request,
    RequestError,
    cause_of,
    parse_request,
    status_of,
)

COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat defaults to the server's limit

# Supported nowhere in s2d; accepted only at the value that means "off".
NEUTRAL = {"n": (1,), "best_of": (1,), "logprobs": (False,), "top_logprobs": (0,), "echo": (False,),
           "suffix": (), "presence_penalty": (0, 0.0), "frequency_penalty": (0, 0.0), "repetition_penalty": (1, 1.0),
           "logit_bias": ({},), "tools": ([],), "functions": ([],), "tool_choice": ("none",),
           "function_call": ("none",), "parallel_tool_calls": (), "response_format": ({"type": "text"},),
           "modalities": (["text"],), "audio": (), "prediction": (), "web_search_options": ()}
# Metadata a client may send that changes nothing about the output.
IGNORED = {"user", "store", "metadata", "service_tier"}


class APIError(Exception):
    """An error answered in OpenAI's shape: {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def param_of(field: str) -> str:
    """An s2d request field as the OpenAI parameter it came from."""
    head, _, rest = field.partition(".")
    return {"target": "model"}.get(head, head) + (f".{rest}" if rest else "")


def as_api_error(e: BaseException) -> APIError | None:
    """The OpenAI error for an s2d error; None for a bug (the caller answers 500 and logs it)."""
    cause = cause_of(e)
    if isinstance(cause, APIError):
        return cause
    status = status_of(cause)
    if status is None:
        return None
    message, param = str(cause), None  # in OpenAI's words where they differ from ours
    if isinstance(cause, RequestError):
        param = param_of(cause.field)
        message = f"{param}: {cause.message}" if not isinstance(cause, DuplicateRequest) else message
        param = param if param != "request" else None
    elif isinstance(cause, Overloaded):
        message = f"the server is overloaded: {cause}"
    elif isinstance(cause, DeadlineExceeded):
        param = "timeout_s"
    return APIError(status.http, message, status.type, param, status.code)


def read_body(raw: bytes, limits: Limits) -> dict:
    """The JSON object of a request body, or a 4xx that says what is wrong with it. The body may be
    up to 4x the text limit: JSON escapes non-ASCII text as \\uXXXX."""
    if len(raw) > 4 * limits.max_request_bytes:
        raise APIError(413, f"request: a body of {len(raw)} bytes exceeds the limit {4 * limits.max_request_bytes}",
                       code="request_too_large")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise APIError(400, f"request: the body is not valid UTF-8 (byte {e.start})", code="invalid_json") from None
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as e:
        raise APIError(400, f"request: the body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, f"request: the body must be a JSON object, not {type(data).__name__}", code="invalid_json")
    return data


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool = False


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    # extensions
    mode: str | None = None
    top_k: int | None = None
    ignore_eos: bool | None = None
    timeout_s: float | None = None


class CompletionBody(_Body):
    prompt: str | list[str]


class TextPart(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)  # other kinds of part are refused by their type
    type: str
    text: str | None = None


class Message(BaseModel):
    """A chat message. What a client sends back of an earlier answer (`message.model_dump()`) is
    accepted: `name` (the templates s2d serves do not read it) and the empty tool fields."""

    model_config = ConfigDict(extra="forbid", strict=True)
    role: str
    content: str | list[TextPart] | None = None
    name: str | None = None
    refusal: str | None = None
    tool_calls: list | None = None
    function_call: dict | None = None
    audio: dict | None = None
    annotations: list | None = None


class ChatBody(_Body):
    messages: list[Message]
    max_completion_tokens: int | None = None


@dataclass
class Call:
    """A parsed OpenAI request: the s2d Request and how to answer it."""

    request: Request  # its target is the model
    chat: bool
    stream: bool
    include_usage: bool
    id: str
    created: int


def parse_call(data: dict, chat: bool, limits: Limits) -> Call:
    """An OpenAI request body (a decoded JSON object) as a checked s2d Request."""
    for key in list(data):
        if key in NEUTRAL:
            value = data.pop(key)
            if value is not None and not any(type(value) is type(x) and value == x for x in NEUTRAL[key]):
                raise APIError(400, f"{key}: {value!r:.60} is not supported by s2d", param=key, code="unsupported")
        elif key in IGNORED:
            data.pop(key)
    try:
        body = (ChatBody if chat else CompletionBody).model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        param = ".".join(str(x) for x in err["loc"] if x != "str" and not str(x).startswith("list["))
        msg = "unknown parameter" if err["type"] == "extra_forbidden" else err["msg"]
        raise APIError(400, f"{param or 'request'}: {msg}", param=param or None, code="invalid_value") from None
    fields = {"target": body.model, "mode": body.mode, "top_k": body.top_k, "ignore_eos": body.ignore_eos,
              "temperature": 1.0 if body.temperature is None else body.temperature,  # OpenAI's default
              "top_p": body.top_p, "seed": body.seed, "timeout_s": body.timeout_s,
              "stop": [body.stop] if isinstance(body.stop, str) else body.stop}
    max_tokens = body.max_tokens
    if chat:
        if body.max_tokens is not None and body.max_completion_tokens is not None:
            raise APIError(400, "max_completion_tokens: give it or max_tokens, not both", param="max_completion_tokens")
        max_tokens = body.max_tokens if body.max_completion_tokens is None else body.max_completion_tokens
        fields["messages"] = [_message(m, i) for i, m in enumerate(body.messages)]
        default = limits.max_new_tokens
    else:
        prompt = body.prompt
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise APIError(400, f"prompt: one prompt per request ({len(prompt)} given)", param="prompt")
            prompt = prompt[0]
        fields |= {"prompt": prompt, "raw": True}  # a completion's prompt is raw text: no chat template
        default = min(COMPLETION_MAX_TOKENS, limits.max_new_tokens)
    fields |= {"max_tokens": default, "fit_context": True} if max_tokens is None else {"max_tokens": max_tokens}
    opts = body.stream_options
    if opts is not None and not body.stream:
        raise APIError(400, "stream_options: only with stream: true", param="stream_options")
    try:
        req = parse_request(fields, limits)
    except RequestError as e:
        raise as_api_error(e) from None
    prefix = "chatcmpl" if chat else "cmpl"
    return Call(req, chat, bool(body.stream), bool(opts and opts.include_usage),
                f"{prefix}-{uuid.uuid4().hex}", int(time.time()))


def _message(m: Message, i: int) -> dict:
    for key in ("tool_calls", "function_call", "audio"):
        if getattr(m, key):
            raise APIError(400, f"messages.{i}.{key}: not supported by s2d", param=f"messages.{i}.{key}",
                           code="unsupported")
    if m.content is None and m.role != "assistant":
        raise APIError(400, f"messages.{i}.content: required", param=f"messages.{i}.content")
    return {"role": m.role, "content": _text(m.content or "", f"messages.{i}.content")}


def _text(content: str | list[TextPart], param: str) -> str:
    if isinstance(content, str):
        return content
    for j, part in enumerate(content):
        if part.type != "text" or part.text is None:
            raise APIError(400, f"{param}.{j}.type: {part.type!r:.40} is not supported (text only)",
                           param=f"{param}.{j}.type")
    return "".join(p.text for p in content)


def usage(u: dict) -> dict:
    return {"prompt_tokens": u["prompt_tokens"], "completion_tokens": u["completion_tokens"],
            "total_tokens": u["prompt_tokens"] + u["completion_tokens"]}


def _answer(call: Call, obj: str, content: dict, finish_reason: str | None) -> dict:
    """The envelope of a response or a chunk, with its one choice."""
    choice = {"index": 0, **content, "logprobs": None, "finish_reason": finish_reason}
    return {"id": call.id, "object": obj, "created": call.created, "model": call.request.target, "choices": [choice]}


def response(call: Call, text: str, finish_reason: str, u: dict, stats: dict) -> dict:
    """The whole answer of a request that did not stream."""
    content = {"message": {"role": "assistant", "content": text}} if call.chat else {"text": text}
    return _answer(call, "chat.completion" if call.chat else "text_completion", content, finish_reason) | {
        "usage": usage(u), "s2d_stats": stats}


def chunk(call: Call, text: str, finish_reason: str | None = None, first: bool = False) -> dict:
    """One streamed chunk; the first of a chat stream names the role."""
    if call.chat:
        content = {"delta": ({"role": "assistant"} if first else {}) | ({"content": text} if text or first else {})}
    else:
        content = {"text": text}
    out = _answer(call, "chat.completion.chunk" if call.chat else "text_completion", content, finish_reason)
    return out | {"usage": None} if call.include_usage else out  # as OpenAI: null until the last chunk


def usage_chunk(call: Call, u: dict) -> dict:
    """After the last choice, with stream_options.include_usage: no choices, the usage."""
    return chunk(call, "") | {"choices": [], "usage": usage(u)}


def sse(data: dict | str) -> bytes:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n".encode()


def models(targets: list[str], created: int) -> dict:
    return {"object": "list", "data": [{"id": t, "object": "model", "created": created, "owned_by": "s2d"}
                                       for t in targets]}
