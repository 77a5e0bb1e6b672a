"""Cells scale on what limits them (deployments/autoscale.py): the policy's arithmetic on Ray's own
AutoscalingContext, and a real local Serve app whose cell goes from one replica to two under a
load that fills its KV slots, and back to one when half of it stops, the streams that run while a
replica drains and goes exact."""
from __future__ import annotations

import threading
import time

import pytest
import yaml
from conftest import PROMPTS, make_config, wait_for
from ray.serve._private.common import DeploymentID
from ray.serve.config import AutoscalingContext

from deployments.autoscale import METRIC, TARGET, cell_replicas
from s2d.core.config import EngineConfig
from s2d.core.engine import Engine, Request, greedy
from s2d.core.scheduler import Scheduler


def context(reported: dict[str, float] | None, current: int = 1) -> AutoscalingContext:
    return AutoscalingContext(
        deployment_id=DeploymentID("cell-main", "s2d"), deployment_name="cell-main", app_name="s2d",
        current_num_replicas=current, target_num_replicas=current, running_replicas=[],
        total_num_requests=0.0, total_queued_requests=0.0,
        aggregated_metrics=None if reported is None else {METRIC: reported}, raw_metrics=None,
        capacity_adjusted_min_replicas=1, capacity_adjusted_max_replicas=4, policy_state={},
        last_scale_up_time=None, last_scale_down_time=None, current_time=time.time(), config=None)


def test_the_policy_asks_for_replicas_by_slots_and_waiting_requests():
    assert cell_replicas(context(None, current=2))[0] == 2  # nothing reported yet: as it is
    assert cell_replicas(context({"r1": 0.4}))[0] == pytest.approx(0.4 / TARGET)  # fits one
    assert cell_replicas(context({"r1": 1.5, "r2": 1.5}, current=2))[0] == pytest.approx(3 / TARGET)


def test_demand_is_the_busiest_pool_with_its_waiting_requests():
    load = {"targets": {"a": {"running": 2, "waiting": 0, "kv_slots": 8},
                        "b": {"running": 4, "waiting": 4, "kv_slots": 4}},
            "draft": {"running": 6, "kv_slots": 16}}
    assert Scheduler.demand(load) == 2.0  # b: 4 running and 4 waiting on 4 slots
    load["targets"]["b"] = {"running": 1, "waiting": 0, "kv_slots": 4}
    load["draft"] = {"running": 3, "kv_slots": 4}
    assert Scheduler.demand(load) == 0.75  # the draft's pool, the fullest


def replicas(app: str = "s2d", deployment: str = "cell-main") -> int:
    from ray import serve

    states = serve.status().applications[app].deployments[deployment].replica_states
    return states.get("RUNNING", 0)


def test_a_cell_scales_up_when_its_slots_fill_and_down_when_they_empty(family, tmp_path):
    from deployments.local import serve_locally, shutdown
    from s2d.api.client import S2DClient

    base = make_config(family, targets=("small",))
    base.draft.max_seqs = base.targets[0].max_seqs = 2
    autoscaling = {"min_replicas": 1, "max_replicas": 2, "upscale_delay_s": 1, "downscale_delay_s": 4,
                   "look_back_period_s": 2}
    cfg = EngineConfig.model_validate({**base.model_dump(), "cells": [
        {"name": "main", "transport": "in_process", "autoscaling": autoscaling}]})
    path = tmp_path / "engine.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump()))
    engine = Engine.from_config(cfg)
    prompts = PROMPTS[:6]
    want = {p: engine.generate([Request(target="small", prompt=p, params=greedy(48))])[0]["token_ids"] for p in prompts}
    client = S2DClient(serve_locally(str(path), num_cpus=2), timeout=120)
    got, errors, stops = [], [], [threading.Event(), threading.Event()]

    def load(i: int):
        while not stops[i].is_set():
            p = prompts[(i + 2 * len(got)) % len(prompts)]
            try:
                tokens = [t for c in client.stream("small", p, max_tokens=48, temperature=0.0) for t in c.token_ids]
            except Exception as e:  # noqa: BLE001 - the test fails on it below
                errors.append(repr(e))
                return
            got.append((p, tokens))

    try:
        assert replicas() == 1
        # two clients: Serve's default policy (2 ongoing requests per replica) would keep one replica;
        # they fill its 2 slots, a demand of 1.0 over the target 0.8
        clients = [threading.Thread(target=load, args=(i,)) for i in range(2)]
        for t in clients:
            t.start()
        wait_for(lambda: replicas() == 2, 90, "scaling up to 2 replicas")
        stops[0].set()  # one client goes on while a replica is removed: Serve drains it first
        clients[0].join(timeout=120)
        n = len(got)
        wait_for(lambda: replicas() == 1, 90, "scaling down to 1 replica")
        time.sleep(2)
        stops[1].set()
        clients[1].join(timeout=120)
        assert not errors, errors
        assert len(got) > n and all(tokens == want[p] for p, tokens in got), "a stream was lost or not exact"
    finally:
        for e in stops:
            e.set()
        client.close()
        shutdown()
