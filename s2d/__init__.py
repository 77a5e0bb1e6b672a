"""s2d: sorted speculative decoding for several targets of one family from one shared draft."""
import os

# OpenMP (libgomp, torch's CPU threads) lets a worker thread spin 300k times waiting for the next
# parallel region, then sleep. A scratch run measured a demo-l verify at 5.7 ms after a 1 ms pause
# against 2.8 ms with ten times the spin; `benchmarks/omp_wake.py` has not confirmed it yet
# (docs/bench/compiled.md). One process that computes alone (the in-process engine, the CLI, a
# cell with the in_process transport) spins ten times longer; actors that share the host's cores
# keep libgomp's default (deployments/executor.py). Set before torch loads libgomp.
SPIN_ALONE, SPIN_SHARED = "3000000", "300000"
os.environ.setdefault("GOMP_SPINCOUNT", SPIN_ALONE)
