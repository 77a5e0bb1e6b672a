"""The wire: OpenAI bodies and errors (no web framework) and the gRPC client. The gRPC stubs and
servicer are generated into s2d/proto/."""
