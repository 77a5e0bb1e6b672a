"""The engine core: requests and their checks, a sequence's state, the one scheduler, the draft
policy, the executor protocol, the in-process engine and the scheduler's serving loop. No Ray, no
gRPC, no web framework: deployments/ adapts it to Ray Serve."""
