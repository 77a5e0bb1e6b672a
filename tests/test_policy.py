"""The draft policy (s2d/core/policy.py): each request drafts by its own acceptance, speculation turns
off where it cannot pay and shrinks as verification stops being free, a request with nothing
measured drafts as its profile says, and the exit thresholds converge from bad starting profiles
toward the offline-tuned one on a live stream of requests. Costs are pinned (pinned_costs,
StepCosts(fixed=...)), so what is tested is the policy's reasoning, not this machine's timings."""
from __future__ import annotations

import random
from pathlib import Path

import pytest

from s2d.core.config import Profile, SamplingParams, load_config
from s2d.core.engine import Engine, Request
from s2d.core.executor import DraftPart, TickResult, Verified
from s2d.core.policy import (
    OFF_BUDGET,
    Acceptance,
    DraftPolicy,
    Row,
    StepCosts,
    TargetPolicy,
    modelled_tokens_per_s,
    pinned_costs,
)
from s2d.tools.bench import heldout_code
from s2d.worker.workers import Forward

MS = 1e-3
EXITS = [1, 2, 3]


def costs(draft_step: float, verify=lambda rows, w: 4 * MS + 0.1 * MS * (w - 1), rows=(1,), prefill: float = 0.0
          ) -> StepCosts:
    cells = {("draft_step", b, 1): draft_step for b in (1, 2, 4, 8, 16, 32)}
    cells |= {("draft_call", b, 1): 0.0 for b in (1, 2, 4, 8, 16, 32)}
    cells |= {("verify:t", b, w): verify(b, w) for b in rows for w in range(1, 7)}
    cells |= {("draft_prefill", 1, 1): prefill}
    return StepCosts(fixed=cells)


def train(acc, acceptance: float, k: int = 5, rounds: int = 40):
    """Rounds where each draft is accepted with the given probability (a fixed pattern), into a
    TargetPolicy or a sequence's own Acceptance."""
    for r in range(rounds):
        accepted = 0
        while accepted < k and (r * 7 + accepted * 3) % 10 < 10 * acceptance:
            accepted += 1
        if isinstance(acc, TargetPolicy):
            acc.record(k, k, [[(0.9, 1)]] * k, [1] * (accepted + 1), accepted)
        else:
            acc.record(k, k, accepted)


def policy(c: StepCosts, acceptance: float = 0.8, k: int = 5) -> DraftPolicy:
    """A policy over target "t" whose greedy requests have been accepted at the given rate."""
    p = DraftPolicy({"t": Profile(thresholds=[0.5, 0.5, 0.0], k_max=k)}, EXITS, costs=c)
    train(p.targets["t", True], acceptance, k)
    return p


def row(i: int, own: float | None = None, catchup: int = 0, remaining: int = 100) -> Row:
    """A greedy row of target "t"; `own`: its own acceptance over 20 rounds (default: none yet)."""
    acc = Acceptance()
    if own is not None:
        train(acc, own, rounds=20)
    return Row(f"r{i}", "t", True, acc, catchup, remaining)


def ks(p: DraftPolicy, rows: list[Row]) -> list[int]:
    """Each row's cap on drafts in one tick."""
    caps = p.caps({"t": len(rows)}, len(rows), rows)
    return [caps[r.seq_id][0] for r in rows]


def test_a_draft_as_costly_as_the_target_turns_speculation_off():
    assert ks(policy(costs(draft_step=4 * MS)), [row(0)]) == [0]
    assert ks(policy(costs(draft_step=0.2 * MS)), [row(0)])[0] > 0  # the same acceptance, a cheap draft: on


def test_low_acceptance_turns_speculation_off():
    assert ks(policy(costs(draft_step=0.4 * MS), acceptance=0.05), [row(0)]) == [0]


def test_drafting_shrinks_as_verification_stops_being_free():
    """At 1 row a token more per row costs 2.5% of a forward; at 32 rows, 40%."""
    def verify(rows, w):
        return (4 + 0.1 * (w - 1)) * MS if rows == 1 else (20 + 8 * (w - 1)) * MS
    c = costs(0.3 * MS, verify, rows=(1, 32))
    light, heavy = ks(policy(c), [row(0)])[0], ks(policy(c), [row(i) for i in range(32)])
    assert light >= 3 and max(heavy) < light


def test_each_sequence_drafts_by_its_own_acceptance():
    """Beside each other under one target's middling prior: a sequence whose drafts are accepted
    drafts long, one whose drafts are not drafts nothing, and a new one goes by the prior."""
    p = policy(costs(draft_step=0.4 * MS), acceptance=0.3)
    code, noise, new = ks(p, [row(0, own=1.0), row(1, own=0.0), row(2)])
    assert code == 5 and noise == 0 and 0 < new < code


