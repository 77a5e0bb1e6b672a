"""The one scheduler: continuous batching over every live sequence of every target, in process
(s2d/core/engine.py) and in a Ray serving cell (deployments/cell.py) alike.

It owns request ids, admission by free KV slots, overload, abort and release; each sequence's
token state lives here and nowhere else. It sees token ids only: the frontend
(s2d/core/frontend.py) checks and tokenizes requests and turns the token deltas into text.
It decides and it updates; it never runs or waits on a tick: `schedule` plans the ticks (a tick
drafts for its sequences in one propose call and verifies each target's in one forward,
s2d/core/executor.py), the engine core (s2d/core/engine_core.py) runs them on an executor, and
`update` takes each result back. With `pipeline` on, the running sequences form two cohorts whose
ticks alternate, so that with an executor that runs the draft and the targets side by side the
draft proposes for one cohort while the targets verify the other."""
from __future__ import annotations

import logging
import time
import uuid
from collections import deque
from dataclasses import dataclass

from s2d.core.config import Limits, Scheduling
from s2d.core.executor import Tick, TickResult
from s2d.core.frontend import Frontend, Prepared
from s2d.core.policy import DraftPolicy, Row
from s2d.core.request import DuplicateRequest, Overloaded, Request, RequestError, UnknownTarget
from s2d.core.sequence import Sequence, TokenDelta
from s2d.core.stats import Breakdown

log = logging.getLogger(__name__)


@dataclass
class Planned:
    """A tick the scheduler planned for one cohort, and the sequences it advances."""

    cohort: int
    tick: Tick
    seqs: list[Sequence]


