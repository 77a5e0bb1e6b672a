"""s2d against ar, one request at a time, on 6 held-out code prompts (64 tokens, greedy), in a given
dtype and static-forward mode, with only the draft and the measured target loaded: startup
(compiling included), tok/s of ar, of s2d under the goodput policy and under the static profile
(best of two interleaved runs), where a tick's time goes (`Breakdown`), how many outputs s2d and ar
share, and the compilations while generating.

    python benchmarks/one_at_a_time.py bfloat16 on demo-l
    python benchmarks/one_at_a_time.py float32 off demo-l
"""
from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import s2d.worker.graphs
from s2d.core.config import SamplingParams, load_config, only_targets
from s2d.core.engine import Engine, Request
from s2d.core.stats import Breakdown
from s2d.tools.bench import heldout_code

# (mode, draft policy)
RUNS = {"ar": ("ar", "goodput"), "s2d goodput": ("s2d", "goodput"), "s2d static": ("s2d", "static")}


def main(dtype: str, static_forward: str, target: str):
    logging.basicConfig(level=logging.WARNING)
    cfg = load_config("demo").with_models(dtype, static_forward)
    cfg = only_targets(cfg, [target])
    t0 = time.time()
    eng = Engine.from_config(cfg)
    print(f"startup {time.time() - t0:.1f} s, {s2d.worker.graphs.compilations} packages compiled, "
          f"{s2d.worker.graphs.loaded} loaded", flush=True)
    prompts = heldout_code(Path(cfg.base_dir), 6)

    def run(name):
        mode, policy = RUNS[name]
        eng.scheduler.policy.mode = policy
        eng.scheduler.breakdown = Breakdown()
        toks, secs, outs, mats = 0, 0.0, [], []
        for i, p in enumerate(prompts):
            t = time.perf_counter()
            r = eng.generate([Request(target=target, prompt=p, mode=mode,
                                      params=SamplingParams(temperature=0.0, max_tokens=64, seed=i,
                                                            ignore_eos=True))])[0]
            secs += time.perf_counter() - t
            toks += len(r["token_ids"])
            outs.append(r["token_ids"])
            mats.append(r["stats"]["mat"])
        return toks / secs, outs, sum(mats) / len(mats), eng.scheduler.breakdown.to_dict()

    for name in RUNS:  # warm-up
        run(name)
    before, best, outs = s2d.worker.graphs.compilations, {}, {}
    for _ in range(2):
        for name in RUNS:
            tps, outs[name], mat, bd = run(name)
            if tps > best.get(name, (0.0,))[0]:
                best[name] = (tps, mat, bd)
            print(f"{name}: {tps:.1f} tok/s, mean MAT {mat:.2f}", flush=True)
    print(f"\n{target}, {dtype}, static_forward {static_forward}, best of two:\n")
    print("| run | tok/s | / ar | mean MAT | ms per tick | draft ms | verify ms | engine ms | engine share |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, (tps, mat, bd) in best.items():
        print(f"| {name} | {tps:.1f} | {tps / best['ar'][0]:.2f}x | {mat:.2f} | {bd['ms_per_tick']:.2f} | "
              f"{bd['draft_ms']:.2f} | {bd['verify_ms']:.2f} | {bd['engine_ms']:.2f} | {bd['engine_share']:.0%} |")
    same = {name: sum(a == b for a, b in zip(outs["ar"], outs[name])) for name in RUNS if name != "ar"}
    print(f"\nidentical to ar: {same} of {len(prompts)}; "
          f"compiled while generating: {s2d.worker.graphs.compilations - before}")


if __name__ == "__main__":
    main(*sys.argv[1:4])
