"""The committed gRPC stubs are what protos/s2d.proto generates."""
from pathlib import Path

from s2d.proto.generate import generate

PKG = Path(__file__).resolve().parents[1] / "s2d" / "proto"


def test_regenerating_the_stubs_gives_the_committed_files(tmp_path):
    out = tmp_path / "s2d" / "proto"
    out.mkdir(parents=True)
    generate(out)
    for name in ("s2d_pb2.py", "s2d_pb2_grpc.py"):
        assert (out / name).read_text() == (PKG / name).read_text(), name
