"""A serving cell: one Ray Serve replica that reserves a placement group (its own bundle, the
draft's, one per target), starts the draft and target actors in it, and runs the one scheduler
(s2d/core/scheduler.py) over them through the Ray executor (or, with `transport: in_process`, over the
models loaded in its own process). Requests arrive as one streaming call each
from the ingress; the scheduler batches them across all of the cell's targets. The load gauges
(deployments/metrics.py) are set from the scheduler's thread."""
from __future__ import annotations

import os
from collections.abc import AsyncIterator

import torch
from ray import serve

from deployments.autoscale import METRIC
from deployments.metrics import LoadMetrics
from deployments.quiet import install_quiet_refusals
from deployments.ray_executor import RayExecutor
from s2d.core.config import EngineConfig
from s2d.core.engine import engine_core, load_in_process
from s2d.core.loop import EngineLoop
from s2d.core.output import Delta
from s2d.core.request import Request
from s2d.core.scheduler import Scheduler


@serve.deployment
class Cell:
    def __init__(self, config: dict, cell: str):
        install_quiet_refusals()  # a refusal raised to the ingress: one line here, no traceback
        cfg = EngineConfig.model_validate(config)
        spec = cfg.cell(cell)
        if spec.transport == "in_process":  # the models in this process, forwards on every core
            threads = os.cpu_count() or 1
            torch.set_num_threads(threads)  # before compiling: a package is built for the threads it runs with
            self.executor = load_in_process(cfg, spec.targets)
        else:  # the actors set their own threads
            self.executor, threads = RayExecutor(cfg, cell, spec.pipeline, transport=spec.transport), None
        self.loop = EngineLoop(engine_core(cfg, self.executor, spec.targets, spec.pipeline), threads,
                               report=LoadMetrics().report)

    def check_health(self):
        """Serve's periodic check, and the ingress's /healthz: a replica answers once its
        constructor has returned (the models are loaded); one whose scheduler thread stopped raises,
        and Serve replaces it."""
        if not self.loop.thread.is_alive():
            raise RuntimeError("the cell's scheduler thread has stopped")

    async def generate(self, req: Request, resume: list[int], final_only: bool = False) -> AsyncIterator[Delta]:
        """The request's deltas (one at the end with `final_only`, for unary RPCs)."""
        async for d in self.loop.stream(req, resume, final_only):
            yield d

    def record_autoscaling_stats(self) -> dict[str, float]:
        """What this replica's demand is (deployments/autoscale.py), from the scheduler's last load."""
        load = self.loop.load
        return {METRIC: Scheduler.demand(load)} if load else {}

    def stats(self) -> dict:
        """Each actor's batches and held sequences, and the draft's and targets' busy fractions."""
        return self.executor.stats()

    def reset_stats(self):
        self.executor.reset_busy()

    def __del__(self):
        self.loop.shutdown()
        self.executor.shutdown()
