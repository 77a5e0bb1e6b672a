"""The draft policy (goodput-aware): per request and per tick, how far to draft (k, 0 meaning no
speculation), and per target at which exits, from measured step costs and live acceptance.

- `StepCosts` keeps the seconds each forward takes, per model, batch-size bucket and tokens per row,
  as measured by the workers on live traffic.
- Each sequence keeps its own decayed acceptance per draft position (`Acceptance`), which starts as
  a few rounds at its target's (kept apart for greedy and sampled requests).
- Each sequence's k maximises its expected tokens per second of a round,
  E[tokens | k] / (verify(B, k + 1) + draft(k) + engine), against k = 0, plain decoding; then the
  target's batch, which verifies as wide as its widest row, keeps the widest k that pays for all of
  its rows. So a code request drafts long beside a random-token one that does not draft, and a
  load where verification stops being nearly free turns speculation off.
- The draft's catch-up (prefilling tokens it missed while a sequence did not draft) is paid once, by
  the sequence that starts drafting, spread over the rounds it has left: it is not a cost of drafting.
- With nothing measured yet a request drafts as its profile says (k_max): that measures both the
  acceptance and the costs.
- `TargetPolicy.thresholds` follow live acceptance: for every exit but the last, per confidence
  bin, how often that exit's argmax and the next exit's agree with the token the target verified.
  Exiting early at a confidence pays when the acceptance it loses, weighted by the tokens riding on
  it (MAT), costs less than what the saved segment buys at the current rate.

Both explore a little, so estimates stay live where the policy is not looking: every EXPLORE_EVERY
ticks the drafting rows try a neighbouring k, and one tick in PROBE_EVERY drafts through every exit;
a row that does not draft tries its top k now and then, within a time budget (OFF_BUDGET). Drafts from
any k and exit are verified by the target, so every choice is lossless; the policy only changes speed."""
from __future__ import annotations

import math
import statistics
from collections import defaultdict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

from s2d.worker.model import pow2_at_least

DECAY = 0.98  # per observation: old traffic fades, so the policy follows a change of load or content
BINS = 10  # confidence bins per exit
EXPLORE_EVERY = 16  # ticks between rounds with a neighbouring k for the drafting rows
RECHOOSE = 4  # ticks a batch of the same rows keeps its choices
OFF_BUDGET = 0.02  # rows that do not draft may try their top k within this share of the time: a probe pays the
#                    draft's catch-up on every token the probing row missed, so they come rarer as that grows
PROBE_EVERY = 8  # ticks: one in this many drafts through every exit (for the thresholds)
MIN_ROUNDS = 8.0  # decayed rounds of a target's acceptance before the policy trusts it over the profile
PRIOR_ROUNDS = 8.0  # rounds at its target's acceptance that a new sequence's own counts start from
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
    COLD = 2  # a cell's first measurements, left out: a shape's first calls pay one-time costs (buffers, caches)

    def __init__(self, fixed: dict[tuple[str, int, int], float] | None = None):
        self.cells: dict[tuple[str, int, int], float] = dict(fixed or {})
        self.recent: dict[tuple[str, int, int], deque] = defaultdict(lambda: deque(maxlen=self.WINDOW))
        self.seen: dict[tuple[str, int, int], int] = defaultdict(int)
        self.frozen = fixed is not None

    def observe(self, model: str, rows: int, width: int, seconds: float):
        if self.frozen or rows <= 0:
            return
        key = (model, bucket(rows), width)
        self.seen[key] += 1
        if self.seen[key] <= self.COLD:
            return
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
    there, and drafts accepted there (all before it accepted too). Each target keeps one per kind of
    request (greedy, sampled), and each sequence its own."""

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

    def curve(self, k: int) -> list[tuple[float, float]]:
        """(tokens a round emits, drafts it makes) with at most 0, 1, .. k drafts, as far as the
        positions are measured. A draft is offered, and accepted, only where the one before it was:
        no position's rate exceeds the one before (counts gathered under different caps could say so)."""
        out, accept, offer = [(1.0, 0.0)], 1.0, 1.0
        for i in range(min(k, len(self.capped))):
            if self.capped[i] < 1e-9:
                break
            accept = min(accept, self.accepted[i] / self.capped[i])
            offer = min(offer, self.offered[i] / self.capped[i])
            tokens, drafts = out[-1]
            out.append((tokens + accept, drafts + offer))
        return out

    def expected(self, k: int) -> tuple[float, float]:
        """(tokens a round emits, drafts it makes) with at most k drafts."""
        return self.curve(k)[-1]

    def seed(self, prior: "Acceptance"):
        """Start a sequence's counts as PRIOR_ROUNDS rounds at its target's rates: its own rounds
        outweigh them as they come, and a later change of its target's (which only drafting rows
        feed) leaves them be."""
        mine, theirs = (self.capped, self.offered, self.accepted), (prior.capped, prior.offered, prior.accepted)
        for arr, counts in zip(mine, theirs):
            arr[:] = [PRIOR_ROUNDS * x / n if n > 1e-9 else 0.0 for x, n in zip(counts, prior.capped)]

    @property
    def rounds(self) -> float:
        return self.capped[0] if self.capped else 0.0


