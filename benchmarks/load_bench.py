"""Served under closed-loop load over gRPC (s2d/tools/loadgen.py), in one run:

a. plateau and tails: a few hundred mixed jobs (demo-s/-m/-l, modes s2d/ar/fixed:1, half unary half
   streaming, greedy, 32 new tokens, held-out code prompts) at concurrency = the KV-slot count and at
   twice it: completions, lost, wrong (against the in-process engine's greedy outputs), latency
   percentiles, tokens/s. Aims: p99 <= 3x p50, tok/s at 2x slots >= 95% of tok/s at the slot count,
   0 lost, 0 wrong.
b. head-of-line blocking: 8 clients sending short requests to demo-l for a fixed time, alone and
   beside 4 clients sending long prompts (~170 lines of held-out code, <= ~700 tokens) back to back.
   Aim: short p50 beside the long ones <= 2x short p50 alone.

A benchmark, not a test.

    python benchmarks/load_bench.py --config demo [--out runs/load] [--quick] [--jobs N] [--duration S]
"""
from __future__ import annotations

import argparse
import gc
import json
import random
import tempfile
import threading
from pathlib import Path

import yaml

from deployments.local import serve_locally, set_local_env, shutdown
from s2d.core.config import load_config
from s2d.tools.bench import code_prompts, heldout_code, heldout_files
from s2d.tools.loadgen import Job, reference_outputs, run_load, summarize

TARGETS, MODES = ["demo-s", "demo-m", "demo-l"], ["s2d", "ar", "fixed:1"]


