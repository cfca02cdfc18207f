"""Float64 references, per-dtype tolerances and check helpers shared by tests and benchmarks."""
