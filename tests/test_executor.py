"""The one scheduler over the Ray executor (real actors, a real compiled graph, no Serve): the same
tokens as the in-process engine, greedy and seeded sampling, with pipelining on and off, and after
an actor is killed mid-run."""
from __future__ import annotations

import pytest
import ray
from conftest import PROMPTS, make_config

from deployments.ray_executor import RayExecutor
from s2d.core.config import SamplingParams
from s2d.core.engine import Engine, Request, engine_core, greedy
from s2d.core.engine_core import EngineCore


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    yield
    ray.shutdown()


def config(family):
    """Seeded sampled outputs are equal across executors under the same draft plan; the goodput
    policy follows timings, so these runs use the static one."""
    cfg = make_config(family)
    cfg.scheduling.draft_policy = "static"
    return cfg


def requests() -> list[Request]:
    """12 requests over both targets: greedy in three modes, and seeded sampling."""
    out = []
    for i, p in enumerate(PROMPTS[:6]):
        t = ("small", "large")[i % 2]
        out.append(Request(target=t, prompt=p, params=greedy(12, ignore_eos=True),
                           mode=("s2d", "ar", "fixed:2")[i % 3]))
        out.append(Request(target=t, prompt=p, params=SamplingParams(temperature=0.9, top_p=0.95, seed=100 + i,
                                                                     max_tokens=12, ignore_eos=True)))
    return out


@pytest.fixture(scope="module")
def expected(family):
    return [r["token_ids"] for r in Engine.from_config(config(family)).generate(requests())]


def run(core: EngineCore, reqs, on_step=None) -> list[list[int]]:
    seqs = [core.scheduler.add(r) for r in reqs]
    n = 0
    while core.has_work:  # to the end, releases included
        core.step()
        n += 1
        if on_step:
            on_step(n)
    return [s.out for s in seqs]


def ray_core(cfg, pipeline: bool) -> tuple[EngineCore, RayExecutor]:
    ex = RayExecutor(cfg, "main", pipeline)
    return engine_core(cfg, ex, pipeline=pipeline), ex


@pytest.mark.parametrize("pipeline", [False, True])
def test_ray_executor_gives_the_in_process_tokens(cluster, family, expected, pipeline):
    core, ex = ray_core(config(family), pipeline)
    try:
        assert run(core, requests()) == expected
        assert core.scheduler.pipeline == pipeline and not core.has_work
        stats = ex.stats()
        assert stats["draft"]["held"] == 0 and stats["small"]["held"] == 0 and stats["large"]["held"] == 0
        assert 0 < stats["busy_fraction"]["draft"] < 1 and stats["draft"]["max_batch"] > 1
    finally:
        ex.shutdown()


@pytest.mark.parametrize("victim", ["draft", "large"])
def test_an_actor_killed_mid_run_is_replaced_and_every_request_completes(cluster, family, expected, victim):
    core, ex = ray_core(config(family), pipeline=True)

    def kill(step):
        if step == 3:
            ray.kill(ex.draft if victim == "draft" else ex.ranks[victim][0], no_restart=True)

    try:
        assert run(core, requests(), on_step=kill) == expected
        assert ex.stats()["draft"]["held"] == 0
    finally:
        ex.shutdown()
