"""Thin Ray Serve adapters over the s2d engine: a shared draft, one deployment per target, a gRPC router."""
