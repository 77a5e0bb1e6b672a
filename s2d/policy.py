"""The draft policy (goodput-aware): per target and per tick, how far to draft (k, 0 meaning no
speculation) and at which exits, from measured step costs and the target's live acceptance.

- `StepCosts` keeps the seconds each forward takes, per model, batch-size bucket and tokens per row,
  as measured by the workers on live traffic.
- `TargetPolicy.choose_k` picks the k that maximises expected tokens per second of a round,
  E[tokens | k] / (verify(B, k + 1) + draft(k) + engine), against k = 0, plain decoding. So a weak
  pairing, or a load where verification stops being nearly free, turns speculation off.
- `TargetPolicy.thresholds` follow live acceptance: for every exit but the last, per confidence
  bin, how often that exit's argmax and the next exit's agree with the token the target verified.
  Exiting early at a confidence pays when the acceptance it loses, weighted by the tokens riding on
  it (MAT), costs less than what the saved segment buys at the current rate.

Both explore a little, so estimates stay live where the policy is not looking: while drafting,
all rows try a neighbouring k now and then, and one tick in PROBE_EVERY drafts through every exit;
while speculation is off, one row tries k = 1 within a time budget (OFF_BUDGET). Drafts from any
k and exit are verified by the target, so every choice is lossless; the policy only changes speed."""
from __future__ import annotations

import math
import statistics
from collections import defaultdict, deque
from dataclasses import dataclass, field

from s2d.model import pow2_at_least

DECAY = 0.98  # per observation: old traffic fades, so the policy follows a change of load or content
BINS = 10  # confidence bins per exit
EXPLORE_EVERY = 16  # ticks between rounds with a neighbouring k while speculation is on
OFF_BUDGET = 0.02  # while it is off, probes may cost this share of the time: a probe pays the draft's
#                    catch-up on every token the probing row missed, so they come rarer as that grows
PROBE_EVERY = 8  # ticks: one in this many drafts through every exit (for the thresholds)
REDECIDE = 8  # ticks a choice of k stands (at the same load)
MIN_ROUNDS = 8.0  # decayed rounds of acceptance before the policy trusts its estimates
LEARN_K = 2  # drafts per round while it learns
MIN_BIN = 6.0  # decayed samples in a confidence bin before its rule counts
PRIOR_SLOPE = 0.05  # extra tokens per row, as a fraction of a 1-token forward, before one is measured


def bucket(rows: int) -> int:
    """Batch sizes in powers of two, so that a handful of cells covers every load."""
    return pow2_at_least(rows)


