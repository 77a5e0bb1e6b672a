"""Deployment files: the KubeRay manifest validates against KubeRay's CRD, and every config that
ships parses with the engine's pydantic model."""
from pathlib import Path

import jsonschema
import pytest
import yaml

from s2d.core.config import EngineConfig

ROOT = Path(__file__).resolve().parents[1]
CRD = ROOT.parent / "shared" / "data" / "kuberay" / "ray.io_rayservices.yaml"


@pytest.mark.skipif(not CRD.exists(),
                    reason=f"KubeRay's CRD is not at {CRD} (../shared/data/kuberay, this workspace only)")
def test_rayservice_validates_against_the_kuberay_crd():
    crd = yaml.safe_load(CRD.read_text())
    schema = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")["schema"]["openAPIV3Schema"]
    manifest = yaml.safe_load((ROOT / "cluster" / "rayservice.yaml").read_text())
    jsonschema.validate(manifest, schema)
    serve = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    assert serve == yaml.safe_load((ROOT / "cluster" / "serve_config.gpu.yaml").read_text())


def test_gpu_engine_config_places_the_family_in_two_cells():
    from deployments.ray_executor import cell_bundles

    cfg = EngineConfig.model_validate(yaml.safe_load((ROOT / "cluster" / "engine.gpu.yaml").read_text()))
    big = cfg.target("llama-2-70b-chat")
    assert big.tensor_parallel == 4 and big.num_gpus == 1 and cfg.target("vicuna-13b").tensor_parallel == 2
    assert (cfg.cell_of("llama-2-70b-chat").name == "70b"
            and cfg.cell_of("vicuna-7b").targets == ["vicuna-7b", "vicuna-13b"])
    # the cell's own bundle, the draft's, each target rank's: every cell holds a draft
    family, seventy = ([b.get("GPU", 0) for b in cell_bundles(cfg, c)] for c in ("family", "70b"))
    assert family == [0, 1, 1, 1, 1] and seventy == [0, 1, 1, 1, 1, 1]
    # and a replica's placement group fits one node of its KubeRay worker group (PACK keeps NCCL on a node)
    groups = yaml.safe_load((ROOT / "cluster" / "rayservice.yaml").read_text())["spec"]["rayClusterConfig"]
    gpus = {g["groupName"]: int(g["rayStartParams"]["num-gpus"]) for g in groups["workerGroupSpecs"]}
    assert sum(family) == gpus["gpu-4x"] and sum(seventy) <= gpus["gpu-8x"]


def test_cells_default_to_one_and_must_cover_every_target_once():
    base = {"draft": {"path": "d"}, "targets": [{"name": "a", "path": "x"}, {"name": "b", "path": "y"}]}
    assert [(c.name, c.targets) for c in EngineConfig.model_validate(base).cells] == [("main", ["a", "b"])]
    for cells, match in [([{"name": "c1", "targets": ["a"]}], "exactly one cell"),
                         ([{"name": "c1", "targets": ["a", "zz"]}], "unknown targets"),
                         ([{"name": "c1", "targets": ["a"]}, {"name": "c2", "targets": ["a", "b"]}],
                          "exactly one cell")]:
        with pytest.raises(ValueError, match=match):
            EngineConfig.model_validate({**base, "cells": cells})


def test_serve_config_names_the_app_builder_and_stubs():
    cfg = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    app = cfg["applications"][0]
    assert app["import_path"] == "deployments.app:build_app"
    assert cfg["grpc_options"]["grpc_servicer_functions"] == ["s2d.proto.servicer.add_S2DServicer_to_server"]


def test_podmonitor_scrapes_the_metrics_port_of_every_ray_node():
    monitor = yaml.safe_load((ROOT / "cluster" / "podmonitor.yaml").read_text())
    service = yaml.safe_load((ROOT / "cluster" / "rayservice.yaml").read_text())["spec"]["rayClusterConfig"]
    port = monitor["spec"]["podMetricsEndpoints"][0]["port"]
    groups = [service["headGroupSpec"], *service["workerGroupSpecs"]]
    for g in groups:
        ports = {p["name"]: p["containerPort"] for p in g["template"]["spec"]["containers"][0]["ports"]}
        assert str(ports[port]) == g["rayStartParams"]["metrics-export-port"], g
    assert set(monitor["spec"]["selector"]["matchExpressions"][0]["values"]) == {"head", "worker"}
