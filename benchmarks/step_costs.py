"""What one step costs: each target's forward of 1 to 16 tokens (a decode, a verify of k drafts at
k + 1), and one drafted token through the shared draft to each exit. Median of --reps runs after
warm-up, through the path serving takes: the static-shape forward (compiled at startup where
--static-forward is on/auto on CPU, uncompiled where eager) or the eager forward (off).

    python benchmarks/step_costs.py --config demo [--dtype float32|bfloat16] [--static-forward on|eager|off]
        [--context 200] [--reps 30] [--device cuda] [--targets demo-l]
"""
from __future__ import annotations

import argparse

import torch

import s2d.worker.graphs
from s2d.core.config import load_config
from s2d.core.engine import load_draft, load_target
from s2d.tools.bench import median_ms
from s2d.worker.model import pad_tokens

WIDTHS = (1, 2, 3, 4, 5, 6, 8, 12, 16)


def forward_ms(m, n: int, T: int, reps: int) -> float:
    """One row of T tokens at context n, with the LM head on its last token (as a decode or verify)."""
    rows = [[1] * T]
    if m.static is not None:
        step = lambda: m.static.run([0], [n], [T], pad_tokens(rows, m.device))[:, -1]  # noqa: E731
    else:
        step = lambda: m.logits(m.run_layers(m.embed(pad_tokens(rows, m.device)), m.batch([0], [n], [T]))[:, -1])  # noqa: E731
    return median_ms(step, reps)


@torch.inference_mode()
def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="demo")
    ap.add_argument("--context", type=int, default=200, help="tokens already in the cache")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--dtype", default=None, help="run every model in this dtype instead of the config's")
    ap.add_argument("--static-forward", default=None, help="auto | on | eager | off instead of the config's")
    ap.add_argument("--device", default=None, help="put every model on this device (e.g. cuda)")
    ap.add_argument("--targets", nargs="*", default=None, help="only these targets (default: all)")
    a = ap.parse_args()
    cfg = load_config(a.config).with_models(a.dtype, a.static_forward).on_device(a.device)
    n = a.context
    print(f"context {n} tokens, median of {a.reps}, dtype {a.dtype or 'as configured'}, static_forward "
          f"{a.static_forward or 'as configured'}, device {a.device or 'as configured'}\n")
    print("| target | " + " | ".join(f"{T} tok" for T in WIDTHS) + " | verify of 6 / decode |")
    print("|---" * (len(WIDTHS) + 2) + "|")
    for t in cfg.targets:
        if a.targets is not None and t.name not in a.targets:
            continue
        m = load_target(cfg, t.name)
        m(torch.zeros(1, n, dtype=torch.long), m.batch([0], [0], [n]))
        ms = {T: forward_ms(m, n, T, a.reps) for T in WIDTHS}
        print(f"| {t.name} | " + " | ".join(f"{ms[T]:.2f}" for T in WIDTHS) + f" | {ms[6] / ms[1]:.2f} |", flush=True)
        del m
    draft = load_draft(cfg)
    toks = [list(range(n + 1))]
    for s in range(len(draft.exits)):
        draft.run_segment(s, [0], toks, [n])

    def to_exit(depth):
        draft.fill[0] = [n] * len(draft.exits)  # the token at position n, from the cached state
        for s in range(depth):
            draft.run_segment(s, [0], toks, [n + 1])

    print("\n| draft: one token to exit | ms |\n|---|---|")
    for i, e in enumerate(draft.exits):
        print(f"| {e} ({i + 1} segments and exit heads) | {median_ms(lambda: to_exit(i + 1), a.reps):.2f} |")
    print(f"\npackages compiled in all: {s2d.worker.graphs.compilations}, loaded: {s2d.worker.graphs.loaded}")


if __name__ == "__main__":
    main()
