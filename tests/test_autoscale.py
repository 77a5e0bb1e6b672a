"""Cells scale on what limits them (deployments/autoscale.py): the policy's arithmetic on Ray's own
AutoscalingContext, and a real local Serve app whose cell goes from one replica to two under a
load that fills its KV slots, and back to one when half of it stops, the streams that run while a
replica drains and goes exact."""
from __future__ import annotations

import time

import pytest
import yaml
from conftest import PROMPTS, StreamingClients, make_config, wait_for
from ray.serve._private.common import DeploymentID
from ray.serve.config import AutoscalingContext

from deployments.autoscale import METRIC, TARGET, cell_replicas
from s2d.core.config import EngineConfig
from s2d.core.engine import Engine
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
    client = S2DClient(serve_locally(str(path), num_cpus=2), timeout=120)
    load = None
    try:
        assert replicas() == 1
        # two clients: Serve's default policy (2 ongoing requests per replica) would keep one replica;
        # they fill its 2 slots, a demand of 1.0 over the target 0.8
        load = StreamingClients(client, "small", PROMPTS[:6], 2, 48)
        wait_for(lambda: replicas() == 2, 90, "scaling up to 2 replicas")
        load.stop(0)  # one client goes on while a replica is removed: Serve drains it first
        n = len(load.got)
        wait_for(lambda: replicas() == 1, 90, "scaling down to 1 replica")
        time.sleep(2)
        load.stop()
        assert not load.errors, load.errors
        assert len(load.got) > n and load.exact(engine), "a stream was lost or not exact"
    finally:
        if load:
            load.stop()
        client.close()
        shutdown()
