"""The frontend: what turns a client's request into token ids and the scheduler's token deltas back
into what the client reads. It runs where requests are handled (the serving cell's event loop, the
in-process engine's caller), never on the scheduler's thread, so the scheduler sees token ids
only (as vLLM keeps its processor and detokenizer out of its engine core).

- `Frontend.prepare`: checks a request, applies the chat template and tokenizes (`Prepared`).
- `Frontend.output`: the request's `RequestOutput` (s2d/core/output.py): text, stop strings, stats."""
from __future__ import annotations

import time
from dataclasses import dataclass

from s2d.core.config import EngineConfig, Limits, SamplingParams
from s2d.core.output import RequestOutput
from s2d.core.request import Request, RequestError, UnknownTarget, check_request
from s2d.core.sequence import DraftPlan
from s2d.worker.draft import read_exits
from s2d.worker.model import context_length, load_hf_config


def load_tokenizer(path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)


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
class Prepared:
    """A checked, tokenized request: all the scheduler needs to run it."""

    request_id: str | None
    target: str
    prompt_ids: list[int]
    params: SamplingParams  # max_tokens fitted to the context where the client did not ask
    plan: DraftPlan
    eos: set[int]
    context: int
    arrived: float  # when the frontend took it (perf_counter): latencies count from here


class TargetFrontend:
    """What admission needs to know of a target: tokenizer, EOS, profile, context. Used by the
    engine and the serving cell (the Ray router holds no model, and none of this)."""

    def __init__(self, cfg: EngineConfig, name: str, exits: list[int], context: int):
        spec = cfg.target(name)
        self.name, self.profile, self.exits, self.limits = name, spec.profile, exits, cfg.limits
        self.plain_prompts = spec.plain_prompts
        path = cfg.resolve(spec.path)
        self.tokenizer = load_tokenizer(path, spec.trust_remote_code)
        self.eos = eos_ids(self.tokenizer, path)
        self.context = context
        DraftPlan.for_mode("s2d", spec.profile, exits)  # a profile that does not fit the draft fails at start

    def prepare(self, req: Request) -> Prepared:
        arrived, params = time.perf_counter(), req.params
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
        return Prepared(req.request_id, self.name, ids, params, plan, set() if params.ignore_eos else self.eos,
                        self.context, arrived)


class Frontend:
    """Every target's frontend, and the checks that need no target."""

    def __init__(self, targets: dict[str, TargetFrontend], limits: Limits):
        self.targets, self.limits = targets, limits

    def prepare(self, req: Request) -> Prepared:
        """Bad input raises RequestError naming the field."""
        check_request(req, self.limits)
        if req.target not in self.targets:
            raise UnknownTarget(req.target, sorted(self.targets))
        return self.targets[req.target].prepare(req)

    def output(self, seq_id: str, p: Prepared, resume: list[int] = ()) -> RequestOutput:
        return RequestOutput(seq_id, len(p.prompt_ids), p.params, self.targets[p.target].tokenizer, p.arrived, resume)


def build_frontend(cfg: EngineConfig, targets: list[str] | None = None) -> Frontend:
    """The frontend of the given targets (default: all), from the checkpoints' configs alone (no
    weights loaded)."""
    d = cfg.draft
    draft_path = cfg.resolve(d.path)
    exits = read_exits(draft_path)
    draft_ctx = context_length(load_hf_config(draft_path, d.trust_remote_code), d.max_seq_len)
    out = {}
    for t in cfg.targets:
        if targets is None or t.name in targets:
            ctx = context_length(load_hf_config(cfg.resolve(t.path), t.trust_remote_code), t.max_seq_len)
            out[t.name] = TargetFrontend(cfg, t.name, exits, min(ctx, draft_ctx))
    return Frontend(out, cfg.limits)


__all__ = ["Frontend", "Prepared", "TargetFrontend", "build_frontend", "encode_prompt", "eos_ids"]
