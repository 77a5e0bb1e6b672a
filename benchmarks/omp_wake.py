"""What a paused OpenMP worker costs a step: demo-l's compiled bf16 step (a verify of 4, a decode)
back to back, after a 1 ms sleep and after 1 ms of Python, and one drafted token, in whatever
OpenMP setting the environment gives.
Median of 100, ms. Compiles demo-l and the draft first (minutes).

    GOMP_SPINCOUNT=300000 python benchmarks/omp_wake.py     # libgomp's default
    GOMP_SPINCOUNT=3000000 python benchmarks/omp_wake.py    # ten times the spin
    OMP_WAIT_POLICY=ACTIVE python benchmarks/omp_wake.py
"""
from __future__ import annotations

import os
import time

import torch

from s2d.core.config import load_config
from s2d.core.engine import load_draft, load_target
from s2d.tools.bench import median_ms
from s2d.worker.model import pad_tokens

N = 200  # tokens in the cache
REPS = 100


def python_for(ms: float):
    t, junk = time.perf_counter(), []
    while time.perf_counter() - t < ms / 1000:
        junk.append([1] * 10)


@torch.inference_mode()
def main():
    cfg = load_config("demo").with_models("bfloat16", "on")
    m = load_target(cfg, "demo-l")
    m(torch.zeros(1, N, dtype=torch.long), m.batch([0], [0], [N]))
    draft = load_draft(cfg)
    toks = [list(range(N + 1))]
    for s in range(len(draft.exits)):
        draft.run_segment(s, [0], toks, [N])

    def drafted():
        draft.fill[0] = [N] * len(draft.exits)
        _, conf, top = draft.run_segment(0, [0], toks, [N + 1])
        torch.stack((conf, top.float())).tolist()

    def step(T):
        return lambda: m.static.run([0], [N], [T], pad_tokens([[1] * T], "cpu"))[0].argmax(-1).tolist()

    print(f"GOMP_SPINCOUNT={os.environ.get('GOMP_SPINCOUNT')} OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')} "
          f"threads={torch.get_num_threads()}\n")
    print("| verify of 4, back to back | after a 1 ms sleep | after 1 ms of Python | decode | one drafted token |")
    print("|---|---|---|---|---|")
    print(f"| {median_ms(step(4), REPS):.2f} | {median_ms(step(4), REPS, lambda: time.sleep(0.001)):.2f} | "
          f"{median_ms(step(4), REPS, lambda: python_for(1)):.2f} | {median_ms(step(1), REPS):.2f} | "
          f"{median_ms(drafted, REPS):.2f} |")


if __name__ == "__main__":
    main()
