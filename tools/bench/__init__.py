"""Benchmark machinery of `templar bench`, `bench-gateway` and `bench-train`: the same RM or training step through
Templar and its peers, side by side in one run (the comparison servers and in-process baselines live here too)."""
