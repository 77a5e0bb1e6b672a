"""A short load on a served app through the official openai client, and the sums of the stats its
responses returned, per target: what a scrape's counters must have grown by (docs/bench/metrics.md).
36 completions: 6 code prompts x the demo family's 3 targets x temperature 0 and 1, 48 tokens
each, 8 at a time. Against `serve run serve_config.yaml` or `serve deploy serve_config.yaml`:

    python benchmarks/metrics_load.py [--url http://127.0.0.1:8000/v1]
"""
from __future__ import annotations

import argparse
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

from openai import OpenAI

PROMPTS = ["def fibonacci(n):", "import os", "class Parser:", "for line in open(path):", "The function returns",
           "x = [1, 2, 3]\n"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="http://127.0.0.1:8000/v1")
    ap.add_argument("--targets", default="demo-s,demo-m,demo-l")
    a = ap.parse_args()
    client = OpenAI(base_url=a.url, api_key="unused", max_retries=0)
    jobs = [(t, p, temp) for t in a.targets.split(",") for p in PROMPTS for temp in (0, 1)]

    def run(job):
        target, prompt, temp = job
        r = client.completions.create(model=target, prompt=prompt, max_tokens=48, temperature=temp, seed=1)
        return target, r.usage, r.model_extra["s2d_stats"]

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(run, jobs))
    totals: dict[str, Counter] = {}
    for target, usage, s in results:
        t = totals.setdefault(target, Counter())
        t["requests"] += 1
        t["drafted"] += s["drafted"]
        t["accepted"] += s["accepted"]
        t["drafts (rounds)"] += s["proposed_at"][0] if s["proposed_at"] else 0
        t["completion_tokens"] += usage.completion_tokens
        t["target_forwards"] += s["target_forwards"]
        for depth, n in s["exit_histogram"].items():
            t[f"exit {depth}"] += n
        for pos, n in enumerate(s["accepted_at"]):
            t[f"accepted at {pos}"] += n
    for target, t in totals.items():
        print(target, dict(sorted(t.items())))


if __name__ == "__main__":
    main()