def mixed_jobs(prompts: list[str], n: int, max_tokens: int) -> list[Job]:
    """Every (target, stream, mode) combination recurs every 18 jobs."""
    return [Job(TARGETS[i % 3], prompts[i % len(prompts)], MODES[(i // 6) % 3], max_tokens, stream=i % 2 == 1)
            for i in range(n)]


def long_prompts(files: list[Path], tokenizer, n: int, lines: int = 170, max_tokens: int = 700,
                 seed: int = 0) -> list[str]:
    """`lines`-line windows of held-out code, cut from the end to at most `max_tokens` prompt tokens."""
    from s2d.core.frontend import encode_prompt

    rng, out = random.Random(seed), []
    texts = [t.splitlines(keepends=True) for t in (f.read_text(errors="ignore") for f in files)]
    texts = [t for t in texts if len(t) > lines] or texts
    while len(out) < n and texts:
        t = rng.choice(texts)
        start = rng.randrange(max(1, len(t) - lines))
        window = t[start: start + lines]
        while len(window) > 1 and len(encode_prompt(tokenizer, "".join(window), None, False)) > max_tokens:
            window = window[:-max(1, len(window) // 20)]
        out.append("".join(window))
    return out


def fmt(x: float) -> str:
    return f"{x:.2f}"


def ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def finite(x):
    """NaN -> None, so that load.json is strict JSON."""
    if isinstance(x, dict):
        return {k: finite(v) for k, v in x.items()}
    if isinstance(x, list):
        return [finite(v) for v in x]
    return None if isinstance(x, float) and x != x else x


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="demo")
    ap.add_argument("--out", default=None, help="folder for load.json and load.md")
    ap.add_argument("--quick", action="store_true", help="96 jobs per level, 8 s per head-of-line scenario")
    ap.add_argument("--jobs", type=int, default=None, help="jobs per concurrency level (320; --quick 96)")
    ap.add_argument("--duration", type=float, default=None, help="seconds per head-of-line scenario (20; --quick 8)")
    ap.add_argument("--concurrency", default=None, help="levels, default: the KV-slot count and twice it")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--timeout", type=float, default=120.0, help="per-request deadline, s")
    ap.add_argument("--scheduling", default=None,
                    help='override the config\'s scheduling, JSON: \'{"long_chunk": 64}\'')
    ap.add_argument("--parts", default="plateau,hol", help="which parts to run")
    a = ap.parse_args()
    set_local_env()
    cfg = load_config(a.config)
    if a.scheduling:
        cfg.scheduling = cfg.scheduling.model_validate({**cfg.scheduling.model_dump(), **json.loads(a.scheduling)})
        a.config = str(Path(tempfile.mkdtemp()) / "engine.yaml")
        Path(a.config).write_text(yaml.safe_dump(cfg.model_dump()))
    slots = cfg.draft.max_seqs
    levels = [int(c) for c in a.concurrency.split(",")] if a.concurrency else [slots, 2 * slots]
    n_jobs = a.jobs or (96 if a.quick else 320)
    duration = a.duration or (8.0 if a.quick else 20.0)
    files = heldout_files(Path(cfg.base_dir))
    prompts = heldout_code(Path(cfg.base_dir), 64) or code_prompts([Path(__file__)], 64)
    jobs = mixed_jobs(prompts, n_jobs, a.max_tokens)
    shorts = [Job("demo-l", p, "s2d", a.max_tokens) for p in code_prompts(files or [Path(__file__)], 32, chars=160)]

    from s2d.core.engine import Engine

    engine = Engine.from_config(cfg)
    longs = [Job("demo-l", p, "s2d", a.max_tokens)
             for p in long_prompts(files or [Path(__file__)], engine.frontends["demo-l"].tokenizer, 8,
                                   max_tokens=min(700, cfg.limits.max_prompt_tokens - 8))]
    print(f"reference outputs for {len(jobs) + len(shorts) + len(longs)} jobs (in process)...", flush=True)
    reference = reference_outputs(engine, jobs + shorts + longs)
    del engine
    gc.collect()

    address = serve_locally(a.config, num_cpus=2)
    try:
        run_load(address, mixed_jobs(prompts, 9, 8), 3, a.timeout)  # warm-up
        plateau, hol = {}, {}
        for c in levels if "plateau" in a.parts else []:
            outcomes, wall = run_load(address, jobs, c, a.timeout)
            s = plateau[c] = summarize(outcomes, wall, reference)
            s["error_samples"] = [f"{o.code}: {o.details}" for o in outcomes if not o.ok][:5]
            print("plateau", c, {k: v for k, v in s.items() if k != "error_samples"}, flush=True)

        if "hol" in a.parts:
            outcomes, wall = run_load(address, shorts, 8, a.timeout, duration_s=duration)
            hol["alone"] = {"short": summarize(outcomes, wall, reference)}
            print("hol alone", hol["alone"], flush=True)
            box = {}
            bg = threading.Thread(target=lambda: box.update(r=run_load(address, longs, 4, a.timeout,
                                                                       duration_s=duration + 1.0)))
            bg.start()
            outcomes, wall = run_load(address, shorts, 8, a.timeout, duration_s=duration)
            bg.join()
            hol["beside long"] = {"short": summarize(outcomes, wall, reference),
                                  "long": summarize(*box["r"], reference)}
            print("hol beside long", hol["beside long"], flush=True)
    finally:
        shutdown()

    md = [f"scheduling: {cfg.scheduling.model_dump()}\n",
          f"{n_jobs} mixed jobs per level (targets {'/'.join(TARGETS)} round-robin, modes {'/'.join(MODES)}, "
          f"half unary half streaming, greedy, {a.max_tokens} new tokens, held-out code prompts); "
          f"{slots} KV slots per model. wrong: token ids differ from the in-process engine's greedy output.\n",
          "| concurrency | completed | lost | wrong | p50 s | p99 s | p99/p50 | max s | tok/s |",
          "|---|---|---|---|---|---|---|---|---|"]
    for c, s in plateau.items():
        md.append(f"| {c} | {s['completed']} | {s['lost']} | {s['wrong']} | {fmt(s['p50_s'])} | {fmt(s['p99_s'])} | "
                  f"{fmt(s['p99_over_p50'])} | {fmt(s['max_s'])} | {s['tokens_per_s']:.1f} |")
    worst_tail = max((s["p99_over_p50"] for s in plateau.values()), default=float("nan"))
    md += ["", f"- p99/p50 (worst level): {fmt(worst_tail)} (aim <= 3)"]
    if len(plateau) >= 2:
        lo, hi = plateau[levels[0]], plateau[levels[-1]]
        md.append(f"- tok/s at {levels[-1]} / tok/s at {levels[0]}: {ratio(hi['tokens_per_s'], lo['tokens_per_s']):.3f}"
                  " (aim >= 0.95)")
    md.append(f"- lost {sum(s['lost'] for s in plateau.values())}, wrong {sum(s['wrong'] for s in plateau.values())}"
              " (aim 0, 0)")
    md += ["", f"Head-of-line blocking: 8 clients sending short prompts (<= 160 characters of held-out code) to "
           f"demo-l, mode s2d, unary, {a.max_tokens} new tokens, for {duration:g} s; beside 4 clients sending long "
           f"prompts (170-line windows of held-out code cut to <= 700 tokens) to demo-l back to back.\n",
           "| scenario | short completions | short p50 s | short p90 s | short lost / wrong | "
           "long completions | long p50 s |",
           "|---|---|---|---|---|---|---|"]
    for name, r in hol.items():
        s, lg = r["short"], r.get("long")
        md.append(f"| {name} | {s['completed']} | {fmt(s['p50_s'])} | {fmt(s['p90_s'])} | {s['lost']} / {s['wrong']} | "
                  f"{lg['completed'] if lg else '-'} | {fmt(lg['p50_s']) if lg else '-'} |")
    hol_ratio = ratio(hol["beside long"]["short"]["p50_s"], hol["alone"]["short"]["p50_s"]) if hol else float("nan")
    md += ["", f"- short p50 beside long / alone: {hol_ratio:.2f} (aim <= 2)"]
    print("\n" + "\n".join(md))
    if a.out:
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "load.md").write_text("\n".join(md) + "\n")
        (out / "load.json").write_text(json.dumps(finite({"config": a.config, "jobs": n_jobs, "duration_s": duration,
                                                   "max_tokens": a.max_tokens, "slots": slots,
                                                   "plateau": {str(c): s for c, s in plateau.items()},
                                                   "head_of_line": hol, "hol_p50_ratio": hol_ratio}), indent=1))


if __name__ == "__main__":
    main()