def test_one_row_does_not_widen_a_loaded_batch():
    """Every row verifies as wide as the widest: at 32 rows, where a token more per row costs 40% of
    a forward, one high-acceptance row among 31 that accept nothing does not draft (the batch would
    lose); at 2 rows, where verification is nearly free, it drafts and its neighbour does not."""
    def verify(rows, w):
        return (4 + 0.1 * (w - 1)) * MS if rows <= 2 else (20 + 8 * (w - 1)) * MS
    c = costs(0.3 * MS, verify, rows=(1, 2, 32))
    assert ks(policy(c, acceptance=0.3), [row(0, own=1.0)] + [row(i, own=0.0) for i in range(1, 32)]) == [0] * 32
    assert ks(policy(c, acceptance=0.3), [row(0, own=1.0), row(1, own=0.0)]) == [5, 0]


def test_a_sequence_pays_its_catch_up_once_spread_over_the_tokens_it_has_left():
    """A sequence that does not draft has missed tokens the draft must prefill to start: worth it
    with many tokens left, not for its last few."""
    p = policy(costs(draft_step=0.4 * MS, prefill=0.5 * MS), acceptance=0.8)
    many, few = ks(p, [row(0, catchup=200, remaining=200), row(1, catchup=200, remaining=8)])
    assert many >= 3 and few == 0
    assert ks(p, [row(0), row(1, remaining=8)])[1] > 0  # one that drafts has nothing to catch up


def test_the_drafts_catch_up_is_not_a_cost_of_drafting():
    """A tick whose draft call prefilled a prompt (50 ms): the call's fixed part stays what is left
    besides that and the steps; the prefill is priced per token, apart."""
    p = DraftPolicy({"t": Profile()}, EXITS)
    forwards = [Forward("prefill", 1, 100, 50 * MS), Forward("draft_step", 1, 1, 0.4 * MS),
                Forward("draft:0", 1, 1, 0.3 * MS)]
    tick = TickResult(DraftPart(51 * MS, forwards), [Verified("t", [], busy_s=4 * MS,
                                                               forwards=[Forward("verify", 1, 2, 4 * MS)])])
    for _ in range(StepCosts.COLD + 1):  # a cell's first measurements are left out
        p.observe(tick, wall_s=56 * MS, draft_rows=1)
    assert p.costs.predict("draft_call", 1) == pytest.approx(0.6 * MS)
    assert p.costs.predict("draft_prefill", 1) == pytest.approx(0.5 * MS)


def test_a_shapes_first_calls_do_not_set_its_cost():
    """The first calls at a shape pay one-time costs (buffers, cold caches); a cell whose first
    samples stuck would keep a width the policy then never tries again looking dear."""
    c = StepCosts()
    for seconds in [9 * MS] * StepCosts.COLD + [1 * MS, 1.2 * MS, 1.1 * MS]:
        c.observe("verify:t", 1, 2, seconds)
    assert c.predict("verify:t", 1, 2) == pytest.approx(1.1 * MS)


def test_with_nothing_measured_a_request_drafts_as_its_profile_says():
    """No costs, or no acceptance yet: drafting at the profile's k measures them (not k = 0)."""
    fresh = DraftPolicy({"t": Profile(k_max=4)}, EXITS)
    assert ks(fresh, [row(0), row(1)]) == [4, 4]
    unmeasured = DraftPolicy({"t": Profile(k_max=4)}, EXITS, costs=costs(draft_step=0.4 * MS))
    assert ks(unmeasured, [row(0)]) == [4]


def test_rows_that_do_not_draft_probe_within_the_budget():
    """With speculation off, now and then one row tries its top k (so every draft position's
    acceptance is measured again), the one with the least to catch up; the probes take about
    OFF_BUDGET of the time."""
    p = policy(costs(draft_step=0.4 * MS, rows=(4,), prefill=0.01 * MS), acceptance=0.0)
    rows = [row(0, catchup=40), row(1, catchup=10), row(2, catchup=30), row(3, catchup=20)]
    picks = [ks(p, rows) for _ in range(400)]
    probes = [k for k in picks if k != [0, 0, 0, 0]]
    assert probes and all(k == [0, 5, 0, 0] for k in probes)
    probe_s = (10 * 0.01 + 5 * 0.1 + 5 * 0.4) * MS  # its catch-up, 5 tokens more verified per row, 5 draft steps
    assert len(probes) * probe_s == pytest.approx(OFF_BUDGET * 400 * 4 * MS, rel=0.1)


@pytest.fixture(scope="module")
def demo():
    """The demo family in float32: its greedy outputs, which the checks below read, do not move with
    the batch (bf16, the CPU default where it is fast, can flip near-ties)."""
    cfg = load_config("demo")
    for model in (cfg.draft, *cfg.targets):
        model.dtype = "float32"
    return Engine.from_config(cfg)


