"""The draft and target actors of a serving cell: thin Ray wrappers over s2d's proposer and
verifier that run `propose_tick` / `verify_tick` inside the cell's compiled graph."""
from __future__ import annotations

import os

import ray
import torch

from s2d.core.config import EngineConfig, ModelSpec
from s2d.core.engine import load_draft, load_target
from s2d.core.executor import Drafted, Tick, Verified, propose_tick, verify_tick
from s2d.worker.workers import Proposer, Verifier


def torch_threads(spec: ModelSpec, share: int) -> int:
    """num_cpus threads where given (>= 1), else an equal share of the host's cores among the cell's
    `share` actors: more threads than cores makes OpenMP's spinning workers fight each other."""
    return int(spec.num_cpus) if spec.num_cpus >= 1 else max(1, (os.cpu_count() or 1) // share)


def use_threads(n: int):
    """Set in the thread that runs the forwards: Ray runs actor methods and compiled graphs on
    threads of their own, where OpenMP starts from Ray's OMP_NUM_THREADS=1."""
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)


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
    def __init__(self, config: dict, share: int):
        cfg = EngineConfig.model_validate(config)
        self.threads = torch_threads(cfg.draft, share)
        use_threads(self.threads)  # before compiling: a package is built for the threads it runs with
        self.worker = Proposer(load_draft(cfg))

    @ray.method(concurrency_group="control")
    def vocab(self) -> int:
        return self.worker.draft.lm.cfg.vocab_size

    def propose(self, tick: Tick) -> Drafted:
        use_threads(self.threads)
        return propose_tick(self.worker, tick)


@ray.remote(concurrency_groups=CONTROL)
class TargetActor(_Actor):
    def __init__(self, config: dict, share: int, name: str):
        cfg = EngineConfig.model_validate(config)
        self.threads = torch_threads(cfg.target(name), share)
        self.name = name
        use_threads(self.threads)
        self.worker = Verifier(load_target(cfg, name))

    @ray.method(concurrency_group="control")
    def vocab(self) -> int:
        return self.worker.lm.cfg.vocab_size

    def verify(self, drafted: Drafted) -> Verified:
        use_threads(self.threads)
        return verify_tick(self.worker, self.name, drafted)
