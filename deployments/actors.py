"""The draft and target actors of a serving cell: thin Ray wrappers over s2d's proposer and
verifier that run `propose_tick` / `verify_tick` inside the cell's compiled graph. A target split
over ranks (tensor_parallel) is one TargetActor per rank, in lockstep: every rank runs each tick,
rank 0 alone samples and returns (s2d/worker/parallel.py)."""
from __future__ import annotations

import logging
import os
from dataclasses import replace

import ray
import torch

from s2d.core.config import EngineConfig, ModelSpec
from s2d.core.engine import load_draft, load_target, warm_up_target
from s2d.core.executor import Drafted, Tick, Verified, propose_tick, verify_tick
from s2d.worker import parallel
from s2d.worker.workers import Proposer, Verifier

log = logging.getLogger("ray.serve")


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

    def propose_for_ranks(self, tick: Tick) -> tuple[Drafted, Drafted]:
        """The tick's drafts for the targets' rank 0s, and the same without the sampled rows'
        probabilities for the other ranks, which do not sample (bind with num_returns=2)."""
        drafted = self.propose(tick)
        bare = [p if p is None or p.q is None else replace(p, q=None) for p in drafted.proposals]
        return drafted, replace(drafted, proposals=bare)


@ray.remote(concurrency_groups=CONTROL)
class TargetActor(_Actor):
    def __init__(self, config: dict, share: int, name: str, rank: int = 0):
        cfg = EngineConfig.model_validate(config)
        self.threads = torch_threads(cfg.target(name), share)
        self.name, self.rank = name, rank
        use_threads(self.threads)
        self.worker = Verifier(load_target(cfg, name, rank))

    @ray.method(concurrency_group="control")
    def vocab(self) -> int:
        return self.worker.lm.cfg.vocab_size

    @ray.method(concurrency_group="control")
    def node(self) -> str:
        return ray.get_runtime_context().get_node_id()

    @ray.method(concurrency_group="control")
    def listen(self) -> dict:
        return parallel.listen(ray.util.get_node_ip_address())

    @ray.method(concurrency_group="control")
    def in_group(self) -> bool:
        return torch.distributed.is_initialized()

    def join(self, rendezvous: dict, same_node: bool):
        """Join the target's group (every rank at once): through shared memory where all ranks
        share this node and it can (parallel.py), else gloo or NCCL."""
        lm = self.worker.lm
        use_threads(self.threads)  # compiling bakes the thread count in
        parallel.join(lm.tp, rendezvous, same_node and parallel.shared_memory_works(lm.device))
        warm_up_target(self.name, lm)

    def verify(self, drafted: Drafted) -> Verified | None:
        use_threads(self.threads)
        try:
            verified = verify_tick(self.worker, self.name, drafted)
        except Exception:
            if self.worker.lm.tp.size > 1:  # the group's collectives are out of step now
                log.exception("s2d: rank %d of %s failed a tick; the cell replaces the target's ranks",
                              self.rank, self.name)
                os._exit(1)
            raise
        return verified if self.rank == 0 else None  # the other ranks' verdicts are rank 0's
