"""The draft and target actors of a serving cell: thin Ray wrappers over s2d's proposer and
verifier that run `propose_tick` / `verify_tick` inside the cell's compiled graph."""
from __future__ import annotations

import os

import ray
import torch

from s2d.config import EngineConfig, ModelSpec
from s2d.engine import load_draft, load_target
from s2d.executor import Drafted, Tick, Verified, propose_tick, verify_tick
from s2d.workers import Proposer, Verifier


def _threads(spec: ModelSpec):
    """num_cpus threads where given (>= 1), else every core: a CPU actor's forward is its whole job."""
    if not spec.num_gpus:
        torch.set_num_threads(int(spec.num_cpus) if spec.num_cpus >= 1 else os.cpu_count() or 1)


class _Actor:
    """Ticks run one at a time, in order (the default concurrency group); `ready` and `stats` run
    beside them in their own group, so a liveness check never waits for a long tick."""

    worker: Proposer | Verifier

    @ray.method(concurrency_group="control")
    def ready(self) -> bool:
        return True

    @ray.method(concurrency_group="control")
    def stats(self) -> dict:
        return self.worker.stats()


CONTROL = {"control": 1}


@ray.remote(concurrency_groups=CONTROL)
class DraftActor(_Actor):
    def __init__(self, config: dict):
        cfg = EngineConfig.model_validate(config)
        _threads(cfg.draft)
        self.worker = Proposer(load_draft(cfg))

    @ray.method(concurrency_group="control")
    def vocab(self) -> int:
        return self.worker.draft.lm.cfg.vocab_size

    def propose(self, tick: Tick) -> Drafted:
        return propose_tick(self.worker, tick)


@ray.remote(concurrency_groups=CONTROL)
class TargetActor(_Actor):
    def __init__(self, config: dict, name: str):
        cfg = EngineConfig.model_validate(config)
        _threads(cfg.target(name))
        self.name = name
        self.worker = Verifier(load_target(cfg, name))

    @ray.method(concurrency_group="control")
    def vocab(self) -> int:
        return self.worker.lm.cfg.vocab_size

    def verify(self, drafted: Drafted) -> Verified:
        return verify_tick(self.worker, self.name, drafted)
