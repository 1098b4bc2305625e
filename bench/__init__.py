"""Benchmarks of serving and training against plain diffusers; see bench/RESULTS.md."""
