"""A serving cell: one Ray Serve replica that reserves a placement group (its own bundle, the
draft's, one per target), starts the draft and target actors in it, and runs the one scheduler
(s2d/scheduler.py) over them through the Ray executor. Requests arrive as one streaming call each
from the ingress; the scheduler batches them across all of the cell's targets."""
from __future__ import annotations

import os
from collections.abc import AsyncIterator

from ray import serve

from deployments.executor import RayExecutor
from s2d.config import EngineConfig
from s2d.engine import build_frontends, check_vocab, load_draft, load_target
from s2d.executor import InProcessExecutor
from s2d.loop import EngineLoop
from s2d.scheduler import Scheduler
from s2d.sequence import Delta, Request
from s2d.workers import Proposer, Verifier


@serve.deployment
class Cell:
    def __init__(self, config: dict, cell: str):
        cfg = EngineConfig.model_validate(config)
        spec = next(c for c in cfg.cells if c.name == cell)
        frontends = build_frontends(cfg)
        threads = None
        if spec.transport == "in_process":
            threads = os.cpu_count() or 1
            draft = load_draft(cfg)
            targets = {t: load_target(cfg, t) for t in spec.targets}
            check_vocab(draft.lm.cfg.vocab_size, {n: m.cfg.vocab_size for n, m in targets.items()})
            self.executor = InProcessExecutor(Proposer(draft), {n: Verifier(m) for n, m in targets.items()})
        else:
            self.executor = RayExecutor(cfg, cell, spec.pipeline, transport=spec.transport)
        scheduler = Scheduler({t: frontends[t] for t in spec.targets}, cfg.limits, self.executor, cfg.draft.max_seqs,
                              {t: cfg.target(t).max_seqs for t in spec.targets}, pipeline=spec.pipeline)
        self.loop = EngineLoop(scheduler, threads)

    async def generate(self, req: Request, resume: list[int], final_only: bool = False) -> AsyncIterator[Delta]:
        """The request's deltas (one at the end with `final_only`, for unary RPCs)."""
        async for d in self.loop.stream(req, resume, final_only):
            yield d

    def stats(self) -> dict:
        """Each actor's batches and held sequences, and the draft's and targets' busy fractions."""
        return self.executor.stats()

    def reset_stats(self):
        self.executor.reset_busy()

    def __del__(self):
        self.loop.shutdown()
        self.executor.shutdown()
