"""`s2d tune`: find the exit thresholds, stop threshold and k_max that maximise measured tokens/s
for one target (coordinate search from the paper's default), on calibration prompts disjoint from
the bench's: code cut from training files (not the held-out ones) and Spec-Bench's calibration
split (every fourth question), and write the profile into the config."""
from __future__ import annotations

import json
import sysconfig
import time
from pathlib import Path

import yaml

from s2d.core.config import Profile, SamplingParams
from s2d.core.engine import Engine, Request
from s2d.tools.bench import code_prompts, find_spec_bench, fits_context, spec_bench_prompts

THRESHOLDS = [0.0, 0.3, 0.5, 0.7, 0.9, 1.01]  # 0: always exit here; 1.01: never
STOPS = [0.0, 0.1, 0.2, 0.4]
K_MAX = [2, 3, 4, 5, 6, 8]


def run_seconds(engine: Engine, target: str, prompt: str, max_tokens: int, seed: int,
                how: Profile | str = "s2d") -> tuple[int, float]:
    """Tokens and seconds of one greedy generation: `how` is a mode, or a profile to run s2d with."""
    params = SamplingParams(max_tokens=max_tokens, seed=seed, ignore_eos=True)
    mode = how if isinstance(how, str) else "s2d"
    if isinstance(how, Profile):
        engine.set_profile(target, how)
    t0 = time.perf_counter()
    n = len(engine.generate([Request(target=target, prompt=prompt, params=params, mode=mode)])[0]["token_ids"])
    return n, time.perf_counter() - t0


def interleaved(engine: Engine, target: str, prompts: list[str], max_tokens: int,
                hows: dict[str, Profile | str]) -> dict[str, tuple[int, float]]:
    """Tokens and seconds of each way to run, summed over the prompts. Each prompt runs every way
    back to back, in alternating order, so a slow drift or a busy spell of the machine hits all alike."""
    out = {name: (0, 0.0) for name in hows}
    for i, p in enumerate(prompts):
        for name in list(hows)[:: 1 if i % 2 == 0 else -1]:
            n, dt = run_seconds(engine, target, p, max_tokens, i, hows[name])
            out[name] = (out[name][0] + n, out[name][1] + dt)
    return out


def paired_speedup(engine: Engine, target: str, prompts: list[str], max_tokens: int, a: Profile | str,
                   b: Profile | str) -> float:
    """Time of b over time of a (> 1: a is faster), measured interleaved."""
    r = interleaved(engine, target, prompts, max_tokens, {"a": a, "b": b})
    return r["b"][1] / r["a"][1]


def tune(engine: Engine, target: str, prompts: list[str], max_tokens: int = 48, passes: int = 2,
         margin: float = 1.02, log=print) -> tuple[Profile, dict]:
    """Coordinate search from the paper's default. A candidate replaces the best only if it is
    faster by `margin` in a paired run, so measurement noise does not walk the search."""
    n = len(engine.exits)
    default = Profile(thresholds=[0.5] * (n - 1) + [0.0])
    run_seconds(engine, target, prompts[0], 16, 0)  # warm-up
    best = default
    # the fixed exits are profiles too (threshold 0 at the exit): start from the fastest of them all
    for e in range(n):
        fixed = Profile(thresholds=[1.01] * e + [0.0] * (n - e))
        if (r := paired_speedup(engine, target, prompts, max_tokens, fixed, best)) > margin:
            best = fixed
            log(f"  start at exit {engine.exits[e]}: x{r:.2f}")
    for _ in range(passes):
        for knob in [*range(n - 1), "stop", "k_max"]:
            values = STOPS if knob == "stop" else K_MAX if knob == "k_max" else THRESHOLDS
            for v in values:
                cand = best.model_copy(deep=True)
                if knob == "stop":
                    cand.stop_threshold = v
                elif knob == "k_max":
                    cand.k_max = v
                else:
                    cand.thresholds[knob] = v
                if cand == best:
                    continue
                if (r := paired_speedup(engine, target, prompts, max_tokens, cand, best)) > margin:
                    best = cand
                    log(f"  {knob}={v}: x{r:.2f}  <- best {best.model_dump()}")
    # the report: tokens/s of ar, the paper's default and the tuned profile, measured interleaved
    r = interleaved(engine, target, prompts, max_tokens, {"ar": "ar", "default": default, "tuned": best})
    tps = {k: round(n / secs, 1) for k, (n, secs) in r.items()}
    report = {"target": target, "ar_tps": tps["ar"], "default_tps": tps["default"], "tuned_tps": tps["tuned"],
              "profile": best.model_dump()}
    log(f"{target}: ar {tps['ar']} tok/s, paper default {tps['default']}, tuned {tps['tuned']}")
    engine.set_profile(target, best)
    return best, report


def write_profile(config_path: Path, target: str, profile: Profile):
    data = yaml.safe_load(config_path.read_text())
    for t in data["targets"]:
        if t["name"] == target:
            t["profile"] = profile.model_dump()
    config_path.write_text(yaml.safe_dump(data, sort_keys=False))


def cmd_tune(a):
    from s2d.core.config import load_config
    from s2d.train.demo import DEMO_DIR, corpus_files

    path = DEMO_DIR / "demo.yaml" if a.config == "demo" else Path(a.config)
    cfg = load_config(path)
    cfg.scheduling.draft_policy = "static"  # each candidate profile runs as written: the policy would move it
    engine = Engine.from_config(cfg.on_device(a.device))
    root = Path(sysconfig.get_paths()["stdlib"])
    listing = Path(cfg.base_dir) / "heldout_files.txt"
    held = set(listing.read_text().split()) if listing.exists() else set()
    files = [f for f in corpus_files(root) if f.relative_to(root).as_posix() not in held][::7]
    prompts = code_prompts(files, a.prompts, seed=123)
    sb = find_spec_bench()
    if sb:  # English prompts too, one per task, from the split the bench leaves out
        fits = fits_context(engine, cfg.targets[0].name, a.max_tokens)
        prompts += [q for qs in spec_bench_prompts(sb, 1, fits, seed=123, calibration=True).values() for q in qs]
    reports = []
    for target in a.target or [t.name for t in cfg.targets]:
        best, report = tune(engine, target, prompts, a.max_tokens, a.passes)
        reports.append(report)
        if not a.dry_run:
            write_profile(path, target, best)
    print(json.dumps(reports, indent=1))


def add_cli(sub):
    p = sub.add_parser("tune", help="search a target's profile for the most tokens/s; writes it into the config")
    p.add_argument("--config", default="demo")
    p.add_argument("--target", action="append")
    p.add_argument("--prompts", type=int, default=6)
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--passes", type=int, default=2, help="rounds of the coordinate search")
    p.add_argument("--dry-run", action="store_true", help="report only, leave the config as it is")
    p.add_argument("--device", default=None,
                   help="tune for this device (e.g. cuda): the best profile differs per device")
    p.set_defaults(fn=cmd_tune)
