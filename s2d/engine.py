"""The engine: one shared sorted draft, any number of named targets, continuous batching.

A step drafts for every live sequence of every target in one proposer call (each with its
target's thresholds), then verifies per target in one forward each."""
from __future__ import annotations

import itertools
import time
from collections import deque
from collections.abc import Iterator

from s2d.config import EngineConfig, Limits, Profile, SamplingParams
from s2d.draft import SortedDraft, read_exits
from s2d.metrics import SpecStats
from s2d.model import CausalLM, context_length, load_hf_config
from s2d.sequence import (Delta, DraftPlan, Overloaded, Request, RequestError, Sequence, UnknownTarget,
                          encode_prompt, eos_ids)
from s2d.workers import Proposal, Proposer, Verifier


def load_tokenizer(path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)


def load_draft(cfg: EngineConfig) -> SortedDraft:
    d = cfg.draft
    return SortedDraft.from_pretrained(cfg.resolve(d.path), n_slots=d.max_seqs, max_len=d.max_seq_len, dtype=d.dtype,
                                       devices=d.placement, trust_remote_code=d.trust_remote_code)


def load_target(cfg: EngineConfig, name: str) -> CausalLM:
    t = cfg.target(name)
    return CausalLM.from_pretrained(cfg.resolve(t.path), n_slots=t.max_seqs, max_len=t.max_seq_len, dtype=t.dtype,
                                    devices=t.placement, trust_remote_code=t.trust_remote_code)


class TargetFrontend:
    """What admission needs to know of a target: tokenizer, EOS, profile, context. Used by the
    engine and by the Ray router (which holds no model)."""

    def __init__(self, cfg: EngineConfig, name: str, exits: list[int], context: int):
        spec = cfg.target(name)
        self.name, self.profile, self.exits, self.limits = name, spec.profile, exits, cfg.limits
        path = cfg.resolve(spec.path)
        self.tokenizer = load_tokenizer(path, spec.trust_remote_code)
        self.eos = eos_ids(self.tokenizer, path)
        self.context = context
        DraftPlan.for_mode("s2d", spec.profile, exits)  # a profile that does not fit the draft fails at start

    def sequence(self, seq_id: str, req: Request) -> Sequence:
        params = req.params
        if params.max_tokens > self.limits.max_new_tokens:
            raise RequestError("max_tokens", f"{params.max_tokens} exceeds the limit {self.limits.max_new_tokens}")
        ids = encode_prompt(self.tokenizer, req.prompt, req.messages, req.raw)
        if not ids:
            raise RequestError("prompt", "empty prompt")
        if len(ids) > self.limits.max_prompt_tokens or len(ids) >= self.context:
            raise RequestError("prompt", f"{len(ids)} tokens is longer than the limit "
                               f"{min(self.limits.max_prompt_tokens, self.context - 1)}")
        if len(ids) + params.max_tokens > self.context:
            raise RequestError("max_tokens", f"prompt ({len(ids)}) + max_tokens ({params.max_tokens}) exceeds "
                               f"the context ({self.context})")
        plan = DraftPlan.for_mode(req.mode, self.profile, self.exits)
        return Sequence(seq_id, self.name, ids, params, plan, self.tokenizer, self.eos, self.context)


def build_frontends(cfg: EngineConfig) -> dict[str, TargetFrontend]:
    """Every target's frontend, from the checkpoints' configs alone (no weights loaded)."""
    d = cfg.draft
    draft_path = cfg.resolve(d.path)
    exits = read_exits(draft_path)
    draft_ctx = context_length(load_hf_config(draft_path, d.trust_remote_code), d.max_seq_len)
    out = {}
    for t in cfg.targets:
        ctx = context_length(load_hf_config(cfg.resolve(t.path), t.trust_remote_code), t.max_seq_len)
        out[t.name] = TargetFrontend(cfg, t.name, exits, min(ctx, draft_ctx))
    return out


