"""Engine behaviour a serving user relies on: clear errors, other requests unharmed, streaming,
stop strings, stats, the CLI."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import yaml
from conftest import PROMPTS, make_config
from pydantic import ValidationError

from s2d.core.config import EngineConfig, Limits, SamplingParams, load_config
from s2d.core.engine import Engine, Request, greedy
from s2d.core.request import RequestError, UnknownTarget


@pytest.fixture(scope="module")
def engine(family):
    return Engine.from_config(make_config(family))


@pytest.mark.parametrize("kw,field", [
    (dict(temperature=-0.5), "temperature"), (dict(temperature=math.nan), "temperature"),
    (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"), (dict(max_tokens=0), "max_tokens"),
    (dict(top_k=-1), "top_k"),
])
def test_bad_sampling_params_name_the_field(kw, field):
    with pytest.raises(ValidationError) as e:
        SamplingParams(**kw)
    assert e.value.errors()[0]["loc"] == (field,)


@pytest.mark.parametrize("data,field", [
    ({"prompt": "a\ud800b"}, "prompt"),  # a lone surrogate (JSON can carry one): not UTF-8
    ({"prompt": 5}, "prompt"), ({"prompt": None, "messages": [{"role": "user", "content": 3}]}, "messages.0.content"),
    ({"prompt": None, "messages": [{"role": "user"}]}, "messages.0"), ({"prompt": None, "messages": []}, "messages"),
    ({"prompt": None, "messages": [{"role": "user", "content": "x", "name": "n"}]}, "messages.0"),
    ({"temperature": "0.5"}, "temperature"), ({"top_k": True}, "top_k"), ({"max_tokens": 2.5}, "max_tokens"),
    ({"seed": 2**64}, "seed"), ({"stop": "abc"}, "stop"), ({"stop": ["a\ud800"]}, "stop.0"),
    ({"bogus": 1}, "bogus"), ({"raw": "yes"}, "raw"), ({"mode": None, "target": 3}, "target"),
    ({"temperature": 1e309}, "temperature"), ({"top_p": 5e-324}, None),  # a float64 denormal top_p is valid
])
def test_wire_data_is_checked_field_by_field(data, field):
    from s2d.core.request import parse_request

    data = {"target": "small", "prompt": "x", **data}
    if field is None:
        assert parse_request(data, Limits()).params.top_p > 0
        return
    with pytest.raises(RequestError) as e:
        parse_request(data, Limits())
    assert e.value.field == field, str(e.value)


def test_bad_requests_fail_alone_while_others_complete(engine):
    good = Request(target="small", prompt="def foo(x):", params=greedy(24, ignore_eos=True))
    expected = engine.generate([good])[0]["token_ids"]
    sid = engine.add_request(good)
    engine.step()  # the good request is mid-flight while bad ones arrive
    bad = [
        (Request(target="small", prompt=""), "prompt"),
        (Request(target="nope", prompt="x"), "target"),
        (Request(target="small", prompt="x", params=greedy(10_000)), "max_tokens"),
        (Request(target="small", prompt="x", params=greedy(256)), "max_tokens"),  # past the 256-token context
        (Request(target="small", prompt=" ".join(map(str, range(400)))), "prompt"),  # longer than the context
        (Request(target="small", prompt="x", mode="fixed:7"), "mode"),
        (Request(target="small", prompt="x", mode="medusa"), "mode"),
    ]
    for req, field in bad:
        with pytest.raises(RequestError) as e:
            engine.add_request(req)
        assert e.value.field == field, str(e.value)
    with pytest.raises(UnknownTarget):
        engine.add_request(Request(target="nope", prompt="x"))
    seq = engine.running[sid]
    while engine.has_work:  # to the end, the release of its caches included
        engine.step()
    assert seq.out == expected and engine.proposer.held == 0 and engine.verifiers["small"].held == 0


MARKED = 0.777  # the temperature of the requests whose probabilities the fault below poisons


def test_a_failure_inside_one_sequence_ends_it_alone(family, monkeypatch):
    """Fault injection in the sampling step (NaN probabilities for marked requests): drafting fails
    for the s2d ones, the target's rejection step for the ar ones. Each fails alone with finish
    reason "error" and a message; its batch-mates of both targets give exactly their outputs."""
    import s2d.worker.workers

    real = s2d.worker.workers.probs_from_logits

    def poisoned(logits, params):
        p = real(logits, params)
        return p * float("nan") if params.temperature == MARKED else p

    cfg = make_config(family)
    cfg.scheduling.draft_policy = "static"  # the s2d requests must draft (the goodput policy may turn it off)
    engine = Engine.from_config(cfg)
    good = [Request(target=t, prompt=p, params=greedy(16, ignore_eos=True), mode=m)
            for t, p, m in zip(["small", "large"] * 3, PROMPTS, ["s2d", "ar", "fixed:2"] * 2)]
    want = [r["token_ids"] for r in engine.generate(good)]
    monkeypatch.setattr(s2d.worker.workers, "probs_from_logits", poisoned)
    bad = [Request(target=t, prompt="x = 1", mode=m, params=SamplingParams(temperature=MARKED, max_tokens=16))
           for t, m in [("small", "s2d"), ("large", "ar")]]
    results = engine.generate([good[0], bad[0], *good[1:4], bad[1], *good[4:]])
    failed = [results[1], results[5]]
    assert [r["finish_reason"] for r in failed] == ["error", "error"]
    assert "drafting failed" in failed[0]["error"] and "not finite" in failed[1]["error"]
    assert [r["token_ids"] for r in results[:1] + results[2:5] + results[6:]] == want
    while engine.has_work:
        engine.step()
    assert engine.proposer.held == 0 and all(v.held == 0 for v in engine.verifiers.values())


def test_a_failed_sequences_cache_slot_is_cleared_before_reuse(family):
    """A forward gone bad leaves NaN in a slot; masked positions still enter attention (0 * NaN),
    so without clearing, the next sequence in that slot would fail or decode garbage."""
    from s2d.core.engine import load_target
    from s2d.worker.workers import Verifier, VerifyItem

    cfg = make_config(family, targets=("small",))
    v, fresh = Verifier(load_target(cfg, "small")), Verifier(load_target(cfg, "small"))
    item = lambda seq, toks: VerifyItem(seq, toks, [], None, greedy(1), 0)  # noqa: E731
    v.verify([item("a", [5, 6, 7, 8])])
    slot = v.table.slot["a"]
    for k in v.lm.cache.k:
        k[slot, :, :4] = float("nan")
    assert "not finite" in v.verify([item("a", [5, 6, 7, 8, 9])])[0].error
    v.release("a")
    b = v.verify([item("b", [1, 2, 3])])[0]
    assert v.table.slot["b"] == slot and b.error is None and b.tokens == fresh.verify([item("b", [1, 2, 3])])[0].tokens


def test_streaming_gives_the_same_text_as_unary(engine):
    req = Request(target="large", prompt="import json", params=greedy(30, ignore_eos=True))
    unary = engine.generate([req])[0]
    chunks = list(engine.stream(req))
    assert "".join(c.text for c in chunks) == unary["text"]
    assert sum((c.token_ids for c in chunks), []) == unary["token_ids"]
    assert chunks[-1].finished and chunks[-1].finish_reason == "length"


def test_stop_string_ends_the_text(engine):
    req = Request(target="small", prompt="class A", params=greedy(40, ignore_eos=True))
    full = engine.generate([req])[0]["text"]
    stop = full[5:8]
    res = engine.generate([Request(target="small", prompt="class A",
                                   params=greedy(40, stop=[stop], ignore_eos=True))])[0]
    assert res["finish_reason"] == "stop" and res["text"] == full[: full.find(stop)]
    assert not engine.has_work or not engine.running  # the frontend found it; the scheduler dropped the sequence


def test_the_loop_runs_the_frontend_off_the_scheduler_thread(engine):
    """Served, a request's template, tokens, text and stop strings are worked out on the event loop
    (EngineLoop.stream), and the scheduler's thread never calls the tokenizer; a stop string found
    there ends the stream exactly where the in-process engine ends it, and frees the sequence."""
    import asyncio
    import threading

    from s2d.core.loop import EngineLoop

    req = Request(target="small", prompt="class A", params=greedy(40, ignore_eos=True))
    full = engine.generate([req])[0]["text"]
    stopped = Request(target="small", prompt="class A", params=greedy(40, stop=[full[5:8]], ignore_eos=True))
    expected = engine.generate([stopped])[0]
    tok = engine.frontends["small"].tokenizer
    threads = set()
    calls = {name: getattr(tok, name) for name in ("__call__", "decode", "apply_chat_template")}

    class Spy(type(tok)):
        def __call__(self, *a, **kw):
            threads.add(threading.current_thread().name)
            return calls["__call__"](*a, **kw)

        def decode(self, *a, **kw):
            threads.add(threading.current_thread().name)
            return calls["decode"](*a, **kw)

    loop = EngineLoop(engine.core)
    tok.__class__ = Spy
    try:
        async def run():  # one event loop for both, as in a cell
            out = []
            for r in (stopped, req):
                out.append([d async for d in loop.stream(r)])
            return out

        streamed, plain = asyncio.run(run())
    finally:
        tok.__class__ = Spy.__mro__[1]
        loop.shutdown()
    assert "".join(d.text for d in streamed) == expected["text"] and streamed[-1].finish_reason == "stop"
    assert sum((d.token_ids for d in streamed), []) == expected["token_ids"]
    assert "".join(d.text for d in plain) == full
    assert threads and "s2d-scheduler" not in threads, threads
    assert not engine.running and not engine.scheduler.waiting


def test_stats_count_what_happened(engine):
    res = engine.generate([Request(target="small", prompt="for i in range(10):",
                                   params=greedy(32, ignore_eos=True))])[0]
    s = res["stats"]
    assert s["mat"] == pytest.approx(32 / s["target_forwards"], rel=0.2)
    assert sum(s["exit_histogram"].values()) == s["drafted"] and s["accepted"] <= s["drafted"]
    assert len(s["acceptance_per_position"]) <= 5


def test_load_counts_running_and_waiting_requests_and_slots(engine):
    """What the cells' gauges export (deployments/metrics.py LoadMetrics)."""
    seqs = [engine.scheduler.add(Request(target="small", prompt=p, params=greedy(4))) for p in PROMPTS[:10]]
    seqs.append(engine.scheduler.add(Request(target="large", prompt="x", params=greedy(4))))
    load = engine.scheduler.load()
    assert load["targets"]["small"] == {"running": 8, "waiting": 2, "kv_slots": 8}
    assert load["targets"]["large"]["waiting"] == 1 and load["draft"] == {"running": 8, "kv_slots": 8}
    assert set(load["policy"]) == {(t, k) for t in ("small", "large") for k in ("greedy", "sampled")}
    while any(not s.finished for s in seqs):
        engine.step()
    engine.step()  # releases the last slots
    load = engine.scheduler.load()
    assert all(v["running"] == v["waiting"] == 0 for v in load["targets"].values())
    assert load["breakdown"].verify_s > 0


