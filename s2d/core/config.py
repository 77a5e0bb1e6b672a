"""One pydantic config for the CLI, the Ray app and the tests: the draft, the targets, profiles,
sampling and limits, read from one YAML file. A wrong value raises an error that names the field."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Dtype = Literal["float32", "bfloat16", "float16", "auto"]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Profile(Strict):
    """How the shared draft drafts for one target. Thresholds, one per exit: unset is the paper's
    rule for any draft, 0.5 at every exit but the last and 0 at the last."""

    thresholds: list[float] | None = None
    k_max: int = Field(5, ge=1, le=32)
    stop_threshold: float = Field(0.0, ge=0.0, le=1.0)

    @field_validator("thresholds")
    @classmethod
    def _finite(cls, v: list[float] | None) -> list[float] | None:
        if v is not None and (not v or any(math.isnan(t) for t in v)):
            raise ValueError("thresholds must be a non-empty list of numbers")
        return v

    def thresholds_for(self, exits: list[int]) -> list[float]:
        return list(self.thresholds) if self.thresholds is not None else [0.5] * (len(exits) - 1) + [0.0]


GREEDY_BELOW = 1e-5  # temperatures below this are greedy (as in vLLM): logits / 1e-38 overflow
INT64 = 2**63


class SamplingParams(Strict):
    """Per request. temperature 0 (or below GREEDY_BELOW) is greedy. Types are strict: a string is
    not a number, a bool is not an int."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, validate_assignment=True)

    temperature: float = Field(0.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, lt=2**31)
    seed: int | None = Field(None, ge=-INT64, lt=INT64)
    max_tokens: int = Field(64, gt=0, lt=2**31)
    stop: list[str] = Field(default_factory=list)
    ignore_eos: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW


class ModelSpec(Strict):
    path: str
    device: str = "cpu"
    dtype: Dtype = "auto"  # auto: bfloat16 on GPU and on a CPU with AVX512-BF16 or AMX, else float32
    # Decode, verify, prompt-chunk and draft steps at bucketed static shapes (s2d/worker/graphs.py): on (and
    # auto) compiles them on CPU (AOTInductor packages, built or loaded at startup) and captures CUDA
    # graphs on CUDA; eager runs the same shapes uncompiled (auto does too where S2D_COMPILE=0, as in
    # the tests); off: the eager forward.
    static_forward: Literal["auto", "on", "eager", "off"] = "auto"
    max_seqs: int = Field(8, ge=1)  # KV-cache slots
    max_seq_len: int | None = Field(None, ge=8)  # default: min(model context, 2048)
    trust_remote_code: bool = False
    # Read only by deployments/: the model's bundle in its cell's placement group (each rank's, for a
    # tensor-parallel target). Torch threads: num_cpus where >= 1, else an equal share of the cores.
    num_gpus: float = Field(0.0, ge=0)
    num_cpus: float = Field(0.0, ge=0)


DraftSpec = ModelSpec  # the draft needs no more than any model


class TargetSpec(ModelSpec):
    name: str
    profile: Profile = Field(default_factory=Profile)
    # A base model's plain prompt is text to continue even where its tokenizer has a chat template
    # (chat messages still go through the template); by default a plain prompt is the user turn.
    plain_prompts: bool = False
    # Ranks the target is split over (s2d/worker/parallel.py): each a Ray actor with its own bundle
    # (num_gpus and num_cpus are per rank). It must divide the model's KV heads and MLP width, and
    # needs a Ray cell whose transport is compiled_graph or actor_calls.
    tensor_parallel: int = Field(1, ge=1)


class Limits(Strict):
    """What one request may ask, enforced at every entry point (s2d/core/request.py), and the queue bound."""

    max_prompt_tokens: int = Field(1536, ge=1)
    max_new_tokens: int = Field(512, ge=1)
    max_stop: int = Field(16, ge=0)  # stop strings per request
    max_stop_chars: int = Field(256, ge=1)  # characters per stop string
    max_messages: int = Field(256, ge=1)  # chat messages per request
    max_request_bytes: int = Field(1 << 20, ge=1024)  # a request's text (prompt, messages, stop) or wire message
    max_waiting: int = Field(256, ge=1)  # requests queued past the KV slots before the engine refuses (overload)
    # a served request's deadline from its arrival in the cell, queueing included: past it the request
    # ends (DEADLINE_EXCEEDED, HTTP 504) and frees its caches. HTTP requests may ask a shorter one
    # (`timeout_s`); a gRPC client's own deadline cancels the call, which frees them too.
    max_request_s: float = Field(600.0, gt=0, allow_inf_nan=False)


class Scheduling(Strict):
    """Chunked prefill (after vLLM's long_prefill_token_threshold and max_long_partial_prefills=1):
    prompt tokens are prefilled in the decodes' forward but in a group of their own (never padded
    into the decode rows), under a per-tick budget. A long prompt goes in chunks, one long prompt
    per tick: it cannot stall the decodes, nor the short prompts queued behind it."""

    prefill_budget: int = Field(256, ge=8)  # prompt tokens per tick (parts of <= 8 ride in decode rows, unbudgeted)
    long_prompt: int = Field(128, ge=8)  # a prompt of more tokens than this is long
    long_chunk: int = Field(64, ge=8)  # tokens a long prompt prefills per tick
    # How far s2d requests draft (s2d/core/policy.py). goodput: per request and tick, the k (0 included)
    # that pays most by measured step costs and live acceptance; static: the profile as configured.
    draft_policy: Literal["goodput", "static"] = "goodput"
    online_thresholds: bool = True  # goodput only: exit thresholds follow live acceptance


