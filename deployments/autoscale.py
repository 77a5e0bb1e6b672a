"""Cells scale on what limits them: their KV slots and their waiting requests, not on Serve's
default signal (ongoing requests per replica, which counts a request the same whether it holds a
slot or waits for one).

Each cell replica reports `s2d_demand` (`Cell.record_autoscaling_stats`): its busiest KV pool's
running and waiting sequences over its slots (`Scheduler.demand`). `cell_replicas` asks for as many
replicas as keep that at TARGET on average. Serve applies the cell's `autoscaling:` bounds, delays
and factors around it; each new replica's placement group (the draft's and the targets' bundles)
is what KubeRay's autoscaler then finds nodes for (README, "Autoscaling")."""
from __future__ import annotations

from ray.serve.config import AutoscalingContext

METRIC = "s2d_demand"
TARGET = 0.8  # a replica's busiest pool at 80% of its slots: room for a burst while a new one loads
POLICY = "deployments.autoscale:cell_replicas"


def cell_replicas(ctx: AutoscalingContext) -> tuple[float, dict]:
    """The replicas a cell needs: the demand its replicas report, summed, over TARGET. Before any
    replica has reported (a cell still loading), the current count."""
    reported = (ctx.aggregated_metrics or {}).get(METRIC) or {}
    if not reported:
        return ctx.target_num_replicas, {}
    return sum(reported.values()) / TARGET, {}
