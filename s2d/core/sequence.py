"""One request's token state and the rules of a round: how many tokens to draft, what to send
to the verifier, how accepted tokens end a request (EOS, max_tokens). The one scheduler
(s2d/core/scheduler.py) keeps them, in process and in a serving cell alike, so both decode exactly
alike. Token ids only: text and stop strings are the frontend's (s2d/core/output.py)."""
from __future__ import annotations

import random
import time
from dataclasses import dataclass

from s2d.core.config import Profile, SamplingParams
from s2d.core.executor import Outcome, Work
from s2d.core.policy import Acceptance
from s2d.core.request import RequestError
from s2d.worker.workers import INLINE_TOKENS


@dataclass
class DraftPlan:
    """What the proposer does for a request: derived from the mode and the target's profile."""

    thresholds: list[float]
    k_max: int
    stop_threshold: float
    adaptive: bool = False  # mode s2d: the scheduler's draft policy may change k and the thresholds per tick

    @classmethod
    def for_mode(cls, mode: str, profile: Profile, exits: list[int]) -> "DraftPlan":
        if mode == "s2d":
            thresholds = profile.thresholds_for(exits)
            if len(thresholds) != len(exits):
                raise RequestError("profile.thresholds", f"{len(thresholds)} thresholds for {len(exits)} exits {exits}")
            return cls(thresholds, profile.k_max, profile.stop_threshold, adaptive=True)
        if mode == "ar":
            return cls([0.0] * len(exits), 0, 0.0)
        if mode.startswith("fixed:"):
            try:
                depth = int(mode.split(":", 1)[1])
                at = exits.index(depth)
            except ValueError:
                raise RequestError("mode", f"{mode!r}: the draft's exits are {exits}") from None
            # never emit before exit `at`, always emit there
            return cls([2.0] * at + [-1.0] * (len(exits) - at), profile.k_max, 0.0)
        raise RequestError("mode", f"{mode!r} is not one of s2d, ar, fixed:E")


@dataclass
class TokenDelta:
    """What one round added to a sequence, as the scheduler sees it: token ids, the round's drafts,
    and when (the frontend, s2d/core/output.py, turns these into what the client reads)."""

    seq_id: str
    token_ids: list[int]
    drafted: int
    accepted: int
    exits: list[int]  # exit depth of each draft
    at: float  # when the round was accepted (perf_counter)
    admitted: float  # when the sequence was admitted (perf_counter)
    finished: bool = False
    finish_reason: str | None = None  # stop (EOS) | length | error
    error: str | None = None  # why the engine failed on this request alone


class Sequence:
    def __init__(self, seq_id: str, target: str, prompt_ids: list[int], params: SamplingParams,
                 plan: DraftPlan, eos: set[int], context: int, resume: list[int] = ()):
        self.seq_id, self.target, self.params, self.plan = seq_id, target, params, plan
        self.prompt_ids = prompt_ids
        self.out: list[int] = list(resume)  # tokens a client already has (a request resent after a failure)
        self.synced = 0  # the workers hold tokens[:synced]
        self.cached_drafts = 0  # and this many more: the drafts the last round accepted, which they added
        self.eos = eos
        self.context = context  # positions the caches hold
        self.seed = params.seed if params.seed is not None else random.getrandbits(62)
        self.round = 0
        self.drafting_k = 0  # the cap on drafts of the work in flight
        self.drafted_upto = 0  # the draft has seen tokens[:drafted_upto] (it never sees work with k = 0)
        self.acceptance = Acceptance()  # its own, per draft position: the draft policy's estimate of it
        self.finished, self.finish_reason, self.error = False, None, None
        self.t0 = time.perf_counter()  # admission (the scheduler sets it)

    def _tokens(self, start: int, end: int) -> list[int]:
        """(prompt_ids + out)[start:end] without building the whole list."""
        p = len(self.prompt_ids)
        return self.prompt_ids[start:end] + self.out[max(start - p, 0):max(end - p, 0)]

    @property
    def catchup(self) -> int:
        """Tokens the draft would have to catch up on (prefill) before drafting for this sequence: none
        while it drafts (what its last round emitted rides in its next decode row)."""
        return 0 if self.drafting_k else len(self.prompt_ids) + len(self.out) - self.drafted_upto

    @property
    def remaining(self) -> int:
        return self.params.max_tokens - len(self.out)

    @property
    def pending(self) -> int:
        """Tokens the caches lack before the last one (a prompt, or everything after a resync),
        where more than ride in a decode row: what the prefill budget pays for. The drafts the last
        round accepted are in the caches already."""
        n = len(self.prompt_ids) + len(self.out) - 1 - self.synced - self.cached_drafts
        return n if n > INLINE_TOKENS else 0

    def work(self, budget: int, k_cap: int | None = None, thresholds: list[float] | None = None
             ) -> tuple[Work | None, int]:
        """This sequence's share of the next tick, and the prefill budget it used: the tokens the
        workers have not seen, and how far to draft (at most k_cap, the policy's choice, where
        given). A prompt longer than the budget goes in chunks (prefill-only work, no output) over
        several ticks; None when no budget is left this tick."""
        pending, n = self.pending, len(self.prompt_ids) + len(self.out)
        chunk = pending > budget
        if chunk and budget < INLINE_TOKENS:
            return None, 0
        start = self.synced + self.cached_drafts  # the workers hold the drafts the last round accepted
        end = start + budget if chunk else n
        k_max = self.plan.k_max if k_cap is None else k_cap
        k = k_max if chunk else max(0, min(k_max, self.remaining - 1, self.context - n - 1))
        w = Work(self.seq_id, self.target, start, self._tokens(start, end), k, thresholds or self.plan.thresholds,
                 self.plan.stop_threshold, self.params, self.seed * 1_000_003 + 2 * self.round, decode=not chunk)
        self.drafting_k = k
        if k:
            self.drafted_upto = end
        self.synced, self.cached_drafts = end, 0
        return w, budget if chunk else pending

    def accept(self, o: Outcome) -> TokenDelta | None:
        """Apply a tick's outcome; None when there is nothing to tell the client: a prompt chunk was
        prefilled, or a worker asked for the full token list (sent next tick)."""
        if o.resync:
            self.synced = self.cached_drafts = 0
            return None
        if o.error:
            return self.fail(o.error)
        if not o.decoded:
            return None
        self.round += 1
        self.cached_drafts = o.accepted
        new = []
        for t in o.tokens:
            new.append(t)
            self.out.append(t)
            if t in self.eos:
                self._finish("stop")
                break
            if len(self.out) >= self.params.max_tokens:
                self._finish("length")
                break
        return TokenDelta(self.seq_id, new, len(o.drafts), o.accepted, o.exits, time.perf_counter(), self.t0,
                          self.finished, self.finish_reason)

    def fail(self, error: str) -> TokenDelta:
        """End this request alone: the engine failed on it (its batch-mates go on)."""
        self.error = error
        self._finish("error")
        return TokenDelta(self.seq_id, [], 0, 0, [], time.perf_counter(), self.t0, True, "error", error)

    def _finish(self, reason: str):
        if not self.finished:
            self.finished, self.finish_reason = True, reason
