"""The app on several Ray nodes (a local multi-node cluster, as Ray tests itself: one head and
raylets on 127.0.0.1): cell replicas placed on different nodes, a node removed mid-stream while
clients stream (its requests go to the surviving replica, every stream exact), the ingress unharmed
by losing a node that holds no ingress, and a replacement replica on a node added afterwards."""
from __future__ import annotations

import pytest
import yaml
from conftest import PROMPTS, StreamingClients, make_config, serve_logs, wait_for

from s2d.core.config import EngineConfig
from s2d.core.engine import Engine

CELL_NODE = "s2d_cell"  # the custom resource of the nodes that may host a cell replica


def alive_actors() -> list[dict]:
    """Every live actor's name and node (from the GCS: the state API needs the dashboard)."""
    import ray

    return [a for a in ray._private.state.actors().values() if a["State"] == "ALIVE" and a.get("Name")]


def cell_nodes() -> dict[str, str]:
    """Running cell replicas' actor names -> their node ids."""
    return {a["Name"]: a["Address"]["NodeID"] for a in alive_actors() if "cell-main" in a["Name"]}


def router_node() -> str:
    return next(a["Address"]["NodeID"] for a in alive_actors() if "router" in a["Name"])


@pytest.fixture
def cluster():
    import ray
    from ray.cluster_utils import Cluster

    from deployments.local import set_local_env

    set_local_env()
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "node_ip_address": "127.0.0.1",
                                                      "include_dashboard": False})
    ray.init(address=c.address, log_to_driver=False)
    yield c
    from ray import serve

    serve.shutdown()
    ray.shutdown()
    c.shutdown()


def test_cells_on_two_nodes_keep_streams_exact_when_one_is_lost(cluster, family, tmp_path):
    from ray import serve

    from deployments.app import build_app
    from deployments.local import free_port
    from s2d.api.client import S2DClient

    nodes = [cluster.add_node(num_cpus=1, resources={CELL_NODE: 1}, node_ip_address="127.0.0.1") for _ in range(2)]
    cluster.wait_for_nodes()
    base = make_config(family, targets=("small",))
    cfg = EngineConfig.model_validate({**base.model_dump(), "cells": [
        {"name": "main", "transport": "in_process", "num_replicas": 2, "resources": {CELL_NODE: 1}}]})
    path = tmp_path / "engine.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump()))
    port = free_port()
    servicer = "s2d.proto.servicer.add_S2DServicer_to_server"
    serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": free_port()},
                grpc_options={"port": port, "grpc_servicer_functions": [servicer]})
    serve.run(build_app({"config": str(path)}), name="s2d", route_prefix="/")
    placed = cell_nodes()
    assert len(placed) == 2 and len(set(placed.values())) == 2, placed  # one replica per node
    head = cluster.head_node.node_id
    assert head not in placed.values()

    engine = Engine.from_config(cfg)
    client = S2DClient(f"127.0.0.1:{port}", timeout=120)
    load = StreamingClients(client, "small", PROMPTS[:8], 4, 40)
    try:
        wait_for(lambda: len(load.got) >= 8, 60, "streams before the loss")
        ingress = router_node()
        victim = next(n for n in nodes if n.node_id != ingress)  # a node that holds no ingress
        before = len(load.got)
        cluster.remove_node(victim, allow_graceful=False)  # mid-stream: its replica's streams are resent
        wait_for(lambda: len(load.got) >= before + 16, 120, "streams after the loss")
        assert list(client.list_targets().targets) == ["small"]  # the ingress answers
        spare = cluster.add_node(num_cpus=1, resources={CELL_NODE: 1}, node_ip_address="127.0.0.1")
        wait_for(lambda: len(cell_nodes()) == 2 and spare.node_id in cell_nodes().values(), 120,
                 "a replacement replica on the new node")
        load.stop()
        assert not load.errors, load.errors
        assert load.exact(engine), "a stream was not exact"
        resent = [line for name, line in serve_logs() if name.startswith("replica_s2d_router") and "resending" in line]
        assert resent  # streams were in flight on the lost node, and went on elsewhere
    finally:
        load.stop()
        client.close()
