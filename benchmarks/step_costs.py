"""What one step costs: each target's decode (1 token) and verify (k+1 tokens) forward, and one
drafted token through the shared draft to each exit. Median of --reps runs after warm-up.

    python benchmarks/step_costs.py --config demo --context 200 --reps 50 [--dtype float32] [--device cuda]
"""
from __future__ import annotations

import argparse

import torch

from s2d.bench import median_ms
from s2d.config import load_config
from s2d.engine import load_draft, load_target


@torch.inference_mode()
def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="demo")
    ap.add_argument("--context", type=int, default=200, help="tokens already in the cache")
    ap.add_argument("--k", type=int, default=5, help="drafts verified per step")
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--dtype", default=None, help="run every model in this dtype instead of the config's")
    ap.add_argument("--device", default=None, help="put every model on this device (e.g. cuda)")
    a = ap.parse_args()
    cfg = load_config(a.config).on_device(a.device)
    if a.dtype:
        for spec in (cfg.draft, *cfg.targets):
            spec.dtype = a.dtype
    n = a.context
    print(f"context {n} tokens, median of {a.reps}, dtype {a.dtype or 'as configured'}, device {a.device or 'as configured'}\n\n| model | what | ms |\n|---|---|---|")
    for t in cfg.targets:
        m = load_target(cfg, t.name)
        m(torch.zeros(1, n, dtype=torch.long), m.batch([0], [0], [n]))
        for T, what in ((1, "decode 1 token"), (a.k + 1, f"verify {a.k} drafts")):
            ms = median_ms(lambda: m.logits(m.run_layers(m.embed(torch.zeros(1, T, dtype=torch.long)), m.batch([0], [n], [T]))), a.reps)
            print(f"| {t.name} | {what} | {ms:.2f} |")
    draft = load_draft(cfg)
    toks = [list(range(n + 1))]
    for s in range(len(draft.exits)):
        draft.run_segment(s, [0], toks, [n])

    def to_exit(depth):
        draft.fill[0] = [n] * len(draft.exits)  # the token at position n, from the cached state
        for s in range(depth):
            draft.run_segment(s, [0], toks, [n + 1])

    for i, e in enumerate(draft.exits):
        print(f"| draft | one token to exit {e} (with {i + 1} exit checks) | {median_ms(lambda: to_exit(i + 1), a.reps):.2f} |")


if __name__ == "__main__":
    main()
