"""What one scheduler tick sends to the workers and gets back, and the executors that run a tick.

A tick is one speculative round for a batch of live sequences of any targets: the shared draft
proposes for all of them in one call, then each target verifies its own sequences in one forward.
The same two functions (`propose_tick`, `verify_tick`) run in process (`InProcessExecutor`) and
inside Ray actors (deployments/ray_executor.py); only the transport differs.

Workers remember each sequence's tokens, so a tick carries only the tokens a worker has not seen
(`Work.new`, from `Work.start`). A worker that does not know a sequence (restarted, or never told)
answers `resync`, and the scheduler sends the full list next tick; the cache is rebuilt by prefill."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Protocol

from s2d.core.config import SamplingParams
from s2d.worker.workers import Forward, PrefillItem, Proposal, ProposeItem, Proposer, Verifier, VerifyItem


@dataclass
class Work:
    """One sequence's share of a tick."""

    seq_id: str
    target: str
    start: int  # the workers already hold tokens[:start]
    new: list[int]  # tokens[start:]
    k: int  # most tokens to draft (0: plain decoding)
    thresholds: list[float]
    stop_threshold: float
    params: SamplingParams
    seed: int  # the draft samples with seed, the verifier with seed + 1
    decode: bool = True  # False: a prompt chunk, only filled into the caches (the draft's too when k > 0)


@dataclass
class Tick:
    work: list[Work]
    release: list[str] = field(default_factory=list)  # sequences that ended: free their caches first


@dataclass
class Drafted:
    """The draft's output, read by every target (each takes its own sequences). Sampled drafts'
    probabilities (`Proposal.q`) travel here, from the draft to the targets, never to the driver."""

    tick: Tick
    proposals: list[Proposal | None]  # aligned with tick.work; None: the draft must resync this sequence
    busy_s: float = 0.0
    forwards: list[Forward] = field(default_factory=list)
    forward_s: float = 0.0  # of busy_s, in the draft's layers and head


@dataclass
class Outcome:
    seq_id: str
    drafts: list[int] = field(default_factory=list)
    exits: list[int] = field(default_factory=list)
    # per draft: (confidence, argmax) at each exit passed
    trace: list[list[tuple[float, int]]] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)  # accepted drafts, then one token of the target's
    accepted: int = 0
    resync: bool = False  # a worker lacked this sequence's earlier tokens: send them all next tick
    decoded: bool = True  # False: a prompt chunk was prefilled
    error: str | None = None  # the workers failed on this sequence alone (bad numbers, a raise in its sampling)


@dataclass
class DraftPart:
    """The draft's share of a tick: its seconds, its forwards, and of those seconds the ones in its
    layers and head."""

    busy_s: float = 0.0
    forwards: list[Forward] = field(default_factory=list)
    forward_s: float = 0.0


@dataclass
class Verified:
    """One target's verification of a tick. `draft` rides along from the draft's worker (on Ray
    only the targets return to the driver); read it once, from the TickResult."""

    target: str
    outcomes: list[Outcome]
    busy_s: float
    forwards: list[Forward] = field(default_factory=list)  # the target's
    forward_s: float = 0.0  # of busy_s, in the target's layers and head
    draft: DraftPart = field(default_factory=DraftPart)


@dataclass
class TickResult:
    """What a tick gave back: the draft's part once, and each target's verification."""

    draft: DraftPart
    targets: list[Verified]

    @classmethod
    def of(cls, verified: list[Verified]) -> "TickResult":
        return cls(verified[0].draft if verified else DraftPart(), verified)

    @property
    def outcomes(self) -> dict[str, Outcome]:
        return {o.seq_id: o for v in self.targets for o in v.outcomes}


def propose_tick(proposer: Proposer, tick: Tick) -> Drafted:
    t0 = time.perf_counter()
    for seq_id in tick.release:
        proposer.release(seq_id)
    tokens = [proposer.sync(w.seq_id, w.start, w.new) for w in tick.work]
    items, at, chunks = [], [], []
    for i, (w, toks) in enumerate(zip(tick.work, tokens)):
        if toks is None or w.k == 0:  # the draft never sees sequences that do not draft (ar)
            continue
        if w.decode:
            items.append(ProposeItem(w.seq_id, toks, w.k, w.thresholds, w.stop_threshold, w.params, w.seed))
            at.append(i)
        else:
            chunks.append(PrefillItem(w.seq_id, toks))
    if chunks:
        proposer.prefill(chunks)
    proposals: list[Proposal | None] = [Proposal() if t is not None else None for t in tokens]
    for i, p in zip(at, proposer.propose(items) if items else []):
        proposals[i] = p
    forwards, spent = proposer.take_forwards()
    return Drafted(tick, proposals, time.perf_counter() - t0, forwards, spent)


