"""`GET /metrics` on the HTTP port: the s2d metrics of every node, in Prometheus text format, where
load tools look for them (as vLLM serves its metrics on its API port). Ray exports each node's
metrics on that node's metrics export port; the ingress fetches them from every live node and
keeps the s2d families. The export ports stay what Prometheus and KubeRay scrape."""
from __future__ import annotations

import asyncio
import logging
import urllib.request

import ray

log = logging.getLogger("ray.serve")
PREFIX = "ray_s2d_"
TIMEOUT_S = 2.0


def metric_of(line: str) -> str | None:
    """The family a line of the text format belongs to (`# HELP name ...`, `# TYPE name ...`, or a
    sample `name{labels} value`, whose _bucket, _sum, _count and _total suffixes stay on)."""
    if line.startswith("# HELP ") or line.startswith("# TYPE "):
        return line.split(" ", 3)[2]
    if not line or line.startswith("#"):
        return None
    return line.split("{", 1)[0].split(" ", 1)[0]


def merge(texts: list[str], prefix: str = PREFIX) -> str:
    """The families starting with `prefix` from several nodes' exports, each family's HELP and
    TYPE once and its samples together (the text format allows a family in one place only)."""
    heads: dict[str, list[str]] = {}
    samples: dict[str, list[str]] = {}
    for text in texts:
        family = None
        for line in text.splitlines():
            name = metric_of(line)
            if name is None or not name.startswith(prefix):
                continue
            if line.startswith("#"):
                family = name
                if len(heads.setdefault(name, [])) < 2 and line not in heads[name]:
                    heads[name].append(line)
            else:  # a sample belongs to the family declared before it (a histogram's _bucket, _sum ...)
                samples.setdefault(family if family and name.startswith(family) else name, []).append(line)
    out = []
    for family in dict.fromkeys([*heads, *samples]):
        out += heads.get(family, []) + samples.get(family, [])
    return "\n".join(out) + "\n"


def _fetch(url: str) -> str:
    with urllib.request.urlopen(url, timeout=TIMEOUT_S) as r:  # noqa: S310 - a node's own export port
        return r.read().decode("utf-8", "replace")


def export_urls() -> list[str]:
    return [f"http://{n['NodeManagerAddress']}:{n['MetricsExportPort']}/metrics"
            for n in ray.nodes() if n.get("Alive") and n.get("MetricsExportPort")]


async def s2d_metrics() -> str:
    """Every live node's s2d families, merged; a node that does not answer in TIMEOUT_S is left out
    (and logged), so one lost node does not fail the scrape."""
    urls = await asyncio.to_thread(export_urls)
    texts = await asyncio.gather(*(asyncio.to_thread(_fetch, u) for u in urls), return_exceptions=True)
    for url, t in zip(urls, texts):
        if isinstance(t, BaseException):
            log.warning("metrics of %s left out: %s", url, t)
    return merge([t for t in texts if isinstance(t, str)])