class StepCosts:
    """Seconds of a forward per (model, batch bucket, tokens per row): the median of the cell's
    last WINDOW measurements (a stray slow step, a GC pause, does not move it); a cell not measured
    is read off the line through its bucket's measured widths, or scaled from the nearest measured
    bucket. `fixed` pins costs (tests, what-if analysis)."""

    WINDOW = 15

    def __init__(self, fixed: dict[tuple[str, int, int], float] | None = None):
        self.cells: dict[tuple[str, int, int], float] = dict(fixed or {})
        self.recent: dict[tuple[str, int, int], deque] = defaultdict(lambda: deque(maxlen=self.WINDOW))
        self.frozen = fixed is not None

    def observe(self, model: str, rows: int, width: int, seconds: float):
        if self.frozen or rows <= 0:
            return
        key = (model, bucket(rows), width)
        window = self.recent[key]
        window.append(seconds)
        self.cells[key] = statistics.median(window)

    def predict(self, model: str, rows: int, width: int = 1) -> float | None:
        b = bucket(rows)
        if (model, b, width) in self.cells:
            return self.cells[model, b, width]
        own = {w: c for (m, bb, w), c in self.cells.items() if m == model and bb == b}
        if not own:  # scale the nearest measured bucket
            near = sorted({bb for (m, bb, _) in self.cells if m == model}, key=lambda bb: abs(math.log2(bb / b)))
            if not near:
                return None
            scaled = self.predict(model, near[0], width)
            # linearly in rows: an upper bound (costs grow slower), so the policy does not start drafting at
            # a load on a guess that drafting there is cheap; probes and drafting then measure it
            return None if scaled is None else scaled * max(1.0, b / near[0])
        if len(own) == 1:
            (w0, c0), = own.items()
            return c0 * (1 + self._slope(model, b) * (width - w0))
        ws = sorted(own)
        mw, mc = sum(ws) / len(ws), sum(own.values()) / len(ws)
        slope = sum((w - mw) * (own[w] - mc) for w in ws) / sum((w - mw) ** 2 for w in ws)
        return max(mc + slope * (width - mw), min(own.values()) * 0.5)

    def _slope(self, model: str, b: int) -> float:
        """Relative cost of one more token per row, from the nearest bucket with two widths measured
        (verification gets dearer per token as rows grow, so the nearest one says most)."""
        by_bucket = defaultdict(dict)
        for (m, bb, w), c in self.cells.items():
            if m == model:
                by_bucket[bb][w] = c
        known = [bb for bb, cs in by_bucket.items() if len(cs) > 1 and cs[min(cs)] > 0]
        if not known:
            return PRIOR_SLOPE
        cs = by_bucket[min(known, key=lambda bb: abs(math.log2(bb / b)))]
        return max((cs[max(cs)] / cs[min(cs)] - 1) / (max(cs) - min(cs)), 0.0)  # more tokens never cost less


@dataclass
class Acceptance:
    """Decayed counts per draft position i: rounds whose cap allowed a draft there, drafts offered
    there, and drafts accepted there (all before it accepted too)."""

    capped: list[float] = field(default_factory=list)
    offered: list[float] = field(default_factory=list)
    accepted: list[float] = field(default_factory=list)

    def record(self, k: int, drafts: int, accepted: int):
        for arr in (self.capped, self.offered, self.accepted):
            arr[:] = [x * DECAY for x in arr] + [0.0] * max(0, k - len(arr))
        for i in range(k):
            self.capped[i] += 1
            self.offered[i] += i < drafts
            self.accepted[i] += i < accepted

    def expected(self, k: int) -> tuple[float, float]:
        """(tokens a round emits, drafts it makes) with at most k drafts."""
        tokens, drafts = 1.0, 0.0
        for i in range(min(k, len(self.capped))):
            if self.capped[i] < 1e-9:
                break
            tokens += self.accepted[i] / self.capped[i]
            drafts += self.offered[i] / self.capped[i]
        return tokens, drafts

    @property
    def rounds(self) -> float:
        return self.capped[0] if self.capped else 0.0


@dataclass
class Load:
    """What a target's policy chose at one load (batch-size buckets), and when it looks around."""

    k: int
    decided_at: int
    next_explore: int
    credit: float = 0.0  # seconds of probing earned while speculation is off


