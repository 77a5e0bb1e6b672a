"""The in-process engine: one shared sorted draft, any number of named targets, and the one
scheduler (s2d/core/scheduler.py) over an in-process executor. The Ray serving cell runs the same
scheduler over actors (deployments/cell.py)."""
from __future__ import annotations

from collections.abc import Iterator

from s2d.core.config import EngineConfig, Limits, Profile, SamplingParams, refuse_tensor_parallel
from s2d.core.engine_core import EngineCore
from s2d.core.executor import Executor, InProcessExecutor
from s2d.core.frontend import build_frontend
from s2d.core.output import Delta, RequestOutput
from s2d.core.request import Overloaded, Request, RequestError, UnknownTarget
from s2d.core.scheduler import Scheduler
from s2d.core.sequence import Sequence
from s2d.worker.draft import SortedDraft
from s2d.worker.graphs import attach, warm_up
from s2d.worker.model import CausalLM
from s2d.worker.parallel import TensorParallel
from s2d.worker.threads import on_passing_thread
from s2d.worker.workers import Proposer, Verifier


def load_draft(cfg: EngineConfig) -> SortedDraft:
    """The shared draft, its static segments compiled (s2d/worker/graphs.py), on a passing thread
    (s2d/worker/threads.py: the thread that serves it keeps the only OpenMP team)."""
    return on_passing_thread(_load_draft, cfg)


def _load_draft(cfg: EngineConfig) -> SortedDraft:
    d = cfg.draft
    draft = SortedDraft.from_pretrained(cfg.resolve(d.path), n_slots=d.max_seqs, max_len=d.max_seq_len, dtype=d.dtype,
                                        device=d.device, trust_remote_code=d.trust_remote_code,
                                        static_forward=d.static_forward)
    warm_up("the draft", draft.static)
    return draft


def load_target(cfg: EngineConfig, name: str, rank: int = 0) -> CausalLM:
    """A target (with tensor_parallel, rank `rank`'s part of it), its static forward compiled
    (s2d/worker/graphs.py), on a passing thread (as the draft). A rank of a split target compiles
    once it has joined its group (`warm_up_target`): its steps trace the group's all-reduce."""
    return on_passing_thread(_load_target, cfg, name, rank)


def _load_target(cfg: EngineConfig, name: str, rank: int) -> CausalLM:
    t = cfg.target(name)
    lm = attach(CausalLM.from_pretrained(cfg.resolve(t.path), n_slots=t.max_seqs, max_len=t.max_seq_len, dtype=t.dtype,
                                         device=t.device, trust_remote_code=t.trust_remote_code,
                                         static_forward=t.static_forward,
                                         tp=TensorParallel(rank, t.tensor_parallel, t.device)))
    if t.tensor_parallel == 1:
        _warm_up_target(name, lm)
    return lm


def warm_up_target(name: str, lm: CausalLM):
    """Compile (or load) a target's static steps, on a passing thread."""
    on_passing_thread(_warm_up_target, name, lm)


def _warm_up_target(name: str, lm: CausalLM):
    if lm.tp.size > 1 and not lm.tp.shared and lm.device == "cpu" and lm.static_mode == "on":
        # ranks on several CPU nodes: gloo inside a compiled package hung (docs/bench/tensor_parallel.md)
        lm.static_mode = "eager"
        attach(lm)
    warm_up(name if lm.tp.size == 1 else f"{name} rank {lm.tp.rank}", [lm.static, lm.static_fill] if lm.static else [])


def check_vocab(draft_vocab: int, target_vocabs: dict[str, int]):
    for n, v in target_vocabs.items():
        if v != draft_vocab:
            raise ValueError(f"targets.{n}: vocabulary {v} differs from the draft's {draft_vocab}")


