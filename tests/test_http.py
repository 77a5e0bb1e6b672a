"""The OpenAI-compatible HTTP API and the Prometheus metrics of the served app: a real local Ray
cluster, Ray Serve's HTTP and gRPC proxies on 127.0.0.1, the official `openai` client, and a scrape
of Ray's real metrics endpoint. Targets: two of the test family without a chat template, and
`chat`, the large one with a template added to its tokenizer."""
from __future__ import annotations

import json
import re
import shutil
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import openai
import pytest
import ray
import requests
import yaml
from conftest import PROMPTS, loud_lines, make_config, serve_logs
from prometheus_client.parser import text_string_to_metric_families

from deployments.local import free_port, serve_locally, shutdown
from s2d.api.client import S2DClient
from s2d.core.engine import Engine, Request, greedy

TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")
SLOTS, MAX_WAITING = 4, 4
CHAT = [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "def parse(s):"}]


@pytest.fixture(scope="module")
def config(family, tmp_path_factory):
    d = tmp_path_factory.mktemp("http")
    shutil.copytree(family["large"], d / "chat")
    tok = d / "chat" / "tokenizer_config.json"
    tok.write_text(json.dumps(json.loads(tok.read_text()) | {"chat_template": TEMPLATE}))
    cfg = make_config(dict(family, chat=d / "chat"), targets=("small", "large", "chat"), max_seqs=SLOTS)
    cfg.cells[0].transport = "in_process"  # the actor transports are covered by test_serve.py
    cfg.limits.max_waiting = MAX_WAITING
    cfg.scheduling.draft_policy = "static"  # every s2d request drafts: the counters have something to count
    path = d / "engine.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump()))
    return cfg, path


class App:
    def __init__(self, path):
        self.http, self.metrics_port = free_port(), free_port()
        self.grpc = S2DClient(serve_locally(str(path), num_cpus=2, http_port=self.http, metrics_port=self.metrics_port),
                              timeout=60)
        self.url = f"http://127.0.0.1:{self.http}"
        self.client = openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0, timeout=60)

    def post(self, path: str, body: bytes | dict, **kw) -> requests.Response:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        return requests.post(self.url + path, data=data, headers={"Content-Type": "application/json"}, timeout=60, **kw)

    def scrape(self) -> dict[tuple, float]:
        """Every s2d sample of Ray's metrics endpoint: (name, labels without Ray's own) -> value,
        summed over replicas and workers."""
        text = requests.get(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10).text
        out: Counter = Counter()
        keep = {"target", "exit", "position", "finish_reason", "protocol", "status", "part", "le", "kind", "exit_index"}
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                if s.name.startswith("ray_s2d_"):
                    out[s.name, tuple(sorted((k, v) for k, v in s.labels.items() if k in keep))] += s.value
        return out


@pytest.fixture(scope="module")
def app(config):
    a = App(config[1])
    yield a
    a.client.close()
    a.grpc.close()
    shutdown()


def complete(app, prompt, **kw):
    kw.setdefault("max_tokens", 12)
    kw.setdefault("temperature", 0)
    return app.client.completions.create(model=kw.pop("model", "small"), prompt=prompt, **kw)


def test_models_are_the_targets(app):
    ids = [m.id for m in app.client.models.list()]
    assert ids == ["small", "large", "chat"]
    assert app.client.models.retrieve("large").id == "large"
    with pytest.raises(openai.NotFoundError):
        app.client.models.retrieve("nope")


def test_healthz_is_ready_with_every_cell(app):
    r = requests.get(app.url + "/healthz", timeout=10)
    assert r.status_code == 200 and r.json() == {"status": "ok", "cells": {"main": "ready"}}
    assert app.grpc.health() == "ok"


@pytest.mark.parametrize("target", ["small", "large"])
def test_greedy_completion_equals_grpc(app, target):
    for prompt in PROMPTS[:4]:
        r = complete(app, prompt, model=target, max_tokens=16)
        g = app.grpc.generate(target, prompt, max_tokens=16, raw=True)
        assert r.choices[0].text == g.text and r.choices[0].finish_reason == g.finish_reason
        assert r.usage.completion_tokens == len(g.token_ids) and r.usage.prompt_tokens == g.usage.prompt_tokens
        assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
        stats = r.model_extra["s2d_stats"]
        assert stats["target_forwards"] >= 1 and stats["drafted"] >= stats["accepted"]


