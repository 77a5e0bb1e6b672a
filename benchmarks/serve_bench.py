"""Tokens/s at concurrency 1, 8 and 32: the in-process engine against the same config served by
Ray Serve and called over gRPC on 127.0.0.1. A benchmark, not a test.

    python benchmarks/serve_bench.py --config demo --target demo-l --requests 32 --max-tokens 32
"""
from __future__ import annotations

import argparse
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from deployments.local import serve_locally, shutdown
from s2d.bench import code_prompts, heldout_code
from s2d.client import S2DClient
from s2d.config import SamplingParams, load_config
from s2d.engine import Engine, Request


def in_process(engine: Engine, target, prompts, concurrency, max_tokens, mode) -> float:
    """Continuous batching with at most `concurrency` requests live."""
    queue = list(prompts)
    live, tokens, t0 = set(), 0, time.perf_counter()
    while queue or live:
        while queue and len(live) < concurrency:
            live.add(engine.add_request(Request(target=target, prompt=queue.pop(),
                                                params=SamplingParams(max_tokens=max_tokens, ignore_eos=True), mode=mode)))
        for d in engine.step():
            tokens += len(d.token_ids)
            if d.finished:
                live.discard(d.seq_id)
    return tokens / (time.perf_counter() - t0)


def over_grpc(client, target, prompts, concurrency, max_tokens, mode) -> float:
    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        rs = list(pool.map(lambda p: client.generate(target, p, max_tokens=max_tokens, mode=mode), prompts))
    return sum(len(r.token_ids) for r in rs) / (time.perf_counter() - t0)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="demo")
    ap.add_argument("--target", default="demo-l")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--mode", default="s2d")
    ap.add_argument("--concurrency", default="1,8,32")
    a = ap.parse_args()
    cfg = load_config(a.config)
    prompts = heldout_code(Path(cfg.base_dir), a.requests) or code_prompts([Path(__file__)], a.requests)
    prompts = (prompts * a.requests)[: a.requests]
    levels = [int(c) for c in a.concurrency.split(",")]

    engine = Engine.from_config(cfg)
    in_process(engine, a.target, prompts[:2], 2, 8, a.mode)  # warm-up
    local = {c: in_process(engine, a.target, prompts, c, a.max_tokens, a.mode) for c in levels}
    del engine

    client = S2DClient(serve_locally(a.config), timeout=600)
    over_grpc(client, a.target, prompts[:2], 2, 8, a.mode)  # warm-up
    remote = {c: over_grpc(client, a.target, prompts, c, a.max_tokens, a.mode) for c in levels}
    shutdown()

    print(f"\n{a.mode}, {a.target}, {a.requests} requests x {a.max_tokens} tokens, greedy\n")
    print("| concurrency | in-process tok/s | gRPC via Ray Serve tok/s |\n|---|---|---|")
    for c in levels:
        print(f"| {c} | {local[c]:.1f} | {remote[c]:.1f} |")


if __name__ == "__main__":
    main()
