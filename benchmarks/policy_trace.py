"""What the goodput draft policy believes after each run, beside what it achieves: one target, 6
held-out code prompts one at a time (64 tokens, greedy), three rounds of ar, s2d under the goodput
policy and s2d under the configured static profile. After each round it prints the policy's
measured costs (verify per width, a draft step, the draft call's fixed part, the engine's own time
without and with drafting), the target's acceptance curve (tokens and drafts a round at each k) and
the tokens per ms it predicts at each k.

    python benchmarks/policy_trace.py [demo-l] [--no-ar] [--fixed-thresholds]

--no-ar leaves out the ar runs (which feed the policy's k = 0 costs); --fixed-thresholds turns the
online exit thresholds off.
"""
from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from s2d.core.config import SamplingParams, load_config, only_targets
from s2d.core.engine import Engine, Request
from s2d.core.policy import RoundCosts
from s2d.tools.bench import heldout_code


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("target", nargs="?", default="demo-l")
    ap.add_argument("--no-ar", action="store_true")
    ap.add_argument("--fixed-thresholds", action="store_true")
    a = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    cfg = only_targets(load_config("demo").with_models("bfloat16", "on"), [a.target])
    cfg.scheduling.online_thresholds = not a.fixed_thresholds
    eng = Engine.from_config(cfg)
    prompts = heldout_code(Path(cfg.base_dir), 6)
    pol = eng.scheduler.policy

    def run(mode: str, policy: str) -> str:
        pol.mode = policy
        t, n, mats = time.perf_counter(), 0, []
        for i, p in enumerate(prompts):
            r = eng.generate([Request(target=a.target, prompt=p, mode=mode, params=SamplingParams(
                temperature=0.0, max_tokens=64, seed=i, ignore_eos=True))])[0]
            n += len(r["token_ids"])
            mats.append(r["stats"]["mat"])
        return f"{n / (time.perf_counter() - t):.1f} tok/s, MAT {sum(mats) / len(mats):.2f}"

    kind = pol.targets[(a.target, True)]
    for rnd in range(3):
        line = [] if a.no_ar else [f"ar {run('ar', 'goodput')}"]
        line += [f"goodput {run('s2d', 'goodput')}", f"static {run('s2d', 'static')}"]
        print(f"round {rnd + 1}: " + "; ".join(line))
        t = RoundCosts.read(pol.costs, a.target, 1, 1, kind.k_max)
        if t is None:
            print("  costs not measured yet")
            continue
        curve = kind.acc.curve(kind.k_max)
        ms = lambda xs: [round(1e3 * x, 3) for x in xs]  # noqa: E731
        print(f"  ms: verify by k {ms(t.verify)}, draft step {ms([t.step])[0]}, fixed {ms([t.fixed])[0]}, "
              f"engine without / with drafting {ms(t.engine)}")
        print(f"  curve (tokens, drafts) by k: {[(round(x, 2), round(d, 2)) for x, d in curve]}")
        print(f"  predicted tokens/ms by k: {[round(x / t.seconds(k, d) / 1e3, 3) for k, (x, d) in enumerate(curve)]}, "
              f"thresholds {kind.current}")


if __name__ == "__main__":
    main()
