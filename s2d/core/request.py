"""A request and the one validation path every entry point takes: the in-process engine and gRPC
unary and stream (deployments/router.py). `parse_request` turns wire data (a dict from a proto
message, or JSON) into a `Request`; `check_request` checks any `Request` against the config's limits.
The frontend calls `check_request` on every request it prepares, and the ingress calls it at the
edge, so a malformed request never reaches a cell; what needs the target's tokenizer (prompt tokens,
the context, the chat template, the mode's exit) follows in the cell (TargetFrontend.prepare).
Every refusal is a RequestError that names the field."""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from pydantic import ValidationError

from s2d.core.config import Limits, SamplingParams


class RequestError(ValueError):
    """Bad input; `field` names the offending request field (dotted: `messages.2.role`)."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field, self.message = field, message

    def __reduce__(self):  # crosses process boundaries (cell -> ingress) with its field
        return type(self), (self.field, self.message)


class UnknownTarget(RequestError):
    def __init__(self, name: str, known: list[str]):
        super().__init__("target", f"{name!r:.140} is not served here; known: {known}")
        self.name, self.known = name, known

    def __reduce__(self):
        return type(self), (self.name, self.known)


class DuplicateRequest(RequestError):
    """A request_id that is already live."""


class Overloaded(RuntimeError):
    """The queue is full: try again later."""


class RequestFailed(RuntimeError):
    """The engine failed on this request alone (its batch-mates go on)."""


class Unavailable(RuntimeError):
    """No replica of the request's cell answered (for the ingress's retry window)."""


class DeadlineExceeded(RuntimeError):
    """The request ran past its deadline (Request.timeout_s, at most Limits.max_request_s)."""


@dataclass(frozen=True)
class Status:
    """How an error is answered on each wire: the gRPC status code's name, the HTTP status, and
    OpenAI's error type and code."""

    grpc: str
    http: int
    type: str
    code: str


# The one error table, for both ingresses (deployments/router.py, s2d/api/openai_api.py); the first
# class an error is an instance of decides, so subclasses come before RequestError.
STATUSES: list[tuple[type[Exception], Status]] = [
    (UnknownTarget, Status("NOT_FOUND", 404, "invalid_request_error", "model_not_found")),
    (DuplicateRequest, Status("ALREADY_EXISTS", 409, "invalid_request_error", "duplicate_request")),
    (RequestError, Status("INVALID_ARGUMENT", 400, "invalid_request_error", "invalid_value")),
    (Overloaded, Status("RESOURCE_EXHAUSTED", 429, "rate_limit_error", "overloaded")),
    (Unavailable, Status("UNAVAILABLE", 503, "service_unavailable_error", "unavailable")),
    (DeadlineExceeded, Status("DEADLINE_EXCEEDED", 504, "timeout_error", "deadline_exceeded")),
    (RequestFailed, Status("INTERNAL", 500, "server_error", "engine_failed")),
]


def status_of(e: BaseException) -> Status | None:
    """The answer to an s2d error (unwrapped by cause_of first); None for anything else: a bug."""
    return next((s for cls, s in STATUSES if isinstance(e, cls)), None)


def cause_of(e: BaseException) -> BaseException:
    """The error itself: a cell's error arrives at the ingress wrapped in a RayTaskError."""
    return getattr(e, "cause", None) or e


def internal_message(e: BaseException) -> str:
    """What a client is told of an error s2d did not expect (a bug): its name, no traceback."""
    cause = cause_of(e)
    return f"internal error: {type(cause).__name__}: {cause}"[:1000]


@dataclass
class Request:
    target: str
    prompt: str | None = None
    messages: list[dict] | None = None
    params: SamplingParams = field(default_factory=SamplingParams)
    mode: str = "s2d"  # s2d | ar | fixed:E (E an exit depth of the draft)
    raw: bool = False  # skip the chat template for `prompt`
    request_id: str | None = None
    timeout_s: float | None = None  # served: the deadline from arrival in the cell; None: Limits.max_request_s
    fit_context: bool = False  # max_tokens was not asked: shorten it to what the context leaves

    def deadline_s(self, limits: Limits) -> float:
        return self.timeout_s or limits.max_request_s  # check_request keeps timeout_s within the limit


NAME = (re.compile(r"[\x21-\x7e]{1,128}"), "1 to 128 visible ASCII characters (no spaces or control characters)")
ROLE = (re.compile(r"[a-z_]{1,32}"), "1 to 32 characters of a-z and _")


