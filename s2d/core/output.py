"""One request as its client sees it, built in the frontend from the scheduler's token deltas
(s2d/core/sequence.py `TokenDelta`): the text, by incremental detokenization; stop strings; the
speculation stats, usage and latencies. A stop string ends the output here; the caller then aborts
the sequence in the scheduler, whose later rounds are dropped, so the output stops exactly where
the round that completed the stop string ended. While a request has stop strings, a stream holds
back the last characters that could begin one (as vLLM does), so streamed text equals unary text."""
from __future__ import annotations

from dataclasses import dataclass

from s2d.core.config import SamplingParams
from s2d.core.detok import Detokenizer
from s2d.core.sequence import TokenDelta
from s2d.core.stats import SpecStats


@dataclass
class Delta:
    """What one round added to a request: streamed to its client."""

    seq_id: str
    token_ids: list[int]
    text: str
    finished: bool = False
    finish_reason: str | None = None
    usage: dict | None = None  # on the last delta
    stats: dict | None = None  # on the last delta
    error: str | None = None  # finish_reason "error": why the engine failed on this request alone
    timing: dict | None = None  # on the last delta: RequestOutput.timing()

    def then(self, later: "Delta") -> "Delta":
        """This delta followed by a later one of the same sequence, as one."""
        return Delta(self.seq_id, self.token_ids + later.token_ids, self.text + later.text, later.finished,
                     later.finish_reason, later.usage, later.stats, later.error, later.timing)


class RequestOutput:
    def __init__(self, seq_id: str, prompt_tokens: int, params: SamplingParams, tokenizer, arrived: float,
                 resume: list[int] = ()):
        self.seq_id, self.params, self.prompt_tokens = seq_id, params, prompt_tokens
        self.token_ids: list[int] = list(resume)  # resume: tokens a client already has (a request resent)
        self.detok = Detokenizer(tokenizer, self.token_ids)
        self.text = self.detok.text
        self.sent = len(self.text)  # what the client was sent
        self.hold = max(map(len, params.stop), default=1) - 1  # characters held back from a stream
        self.stats = SpecStats()
        self.finished, self.finish_reason, self.error = False, None, None
        self.arrived = arrived  # when the frontend took the request (perf_counter)
        self.admitted = self.ended_at = 0.0
        self.emitted_at: list[float] = []  # when each round that emitted tokens was accepted

    def add(self, d: TokenDelta) -> Delta | None:
        """A round of the scheduler's; None once this output has ended (the rounds the scheduler ran
        before it heard of a stop string)."""
        if self.finished:
            return None
        self.admitted = self.admitted or d.admitted
        if d.error:
            self.error = d.error
            self._finish("error", d.at)
            return Delta(self.seq_id, [], "", True, "error", self.usage(), self.stats.to_dict(), d.error)
        self.stats.record(d.drafted, d.accepted, len(d.token_ids), d.exits)
        self.emitted_at.append(d.at)
        self.token_ids += d.token_ids
        if d.finished:
            self._finish(d.finish_reason, d.at)
        stable = self.detok.push(d.token_ids)
        text = self.detok.full() if self.finished or self.params.stop else stable  # stops match the tail too
        for stop in self.params.stop:
            at = text.find(stop, max(0, self.sent - len(stop)))
            if at >= 0:
                text = text[:at]
                self._finish("stop", d.at)
        self.text = text if self.finished else stable  # unfinished: no stop was found in the tail
        end = len(self.text)
        if not self.finished and self.hold:  # what may yet begin a stop string waits for the next round
            end = max(self.sent, end - self.hold)
        delta, self.sent = self.text[self.sent:end], max(self.sent, end)
        if not self.finished:
            return Delta(self.seq_id, d.token_ids, delta)
        return Delta(self.seq_id, d.token_ids, delta, True, self.finish_reason, self.usage(), self.stats.to_dict(),
                     timing=self.timing())

    def _finish(self, reason: str, at: float):
        if not self.finished:
            self.finished, self.finish_reason, self.ended_at = True, reason, at
            self.stats.wall_s = at - (self.admitted or self.arrived)

    def timing(self) -> dict:
        """Engine-side latencies of a finished request, from its arrival in the frontend: queue,
        time to first token, end to end, and the gaps between the rounds that emitted tokens
        (what a streaming client waits between chunks; a round may emit several tokens)."""
        at, admitted = self.emitted_at, self.admitted or self.arrived
        return {"queue_s": admitted - self.arrived, "ttft_s": (at[0] if at else self.ended_at) - self.arrived,
                "e2e_s": self.ended_at - self.arrived, "itl_s": [b - a for a, b in zip(at, at[1:])]}

    def usage(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": len(self.token_ids)}

    def result(self) -> dict:
        out = {"text": self.text, "token_ids": list(self.token_ids), "finish_reason": self.finish_reason,
               "usage": self.usage(), "stats": self.stats.to_dict()}
        return out | ({"error": self.error} if self.error else {})
