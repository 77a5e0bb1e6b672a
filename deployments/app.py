"""The app builder that serve_config.yaml names: reads the engine config (a YAML path, or 'demo')
and wires one shared draft deployment, one deployment per target, and the gRPC router."""
from __future__ import annotations

from ray.serve.config import RequestRouterConfig

from deployments.router import S2DRouter
from deployments.workers import DraftDeployment, TargetDeployment
from s2d.config import EngineConfig, ModelSpec, load_config


def _options(spec: ModelSpec) -> dict:
    opts = {"ray_actor_options": {"num_cpus": spec.num_cpus, "num_gpus": spec.num_gpus},
            "max_ongoing_requests": max(2 * spec.max_seqs, 8),
            "request_router_config": RequestRouterConfig(
                request_router_class="deployments.affinity:SequenceAffinityRouter")}
    if spec.autoscaling:
        opts["autoscaling_config"] = spec.autoscaling
    else:
        opts["num_replicas"] = spec.num_replicas
    return opts


def build_app(args: dict):
    """`args`: {config: PATH or 'demo', device: optional device for every model}."""
    cfg: EngineConfig = load_config(args.get("config", "demo")).on_device(args.get("device") or None)
    data = cfg.model_dump()
    draft = DraftDeployment.options(name="draft", **_options(cfg.draft)).bind(data)
    targets = {t.name: TargetDeployment.options(name=f"target-{t.name}", **_options(t)).bind(data, t.name)
               for t in cfg.targets}
    return S2DRouter.options(name="router", ray_actor_options={"num_cpus": 0},
                             max_ongoing_requests=cfg.limits.max_waiting + 16).bind(data, draft, targets)
