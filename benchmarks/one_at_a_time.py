"""s2d against ar, one request at a time, on 6 held-out code prompts (64 tokens, greedy), in a given
dtype and static-forward mode: startup (compiling included), tok/s of each mode, best of two
interleaved runs, how many outputs s2d and ar share, and the compilations while generating.

    python benchmarks/one_at_a_time.py bfloat16 on demo-l
    python benchmarks/one_at_a_time.py float32 off demo-l
"""
from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import s2d.graphs
from s2d.bench import heldout_code
from s2d.config import SamplingParams, load_config
from s2d.engine import Engine, Request


def main(dtype: str, static_forward: str, target: str):
    logging.basicConfig(level=logging.WARNING)
    cfg = load_config("demo").with_models(dtype, static_forward)
    t0 = time.time()
    eng = Engine.from_config(cfg)
    print(f"startup {time.time() - t0:.1f} s, {s2d.graphs.compilations} graphs compiled", flush=True)
    prompts = heldout_code(Path(cfg.base_dir), 6)

    def run(mode):
        toks, secs, outs, mats = 0, 0.0, [], []
        for i, p in enumerate(prompts):
            t = time.perf_counter()
            r = eng.generate([Request(target=target, prompt=p, mode=mode,
                                      params=SamplingParams(temperature=0.0, max_tokens=64, seed=i, ignore_eos=True))])[0]
            secs += time.perf_counter() - t
            toks += len(r["token_ids"])
            outs.append(r["token_ids"])
            mats.append(r["stats"]["mat"])
        return toks / secs, outs, sum(mats) / len(mats)

    for m in ("ar", "s2d"):  # warm-up
        run(m)
    before, best, outs = s2d.graphs.compilations, {}, {}
    for _ in range(2):
        for m in ("ar", "s2d"):
            tps, outs[m], mat = run(m)
            best[m] = max(best.get(m, 0.0), tps)
            print(f"{m}: {tps:.1f} tok/s, mean MAT {mat:.2f}", flush=True)
    same = sum(a == b for a, b in zip(outs["ar"], outs["s2d"]))
    print(f"{target} {dtype} {static_forward}: ar {best['ar']:.1f}, s2d {best['s2d']:.1f} tok/s, s2d / ar "
          f"{best['s2d'] / best['ar']:.2f}x; identical outputs {same}/{len(prompts)}; "
          f"compiled while generating: {s2d.graphs.compilations - before}")


if __name__ == "__main__":
    main(*sys.argv[1:4])
