"""Speculation statistics per request, summed into aggregates."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


@dataclass
class SpecStats:
    drafted: int = 0
    accepted: int = 0
    emitted: int = 0
    target_forwards: int = 0
    proposed_at: list[int] = field(default_factory=list)  # per draft position: drafts offered
    accepted_at: list[int] = field(default_factory=list)  # per draft position: drafts accepted
    exits: Counter = field(default_factory=Counter)  # exit depth -> drafted tokens
    wall_s: float = 0.0

    def record(self, drafts: int, accepted: int, emitted: int, exits: list[int]):
        self.drafted += drafts
        self.accepted += accepted
        self.emitted += emitted
        self.target_forwards += 1
        self.exits.update(exits)
        for i in range(drafts):
            if i == len(self.proposed_at):
                self.proposed_at.append(0)
                self.accepted_at.append(0)
            self.proposed_at[i] += 1
            self.accepted_at[i] += i < accepted

    @property
    def mat(self) -> float:
        """Mean accepted tokens: tokens emitted per target forward, bonus included."""
        return self.emitted / self.target_forwards if self.target_forwards else 0.0

    def merge(self, o: "SpecStats") -> "SpecStats":
        out = SpecStats(self.drafted + o.drafted, self.accepted + o.accepted, self.emitted + o.emitted,
                        self.target_forwards + o.target_forwards, exits=self.exits + o.exits,
                        wall_s=self.wall_s + o.wall_s)
        for src in (self, o):
            for i, (p, a) in enumerate(zip(src.proposed_at, src.accepted_at)):
                if i == len(out.proposed_at):
                    out.proposed_at.append(0)
                    out.accepted_at.append(0)
                out.proposed_at[i] += p
                out.accepted_at[i] += a
        return out

    @classmethod
    def from_dict(cls, d: dict) -> "SpecStats":
        return cls(d["drafted"], d["accepted"], d["emitted"], d["target_forwards"], list(d["proposed_at"]),
                   list(d["accepted_at"]), Counter({int(k): v for k, v in d["exit_histogram"].items()}), d["wall_s"])

    def to_dict(self) -> dict:
        return {
            "drafted": self.drafted, "accepted": self.accepted, "emitted": self.emitted,
            "target_forwards": self.target_forwards, "mat": round(self.mat, 4),
            "acceptance_rate": round(self.accepted / self.drafted, 4) if self.drafted else 0.0,
            "acceptance_per_position": [round(a / p, 4) if p else 0.0
                                        for p, a in zip(self.proposed_at, self.accepted_at)],
            "proposed_at": list(self.proposed_at), "accepted_at": list(self.accepted_at),
            "exit_histogram": {str(k): v for k, v in sorted(self.exits.items())},
            "wall_s": round(self.wall_s, 4),
        }


@dataclass
class Breakdown:
    """Where a scheduler's ticks spend their time: the draft's forwards (layers and head), the
    targets' verify forwards, and everything else, the engine's own work (scheduling, batch
    building, sampling, rejection; in process, the caller's detokenization between ticks). Exact
    on CPU; on a GPU the forwards' time is only their launch unless the step syncs."""

    ticks: int = 0
    wall_s: float = 0.0
    draft_s: float = 0.0
    verify_s: float = 0.0

    def add(self, wall_s: float, draft_s: float, verify_s: float):
        self.ticks += 1
        self.wall_s += wall_s
        self.draft_s += draft_s
        self.verify_s += verify_s

    @property
    def engine_s(self) -> float:
        return max(self.wall_s - self.draft_s - self.verify_s, 0.0)

    def to_dict(self) -> dict:
        n, wall, other = max(self.ticks, 1), max(self.wall_s, 1e-12), self.engine_s
        return {"ticks": self.ticks, "ms_per_tick": round(1000 * self.wall_s / n, 3),
                "draft_ms": round(1000 * self.draft_s / n, 3), "verify_ms": round(1000 * self.verify_s / n, 3),
                "engine_ms": round(1000 * other / n, 3), "engine_share": round(other / wall, 4)}
