"""One request's token state and the rules of a round: how many tokens to draft, what to send
to the verifier, how accepted tokens end a request (EOS, stop strings, max_tokens). The one
scheduler (s2d/core/scheduler.py) keeps them, in process and in a serving cell alike, so both decode
exactly alike."""
from __future__ import annotations

import random
import time
from dataclasses import dataclass

from s2d.core.config import Profile, SamplingParams
from s2d.core.detok import Detokenizer
from s2d.core.executor import Outcome, Work
from s2d.core.policy import Acceptance
from s2d.core.request import RequestError
from s2d.core.stats import SpecStats
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


def encode_prompt(tokenizer, prompt: str | None, messages: list[dict] | None, raw: bool) -> list[int]:
    """Chat messages through the chat template; a plain prompt is the user turn where the tokenizer
    has a template (unless raw), else tokenized as plain text."""
    if messages:
        if not getattr(tokenizer, "chat_template", None):
            raise RequestError("messages", "this model's tokenizer has no chat template")
        return apply_template(tokenizer, messages, "messages")
    if not prompt:
        raise RequestError("prompt", "empty prompt")
    if getattr(tokenizer, "chat_template", None) and not raw:
        return apply_template(tokenizer, [{"role": "user", "content": prompt}], "prompt")
    return list(tokenizer(prompt)["input_ids"])


def apply_template(tokenizer, messages: list[dict], field: str) -> list[int]:
    """A template may refuse a conversation (Llama 2's: roles must alternate): the client's mistake."""
    from jinja2 import TemplateError

    try:
        return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                  return_dict=False))
    except TemplateError as e:
        raise RequestError(field, f"the chat template refused it: {e}") from None


def eos_ids(tokenizer, model_dir: str | None = None) -> set[int]:
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    if model_dir:
        try:
            from transformers import GenerationConfig

            e = GenerationConfig.from_pretrained(model_dir).eos_token_id
            ids.update(e if isinstance(e, list) else [] if e is None else [e])
        except OSError:
            pass
    return ids


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
    timing: dict | None = None  # on the last delta: Sequence.timing()

    def then(self, later: "Delta") -> "Delta":
        """This delta followed by a later one of the same sequence, as one."""
        return Delta(self.seq_id, self.token_ids + later.token_ids, self.text + later.text, later.finished,
                     later.finish_reason, later.usage, later.stats, later.error, later.timing)


class Sequence:
    def __init__(self, seq_id: str, target: str, prompt_ids: list[int], params: SamplingParams,
                 plan: DraftPlan, tokenizer, eos: set[int], context: int, resume: list[int] = ()):
        self.seq_id, self.target, self.params, self.plan = seq_id, target, params, plan
        self.prompt_ids = prompt_ids
        self.out: list[int] = list(resume)  # tokens a client already has (a request resent after a failure)
        self.synced = 0  # the workers hold tokens[:synced]
        self.cached_drafts = 0  # and this many more: the drafts the last round accepted, which they added
        self.tokenizer, self.eos = tokenizer, set() if params.ignore_eos else eos
        self.context = context  # positions the caches hold
        self.seed = params.seed if params.seed is not None else random.getrandbits(62)
        self.round = 0
        self.drafting_k = 0  # the cap on drafts of the work in flight
        self.drafted_upto = 0  # the draft has seen tokens[:drafted_upto] (it never sees work with k = 0)
        self.acceptance = Acceptance()  # its own, per draft position: the draft policy's estimate of it
        self.stats = SpecStats()
        self.detok = Detokenizer(tokenizer, self.out)
        self.text = self.detok.text
        self.sent = len(self.text)  # what the client was sent
        self.finished, self.finish_reason, self.error = False, None, None
        self.arrived = self.t0 = time.perf_counter()  # t0: admission (the scheduler sets it)
        self.emitted_at: list[float] = []  # when each round that emitted tokens was accepted
        self.ended_at = 0.0

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

    def accept(self, o: Outcome) -> Delta | None:
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
        self.stats.record(len(o.drafts), o.accepted, len(o.tokens), o.exits)
        self.emitted_at.append(time.perf_counter())
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
        stable = self.detok.push(new)
        text = self.detok.full() if self.finished or self.params.stop else stable  # stops match the tail too
        for stop in self.params.stop:
            at = text.find(stop, max(0, self.sent - len(stop)))
            if at >= 0:
                text = text[:at]
                self._finish("stop")
        self.text = text if self.finished else stable  # unfinished: no stop was found in the tail
        end = len(self.text)
        delta, self.sent = self.text[self.sent:end], max(self.sent, end)
        if not self.finished:
            return Delta(self.seq_id, new, delta)
        return Delta(self.seq_id, new, delta, True, self.finish_reason, self.usage(), self.stats.to_dict(),
                     timing=self.timing())

    def fail(self, error: str) -> Delta:
        """End this request alone: the engine failed on it (its batch-mates go on)."""
        self.error = error
        self._finish("error")
        return Delta(self.seq_id, [], "", True, "error", self.usage(), self.stats.to_dict(), error)

    def _finish(self, reason: str):
        if not self.finished:
            self.finished, self.finish_reason = True, reason
            self.ended_at = time.perf_counter()
            self.stats.wall_s = self.ended_at - self.t0

    def timing(self) -> dict:
        """Engine-side latencies of a finished request, from its arrival in the scheduler: queue,
        time to first token, end to end, and the gaps between the rounds that emitted tokens
        (what a streaming client waits between chunks; a round may emit several tokens)."""
        at = self.emitted_at
        return {"queue_s": self.t0 - self.arrived, "ttft_s": (at[0] if at else self.ended_at) - self.arrived,
                "e2e_s": self.ended_at - self.arrived, "itl_s": [b - a for a, b in zip(at, at[1:])]}

    def usage(self) -> dict:
        return {"prompt_tokens": len(self.prompt_ids), "completion_tokens": len(self.out)}

    def result(self) -> dict:
        out = {"text": self.text, "token_ids": list(self.out), "finish_reason": self.finish_reason,
               "usage": self.usage(), "stats": self.stats.to_dict()}
        return out | ({"error": self.error} if self.error else {})
