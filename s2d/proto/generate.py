"""Regenerate the gRPC stubs from protos/s2d.proto into this package (tests check they match)."""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def generate(out_dir: Path = Path(__file__).parent) -> None:
    from grpc_tools import protoc

    # The virtual path s2d/proto/ makes the stubs import each other as `s2d.proto.*`.
    args = ["protoc", f"-Is2d/proto={ROOT / 'protos'}", f"-I{ROOT / 'protos'}", f"--python_out={out_dir.parents[1]}",
            f"--grpc_python_out={out_dir.parents[1]}", str(ROOT / "protos" / "s2d.proto")]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed")


if __name__ == "__main__":
    generate(Path(sys.argv[1]) / "s2d" / "proto" if len(sys.argv) > 1 else Path(__file__).parent)
