"""Thin Ray adapters over the s2d scheduler: serving cells (the shared draft and their targets as actors in one
placement group, on a compiled graph) behind a gRPC ingress."""
