"""s2d against plain decoding (ar) at concurrency 1, 4, 8, 16, 32, per target and temperature, in
one process: at concurrency c, c requests of held-out code run together (the scheduler batches
them), repeated until `--requests` have run; s2d and ar alternate per repetition, so a drift of the
machine hits both alike. Each cell also reports the per-round breakdown: the draft's forwards, the
target's verify forwards, and the engine's own work (everything else), per tick and as a share.

A benchmark, not a test.

    python benchmarks/concurrency_bench.py --config demo [--targets demo-l] [--levels 1,4,8,16,32]
        [--temperatures 0,1] [--requests 32] [--max-tokens 48] [--out runs/concurrency] [--static-k K]

--static-k K runs s2d with the draft policy off and every profile's k_max set to K: what a fixed
profile pays at each load, against which the policy's choices can be read.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from tqdm import tqdm

from s2d.core.config import SamplingParams, load_config, only_targets
from s2d.core.engine import Engine, Request
from s2d.core.stats import Breakdown
from s2d.tools.bench import heldout_code


def run_batch(engine: Engine, target: str, prompts: list[str], mode: str, temp: float, max_tokens: int,
              seed: int, breakdown: Breakdown | None = None) -> tuple[int, float]:
    """Tokens and seconds of one batch run to completion; its ticks add to `breakdown`."""
    reqs = [Request(target=target, prompt=p, mode=mode,
                    params=SamplingParams(temperature=temp, max_tokens=max_tokens, seed=seed + i, ignore_eos=True))
            for i, p in enumerate(prompts)]
    engine.scheduler.breakdown = breakdown or Breakdown()
    t0 = time.perf_counter()
    res = engine.generate(reqs)
    dt = time.perf_counter() - t0
    return sum(len(r["token_ids"]) for r in res), dt


def sweep(engine: Engine, targets, levels, temps, prompts, n_requests: int, max_tokens: int) -> list[dict]:
    rows = []
    bar = tqdm(total=len(targets) * len(levels) * len(temps), desc="cells", unit="cell")
    for target in targets:
        for temp in temps:
            for c in levels:
                reps = max(2, n_requests // c)
                acc = {m: [0, 0.0, Breakdown()] for m in ("ar", "s2d")}
                for m in acc:  # warm-up at this load: the policy adapts, caches and allocator settle
                    run_batch(engine, target, prompts[:c], m, temp, max_tokens, 0)
                for r in range(reps):
                    batch = [prompts[(r * c + i) % len(prompts)] for i in range(c)]
                    for m in (("ar", "s2d") if r % 2 == 0 else ("s2d", "ar")):
                        toks, secs = run_batch(engine, target, batch, m, temp, max_tokens, 1000 * r, acc[m][2])
                        acc[m][0] += toks
                        acc[m][1] += secs
                tps = {m: a[0] / a[1] for m, a in acc.items()}
                pol = engine.scheduler.policy.state()[target, "greedy" if temp == 0 else "sampled"]
                rows.append({"target": target, "temperature": temp, "concurrency": c, "requests": reps * c,
                             "ar_tok_s": round(tps["ar"], 1), "s2d_tok_s": round(tps["s2d"], 1),
                             "ratio": round(tps["s2d"] / tps["ar"], 3), "policy_k": pol["k"],
                             "thresholds": [round(x, 3) for x in pol["thresholds"]],
                             "breakdown": {m: a[2].to_dict() for m, a in acc.items()}})
                bar.update(1)
    bar.close()
    return rows


def markdown(rows: list[dict]) -> str:
    out = ["| target | T | concurrency | ar tok/s | s2d tok/s | s2d / ar | policy k (last) | "
           "s2d ms/tick: draft / verify / engine | engine share (s2d, ar) |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        s, a = r["breakdown"]["s2d"], r["breakdown"]["ar"]
        out.append(f"| {r['target']} | {r['temperature']:g} | {r['concurrency']} | {r['ar_tok_s']:.0f} | "
                   f"{r['s2d_tok_s']:.0f} | {r['ratio']:.3f}x | {r['policy_k']} | "
                   f"{s['draft_ms']:.2f} / {s['verify_ms']:.2f} / {s['engine_ms']:.2f} | "
                   f"{100 * s['engine_share']:.0f}%, {100 * a['engine_share']:.0f}% |")
    return "\n".join(out) + "\n"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="demo")
    ap.add_argument("--targets", default=None, help="comma-separated (default: all)")
    ap.add_argument("--levels", default="1,4,8,16,32")
    ap.add_argument("--temperatures", default="0,1")
    ap.add_argument("--requests", type=int, default=32, help="requests per cell and method (at least 2 batches)")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--out", default="runs/concurrency")
    ap.add_argument("--dtype", default=None, help="every model in this dtype instead of the config's")
    ap.add_argument("--static-forward", default=None, help="auto | on | eager | off instead of the config's")
    ap.add_argument("--static-k", type=int, default=None, help="draft_policy static, every profile's k_max = K")
    a = ap.parse_args()
    cfg = load_config(a.config).with_models(a.dtype, a.static_forward)
    if a.static_k is not None:
        cfg.scheduling.draft_policy = "static"
        for t in cfg.targets:
            t.profile.k_max = a.static_k
    targets = a.targets.split(",") if a.targets else [t.name for t in cfg.targets]
    engine = Engine.from_config(only_targets(cfg, targets))  # compiles only what it measures
    levels = [int(x) for x in a.levels.split(",")]
    prompts = heldout_code(Path(cfg.base_dir or "."), 64)
    rows = sweep(engine, targets, levels, [float(t) for t in a.temperatures.split(",")], prompts, a.requests,
                 a.max_tokens)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "concurrency.json").write_text(json.dumps(rows, indent=1))
    md = markdown(rows)
    (out / "concurrency.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
