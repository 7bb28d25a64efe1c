"""Benchmarks users can rerun: fidelity, cost curve, kernel microbenchmarks (results/ holds figures with the device named)."""