class CellSpec(Strict):
    """A serving cell (Ray Serve replica): the shared draft and the targets it hosts in one
    placement group, driven by one scheduler. Each cell loads the one draft."""

    name: str = "main"
    targets: list[str] | None = None  # default: every target
    num_replicas: int = Field(1, ge=1)
    autoscaling: dict | None = None  # Ray Serve autoscaling_config; replaces num_replicas
    # Two cohorts, while some sequence drafts: the draft proposes for one while the targets verify
    # the other (needs an actor transport). docs/bench/serve.md has what it pays.
    pipeline: bool = True
    # How a tick reaches the models: a Ray Compiled Graph over draft and target actors, the same
    # chain as plain actor calls, or in_process: the models live in the cell's own process (no
    # actors, no pipelining; the fastest on a small CPU host, see docs/bench/serve.md).
    transport: Literal["compiled_graph", "actor_calls", "in_process"] = "compiled_graph"
    num_cpus: float = Field(0.0, ge=0)  # the cell's own process (scheduler, tokenizers)
    # custom Ray resources the cell's own bundle asks for: which nodes may host a replica, and how
    # many (a resource of 1 per node, asked for whole, spreads the replicas one to a node)
    resources: dict[str, float] = Field(default_factory=dict)


def _named(items: list, name: str, what: str):
    """The item called `name`; a KeyError that lists the known names."""
    found = next((x for x in items if x.name == name), None)
    if found is None:
        raise KeyError(f"unknown {what} {name!r}; known: {[x.name for x in items]}")
    return found


class EngineConfig(Strict):
    draft: DraftSpec
    targets: list[TargetSpec]
    cells: list[CellSpec] = Field(default_factory=list)  # default: one cell with every target
    limits: Limits = Field(default_factory=Limits)
    scheduling: Scheduling = Field(default_factory=Scheduling)
    base_dir: str | None = None  # relative model paths resolve against the YAML's folder

    @model_validator(mode="after")
    def _unique_names(self) -> "EngineConfig":
        if not self.targets:
            raise ValueError("targets: at least one target is required")
        names = [t.name for t in self.targets]
        if len(set(names)) != len(names):
            raise ValueError(f"targets: duplicate target names in {names}")
        if not self.cells:
            self.cells = [CellSpec(targets=names)]
        hosted = []
        for c in self.cells:
            c.targets = c.targets or names
            unknown = set(c.targets) - set(names)
            if unknown:
                raise ValueError(f"cells.{c.name}: unknown targets {sorted(unknown)}; known: {names}")
            hosted += c.targets
        if sorted(hosted) != sorted(names):
            raise ValueError(f"cells: every target must be in exactly one cell; cells host {hosted}, "
                             f"targets are {names}")
        if len({c.name for c in self.cells}) != len(self.cells):
            raise ValueError("cells: duplicate cell names")
        for c in self.cells:
            if c.transport == "in_process":
                refuse_tensor_parallel(self, c.targets, f"cells.{c.name}.transport in_process")
        return self

    def cell(self, name: str) -> CellSpec:
        return _named(self.cells, name, "cell")

    def cell_of(self, target: str) -> CellSpec:
        return next(c for c in self.cells if target in c.targets)

    def target(self, name: str) -> TargetSpec:
        return _named(self.targets, name, "target")

    def resolve(self, path: str) -> str:
        p = Path(path).expanduser()
        if not p.is_absolute() and self.base_dir:
            p = Path(self.base_dir) / p
        return str(p)

    def on_device(self, device: str | None) -> "EngineConfig":
        """The same config with every model on one device (CLI --device); itself when device is None."""
        if device is None:
            return self
        cfg = self.model_copy(deep=True)
        for m in [cfg.draft, *cfg.targets]:
            m.device = device
        return cfg

    def with_models(self, dtype: str | None = None, static_forward: str | None = None) -> "EngineConfig":
        """Every model in this dtype and static-forward mode where given (CLI and benchmark flags)."""
        for m in [self.draft, *self.targets]:
            m.dtype = dtype or m.dtype
            m.static_forward = static_forward or m.static_forward
        return self


RANK_TRANSPORTS = ("compiled_graph", "actor_calls")  # the transports that run tensor-parallel ranks


def refuse_tensor_parallel(cfg: EngineConfig, targets: list[str], where: str):
    """A ValueError naming the first of `targets` split over ranks, which `where` cannot run."""
    for name in targets:
        if cfg.target(name).tensor_parallel > 1:
            raise ValueError(f"targets.{name}.tensor_parallel: {cfg.target(name).tensor_parallel} needs rank actors, "
                             f"which {where} cannot run; serve it from a Ray cell whose transport is one of "
                             f"{list(RANK_TRANSPORTS)}")


def only_targets(cfg: EngineConfig, names: list[str]) -> EngineConfig:
    """The same config with only these targets, in one default cell (benchmarks load what they measure)."""
    return EngineConfig.model_validate({**cfg.model_dump(), "targets": [cfg.target(n).model_dump() for n in names],
                                        "cells": []})


def load_config(path: str | Path) -> EngineConfig:
    """Read a YAML config; the special name 'demo' is the bundled demo family."""
    if str(path) == "demo":
        path = Path(__file__).parents[1] / "demo" / "demo.yaml"
    path = Path(path)
    data = yaml.safe_load(path.read_text()) or {}
    data.setdefault("base_dir", str(path.resolve().parent))
    return EngineConfig.model_validate(data)
