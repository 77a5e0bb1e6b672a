"""A target split over tensor-parallel rank actors (real Ray, gloo and shared memory on CPU): the
tokens of the unsplit target, greedy (s2d, ar, fixed) and seeded sampling, over ragged batches with
chunked prefill and compaction; the target's distribution; a rank killed mid-run; a served app
with a split target beside a plain one; and each config error."""
from __future__ import annotations

import pytest
import ray
import yaml
from conftest import PROMPTS, make_config
from test_http import App, expected_increase, grpc_stats, settled
from test_lossless import N_SAMPLES, SIGNIFICANCE, chi2_pvalue, hf_continuations, target_joint
from test_serve import N, consume_while_killing

from deployments.local import shutdown
from deployments.ray_executor import RayExecutor
from s2d.core.config import EngineConfig, SamplingParams
from s2d.core.engine import Engine, Request, engine_core, greedy
from s2d.core.executor import Tick, Work

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    yield
    ray.shutdown()


def config(family, tp: int = 2) -> EngineConfig:
    """"large" (2 KV heads) split over `tp` ranks beside a plain "small"; chunked prefill in small
    pieces, so that prompts go in chunks beside decodes; the static policy, so that sampled
    outputs are comparable across executors."""
    cfg = make_config(family, max_seqs=4)
    cfg.target("large").tensor_parallel = tp
    cfg.scheduling.draft_policy = "static"
    cfg.scheduling.long_prompt, cfg.scheduling.long_chunk, cfg.scheduling.prefill_budget = 16, 8, 24
    return cfg


def requests() -> list[Request]:
    """14 requests on both targets, more than the 4 slots a target has (slots are freed and
    compacted), of ragged prompt and output lengths: greedy in three modes and seeded sampling,
    two with a prompt long enough to be prefilled in chunks."""
    out = []
    for i, p in enumerate(PROMPTS[:12]):
        t = ("large", "small", "large")[i % 3]
        prompt = " ".join(PROMPTS[i:i + 12]) if i in (4, 9) else p
        params = greedy(6 + 3 * (i % 4), ignore_eos=True) if i % 4 else \
            SamplingParams(temperature=0.9, top_p=0.95, seed=100 + i, max_tokens=10, ignore_eos=True)
        out.append(Request(target=t, prompt=prompt, params=params, mode=("s2d", "ar", "fixed:2")[i % 3]))
    return out


@pytest.fixture(scope="module")
def unsplit(family) -> Engine:
    """The same config with "large" in one piece, in process."""
    return Engine.from_config(config(family, tp=1))


@pytest.fixture(scope="module")
def expected(unsplit):
    return [r["token_ids"] for r in unsplit.generate(requests())]


def run(core, reqs, on_step=None) -> list[list[int]]:
    seqs = [core.scheduler.add(r) for r in reqs]
    n = 0
    while core.has_work:
        core.step()
        n += 1
        if on_step:
            on_step(n)
    return [s.out for s in seqs]


@pytest.mark.parametrize("transport", ["compiled_graph", "actor_calls"])
def test_two_ranks_give_the_tokens_of_one(cluster, family, expected, transport):
    cfg = config(family)
    ex = RayExecutor(cfg, "main", pipeline=True, transport=transport)
    try:
        assert [len(r) for r in ex.ranks.values()] == [1, 2]
        assert run(engine_core(cfg, ex, pipeline=True), requests()) == expected
        stats = ex.stats()
        assert stats["large"]["held"] == 0 and stats["large"]["evicted"] == 0 and stats["large"]["prefill_forwards"] > 0
    finally:
        ex.shutdown()


def test_compiled_ranks_give_the_tokens_of_one(cluster, family, expected):
    """Each rank's static steps compiled into a package that calls the shared-memory all-reduce."""
    cfg = config(family)
    cfg.target("large").static_forward = "on"
    ex = RayExecutor(cfg, "main", pipeline=True)
    try:
        assert run(engine_core(cfg, ex, pipeline=True), requests()) == expected
        assert ex.stats()["large"]["static_steps"] > 0
    finally:
        ex.shutdown()


def test_two_ranks_greedy_equals_transformers(cluster, family):
    prompts = PROMPTS[12:20]
    want = hf_continuations(family, "large", prompts)
    cfg = config(family)
    ex = RayExecutor(cfg, "main", pipeline=False)
    try:
        core = engine_core(cfg, ex)
        for mode in ("s2d", "ar", "fixed:3"):
            got = run(core, [Request(target="large", prompt=p, params=greedy(16, ignore_eos=True), mode=mode)
                             for p in prompts])
            assert got == [want[p] for p in prompts], mode
    finally:
        ex.shutdown()


def test_a_rank_killed_mid_run_takes_its_group_and_every_request_completes(cluster, family, expected):
    cfg = config(family)
    ex = RayExecutor(cfg, "main", pipeline=True)
    old = list(ex.ranks["large"])

    def kill(step):
        if step == 4:
            ray.kill(ex.ranks["large"][1], no_restart=True)

    try:
        assert run(engine_core(cfg, ex, pipeline=True), requests(), on_step=kill) == expected
        assert not set(ex.ranks["large"]) & set(old), "every rank of the target is replaced"
        assert ex.stats()["large"]["held"] == 0
    finally:
        ex.shutdown()


