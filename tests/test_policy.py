"""The draft policy (s2d/policy.py): it turns speculation off where it cannot pay, drafts less as
verification stops being free, and its exit thresholds converge from bad starting profiles toward
the offline-tuned one on a live stream of requests. Costs are pinned (pinned_costs, StepCosts(fixed=...)), so
what is tested is the policy's reasoning, not this machine's timings."""
from __future__ import annotations

from pathlib import Path

import pytest

from s2d.bench import heldout_code
from s2d.config import Profile, SamplingParams, load_config
from s2d.engine import Engine, Request
from s2d.policy import StepCosts, TargetPolicy, modelled_tokens_per_s, pinned_costs

MS = 1e-3
EXITS = [1, 2, 3]


def costs(draft_step: float, verify=lambda rows, w: 4 * MS + 0.1 * MS * (w - 1), rows=(1,)) -> StepCosts:
    cells = {("draft_step", b, 1): draft_step for b in (1, 2, 4, 8, 16, 32)}
    cells |= {("draft_call", b, 1): 0.0 for b in (1, 2, 4, 8, 16, 32)}
    cells |= {("verify:t", b, w): verify(b, w) for b in rows for w in range(1, 7)}
    return StepCosts(fixed=cells)


def trained(acceptance: float = 0.8, k: int = 5) -> TargetPolicy:
    """A policy that has seen 40 rounds where each draft is accepted with the given probability."""
    p = TargetPolicy("t", EXITS, [0.5, 0.5, 0.0], k)
    for r in range(40):
        accepted = 0
        while accepted < k and (r * 7 + accepted * 3) % 10 < 10 * acceptance:
            accepted += 1
        p.record(k, k, [[(0.9, 1)]] * k, [1] * (accepted + 1), accepted)
    return p


def test_a_draft_as_costly_as_the_target_turns_speculation_off():
    p = trained()
    assert p.choose_k(costs(draft_step=4 * MS), 1, 1)[0] == 0
    assert trained().choose_k(costs(draft_step=0.2 * MS), 1, 1)[0] > 0  # the same acceptance, a cheap draft: on


def test_low_acceptance_turns_speculation_off():
    assert trained(acceptance=0.05).choose_k(costs(draft_step=0.4 * MS), 1, 1)[0] == 0


def test_drafting_shrinks_as_verification_stops_being_free():
    """At 1 row a token more per row costs 2.5% of a forward; at 32 rows, 40%."""
    def verify(rows, w):
        return (4 + 0.1 * (w - 1)) * MS if rows == 1 else (20 + 8 * (w - 1)) * MS
    c = costs(0.3 * MS, verify, rows=(1, 32))
    light, heavy = trained().choose_k(c, 1, 1)[0], trained().choose_k(c, 32, 32)[0]
    assert light >= 3 and heavy < light


@pytest.fixture(scope="module")
def demo():
    return Engine.from_config(load_config("demo"))


@pytest.mark.parametrize("start", [[1.01, 1.01, 0.0], [0.0, 0.0, 0.0]])
def test_online_thresholds_converge_from_a_bad_profile(demo, start):
    """Always the deepest exit, or always the first: on 20 held-out code prompts the thresholds move
    off the bad start, to the first exit at moderate confidence as in the offline-tuned profile
    (0.5, 0, 0), and the modelled goodput rises."""
    demo.set_profile("demo-l", Profile(thresholds=start, k_max=4))
    demo.scheduler.policy.costs = pinned_costs("demo-l", 3)
    policy = demo.scheduler.policy.targets["demo-l", True]  # greedy requests
    prompts = heldout_code(Path(load_config("demo").base_dir), 20)
    results = [demo.generate([Request(target="demo-l", prompt=p, params=SamplingParams(max_tokens=48, ignore_eos=True))])[0]
               for p in prompts]
    assert 0.1 <= policy.current[0] <= 0.8 and policy.current[1] <= 0.7, policy.current
    goodput = [modelled_tokens_per_s(part, demo.scheduler.policy.costs, "demo-l", demo.exits)
               for part in (results[:3], results[-6:])]
    assert goodput[1] > 1.05 * goodput[0]


def test_costs_measured_as_zero_do_not_break_the_policy():
    """Pipelined ticks overlap, so the engine's own time of a tick can measure 0: every prediction
    from such cells stays finite, and the choice stays defined."""
    c = StepCosts()
    for w in (1, 2):
        c.observe("engine", 1, w, 0.0)
    c.observe("engine", 4, 1, 1 * MS)  # one width at 4 rows: its slope is borrowed from the 1-row cells
    c.observe("verify:t", 1, 1, 4 * MS)
    c.observe("draft_step", 1, 1, 0.0)
    c.observe("draft_call", 1, 1, 0.0)
    assert c.predict("engine", 4, 2) is not None and c.predict("verify:t", 1, 3) > 0
    k, _ = trained().choose_k(c, 1, 1)
    assert 0 <= k <= 5