def load_in_process(cfg: EngineConfig, targets: list[str] | None = None) -> InProcessExecutor:
    """The draft and the targets (default: all) loaded in this process, behind the in-process executor."""
    targets = targets or [t.name for t in cfg.targets]
    refuse_tensor_parallel(cfg, targets, "the in-process engine")
    draft = load_draft(cfg)
    models = {t: load_target(cfg, t) for t in targets}
    check_vocab(draft.lm.cfg.vocab_size, {n: m.cfg.vocab_size for n, m in models.items()})
    return InProcessExecutor(Proposer(draft), {n: Verifier(m) for n, m in models.items()})


def engine_core(cfg: EngineConfig, executor: Executor, targets: list[str] | None = None,
                pipeline: bool = False) -> EngineCore:
    """The scheduler for the given targets (default: all), with the config's slots and limits, over
    `executor`; `pipeline` takes effect where the executor keeps two ticks in flight."""
    targets = targets or [t.name for t in cfg.targets]
    scheduler = Scheduler(build_frontend(cfg, targets), cfg.limits, cfg.draft.max_seqs,
                          {t: cfg.target(t).max_seqs for t in targets}, pipeline and executor.max_inflight > 1,
                          cfg.scheduling)
    return EngineCore(scheduler, executor)


class Engine:
    """The scheduler and the models in this process, and the frontend on the caller's thread:
    `start` queues a request, `step()` runs one tick and returns what it added to each request."""

    def __init__(self, cfg: EngineConfig, executor: InProcessExecutor):
        self.cfg = cfg
        self.proposer, self.verifiers = executor.proposer, executor.verifiers
        self.core = engine_core(cfg, executor)
        self.scheduler = self.core.scheduler
        self.frontend = self.scheduler.frontend
        self.frontends = self.frontend.targets
        self.outputs: dict[str, RequestOutput] = {}  # the live requests started here

    @classmethod
    def from_config(cls, cfg: EngineConfig) -> "Engine":
        return cls(cfg, load_in_process(cfg))

    @property
    def exits(self) -> list[int]:
        return self.proposer.exits

    def set_profile(self, target: str, profile: Profile):
        self.frontends[target].profile = profile
        self.scheduler.policy.reset(target, profile)

    def start(self, request: Request) -> RequestOutput:
        """Queue a request; its deltas come from `step()`, its result, once finished, is
        `output.result()`."""
        p = self.frontend.prepare(request)
        seq = self.scheduler.add(p)
        out = self.outputs[seq.seq_id] = self.frontend.output(seq.seq_id, p)
        return out

    def add_request(self, req: Request) -> str:
        return self.start(req).seq_id

    def abort(self, seq_id: str):
        self.outputs.pop(seq_id, None)
        self.scheduler.abort(seq_id)

    def step(self) -> list[Delta]:
        deltas = []
        for t in self.core.step():
            out = self.outputs.get(t.seq_id)
            d = out.add(t) if out else None
            if d is None:
                continue
            deltas.append(d)
            if out.finished:  # a stop string ends it here; the scheduler then forgets it
                del self.outputs[t.seq_id]
                if not t.finished:
                    self.scheduler.abort(t.seq_id)
        return deltas

    @property
    def running(self) -> dict[str, Sequence]:
        return self.scheduler.running

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work

    # -- conveniences --------------------------------------------------------------------------
    def generate(self, requests: list[Request]) -> list[dict]:
        """Run requests to completion together; results in request order."""
        outs = [self.start(r) for r in requests]
        while any(not o.finished for o in outs):
            self.step()
        return [o.result() for o in outs]

    def deltas(self, out: RequestOutput) -> Iterator[Delta]:
        """Run ticks until `out` finishes, yielding what each added to it."""
        while not out.finished:
            for d in self.step():
                if d.seq_id == out.seq_id:
                    yield d

    def stream(self, request: Request) -> Iterator[Delta]:
        return self.deltas(self.start(request))


def greedy(max_tokens: int = 64, **kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, **kw)


__all__ = ["Engine", "Request", "RequestError", "UnknownTarget", "Overloaded", "SamplingParams", "Limits", "greedy"]
