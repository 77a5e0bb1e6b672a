"""The OpenAI protocol layer alone (s2d/api/openai_api.py): what a body becomes, its defaults, what is
refused, and the status of every s2d error. tests/test_http.py serves it for real."""
from __future__ import annotations

import pytest

from s2d.api.openai_api import APIError, as_api_error, chunk, parse_call, read_body, usage_chunk
from s2d.core.config import Limits
from s2d.core.request import (
    DeadlineExceeded,
    DuplicateRequest,
    Overloaded,
    RequestError,
    RequestFailed,
    Unavailable,
    UnknownTarget,
)

LIMITS = Limits(max_new_tokens=300)


def test_completion_defaults_follow_openai():
    c = parse_call({"model": "m", "prompt": "hi"}, False, LIMITS)
    r = c.request
    assert r.params.temperature == 1.0 and r.params.max_tokens == 16 and r.fit_context and r.raw
    assert r.prompt == "hi" and r.target == "m" and not c.stream and c.id.startswith("cmpl-")


def test_chat_defaults_to_what_the_limit_allows_and_joins_text_parts():
    c = parse_call({"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "a"},
                                                                          {"type": "text", "text": "b"}]}]},
                   True, LIMITS)
    assert c.request.params.max_tokens == 300 and c.request.fit_context and not c.request.raw
    assert c.request.messages == [{"role": "user", "content": "ab"}] and c.id.startswith("chatcmpl-")


def test_an_earlier_answer_sent_back_is_accepted_and_tool_calls_refused():
    answer = {"role": "assistant", "content": None, "refusal": None, "tool_calls": None, "name": "bot"}
    c = parse_call({"model": "m", "messages": [{"role": "user", "content": "hi", "name": "ann"}, answer]}, True, LIMITS)
    assert c.request.messages == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]
    for bad, param in [({"tool_calls": [{"id": "1"}]}, "messages.1.tool_calls"),
                       ({"role": "user"}, "messages.1.content")]:
        with pytest.raises(APIError) as e:
            parse_call({"model": "m", "messages": [{"role": "user", "content": "hi"}, answer | bad]}, True, LIMITS)
        assert e.value.status == 400 and e.value.param == param


def test_stream_chunks_carry_null_usage_only_when_usage_is_asked():
    asked = parse_call({"model": "m", "prompt": "x", "stream": True, "stream_options": {"include_usage": True}},
                       False, LIMITS)
    plain = parse_call({"model": "m", "prompt": "x", "stream": True}, False, LIMITS)
    assert chunk(asked, "a")["usage"] is None and "usage" not in chunk(plain, "a")
    last = usage_chunk(asked, {"prompt_tokens": 2, "completion_tokens": 3})
    assert last["choices"] == [] and last["usage"] == {"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5}


def test_asked_max_tokens_is_kept_and_extensions_pass_through():
    c = parse_call({"model": "m", "prompt": "x", "max_tokens": 7, "temperature": 0, "stop": "\n", "seed": 3,
                    "mode": "fixed:2", "top_k": 5, "ignore_eos": True, "timeout_s": 2, "stream": True,
                    "stream_options": {"include_usage": True}, "n": 1, "logprobs": None, "user": "u"}, False, LIMITS)
    r = c.request
    assert (r.params.max_tokens, r.fit_context, r.params.stop, r.params.seed) == (7, False, ["\n"], 3)
    assert (r.mode, r.params.top_k, r.params.ignore_eos, r.timeout_s) == ("fixed:2", 5, True, 2)
    assert c.stream and c.include_usage


@pytest.mark.parametrize("body,param", [
    ({"n": 2}, "n"), ({"n": True}, "n"), ({"logprobs": 0}, "logprobs"), ({"echo": True}, "echo"),
    ({"frequency_penalty": 0.1}, "frequency_penalty"), ({"logit_bias": {"1": 5}}, "logit_bias"),
    ({"best_of": 3}, "best_of"), ({"suffix": "x"}, "suffix"), ({"bogus": 1}, "bogus"),
    ({"temperature": "0"}, "temperature"), ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"prompt": [1, 2]}, "prompt"), ({"model": None}, "model"), ({"timeout_s": 1e9}, "timeout_s"),
    ({"max_tokens": 0}, "max_tokens"), ({"seed": 2**64}, "seed"),
])
def test_refusals_name_the_parameter(body, param):
    with pytest.raises(APIError) as e:
        parse_call({"model": "m", "prompt": "x"} | body, False, LIMITS)
    assert e.value.status == 400 and e.value.param == param and e.value.message.startswith(param), e.value.body()


def test_read_body_refuses_what_is_not_a_json_object():
    assert read_body(b'{"a": 1}', LIMITS) == {"a": 1}
    for raw, status in [(b"{", 400), (b"[1]", 400), (b'"x"', 400), (b"\xff", 400), (b"x" * ((4 << 20) + 1), 413),
                        (b"x" * (4 << 20), 400)]:
        with pytest.raises(APIError) as e:
            read_body(raw, LIMITS)
        assert e.value.status == status and e.value.message.startswith("request: ")


@pytest.mark.parametrize("error,status,param", [
    (UnknownTarget("x", ["m"]), 404, "model"), (RequestError("messages.1.role", "bad"), 400, "messages.1.role"),
    (RequestError("request", "too big"), 400, None), (DuplicateRequest("request_id", "live"), 409, "request_id"),
    (Overloaded("full"), 429, None), (DeadlineExceeded("late"), 504, "timeout_s"), (Unavailable("gone"), 503, None),
    (RequestFailed("nan"), 500, None),
])
def test_every_s2d_error_has_its_status(error, status, param):
    e = as_api_error(error)
    assert (e.status, e.param) == (status, param) and set(e.body()["error"]) == {"message", "type", "param", "code"}
    assert as_api_error(ValueError("a bug")) is None  # the caller answers 500 and logs it
