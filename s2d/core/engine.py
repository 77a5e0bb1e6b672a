"""The in-process engine: one shared sorted draft, any number of named targets, and the one
scheduler (s2d/core/scheduler.py) over an in-process executor. The Ray serving cell runs the same
scheduler over actors (deployments/cell.py)."""
from __future__ import annotations

from collections.abc import Iterator

from s2d.core.config import EngineConfig, Limits, Profile, SamplingParams
from s2d.core.engine_core import EngineCore
from s2d.core.executor import Executor, InProcessExecutor
from s2d.core.request import Overloaded, Request, RequestError, UnknownTarget
from s2d.core.scheduler import Scheduler
from s2d.core.sequence import Delta, DraftPlan, Sequence, encode_prompt, eos_ids
from s2d.worker.draft import SortedDraft, read_exits
from s2d.worker.graphs import attach, warm_up
from s2d.worker.model import CausalLM, context_length, load_hf_config
from s2d.worker.workers import Proposer, Verifier


def load_tokenizer(path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)


def load_draft(cfg: EngineConfig) -> SortedDraft:
    """The shared draft, its static segments compiled (s2d/worker/graphs.py)."""
    d = cfg.draft
    draft = SortedDraft.from_pretrained(cfg.resolve(d.path), n_slots=d.max_seqs, max_len=d.max_seq_len, dtype=d.dtype,
                                        devices=d.placement, trust_remote_code=d.trust_remote_code,
                                        static_forward=d.static_forward)
    warm_up("the draft", draft.static)
    return draft


def load_target(cfg: EngineConfig, name: str) -> CausalLM:
    """A target, its static forward compiled (s2d/worker/graphs.py)."""
    t = cfg.target(name)
    lm = attach(CausalLM.from_pretrained(cfg.resolve(t.path), n_slots=t.max_seqs, max_len=t.max_seq_len, dtype=t.dtype,
                                         devices=t.placement, trust_remote_code=t.trust_remote_code,
                                         static_forward=t.static_forward))
    warm_up(name, [lm.static, lm.static_fill] if lm.static else [])
    return lm


class TargetFrontend:
    """What admission needs to know of a target: tokenizer, EOS, profile, context. Used by the
    engine and by the Ray router (which holds no model)."""

    def __init__(self, cfg: EngineConfig, name: str, exits: list[int], context: int):
        spec = cfg.target(name)
        self.name, self.profile, self.exits, self.limits = name, spec.profile, exits, cfg.limits
        self.plain_prompts = spec.plain_prompts
        path = cfg.resolve(spec.path)
        self.tokenizer = load_tokenizer(path, spec.trust_remote_code)
        self.eos = eos_ids(self.tokenizer, path)
        self.context = context
        DraftPlan.for_mode("s2d", spec.profile, exits)  # a profile that does not fit the draft fails at start

    def sequence(self, seq_id: str, req: Request, resume: list[int] = ()) -> Sequence:
        params = req.params
        ids = encode_prompt(self.tokenizer, req.prompt, req.messages, req.raw or self.plain_prompts)
        if not ids:
            raise RequestError("prompt", "empty prompt")
        if len(ids) > self.limits.max_prompt_tokens or len(ids) >= self.context:
            raise RequestError("prompt", f"{len(ids)} tokens is longer than the limit "
                               f"{min(self.limits.max_prompt_tokens, self.context - 1)}")
        if req.fit_context and len(ids) + params.max_tokens > self.context:  # a default, not the client's ask
            params = params.model_copy(update={"max_tokens": self.context - len(ids)})
        if len(ids) + params.max_tokens > self.context:
            raise RequestError("max_tokens", f"prompt ({len(ids)}) + max_tokens ({params.max_tokens}) exceeds "
                               f"the context ({self.context})")
        plan = DraftPlan.for_mode(req.mode, self.profile, self.exits)
        return Sequence(seq_id, self.name, ids, params, plan, self.tokenizer, self.eos, self.context, resume)


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


def check_vocab(draft_vocab: int, target_vocabs: dict[str, int]):
    for n, v in target_vocabs.items():
        if v != draft_vocab:
            raise ValueError(f"targets.{n}: vocabulary {v} differs from the draft's {draft_vocab}")


def load_in_process(cfg: EngineConfig, targets: list[str] | None = None) -> InProcessExecutor:
    """The draft and the targets (default: all) loaded in this process, behind the in-process executor."""
    draft = load_draft(cfg)
    models = {t: load_target(cfg, t) for t in targets or [t.name for t in cfg.targets]}
    check_vocab(draft.lm.cfg.vocab_size, {n: m.cfg.vocab_size for n, m in models.items()})
    return InProcessExecutor(Proposer(draft), {n: Verifier(m) for n, m in models.items()})


def engine_core(cfg: EngineConfig, executor: Executor, targets: list[str] | None = None,
                pipeline: bool = False) -> EngineCore:
    """The scheduler for the given targets (default: all), with the config's slots and limits, over
    `executor`; `pipeline` takes effect where the executor keeps two ticks in flight."""
    targets = targets or [t.name for t in cfg.targets]
    frontends = build_frontends(cfg)
    scheduler = Scheduler({t: frontends[t] for t in targets}, cfg.limits, cfg.draft.max_seqs,
                          {t: cfg.target(t).max_seqs for t in targets}, pipeline and executor.max_inflight > 1,
                          cfg.scheduling)
    return EngineCore(scheduler, executor)


class Engine:
    """The scheduler and the models in this process; `step()` runs one tick."""

    def __init__(self, cfg: EngineConfig, executor: InProcessExecutor):
        self.cfg = cfg
        self.proposer, self.verifiers = executor.proposer, executor.verifiers
        self.core = engine_core(cfg, executor)
        self.scheduler = self.core.scheduler
        self.frontends = self.scheduler.frontends

    @classmethod
    def from_config(cls, cfg: EngineConfig) -> "Engine":
        return cls(cfg, load_in_process(cfg))

    @property
    def exits(self) -> list[int]:
        return self.proposer.exits

    def set_profile(self, target: str, profile: Profile):
        self.frontends[target].profile = profile
        self.scheduler.policy.reset(target, profile)

    def add_request(self, req: Request) -> str:
        return self.scheduler.add(req).seq_id

    def abort(self, seq_id: str):
        self.scheduler.abort(seq_id)

    def step(self) -> list[Delta]:
        return self.core.step()

    @property
    def running(self) -> dict[str, Sequence]:
        return self.scheduler.running

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work

    # -- conveniences --------------------------------------------------------------------------
    def generate(self, requests: list[Request]) -> list[dict]:
        """Run requests to completion together; results in request order."""
        seqs = [self.scheduler.add(r) for r in requests]
        while any(not s.finished for s in seqs):
            self.step()
        return [s.result() for s in seqs]

    def start(self, request: Request) -> Sequence:
        """Queue a request; its result, once finished, is `seq.result()`."""
        return self.scheduler.add(request)

    def deltas(self, seq: Sequence) -> Iterator[Delta]:
        """Run ticks until `seq` finishes, yielding what each added to it."""
        while not seq.finished:
            for d in self.step():
                if d.seq_id == seq.seq_id:
                    yield d

    def stream(self, request: Request) -> Iterator[Delta]:
        return self.deltas(self.start(request))


def greedy(max_tokens: int = 64, **kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, **kw)


__all__ = ["Engine", "Request", "RequestError", "UnknownTarget", "Overloaded", "SamplingParams", "Limits", "greedy"]
