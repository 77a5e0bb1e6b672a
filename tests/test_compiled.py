"""The compiled static-shape steps (s2d/worker/graphs.py on CPU: AOTInductor packages built or loaded at
startup) say what the eager forward says, token for token in fp32, and compile nothing once they
serve."""
from __future__ import annotations

import pytest
import torch
from conftest import PROMPTS, make_config

import s2d.worker.graphs
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
