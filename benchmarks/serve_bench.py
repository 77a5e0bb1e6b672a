"""Served against in-process, in one run: tokens/s of the in-process engine and of the same config
served by Ray Serve (one cell, gRPC on 127.0.0.1) over each cell transport (compiled graph with
pipelining off and on, plain actor calls, models in the cell's process), for demo-l alone and the
three targets mixed, modes ar and s2d, at several concurrencies; plus the draft's and the targets'
busy fractions in the cell. `--protocols grpc,http` also sends the same requests through the
OpenAI HTTP API (the official client), for what the HTTP ingress costs against gRPC. A benchmark,
not a test.

    python benchmarks/serve_bench.py --config demo [--max-tokens 32] [--concurrency 1,8,32]
        [--protocols grpc,http] [--out runs/serve]
"""
from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

from deployments.local import deploy, free_port, serve_locally, shutdown
from s2d.api.client import S2DClient
from s2d.core.config import SamplingParams, load_config
from s2d.core.engine import Engine, Request
from s2d.tools.bench import code_prompts, heldout_code

WORKLOADS = {"demo-l": ["demo-l"], "mixed": ["demo-s", "demo-m", "demo-l"]}


def jobs(prompts: list[str], targets: list[str], n: int) -> list[tuple[str, str]]:
    return [(targets[i % len(targets)], prompts[i % len(prompts)]) for i in range(n)]


def in_process(engine: Engine, work, concurrency: int, max_tokens: int, mode: str) -> float:
    """Continuous batching with at most `concurrency` requests live."""
    queue = list(work)
    live, tokens, t0 = set(), 0, time.perf_counter()
    while queue or live:
        while queue and len(live) < concurrency:
            target, prompt = queue.pop()
            live.add(engine.add_request(Request(target=target, prompt=prompt, mode=mode,
                                                params=SamplingParams(max_tokens=max_tokens, ignore_eos=True))))
        for d in engine.step():
            tokens += len(d.token_ids)
            if d.finished:
                live.discard(d.seq_id)
    return tokens / (time.perf_counter() - t0)


def served(send, work, concurrency: int) -> float:
    """`concurrency` clients, each sending its requests one after another; `send((target, prompt))`
    answers the tokens one request got."""
    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        tokens = sum(pool.map(send, work))
    return tokens / (time.perf_counter() - t0)


def sender(protocol: str, address: str, http_port: int):
    """A client of the served app and its send(job, max_tokens, mode) -> tokens: gRPC, or the
    OpenAI API (greedy completions of raw prompts, as the gRPC requests are)."""
    if protocol == "grpc":
        client = S2DClient(address, timeout=600)
        return client, lambda job, n, mode: len(client.generate(*job, max_tokens=n, mode=mode).token_ids)
    from openai import OpenAI

    client = OpenAI(base_url=f"http://127.0.0.1:{http_port}/v1", api_key="unused", timeout=600, max_retries=0)
    return client, lambda job, n, mode: client.completions.create(
        model=job[0], prompt=job[1], max_tokens=n, temperature=0, extra_body={"mode": mode}).usage.completion_tokens


def column(transport: str, protocol: str) -> str:
    return transport if protocol == "grpc" else f"{transport} http"


def cell_stats() -> dict:
    from ray import serve

    return serve.get_app_handle("s2d").cell_stats.remote().result()["main"]


