"""The shared draft and the per-target deployments: model replicas that batch the calls of many
concurrent requests with @serve.batch (Ray collects them across router coroutines for free, and
the batch size and wait are tunable at run time), then run one forward per batch."""
from __future__ import annotations

import torch
from ray import serve

from s2d.config import EngineConfig
from s2d.engine import load_draft, load_target
from s2d.workers import Proposal, ProposeItem, Proposer, Verdict, Verifier, VerifyItem

BATCH_WAIT_S = 0.002


class _Replica:
    worker: Proposer | Verifier

    def release(self, seq_id: str) -> bool:
        return self.worker.release(seq_id)

    def stats(self) -> dict:
        sizes = self.worker.batch_sizes
        return {"held": self.worker.held, "batches": len(sizes), "max_batch": max(sizes, default=0),
                "mean_batch": sum(sizes) / len(sizes) if sizes else 0.0, "evicted": self.worker.table.evicted}

    def _limit_threads(self, spec):
        if not spec.num_gpus and spec.num_cpus >= 1:
            torch.set_num_threads(int(spec.num_cpus))


@serve.deployment
class DraftDeployment(_Replica):
    def __init__(self, config: dict):
        cfg = EngineConfig.model_validate(config)
        self._limit_threads(cfg.draft)
        self.worker = Proposer(load_draft(cfg))
        self.propose.set_max_batch_size(cfg.draft.max_seqs)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=BATCH_WAIT_S)
    async def propose(self, items: list[ProposeItem]) -> list[Proposal]:
        return self.worker.propose(items)


@serve.deployment
class TargetDeployment(_Replica):
    def __init__(self, config: dict, name: str):
        cfg = EngineConfig.model_validate(config)
        self._limit_threads(cfg.target(name))
        self.worker = Verifier(load_target(cfg, name))
        self.verify.set_max_batch_size(cfg.target(name).max_seqs)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=BATCH_WAIT_S)
    async def verify(self, items: list[VerifyItem]) -> list[Verdict]:
        return self.worker.verify(items)
