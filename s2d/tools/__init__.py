"""What users run around the engine: the `s2d` command line, benchmarks, profile tuning and the load
generator."""
