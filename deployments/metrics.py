"""The served app's Prometheus metrics, through Ray Serve's metrics (they appear wherever Ray's
metrics are scraped, as `ray_<name>` with `_total` on counters, tagged by Ray with application,
deployment and replica).

The ingress records a request's figures when its last delta passes, from the very stats and
timing that answer the client, so a counter's increase equals the sum of what the responses
returned; the spec-decode counters are named after vLLM's. Each cell replica sets its gauges from
the scheduler's load about once a second (s2d/core/loop.py)."""
from __future__ import annotations

import functools
import logging

from ray.serve.metrics import Counter, Gauge, Histogram

log = logging.getLogger("ray.serve")

LATENCY_S = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300]
ITL_S = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5]
MAT = [1.0, 1.25, 1.5, 1.75, 2, 2.5, 3, 4, 5, 6, 8, 12, 17]


def _never_raises(record):
    """Metrics never fail a request: an error in recording is logged."""
    @functools.wraps(record)
    def safely(*args, **kw):
        try:
            record(*args, **kw)
        except Exception:  # noqa: BLE001
            log.exception("%s failed", record.__name__)
    return safely


def _counter(name: str, doc: str, *tags: str) -> Counter:
    return Counter(name, description=doc, tag_keys=("target", *tags))


def _histogram(name: str, doc: str, boundaries: list[float]) -> Histogram:
    return Histogram(name, description=doc, boundaries=boundaries, tag_keys=("target",))


def _gauge(name: str, doc: str, *tags: str) -> Gauge:
    return Gauge(name, description=doc, tag_keys=tags)


class RequestMetrics:
    """Per finished request, in the ingress: counters, latency and MAT histograms."""

    def __init__(self):
        self.drafts = _counter("s2d_spec_decode_num_drafts", "Verify rounds that checked at least one drafted token")
        self.draft_tokens = _counter("s2d_spec_decode_num_draft_tokens", "Drafted tokens")
        self.accepted = _counter("s2d_spec_decode_num_accepted_tokens", "Drafted tokens the target accepted")
        self.accepted_per_pos = _counter("s2d_spec_decode_num_accepted_tokens_per_pos",
                                         "Accepted drafted tokens per draft position (0: the first)", "position")
        self.per_exit = _counter("s2d_spec_decode_num_draft_tokens_per_exit",
                                 "Drafted tokens per draft exit (layer depth) they left the draft at", "exit")
        self.forwards = _counter("s2d_target_forwards", "Target forwards that emitted tokens (verify rounds)")
        self.tokens = _counter("s2d_generation_tokens", "Completion tokens returned to clients")
        self.emitted = _counter("s2d_verified_tokens", "Tokens the verify rounds produced, bonus tokens and those "
                                "past an end (EOS, stop, max_tokens) included: MAT = this / target_forwards")
        self.prompt_tokens = _counter("s2d_prompt_tokens", "Prompt tokens of finished requests")
        self.finished = _counter("s2d_requests_finished", "Finished requests", "finish_reason")
        self.failed = Counter("s2d_requests_failed", description="Requests ended with an error, by protocol and "
                              "status (gRPC status names, OpenAI error codes)",
                              tag_keys=("target", "protocol", "status"))
        self.ttft = _histogram("s2d_time_to_first_token_seconds",
                               "Arrival in the scheduler to the first token", LATENCY_S)
        self.itl = _histogram("s2d_inter_token_latency_seconds",
                        "Gap between a request's rounds that emitted tokens (one round may emit several)", ITL_S)
        self.e2e = _histogram("s2d_e2e_request_latency_seconds",
                              "Arrival in the scheduler to the last token", LATENCY_S)
        self.queue = _histogram("s2d_request_queue_seconds",
                                "Arrival in the scheduler to admission (a KV slot)", LATENCY_S)
        self.mat = _histogram("s2d_mean_accepted_tokens", "Per request: tokens emitted per target forward (MAT)", MAT)

    @_never_raises
    def failed_request(self, target: str, protocol: str, status: str):
        self.failed.inc(1, tags={"target": target, "protocol": protocol, "status": status})

    @_never_raises
    def finished_request(self, target: str, finish_reason: str, usage: dict, stats: dict, timing: dict | None):
        t, timing = {"target": target}, timing or {}
        proposed, accepted_at = stats["proposed_at"], stats["accepted_at"]
        for counter, value in ((self.drafts, proposed[0] if proposed else 0), (self.draft_tokens, stats["drafted"]),
                               (self.accepted, stats["accepted"]), (self.forwards, stats["target_forwards"]),
                               (self.emitted, stats["emitted"]), (self.tokens, usage["completion_tokens"]),
                               (self.prompt_tokens, usage["prompt_tokens"])):
            if value:  # Ray counters take only positive increments
                counter.inc(value, tags=t)
        for pos, n in enumerate(accepted_at):
            if n:
                self.accepted_per_pos.inc(n, tags=t | {"position": str(pos)})
        for depth, n in stats["exit_histogram"].items():
            if n:
                self.per_exit.inc(n, tags=t | {"exit": str(depth)})
        self.finished.inc(1, tags=t | {"finish_reason": finish_reason})
        if stats["target_forwards"]:
            self.mat.observe(stats["mat"], tags=t)
        for hist, key in ((self.ttft, "ttft_s"), (self.e2e, "e2e_s"), (self.queue, "queue_s")):
            if key in timing:
                hist.observe(timing[key], tags=t)
        for gap in timing.get("itl_s", ()):
            self.itl.observe(gap, tags=t)