@pytest.mark.parametrize("start", [[1.01, 1.01, 0.0], [0.0, 0.0, 0.0]])
def test_online_thresholds_converge_from_a_bad_profile(demo, start):
    """Always the deepest exit, or always the first: on 20 held-out code prompts the thresholds move
    off the bad start, to the first exit at moderate confidence as in the offline-tuned profile
    (0.5, 0, 0), and the modelled goodput rises."""
    demo.set_profile("demo-l", Profile(thresholds=start, k_max=4))
    demo.scheduler.policy.costs = pinned_costs("demo-l", 3)
    policy = demo.scheduler.policy.targets["demo-l", True]  # greedy requests
    prompts = heldout_code(Path(load_config("demo").base_dir), 20)
    results = [demo.generate([Request(target="demo-l", prompt=p,
                                      params=SamplingParams(max_tokens=48, ignore_eos=True))])[0]
               for p in prompts]
    assert 0.1 <= policy.current[0] <= 0.8 and policy.current[1] <= 0.7, policy.current
    goodput = [modelled_tokens_per_s(part, demo.scheduler.policy.costs, "demo-l", demo.exits)
               for part in (results[:3], results[-6:])]
    assert goodput[1] > 1.05 * goodput[0]


def test_in_a_mixed_batch_each_request_drafts_by_its_own_acceptance(demo):
    """One target, one kind of request (greedy), one batch: a repeated code line, whose drafts the
    target accepts, beside random-token prompts whose continuations (rules of "=", "-f -f ..",
    "0x00c0c0..", which the draft splits otherwise) it rejects. Once the first rounds (at the
    profile's k, while nothing is measured) have measured them, the code request drafts at the
    profile's k every round and the random ones do not draft, but for a probe at the profile's k now
    and then.
    Costs are pinned at a GPU's ratio (verification nearly free at this batch), so acceptance alone
    decides. The random token ids are seeds whose continuations the draft misses: on most random
    prompts this family's draft still agrees with the target 30-60% of the time."""
    profile = load_config("demo").target("demo-l").profile
    demo.set_profile("demo-l", profile)
    demo.scheduler.policy.costs = pinned_costs("demo-l", 3)
    tok = demo.frontends["demo-l"].tokenizer
    noise = [tok.decode([rng.randrange(tok.vocab_size) for _ in range(16)])
             for rng in (random.Random(seed) for seed in (1000, 1217, 819))]
    outs = [demo.start(Request(target="demo-l", prompt=p, raw=True,
                               params=SamplingParams(max_tokens=n, ignore_eos=True)))
            for p, n in [("import os\n" * 12, 160)] + [(p, 32) for p in noise]]
    seqs = [demo.running[o.seq_id] for o in outs]  # the scheduler's side: rounds and caps
    caps = [[] for _ in seqs]  # per request, its cap on drafts in each round
    while any(not s.finished for s in seqs):
        demo.step()
        for s, history in zip(seqs, caps):
            if len(history) < s.round:
                history.append(s.drafting_k)
    code, *rest = caps
    assert code[:3] == [profile.k_max] * 3 and min(code[3:-1]) >= profile.k_max - 1, code  # k_max - 1: exploring
    assert outs[0].stats.mat > 5
    for history, s in zip(rest, outs[1:]):
        later = history[3:]
        assert history[:3] == [profile.k_max] * 3, history
        # drafting only in lone probe rounds (at the row's top k), most rounds not at all
        assert not any(a and b for a, b in zip(later, later[1:])) and later.count(0) >= 0.75 * len(later), history
        assert s.stats.accepted <= 1


def test_costs_measured_as_zero_do_not_break_the_policy():
    """Pipelined ticks overlap, so the engine's own time of a tick can measure 0: every prediction
    from such cells stays finite, and the choice stays defined."""
    c = StepCosts()
    c.COLD = 0  # each sample counts
    for w in (1, 2):
        c.observe("engine", 1, w, 0.0)
    c.observe("engine", 4, 1, 1 * MS)  # one width at 4 rows: its slope is borrowed from the 1-row cells
    c.observe("verify:t", 1, 1, 4 * MS)
    c.observe("draft_step", 1, 1, 0.0)
    c.observe("draft_call", 1, 1, 0.0)
    assert c.predict("engine", 4, 2) is not None and c.predict("verify:t", 1, 3) > 0
    zero = StepCosts(fixed={(m, 1, 1): 0.0 for m in ("verify:t", "draft_step", "draft_call")})
    for cs in (c, zero):
        assert all(0 <= k <= 5 for k in ks(policy(cs), [row(0), row(1, own=1.0)]))


def test_a_one_off_request_drafts_from_its_first_round(demo):
    """Nothing measured yet, no costs and no acceptance (a one-off `s2d generate`): the request
    drafts as its profile says from its first round, where measuring by plain decoding or a
    learning phase would lose speed, and keeps doing so until its target's acceptance is known."""
    profile = load_config("demo").target("demo-l").profile
    demo.set_profile("demo-l", profile)
    demo.scheduler.policy.costs = StepCosts()
    out = demo.start(Request(target="demo-l", prompt="def read_config(path):\n",
                             params=SamplingParams(max_tokens=40, ignore_eos=True)))
    seq = demo.running[out.seq_id]
    demo.step()
    assert seq.round == 1 and seq.drafting_k == profile.k_max and out.stats.drafted > 0
    caps = [seq.drafting_k]
    while not seq.finished:
        demo.step()
        caps.append(seq.drafting_k)
    assert caps[:8] == [profile.k_max] * 8 and out.stats.proposed_at[0] >= 8
