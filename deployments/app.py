"""The app builder that serve_config.yaml names: reads the engine config (a YAML path, or 'demo')
and wires one Cell deployment per configured cell (each a placement group holding the shared
draft and its targets) behind the thin gRPC ingress."""
from __future__ import annotations

from deployments.autoscale import POLICY
from deployments.cell import Cell
from deployments.ray_executor import cell_bundles
from deployments.router import S2DRouter
from s2d.core.config import CellSpec, EngineConfig, load_config


def _options(cfg: EngineConfig, cell: CellSpec) -> dict:
    bundles = cell_bundles(cfg, cell.name)
    # past the slots and the queue the scheduler refuses (RESOURCE_EXHAUSTED): Serve must not queue first
    live = sum(cfg.target(t).max_seqs for t in cell.targets) + cfg.limits.max_waiting + 16
    opts = {"ray_actor_options": {"num_cpus": bundles[0]["CPU"]}, "placement_group_bundles": bundles,
            "placement_group_strategy": "PACK", "max_ongoing_requests": live}
    if cell.autoscaling:  # on KV slots and waiting requests unless the config names its own policy
        opts["autoscaling_config"] = {"policy": {"policy_function": POLICY}, **cell.autoscaling}
    else:
        opts["num_replicas"] = cell.num_replicas
    return opts


def build_app(args: dict):
    """`args`: {config: PATH or 'demo', device: optional device for every model}."""
    cfg: EngineConfig = load_config(args.get("config", "demo")).on_device(args.get("device") or None)
    data = cfg.model_dump()
    cells = {c.name: Cell.options(name=f"cell-{c.name}", **_options(cfg, c)).bind(data, c.name) for c in cfg.cells}
    live = sum(_options(cfg, c)["max_ongoing_requests"] for c in cfg.cells)
    return S2DRouter.options(name="router", ray_actor_options={"num_cpus": 0},
                             max_ongoing_requests=live).bind(data, cells)