@dataclass
class Row:
    """An s2d sequence as the policy sees it in a tick."""

    seq_id: str
    target: str
    greedy: bool
    acceptance: Acceptance  # its own
    catchup: int  # tokens the draft must prefill before it can draft for it (none while it drafts)
    remaining: int  # tokens it may still emit


@dataclass
class RoundCosts:
    """A target's costs of a round in this tick, read once from StepCosts: its verify at each width
    (verify[k]: k + 1 tokens per row), a draft step and the draft call's fixed part at this tick's
    draft batch, the engine's own work without and with drafting, and one token of catch-up."""

    verify: list[float]
    step: float
    fixed: float
    engine: tuple[float, float]
    catchup: float

    @classmethod
    def read(cls, costs: StepCosts, target: str, rows: int, draft_rows: int, k_max: int) -> "RoundCosts | None":
        """None while one of them was never measured."""
        verify = [costs.predict(f"verify:{target}", rows, k + 1) for k in range(k_max + 1)]
        step, fixed = costs.predict("draft_step", draft_rows), costs.predict("draft_call", draft_rows)
        if None in verify or step is None or fixed is None:
            return None
        engine = (costs.predict("engine", rows, 1) or 0.0, costs.predict("engine", rows, 2) or 0.0)
        return cls(verify, step, fixed, engine, costs.predict("draft_prefill", 1) or 0.0)

    def seconds(self, k: int, drafts: float) -> float:
        """A round verifying k + 1 tokens per row, its draft making `drafts` steps (never 0 s: pipelined
        ticks overlap, so the engine's own time can measure 0)."""
        if k == 0:
            return max(self.verify[0] + self.engine[0], 1e-9)
        return max(self.verify[k] + drafts * self.step + self.fixed + self.engine[1], 1e-9)


@dataclass
class Choice:
    """A row's own best k, and what the batch's width needs to know of it."""

    row: Row
    top: int  # the most it may draft
    k: int
    curve: list[tuple[float, float]]  # Acceptance.curve: (tokens, drafts) of a round per k
    catchup_s: float  # its catch-up, paid once if it starts drafting

    def catchup(self, k: int) -> float:
        """Its catch-up's share of a round at k: spread over the rounds it has left."""
        return self.catchup_s * self.curve[k][0] / self.row.remaining if k else 0.0


def choose(row: Row, kind: "TargetPolicy", t: RoundCosts) -> Choice:
    """The k, 0 included, that maximises this row's expected tokens per second of a round: by its own
    acceptance (seeded by its target's where it has none), the target's whole batch verified at
    k + 1 per row."""
    if not row.acceptance.capped:
        row.acceptance.seed(kind.acc)
    top = max(min(kind.k_max, row.remaining - 1), 0)
    c = Choice(row, top, 0, row.acceptance.curve(top), row.catchup * t.catchup)
    rates = [tokens / (t.seconds(k, drafts) + c.catchup(k)) for k, (tokens, drafts) in enumerate(c.curve)]
    c.k = max(range(len(rates)), key=rates.__getitem__)  # the first of equals: the fewest drafts
    return c


def widest(choices: list[Choice], t: RoundCosts, plain: int) -> tuple[int, float, float]:
    """(the batch's cap on k, its round's seconds, its tokens per second): every row verifies as wide
    as the widest, so the rows' choices stand only as far as they pay for the whole batch (one
    high-acceptance row does not slow many others down). `plain`: rows of a token each whatever k."""
    best = (0, 0.0, -1.0)
    for cap in range(max(c.k for c in choices) + 1):
        ks = [min(c.k, cap) for c in choices]
        tokens = plain + sum(c.curve[k][0] for c, k in zip(choices, ks))
        drafts = max(c.curve[k][1] for c, k in zip(choices, ks))  # draft steps run while any row drafts
        seconds = t.seconds(cap, drafts) + sum(c.catchup(k) for c, k in zip(choices, ks))
        if tokens / seconds > best[2]:
            best = (cap, seconds, tokens / seconds)
    return best


