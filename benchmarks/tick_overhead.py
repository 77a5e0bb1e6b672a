"""The engine's own time per tick (scheduling, syncing tokens with the workers, batch building,
rejection, detokenization: Breakdown's engine share) at 32 sequences with long contexts, where
whole-list work per tick shows. A tiny random model (2 layers x 64, built here in a temp dir) keeps
the forwards short, so the engine's part is what is measured.

    python benchmarks/tick_overhead.py [--contexts 1024 4096] [--seqs 32] [--tokens 32]

Prints, per context and mode, over the decoding ticks (after every prompt is in): ticks, ms per
tick, and the engine's ms per tick and share.
"""
from __future__ import annotations

import argparse
import logging
import sysconfig
import tempfile
from pathlib import Path

import torch

from s2d.core.config import EngineConfig, SamplingParams
from s2d.core.engine import Engine, Request
from s2d.core.stats import Breakdown
from s2d.train.tiny import llama_config, save_random_model, train_tokenizer
from s2d.worker.draft import make_draft


def build(d: Path) -> dict[str, Path]:
    texts = [p.read_text(errors="ignore") for p in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("json/*.py"))]
    train_tokenizer(texts, 512, d / "tok")
    save_random_model(llama_config(512, 2, 64, max_pos=8192), d / "target", 0, d / "tok", init_std=0.1)
    make_draft(d / "target", 2, [1, 2], d / "draft")
    return {"target": d / "target", "draft": d / "draft", "tok": d / "tok"}


def config(paths: dict[str, Path], seqs: int, context: int) -> EngineConfig:
    spec = {"max_seqs": seqs, "max_seq_len": context + 128, "dtype": "float32", "static_forward": "off"}
    return EngineConfig.model_validate({"draft": {"path": str(paths["draft"]), **spec},
                                        "targets": [{"name": "t", "path": str(paths["target"]), **spec}],
                                        "limits": {"max_prompt_tokens": context + 64, "max_new_tokens": 256,
                                                   "max_request_bytes": 1 << 20}})


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096])
    ap.add_argument("--seqs", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=32)
    a = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(2)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        paths = build(Path(tmp))
        for context in a.contexts:
            eng = Engine.from_config(config(paths, a.seqs, context))
            tok = eng.frontends["t"].tokenizer
            files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:40]
            text = " ".join(p.read_text(errors="ignore") for p in files)
            ids = tok(text)["input_ids"]
            prompts = [tok.decode(ids[i * 50:i * 50 + context]) for i in range(a.seqs)]
            for mode in ("ar", "s2d"):
                params = SamplingParams(temperature=0.0, max_tokens=a.tokens, ignore_eos=True)
                reqs = [Request(target="t", prompt=p, params=params, mode=mode, raw=True) for p in prompts]
                eng.generate(reqs[:2])  # warm-up
                seqs = [eng.scheduler.add(r) for r in reqs]
                while any(not s.out for s in seqs):  # the prompts, in chunks: not what is measured
                    eng.step()
                eng.scheduler.breakdown = Breakdown()
                while any(not s.finished for s in seqs):
                    eng.step()
                b = eng.scheduler.breakdown.to_dict()
                rows.append((context, mode, b))
    print(f"\n{a.seqs} sequences, {a.tokens} new tokens each, tiny model (2 x 64), fp32 eager, 2 threads:\n")
    print("| context | mode | ticks | ms per tick | engine ms per tick | engine share |")
    print("|---|---|---|---|---|---|")
    for context, mode, b in rows:
        print(f"| {context} | {mode} | {b['ticks']} | {b['ms_per_tick']} | {b['engine_ms']} "
              f"| {b['engine_share']:.0%} |")


if __name__ == "__main__":
    main()