class TargetPolicy:
    def __init__(self, target: str, exits: list[int], thresholds: list[float], k_max: int,
                 online_thresholds: bool = True):
        self.target, self.exits, self.k_max = target, exits, k_max
        self.current = list(thresholds)
        self.online = online_thresholds
        self.acc = Acceptance()
        # per exit but the last, per confidence bin: [samples, this exit agreed, the next exit agreed]
        self.bins = [[[0.0, 0.0, 0.0] for _ in range(BINS)] for _ in exits[:-1]]
        self.ticks = 0
        self.loads: dict[tuple[int, int], Load] = {}
        self.last_k = k_max
        self.rate = 0.0  # tokens per second per row of the last choice (for the threshold rule)

    # -- how far to draft ------------------------------------------------------------------------
    def round_cost(self, costs: StepCosts, rows: int, draft_rows: int, k: int) -> float | None:
        """Seconds of a round with at most k drafts: the verify forward, the draft's steps (each one
        token for every drafting row, exit decisions and sampling included) and the draft call's
        fixed part, and the engine's own work (which drafting adds to: proposals to route, traces)."""
        verify = costs.predict(f"verify:{self.target}", rows, k + 1)
        overhead = costs.predict("engine", rows, 2 if k else 1) or 0.0
        if verify is None or k == 0:
            return None if verify is None else verify + overhead
        step, fixed = costs.predict("draft_step", draft_rows), costs.predict("draft_call", draft_rows)
        if step is None or fixed is None:
            return None
        return verify + self.acc.expected(k)[1] * step + fixed + overhead

    def choose_k(self, costs: StepCosts, rows: int, draft_rows: int, missed: int = 0) -> tuple[int, int]:
        """(the cap on drafts for this target's `rows` decode rows this tick, the cap for one of
        them): the draft batch holds `draft_rows` rows of every target; `missed` is how many tokens
        the draft lacks of the row that would probe. Each load (batch buckets) keeps its own choice,
        made again every REDECIDE ticks. While speculation is on, all rows try a neighbouring k every
        EXPLORE_EVERY ticks; while it is off, one row tries k = 1 once OFF_BUDGET of the plain
        rounds' time since the last probe covers the probe's cost (its catch-up included): probes
        take at most that share of the time."""
        self.ticks += 1
        if self.acc.rounds < MIN_ROUNDS:  # learn acceptance first, cheaply: deeper k is tried later, a step at a time
            return min(LEARN_K, self.k_max), min(LEARN_K, self.k_max)
        key = (bucket(rows), bucket(draft_rows))
        load = self.loads.get(key)
        if load is None:
            load = self.loads[key] = Load(self._best_k(costs, rows, draft_rows), self.ticks,
                                          next_explore=self.ticks + EXPLORE_EVERY // 2)
        elif self.ticks >= load.decided_at + REDECIDE:
            load.k, load.decided_at = self._best_k(costs, rows, draft_rows), self.ticks
        self.last_k = load.k
        if load.k == 0:
            load.credit += OFF_BUDGET * (self.round_cost(costs, rows, draft_rows, 0) or 0.0)
            probe = self.round_cost(costs, 1, 1, 1) or 0.0
            probe += missed * (costs.predict("draft_prefill", 1) or 0.0)
            wide, narrow = (costs.predict(f"verify:{self.target}", rows, w) for w in (2, 1))
            probe += max((wide or 0.0) - (narrow or 0.0), 0.0)  # one row's draft widens the whole batch's verify
            if load.credit < probe:
                return 0, 0
            load.credit = 0.0
            return 0, 1
        if self.ticks < load.next_explore:
            return load.k, load.k
        load.next_explore = self.ticks + EXPLORE_EVERY
        probe = load.k + 1 if load.k < self.k_max else load.k - 1
        return probe, probe

    def _best_k(self, costs: StepCosts, rows: int, draft_rows: int) -> int:
        best, best_rate = 0, -1.0
        for k in range(self.k_max + 1):
            cost = self.round_cost(costs, rows, max(draft_rows, rows), k)
            if cost is None:  # a cost never measured: measure it
                return k
            rate = self.acc.expected(k)[0] / max(cost, 1e-9)
            if rate > best_rate:
                best, best_rate = k, rate
        self.rate = best_rate
        return best

    # -- where to exit ---------------------------------------------------------------------------
    def thresholds(self) -> list[float]:
        """This tick's thresholds: the live ones, or now and then a probe through every exit."""
        if self.online and self.ticks % PROBE_EVERY == PROBE_EVERY - 1:
            return [2.0] * (len(self.exits) - 1) + [0.0]
        return self.current

    def record(self, k: int, drafts: int, trace: list[list[tuple[float, int]]], tokens: list[int], accepted: int):
        """One round of a sequence: its cap, how many it drafted, each draft's (confidence, argmax)
        at the exits it passed, and what the target emitted."""
        if k <= 0:
            return
        self.acc.record(k, drafts, accepted)
        if not self.online:  # the bins feed only the online thresholds
            return
        for i, passed in enumerate(trace[: accepted + 1]):  # positions the target verified
            if i >= len(tokens):
                break
            y = tokens[i]
            for s in range(len(passed) - 1):  # an exit with the next exit's answer too
                conf, top = passed[s]
                if conf != conf:
                    continue
                cell = self.bins[s][min(int(conf * BINS), BINS - 1)]
                cell[0] += 1
                cell[1] += top == y
                cell[2] += passed[s + 1][1] == y

    def update_thresholds(self, costs: StepCosts, draft_rows: int, mat: float):
        """Move each exit's threshold to the lowest confidence from which exiting early pays."""
        if not self.online or self.rate <= 0:
            return
        rows = max(draft_rows, 1)
        for s, bins in enumerate(self.bins):
            seg = costs.predict(f"draft:{s + 1}", rows)
            if seg is None:
                continue
            saved = self.rate * seg / rows  # tokens the time of the skipped segment (a row's share) buys
            lowest, seen = None, False
            for b in range(BINS - 1, -1, -1):  # from confident down, while early exits pay
                n, mine, nxt = bins[b]
                if n < MIN_BIN:
                    continue
                seen = True
                if (nxt - mine) / n * max(mat, 1.0) > saved:
                    break
                lowest = b
            if seen:
                self.current[s] = lowest / BINS if lowest is not None else 1.01
            for cell in bins:
                for j in range(3):
                    cell[j] *= DECAY ** 4  # older calibration fades


class DraftPolicy:
    """The scheduler's policy over every target: one cost table (the draft is shared, each target
    has its own verify costs) and a TargetPolicy per target. `mode` "static" leaves every profile
    as configured (what `s2d tune` measures)."""

    UPDATE_EVERY = 32  # ticks between threshold updates

    def __init__(self, profiles: dict, exits: list[int], mode: str = "goodput", online_thresholds: bool = True,
                 costs: StepCosts | None = None):
        self.exits, self.mode, self.online = exits, mode, online_thresholds
        self.costs = costs or StepCosts()
        # one policy per target and kind of request: greedy and sampled requests accept differently
        self.targets = {(t, greedy): self._new(t, p) for t, p in profiles.items() for greedy in (True, False)}
        self.ticks = 0

    def _new(self, target: str, profile) -> TargetPolicy:
        return TargetPolicy(target, self.exits, profile.thresholds_for(self.exits), profile.k_max, self.online)

    def reset(self, target: str, profile):
        for greedy in (True, False):
            self.targets[target, greedy] = self._new(target, profile)

    def caps(self, rows: dict[tuple[str, bool], int], draft_rows: int, missed: dict[tuple[str, bool], int]
             ) -> dict[tuple[str, bool], tuple[int, int, list[float]]]:
        """Per target with decode rows this tick: (the cap on drafts, the cap for the probing row,
        the exit thresholds), keyed by (target, greedy); `missed`, keyed by those with an s2d row: the
        tokens the draft lacks of the row that would probe. Keys with only ar or fixed rows have
        nothing to decide. The verify cost is the target's whole batch, greedy and sampled rows together."""
        if self.mode == "static":
            return {}
        batch = defaultdict(int)
        for (t, _), n in rows.items():
            batch[t] += n
        return {key: (*self.targets[key].choose_k(self.costs, batch[key[0]], draft_rows, missed[key]),
                      self.targets[key].thresholds()) for key in missed}

    def drafts(self, target: str) -> bool:
        """Whether the target's s2d requests draft at present (the scheduler splits cohorts only then)."""
        return self.mode == "static" or any(self.targets[target, g].last_k > 0 for g in (True, False))

    def record(self, key: tuple[str, bool], k: int, outcome):
        if self.mode != "static":
            self.targets[key].record(k, len(outcome.drafts), outcome.trace, outcome.tokens, outcome.accepted)

    def observe(self, verified: list, wall_s: float, draft_rows: int):
        """A finished tick: its forwards' measured seconds, and the engine's own time around them."""
        if self.mode == "static":  # nothing reads the costs
            return
        for v in verified:
            for f in v.forwards:
                if f.what == "verify":
                    self.costs.observe(f"verify:{v.target}", f.rows, f.tokens // max(f.rows, 1), f.seconds)
        drafting = verified[0].draft_forwards if verified else []
        steps = [f for f in drafting if f.what == "draft_step"]
        for f in drafting:
            if f.what.startswith("draft"):
                self.costs.observe(f.what, f.rows, 1, f.seconds)
            elif f.what == "prefill":  # the draft catching up: per token
                self.costs.observe("draft_prefill", 1, 1, f.seconds / max(f.tokens, 1))
        draft_s = verified[0].draft_busy_s if verified else 0.0
        if steps:  # what a draft call costs besides its steps (syncing tokens, catching up, prefill)
            self.costs.observe("draft_call", steps[0].rows, 1, max(draft_s - sum(f.seconds for f in steps), 0.0))
        verify_s = sum(f.seconds for v in verified for f in v.forwards)
        rows = sum(len(v.outcomes) for v in verified)  # the engine's own work: 1 wide without drafting, 2 with
        self.costs.observe("engine", rows, 2 if steps else 1, max(wall_s - draft_s - verify_s, 0.0))
        self.ticks += 1
        if self.ticks % self.UPDATE_EVERY == 0:
            for p in self.targets.values():
                p.update_thresholds(self.costs, draft_rows, p.acc.expected(p.last_k)[0])

    def state(self) -> dict[tuple[str, str], dict]:
        """What the policy believes now, per (target, "greedy" | "sampled"): gauges, benchmarks."""
        return {(t, "greedy" if greedy else "sampled"): {"k": p.last_k, "thresholds": list(p.current),
                                                          "mat_at_k": p.acc.expected(p.last_k)[0]}
                for (t, greedy), p in self.targets.items()}



def pinned_costs(target: str, n_exits: int, max_width: int = 33) -> StepCosts:
    """Fixed costs at a GPU-like ratio (a 4 ms decode, 0.15 ms per verified token more, a 0.3 ms
    draft segment): policy runs that are reproducible on any machine (benchmarks, tests)."""
    ms = 1e-3
    cells = {(f"verify:{target}", 1, w): 4 * ms + 0.15 * ms * (w - 1) for w in range(1, max_width + 1)}
    cells |= {("draft_step", 1, 1): 0.4 * ms, ("draft_call", 1, 1): 0.1 * ms, ("engine", 1, 1): 0.3 * ms}
    cells |= {(f"draft:{s}", 1, 1): 0.3 * ms for s in range(n_exits)}
    return StepCosts(fixed=cells)


def modelled_tokens_per_s(results: list[dict], costs: StepCosts, target: str, exits: list[int]) -> float:
    """Goodput of finished requests under pinned costs (what-if analysis, tests): each round's
    verify at its mean width plus the engine's time, and each drafted token's segments (a token
    that exited at exits[i] ran segments 0..i)."""
    engine = costs.cells.get(("engine", 1, 1), 0.0)
    tokens = seconds = 0.0
    for r in results:
        st = r["stats"]
        rounds = max(st["target_forwards"], 1)
        seconds += rounds * (costs.predict(f"verify:{target}", 1, 1 + round(st["drafted"] / rounds)) + engine)
        for depth, n in st["exit_histogram"].items():
            seconds += n * sum(costs.predict(f"draft:{s}", 1) for s in range(exits.index(int(depth)) + 1))
        tokens += len(r["token_ids"])
    return tokens / seconds