class LoadMetrics:
    """Per cell replica: running and waiting requests, KV slots, the draft policy's choices, and
    where ticks spend their time (counters of seconds: rate() gives each part's share)."""

    def __init__(self):
        self.running = _gauge("s2d_num_requests_running", "Requests holding KV slots", "target")
        self.waiting = _gauge("s2d_num_requests_waiting", "Requests queued for a KV slot", "target")
        self.slots_used = _gauge("s2d_kv_slots_used", "KV-cache slots in use (one per running request)", "target")
        self.slots_total = _gauge("s2d_kv_slots_total", "KV-cache slots (max_seqs)", "target")
        self.draft_k = _gauge("s2d_draft_policy_k", "The draft policy's cap on drafted tokens per round",
                              "target", "kind")
        self.threshold = _gauge("s2d_draft_exit_threshold", "The confidence an exit needs to stop the draft there",
                                "target", "kind", "exit_index")
        self.tick_s = Counter("s2d_tick_seconds", description="Seconds of scheduler ticks, by part "
                              "(draft forwards, verify forwards, the rest: the engine's own work)", tag_keys=("part",))
        self._last = {"draft": 0.0, "verify": 0.0, "engine": 0.0}

    def report(self, load: dict):
        """Scheduler.load(), on the scheduler's thread."""
        for target, v in load["targets"].items():
            t = {"target": target}
            self.running.set(v["running"], tags=t)
            self.waiting.set(v["waiting"], tags=t)
        for target, v in [*load["targets"].items(), ("(draft)", load["draft"])]:
            self.slots_used.set(v["running"], tags={"target": target})  # a running request holds one slot
            self.slots_total.set(v["kv_slots"], tags={"target": target})
        for (target, kind), p in load["policy"].items():
            self.draft_k.set(p["k"], tags={"target": target, "kind": kind})
            for i, x in enumerate(p["thresholds"]):
                self.threshold.set(x, tags={"target": target, "kind": kind, "exit_index": str(i)})
        b = load["breakdown"]  # cumulative
        now = {"draft": b.draft_s, "verify": b.verify_s, "engine": b.engine_s}
        for part, s in now.items():
            if s > self._last[part]:
                self.tick_s.inc(s - self._last[part], tags={"part": part})
                self._last[part] = s