class TargetBatch:
    """A target's verify batch from tick to tick: its rows' k, when the drafting rows look around,
    and the probing budget earned while some rows do not draft."""

    def __init__(self):
        self.ticks, self.credit = 0, 0.0
        self.batch: tuple | None = None  # the rows of the last choice
        self.chosen: tuple = ({}, [], None, 0.0)  # its ks, choices, costs and round seconds

    def caps(self, rows: list[Row], kinds: dict[bool, "TargetPolicy"], read: Callable[[], RoundCosts | None],
             plain: int) -> dict[str, int]:
        """Each row's cap on drafts; `kinds`: the target's policy per greedy; `read`: this tick's
        RoundCosts; `plain`: the batch's rows with no choice (ar, fixed). With nothing measured to
        go by (a cost, or the kind's acceptance), a row drafts as its profile says, which measures
        it. The same rows as last tick keep their choices for up to RECHOOSE ticks: costs and
        acceptance move slowly, and choosing costs Python time on every row of every tick."""
        self.ticks += 1
        batch = (tuple((r.seq_id, id(r.acceptance)) for r in rows), plain)
        if batch != self.batch or self.ticks % RECHOOSE == 0:
            self.batch, self.chosen = batch, self._choose(rows, kinds, read(), plain)
        ks, choices, t, seconds = self.chosen
        ks = dict(ks)
        if choices:
            self._look_around(choices, ks, t, seconds)
        return ks

    @staticmethod
    def _choose(rows: list[Row], kinds: dict[bool, "TargetPolicy"], t: RoundCosts | None, plain: int) -> tuple:
        ks, choices, seconds = {}, [], 0.0
        for r in rows:
            kind = kinds[r.greedy]
            if t is None or kind.acc.rounds < MIN_ROUNDS:
                ks[r.seq_id] = kind.k_max
            else:
                choices.append(choose(r, kind, t))
        used = {kinds[r.greedy] for r in rows}
        if choices:
            cap, seconds, rate = widest(choices, t, plain + len(ks))
            ks |= {c.row.seq_id: min(c.k, cap) for c in choices}
            for kind in used:
                kind.rate = rate / (len(rows) + plain)
        for kind in used:  # the gauge: what the rows chose, before they look around
            kind.last_k = max(ks[r.seq_id] for r in rows if kinds[r.greedy] is kind)
        return ks, choices, t, seconds

    def _look_around(self, choices: list[Choice], ks: dict[str, int], t: RoundCosts, seconds: float):
        """Every EXPLORE_EVERY ticks the drafting rows try a neighbouring k; a row that does not draft
        tries its top k once OFF_BUDGET of the rounds' time since the last probe covers the probe's
        cost (its catch-up and a drafting round's extra time), the row with the least to catch up
        first. The top k, not 1: a probe of one draft would leave the later positions' acceptance as
        the policy last saw it, and a pessimistic early estimate would keep speculation off for good."""
        if self.ticks % EXPLORE_EVERY == 0:
            for c in choices:
                k = ks[c.row.seq_id]
                if k:
                    ks[c.row.seq_id] = k + 1 if k < c.top else k - 1
        off = [c for c in choices if ks[c.row.seq_id] == 0 and c.top > 0]
        if not off:
            return
        self.credit += OFF_BUDGET * seconds
        c = min(off, key=lambda c: c.row.catchup)
        if self.credit >= c.catchup_s + t.seconds(c.top, c.curve[-1][1]) - t.seconds(0, 0):
            self.credit = 0.0
            ks[c.row.seq_id] = c.top