def test_stream_joins_to_the_unary_text_with_usage_on_request(app):
    prompt = PROMPTS[2]
    want = complete(app, prompt, max_tokens=24)
    chunks = list(complete(app, prompt, max_tokens=24, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == want.choices[0].finish_reason
    assert not chunks[-1].choices and chunks[-1].usage.completion_tokens == want.usage.completion_tokens
    plain = list(complete(app, prompt, max_tokens=24, stream=True))
    assert all(c.usage is None for c in plain) and "".join(c.choices[0].text for c in plain) == want.choices[0].text


def test_raw_sse_ends_with_done(app):
    r = app.post("/v1/completions", {"model": "small", "prompt": "def ", "max_tokens": 4, "stream": True}, stream=True)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = [line for line in r.iter_lines(decode_unicode=True) if line]
    assert events[-1] == "data: [DONE]" and all(e.startswith("data: ") for e in events)
    assert json.loads(events[-2][6:])["choices"][0]["finish_reason"] in ("stop", "length")


def test_chat_through_the_template_equals_the_engine(app, config):
    r = app.client.chat.completions.create(model="chat", messages=CHAT, temperature=0, max_tokens=12)
    eng = Engine.from_config(config[0])
    want = eng.generate([Request(target="chat", messages=CHAT, params=greedy(12))])[0]
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == want["text"]
    assert r.usage.prompt_tokens == want["usage"]["prompt_tokens"]
    chunks = list(app.client.chat.completions.create(model="chat", messages=CHAT, temperature=0, max_tokens=12,
                                                     stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want["text"]
    parts = [{"role": "user", "content": [{"type": "text", "text": "def "}, {"type": "text", "text": "parse(s):"}]}]
    joined = [{"role": "user", "content": "def parse(s):"}]
    a, b = (app.client.chat.completions.create(model="chat", messages=m, temperature=0, max_tokens=6)
            for m in (parts, joined))
    assert a.choices[0].message.content == b.choices[0].message.content


def test_sampled_completion_with_a_seed_is_reproducible(app):
    a, b = (complete(app, "import json", temperature=0.9, top_p=0.95, seed=7, max_tokens=16) for _ in range(2))
    assert a.choices[0].text == b.choices[0].text  # draft_policy static: seeded sampling reproduces


def bad_request(app, status: int, param: str | None, **kw):
    """The error on the unary and the streaming call alike, as the openai client raises it."""
    for stream in (False, True):
        with pytest.raises(openai.APIStatusError) as e:
            if "messages" in kw:
                r = app.client.chat.completions.create(stream=stream, **kw)
            else:
                r = app.client.completions.create(stream=stream, **kw)
            list(r) if stream else None
        err = e.value.body
        assert e.value.status_code == status and err["param"] == param, (kw, e.value.status_code, err)
        assert err["message"] and err["type"], err


@pytest.mark.parametrize("kw,status,param", [
    ({"model": "nope", "prompt": "x"}, 404, "model"),
    ({"model": "small", "prompt": "x", "temperature": -1}, 400, "temperature"),
    ({"model": "small", "prompt": "x", "top_p": 0}, 400, "top_p"),
    ({"model": "small", "prompt": "", "max_tokens": 4}, 400, "prompt"),
    ({"model": "small", "prompt": "x", "max_tokens": 100_000}, 400, "max_tokens"),
    ({"model": "small", "prompt": "x", "n": 2}, 400, "n"),
    ({"model": "small", "prompt": "x", "logprobs": 2}, 400, "logprobs"),
    ({"model": "small", "prompt": "x", "presence_penalty": 0.5}, 400, "presence_penalty"),
    ({"model": "small", "prompt": ["a", "b"]}, 400, "prompt"),
    ({"model": "small", "prompt": "x", "extra_body": {"mode": "fixed:9"}}, 400, "mode"),
    ({"model": "small", "prompt": "x", "extra_body": {"top_k": -1}}, 400, "top_k"),
    ({"model": "small", "prompt": "x", "extra_body": {"timeout_s": 0}}, 400, "timeout_s"),
    ({"model": "small", "prompt": "x", "extra_body": {"max_tokn": 3}}, 400, "max_tokn"),
    ({"model": "small", "messages": [{"role": "user", "content": "hi"}]}, 400, "messages"),
    ({"model": "chat", "messages": [{"role": "user", "content": "hi"}], "tools": [
        {"type": "function", "function": {"name": "f", "parameters": {}}}]}, 400, "tools"),
    ({"model": "chat", "messages": [{"role": "user", "content": "hi"}], "logprobs": True}, 400, "logprobs"),
    ({"model": "chat", "messages": []}, 400, "messages"),
    ({"model": "chat", "messages": [{"role": "user", "content": "hi"}] * 300}, 400, "messages"),
    ({"model": "chat", "messages": [{"role": "us er", "content": "hi"}]}, 400, "messages.0.role"),
    ({"model": "chat", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     400, "messages.0.content.0.type"),
    ({"model": "chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "max_completion_tokens": 3},
     400, "max_completion_tokens"),
])
def test_errors_have_openai_shape_and_status_on_unary_and_stream(app, kw, status, param):
    bad_request(app, status, param, **kw)


BODIES = [  # (what, body bytes, status, the parameter the message names)
    ("malformed JSON", b'{"model": "small", "prompt": ', 400, "request"),
    ("a JSON array", b'["small"]', 400, "request"),
    ("invalid UTF-8", b'{"model": "small", "prompt": "\xff\xfe\xc3("}', 400, "request"),
    ("a lone surrogate", b'{"model": "small", "prompt": "x \\ud800 y"}', 400, "prompt"),
    ("max_tokens a string", b'{"model": "small", "prompt": "x", "max_tokens": "ten"}', 400, "max_tokens"),
    ("max_tokens a bool", b'{"model": "small", "prompt": "x", "max_tokens": true}', 400, "max_tokens"),
    ("max_tokens a float", b'{"model": "small", "prompt": "x", "max_tokens": 1e30}', 400, "max_tokens"),
    ("temperature NaN", b'{"model": "small", "prompt": "x", "temperature": NaN}', 400, "temperature"),
    ("temperature 1e400 (inf)", b'{"model": "small", "prompt": "x", "temperature": 1e400}', 400, "temperature"),
    ("top_p -Infinity", b'{"model": "small", "prompt": "x", "top_p": -Infinity}', 400, "top_p"),
    ("seed 2**70", b'{"model": "small", "prompt": "x", "seed": 1180591620717411303424}', 400, "seed"),
    ("model a number", b'{"model": 7, "prompt": "x"}', 400, "model"),
    ("stop a number", b'{"model": "small", "prompt": "x", "stop": 3}', 400, "stop"),
    ("20 stop strings", json.dumps({"model": "small", "prompt": "x", "stop": list("abcdefghijklmnopqrst")}).encode(),
     400, "stop"),
    ("no model", b'{"prompt": "x"}', 400, "model"),
    ("deeply nested", b'{"model": "small", "prompt": "x", "metadata": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
     400, "request"),
    ("a 6 MB body", json.dumps({"model": "small", "prompt": "x" * 6_000_000}).encode(), 413, "request"),
    ("a prompt over the text limit", json.dumps({"model": "small", "prompt": "x" * 1_100_000}).encode(), 400,
     "request"),
]


@pytest.mark.parametrize("what,body,status,param", BODIES, ids=[b[0] for b in BODIES])
def test_bad_bodies_get_a_4xx_that_names_the_problem_and_the_server_keeps_serving(app, what, body, status, param):
    for stream in (False, True):
        raw = body.replace(b"{", b'{"stream": true, ', 1) if stream else body
        r = app.post("/v1/completions", raw)
        assert r.status_code == status, (what, r.status_code, r.text[:300])
        err = r.json()["error"]
        assert err["message"].startswith(param) and err["type"] == "invalid_request_error", (what, err)
    assert complete(app, "def ", max_tokens=2).choices[0].finish_reason in ("stop", "length")


def test_denormal_temperature_is_greedy(app):
    body = b'{"model": "small", "prompt": "def ", "max_tokens": 8, "temperature": 5e-324}'
    r = app.post("/v1/completions", body)
    assert (r.status_code == 200
            and r.json()["choices"][0]["text"] == complete(app, "def ", max_tokens=8).choices[0].text)


def test_unknown_path_and_method_get_openai_shape(app):
    r = requests.get(app.url + "/v1/nothing", timeout=10)
    assert r.status_code == 404 and r.json()["error"]["message"]
    r = requests.get(app.url + "/v1/completions", timeout=10)
    assert r.status_code == 405 and r.json()["error"]["message"]


def test_deadline_is_504_before_and_an_error_event_after_the_first_token(app):
    with pytest.raises(openai.APIStatusError) as e:
        complete(app, "def decode(s):", model="large", max_tokens=200, extra_body={"timeout_s": 0.05, "mode": "ar"})
    assert e.value.status_code == 504 and e.value.body["code"] == "deadline_exceeded"
    got = []
    with pytest.raises(openai.APIError) as e:  # the stream started: the error is its last event
        for c in complete(app, "def decode(s):", model="large", max_tokens=200, stream=True,
                          extra_body={"timeout_s": 0.3, "mode": "ar", "ignore_eos": True}):
            got.append(c)
    assert got and "deadline" in str(e.value)
    r = app.post("/v1/completions", {"model": "large", "prompt": "x", "max_tokens": 200, "timeout_s": 0.05})
    assert r.status_code == 504 and r.headers["x-should-retry"] == "false"  # the openai client retries 5xx else
    running = {k: v for k, v in settled(app).items() if k[0] == "ray_s2d_num_requests_running"}
    assert running and not any(running.values()), running  # the deadline freed the slots
    assert complete(app, "def ", max_tokens=2).choices  # still serving


def test_overload_is_429_with_retry_after(app):
    def call(i):
        try:
            return complete(app, PROMPTS[i % 8], model="large", max_tokens=96,
                            extra_body={"ignore_eos": True}).choices[0].finish_reason
        except openai.RateLimitError as e:
            assert e.response.headers["retry-after"] == "1" and e.body["code"] == "overloaded"
            return 429

    n = 3 * (SLOTS + MAX_WAITING)
    with ThreadPoolExecutor(n) as pool:
        outcomes = list(pool.map(call, range(n)))
    assert 429 in outcomes and "length" in outcomes and set(outcomes) <= {429, "length"}, outcomes


# -- metrics ---------------------------------------------------------------------------------
def settled(app, timeout: float = 30) -> dict:
    """A scrape that two reports in a row agree with (what finished before is all exported)."""
    last, deadline = None, time.monotonic() + timeout
    while time.monotonic() < deadline:
        now = app.scrape()
        if now == last:
            return now
        last = now
        time.sleep(2.5)
    raise AssertionError("the metrics never settled")


def expected_increase(results: list[tuple[str, str, dict, dict]]) -> Counter:
    """The counters' increase that the returned (target, finish_reason, usage, stats) add up to,
    and the histograms' counts: one per request, ITL one per round after the first."""
    want: Counter = Counter()
    for target, finish_reason, usage, st in results:
        t = (("target", target),)
        want["ray_s2d_spec_decode_num_drafts_total", t] += st["proposed_at"][0] if st["proposed_at"] else 0
        want["ray_s2d_spec_decode_num_draft_tokens_total", t] += st["drafted"]
        want["ray_s2d_spec_decode_num_accepted_tokens_total", t] += st["accepted"]
        want["ray_s2d_target_forwards_total", t] += st["target_forwards"]
        want["ray_s2d_verified_tokens_total", t] += st["emitted"]
        want["ray_s2d_generation_tokens_total", t] += usage["completion_tokens"]
        want["ray_s2d_prompt_tokens_total", t] += usage["prompt_tokens"]
        for pos, n in enumerate(st["accepted_at"]):
            want["ray_s2d_spec_decode_num_accepted_tokens_per_pos_total", (("position", str(pos)),) + t] += n
        for depth, n in st["exit_histogram"].items():
            want["ray_s2d_spec_decode_num_draft_tokens_per_exit_total", (("exit", str(depth)),) + t] += n
        want["ray_s2d_requests_finished_total", (("finish_reason", finish_reason),) + t] += 1
        for hist in ("time_to_first_token", "e2e_request_latency", "request_queue"):
            want[f"ray_s2d_{hist}_seconds_count", t] += 1
        want["ray_s2d_mean_accepted_tokens_count", t] += 1
        want["ray_s2d_inter_token_latency_seconds_count", t] += st["target_forwards"] - 1
    return Counter({k: v for k, v in want.items() if v})


def grpc_stats(r) -> dict:
    """A gRPC response's stats in the fields the HTTP API returns."""
    s = r.stats
    return {"drafted": s.drafted, "accepted": s.accepted, "target_forwards": s.target_forwards,
            "emitted": len(r.token_ids), "proposed_at": list(s.proposed_at), "accepted_at": list(s.accepted_at),
            "exit_histogram": dict(s.exit_histogram)}


def test_counters_increase_by_exactly_the_returned_stats(app):
    """Over HTTP unary and stream and gRPC, greedy and sampled, every mode: a scrape's increase of
    each counter, per target, exit and position, is the sum of the stats the responses returned."""
    before = settled(app)
    results = []
    for i, (target, mode) in enumerate([("small", "s2d"), ("large", "s2d"), ("large", "fixed:1"), ("chat", "fixed:3"),
                                        ("small", "fixed:2"), ("large", "ar")] * 2):
        r = complete(app, PROMPTS[10 + i], model=target, max_tokens=20, temperature=0.8 * (i % 2), seed=i,
                     extra_body={"mode": mode})
        results.append((target, r.choices[0].finish_reason, r.usage.model_dump(), r.model_extra["s2d_stats"]))
    stream = list(complete(app, PROMPTS[31], model="small", max_tokens=20, stream=True,
                           stream_options={"include_usage": True}))
    end = next(c for c in stream if c.choices and c.choices[0].finish_reason)
    results.append(("small", end.choices[0].finish_reason, stream[-1].usage.model_dump(), end.model_extra["s2d_stats"]))
    for mode in ("s2d", "fixed:2"):
        g = app.grpc.generate("large", PROMPTS[30], max_tokens=20, mode=mode)
        usage = {"prompt_tokens": g.usage.prompt_tokens, "completion_tokens": g.usage.completion_tokens}
        results.append(("large", g.finish_reason, usage, grpc_stats(g)))
    want = expected_increase(results)
    assert sum(v for (name, _), v in want.items() if "per_exit" in name) > 0, "nothing was drafted"
    after = settled(app)
    names = {name for name, _ in want}
    got = Counter({k: after[k] - before.get(k, 0) for k in after if k[0] in names and after[k] != before.get(k, 0)})
    assert got == want, {k: (got.get(k), want.get(k)) for k in set(got) | set(want) if got.get(k) != want.get(k)}


def test_load_gauges_and_tick_counters_are_exported(app):
    s = settled(app)
    slots = {dict(k[1])["target"]: v for k, v in s.items() if k[0] == "ray_s2d_kv_slots_total"}
    assert slots == {"small": SLOTS, "large": SLOTS, "chat": SLOTS, "(draft)": 8}
    assert all(v == 0 for k, v in s.items() if k[0] in ("ray_s2d_num_requests_running", "ray_s2d_kv_slots_used"))
    assert {dict(k[1])["part"] for k in s if k[0] == "ray_s2d_tick_seconds_total"} == {"draft", "verify", "engine"}
    assert any(k[0] == "ray_s2d_draft_policy_k" for k in s)


def test_failed_requests_are_counted_by_status(app):
    before = settled(app)
    with pytest.raises(openai.NotFoundError):
        complete(app, "x", model="nope")
    with pytest.raises(grpc.RpcError):
        app.grpc.generate("small", "x", temperature=-1.0)
    after = settled(app)
    for target, protocol, status in [("(unknown)", "http", "model_not_found"), ("small", "grpc", "invalid_argument")]:
        key = ("ray_s2d_requests_failed_total", (("protocol", protocol), ("status", status), ("target", target)))
        assert after[key] - before.get(key, 0) == 1, key


def test_every_metric_of_the_grafana_dashboard_is_exported(app):
    dash = json.loads((Path(__file__).resolve().parents[1] / "cluster" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    used = {m for e in exprs for m in re.findall(r"ray_s2d_\w+", e)}
    complete(app, "def ", max_tokens=8, extra_body={"mode": "fixed:2"})  # this test's own traffic
    with pytest.raises(openai.NotFoundError):
        complete(app, "x", model="nope")
    exported = {name for name, _ in settled(app)}
    assert len(used) >= 15 and used <= exported, used - exported


def test_healthz_is_503_while_a_cell_reloads(app):
    """Last: it kills the cell replica. /healthz turns 503 naming the cell, then 200 once a new
    replica has loaded its models."""
    victims = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
               if "SERVE_REPLICA" in a["name"] and "cell-main" in a["name"]]
    assert victims
    for name in victims:
        ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
    seen, deadline = [], time.monotonic() + 120
    while time.monotonic() < deadline:
        r = requests.get(app.url + "/healthz", timeout=30)
        seen.append(r.status_code)
        if r.status_code == 503:
            assert r.json()["status"] == "loading" and r.json()["cells"]["main"] != "ready"
        if 503 in seen and r.status_code == 200:
            break
        time.sleep(0.2)
    assert 503 in seen and seen[-1] == 200, seen
    assert complete(app, "def ", max_tokens=2).choices


def test_the_http_port_serves_the_s2d_metrics_of_every_node(app):
    """GET /metrics on the API port, where load tools look (AIPerf found a 404 there): the same s2d
    samples as Ray's export port, in the Prometheus text format, and nothing but s2d's families.
    Compared between two export scrapes that agree (a replaced replica's gauges expire meanwhile)."""
    complete(app, PROMPTS[40], model="small", max_tokens=4)
    keep = {"target", "exit", "position", "finish_reason", "protocol", "status", "part", "le", "kind", "exit_index"}
    for _ in range(10):
        before = settled(app)
        r = requests.get(f"{app.url}/metrics", timeout=10)
        if app.scrape() == before:
            break
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain; version=0.0.4")
    families = list(text_string_to_metric_families(r.text))
    assert families and all(f.name.startswith("ray_s2d_") for f in families)
    at_http: Counter = Counter()
    for fam in families:
        for s in fam.samples:
            at_http[s.name, tuple(sorted((k, v) for k, v in s.labels.items() if k in keep))] += s.value
    assert at_http == before


def test_metrics_of_several_nodes_merge_into_one_family_each():
    """Two nodes' exports: each s2d family once (HELP and TYPE once, every node's samples under it),
    other families left out; Prometheus's own parser reads the result."""
    from deployments.scrape import merge

    node = ("# HELP ray_s2d_generation_tokens_total Tokens.\n# TYPE ray_s2d_generation_tokens_total counter\n"
            'ray_s2d_generation_tokens_total{{target="t",NodeAddress="{ip}"}} {n}\n'
            "# HELP ray_s2d_ttft_seconds TTFT.\n# TYPE ray_s2d_ttft_seconds histogram\n"
            'ray_s2d_ttft_seconds_bucket{{le="1.0",NodeAddress="{ip}"}} 1.0\n'
            'ray_s2d_ttft_seconds_bucket{{le="+Inf",NodeAddress="{ip}"}} 1.0\n'
            'ray_s2d_ttft_seconds_count{{NodeAddress="{ip}"}} 1.0\nray_s2d_ttft_seconds_sum{{NodeAddress="{ip}"}} 0.5\n'
            "# HELP ray_tasks Ray's own.\n# TYPE ray_tasks gauge\nray_tasks 3.0\n")
    text = merge([node.format(ip="10.0.0.1", n=5), node.format(ip="10.0.0.2", n=7)])
    assert text.count("# TYPE ray_s2d_generation_tokens_total") == 1 and "ray_tasks" not in text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert set(families) == {"ray_s2d_generation_tokens", "ray_s2d_ttft_seconds"}
    assert sum(s.value for s in families["ray_s2d_generation_tokens"].samples) == 12
    assert sum(s.value for s in families["ray_s2d_ttft_seconds"].samples if s.name.endswith("_count")) == 2


def test_http_refusals_log_one_quiet_line_each(app):
    """As on gRPC (tests/test_reliability.py): each refused HTTP call adds one INFO line to the
    ingress's log, and nothing at WARNING or above, and no traceback, anywhere."""
    before = serve_logs()
    bad = [{"model": "small", "prompt": "x", "max_tokens": 10**6}, {"model": "nope", "prompt": "x"},
           {"model": "small", "prompt": "x", "temperature": -1}, b"{not json", {"model": "small"}]
    for body in bad:
        assert 400 <= app.post("/v1/completions", body).status_code < 500
    time.sleep(2)  # the replicas' file handlers
    lines = serve_logs(since=before)
    assert not loud_lines(lines), loud_lines(lines)[:5]
    ours = [line for name, line in lines if "router" in name and " refused, " in line]
    assert len(ours) == len(bad) and all(line.startswith("INFO") for line in ours), ours
