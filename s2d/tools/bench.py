"""`s2d bench`: S2D against plain decoding (`ar`) and every fixed exit, per target and task, greedy
and sampled. Speedup is against `ar` of the same engine, same prompts, same run; the method order
rotates per prompt so slow drift of the machine does not favour one method."""
from __future__ import annotations

import json
import random
import statistics
import sysconfig
import time
from collections import defaultdict
from pathlib import Path

import torch

from s2d.core.config import SamplingParams
from s2d.core.engine import Engine, Request
from s2d.core.stats import SpecStats

SPEC_BENCH_TASKS = {"mt_bench": ["writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem",
                                 "humanities"],
                    "translation": ["translation"], "summarization": ["summarization"], "qa": ["qa"],
                    "math_reasoning": ["math_reasoning"], "rag": ["rag"]}


def find_spec_bench() -> Path | None:
    for base in (Path.cwd(), Path(__file__).resolve().parents[1]):
        for up in (base, *base.parents):
            p = up / "shared" / "data" / "spec_bench" / "question.jsonl"
            if p.exists():
                return p
    return None


def is_calibration(question: dict) -> bool:
    """Every fourth Spec-Bench question is kept for `s2d tune`; the bench never uses it."""
    return int(question["question_id"]) % 4 == 0


def spec_bench_prompts(path: Path, per_task: int, fits=lambda q: True, seed: int = 0,
                       calibration: bool = False) -> dict[str, list[str]]:
    """First turns of Spec-Bench questions, per task, from the bench split (or the calibration
    split); `fits` drops those too long for the context."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if is_calibration(r) == calibration]
    rng = random.Random(seed)
    out = {}
    for task, cats in SPEC_BENCH_TASKS.items():
        qs = [r["turns"][0] for r in rows if r["category"] in cats and fits(r["turns"][0])]
        if qs:  # a task whose every question is too long for this context is left out
            out[task] = rng.sample(qs, min(per_task, len(qs)))
    return out


def fits_context(engine: Engine, target: str, max_tokens: int):
    """Whether a prompt leaves room for max_tokens in the target's context and prompt limit."""
    front = engine.frontends[target]
    limit = min(engine.cfg.limits.max_prompt_tokens, front.context - max_tokens - 8)
    return lambda q: len(front.tokenizer(q)["input_ids"]) <= limit


def code_prompts(files: list[Path], n: int, chars: int = 400, seed: int = 0) -> list[str]:
    """Code completion: the text up to and including a `def` line of held-out source files."""
    rng = random.Random(seed)
    cuts = []
    for f in files:
        text = f.read_text(errors="ignore")
        for line_start in _line_starts(text):
            if text.startswith("    def ", line_start) or text.startswith("def ", line_start):
                end = text.find("\n", line_start) + 1
                cuts.append(text[max(0, end - chars): end])
    return rng.sample(cuts, min(n, len(cuts)))


def _line_starts(text: str):
    yield 0
    i = text.find("\n")
    while i >= 0:
        yield i + 1
        i = text.find("\n", i + 1)


def heldout_files(cfg_dir: Path) -> list[Path]:
    """The stdlib files a config's family was not trained on (its heldout_files.txt), where present."""
    listing = cfg_dir / "heldout_files.txt"
    if not listing.exists():
        return []
    root = Path(sysconfig.get_paths()["stdlib"])
    return [root / name for name in listing.read_text().split() if (root / name).exists()]


def heldout_code(cfg_dir: Path, n: int) -> list[str]:
    return code_prompts(heldout_files(cfg_dir), n)


