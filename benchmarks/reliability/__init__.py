"""Reliability report: load, fuzz and faults on real servers (``python -m benchmarks.reliability``).

The suite ``tests/reliability/`` calls the same functions with smaller numbers."""