def sampled_pairs(tiny_vocab, n: int, params: SamplingParams, thresholds: list[float]) -> list[tuple[int, int]]:
    """n (x1, x2) first two tokens sampled with speculative decoding by a target split over two
    ranks, 64 sequences a tick (as test_lossless.first_two_tokens, through the Ray executor)."""
    cfg = EngineConfig.model_validate({
        "draft": {"path": str(tiny_vocab / "draft"), "max_seqs": 64, "max_seq_len": 32, "dtype": "float32"},
        "targets": [{"name": "t", "path": str(tiny_vocab / "target"), "max_seqs": 64, "max_seq_len": 32,
                     "dtype": "float32", "tensor_parallel": 2}]})
    ex = RayExecutor(cfg, "main", pipeline=False)
    prompt, pairs, release = [1, 3, 5], [], []
    try:
        for call in range(n // 64):
            ids = [f"{call}-{i}" for i in range(64)]
            first = ex.result(ex.submit(Tick([Work(s, "t", 0, prompt, 3, thresholds, 0.0, params, 2 * (call * 64 + i))
                                               for i, s in enumerate(ids)], release))).outcomes
            toks = {s: first[s].tokens for s in ids}
            short = [i for i, s in enumerate(ids) if len(toks[s]) < 2]  # one token: the second by target sampling
            if short:
                second = ex.result(ex.submit(Tick([Work(ids[i], "t", 3, toks[ids[i]], 0, thresholds, 0.0, params,
                                                        2 * n + call * 64 + i) for i in short]))).outcomes
                short = [ids[i] for i in short]
                for s in short:
                    toks[s] = toks[s] + second[s].tokens
            pairs += [(toks[s][0], toks[s][1]) for s in ids]
            release = ids
    finally:
        ex.shutdown()
    return pairs


def test_two_ranks_sample_the_target_distribution(cluster, tiny_vocab):
    """The chi-square test of test_lossless (which catches a wrong rejection rule at this size)."""
    params = SamplingParams(temperature=1.0)
    assert chi2_pvalue(sampled_pairs(tiny_vocab, N_SAMPLES, params, [0.6, 0.0]),
                       target_joint(tiny_vocab, params)) > SIGNIFICANCE


# -- served ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def app(family, tmp_path_factory):
    if ray.is_initialized():
        ray.shutdown()  # the executor tests' cluster: Serve starts its own
    cfg = config(family)
    path = tmp_path_factory.mktemp("tp") / "engine.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump()))
    a = App(path)
    yield a
    a.client.close()
    a.grpc.close()
    shutdown()


def test_a_served_split_target_beside_a_plain_one(app, unsplit):
    """Over gRPC and HTTP, greedy equals the in-process unsplit engine, and the metrics counters
    increase by exactly the responses' stats."""
    before = settled(app)
    results = []
    for i, target in enumerate(["large", "small", "large", "large"]):
        prompt = PROMPTS[20 + i]
        ref = unsplit.generate([Request(target=target, prompt=prompt, params=greedy(12))])[0]
        g = app.grpc.generate(target, prompt, max_tokens=12)
        assert list(g.token_ids) == ref["token_ids"], (target, prompt)
        results.append((target, g.finish_reason, {"prompt_tokens": g.usage.prompt_tokens,
                                                  "completion_tokens": g.usage.completion_tokens}, grpc_stats(g)))
        r = app.client.completions.create(model=target, prompt=prompt, max_tokens=12, temperature=0)
        assert r.choices[0].text == ref["text"], (target, prompt)
        results.append((target, r.choices[0].finish_reason, r.usage.model_dump(), r.model_extra["s2d_stats"]))
    want_counts = expected_increase(results)
    after = settled(app)
    names = {name for name, _ in want_counts}
    got = {k: after[k] - before.get(k, 0) for k in after if k[0] in names and after[k] != before.get(k, 0)}
    assert got == dict(want_counts)


def test_a_rank_killed_mid_stream_still_completes(app, unsplit):
    prompt = PROMPTS[1]
    want = unsplit.generate([Request(target="large", prompt=prompt, params=greedy(N))])[0]
    got, errors = consume_while_killing(app.grpc, "large", prompt, "target-large-rank1")
    assert not errors, errors
    assert sum((list(c.token_ids) for c in got), []) == want["token_ids"] and got[-1].finished


# -- config errors -------------------------------------------------------------------------------
def test_a_split_that_does_not_divide_the_kv_heads_is_refused(cluster, family):
    cfg = config(family, tp=4)  # "large" has 2 KV heads
    with pytest.raises(ValueError, match=r"targets\.large\.tensor_parallel: 4 must divide the model's "
                                         r"num_key_value_heads \(2\)"):
        RayExecutor(cfg, "main", pipeline=False)


def test_a_split_target_where_no_ranks_can_run_is_refused(family):
    cfg = config(family).model_dump()
    cfg["cells"][0]["transport"] = "in_process"
    with pytest.raises(ValueError, match=r"targets\.large\.tensor_parallel: 2 needs rank actors, which "
                                         r"cells\.main\.transport in_process cannot run; .*compiled_graph"):
        EngineConfig.model_validate(cfg)
    with pytest.raises(ValueError, match=r"targets\.large\.tensor_parallel: 2 needs rank actors, which the "
                                         r"in-process engine cannot run"):
        Engine.from_config(config(family))
    with pytest.raises(ValueError, match="tensor_parallel"):
        EngineConfig.model_validate({**config(family).model_dump(), "targets": [
            {**config(family).target("large").model_dump(), "tensor_parallel": 0}]})