class Scheduler:
    def __init__(self, frontend: Frontend, limits: Limits, draft_slots: int, target_slots: dict[str, int],
                 pipeline: bool = False, scheduling: Scheduling | None = None):
        """`pipeline`: two cohorts, for an executor with two ticks in flight."""
        scheduling = scheduling or Scheduling()
        self.frontend, self.frontends, self.limits = frontend, frontend.targets, limits
        self.sched = scheduling
        self.draft_slots, self.target_slots = draft_slots, target_slots
        self.pipeline = pipeline
        self.waiting: deque[Sequence] = deque()
        self.running: dict[str, Sequence] = {}
        self.cohort: dict[str, int] = {}  # seq_id -> 0 or 1
        self.planned: dict[int, list[Sequence]] = {}  # cohort -> its sequences, while its tick is in flight
        self.to_release: list[str] = []
        self.breakdown = Breakdown()
        exits = next(iter(self.frontends.values())).exits if self.frontends else []
        self.policy = DraftPolicy({t: f.profile for t, f in self.frontends.items()}, exits, scheduling.draft_policy,
                                  scheduling.online_thresholds)
        self._id_prefix = uuid.uuid4().hex[:8]  # ids unique across cell replicas
        self._ids = 0

    # -- requests ------------------------------------------------------------------------------
    def add(self, req: Prepared | Request, resume: list[int] = ()) -> Sequence:
        """Queue a request prepared by the frontend (a Request is prepared here, on the caller's
        thread: tests and tools); a full queue raises Overloaded, a live request_id
        DuplicateRequest. `resume`: output tokens the client already has."""
        p = self.frontend.prepare(req) if isinstance(req, Request) else req
        if len(self.waiting) >= self.limits.max_waiting:
            raise Overloaded(f"{len(self.waiting)} requests already wait (limit {self.limits.max_waiting})")
        self._ids += 1
        seq_id = p.request_id or f"req-{self._id_prefix}-{self._ids}"
        if seq_id in self.running or any(s.seq_id == seq_id for s in self.waiting):
            raise DuplicateRequest("request_id", f"{seq_id!r} is already live")
        seq = Sequence(seq_id, p.target, p.prompt_ids, p.params, p.plan, p.eos, p.context, resume)
        self.waiting.append(seq)
        self._admit()  # at once where a slot is free: the queue bound counts only what must wait
        return seq

    def abort(self, seq_id: str):
        """Drop a request (cancelled, deadline passed, client gone) and free its caches."""
        self.waiting = deque(s for s in self.waiting if s.seq_id != seq_id)
        if seq_id in self.running:
            self._free(self.running.pop(seq_id))

    def _free(self, s: Sequence):
        self.cohort.pop(s.seq_id, None)
        self.to_release.append(s.seq_id)

    def _admit(self):
        per_target = {t: 0 for t in self.target_slots}
        for s in self.running.values():
            per_target[s.target] += 1
        sizes = [0, 0]
        for c in self.cohort.values():
            sizes[c] += 1
        for s in list(self.waiting):
            if len(self.running) >= self.draft_slots:
                break
            if per_target[s.target] < self.target_slots[s.target]:
                self.waiting.remove(s)
                s.t0 = time.perf_counter()
                self.running[s.seq_id] = s
                per_target[s.target] += 1
                c = int(self.pipeline and sizes[1] < sizes[0])
                self.cohort[s.seq_id] = c
                sizes[c] += 1

    def load(self) -> dict:
        """What an operator watches, per target: running and waiting requests and KV slots (a
        running sequence holds one slot of its target and one of the draft, so the slots in use are
        the running count), the draft policy's choices, and the cumulative tick breakdown. Call it
        on the scheduler's thread."""
        running = {t: 0 for t in self.target_slots}
        waiting = dict(running)
        for s in self.running.values():
            running[s.target] += 1
        for s in self.waiting:
            waiting[s.target] += 1
        return {"targets": {t: {"running": running[t], "waiting": waiting[t], "kv_slots": n}
                            for t, n in self.target_slots.items()},
                "draft": {"running": len(self.running), "kv_slots": self.draft_slots},
                "policy": self.policy.state(),
                "breakdown": self.breakdown}

    @staticmethod
    def demand(load: dict) -> float:
        """How full a load (`load()`) is: the busiest KV pool's running and waiting sequences over
        its slots (a target's, or the draft's, which every sequence holds one of). Past 1 requests
        wait; what a cell's autoscaling policy scales on (deployments/autoscale.py)."""
        pools = [(t["running"] + t["waiting"]) / max(t["kv_slots"], 1) for t in load["targets"].values()]
        waiting = sum(t["waiting"] for t in load["targets"].values())
        pools.append((load["draft"]["running"] + waiting) / max(load["draft"]["kv_slots"], 1))
        return max(pools)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.planned or self.to_release)

    # -- ticks: schedule, then (the engine core executes), then update ----------------------------
    def schedule(self) -> list[Planned]:
        """Admit what fits, and plan a tick for each cohort with none in flight. With `pipeline`
        on, while some sequence drafts, the running sequences form two cohorts whose ticks
        alternate: the draft proposes for one while the targets verify the other."""
        self._admit()
        # without draft work there is nothing to overlap, and splitting would only halve the batches
        split = self.pipeline and any(s.plan.k_max > 0 and (not s.plan.adaptive or self.policy.drafts(s.target))
                                      for s in self.running.values())
        flying = {s.seq_id for seqs in self.planned.values() for s in seqs}
        out = []
        for c in (0, 1) if split else (0,):
            if c in self.planned:
                continue
            seqs, work = self._plan([s for s in self.running.values() if s.seq_id not in flying
                                     and (not split or self.cohort.get(s.seq_id) == c)])
            if seqs or self.to_release:
                out.append(Planned(c, Tick(work, self.to_release), seqs))
                self.to_release = []
                self.planned[c] = seqs
        return out

    def update(self, planned: Planned, result: TickResult) -> list[TokenDelta]:
        """A planned tick's result: each sequence's round accepted (its acceptance fed to the
        policy); what it added to each sequence."""
        del self.planned[planned.cohort]
        return self._accept(planned.seqs, result)

    def account(self, planned: Planned, result: TickResult, wall_s: float):
        """A tick's time, from its start to the next's (`wall_s`), into the breakdown and the
        policy's costs."""
        if result.targets:
            self.breakdown.add(wall_s, result.draft.forward_s, sum(v.forward_s for v in result.targets))
            self._policy(self.policy.observe, result, wall_s, sum(s.drafting_k > 0 for s in planned.seqs))

    def forget_planned(self):
        """After a failed tick: the ticks in flight are dropped (the caller aborts their sequences)."""
        self.planned.clear()

    def _plan(self, candidates: list[Sequence]) -> tuple[list[Sequence], list]:
        """Each candidate's work for one tick under the prefill budget: the oldest long prompt's
        next chunk first (so short prompts cannot starve it), then decodes and short prompts in
        admission order; the other long prompts wait. A resent sequence (outputs already) is not
        held back as a long prompt: it only rebuilds caches it had."""
        sched = self.sched
        is_long = {s.seq_id: bool(s.pending) and not s.out and len(s.prompt_ids) > sched.long_prompt
                   for s in candidates}
        first_long = next((s for s in candidates if is_long[s.seq_id]), None)
        batch = {t: 0 for t in self.target_slots}  # each target's verify rows
        for s in candidates:
            batch[s.target] += 1
        rows = [Row(s.seq_id, s.target, s.params.greedy, s.acceptance, s.catchup, s.remaining)
                for s in candidates if s.plan.adaptive]
        caps = self._policy(self.policy.caps, batch, sum(s.plan.k_max > 0 for s in candidates), rows) or {}
        budget, seqs, work = sched.prefill_budget, [], []
        for s in sorted(candidates, key=lambda s: s is not first_long):  # stable: in admission order
            if s is first_long:
                allowance = min(sched.long_chunk, budget)
            elif is_long[s.seq_id]:
                continue  # one long prompt per tick
            else:
                allowance = budget
            if s.seq_id in caps:
                w, used = s.work(allowance, *caps[s.seq_id])
            else:
                w, used = s.work(allowance)
            if w is not None:
                seqs.append(s)
                work.append(w)
                budget -= used
        return seqs, work

    def _policy(self, fn, *args):
        """A call into the draft policy. The policy only tunes speed, so an error in it must not fail
        a tick: it is logged and this tick runs with the profiles as configured."""
        try:
            return fn(*args)
        except Exception:  # noqa: BLE001
            log.exception("the draft policy failed; this tick runs with the configured profiles")
            return None

    def _accept(self, seqs: list[Sequence], result: TickResult) -> list[TokenDelta]:
        outcomes = result.outcomes
        deltas = []
        for s in seqs:
            if s.seq_id not in self.running:  # aborted while its tick was in flight
                continue
            o = outcomes[s.seq_id]
            if s.plan.adaptive and o.decoded and not o.resync and not o.error:
                self._policy(self.policy.record, (s.target, s.params.greedy), s.acceptance, s.drafting_k, o)
            try:
                d = s.accept(o)
            except Exception as e:  # noqa: BLE001 - this request alone fails
                log.exception("request %s failed", s.seq_id)
                d = s.fail(f"{type(e).__name__}: {e}")
            if d is None:
                continue
            deltas.append(d)
            if s.finished:
                self._free(self.running.pop(s.seq_id))
        return deltas


__all__ = ["Scheduler", "Request", "RequestError", "UnknownTarget", "Overloaded", "DuplicateRequest"]
