"""Python stubs generated from protos/s2d.proto by `python -m s2d.proto.generate` (grpcio-tools)."""