def utf8_size(name: str, s) -> int:
    """Bytes of `s` in UTF-8; a str that cannot be encoded (a lone surrogate, from JSON) is refused."""
    if not isinstance(s, str):
        raise RequestError(name, f"must be a string, got {type(s).__name__}")
    try:
        return len(s.encode("utf-8"))
    except UnicodeEncodeError as e:
        raise RequestError(name, f"not valid UTF-8 (a lone surrogate at character {e.start})") from None


def check_name(name: str, s, rule: tuple[re.Pattern, str] = NAME):
    """Targets, modes, request ids (NAME) and roles (ROLE): echoed in responses and logs, so plain."""
    if not isinstance(s, str) or not rule[0].fullmatch(s):
        raise RequestError(name, f"{s!r:.60} is not {rule[1]}")


def check_request(req: Request, limits: Limits) -> Request:
    """Refuse what no target could serve: malformed fields and anything past the config's limits.
    Checks that need the target (prompt tokens, the mode's exit, the chat template) follow in
    TargetFrontend.prepare."""
    check_name("target", req.target)
    check_name("mode", req.mode)
    if req.request_id is not None:
        check_name("request_id", req.request_id)
    if not isinstance(req.params, SamplingParams):
        raise RequestError("params", f"must be SamplingParams, got {type(req.params).__name__}")
    for name in ("raw", "fit_context"):
        if not isinstance(getattr(req, name), bool):
            raise RequestError(name, "must be a bool")
    t = req.timeout_s
    if t is not None and (isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 < t <= limits.max_request_s):
        raise RequestError("timeout_s", f"{t!r:.40} is not a number of seconds in (0, {limits.max_request_s:g}]")
    size = 0
    if req.messages is not None and req.prompt is not None:
        raise RequestError("messages", "give either prompt or messages, not both")
    if req.messages is not None:
        if not isinstance(req.messages, list) or not req.messages:
            raise RequestError("messages", "must be a non-empty list")
        if len(req.messages) > limits.max_messages:
            raise RequestError("messages", f"{len(req.messages)} messages exceed the limit {limits.max_messages}")
        for i, m in enumerate(req.messages):
            if not isinstance(m, dict) or set(m) != {"role", "content"}:
                raise RequestError(f"messages.{i}", "must have exactly a role and a content")
            check_name(f"messages.{i}.role", m["role"], ROLE)
            size += utf8_size(f"messages.{i}.content", m["content"])
    elif req.prompt is None:
        raise RequestError("prompt", "give a prompt or messages")
    else:
        size += utf8_size("prompt", req.prompt)
        if not req.prompt:
            raise RequestError("prompt", "empty prompt")
    p = req.params
    if p.max_tokens > limits.max_new_tokens:
        raise RequestError("max_tokens", f"{p.max_tokens} exceeds the limit {limits.max_new_tokens}")
    if len(p.stop) > limits.max_stop:
        raise RequestError("stop", f"{len(p.stop)} stop strings exceed the limit {limits.max_stop}")
    for i, s in enumerate(p.stop):
        n = utf8_size(f"stop.{i}", s)
        if not s or len(s) > limits.max_stop_chars:
            raise RequestError(f"stop.{i}", f"a stop string must have 1 to {limits.max_stop_chars} characters")
        size += n
    if size > limits.max_request_bytes:
        raise RequestError("request", f"{size} bytes of text exceed the limit {limits.max_request_bytes}")
    return req


def parse_request(data: dict, limits: Limits) -> Request:
    """A Request from wire data: {target, prompt | messages, mode, raw, request_id, and the
    SamplingParams fields}; absent and None fields take their defaults."""
    data = {k: v for k, v in data.items() if v is not None}
    req_keys = {"target", "prompt", "messages", "mode", "raw", "request_id", "timeout_s", "fit_context"}
    try:
        params = SamplingParams.model_validate({k: v for k, v in data.items() if k not in req_keys})
    except ValidationError as e:
        err = e.errors()[0]
        raise RequestError(".".join(map(str, err["loc"])) or "request", err["msg"]) from None
    req = Request(target=data.get("target", ""), prompt=data.get("prompt"), messages=data.get("messages"),
                  params=params, mode=data.get("mode", "s2d"), raw=data.get("raw", False),
                  request_id=data.get("request_id"), timeout_s=data.get("timeout_s"),
                  fit_context=data.get("fit_context", False))
    return check_request(req, limits)