def test_config_errors_name_the_field(tmp_path, family):
    bad = {"draft": {"path": str(family["draft"])}, "targets": [{"name": "a", "path": "x", "profile": {"k_max": 0}}]}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(bad))
    with pytest.raises(ValidationError, match="targets.0.profile.k_max"):
        load_config(tmp_path / "c.yaml")
    with pytest.raises(ValidationError, match="duplicate"):
        EngineConfig.model_validate({"draft": {"path": "d"}, "targets": [{"name": "a", "path": "x"}] * 2})
    with pytest.raises(RequestError, match="thresholds"):  # 2 thresholds for a 3-exit draft
        Engine.from_config(make_config(family, targets=("small",), profile={"thresholds": [0.5, 0.0]}))


@pytest.mark.parametrize("draft", ["draft", "full-draft"])  # exits [1, 2, 3] and [2, 4]: defaults fit any draft
def test_cli_generate_json_s2d_equals_ar(family, draft):
    args = [sys.executable, "-m", "s2d.tools.cli", "generate", "--target-path", str(family["large"]), "--draft-path",
            str(family[draft]), "--prompt", "def encode(o):", "--max-tokens", "20", "--json", "--dtype", "float32"]
    runs = {m: json.loads(subprocess.run(args + ["--mode", m], capture_output=True, text=True, check=True)
                          .stdout.strip().splitlines()[-1]) for m in ("s2d", "ar")}
    assert runs["s2d"]["token_ids"] == runs["ar"]["token_ids"] and runs["s2d"]["text"] == runs["ar"]["text"]
    assert runs["s2d"]["stats"]["exit_histogram"] and runs["ar"]["stats"]["drafted"] == 0
    assert set(runs["s2d"]) >= {"text", "token_ids", "finish_reason", "stats"} and "mat" in runs["s2d"]["stats"]


