"""Serve the app on a local Ray cluster from Python (tests, benchmarks): the settings Ray needs on
a machine with only loopback (../shared/notes/ray-serve-here.md), and the gRPC proxy on a free port."""
from __future__ import annotations

import os
import random
import socket

LOCAL_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
             "HF_HUB_OFFLINE": "1"}


def set_local_env():
    for k, v in LOCAL_ENV.items():
        os.environ.setdefault(k, v)


def free_port() -> int:
    """A free port between Ray's worker ports (10002-19999) and the ephemeral range (32768 up on
    Linux): a port picked by binding port 0 could be taken by one of Ray's processes, which bind
    port 0 too, before Serve binds it."""
    for port in random.sample(range(20000, 32000), 500):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in 20000-31999")


def serve_locally(config: str, num_cpus: int | None = None, http_port: int | None = None,
                  metrics_port: int | None = None) -> str:
    """Start Ray and Serve in this process, deploy the app for `config`; returns the gRPC address.
    HTTP (the OpenAI API) listens on `http_port` (default: a free one); with `metrics_port`, Ray
    exports Prometheus metrics there, reported every second."""
    set_local_env()
    import ray
    from ray import serve

    port = free_port()
    metrics = {"_metrics_export_port": metrics_port, "_system_config": {"metrics_report_interval_ms": 1000}}
    ray.init(num_cpus=num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False,
             **(metrics if metrics_port else {}))
    serve.start(http_options={"host": "127.0.0.1", "port": http_port or free_port()},
                grpc_options={"port": port,
                              "grpc_servicer_functions": ["s2d.proto.servicer.add_S2DServicer_to_server"]})
    deploy(config)
    return f"127.0.0.1:{port}"


def deploy(config: str):
    """Deploy (or redeploy) the app for `config` on the running local Serve instance."""
    from ray import serve

    from deployments.app import build_app

    serve.run(build_app({"config": config}), name="s2d", route_prefix="/")


def shutdown():
    import ray
    from ray import serve

    serve.shutdown()
    ray.shutdown()