def reset_cell_stats():
    from ray import serve

    serve.get_deployment_handle("cell-main", "s2d").reset_stats.remote().result()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="demo")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--modes", default="ar,s2d")
    ap.add_argument("--workloads", default="demo-l,mixed")
    ap.add_argument("--served", default="compiled_graph,compiled_graph+pipeline,in_process",
                    help="cell transports to serve with (compiled_graph | actor_calls | in_process, +pipeline)")
    ap.add_argument("--protocols", default="grpc", help="grpc and/or http (the OpenAI API)")
    ap.add_argument("--out", default=None, help="folder for results.json and results.md")
    a = ap.parse_args()
    cfg = load_config(a.config)
    levels = [int(c) for c in a.concurrency.split(",")]
    modes, workloads = a.modes.split(","), a.workloads.split(",")
    prompts = heldout_code(Path(cfg.base_dir), 64) or code_prompts([Path(__file__)], 64)
    n_of = {c: max(8, 2 * c) for c in levels}  # requests per run
    cases = [(w, m, c) for w in workloads for m in modes for c in levels]
    rows = {case: {} for case in cases}

    engine = Engine.from_config(cfg)
    in_process(engine, jobs(prompts, WORKLOADS[workloads[0]], 2), 2, 8, "s2d")  # warm-up
    for w, m, c in cases:
        rows[w, m, c]["in-process"] = in_process(engine, jobs(prompts, WORKLOADS[w], n_of[c]), c, a.max_tokens, m)
        print(w, m, c, "in-process", round(rows[w, m, c]["in-process"], 1), flush=True)
    del engine

    address, http_port = None, free_port()
    protocols = a.protocols.split(",")
    transports = a.served.split(",")
    variants = [column(t, p) for t in transports for p in protocols]
    for cell_variant in transports:
        transport, _, pipeline = cell_variant.partition("+")
        data = cfg.model_dump()
        for cell in data["cells"]:
            cell["pipeline"], cell["transport"] = bool(pipeline), transport
        path = Path(f"/tmp/s2d-serve-bench-{cell_variant}.yaml")
        path.write_text(yaml.safe_dump(data))
        if address is None:
            address = serve_locally(str(path), http_port=http_port)
        else:
            deploy(str(path))
        for protocol in protocols:
            variant = column(cell_variant, protocol)
            client, send = sender(protocol, address, http_port)
            served(lambda job: send(job, 8, "s2d"), jobs(prompts, WORKLOADS[workloads[0]], 2), 2)  # warm-up
            for w, m, c in cases:
                reset_cell_stats()
                rows[w, m, c][variant] = served(lambda job: send(job, a.max_tokens, m),
                                                jobs(prompts, WORKLOADS[w], n_of[c]), c)
                rows[w, m, c][variant + " busy"] = cell_stats()["busy_fraction"]
                print(w, m, c, variant, round(rows[w, m, c][variant], 1), rows[w, m, c][variant + " busy"], flush=True)
            client.close()
    shutdown()

    md = [f"{a.max_tokens} new tokens per request, greedy, held-out code prompts; requests per run: "
          f"{', '.join(f'{n_of[c]} at concurrency {c}' for c in levels)}. Each served column: tok/s "
          "(served / in-process).\n",
          "| workload | mode | concurrency | in-process tok/s | " + " | ".join(variants) + " |",
          "|---|---|---|---|" + "---|" * len(variants)]
    for (w, m, c), r in rows.items():
        ip = r["in-process"]
        md.append(f"| {w} | {m} | {c} | {ip:.1f} | "
                  + " | ".join(f"{r[v]:.1f} ({r[v] / ip:.2f})" for v in variants) + " |")
    md += ["", "Busy fractions of the draft and the targets (time in ticks / wall time):\n",
           "| workload | mode | concurrency | " + " | ".join(variants) + " |", "|---|---|---|" + "---|" * len(variants)]
    for (w, m, c), r in rows.items():
        cells = [", ".join(f"{k} {b:.2f}" for k, b in r[v + " busy"].items() if k == "draft" or k in WORKLOADS[w])
                 for v in variants]
        md.append(f"| {w} | {m} | {c} | " + " | ".join(cells) + " |")
    if "ar" in modes and "s2d" in modes:
        md += ["",
               "| workload | concurrency | s2d/ar in-process | " + " | ".join(f"s2d/ar {v}" for v in variants) + " |",
               "|---|---|---|" + "---|" * len(variants)]
        for w in workloads:
            for c in levels:
                s, r = rows[w, "s2d", c], rows[w, "ar", c]
                md.append(f"| {w} | {c} | {s['in-process'] / r['in-process']:.2f} | "
                          + " | ".join(f"{s[v] / r[v]:.2f}" for v in variants) + " |")
    print("\n" + "\n".join(md))
    if a.out:
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.md").write_text("\n".join(md) + "\n")
        (out / "results.json").write_text(json.dumps([{"workload": w, "mode": m, "concurrency": c, **r}
                                                      for (w, m, c), r in rows.items()], indent=1))


if __name__ == "__main__":
    main()
