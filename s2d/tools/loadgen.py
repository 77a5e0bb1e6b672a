"""A small closed-loop load generator over gRPC, for tests and benchmarks (benchmarks/load_bench.py):
`concurrency` client threads, each sending the next job of a shared list as soon as its previous
one has answered, unary or streaming; every job ends in an `Outcome` (an RPC error or a client
crash included, none lost silently). `summarize` gives completions, losses, wrong outputs (against
the in-process engine's greedy outputs, `reference_outputs`), latency percentiles and tokens/s."""
from __future__ import annotations

import math
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import grpc

from s2d.api.client import S2DClient


@dataclass
class Job:
    target: str
    prompt: str
    mode: str = "s2d"  # s2d | ar | fixed:E
    max_tokens: int = 32
    stream: bool = False

    @property
    def key(self) -> tuple:
        return (self.target, self.prompt, self.mode, self.max_tokens)


@dataclass
class Outcome:
    job: Job
    ok: bool
    code: str | None = None  # the grpc status name on an error
    details: str = ""
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    latency_s: float = float("nan")  # send -> final message
    ttft_s: float = float("nan")  # stream: first chunk; unary: the latency
    finished: bool = False  # a final chunk / a response with a finish_reason was seen


def send(client: S2DClient, job: Job, timeout_s: float) -> Outcome:
    ids, text, finished, ttft, t0 = [], [], False, None, time.perf_counter()
    kw = dict(max_tokens=job.max_tokens, mode=job.mode, timeout=timeout_s)
    try:
        if job.stream:
            for chunk in client.stream(job.target, job.prompt, **kw):
                ttft = time.perf_counter() - t0 if ttft is None else ttft
                ids += chunk.token_ids
                text.append(chunk.text)
                finished = chunk.finished
        else:
            r = client.generate(job.target, job.prompt, **kw)
            ids, text, finished = list(r.token_ids), [r.text], bool(r.finish_reason)
    except grpc.RpcError as e:
        lat = time.perf_counter() - t0
        return Outcome(job, False, e.code().name, e.details() or "", ids, "".join(text), lat,
                       lat if ttft is None else ttft, False)
    lat = time.perf_counter() - t0
    return Outcome(job, True, None, "", ids, "".join(text), lat, lat if ttft is None else ttft, finished)


def run_load(address: str, jobs: list[Job], concurrency: int, timeout_s: float = 120,
             duration_s: float | None = None) -> tuple[list[Outcome], float]:
    """Closed loop: returns the outcomes in job order and the wall time. With `duration_s` the
    threads cycle over `jobs` and stop taking new ones once it has passed (outcome i is for job
    i % len(jobs)); without, each job is sent once."""
    lock, results, claimed = threading.Lock(), {}, [0]
    t0 = time.perf_counter()

    def next_index() -> int | None:
        with lock:
            i = claimed[0]
            if (duration_s is None and i >= len(jobs)) or (duration_s is not None and
                                                           time.perf_counter() - t0 >= duration_s):
                return None
            claimed[0] += 1
            return i

    def worker():
        client = S2DClient(address, timeout=timeout_s)
        try:
            while (i := next_index()) is not None:
                job = jobs[i % len(jobs)]
                try:
                    results[i] = send(client, job, timeout_s)
                except Exception as e:  # a client-side failure: recorded, the thread goes on
                    results[i] = Outcome(job, False, "CLIENT_ERROR", repr(e))
        finally:
            client.close()

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    n = len(jobs) if duration_s is None else claimed[0]
    return [results.get(i) or Outcome(jobs[i % len(jobs)], False, "NOT_RUN", "its client thread died")
            for i in range(n)], wall


def percentile(xs: list[float], q: float) -> float:
    """Nearest rank: the smallest x with at least a fraction q of xs at or below it."""
    xs = sorted(xs)
    return xs[max(0, math.ceil(q * len(xs)) - 1)] if xs else float("nan")


def summarize(outcomes: list[Outcome], wall_s: float, reference: dict | None = None) -> dict:
    done = [o for o in outcomes if o.ok and o.finished]
    lat, ttft = [o.latency_s for o in done], [o.ttft_s for o in done]
    checked = [o for o in outcomes if o.ok and reference is not None and o.job.key in reference]
    p50, p99 = percentile(lat, 0.5), percentile(lat, 0.99)
    return {"requests": len(outcomes), "completed": len(done), "lost": len(outcomes) - len(done),
            "wrong": sum(list(o.token_ids) != list(reference[o.job.key]) for o in checked), "checked": len(checked),
            "p50_s": p50, "p90_s": percentile(lat, 0.9), "p99_s": p99, "max_s": max(lat, default=float("nan")),
            "p99_over_p50": p99 / p50 if p50 > 0 else float("nan"), "ttft_p50_s": percentile(ttft, 0.5),
            "tokens_per_s": sum(len(o.token_ids) for o in done) / wall_s if wall_s > 0 else 0.0, "wall_s": wall_s,
            "errors": dict(Counter(o.code or "UNFINISHED" for o in outcomes if not (o.ok and o.finished)))}


def reference_outputs(engine, jobs: list[Job], batch: int = 32) -> dict:
    """Greedy token ids of the in-process engine for each distinct (target, prompt, mode, max_tokens)."""
    from s2d.core.config import SamplingParams
    from s2d.core.engine import Request

    keys = list(dict.fromkeys(j.key for j in jobs))
    ref = {}
    for s in range(0, len(keys), batch):
        part = keys[s: s + batch]
        outs = engine.generate([Request(target=t, prompt=p, mode=m, params=SamplingParams(max_tokens=n))
                                for t, p, m, n in part])
        ref.update({k: list(o["token_ids"]) for k, o in zip(part, outs)})
    return ref