def test_tune_finds_a_profile_for_the_draft_and_writes_it(engine, family, tmp_path):
    from s2d.tools.tune import tune, write_profile

    before = engine.frontends["large"].profile
    try:
        best, report = tune(engine, "large", ["def f(x):", "import json"], max_tokens=8, passes=0, log=lambda *_: None)
    finally:
        engine.set_profile("large", before)
    assert len(best.thresholds) == len(engine.exits) and best.thresholds[-1] == 0.0
    assert report["ar_tps"] > 0 and report["default_tps"] > 0 and report["tuned_tps"] > 0
    path = tmp_path / "engine.yaml"
    path.write_text(yaml.safe_dump(make_config(family).model_dump(mode="json")))
    write_profile(path, "large", best)
    assert load_config(path).target("large").profile == best


def test_bundled_demo_family_s2d_equals_ar():
    """The committed family with its config and tuned profiles, in fp32: S2D and fixed exits give the
    target's own greedy output token for token (in bf16, as shipped on a CPU with AVX512-BF16, they
    may leave it only at a near-tie: tests/test_lossless.py)."""
    cfg = load_config("demo")
    for spec in (cfg.draft, *cfg.targets):
        spec.dtype = "float32"
    eng = Engine.from_config(cfg)
    for target in ("demo-s", "demo-m", "demo-l"):
        for prompt in ("def read_config(path):\n", "Explain what a hash table is."):
            outs = {m: eng.generate([Request(target=target, prompt=prompt, params=greedy(40), mode=m)])[0]["token_ids"]
                    for m in ("ar", "s2d", "fixed:2")}
            assert outs["s2d"] == outs["ar"] == outs["fixed:2"], (target, prompt)


