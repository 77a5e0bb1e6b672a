"""`GET /metrics` on the HTTP port: the s2d metrics of every node, in Prometheus text format, where
load tools look for them (as vLLM serves its metrics on its API port). Ray exports each node's
metrics on that node's metrics export port; the ingress fetches them from every live node and
keeps the s2d families. The export ports stay what Prometheus and KubeRay scrape."""
from __future__ import annotations

import asyncio
import logging
import urllib.request

import ray
from prometheus_client.exposition import generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import CollectorRegistry

log = logging.getLogger("ray.serve")
PREFIX = "ray_s2d_"
TIMEOUT_S = 2.0


def merge(texts: list[str], prefix: str = PREFIX) -> str:
    """The families starting with `prefix` from several nodes' exports, each family once with every
    node's samples under it (the text format allows a family in one place only), parsed and
    written by prometheus_client."""
    families: dict[str, Metric] = {}
    for text in texts:
        for f in text_string_to_metric_families(text):
            if not f.name.startswith(prefix):
                continue
            if f.name in families:
                families[f.name].samples += f.samples
            else:
                families[f.name] = f
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(list(families.values())))
    return generate_latest(registry).decode()


class _Families:
    """A collector of families already gathered."""

    def __init__(self, families: list[Metric]):
        self.families = families

    def collect(self) -> list[Metric]:
        return self.families


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