def run_bench(engine: Engine, targets: list[str], modes: list[str], temperatures: list[float],
              tasks: dict[str, list[str]], max_tokens: int, warmup: int = 2, progress: bool = True) -> list[dict]:
    """One row per (target, temperature, task, mode): tokens/s, MAT and the speculation stats."""
    from tqdm import tqdm

    total = len(targets) * len(temperatures) * sum(map(len, tasks.values())) * len(modes)
    bar = tqdm(total=total, disable=not progress, desc="bench", unit="gen")
    rows = []
    for target in targets:
        first = next(iter(tasks.values()))[0]
        for mode in modes:  # warm-up: caches, allocator, threads
            for _ in range(warmup):
                engine.generate([Request(target=target, prompt=first, params=SamplingParams(max_tokens=16), mode=mode)])
        for temp in temperatures:
            for task, prompts in tasks.items():
                acc = {m: [SpecStats(), 0, 0.0] for m in modes}
                for i, prompt in enumerate(prompts):
                    order = modes[i % len(modes):] + modes[: i % len(modes)]
                    for mode in order:
                        params = SamplingParams(temperature=temp, max_tokens=max_tokens, seed=i, ignore_eos=True)
                        t0 = time.perf_counter()
                        res = engine.generate([Request(target=target, prompt=prompt, params=params, mode=mode)])[0]
                        dt = time.perf_counter() - t0
                        a = acc[mode]
                        a[0] = a[0].merge(SpecStats.from_dict(res["stats"]))
                        a[1] += len(res["token_ids"])
                        a[2] += dt
                        bar.update(1)
                ar_tps = acc["ar"][1] / acc["ar"][2]
                for mode, (stats, toks, secs) in acc.items():
                    d = stats.to_dict()
                    rows.append({"target": target, "temperature": temp, "task": task, "mode": mode,
                                 "prompts": len(prompts), "tokens": toks, "seconds": round(secs, 3),
                                 "tokens_per_s": round(toks / secs, 2),
                                 "speedup": round(toks / secs / ar_tps, 3), "mat": d["mat"],
                                 "target_forwards": d["target_forwards"],
                                 "acceptance_per_position": d["acceptance_per_position"],
                                 "exit_histogram": d["exit_histogram"]})
    bar.close()
    return rows


def overall(rows: list[dict]) -> list[dict]:
    """Rows summed over tasks, per target, temperature and mode."""
    groups = defaultdict(list)
    for r in rows:
        groups[r["target"], r["temperature"], r["mode"]].append(r)
    out = []
    for (target, temp, mode), rs in groups.items():
        toks, secs = sum(r["tokens"] for r in rs), sum(r["seconds"] for r in rs)
        ar = groups[target, temp, "ar"]
        ar_tps = sum(r["tokens"] for r in ar) / sum(r["seconds"] for r in ar)
        forwards = sum(r["target_forwards"] for r in rs)
        exits = defaultdict(int)
        for r in rs:
            for k, v in r["exit_histogram"].items():
                exits[k] += v
        out.append({"target": target, "temperature": temp, "mode": mode, "tokens_per_s": round(toks / secs, 2),
                    "speedup": round(toks / secs / ar_tps, 3), "mat": round(toks / forwards, 3) if forwards else 0.0,
                    "exit_histogram": dict(sorted(exits.items()))})
    return out