def test_slots_stay_compact_as_sequences_end_and_outputs_stay_exact(engine):
    """Requests ending at different rounds free slots in the middle; the highest live sequence moves
    into each freed slot (its keys, values and the draft's hidden states with it), so every
    worker's live slots stay 0..n-1 and batches read the cache as a view. Outputs equal solo runs."""
    reqs = [Request(target=t, prompt=p, params=greedy(4 + 5 * i, ignore_eos=True), mode=("s2d", "ar")[i % 2])
            for i, (t, p) in enumerate(zip(["small", "large"] * 4, PROMPTS[:8]))]
    solo = [engine.generate([r])[0]["token_ids"] for r in reqs]
    seqs = [engine.scheduler.add(r) for r in reqs]
    workers = [engine.proposer, *engine.verifiers.values()]
    while engine.has_work:
        engine.step()
        for w in workers:
            assert sorted(w.table.slot.values()) == list(range(len(w.table.slot)))
    assert [s.out for s in seqs] == solo


def test_a_failed_sequence_moved_by_compaction_leaves_no_bad_numbers_behind(family):
    """Compaction may move a failed sequence down into a freed slot before it is released itself:
    the slot it leaves is cleared too, so whoever gets it next decodes exactly."""
    from s2d.core.engine import load_target
    from s2d.worker.workers import Verifier, VerifyItem

    cfg = make_config(family, targets=("small",))
    v, fresh = Verifier(load_target(cfg, "small")), Verifier(load_target(cfg, "small"))
    item = lambda seq, toks: VerifyItem(seq, toks, [], None, greedy(1), 0)  # noqa: E731
    v.verify([item("b", [1, 2, 3]), item("a", [5, 6, 7, 8])])
    for k in v.lm.cache.k:
        k[v.table.slot["a"], :, :4] = float("nan")
    assert "not finite" in v.verify([item("a", [5, 6, 7, 8, 9])])[0].error
    v.release("b")  # "a" moves from slot 1 to slot 0
    v.release("a")
    out = v.verify([item("c", [1, 2, 3]), item("d", [4, 5, 6])])
    assert [o.error for o in out] == [None, None]
    assert [o.tokens for o in out] == [o.tokens for o in fresh.verify([item("c", [1, 2, 3]), item("d", [4, 5, 6])])]


def test_the_demo_family_takes_chat_messages_and_continues_plain_prompts():
    """The demo models are base models: a plain prompt is text to continue (`plain_prompts`), and
    chat messages go through their plain-text template, so chat clients reach them too."""
    from s2d.core.frontend import build_frontend

    frontend = build_frontend(load_config("demo"))
    tok = frontend.targets["demo-l"].tokenizer
    plain = frontend.prepare(Request(target="demo-l", prompt="import os", params=greedy(4)))
    assert plain.prompt_ids == list(tok("import os")["input_ids"])
    chat = frontend.prepare(Request(target="demo-l", messages=[{"role": "system", "content": "Be brief."},
                                                               {"role": "user", "content": "hi"}],
                                    params=greedy(4)))
    assert tok.decode(chat.prompt_ids).endswith("System: Be brief.\nUser: hi\nAssistant:")


def test_models_load_on_a_passing_thread_at_the_callers_thread_count():
    """s2d/worker/threads.py: the load runs on a thread that ends (its OpenMP team with it), with the
    caller's torch thread count (a package is built for the count it runs with); errors come back."""
    import threading

    import torch

    from s2d.worker.threads import on_passing_thread

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        name, n = on_passing_thread(lambda: (threading.current_thread().name, torch.get_num_threads()))
    finally:
        torch.set_num_threads(before)
    assert name == "s2d-load" and name != threading.current_thread().name and n == 1
    assert not any(t.name == "s2d-load" for t in threading.enumerate())
    with pytest.raises(ValueError, match="bad weights"):
        on_passing_thread(lambda: (_ for _ in ()).throw(ValueError("bad weights")))
