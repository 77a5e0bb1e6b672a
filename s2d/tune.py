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

from s2d.bench import code_prompts, find_spec_bench, fits_context, spec_bench_prompts
from s2d.config import Profile, SamplingParams
from s2d.engine import Engine, Request

THRESHOLDS = [0.0, 0.3, 0.5, 0.7, 0.9, 1.01]  # 0: always exit here; 1.01: never
STOPS = [0.0, 0.1, 0.2, 0.4]
K_MAX = [2, 3, 4, 5, 6, 8]


def tokens_per_s(engine: Engine, target: str, prompts: list[str], max_tokens: int, mode: str = "s2d") -> float:
    toks, secs = 0, 0.0
    for i, p in enumerate(prompts):
        params = SamplingParams(max_tokens=max_tokens, seed=i, ignore_eos=True)
        t0 = time.perf_counter()
        toks += len(engine.generate([Request(target=target, prompt=p, params=params, mode=mode)])[0]["token_ids"])
        secs += time.perf_counter() - t0
    return toks / secs


def tune(engine: Engine, target: str, prompts: list[str], max_tokens: int = 48, passes: int = 2,
         log=print) -> tuple[Profile, dict]:
    n = len(engine.exits)

    def score(p: Profile) -> float:
        engine.set_profile(target, p)
        return tokens_per_s(engine, target, prompts, max_tokens)

    tokens_per_s(engine, target, prompts[:1], 16)  # warm-up
    ar = tokens_per_s(engine, target, prompts, max_tokens, mode="ar")
    best = Profile(thresholds=[0.5] * (n - 1) + [0.0])
    default_score = best_score = score(best)
    log(f"{target}: ar {ar:.1f} tok/s, paper default {best_score:.1f} tok/s")
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
                s = score(cand)
                if s > best_score:
                    best, best_score = cand, s
                    log(f"  {knob}={v}: {s:.1f} tok/s  <- best {best.model_dump()}")
    # re-measure the two contenders once more, so one lucky run does not decide
    final_default = score(Profile(thresholds=[0.5] * (n - 1) + [0.0]))
    final_best = score(best)
    report = {"target": target, "ar_tps": round(ar, 1), "default_tps": round((default_score + final_default) / 2, 1),
              "tuned_tps": round((best_score + final_best) / 2, 1), "profile": best.model_dump()}
    engine.set_profile(target, best)
    return best, report


def write_profile(config_path: Path, target: str, profile: Profile):
    data = yaml.safe_load(config_path.read_text())
    for t in data["targets"]:
        if t["name"] == target:
            t["profile"] = profile.model_dump()
    config_path.write_text(yaml.safe_dump(data, sort_keys=False))


def cmd_tune(a):
    from s2d.config import load_config
    from s2d.demo import DEMO_DIR, corpus_files

    path = DEMO_DIR / "demo.yaml" if a.config == "demo" else Path(a.config)
    cfg = load_config(path)
    engine = Engine.from_config(cfg)
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
        best, report = tune(engine, target, prompts, a.max_tokens)
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
    p.add_argument("--dry-run", action="store_true", help="report only, leave the config as it is")
    p.set_defaults(fn=cmd_tune)