def markdown(rows: list[dict], summary: list[dict]) -> str:
    lines = ["## Overall (all tasks)", "", "| target | T | method | tok/s | speedup | MAT | exits |",
             "|---|---|---|---|---|---|---|"]
    for r in summary:
        lines.append(f"| {r['target']} | {r['temperature']} | {r['mode']} | {r['tokens_per_s']:.1f} | "
                     f"{r['speedup']:.2f}x | {r['mat']:.2f} | {r['exit_histogram']} |")
    lines += ["", "## Per task (speedup / MAT)", ""]
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    lines += ["| target | T | method | " + " | ".join(tasks) + " |", "|---" * (3 + len(tasks)) + "|"]
    keyed = {(r["target"], r["temperature"], r["mode"], r["task"]): r for r in rows}
    for s in summary:
        cells = [f"{keyed[s['target'], s['temperature'], s['mode'], t]['speedup']:.2f}x / "
                 f"{keyed[s['target'], s['temperature'], s['mode'], t]['mat']:.2f}" for t in tasks]
        lines.append(f"| {s['target']} | {s['temperature']} | {s['mode']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plots(summary: list[dict], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    temps = sorted({r["temperature"] for r in summary})
    targets = list(dict.fromkeys(r["target"] for r in summary))
    modes = list(dict.fromkeys(r["mode"] for r in summary))
    fig, axes = plt.subplots(1, len(temps), figsize=(6 * len(temps), 4), squeeze=False)
    for ax, temp in zip(axes[0], temps):
        w = 0.8 / len(modes)
        for j, mode in enumerate(modes):
            ys = [next(r["speedup"] for r in summary
                       if r["target"] == t and r["mode"] == mode and r["temperature"] == temp)
                  for t in targets]
            ax.bar([i + j * w for i in range(len(targets))], ys, w, label=mode)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xticks([i + 0.4 - w / 2 for i in range(len(targets))], targets)
        ax.set_title(f"speedup over ar, T={temp}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "speedup.png", dpi=100)
    paths.append(str(out / "speedup.png"))
    fig, axes = plt.subplots(1, len(targets), figsize=(4 * len(targets), 3.5), squeeze=False)
    for ax, t in zip(axes[0], targets):
        hist = next((r["exit_histogram"] for r in summary if r["target"] == t and r["mode"] == "s2d"), {})
        ax.bar(list(hist), list(hist.values()))
        ax.set_title(f"{t}: s2d exit histogram")
        ax.set_xlabel("exit depth (layers)")
    fig.tight_layout()
    fig.savefig(out / "exits.png", dpi=100)
    paths.append(str(out / "exits.png"))
    plt.close("all")
    return paths


def cmd_bench(a):
    from s2d.core.config import Profile, load_config

    cfg = load_config(a.config).with_models(a.dtype, a.static_forward).on_device(a.device)
    engine = Engine.from_config(cfg)
    if a.paper_profile:
        for t in cfg.targets:
            engine.set_profile(t.name, Profile())
    targets = a.target or [t.name for t in cfg.targets]
    modes = ["ar"] + [m for m in (a.modes.split(",") if a.modes else [f"fixed:{e}" for e in engine.exits] + ["s2d"])
                      if m != "ar"]
    per_task, code_n, max_tokens = (1, 2, 32) if a.quick else (a.prompts, a.prompts, a.max_tokens)
    tasks = {}
    sb = Path(a.spec_bench) if a.spec_bench else find_spec_bench()
    if sb and sb.exists():
        tasks.update(spec_bench_prompts(sb, per_task, fits_context(engine, targets[0], max_tokens)))
    code = heldout_code(Path(cfg.base_dir or "."), code_n)
    if code:
        tasks["code"] = code
    if not tasks:
        raise SystemExit("no prompts: give --spec-bench PATH (Spec-Bench question.jsonl) "
                         "or a config with heldout_files.txt")
    temps = [float(t) for t in a.temperatures.split(",")]
    rows = run_bench(engine, targets, modes, temps, tasks, max_tokens)
    summary = overall(rows)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps({"rows": rows, "overall": summary, "max_tokens": max_tokens,
                                                "prompts_per_task": {k: len(v) for k, v in tasks.items()}}, indent=1))
    md = markdown(rows, summary)
    (out / "bench.md").write_text(md)
    print(md)
    print("plots:", ", ".join(plots(summary, out)))


def add_cli(sub):
    p = sub.add_parser("bench", help="S2D vs ar vs fixed exits per target and task (Spec-Bench + held-out code)")
    p.add_argument("--config", default="demo")
    p.add_argument("--target", action="append", help="target(s) to bench (default: all)")
    p.add_argument("--modes", default=None, help="comma-separated, default: every fixed:E and s2d (ar always runs)")
    p.add_argument("--temperatures", default="0,1")
    p.add_argument("--prompts", type=int, default=4, help="prompts per task")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--spec-bench", default=None, help="path of Spec-Bench's question.jsonl")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None, help="every model in this dtype instead of the config's")
    p.add_argument("--static-forward", default=None, help="auto | on | eager | off instead of the config's")
    p.add_argument("--paper-profile", action="store_true", help="use the paper's thresholds (0.5, 0.5, 0) for all")
    p.add_argument("--quick", action="store_true", help="1 prompt per task, 32 tokens")
    p.add_argument("--out", default="runs/bench")
    p.set_defaults(fn=cmd_bench)


def median_ms(fn, reps: int = 30, before=None) -> float:
    """Median milliseconds of `fn()` after a warm-up, synced on a GPU (its work is asynchronous);
    `before()`, where given, runs untimed ahead of each timed call."""
    sync = torch.cuda.synchronize if torch.cuda.is_initialized() else (lambda: None)
    for _ in range(5):
        fn()
    times = []
    for _ in range(reps):
        if before:
            before()
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)