def verify_tick(verifier: Verifier, target: str, drafted: Drafted) -> Verified:
    """Verify this target's sequences of the tick and fill its prompt chunks, in one forward."""
    t0 = time.perf_counter()
    for seq_id in drafted.tick.release:
        verifier.release(seq_id)
    outcomes, items, chunks = [], [], []
    for w, p in zip(drafted.tick.work, drafted.proposals):
        if w.target != target:
            continue
        toks = verifier.sync(w.seq_id, w.start, w.new)
        if p is None or toks is None:
            outcomes.append(Outcome(w.seq_id, resync=True))
        elif p.error:
            outcomes.append(Outcome(w.seq_id, error=p.error))
        elif not w.decode:
            outcomes.append(Outcome(w.seq_id, decoded=False))
            chunks.append(PrefillItem(w.seq_id, toks))
        else:
            outcomes.append(Outcome(w.seq_id, p.drafts, p.exits, p.trace))
            items.append(VerifyItem(w.seq_id, toks, p.drafts, p.q, w.params, w.seed + 1))
    verdicts = iter(verifier.verify(items, chunks) if items or chunks else [])
    for o in outcomes:
        if o.decoded and not o.resync and not o.error:
            v = next(verdicts)
            o.tokens, o.accepted, o.error = v.tokens, v.accepted, v.error
    forwards, spent = verifier.take_forwards()
    return Verified(target, outcomes, time.perf_counter() - t0, forwards, spent,
                    DraftPart(drafted.busy_s, drafted.forwards, drafted.forward_s))


class Executor(Protocol):
    """Runs ticks. `submit` may return before the tick ran: up to `max_inflight` ticks are in flight
    (the Ray executor pipelines two); `result` returns their results in submission order."""

    max_inflight: int

    def submit(self, tick: Tick): ...

    def result(self, handle) -> TickResult: ...

    def stats(self) -> dict: ...  # each worker's stats and the busy fractions since reset_busy

    def reset_busy(self) -> None: ...

    def drain(self) -> None: ...  # drop the ticks in flight (after a failed one)

    def shutdown(self) -> None: ...


class BusyClock:
    """Seconds the draft and each target spent in ticks, as fractions of the wall time since reset."""

    def __init__(self, targets: list[str]):
        self.roles = ["draft", *targets]
        self.reset_busy()

    def reset_busy(self):
        self.busy = {k: 0.0 for k in self.roles}
        self.t_start = time.perf_counter()

    def count(self, result: TickResult):
        self.busy["draft"] += result.draft.busy_s
        for v in result.targets:
            self.busy[v.target] += v.busy_s

    def fractions(self) -> dict[str, float]:
        wall = time.perf_counter() - self.t_start
        return {k: round(v / wall, 4) for k, v in self.busy.items()}


class InProcessExecutor(BusyClock):
    """Direct calls on the proposer and the verifiers, in the caller's thread."""

    max_inflight = 1

    def __init__(self, proposer: Proposer, verifiers: dict[str, Verifier]):
        super().__init__(list(verifiers))
        self.proposer, self.verifiers = proposer, verifiers

    def submit(self, tick: Tick) -> list[Verified]:
        drafted = propose_tick(self.proposer, tick)
        return [verify_tick(v, name, drafted) for name, v in self.verifiers.items()]

    def result(self, handle: list[Verified]) -> TickResult:
        out = TickResult.of(handle)
        self.count(out)
        return out

    def stats(self) -> dict:
        return {"busy_fraction": self.fractions(), "draft": self.proposer.stats(),
                **{n: v.stats() for n, v in self.verifiers.items()}}

    def drain(self) -> None:
        pass

    def shutdown(self) -> None:
        pass
