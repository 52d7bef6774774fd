"""Benchmarks of resilient against its peer libraries: ``python -m benchmarks``."""