class Engine:
    def __init__(self, cfg: EngineConfig, draft: SortedDraft, targets: dict[str, CausalLM]):
        self.cfg = cfg
        self.proposer = Proposer(draft)
        self.verifiers = {n: Verifier(m) for n, m in targets.items()}
        vocab = draft.lm.cfg.vocab_size
        for n, m in targets.items():
            if m.cfg.vocab_size != vocab:
                raise ValueError(f"targets.{n}: vocabulary {m.cfg.vocab_size} differs from the draft's {vocab}")
        self.frontends = build_frontends(cfg)
        self.waiting: deque[Sequence] = deque()
        self.running: dict[str, Sequence] = {}
        self.finished_stats = SpecStats()
        self._ids = itertools.count()

    @classmethod
    def from_config(cls, cfg: EngineConfig) -> "Engine":
        return cls(cfg, load_draft(cfg), {t.name: load_target(cfg, t.name) for t in cfg.targets})

    @property
    def exits(self) -> list[int]:
        return self.proposer.exits

    def set_profile(self, target: str, profile: Profile):
        self.frontends[target].profile = profile

    # -- requests ------------------------------------------------------------------------------
    def add_request(self, req: Request) -> str:
        """Validate and queue a request; bad input raises RequestError naming the field."""
        if req.target not in self.frontends:
            raise UnknownTarget("target", f"unknown target {req.target!r}; known: {sorted(self.frontends)}")
        if len(self.waiting) >= self.cfg.limits.max_waiting:
            raise Overloaded(f"{len(self.waiting)} requests already wait")
        seq_id = req.request_id or f"req-{next(self._ids)}"
        if seq_id in self.running or any(s.seq_id == seq_id for s in self.waiting):
            raise RequestError("request_id", f"{seq_id!r} is already live")
        self.waiting.append(self.frontends[req.target].sequence(seq_id, req))
        return seq_id

    def abort(self, seq_id: str):
        self.waiting = deque(s for s in self.waiting if s.seq_id != seq_id)
        if seq_id in self.running:
            self._free(self.running.pop(seq_id))

    def _free(self, s: Sequence):
        self.proposer.release(s.seq_id)
        self.verifiers[s.target].release(s.seq_id)

    def _admit(self):
        for s in list(self.waiting):
            live = sum(r.target == s.target for r in self.running.values())
            if len(self.running) < self.proposer.draft.lm.n_slots and live < self.verifiers[s.target].lm.n_slots:
                self.waiting.remove(s)
                s.t0 = time.perf_counter()
                self.running[s.seq_id] = s

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # -- one step ------------------------------------------------------------------------------
    def step(self) -> list[Delta]:
        self._admit()
        seqs = list(self.running.values())
        items = [s.propose_item() for s in seqs]
        drafting = [i for i, it in enumerate(items) if it.k > 0]
        proposals = [Proposal() for _ in seqs]
        if drafting:
            for i, p in zip(drafting, self.proposer.propose([items[i] for i in drafting])):
                proposals[i] = p
        verdicts = [None] * len(seqs)
        for name, verifier in self.verifiers.items():
            idx = [i for i, s in enumerate(seqs) if s.target == name]
            if idx:
                for i, v in zip(idx, verifier.verify([seqs[i].verify_item(proposals[i]) for i in idx])):
                    verdicts[i] = v
        deltas = []
        for s, p, v in zip(seqs, proposals, verdicts):
            deltas.append(s.accept(p, v))
            if s.finished:
                self._free(self.running.pop(s.seq_id))
                self.finished_stats = self.finished_stats.merge(s.stats)
        return deltas

    # -- conveniences --------------------------------------------------------------------------
    def generate(self, requests: list[Request]) -> list[dict]:
        """Run requests to completion together; results in request order."""
        seqs = {}
        for r in requests:
            sid = self.add_request(r)
            seqs[sid] = next(s for s in self.waiting if s.seq_id == sid)
        while any(not s.finished for s in seqs.values()):
            self.step()
        return [s.result() for s in seqs.values()]

    def stream(self, request: Request) -> Iterator[Delta]:
        sid = self.add_request(request)
        seq = self.waiting[-1]
        while not seq.finished:
            for d in self.step():
                if d.seq_id == sid:
                    yield d
        self.last_result = seq.result()


def greedy(max_tokens: int = 64, **kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, **kw)


__all__ = ["Engine", "Request", "RequestError", "UnknownTarget", "Overloaded", "SamplingParams", "Limits", "greedy"]