class TargetPolicy:
    """One kind of request (greedy or sampled) to one target: its live acceptance (the prior of each
    of its sequences' own) and its exit thresholds."""

    def __init__(self, target: str, exits: list[int], thresholds: list[float], k_max: int,
                 online_thresholds: bool = True):
        self.target, self.exits, self.k_max = target, exits, k_max
        self.current = list(thresholds)
        self.online = online_thresholds
        self.acc = Acceptance()
        # per exit but the last, per confidence bin: [samples, this exit agreed, the next exit agreed]
        self.bins = [[[0.0, 0.0, 0.0] for _ in range(BINS)] for _ in exits[:-1]]
        self.ticks = 0
        self.last_k = k_max  # the widest k its rows drafted in their last tick
        self.rate = 0.0  # tokens per second per row of its batch's last choice (for the threshold rule)

    # -- where to exit ---------------------------------------------------------------------------
    def thresholds(self) -> list[float]:
        """This tick's thresholds: the live ones, or now and then a probe through every exit."""
        if self.online and self.ticks % PROBE_EVERY == PROBE_EVERY - 1:
            return [2.0] * (len(self.exits) - 1) + [0.0]
        return self.current

    def record(self, k: int, drafts: int, trace: list[list[tuple[float, int]]], tokens: list[int], accepted: int):
        """One round of a sequence: its cap, how many it drafted, each draft's (confidence, argmax)
        at the exits it passed, and what the target emitted."""
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
    has its own verify costs), a TargetPolicy per target and kind of request, a TargetBatch per
    target. `mode` "static" leaves every profile as configured (what `s2d tune` measures)."""

    UPDATE_EVERY = 32  # ticks between threshold updates

    def __init__(self, profiles: dict, exits: list[int], mode: str = "goodput", online_thresholds: bool = True,
                 costs: StepCosts | None = None):
        self.exits, self.mode, self.online = exits, mode, online_thresholds
        self.costs = costs or StepCosts()
        # one policy per target and kind of request: greedy and sampled requests accept differently
        self.targets = {(t, greedy): self._new(t, p) for t, p in profiles.items() for greedy in (True, False)}
        self.batches = defaultdict(TargetBatch)
        self.ticks = 0

    def _new(self, target: str, profile) -> TargetPolicy:
        return TargetPolicy(target, self.exits, profile.thresholds_for(self.exits), profile.k_max, self.online)

    def reset(self, target: str, profile):
        for greedy in (True, False):
            self.targets[target, greedy] = self._new(target, profile)
        self.batches.pop(target, None)

    def caps(self, batch: dict[str, int], draft_rows: int, rows: list[Row]) -> dict[str, tuple[int, list[float]]]:
        """Per s2d row, by seq_id: (its cap on drafts this tick, its kind's exit thresholds).
        `batch`: each target's rows this tick, ar and fixed ones too (the verify is the whole
        batch); `draft_rows`: the rows the draft may draft for, of every target."""
        if self.mode == "static":
            return {}
        by_target = defaultdict(list)
        for r in rows:
            by_target[r.target].append(r)
        out = {}
        for target, mine in by_target.items():
            kinds = {g: self.targets[target, g] for g in (True, False)}
            ks = self.batches[target].caps(mine, kinds, partial(RoundCosts.read, self.costs, target, batch[target],
                                                                max(draft_rows, 1), kinds[True].k_max),
                                           batch[target] - len(mine))
            thresholds = {}
            for g in {r.greedy for r in mine}:
                kinds[g].ticks += 1
                thresholds[g] = kinds[g].thresholds()
            out |= {r.seq_id: (ks[r.seq_id], thresholds[r.greedy]) for r in mine}
        return out

    def drafts(self, target: str) -> bool:
        """Whether the target's s2d requests draft at present (the scheduler splits cohorts only then)."""
        return self.mode == "static" or any(self.targets[target, g].last_k > 0 for g in (True, False))

    def record(self, key: tuple[str, bool], own: Acceptance, k: int, outcome):
        """A round of an s2d sequence that drafted (at most k): its target's acceptance and its own
        learn from it."""
        if self.mode == "static" or k <= 0:
            return
        self.targets[key].record(k, len(outcome.drafts), outcome.trace, outcome.tokens, outcome.accepted)
        own.record(k, len(outcome.drafts), outcome.accepted)

    def observe(self, result, wall_s: float, draft_rows: int):
        """A finished tick (a TickResult): its forwards' measured seconds, and the engine's own time
        around them."""
        if self.mode == "static":  # nothing reads the costs
            return
        verified = result.targets
        for v in verified:
            for f in v.forwards:
                if f.what == "verify":
                    self.costs.observe(f"verify:{v.target}", f.rows, f.tokens // max(f.rows, 1), f.seconds)
        drafting = result.draft.forwards
        steps = [f for f in drafting if f.what == "draft_step"]
        catchup_s = 0.0
        for f in drafting:
            if f.what.startswith("draft"):
                self.costs.observe(f.what, f.rows, 1, f.seconds)
            elif f.what == "prefill":  # the draft catching up (prompts, missed tokens): per token, apart
                self.costs.observe("draft_prefill", 1, 1, f.seconds / max(f.tokens, 1))
                catchup_s += f.seconds
        draft_s = result.draft.busy_s
        if steps:  # what a draft call costs besides its steps and its catch-up (syncing tokens, releases)
            self.costs.observe("draft_call", steps[0].rows, 1,
                               max(draft_s - catchup_s - sum(f.seconds for f in steps), 0.0))
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
