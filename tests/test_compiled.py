"""The compiled static-shape steps (s2d/worker/graphs.py on CPU: AOTInductor packages built or loaded at
startup) say what the eager forward says, token for token in fp32, and compile nothing once they
serve."""
from __future__ import annotations

import pytest
import torch
from conftest import PROMPTS, make_config

import s2d.worker.graphs
import s2d.worker.workers
from s2d.core.config import SamplingParams
from s2d.core.engine import Engine, Request
from s2d.worker import aot


@pytest.fixture(scope="module")
def compiled_engine(family):
    before = s2d.worker.graphs.compilations + s2d.worker.graphs.loaded
    eng = Engine.from_config(make_config(family, static_forward="on"))
    # one package per draft segment and two per target (decode and verify; prompt chunks), compiled
    # now or loaded from the disk cache
    assert s2d.worker.graphs.compilations + s2d.worker.graphs.loaded - before == 2 * len(eng.verifiers) + len(eng.exits)
    return eng


def ragged(mode: str) -> list[Request]:
    """Prompts of many lengths, both targets, outputs of different lengths: rows come and go, so
    batches change size and live sequences are compacted into lower slots."""
    return [Request(target=t, prompt=p * (1 + i % 3), mode=mode,
                    params=SamplingParams(temperature=0.0, max_tokens=6 + 5 * (i % 4), ignore_eos=True))
            for i, p in enumerate(PROMPTS[:16]) for t in ("small", "large")]


@pytest.mark.parametrize("mode", ["s2d", "ar", "fixed:2"])
def test_compiled_equals_eager_token_for_token(family, compiled_engine, mode):
    eager = Engine.from_config(make_config(family, static_forward="off"))
    reqs = ragged(mode)
    before = s2d.worker.graphs.compilations + s2d.worker.graphs.loaded
    got = compiled_engine.generate(reqs)
    # shapes never seen at startup reuse its graphs
    assert s2d.worker.graphs.compilations + s2d.worker.graphs.loaded == before
    want = eager.generate(ragged(mode))
    for r, g, w in zip(reqs, got, want):
        assert g["token_ids"] == w["token_ids"], (mode, r.target, r.prompt)
    static = [v.lm.static for v in compiled_engine.verifiers.values()] + compiled_engine.proposer.draft.static
    assert all(v.lm.static_fill.replays > 0 for v in compiled_engine.verifiers.values())  # prompts went compiled
    assert all(s.compiled for s in static)
    assert len({k for s in static for k in s.shapes}) > 4  # many buckets, one package each
    if mode != "ar":
        assert all(s.replays > 0 for s in compiled_engine.proposer.draft.static)


def test_a_package_is_built_for_the_threads_it_runs_with(compiled_engine):
    """Inductor's GEMM templates bake the thread count in: a package built in a 1-thread process (a
    Ray worker before it sets its threads) must not be the one a 2-thread process loads."""
    step = next(iter(compiled_engine.verifiers.values())).lm.static
    n = torch.get_num_threads()
    try:
        mine = aot._fingerprint(step)
        torch.set_num_threads(1 if n > 1 else 2)
        other = aot._fingerprint(step)
    finally:
        torch.set_num_threads(n)
    assert mine != other and aot._fingerprint(step) == mine


def test_decode_rows_of_far_apart_contexts_stay_on_the_static_steps(family, monkeypatch):
    """Rows whose contexts are over SPLIT_KEYS apart verify in two groups (short rows do not attend
    over the long keys). Each group takes a static step, the one outside slots 0..B-1 the fill
    step plus the head: never the eager forward, which cost the short requests beside long
    prompts 2.9x their latency (docs/bench/elastic.md). The same tokens as the eager forward."""
    def cfg(static):
        c = make_config(family, targets=("large",), static_forward=static, max_seq_len=512)
        c.draft.max_seq_len = 512
        return c

    static, eager = Engine.from_config(cfg("eager")), Engine.from_config(cfg("off"))
    long = " ".join(PROMPTS)
    assert len(static.frontends["large"].tokenizer(long).input_ids) > 4 * 64 + 16
    reqs = [Request(target="large", prompt=p, mode=mode, params=SamplingParams(max_tokens=12, ignore_eos=True))
            for mode in ("ar", "s2d") for p in [long, *PROMPTS[:6]]]
    lm, eager_forwards, groups = static.verifiers["large"].lm, [], []
    run_layers, split = lm.run_layers, s2d.worker.workers.split_by_keys
    monkeypatch.setattr(lm, "run_layers", lambda *a, **kw: eager_forwards.append(1) or run_layers(*a, **kw))
    monkeypatch.setattr(s2d.worker.workers, "split_by_keys", lambda *a: groups.append(split(*a)) or groups[-1])
    got = static.generate(reqs)
    assert max(map(len, groups)) == 2, "some tick verified the rows in two groups"
    assert not eager_forwards and lm.static_fill.replays > 0 and lm.static.replays > 0
    for r, g, w in zip(reqs, got, eager.generate(reqs)):
        assert g["token_ids"] == w["token_ids"], (r.mode, r.prompt[:20])
