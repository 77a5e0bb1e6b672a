"""Online exit thresholds from bad starting profiles (s2d/core/policy.py): one target, a stream of
held-out code prompts one at a time, greedy; every few requests the live thresholds, the policy's
k, MAT, the exit mix and the goodput. Starts: the paper's rule, always the deepest exit, always
the first exit, and the offline-tuned profile of the config.

Costs are pinned (--costs pinned, default) at a GPU-like ratio: a 4 ms decode, verification 0.15 ms
per extra token, 0.3 ms per draft segment; goodput is then modelled from each request's stats, so
the figures do not depend on this machine's noise. --costs live runs on this machine's measured
costs and reports measured tokens/s (on a small CPU the policy may then switch speculation off,
and thresholds move only while it drafts). A benchmark, not a test.

    python benchmarks/threshold_bench.py --config demo [--target demo-l] [--prompts 24] [--costs pinned|live]
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from s2d.core.config import Profile, SamplingParams, load_config
from s2d.core.engine import Engine, Request
from s2d.core.policy import modelled_tokens_per_s, pinned_costs
from s2d.core.stats import SpecStats
from s2d.tools.bench import heldout_code


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="demo")
    ap.add_argument("--target", default="demo-l")
    ap.add_argument("--prompts", type=int, default=24)
    ap.add_argument("--every", type=int, default=4, help="report after this many requests")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--costs", choices=["pinned", "live"], default="pinned")
    a = ap.parse_args()
    cfg = load_config(a.config)
    engine = Engine.from_config(cfg)
    exits, tuned = engine.exits, cfg.target(a.target).profile
    prompts = heldout_code(Path(cfg.base_dir or "."), a.prompts)
    n = len(exits)
    starts = {"paper (0.5, .., 0)": None, "always deepest": [1.01] * (n - 1) + [0.0],
              "always first": [0.0] * n, f"tuned {tuned.thresholds_for(exits)}": tuned.thresholds_for(exits)}
    print(f"{a.target}, costs {a.costs}, k_max {tuned.k_max}, {len(prompts)} prompts x {a.max_tokens} tokens\n")
    print("| start | requests | thresholds | k | MAT | exits (drafted tokens) | tok/s |\n|---|---|---|---|---|---|---|")
    for name, thresholds in starts.items():
        engine.set_profile(a.target, Profile(thresholds=thresholds, k_max=tuned.k_max))
        if a.costs == "pinned":
            engine.scheduler.policy.costs = pinned_costs(a.target, n)
        policy = engine.scheduler.policy.targets[a.target, True]  # greedy requests
        results, t0 = [], time.perf_counter()
        for i, p in enumerate(prompts):
            params = SamplingParams(max_tokens=a.max_tokens, ignore_eos=True)
            results.append(engine.generate([Request(target=a.target, prompt=p, params=params)])[0])
            if (i + 1) % a.every == 0:
                part = results[-a.every:]
                st = SpecStats()
                for r in part:
                    st = st.merge(SpecStats.from_dict(r["stats"]))
                if a.costs == "pinned":
                    tps = modelled_tokens_per_s(part, engine.scheduler.policy.costs, a.target, exits)
                else:
                    tps = sum(len(r["token_ids"]) for r in part) / (time.perf_counter() - t0)
                t0 = time.perf_counter()
                print(f"| {name} | {i + 1} | {[round(x, 2) for x in policy.current]} | {policy.last_k} | "
                      f"{st.mat:.2f} | {dict(sorted(st.exits.items()))} | {tps:.0f} |")


if __name__ == "__main__":
    main()
