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
    """How the shared draft drafts for one target (paper defaults: 0.5, 0.5, 0)."""

    thresholds: list[float] = Field(default_factory=lambda: [0.5, 0.5, 0.0])
    k_max: int = Field(5, ge=1, le=32)
    stop_threshold: float = Field(0.0, ge=0.0, le=1.0)

    @field_validator("thresholds")
    @classmethod
    def _finite(cls, v: list[float]) -> list[float]:
        if not v or any(math.isnan(t) for t in v):
            raise ValueError("thresholds must be a non-empty list of numbers")
        return v


class SamplingParams(Strict):
    """Per request. temperature 0 is greedy."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = Field(0, ge=0)
    seed: int | None = None
    max_tokens: int = 64
    stop: list[str] = Field(default_factory=list)
    ignore_eos: bool = False

    @field_validator("temperature")
    @classmethod
    def _temperature(cls, v: float) -> float:
        if math.isnan(v) or math.isinf(v) or v < 0:
            raise ValueError("temperature must be a finite number >= 0")
        return v

    @field_validator("top_p")
    @classmethod
    def _top_p(cls, v: float) -> float:
        if math.isnan(v) or not 0.0 < v <= 1.0:
            raise ValueError("top_p must be in (0, 1]")
        return v

    @field_validator("max_tokens")
    @classmethod
    def _max_tokens(cls, v: int) -> int:
        if v <= 0:
            raise ValueError("max_tokens must be > 0")
        return v

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


class ModelSpec(Strict):
    path: str
    device: str = "cpu"
    devices: list[str] | None = None  # layer-wise placement over several devices (large targets)
    dtype: Dtype = "auto"  # auto: float32 on CPU, bfloat16 on GPU
    max_seqs: int = Field(8, ge=1)  # KV-cache slots
    max_seq_len: int | None = Field(None, ge=8)  # default: min(model context, 2048)
    trust_remote_code: bool = False
    # Read only by deployments/: the model's bundle in its cell's placement group. Torch threads:
    # num_cpus where >= 1, else every core.
    num_gpus: float = Field(0.0, ge=0)
    num_cpus: float = Field(0.0, ge=0)

    @property
    def placement(self) -> list[str]:
        return self.devices or [self.device]


DraftSpec = ModelSpec  # the draft needs no more than any model


class TargetSpec(ModelSpec):
    name: str
    profile: Profile = Field(default_factory=Profile)


class Limits(Strict):
    max_prompt_tokens: int = Field(1536, ge=1)
    max_new_tokens: int = Field(512, ge=1)
    max_waiting: int = Field(256, ge=1)  # queued requests before the engine refuses (overload)


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


class EngineConfig(Strict):
    draft: DraftSpec
    targets: list[TargetSpec]
    cells: list[CellSpec] = Field(default_factory=list)  # default: one cell with every target
    limits: Limits = Field(default_factory=Limits)
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
            raise ValueError(f"cells: every target must be in exactly one cell; cells host {hosted}, targets are {names}")
        if len({c.name for c in self.cells}) != len(self.cells):
            raise ValueError("cells: duplicate cell names")
        return self

    def cell(self, name: str) -> CellSpec:
        for c in self.cells:
            if c.name == name:
                return c
        raise KeyError(f"unknown cell {name!r}; known: {[c.name for c in self.cells]}")

    def cell_of(self, target: str) -> CellSpec:
        return next(c for c in self.cells if target in c.targets)

    def target(self, name: str) -> TargetSpec:
        for t in self.targets:
            if t.name == name:
                return t
        raise KeyError(f"unknown target {name!r}; known: {[t.name for t in self.targets]}")

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
            m.device, m.devices = device, None
        return cfg


def load_config(path: str | Path) -> EngineConfig:
    """Read a YAML config; the special name 'demo' is the bundled demo family."""
    if str(path) == "demo":
        path = Path(__file__).parent / "demo" / "demo.yaml"
    path = Path(path)
    data = yaml.safe_load(path.read_text()) or {}
    data.setdefault("base_dir", str(path.resolve().parent))
    return EngineConfig.model_validate(data)
